/* The kernel's vector operations on AVX2 + FMA (+ F16C): 8 fp32 lanes, 16 registers; lane masks are vectors.
 * Included by attn_avx2.c only, under the target of the whole translation unit. */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define VL 8        /* lanes */
#ifndef NV
#define NV 2        /* vectors of query rows per tile: 16 rows */
#endif
#ifndef KG
#define KG 6        /* keys per QK micro-kernel: 12 accumulators + 2 query vectors + 1 broadcast */
#endif
#ifndef RB
#define RB 4        /* rows per PV micro-kernel */
#endif
#ifndef PW
#define PW 3        /* value vectors per PV / outer-product block: 24 columns, 12 accumulators */
#endif
#ifndef OG
#define OG 6        /* outputs per outer-product micro-kernel: dQ 4 rows × PW, dK/dV KG keys × OPW */
#endif
#ifndef PVT
#define PVT 1       /* the forward's P·V transposed: KG columns × NV row vectors (measured 5-10% faster) */
#endif
#ifndef OPW
#define OPW 2       /* value vectors per dK/dV block: 16 columns, 12 accumulators (D = 64 in 4 full blocks) */
#endif
#ifndef DCH
#define DCH 8       /* decoding: key vectors held in registers */
#endif
#ifndef RD
#define RD 4        /* decoding: rows per PV block */
#endif
#ifndef CWD
#define CWD 2       /* decoding: value vectors per PV block */
#endif

typedef __m256 V;
typedef __m256 M;   /* all-ones lanes where true */
#define INL static inline __attribute__((always_inline))

INL V vzero(void) { return _mm256_setzero_ps(); }
INL V vset1(float x) { return _mm256_set1_ps(x); }
INL V vld(const float *p) { return _mm256_loadu_ps(p); }
INL void vst(float *p, V x) { _mm256_storeu_ps(p, x); }
INL V vadd(V a, V b) { return _mm256_add_ps(a, b); }
INL V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
INL V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
INL V vmax(V a, V b) { return _mm256_max_ps(a, b); }
INL V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
INL V vfms(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
INL M mtrue(void) { return _mm256_castsi256_ps(_mm256_set1_epi32(-1)); }
INL M mand(M a, M b) { return _mm256_and_ps(a, b); }
INL V vsel(M m, V a, V b) { return _mm256_blendv_ps(a, b, m); }
INL V vmaskz(M m, V a) { return _mm256_and_ps(m, a); }
INL M mseen(V x) { return _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_UQ); }
INL __m256i iota_(void) { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
INL __m256i first_i(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), iota_()); }
INL M mfirst(int n) { return _mm256_castsi256_ps(first_i(n)); }
INL M mrange(const int32_t *lo, const int32_t *hi, int64_t j) {
    const __m256i jv = _mm256_set1_epi32((int32_t)j);
    const __m256i l = _mm256_loadu_si256((const __m256i *)lo), h = _mm256_loadu_si256((const __m256i *)hi);
    return _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpgt_epi32(l, jv), _mm256_cmpgt_epi32(h, jv)));
}
INL M miota(int64_t base, int64_t lo, int64_t hi) {
    const __m256i j = _mm256_add_epi32(_mm256_set1_epi32((int32_t)base), iota_());
    return _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)lo), j),
                                                   _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)hi), j)));
}
INL V vld_n(const float *p, int n) { return _mm256_maskload_ps(p, first_i(n)); }
INL void vst_n(float *p, V x, int n) { _mm256_maskstore_ps(p, first_i(n), x); }
INL V vld_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
INL V vld_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
INL V vld_bf16_n(const uint16_t *p, int n) {   /* no 16-bit masked load in AVX2: a tail goes through memory */
    uint16_t t[VL] = {0};
    memcpy(t, p, sizeof(uint16_t) * n);
    return vld_bf16(t);
}
INL V vld_f16_n(const uint16_t *p, int n) {
    uint16_t t[VL] = {0};
    memcpy(t, p, sizeof(uint16_t) * n);
    return vld_f16(t);
}
INL float f16_to_f32(uint16_t x) { return _cvtsh_ss(x); }
INL float vhmax(V x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}
INL float vhsum(V x) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* 2^x for x <= 0, as on AVX-512: the polynomial times 2^n built in the exponent field (n >= −126). */
INL V vexp2(V x) {
    x = _mm256_max_ps(_mm256_set1_ps(-126.0f), x);     /* max(c, NaN) is NaN: a NaN score stays NaN */
    V n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V g = _mm256_mul_ps(_mm256_sub_ps(x, n), _mm256_set1_ps(0.6931471805599453f));
    V p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* Lane j = the sum of the lanes of vector a + j·VL: horizontal adds within 128-bit halves, then the halves. */
INL V vsum_lanes(const float *a) {
    V h[4];
    for (int i = 0; i < 4; i++) h[i] = _mm256_hadd_ps(vld(a + 2 * i * VL), vld(a + (2 * i + 1) * VL));
    V t = _mm256_hadd_ps(h[0], h[1]), u = _mm256_hadd_ps(h[2], h[3]);   /* [0..3 low | 0..3 high], [4..7 ...] */
    return _mm256_add_ps(_mm256_permute2f128_ps(t, u, 0x20), _mm256_permute2f128_ps(t, u, 0x31));
}
