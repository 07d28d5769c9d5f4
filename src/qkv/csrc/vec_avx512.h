/* The kernel's vector operations on AVX-512 (F, DQ, VL, BW): 16 fp32 lanes, 32 registers, mask registers.
 * Included by attn_avx512.c only, under the target of the whole translation unit. */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,fma,f16c")
#endif
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define VL 16       /* lanes */
#define NV 2        /* vectors of query rows per tile: 32 rows */
#define KG 8        /* keys per QK micro-kernel: 16 accumulators */
#define RB 8        /* rows per PV micro-kernel */
#define PW 2        /* value vectors per PV / outer-product block: 32 columns, 16 accumulators */
#define OG 8        /* outputs per outer-product micro-kernel */
#ifndef PVT
#define PVT 1       /* the forward's P·V transposed: KG columns × NV row vectors (measured 5-10% faster) */
#endif
#define DCH 8       /* decoding: key vectors held in registers */
#define RD 4        /* decoding: rows per PV block */
#define CWD 4       /* decoding: value vectors per PV block (RD·CWD accumulators) */

typedef __m512 V;
typedef __mmask16 M;
#define INL static inline __attribute__((always_inline))

INL V vzero(void) { return _mm512_setzero_ps(); }
INL V vset1(float x) { return _mm512_set1_ps(x); }
INL V vld(const float *p) { return _mm512_loadu_ps(p); }
INL void vst(float *p, V x) { _mm512_storeu_ps(p, x); }
INL V vadd(V a, V b) { return _mm512_add_ps(a, b); }
INL V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
INL V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
INL V vmax(V a, V b) { return _mm512_max_ps(a, b); }
INL V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }    /* a·b + c */
INL V vfms(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }    /* a·b − c */
INL M mtrue(void) { return (M)0xFFFF; }
INL M mand(M a, M b) { return a & b; }
INL V vsel(M m, V a, V b) { return _mm512_mask_blend_ps(m, a, b); }   /* b where m, else a */
INL V vmaskz(M m, V a) { return _mm512_maskz_mov_ps(m, a); }
INL M mseen(V x) { return _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ); }   /* x != −inf */
INL M mfirst(int n) { return (M)((1u << n) - 1); }                    /* lanes < n (n < VL) */
/* lanes l with lo[l] <= j < hi[l] */
INL M mrange(const int32_t *lo, const int32_t *hi, int64_t j) {
    const __m512i jv = _mm512_set1_epi32((int32_t)j);
    return _mm512_cmpge_epi32_mask(jv, _mm512_loadu_si512(lo)) & _mm512_cmplt_epi32_mask(jv, _mm512_loadu_si512(hi));
}
/* lanes l with lo <= base + l < hi */
INL M miota(int64_t base, int64_t lo, int64_t hi) {
    const __m512i j = _mm512_add_epi32(_mm512_set1_epi32((int32_t)base),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    return _mm512_cmpge_epi32_mask(j, _mm512_set1_epi32((int32_t)lo)) & _mm512_cmplt_epi32_mask(j, _mm512_set1_epi32((int32_t)hi));
}
INL V vld_n(const float *p, int n) { return _mm512_maskz_loadu_ps(mfirst(n), p); }
INL void vst_n(float *p, V x, int n) { _mm512_mask_storeu_ps(p, mfirst(n), x); }
/* bf16: the upper half of an fp32; fp16: vcvtph2ps */
INL V vld_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
INL V vld_bf16_n(const uint16_t *p, int n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mfirst(n), p)), 16));
}
INL V vld_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
INL V vld_f16_n(const uint16_t *p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mfirst(n), p)); }
INL float f16_to_f32(uint16_t x) { return _cvtsh_ss(x); }
INL float vhmax(V x) { return _mm512_reduce_max_ps(x); }
INL float vhsum(V x) { return _mm512_reduce_add_ps(x); }

/* 2^x for x <= 0: 2^n · e^(f·ln2), |f| <= 1/2, Taylor to degree 7 (error < 6e-9 relative). x is clamped at
 * −126 so results stay normal numbers (2^−126 is below any weight that matters). A NaN stays NaN, so a NaN
 * score makes its row's result NaN, which the caller sees (it never passes for a masked key). */
INL V vexp2(V x) {
    x = _mm512_max_ps(_mm512_set1_ps(-126.0f), x);     /* max(c, NaN) is NaN: a NaN score stays NaN */
    V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V g = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));
    V p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Lane j of the result = the sum of the lanes of vector j, for the VL vectors a + j·VL: a tree of 128-bit,
 * then 32-bit shuffles (46 instructions for 16 sums). */
INL V vsum_lanes(const float *a) {
    V b[8], c[4], d[2];
    for (int i = 0; i < 8; i++) {          /* quarters 0,1: vector 2i; 2,3: vector 2i+1 (two partials each) */
        V x = vld(a + 2 * i * VL), y = vld(a + (2 * i + 1) * VL);
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    for (int i = 0; i < 4; i++)            /* quarter k: vector 4i+k (four lanes to add) */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++)            /* quarter k: [8i+k (two), 8i+4+k (two)] interleaved */
        d[i] = _mm512_add_ps(_mm512_unpacklo_ps(c[2 * i], c[2 * i + 1]), _mm512_unpackhi_ps(c[2 * i], c[2 * i + 1]));
    V e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(1, 0, 1, 0)),
                        _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 2, 3, 2)));   /* lane 4k+m: vector 4m+k */
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), e);
}
