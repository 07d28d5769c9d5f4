/* qkv's CPU attention kernel, written once on a handful of vector operations and compiled once per
 * instruction set: a translation unit (attn_avx512.c, attn_avx2.c, attn_neon.c) includes its vec_*.h, which
 * defines the vector type V (VL fp32 lanes), the mask type M, the operations and the tile geometry (NV, KG, RB,
 * PW, OG, DCH, RD, CWD), then this file, and names the table it exports (QKV_ISA_SYM, QKV_ISA_NAME, QKV_ISA_RUNS).
 *
 * It computes the exact forward and backward of softmax(scale·q·kᵀ)·v over key ranges (no mask, causal, sliding
 * windows, bottom-right aligned), in fp32, from fp32, bf16 or fp16 inputs (converted as they are loaded: value and
 * row loads in registers; the QK micro-kernel broadcasts scalars of k, so for half inputs a chunk of at most KC
 * keys is converted into the thread's fp32 workspace, which stays in L2 — there is never a float copy of K or V).
 *
 * Layout of the work (tiles): a tile is QT = NV·VL query rows of one (batch, head). Scores are computed
 * *transposed*, one vector per key and NV vectors per tile (st[j][r]), so only the query tile is packed
 * (transposed, qt[d][r]); keys and values are read in place with scalar broadcasts. The row softmax is then
 * vertical (lane-wise max and sum, no horizontal reductions), and P·V either reads p[j][r] as broadcasts against
 * value rows (pv_kern), or (PVT) loads p[j][·] as row vectors against value broadcasts, accumulating the output
 * transposed (pvt_kern, which also computes the backward's dQ). Keys are visited in chunks of KC with FlashAttention's online softmax, so any key range works. Work
 * outside a row's range is skipped at the granularity of KG keys × VL rows (QK) and RB rows (PV). A task takes
 * `tt` consecutive tiles of one head through each chunk in turn, so that K and V come from memory once per pass
 * rather than once per tile (long unmasked rows at wide heads are bound by that stream otherwise).
 *
 * Decoding (few query rows): the rows of all query heads of one kv head form the tile (GQA), each key is
 * read once for all of them, vectors run along the head dimension, and the keys are split into ranges whose
 * partial results (out, lse) are merged afterwards (attn_cpu.c). Each tile and each split is one thread's,
 * and the splits depend on the shape only, so results do not depend on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "attn_common.h"

#ifndef PVT
#define PVT 0            /* 1: the forward's P·V transposed (pvt_kern); 0: by RB-row blocks (pv_kern) */
#endif
#ifndef OPW
#define OPW PW           /* value vectors per dK/dV outer-product block (KG keys at a time) */
#endif
#if NV > 4 || OG > 8 || PW > 4 || OPW > PW
#error "the micro-kernel dispatch below covers NV <= 4, OG <= 8, OPW <= PW <= 4"
#endif

#define QT (NV * VL)     /* query rows per tile */
#define CW (PW * VL)     /* columns per PV / dQ outer-product block */
#define OCW (OPW * VL)   /* columns per dK/dV outer-product block */
#ifndef KC
#define KC 512           /* keys per chunk of the online softmax */
#endif
#define TTMAX 4          /* tiles per pass, at most */
#define DEC_ROWS_MAX 16  /* decoding: query rows per head, at most */
#define DEC_RG 8         /* decoding: rows per group of the score pass */
#ifndef DEC_NV
#define DEC_NV 4         /* decoding: key vectors (VL keys each) per block of the online softmax and P·V */
#endif
#define DEC_NB (DEC_NV * VL)
#define LOG2E 1.4426950408889634f

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }
static inline int64_t rup(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* ------------------------------------------------------------------------------------------- element types */
INL float bf16_to_f32(uint16_t x) {
    const uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Element i of an array of type dt, as fp32 (dt is a constant where it matters: the callers are inlined). */
INL float ld_t(const void *p, int64_t i, const int dt) {
    if (dt == QKV_F32) return ((const float *)p)[i];
    if (dt == QKV_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    return f16_to_f32(((const uint16_t *)p)[i]);
}

/* Elements i .. i+VL (or the first n of them, the others 0) as one fp32 vector. */
INL V vld_t(const void *p, int64_t i, const int dt) {
    if (dt == QKV_F32) return vld((const float *)p + i);
    if (dt == QKV_BF16) return vld_bf16((const uint16_t *)p + i);
    return vld_f16((const uint16_t *)p + i);
}
INL V vld_t_n(const void *p, int64_t i, int n, const int dt) {
    if (dt == QKV_F32) return vld_n((const float *)p + i, n);
    if (dt == QKV_BF16) return vld_bf16_n((const uint16_t *)p + i, n);
    return vld_f16_n((const uint16_t *)p + i, n);
}

#define DT_SWITCH(dt, CALL)                                                                                  \
    switch (dt) {                                                                                            \
    case QKV_F32: CALL(QKV_F32); break;                                                                      \
    case QKV_BF16: CALL(QKV_BF16); break;                                                                    \
    default: CALL(QKV_F16); break;                                                                           \
    }

/* dst[d·QT + r] = src[r·ld + d] (d < n) for the tile's rows r < nr, 0 for its others: a tile transposed. */
INL void pack_t_(float *dst, const void *src, int64_t ld, int64_t nr, int64_t n, const int dt) {
    for (int64_t d = 0; d < n; d++)
        for (int r = 0; r < QT; r++) dst[d * QT + r] = r < nr ? ld_t(src, r * ld + d, dt) : 0.0f;
}
static void pack_t(float *dst, const void *src, int64_t ld, int64_t nr, int64_t n, int dt) {
#define PACK_T(DT) pack_t_(dst, src, ld, nr, n, DT)
    DT_SWITCH(dt, PACK_T)
#undef PACK_T
}

/* dst[r·ldd + c] = src[r·lds + c] for r < nr, c < n: rows converted to fp32, in registers. */
INL void rows_f32_(float *dst, int64_t ldd, const void *src, int64_t lds, int64_t nr, int64_t n, const int dt) {
    for (int64_t r = 0; r < nr; r++) {
        int64_t c = 0;
        for (; c + VL <= n; c += VL) vst(dst + r * ldd + c, vld_t(src, r * lds + c, dt));
        if (c < n) vst_n(dst + r * ldd + c, vld_t_n(src, r * lds + c, (int)(n - c), dt), (int)(n - c));
    }
}
static void rows_f32(float *dst, int64_t ldd, const void *src, int64_t lds, int64_t nr, int64_t n, int dt) {
#define ROWS_F32(DT) rows_f32_(dst, ldd, src, lds, nr, n, DT)
    DT_SWITCH(dt, ROWS_F32)
#undef ROWS_F32
}

/* Element offset of row i of head h of batch b, for strides s (batch, head, row). */
static inline int64_t at(const int64_t *s, int64_t b, int64_t h, int64_t i) { return b * s[0] + h * s[1] + i * s[2]; }

/* Rows i0 .. i0+nr (the tile's first nr) as fp32 rows: the input itself when it is fp32, else a conversion
 * into buf (row stride n). */
static const float *rows_as_f32(const void *base, int64_t off, int64_t ld, int64_t nr, int64_t n, int dt,
                                float *buf, int64_t *ldo) {
    if (dt == QKV_F32) {
        *ldo = ld;
        return (const float *)base + off;
    }
    rows_f32(buf, n, (const char *)base + off * 2, ld, nr, n, dt);
    *ldo = n;
    return buf;
}

/* -------------------------------------------------------------------------------------------- row ranges */
/* The key ranges of a tile's rows i0 .. i0+nr: row r sees keys [lo[r], hi[r]) (empty past nr), both bounds
 * non-decreasing in r; [jmin, jmax) is their union; per vector s of rows, [hl, hr) the keys any of its rows
 * sees and [fl, fr) those all of them see (no per-element mask needed there). */
typedef struct {
    int32_t lo[QT], hi[QT];
    int64_t jmin, jmax, hl[NV], hr[NV], fl[NV], fr[NV];
} rows_t;

static void row_ranges(rows_t *R, int64_t i0, int64_t nr, int64_t Nq, int64_t Nk, int64_t left, int64_t right) {
    const int64_t off = Nk - Nq;
    R->jmin = Nk, R->jmax = 0;
    for (int r = 0; r < QT; r++) {
        int64_t a = Nk, e = Nk;
        if (r < nr) {
            a = clamp64(i0 + r + off - left, 0, Nk);
            e = clamp64(i0 + r + off + right + 1, 0, Nk);
        }
        if (a > e) a = e;
        R->lo[r] = (int32_t)a, R->hi[r] = (int32_t)e;
        if (a < e) R->jmin = min64(a, R->jmin), R->jmax = max64(e, R->jmax);
    }
    for (int s = 0; s < NV; s++) {
        R->hl[s] = Nk, R->hr[s] = 0, R->fl[s] = 0, R->fr[s] = Nk;
        for (int r = VL * s; r < VL * s + VL; r++) {
            if (R->lo[r] < R->hi[r]) R->hl[s] = min64(R->lo[r], R->hl[s]), R->hr[s] = max64(R->hi[r], R->hr[s]);
            R->fl[s] = max64(R->lo[r], R->fl[s]);
            R->fr[s] = min64(R->hi[r], R->fr[s]);
        }
    }
}

/* The lanes of row vector s whose rows see key j. */
INL M sees(const rows_t *R, int s, int64_t j) { return mrange(R->lo + VL * s, R->hi + VL * s, j); }

/* The keys that rows r0 .. r0+RB see within [c0, c1): [*a, *e), empty when *a >= *e. */
static inline void block_keys(const rows_t *R, int r0, int64_t c0, int64_t c1, int64_t *a, int64_t *e) {
    int64_t x = c1, y = c0;
    for (int r = r0; r < r0 + RB; r++)
        if (R->lo[r] < R->hi[r]) x = min64(R->lo[r], x), y = max64(R->hi[r], y);
    *a = max64(x, c0), *e = min64(y, c1);
}

/* ---------------------------------------------------------------------------------------- micro-kernels */
/* Cache lines to fetch ahead while a micro-kernel runs: `lines` lines of each of KG rows from p, rows ld bytes
 * apart; hint 3 (to L1) or 2 (to L2). Spread over the micro-kernel's iterations, one or two per iteration. */
typedef struct {
    const char *p;
    int64_t ld;
    int64_t lines;
} ahead_t;

#define AHEAD(a, it, hint)                                                                                   \
    do {                                                                                                     \
        if ((it) < KG * (a).lines) __builtin_prefetch((a).p + (it) % KG * (a).ld + (it) / KG * 64, 0, hint); \
    } while (0)

/* st[r·QT + s·VL ..] (r < nk, s < ns) = xt[·][s·VL ..] · y[r]: nk keys against ns row vectors; meanwhile the
 * lines of pv come to L2 (these keys' values, which P·V reads next). */
INL void qk_kern(const int nk, const int ns, const float *xt, const float *y, int64_t ldy, int64_t n, float *st,
                 ahead_t pv) {
    V a[KG][NV];
#pragma GCC unroll 8
    for (int r = 0; r < KG; r++)
#pragma GCC unroll 4
        for (int s = 0; s < NV; s++) a[r][s] = vzero();
    for (int64_t d = 0; d < n; d++) {
        AHEAD(pv, d, 2);
        V x[NV];
#pragma GCC unroll 4
        for (int s = 0; s < NV; s++) x[s] = s < ns ? vld(xt + d * QT + s * VL) : vzero();
#pragma GCC unroll 8
        for (int r = 0; r < KG; r++) {
            if (r < nk) {
                const V kb = vset1(y[r * ldy + d]);
#pragma GCC unroll 4
                for (int s = 0; s < NV; s++)
                    if (s < ns) a[r][s] = vfma(x[s], kb, a[r][s]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < KG; r++)
#pragma GCC unroll 4
        for (int s = 0; s < NV; s++)
            if (r < nk && s < ns) vst(st + r * QT + s * VL, a[r][s]);
}

#define NS_SWITCH(ns, CALL)                                                                                  \
    switch (ns) {                                                                                            \
    case 1: CALL(1); break;                                                                                  \
    case 2: CALL(NV >= 2 ? 2 : 1); break;                                                                    \
    case 3: CALL(NV >= 3 ? 3 : 1); break;                                                                    \
    default: CALL(NV >= 4 ? 4 : 1); break;                                                                   \
    }

/* qk_kern for any nk <= KG, on row vectors s0 .. s0+ns. */
static void qk_any(int nk, int s0, int ns, const float *xt, const float *y, int64_t ldy, int64_t n, float *st,
                   ahead_t pv) {
    xt += s0 * VL, st += s0 * VL;
    if (nk == KG) {
#define QK_FULL(NS) qk_kern(KG, NS, xt, y, ldy, n, st, pv)
        NS_SWITCH(ns, QK_FULL)
#undef QK_FULL
        return;
    }
    const ahead_t none = {NULL, 0, 0};
    for (int r = 0; r < nk; r++) {
#define QK_ONE(NS) qk_kern(1, NS, xt, y + r * ldy, ldy, n, st + r * QT, none)
        NS_SWITCH(ns, QK_ONE)
#undef QK_ONE
    }
}

/* st[(j − c0)·QT + r] = xt[·][r] · y[j − c0] for the keys j in [c0, c1), by KG-key groups, for the row vectors
 * whose rows see them (xt: a packed tile (n, QT); y: the rows of keys c0.., n values each, stride ldy).
 * Meanwhile, when v is given (typed, es bytes per element, rows ldv elements apart, nv values each, key c0 at
 * v), each group's rows of v come to L2: the values P·V reads next (long rows stream them from memory, where
 * the hardware's prefetch does not keep up with rows ldv apart). */
static void tile_scores(const rows_t *R, int64_t c0, int64_t c1, const float *xt, const float *y, int64_t ldy,
                        int64_t n, float *st, const void *v, int64_t ldv, int64_t nv, int64_t es) {
    const int64_t vlines = v ? (nv * es + 63) / 64 : 0;
    for (int64_t j = c0; j < c1; j += KG) {
        const int nk = (int)min64(KG, c1 - j);
        int s0 = 0;
        while (s0 < NV && !(j < R->hr[s0] && j + nk > R->hl[s0])) s0++;
        int s1 = s0;
        while (s1 < NV && j < R->hr[s1] && j + nk > R->hl[s1]) s1++;
        if (s1 <= s0) continue;
        const ahead_t pv = {v ? (const char *)v + (j - c0) * ldv * es : NULL, ldv * es, nk == KG ? vlines : 0};
        qk_any(nk, s0, s1 - s0, xt, y + (j - c0) * ldy, ldy, n, st + (j - c0) * QT, pv);
    }
}

/* acc[r] (RB rows, nv vectors of columns; the last has wl lanes when tail) = alpha[r]·acc[r] +
 * Σ_j p[j][r]·v[j], j in [ja, jb); v typed dt, element (j, c) at voff + j·ldv + c. */
INL void pv_kern(const int nv, const int tail, const int dt, const float *pt, const void *v, int64_t voff,
                 int64_t ldv, int64_t ja, int64_t jb, float *acc, int64_t ldacc, const float *alpha, int wl) {
    V a[RB][PW];
#pragma GCC unroll 8
    for (int r = 0; r < RB; r++) {
        const V s = vset1(alpha[r]);
#pragma GCC unroll 4
        for (int c = 0; c < PW; c++) a[r][c] = c < nv ? vmul(vld(acc + r * ldacc + c * VL), s) : vzero();
    }
    for (int64_t j = ja; j < jb; j++) {
        V x[PW];
#pragma GCC unroll 4
        for (int c = 0; c < PW; c++)
            if (c < nv)
                x[c] = tail && c == nv - 1 ? vld_t_n(v, voff + j * ldv + c * VL, wl, dt)
                                           : vld_t(v, voff + j * ldv + c * VL, dt);
        const float *pj = pt + j * QT;
#pragma GCC unroll 8
        for (int r = 0; r < RB; r++) {
            const V pb = vset1(pj[r]);
#pragma GCC unroll 4
            for (int c = 0; c < PW; c++)
                if (c < nv) a[r][c] = vfma(pb, x[c], a[r][c]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int c = 0; c < PW; c++)
            if (c < nv) vst(acc + r * ldacc + c * VL, a[r][c]);
}

#define NV_SWITCH(nv, CALL)                                                                                  \
    switch (nv) {                                                                                            \
    case 1: CALL(1); break;                                                                                  \
    case 2: CALL(PW >= 2 ? 2 : 1); break;                                                                    \
    case 3: CALL(PW >= 3 ? 3 : 1); break;                                                                    \
    default: CALL(PW >= 4 ? 4 : 1); break;                                                                   \
    }

#if !PVT
/* pv_kern over w <= CW columns. */
static void pv_any(int64_t w, int dt, const float *pt, const void *v, int64_t voff, int64_t ldv, int64_t ja,
                   int64_t jb, float *acc, int64_t ldacc, const float *alpha) {
    const int nv = (int)((w + VL - 1) / VL), wl = (int)(w - (nv - 1) * VL), tail = wl < VL;
#define PV(NVV, TAIL, DT) pv_kern(NVV, TAIL, DT, pt, v, voff, ldv, ja, jb, acc, ldacc, alpha, wl)
#define PV_NV(DT)                                                                                            \
    switch (nv * 2 + tail) {                                                                                 \
    case 2: PV(1, 0, DT); break;                                                                             \
    case 3: PV(1, 1, DT); break;                                                                             \
    case 4: PV(PW >= 2 ? 2 : 1, 0, DT); break;                                                               \
    case 5: PV(PW >= 2 ? 2 : 1, 1, DT); break;                                                               \
    case 6: PV(PW >= 3 ? 3 : 1, 0, DT); break;                                                               \
    case 7: PV(PW >= 3 ? 3 : 1, 1, DT); break;                                                               \
    case 8: PV(PW >= 4 ? 4 : 1, 0, DT); break;                                                               \
    default: PV(PW >= 4 ? 4 : 1, 1, DT); break;                                                              \
    }
    DT_SWITCH(dt, PV_NV)
#undef PV
#undef PV_NV
}
#endif

/* out[o][c..] += Σ_{r in [ra, rb)} a[o·lao + r·lar] · b[r·ldb + c..], for o < no (<= OG) and nv vectors of
 * columns (the last with wl lanes when tail): scalar broadcasts of a against fp32 rows of b. */
INL void outer_kern(const int no, const int nv, const int tail, const float *a, int64_t lao, int64_t lar,
                    const float *b, int64_t ldb, int64_t ra, int64_t rb, float *out, int64_t ldo, int wl) {
    V acc[OG][PW];
#pragma GCC unroll 8
    for (int o = 0; o < OG; o++)
#pragma GCC unroll 4
        for (int c = 0; c < PW; c++) acc[o][c] = vzero();
    for (int64_t r = ra; r < rb; r++) {
        const float *br = b + r * ldb;
        V x[PW];
#pragma GCC unroll 4
        for (int c = 0; c < PW; c++)
            if (c < nv) x[c] = tail && c == nv - 1 ? vld_n(br + c * VL, wl) : vld(br + c * VL);
#pragma GCC unroll 8
        for (int o = 0; o < OG; o++) {
            if (o < no) {
                const V ab = vset1(a[o * lao + r * lar]);
#pragma GCC unroll 4
                for (int c = 0; c < PW; c++)
                    if (c < nv) acc[o][c] = vfma(ab, x[c], acc[o][c]);
            }
        }
    }
#pragma GCC unroll 8
    for (int o = 0; o < OG; o++) {
#pragma GCC unroll 4
        for (int c = 0; c < PW; c++) {
            if (o < no && c < nv) {
                float *p = out + o * ldo + c * VL;
                if (tail && c == nv - 1) vst_n(p, vadd(vld_n(p, wl), acc[o][c]), wl);
                else vst(p, vadd(vld(p), acc[o][c]));
            }
        }
    }
}

#define NO_SWITCH(no, CALL)                                                                                  \
    switch (no) {                                                                                            \
    case 1: CALL(1); break;                                                                                  \
    case 2: CALL(OG >= 2 ? 2 : 1); break;                                                                    \
    case 3: CALL(OG >= 3 ? 3 : 1); break;                                                                    \
    case 4: CALL(OG >= 4 ? 4 : 1); break;                                                                    \
    case 5: CALL(OG >= 5 ? 5 : 1); break;                                                                    \
    case 6: CALL(OG >= 6 ? 6 : 1); break;                                                                    \
    case 7: CALL(OG >= 7 ? 7 : 1); break;                                                                    \
    default: CALL(OG >= 8 ? 8 : 1); break;                                                                   \
    }

/* outer_kern over all ncol columns of b and out, in blocks of cw (a multiple of VL, at most CW), for no
 * outputs (any count). */
static void outer_any(int no, const float *a, int64_t lao, int64_t lar, const float *b, int64_t ldb, int64_t ra,
                      int64_t rb, float *out, int64_t ldo, int64_t ncol, int64_t cw) {
    if (ra >= rb) return;
    for (int64_t c = 0; c < ncol; c += cw) {
        const int64_t w = min64(cw, ncol - c);
        const int nv = (int)((w + VL - 1) / VL), wl = (int)(w - (nv - 1) * VL);
        for (int o0 = 0; o0 < no; o0 += OG) {
            const int n = (int)min64(OG, no - o0);
            const float *ao = a + o0 * lao, *bc = b + c;
            float *oo = out + o0 * ldo + c;
#define OU(NO, NVV, TAIL) outer_kern(NO, NVV, TAIL, ao, lao, lar, bc, ldb, ra, rb, oo, ldo, wl)
#define OU_NO(NO)                                                                                            \
    switch (nv * 2 + (wl < VL)) {                                                                            \
    case 2: OU(NO, 1, 0); break;                                                                             \
    case 3: OU(NO, 1, 1); break;                                                                             \
    case 4: OU(NO, PW >= 2 ? 2 : 1, 0); break;                                                               \
    case 5: OU(NO, PW >= 2 ? 2 : 1, 1); break;                                                               \
    case 6: OU(NO, PW >= 3 ? 3 : 1, 0); break;                                                               \
    case 7: OU(NO, PW >= 3 ? 3 : 1, 1); break;                                                               \
    case 8: OU(NO, PW >= 4 ? 4 : 1, 0); break;                                                               \
    default: OU(NO, PW >= 4 ? 4 : 1, 1); break;                                                              \
    }
            NO_SWITCH(n, OU_NO)
#undef OU
#undef OU_NO
        }
    }
}

#if PVT
/* P·V transposed (PVT): acc[c·QT + s·VL ..] = alpha[s·VL ..]·acc + Σ_j p[j·QT + s·VL ..] · v[j·ldv + c], for nc
 * columns c (<= KG) and ns row vectors: the QK micro-kernel's shape (p rows loaded, v scalars broadcast), so
 * the accumulators hold columns of the output for a vector of rows, and the rescale by alpha is per lane. */
INL void pvt_kern(const int nc, const int ns, const float *pt, const float *v, int64_t ldv, int64_t n, float *acc,
                  const float *alpha) {
    V a[KG][NV];
#pragma GCC unroll 4
    for (int s = 0; s < NV; s++) {
        const V al = s < ns ? vld(alpha + s * VL) : vzero();
#pragma GCC unroll 8
        for (int r = 0; r < KG; r++) a[r][s] = r < nc && s < ns ? vmul(vld(acc + r * QT + s * VL), al) : vzero();
    }
    for (int64_t j = 0; j < n; j++) {
        V x[NV];
#pragma GCC unroll 4
        for (int s = 0; s < NV; s++) x[s] = s < ns ? vld(pt + j * QT + s * VL) : vzero();
        const float *vj = v + j * ldv;
#pragma GCC unroll 8
        for (int r = 0; r < KG; r++) {
            if (r < nc) {
                const V vb = vset1(vj[r]);
#pragma GCC unroll 4
                for (int s = 0; s < NV; s++)
                    if (s < ns) a[r][s] = vfma(x[s], vb, a[r][s]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < KG; r++)
#pragma GCC unroll 4
        for (int s = 0; s < NV; s++)
            if (r < nc && s < ns) vst(acc + r * QT + s * VL, a[r][s]);
}

#define NC_SWITCH(nc, CALL)                                                                                  \
    switch (nc) {                                                                                            \
    case 1: CALL(1); break;                                                                                  \
    case 2: CALL(KG >= 2 ? 2 : 1); break;                                                                    \
    case 3: CALL(KG >= 3 ? 3 : 1); break;                                                                    \
    case 4: CALL(KG >= 4 ? 4 : 1); break;                                                                    \
    case 5: CALL(KG >= 5 ? 5 : 1); break;                                                                    \
    case 6: CALL(KG >= 6 ? 6 : 1); break;                                                                    \
    case 7: CALL(KG >= 7 ? 7 : 1); break;                                                                    \
    default: CALL(KG >= 8 ? 8 : 1); break;                                                                   \
    }

/* pvt_kern over all Dv columns (v: fp32 rows, stride ldv, key 0 at v) for row vectors s0 .. s0+ns over n keys. */
static void pvt_any(int64_t Dv, int s0, int ns, const float *pt, const float *v, int64_t ldv, int64_t n, float *acc,
                    const float *alpha) {
#if KG > 8
#error "pvt_any covers KG <= 8"
#endif
    pt += s0 * VL, acc += s0 * VL, alpha += s0 * VL;
    for (int64_t c = 0; c < Dv; c += KG) {
        const int nc = (int)min64(KG, Dv - c);
#define PVT_NS(NC, NS) pvt_kern(NC, NS, pt, v + c, ldv, n, acc + c * QT, alpha)
#define PVT_NC(NC)                                                                                           \
    do {                                                                                                     \
        if (ns == 1) PVT_NS(NC, 1);                                                                          \
        else if (ns == 2) PVT_NS(NC, NV >= 2 ? 2 : 1);                                                       \
        else if (ns == 3) PVT_NS(NC, NV >= 3 ? 3 : 1);                                                       \
        else PVT_NS(NC, NV >= 4 ? 4 : 1);                                                                    \
    } while (0)
        NC_SWITCH(nc, PVT_NC)
#undef PVT_NC
#undef PVT_NS
    }
}
#endif

/* ------------------------------------------------------------------------------------------------ forward */
/* One sub-tile's state between chunks: its rows, packed q, accumulator, row maxima and sums. */
typedef struct {
    rows_t R;
    int64_t i0, nr;
    float *qt, *acc, *m, *l;
} sub_t;

/* Row vector s's scores for key j at p, -inf (also stored) in the lanes whose rows do not see j. */
INL V masked_score(const rows_t *R, int s, int64_t j, float *p) {
    V x = vld(p);
    if (j < R->fl[s] || j >= R->fr[s]) {              /* some row of this vector does not see key j */
        x = vsel(sees(R, s, j), vset1(-INFINITY), x);
        vst(p, x);
    }
    return x;
}

/* The keys [c0, c1) (inside the sub-tile's range) of one sub-tile: scores, online softmax, P·V.
 * y: fp32 rows of k from key c0 on, stride ldy; v typed, key c0 at element voff; with PVT, vf: fp32 rows of v
 * from key c0 on, stride ldvf. */
static void fwd_chunk(const job_t *J, sub_t *T, int64_t c0, int64_t c1, const float *y, int64_t ldy, int64_t voff,
                      const float *vf, int64_t ldvf, float *st) {
    const rows_t *R = &T->R;
    const int64_t *hl = R->hl, *hr = R->hr;
    const int64_t Dv = J->Dv, dvp = J->dvp, ldv = J->vs[2];
    const int64_t es = J->dt == QKV_F32 ? 4 : 2;
    tile_scores(R, c0, c1, T->qt, y, ldy, J->D, st, J->pf ? (const char *)J->v + voff * es : NULL, ldv, Dv, es);
    /* Scores are scaled as the plain computation scales them, s·scale, and the maxima m are kept in those
     * units: p = 2^((s·scale − m)·log2 e), the difference formed by one FMA. (Folding scale·log2 e into q
     * instead would round every product and cost the lse ~1e-6 relative at large scores.) */
    const V sc = vset1(J->scale), l2e = vset1(LOG2E), ninf = vset1(-INFINITY);
    float alpha[QT];
    for (int s = 0; s < NV; s++) {
        const int64_t a = max64(hl[s], c0), e = min64(hr[s], c1);
        if (a >= e) {
            vst(alpha + VL * s, vset1(1.0f));
            continue;
        }
        V mx = ninf, mx1 = ninf;                      /* two chains: a max's latency per key otherwise */
        int64_t j = a;
        for (; j + 1 < e; j += 2) {
            mx = vmax(mx, masked_score(R, s, j, st + (j - c0) * QT + VL * s));
            mx1 = vmax(mx1, masked_score(R, s, j + 1, st + (j + 1 - c0) * QT + VL * s));
        }
        if (j < e) mx = vmax(mx, masked_score(R, s, j, st + (j - c0) * QT + VL * s));
        const V m0 = vld(T->m + VL * s);
        mx = vmax(m0, vmul(vmax(mx, mx1), sc));       /* max(s)·scale = max(s·scale): scale > 0 */
        /* rescale factor of what earlier chunks accumulated (0 where nothing was) */
        const V al = vmaskz(mseen(m0), vexp2(vmul(vsub(m0, mx), l2e)));
        /* A masked score (−inf) gives 0. A NaN score gives NaN, which the caller sees in the result, even where
         * the max above lost it (x86's max returns its second operand when one is NaN). */
        V sum = vzero(), sum1 = vzero();
        for (j = a; j < e; j++) {
            float *p = st + (j - c0) * QT + VL * s;
            const V x = vld(p);
            const V y = vmaskz(mseen(x), vexp2(vmul(vfms(x, sc, mx), l2e)));
            vst(p, y);
            if ((j - a) & 1) sum1 = vadd(sum1, y);
            else sum = vadd(sum, y);
        }
        vst(T->l + VL * s, vfma(vld(T->l + VL * s), al, vadd(sum, sum1)));
        vst(T->m + VL * s, mx);
        vst(alpha + VL * s, al);
    }
#if PVT
    /* P·V transposed, the row vectors that see a key here together over the union of their keys: p is 0 where a
     * vector sees none of them */
    (void)voff, (void)ldv, (void)dvp;
    int64_t ua = c1, ue = c0;
    int sa = NV, sb = 0;
    for (int s = 0; s < NV; s++)
        if (max64(hl[s], c0) < min64(hr[s], c1))
            ua = min64(ua, max64(hl[s], c0)), ue = max64(ue, min64(hr[s], c1)), sa = s < sa ? s : sa, sb = s + 1;
    if (ua >= ue) return;
    for (int s = sa; s < sb; s++) {
        int64_t a = max64(hl[s], ua), e = min64(hr[s], ue);
        if (a >= e) a = e = ue;
        for (int64_t j = ua; j < a; j++) vst(st + (j - c0) * QT + VL * s, vzero());
        for (int64_t j = e; j < ue; j++) vst(st + (j - c0) * QT + VL * s, vzero());
    }
    pvt_any(Dv, sa, sb - sa, st + (ua - c0) * QT, vf + (ua - c0) * ldvf, ldvf, ue - ua, T->acc, alpha);
#else
    (void)vf, (void)ldvf;
    /* P·V, by RB-row blocks over the keys those rows see, by CW value columns */
    for (int r0 = 0; r0 < QT; r0 += RB) {
        int64_t a, e;
        block_keys(R, r0, c0, c1, &a, &e);
        if (a >= e) continue;                /* no key here: these rows' m did not move, alpha is 1 */
        for (int64_t c = 0; c < Dv; c += CW)
            pv_any(min64(CW, Dv - c), J->dt, st + r0, J->v, voff + c, ldv, a - c0, e - c0, T->acc + r0 * dvp + c,
                   dvp, alpha + r0);
    }
#endif
}

/* Task: tiles p·tt .. p·tt+tt of (b, h), through the chunks of their key ranges' union together.
 * ws: KC·QT (scores) + KC·D (k chunk in fp32, half inputs; with PVT also KC·Dv, the v chunk) + tt × (QT·D +
 * QT·dvp + 2·QT). */
static void fwd_task(const job_t *J, int64_t task, float *ws) {
    const int64_t tt = J->tt, npass = (J->ntiles + tt - 1) / tt, per = J->Hq * npass;
    const int64_t b = task / per, h = task % per / npass, p = task % npass, hk = h / (J->Hq / J->Hk);
    const int64_t D = J->D, Dv = J->Dv, dvp = J->dvp, nt = min64(tt, J->ntiles - p * tt);
    const int64_t half = J->dt != QKV_F32;
    float *st = ws, *kst = st + (int64_t)KC * QT, *vst_ = kst + half * KC * D, *sub = vst_ + half * PVT * KC * Dv;
    sub_t T[TTMAX];
    int64_t jmin = J->Nk, jmax = 0;
    for (int64_t u = 0; u < nt; u++) {
        sub_t *S = &T[u];
        S->i0 = (p * tt + u) * QT, S->nr = min64(QT, J->Nq - S->i0);
        S->qt = sub + u * (QT * D + QT * dvp + 2 * QT), S->acc = S->qt + QT * D, S->m = S->acc + QT * dvp;
        S->l = S->m + QT;
        row_ranges(&S->R, S->i0, S->nr, J->Nq, J->Nk, J->left, J->right);
        if (S->R.jmin < S->R.jmax) jmin = min64(jmin, S->R.jmin), jmax = max64(jmax, S->R.jmax);
        const int64_t qo = at(J->qs, b, h, S->i0);
        pack_t(S->qt, (const char *)J->q + qo * (J->dt == QKV_F32 ? 4 : 2), J->qs[2], S->nr, D, J->dt);
        memset(S->acc, 0, sizeof(float) * QT * dvp);
        for (int r = 0; r < QT; r++) S->m[r] = -INFINITY, S->l[r] = 0.0f;
    }
    const int64_t ko = at(J->ks, b, hk, 0), vo = at(J->vs, b, hk, 0);
    for (int64_t c0 = jmin; c0 < jmax; c0 += KC) {
        const int64_t c1 = min64(c0 + KC, jmax);
        int64_t ldy;
        const float *y = rows_as_f32(J->k, ko + c0 * J->ks[2], J->ks[2], c1 - c0, D, J->dt, kst, &ldy);
        int64_t ldvf = 0;
        const float *vf = PVT ? rows_as_f32(J->v, vo + c0 * J->vs[2], J->vs[2], c1 - c0, Dv, J->dt, vst_, &ldvf)
                              : NULL;
        for (int64_t u = 0; u < nt; u++) {
            const int64_t a = max64(c0, T[u].R.jmin), e = min64(c1, T[u].R.jmax);
            if (a < e)
                fwd_chunk(J, &T[u], a, e, y + (a - c0) * ldy, ldy, vo + a * J->vs[2], vf ? vf + (a - c0) * ldvf : NULL,
                          ldvf, st);
        }
    }
    for (int64_t u = 0; u < nt; u++) {
        const sub_t *S = &T[u];
        float *o = J->o + at(J->xs, b, h, S->i0);
        for (int r = 0; r < S->nr; r++) {
            const float l = S->l[r], il = l > 0 ? 1.0f / l : 0.0f;
            float *orow = o + r * J->xs[2];
#if PVT
            for (int64_t c = 0; c < Dv; c++) orow[c] = S->acc[c * QT + r] * il;   /* acc holds columns */
#else
            const V ilv = vset1(il);
            const float *arow = S->acc + r * dvp;
            int64_t c = 0;
            for (; c + VL <= Dv; c += VL) vst(orow + c, vmul(vld(arow + c), ilv));
            if (c < Dv) vst_n(orow + c, vmul(vld(arow + c), ilv), (int)(Dv - c));
#endif
            if (J->lse) J->lse[b * J->ls[0] + h * J->ls[1] + S->i0 + r] = l > 0 ? S->m[r] + logf(l) : -INFINITY;
        }
    }
}

static int fwd_entry(job_t *J, int nthreads) {
    J->ntiles = (J->Nq + QT - 1) / QT;
    J->dvp = rup(J->Dv, CW);
    J->tt = clamp64(J->tt, 1, TTMAX);
    J->pf = min64(J->Nk, J->left + J->right + 1) > 2048;   /* long rows: values streamed from memory */
    J->ntasks = J->B * J->Hq * ((J->ntiles + J->tt - 1) / J->tt);
    J->ws = (size_t)((int64_t)KC * QT + (J->dt == QKV_F32 ? 0 : (int64_t)KC * (J->D + PVT * J->Dv))
                     + J->tt * (QT * J->D + QT * J->dvp + 2 * QT));
    J->task = fwd_task;
    return qkv_run_job(J, nthreads);
}

/* ----------------------------------------------------------------------------------------------- backward
 * The gradients of the same calls, FlashAttention-2 style: per tile, recompute the scores, p from the saved
 * lse, dP = dO·vᵀ (the QK micro-kernel on dO and v), dS = p·(dP − delta)·scale, then dQ += dS·k for the tile's
 * rows, and dK += dSᵀ·q, dV += pᵀ·dO for the keys the tile sees. A task owns one kv head (all its query heads
 * and a share of their tiles) and accumulates dK/dV in its own fp32 buffer: no two threads write the same
 * memory, and the caller sums the shares. */

/* Tile t of query head h, accumulating into dk, dv (this task's (Nk, D) and (Nk, Dv) shares of kv head hk).
 * ws: QT·D (q, transposed) + QT·Dv (dout, transposed) + 2·KC·QT (p, dS) + QT·dp (dq) and, for half inputs,
 * KC·D + KC·Dv (k, v chunks) + QT·D + QT·Dv (q, dout rows) in fp32. */
static void tile_bwd(const job_t *J, int64_t b, int64_t h, int64_t t, float *dk, float *dv, float *ws) {
    const int64_t hk = h / (J->Hq / J->Hk), i0 = t * QT, nr = min64(QT, J->Nq - i0);
    const int64_t D = J->D, Dv = J->Dv, dp = J->dp, dt = J->dt, es = dt == QKV_F32 ? 4 : 2;
    const int64_t qo = at(J->qs, b, h, i0), go = at(J->xs, b, h, i0);
    const int64_t ko = at(J->ks, b, hk, 0), vo = at(J->vs, b, hk, 0);
    float *dq = J->dq + ((b * J->Hq + h) * J->Nq + i0) * D;
    float *qt = ws, *gt = qt + QT * D, *st = gt + QT * Dv, *dst = st + (int64_t)KC * QT, *acc = dst + (int64_t)KC * QT;
    float *kst = acc + QT * dp, *vst_ = kst + (int64_t)KC * D, *qr = vst_ + (int64_t)KC * Dv, *gr = qr + QT * D;

    rows_t R;
    row_ranges(&R, i0, nr, J->Nq, J->Nk, J->left, J->right);
    const int32_t *lo = R.lo, *hi = R.hi;
    const int64_t *hl = R.hl, *hr = R.hr, *fl = R.fl, *fr = R.fr;
    float lsev[QT], delv[QT];
#if PVT
    float ones[QT];         /* the dQ pass's alpha: no rescaling */
    for (int r = 0; r < QT; r++) ones[r] = 1.0f;
#endif
    for (int r = 0; r < QT; r++) {
        const int sees_any = r < nr && lo[r] < hi[r];
        lsev[r] = sees_any ? J->lse[b * J->ls[0] + h * J->ls[1] + i0 + r] : 0.0f;
        delv[r] = sees_any ? J->delta[b * J->ls[0] + h * J->ls[1] + i0 + r] : 0.0f;
    }
    const void *qp = (const char *)J->q + qo * es, *gp = (const char *)J->dout + go * es;
    pack_t(qt, qp, J->qs[2], nr, D, (int)dt);
    pack_t(gt, gp, J->xs[2], nr, Dv, (int)dt);
    int64_t ldq, ldg;
    const float *qrows = rows_as_f32(J->q, qo, J->qs[2], nr, D, (int)dt, qr, &ldq);
    const float *grows = rows_as_f32(J->dout, go, J->xs[2], nr, Dv, (int)dt, gr, &ldg);
    memset(acc, 0, sizeof(float) * QT * dp);

    const V sc = vset1(J->scale), l2e = vset1(LOG2E);
    for (int64_t c0 = R.jmin; c0 < R.jmax; c0 += KC) {
        const int64_t c1 = min64(c0 + KC, R.jmax);
        int64_t ldk, ldv;
        const float *kc = rows_as_f32(J->k, ko + c0 * J->ks[2], J->ks[2], c1 - c0, D, (int)dt, kst, &ldk);
        const float *vc = rows_as_f32(J->v, vo + c0 * J->vs[2], J->vs[2], c1 - c0, Dv, (int)dt, vst_, &ldv);
        tile_scores(&R, c0, c1, qt, kc, ldk, D, st, NULL, 0, 0, 0);
        tile_scores(&R, c0, c1, gt, vc, ldv, Dv, dst, NULL, 0, 0, 0);
        /* p = exp(s·scale − lse) and dS = p·(dP − delta)·scale where visible, 0 elsewhere in the chunk */
        for (int s = 0; s < NV; s++) {
            const V L = vld(lsev + VL * s), Dl = vld(delv + VL * s);
            for (int64_t j = c0; j < c1; j++) {
                float *pp = st + (j - c0) * QT + VL * s, *pd = dst + (j - c0) * QT + VL * s;
                if (j < hl[s] || j >= hr[s]) {
                    vst(pp, vzero());
                    vst(pd, vzero());
                    continue;
                }
                const M ok = j < fl[s] || j >= fr[s] ? sees(&R, s, j) : mtrue();
                const V p = vmaskz(ok, vexp2(vmul(vfms(vld(pp), sc, L), l2e)));
                const V ds = vmul(vmul(p, vsub(vld(pd), Dl)), sc);
                vst(pp, p);
                vst(pd, ds);
            }
        }
#if PVT
        /* dQ, transposed in acc (acc[c·QT + r]), += dS·k over the union of the row vectors' keys here (dS is 0
         * in the chunk wherever a row does not see a key) */
        int64_t ua = c1, ue = c0;
        int sa = NV, sb = 0;
        for (int s = 0; s < NV; s++)
            if (max64(hl[s], c0) < min64(hr[s], c1))
                ua = min64(ua, max64(hl[s], c0)), ue = max64(ue, min64(hr[s], c1)), sa = s < sa ? s : sa, sb = s + 1;
        if (ua < ue) pvt_any(D, sa, sb - sa, dst + (ua - c0) * QT, kc + (ua - c0) * ldk, ldk, ue - ua, acc, ones);
#else
        /* dQ (tile rows, by RB-row blocks over the keys they see) += dS·k */
        for (int r0 = 0; r0 < QT; r0 += RB) {
            int64_t a, e;
            block_keys(&R, r0, c0, c1, &a, &e);
            if (a < e) outer_any(RB, dst + r0, 1, QT, kc, ldk, a - c0, e - c0, acc + r0 * dp, dp, D, CW);
        }
#endif
        /* dK += dSᵀ·q and dV += pᵀ·dO, by KG-key groups over the rows that see them */
        for (int64_t j = c0; j < c1; j += KG) {
            const int nk = (int)min64(KG, c1 - j);
            int ra = 0, rb;
            while (ra < QT && hi[ra] <= j) ra++;                          /* first row that sees a key >= j */
            rb = ra;
            while (rb < QT && lo[rb] < j + nk && lo[rb] < hi[rb]) rb++;   /* ... through the last that sees < j+nk */
            if (ra >= rb) continue;
            outer_any(nk, dst + (j - c0) * QT, QT, 1, qrows, ldq, ra, rb, dk + j * D, D, D, OCW);
            outer_any(nk, st + (j - c0) * QT, QT, 1, grows, ldg, ra, rb, dv + j * Dv, Dv, Dv, OCW);
        }
    }
#if PVT
    for (int r = 0; r < nr; r++)
        for (int64_t c = 0; c < D; c++) dq[r * D + c] = acc[c * QT + r];
#else
    for (int r = 0; r < nr; r++) memcpy(dq + r * D, acc + r * dp, sizeof(float) * D);
#endif
}

/* Task: a share (part) of one kv head's query tiles, all its query heads, into that share's dK/dV. */
static void bwd_task(const job_t *J, int64_t task, float *ws) {
    const int64_t G = J->Hq / J->Hk, part = task % J->parts, bh = task / J->parts, b = bh / J->Hk, hk = bh % J->Hk;
    const int64_t t0 = J->ntiles * part / J->parts, t1 = J->ntiles * (part + 1) / J->parts;
    float *dk = J->dk + ((part * J->B + b) * J->Hk + hk) * J->Nk * J->D;
    float *dv = J->dv + ((part * J->B + b) * J->Hk + hk) * J->Nk * J->Dv;
    for (int64_t h = hk * G; h < (hk + 1) * G; h++)
        for (int64_t t = t0; t < t1; t++) tile_bwd(J, b, h, t, dk, dv, ws);
}

static int bwd_entry(job_t *J, int nthreads) {
    J->ntiles = (J->Nq + QT - 1) / QT;
    J->dp = rup(J->D, CW);
    J->parts = J->parts < 1 ? 1 : J->parts;
    J->ntasks = J->B * J->Hk * J->parts;
    J->ws = (size_t)(QT * J->D + QT * J->Dv + 2 * (int64_t)KC * QT + QT * J->dp
                     + (J->dt == QKV_F32 ? 0 : (int64_t)(KC + QT) * (J->D + J->Dv)));
    J->task = bwd_task;
    return qkv_run_job(J, nthreads);
}

/* ----------------------------------------------------------------------------------------------- decoding
 * Rows r = g·Nq + i of kv head hk's G query heads, keys [j0, j1) of one split, in blocks of DEC_NB keys. Scores
 * run along the head dimension: per key, DCH vectors of k are loaded (and converted) once into registers and
 * multiplied with every row's q; the per-(row, key) partial vectors are summed across lanes afterwards, VL
 * keys at a time (vsum_lanes), giving a vector of VL keys per row for the online softmax. P·V broadcasts
 * p[r][key] against value rows, RD rows × CWD vectors of columns at a time. */

/* A[(r·VL + kk)·VL ..] (+)= Σ_c qr[r·dpad + c0·VL + c·VL ..] · k[kk][c·VL ..], c < nv, for R rows and the nb
 * keys kk of the block (k: typed dt, the block's first row at column c0·VL, rows ldk bytes apart); the last
 * vector has wl lanes when tail; first: store, else accumulate. */
INL void dec_qk(const int nv, const int tail, const int dt, float *A, const float *qr, int64_t R, int64_t dpad,
                const char *k, int64_t ldk, int nb, int64_t c0, int wl, int first) {
    for (int kk = 0; kk < nb; kk++) {
        const char *kr = k + kk * ldk;
        V x[DCH];
#pragma GCC unroll 8
        for (int c = 0; c < DCH; c++)
            if (c < nv) x[c] = tail && c == nv - 1 ? vld_t_n(kr, c * VL, wl, dt) : vld_t(kr, c * VL, dt);
        const float *q = qr + c0 * VL;
        float *a = A + kk * VL;
        for (int64_t r = 0; r < R; r++, q += dpad, a += VL * VL) {
            V a0 = first ? vzero() : vld(a), a1 = vzero();
#pragma GCC unroll 8
            for (int c = 0; c < DCH; c++)
                if (c < nv) {
                    if (c % 2) a1 = vfma(vld(q + c * VL), x[c], a1);
                    else a0 = vfma(vld(q + c * VL), x[c], a0);
                }
            vst(a, vadd(a0, a1));
        }
    }
}

/* A for the nb keys of a block (rows of k at k, ldk bytes apart, typed dt) and R rows of q (qr, stride dpad). */
static void dec_scores(int dt, float *A, const float *qr, int64_t R, int64_t dpad, const char *k, int64_t ldk, int nb,
                       int64_t D) {
    const int64_t nvec = (D + VL - 1) / VL, es = dt == QKV_F32 ? 4 : 2;
    const int wl = (int)(D - (nvec - 1) * VL), tail = wl < VL;
    int64_t c0 = 0;
#define DQ(NVV, TAIL, DT) dec_qk(NVV, TAIL, DT, A, qr, R, dpad, k + c0 * VL * es, ldk, nb, c0, wl, c0 == 0)
#define DQ_DT(DT)                                                                                            \
    for (; c0 + DCH <= nvec - tail; c0 += DCH) DQ(DCH, 0, DT);                                               \
    for (; c0 + 4 <= nvec - tail; c0 += 4) DQ(DCH >= 4 ? 4 : 1, 0, DT);                                      \
    for (; c0 + 1 <= nvec - tail; c0 += 1) DQ(1, 0, DT);                                                     \
    if (tail) DQ(1, 1, DT);
    DT_SWITCH(dt, DQ_DT)
#undef DQ
#undef DQ_DT
    for (int64_t r = 0; r < R; r++) memset(A + (r * VL + nb) * VL, 0, sizeof(float) * VL * (VL - nb));
}

/* acc[r0 + r][(c0 + c)·VL ..] = al[r]·acc + Σ_kk pb[(r0 + r)·VL + kk] · v[kk][c·VL ..], r < nr, c < nv (v: typed
 * dt, the block's first row at column c0·VL, rows ldv bytes apart). */
INL void dec_pv_kern(const int nr, const int nv, const int tail, const int dt, float *acc, int64_t dvpad,
                     const float *pb, const float *al, int64_t r0, const char *v, int64_t ldv, int nb, int64_t c0,
                     int wl) {
    V a[RD][CWD];
#pragma GCC unroll 4
    for (int r = 0; r < RD; r++) {
        const V s = vset1(r < nr ? al[r0 + r] : 0.0f);
#pragma GCC unroll 4
        for (int c = 0; c < CWD; c++) a[r][c] = r < nr && c < nv ? vmul(vld(acc + (r0 + r) * dvpad + (c0 + c) * VL), s) : vzero();
    }
    const float *p = pb + r0 * DEC_NB;
    for (int kk = 0; kk < nb; kk++) {
        const char *vr = v + kk * ldv;
        V x[CWD];
#pragma GCC unroll 4
        for (int c = 0; c < CWD; c++)
            if (c < nv) x[c] = tail && c == nv - 1 ? vld_t_n(vr, c * VL, wl, dt) : vld_t(vr, c * VL, dt);
#pragma GCC unroll 4
        for (int r = 0; r < RD; r++) {
            if (r < nr) {
                const V pr = vset1(p[r * DEC_NB + kk]);
#pragma GCC unroll 4
                for (int c = 0; c < CWD; c++)
                    if (c < nv) a[r][c] = vfma(pr, x[c], a[r][c]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RD; r++)
#pragma GCC unroll 4
        for (int c = 0; c < CWD; c++)
            if (r < nr && c < nv) vst(acc + (r0 + r) * dvpad + (c0 + c) * VL, a[r][c]);
}

static void dec_pv(int dt, float *acc, int64_t dvpad, const float *pb, const float *al, int64_t R, const char *v,
                   int64_t ldv, int nb, int64_t Dv) {
    const int64_t nvec = (Dv + VL - 1) / VL, es = dt == QKV_F32 ? 4 : 2;
    const int wl = (int)(Dv - (nvec - 1) * VL), tail = wl < VL;
#define DP(NR, NVV, TAIL, DT) dec_pv_kern(NR, NVV, TAIL, DT, acc, dvpad, pb, al, r0, v + c0 * VL * es, ldv, nb, c0, wl)
#define DP_ROWS(NR, DT)                                                                                      \
    for (int64_t c0 = 0; c0 < nvec;) {                                                                       \
        if (c0 + CWD <= nvec - tail) DP(NR, CWD, 0, DT), c0 += CWD;                                          \
        else if (c0 + 1 <= nvec - tail) DP(NR, 1, 0, DT), c0 += 1;                                           \
        else DP(NR, 1, 1, DT), c0 += 1;                                                                      \
    }
#define DP_DT(DT)                                                                                            \
    for (int64_t r0 = 0; r0 < R;) {                                                                          \
        if (R - r0 >= RD) { DP_ROWS(RD, DT) r0 += RD; }                                                      \
        else { DP_ROWS(1, DT) r0 += 1; }                                                                     \
    }
    DT_SWITCH(dt, DP_DT)
#undef DP
#undef DP_ROWS
#undef DP_DT
}

/* Task: split s of (b, hk): partial out and lse of its rows over the split's keys, by blocks of DEC_NB keys
 * (scores by VL keys, then one online-softmax step and one P·V pass per block: the accumulators are loaded and
 * rescaled once per DEC_NB keys).
 * ws: R·dpad (q rows) + R·dvpad (acc) + DEC_RG·VL·VL (partial dot products) + 2·R·DEC_NB (scores, p) + R·VL
 * (sums) + 2R. */
static void dec_task(const job_t *J, int64_t task, float *ws) {
    const int64_t G = J->Hq / J->Hk, Nq = J->Nq, R = G * Nq, D = J->D, Dv = J->Dv;
    const int64_t dpad = rup(D, VL), dvpad = rup(Dv, VL), ns = J->nsplit;
    const int64_t s = task % ns, bh = task / ns, b = bh / J->Hk, hk = bh % J->Hk;
    const int64_t j0 = J->jlo + s * J->split, j1 = min64(j0 + J->split, J->jhi), off = J->Nk - Nq;
    float *qr = ws, *acc = qr + R * dpad, *A = acc + R * dvpad, *sb = A + DEC_RG * VL * VL, *pb = sb + R * DEC_NB;
    float *lv = pb + R * DEC_NB, *mv = lv + R * VL, *al = mv + R;
    int64_t lo[DEC_ROWS_MAX], hi[DEC_ROWS_MAX];
    for (int64_t i = 0; i < Nq; i++) {
        lo[i] = clamp64(i + off - J->left, 0, J->Nk), hi[i] = clamp64(i + off + J->right + 1, 0, J->Nk);
        if (lo[i] > hi[i]) lo[i] = hi[i];
    }
    for (int64_t g = 0; g < G; g++)
        for (int64_t i = 0; i < Nq; i++) {
            const int64_t r = g * Nq + i, qo = at(J->qs, b, hk * G + g, i);
            for (int64_t d = 0; d < dpad; d++) qr[r * dpad + d] = d < D ? ld_t(J->q, qo + d, J->dt) : 0.0f;
        }
    memset(acc, 0, sizeof(float) * R * dvpad);
    memset(lv, 0, sizeof(float) * R * VL);
    for (int64_t r = 0; r < R; r++) mv[r] = -INFINITY;
    const int64_t ko = at(J->ks, b, hk, 0), vo = at(J->vs, b, hk, 0);
    const V sc = vset1(J->scale), l2e = vset1(LOG2E), ninf = vset1(-INFINITY);
    const int64_t es = J->dt == QKV_F32 ? 4 : 2, kl = (D * es + 63) / 64, vl = (Dv * es + 63) / 64;
    for (int64_t jb = j0; jb < j1; jb += DEC_NB) {
        const int64_t nbb = min64(DEC_NB, j1 - jb);
        for (int64_t u = 0; u < nbb; u += VL) {          /* scores, VL keys at a time */
            const int64_t ju = jb + u;
            const int nb = (int)min64(VL, nbb - u);
            /* the keys and values of the vector after next, to L1: two streams with rows ldk, ldv apart, which
             * the hardware's prefetch alone leaves ~30% below a plain read's speed */
            for (int64_t j = ju + 2 * VL; J->pf && j < min64(ju + 3 * VL, j1); j++) {
                const char *kr = (const char *)J->k + (ko + j * J->ks[2]) * es;
                const char *vr = (const char *)J->v + (vo + j * J->vs[2]) * es;
                for (int64_t l = 0; l < kl; l++) __builtin_prefetch(kr + 64 * l, 0, 3);
                for (int64_t l = 0; l < vl; l++) __builtin_prefetch(vr + 64 * l, 0, 3);
            }
            for (int64_t r0 = 0; r0 < R; r0 += DEC_RG) {     /* rows by groups: their partial sums stay in L1 */
                const int64_t rg = min64(DEC_RG, R - r0);
                dec_scores(J->dt, A, qr + r0 * dpad, rg, dpad, (const char *)J->k + (ko + ju * J->ks[2]) * es,
                           J->ks[2] * es, nb, D);
                for (int64_t r = r0; r < r0 + rg; r++) {
                    const int64_t i = r % Nq, a = max64(lo[i], ju), e = min64(hi[i], ju + nb);
                    vst(sb + r * DEC_NB + u, a < e ? vsel(miota(ju, a, e), ninf, vsum_lanes(A + (r - r0) * VL * VL))
                                                   : ninf);
                }
            }
        }
        for (int64_t r = 0; r < R; r++) {                /* the online softmax, once per block */
            const int64_t i = r % Nq;
            float *pr = pb + r * DEC_NB;
            const float *xr = sb + r * DEC_NB;
            if (max64(lo[i], jb) >= min64(hi[i], jb + nbb)) {   /* no key of this block: nothing moves */
                al[r] = 1.0f;
                memset(pr, 0, sizeof(float) * DEC_NB);
                continue;
            }
            V mx = ninf;
            for (int64_t u = 0; u < nbb; u += VL) mx = vmax(mx, vld(xr + u));
            const float m0 = mv[r], m1 = fmaxf(m0, vhmax(mx) * J->scale);   /* scale > 0 */
            const float alpha = m0 == -INFINITY ? 0.0f : exp2f((m0 - m1) * LOG2E);
            const V mv1 = vset1(m1);
            V sum = vzero();
            for (int64_t u = 0; u < nbb; u += VL) {
                const V x = vld(xr + u);
                /* a masked score (−inf) gives 0; a NaN score gives NaN (the caller sees it in the result) */
                const V p = vmaskz(mseen(x), vexp2(vmul(vfms(x, sc, mv1), l2e)));
                vst(pr + u, p);
                sum = vadd(sum, p);
            }
            vst(lv + r * VL, vfma(vld(lv + r * VL), vset1(alpha), sum));
            mv[r] = m1, al[r] = alpha;
        }
        dec_pv(J->dt, acc, dvpad, pb, al, R, (const char *)J->v + (vo + jb * J->vs[2]) * es, J->vs[2] * es,
               (int)nbb, Dv);
    }
    for (int64_t r = 0; r < R; r++) {
        const int64_t g = r / Nq, i = r % Nq, row = (b * J->Hq + hk * G + g) * Nq + i;
        const float l = vhsum(vld(lv + r * VL)), il = l > 0 ? 1.0f / l : 0.0f;
        float *po = J->po + (row * ns + s) * Dv;
        for (int64_t c = 0; c < Dv; c++) po[c] = acc[r * dvpad + c] * il;
        J->plse[row * ns + s] = l > 0 ? mv[r] + logf(l) : -INFINITY;
    }
}

/* K and V bytes from which decoding fetches ahead: a quarter of the L3 as the C library reports it, at least
 * 8 MiB. */
static double dec_pf_bytes(void) {
    double l3 = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = (double)sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return l3 / 4 > (double)(8 << 20) ? l3 / 4 : (double)(8 << 20);
}

/* Partial results per split; the caller (attn_cpu.c) sets the splits and merges them. */
static int dec_entry(job_t *J, int nthreads) {
    const int64_t R = (J->Hq / J->Hk) * J->Nq;
    if (J->Nq > DEC_ROWS_MAX) return -2;
    J->ntasks = J->B * J->Hk * J->nsplit;
    /* fetch ahead when K and V come from memory rather than from cache: beyond a quarter of the L3 (at least 8
     * MiB). Measured on a 260 MB L3: from memory (128 MiB) 23 vs 30 ms with and without; at 16-32 MiB, which
     * stays in cache between calls, 7-11% slower with it (the fetches stall on lines the cache holds). */
    J->pf = (double)J->B * J->Hk * (J->jhi - J->jlo) * (J->D + J->Dv) * (J->dt == QKV_F32 ? 4 : 2) >= dec_pf_bytes();
    J->ws = (size_t)(R * rup(J->D, VL) + R * rup(J->Dv, VL) + DEC_RG * VL * VL + 2 * R * DEC_NB + R * VL + 2 * R);
    J->task = dec_task;
    return qkv_run_job(J, nthreads);
}

const qkv_isa_t QKV_ISA_SYM = {QKV_ISA_NAME, QKV_ISA_RUNS, fwd_entry, bwd_entry, dec_entry};
