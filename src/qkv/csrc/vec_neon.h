/* The kernel's vector operations on ARM64 NEON (Advanced SIMD, baseline on every ARMv8-A core): 4 fp32 lanes,
 * 32 registers; lane masks are vectors. Included by attn_neon.c only. */
#include <arm_neon.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define VL 4        /* lanes */
#define NV 4        /* vectors of query rows per tile: 16 rows */
#define KG 4        /* keys per QK micro-kernel: 16 accumulators */
#define RB 4        /* rows per PV micro-kernel */
#define PW 4        /* value vectors per PV / outer-product block: 16 columns, 16 accumulators */
#define OG 4        /* outputs per outer-product micro-kernel */
#define DCH 8       /* decoding: key vectors held in registers */
#define RD 4        /* decoding: rows per PV block */
#define CWD 4       /* decoding: value vectors per PV block */

typedef float32x4_t V;
typedef uint32x4_t M;
#define INL static inline __attribute__((always_inline))

INL V vzero(void) { return vdupq_n_f32(0.0f); }
INL V vset1(float x) { return vdupq_n_f32(x); }
INL V vld(const float *p) { return vld1q_f32(p); }
INL void vst(float *p, V x) { vst1q_f32(p, x); }
INL V vadd(V a, V b) { return vaddq_f32(a, b); }
INL V vsub(V a, V b) { return vsubq_f32(a, b); }
INL V vmul(V a, V b) { return vmulq_f32(a, b); }
INL V vmax(V a, V b) { return vmaxq_f32(a, b); }
INL V vfma(V a, V b, V c) { return vfmaq_f32(c, a, b); }
INL V vfms(V a, V b, V c) { return vnegq_f32(vfmsq_f32(c, a, b)); }   /* −(c − a·b), one rounding */
INL M mtrue(void) { return vdupq_n_u32(~0u); }
INL M mand(M a, M b) { return vandq_u32(a, b); }
INL V vsel(M m, V a, V b) { return vbslq_f32(m, b, a); }
INL V vmaskz(M m, V a) { return vreinterpretq_f32_u32(vandq_u32(m, vreinterpretq_u32_f32(a))); }
INL M mseen(V x) { return vmvnq_u32(vceqq_f32(x, vdupq_n_f32(-INFINITY))); }
INL int32x4_t iota_(void) { const int32_t i[4] = {0, 1, 2, 3}; return vld1q_s32(i); }
INL M mfirst(int n) { return vcltq_s32(iota_(), vdupq_n_s32(n)); }
INL M mrange(const int32_t *lo, const int32_t *hi, int64_t j) {
    const int32x4_t jv = vdupq_n_s32((int32_t)j);
    return vandq_u32(vcgeq_s32(jv, vld1q_s32(lo)), vcltq_s32(jv, vld1q_s32(hi)));
}
INL M miota(int64_t base, int64_t lo, int64_t hi) {
    const int32x4_t j = vaddq_s32(vdupq_n_s32((int32_t)base), iota_());
    return vandq_u32(vcgeq_s32(j, vdupq_n_s32((int32_t)lo)), vcltq_s32(j, vdupq_n_s32((int32_t)hi)));
}
INL V vld_n(const float *p, int n) { float t[VL] = {0}; memcpy(t, p, sizeof(float) * n); return vld1q_f32(t); }
INL void vst_n(float *p, V x, int n) { float t[VL]; vst1q_f32(t, x); memcpy(p, t, sizeof(float) * n); }
INL V vld_bf16(const uint16_t *p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
INL V vld_f16(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
INL V vld_bf16_n(const uint16_t *p, int n) { uint16_t t[VL] = {0}; memcpy(t, p, 2 * n); return vld_bf16(t); }
INL V vld_f16_n(const uint16_t *p, int n) { uint16_t t[VL] = {0}; memcpy(t, p, 2 * n); return vld_f16(t); }
INL float f16_to_f32(uint16_t x) { __fp16 h; memcpy(&h, &x, 2); return (float)h; }
INL float vhmax(V x) { return vmaxvq_f32(x); }
INL float vhsum(V x) { return vaddvq_f32(x); }

/* 2^x for x <= 0, as on x86: the polynomial times 2^n built in the exponent field (n >= −126). */
INL V vexp2(V x) {
    x = vmaxq_f32(x, vdupq_n_f32(-126.0f));            /* FMAX: a NaN score stays NaN */
    V n = vrndnq_f32(x);
    V g = vmulq_f32(vsubq_f32(x, n), vdupq_n_f32(0.6931471805599453f));
    V p = vdupq_n_f32(1.0f / 5040);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 720), p, g);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120), p, g);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24), p, g);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6), p, g);
    p = vfmaq_f32(vdupq_n_f32(0.5f), p, g);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, g);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, g);
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

/* Lane j = the sum of the lanes of vector a + j·VL: two pairwise adds. */
INL V vsum_lanes(const float *a) {
    return vpaddq_f32(vpaddq_f32(vld(a), vld(a + VL)), vpaddq_f32(vld(a + 2 * VL), vld(a + 3 * VL)));
}
