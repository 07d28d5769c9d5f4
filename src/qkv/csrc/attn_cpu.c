/* qkv's CPU attention kernel: the exact forward of softmax(scale·q·kᵀ)·v over key ranges (causal and sliding
 * windows, bottom-right aligned), fp32, AVX-512. Plain C with no Python or torch headers: it is loaded with
 * ctypes (src/qkv/engines/cpu_kernel.py), which releases the GIL, and it runs on torch's OpenMP threads (see run()).
 *
 * Layout of the work: a tile is 32 query rows of one (batch, head). Scores are computed *transposed*, one
 * 16-lane vector per key and half tile (st[j][r]), so only the query tile is packed (transposed, qt[d][r]);
 * keys and values are read in place, row by row, with scalar broadcasts. The row softmax is then vertical
 * (lane-wise max and sum, no horizontal reductions), and P·V reads p[j][r] as broadcasts against value rows.
 * Keys are visited in chunks of KC with FlashAttention's online softmax, so any key range works (a window's
 * band is one chunk). Work outside a row's range is skipped at the granularity of 8 keys × 16 rows (QK) and
 * 8 rows (PV). Each tile is one thread's, so results do not depend on the thread count.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QT 32        /* query rows per tile (two vectors) */
#define KG 8         /* keys per QK micro-kernel */
#define RB 8         /* query rows per PV micro-kernel */
#define KC 512       /* keys per chunk of the online softmax */
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

#define AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma")))
#define INLINE static inline __attribute__((always_inline))

/* One call, forward or backward: its tensors, sizes, strides and key ranges, and the tasks its threads take. */
typedef struct job job_t;
struct job {
    const float *q, *k, *v;
    float *o, *lse;                 /* forward: out, and lse (may be NULL); the backward reads lse */
    const float *dout, *delta;      /* backward: dout, and delta = rowsum(dout·out) − dlse (b, h, n) */
    float *dq, *dk, *dv;            /* backward: dq (B, Hq, Nq, D); dk, dv (parts, B, Hk, Nk, D|Dv) shares */
    int64_t B, Hq, Hk, Nq, Nk, D, Dv;
    int64_t qs[3], ks[3], vs[3];    /* strides (elements) of batch, head, row; last dims are 1 */
    int64_t xs[3], ls[2];           /* ... of out (forward) or dout (backward); of lse and delta (batch, head) */
    int64_t left, right;            /* key j visible to row i iff i+off-left <= j <= i+off+right */
    float scale;
    int64_t ntiles, parts, ntasks, next;
    int64_t dvp, dp;                /* Dv, D rounded up to 32: row strides of the tile accumulators */
    size_t ws;                      /* workspace floats per thread */
    void (*task)(const job_t *, int64_t, float *);
};

int qkv_native_version(void) { return 2; }

int qkv_native_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
}

/* 2^x for x <= 0 (1 ulp-ish): 2^n · e^(f·ln2), |f| <= 1/2, Taylor to degree 7 (error < 6e-9 relative).
 * x is clamped at -126 so results stay normal numbers (2^-126 is below any weight that matters). */
AVX512 INLINE __m512 exp2v(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 g = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(LN2));
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* st[r][0..31] (r < nk) = qt · k[r]: nk keys against the halves h0/h1 of the query tile. */
AVX512 INLINE void qk_kern(const int nk, const int h0, const int h1, const float *qt, const float *k,
                           int64_t ldk, int64_t D, float *st) {
    __m512 a[KG][2];
#pragma GCC unroll 8
    for (int r = 0; r < KG; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        __m512 q0 = h0 ? _mm512_load_ps(qt + d * QT) : _mm512_setzero_ps();
        __m512 q1 = h1 ? _mm512_load_ps(qt + d * QT + 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int r = 0; r < KG; r++) {
            if (r < nk) {
                __m512 kb = _mm512_set1_ps(k[r * ldk + d]);
                if (h0) a[r][0] = _mm512_fmadd_ps(q0, kb, a[r][0]);
                if (h1) a[r][1] = _mm512_fmadd_ps(q1, kb, a[r][1]);
            }
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < KG; r++) {
        if (r < nk) {
            if (h0) _mm512_store_ps(st + r * QT, a[r][0]);
            if (h1) _mm512_store_ps(st + r * QT + 16, a[r][1]);
        }
    }
}

AVX512 static void qk_any(int nk, int h0, int h1, const float *qt, const float *k, int64_t ldk, int64_t D,
                          float *st) {
    if (nk == KG) {
        if (h0 && h1) qk_kern(KG, 1, 1, qt, k, ldk, D, st);
        else if (h0) qk_kern(KG, 1, 0, qt, k, ldk, D, st);
        else qk_kern(KG, 0, 1, qt, k, ldk, D, st);
        return;
    }
    for (int r = 0; r < nk; r++) qk_kern(1, h0, h1, qt, k + r * ldk, ldk, D, st + r * QT);
}

/* acc[r] (rows r0..r0+7 of the tile, columns c0..c0+31 of v) = alpha[r]·acc[r] + Σ_j p[j][r0+r]·v[j],
 * j in [ja, jb). nv: value vectors (1 or 2); masks for tails (all ones when whole). */
AVX512 INLINE void pv_kern(const int nv, const int masked, __mmask16 m0, __mmask16 m1, const float *pt,
                           const float *v, int64_t ldv, int64_t ja, int64_t jb, float *acc, int64_t ldacc,
                           const float *alpha) {
    __m512 a[RB][2];
#pragma GCC unroll 8
    for (int r = 0; r < RB; r++) {
        __m512 s = _mm512_set1_ps(alpha[r]);
        a[r][0] = _mm512_mul_ps(_mm512_load_ps(acc + r * ldacc), s);
        a[r][1] = nv > 1 ? _mm512_mul_ps(_mm512_load_ps(acc + r * ldacc + 16), s) : _mm512_setzero_ps();
    }
    for (int64_t j = ja; j < jb; j++) {
        const float *vr = v + j * ldv;
        __m512 v0 = masked ? _mm512_maskz_loadu_ps(m0, vr) : _mm512_loadu_ps(vr);
        __m512 v1 = nv > 1 ? (masked ? _mm512_maskz_loadu_ps(m1, vr + 16) : _mm512_loadu_ps(vr + 16))
                           : _mm512_setzero_ps();
        const float *pj = pt + j * QT;
#pragma GCC unroll 8
        for (int r = 0; r < RB; r++) {
            __m512 pb = _mm512_set1_ps(pj[r]);
            a[r][0] = _mm512_fmadd_ps(pb, v0, a[r][0]);
            if (nv > 1) a[r][1] = _mm512_fmadd_ps(pb, v1, a[r][1]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; r++) {
        _mm512_store_ps(acc + r * ldacc, a[r][0]);
        if (nv > 1) _mm512_store_ps(acc + r * ldacc + 16, a[r][1]);
    }
}

static inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

/* The key ranges of a tile's rows i0 .. i0+nr: row r sees keys [lo[r], hi[r]) (empty past nr), both bounds
 * non-decreasing in r; [jmin, jmax) is their union; per half tile s, [hl, hr) the keys any of its rows sees
 * and [fl, fr) those all of them see (no per-element mask needed there). */
typedef struct {
    int32_t lo[QT], hi[QT];
    __m512i lov[2], hiv[2];         /* lo and hi per half, as vectors */
    int64_t jmin, jmax, hl[2], hr[2], fl[2], fr[2];
} rows_t;

AVX512 static void row_ranges(rows_t *R, int64_t i0, int64_t nr, int64_t Nq, int64_t Nk, int64_t left, int64_t right) {
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
        if (a < e) { R->jmin = a < R->jmin ? a : R->jmin; R->jmax = e > R->jmax ? e : R->jmax; }
    }
    for (int s = 0; s < 2; s++) {
        R->hl[s] = Nk, R->hr[s] = 0, R->fl[s] = 0, R->fr[s] = Nk;
        for (int r = 16 * s; r < 16 * s + 16; r++) {
            if (R->lo[r] < R->hi[r]) {
                R->hl[s] = R->lo[r] < R->hl[s] ? R->lo[r] : R->hl[s];
                R->hr[s] = R->hi[r] > R->hr[s] ? R->hi[r] : R->hr[s];
            }
            R->fl[s] = R->lo[r] > R->fl[s] ? R->lo[r] : R->fl[s];
            R->fr[s] = R->hi[r] < R->fr[s] ? R->hi[r] : R->fr[s];
        }
        R->lov[s] = _mm512_loadu_si512(R->lo + 16 * s), R->hiv[s] = _mm512_loadu_si512(R->hi + 16 * s);
    }
}

/* The lanes of half s whose rows see key j. */
AVX512 INLINE __mmask16 sees(const rows_t *R, int s, int64_t j) {
    const __m512i jv = _mm512_set1_epi32((int32_t)j);
    return _mm512_cmpge_epi32_mask(jv, R->lov[s]) & _mm512_cmplt_epi32_mask(jv, R->hiv[s]);
}

/* The keys that rows r0 .. r0+RB see within [c0, c1): [*a, *e), empty when *a >= *e. */
static inline void block_keys(const rows_t *R, int r0, int64_t c0, int64_t c1, int64_t *a, int64_t *e) {
    int64_t x = c1, y = c0;
    for (int r = r0; r < r0 + RB; r++)
        if (R->lo[r] < R->hi[r]) { x = R->lo[r] < x ? R->lo[r] : x; y = R->hi[r] > y ? R->hi[r] : y; }
    *a = x > c0 ? x : c0, *e = y < c1 ? y : c1;
}

/* dst[d·QT + r] = src[r·ld + d] (d < n) for the tile's rows r < nr, 0 for its others: a tile transposed. */
static void pack_t(float *dst, const float *src, int64_t ld, int64_t nr, int64_t n) {
    for (int64_t d = 0; d < n; d++)
        for (int r = 0; r < QT; r++) dst[d * QT + r] = r < nr ? src[r * ld + d] : 0.0f;
}

/* st[(j − c0)·QT + r] = xt[·][r] · y[j] for the keys j in [c0, c1), by 8-key groups, for the halves of the tile
 * whose rows see them (xt: a packed tile (n, QT); y: rows of n values, stride ldy). */
AVX512 static void tile_scores(const rows_t *R, int64_t c0, int64_t c1, const float *xt, const float *y,
                               int64_t ldy, int64_t n, float *st) {
    for (int64_t j = c0; j < c1; j += KG) {
        const int nk = c1 - j < KG ? (int)(c1 - j) : KG;
        const int h0 = j < R->hr[0] && j + nk > R->hl[0], h1 = j < R->hr[1] && j + nk > R->hl[1];
        if (h0 || h1) qk_any(nk, h0, h1, xt, y + j * ldy, ldy, n, st + (j - c0) * QT);
    }
}

/* One tile: rows i0 .. i0+nr of (b, h). ws: QT·D (q, transposed) + KC·QT (scores) + QT·dvp (accumulator). */
AVX512 static void tile(const job_t *J, int64_t task, float *ws) {
    const int64_t per = J->Hq * J->ntiles, b = task / per, h = task % per / J->ntiles, t = task % J->ntiles;
    const int64_t hk = h / (J->Hq / J->Hk), i0 = t * QT, nr = J->Nq - i0 < QT ? J->Nq - i0 : QT;
    const int64_t D = J->D, Dv = J->Dv, Nk = J->Nk, dvp = J->dvp;
    const float *q = J->q + b * J->qs[0] + h * J->qs[1] + i0 * J->qs[2];
    const float *k = J->k + b * J->ks[0] + hk * J->ks[1];
    const float *v = J->v + b * J->vs[0] + hk * J->vs[1];
    float *o = J->o + b * J->xs[0] + h * J->xs[1] + i0 * J->xs[2];
    float *qt = ws, *st = ws + QT * D, *acc = st + (int64_t)KC * QT;

    rows_t R;
    row_ranges(&R, i0, nr, J->Nq, Nk, J->left, J->right);
    const int64_t jmin = R.jmin, jmax = R.jmax, *hl = R.hl, *hr = R.hr, *fl = R.fl, *fr = R.fr;
    pack_t(qt, q, J->qs[2], nr, D);
    /* Scores are scaled as the plain computation scales them, s·scale, and the maxima m are kept in those
     * units: p = 2^((s·scale − m)·log2 e), the difference formed by one FMA. (Folding scale·log2 e into q
     * instead would round every product and cost the lse ~1e-6 relative at large scores.) */
    const __m512 sc = _mm512_set1_ps(J->scale), l2e = _mm512_set1_ps(LOG2E);
    memset(acc, 0, sizeof(float) * QT * dvp);

    __m512 m[2], l[2];
    m[0] = m[1] = _mm512_set1_ps(-INFINITY);
    l[0] = l[1] = _mm512_setzero_ps();
    for (int64_t c0 = jmin; c0 < jmax; c0 += KC) {
        const int64_t c1 = c0 + KC < jmax ? c0 + KC : jmax;
        tile_scores(&R, c0, c1, qt, k, J->ks[2], D, st);
        float alpha[QT] __attribute__((aligned(64)));
        for (int s = 0; s < 2; s++) {
            const int64_t a = hl[s] > c0 ? hl[s] : c0, e = hr[s] < c1 ? hr[s] : c1;
            if (a >= e) {
                _mm512_store_ps(alpha + 16 * s, _mm512_set1_ps(1.0f));
                continue;
            }
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int64_t j = a; j < e; j++) {
                float *p = st + (j - c0) * QT + 16 * s;   /* st[(j - c0)·QT + r]: key j, row r */
                __m512 x = _mm512_load_ps(p);
                if (j < fl[s] || j >= fr[s]) {   /* some row of this half does not see key j */
                    x = _mm512_mask_blend_ps(sees(&R, s, j), _mm512_set1_ps(-INFINITY), x);
                    _mm512_store_ps(p, x);
                }
                mx = _mm512_max_ps(mx, x);
            }
            mx = _mm512_max_ps(m[s], _mm512_mul_ps(mx, sc));   /* max(s)·scale = max(s·scale): scale > 0 */
            /* rescale factor of what earlier chunks accumulated (0 where nothing was) */
            __mmask16 had = _mm512_cmp_ps_mask(m[s], _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
            __m512 al = _mm512_maskz_mov_ps(had, exp2v(_mm512_mul_ps(_mm512_sub_ps(m[s], mx), l2e)));
            __mmask16 any = _mm512_cmp_ps_mask(mx, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = a; j < e; j++) {
                float *p = st + (j - c0) * QT + 16 * s;   /* st[(j - c0)·QT + r]: key j, row r */
                __m512 x = _mm512_load_ps(p);
                __mmask16 ok = any & _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
                __m512 y = _mm512_maskz_mov_ps(ok, exp2v(_mm512_mul_ps(_mm512_fmsub_ps(x, sc, mx), l2e)));
                _mm512_store_ps(p, y);
                sum = _mm512_add_ps(sum, y);
            }
            l[s] = _mm512_fmadd_ps(l[s], al, sum);
            m[s] = mx;
            _mm512_store_ps(alpha + 16 * s, al);
        }
        /* P·V, by 8-row blocks over the keys those rows see, by 32 value columns */
        for (int r0 = 0; r0 < QT; r0 += RB) {
            int64_t a, e;
            block_keys(&R, r0, c0, c1, &a, &e);
            if (a >= e) continue;                /* no key here: these rows' m did not move, alpha is 1 */
            const float *pt = st + r0, *vj = v + c0 * J->vs[2];   /* relative to the chunk's first key */
            a -= c0, e -= c0;
            for (int64_t c = 0; c < Dv; c += 32) {
                const int64_t w = Dv - c < 32 ? Dv - c : 32;
                float *ac = acc + r0 * dvp + c;
                const float *vc = vj + c;
                const int64_t ldv = J->vs[2];
                const float *al = alpha + r0;
                const __mmask16 full = 0xFFFF, tail = (__mmask16)((1u << (w % 16)) - 1);
                if (w == 32) pv_kern(2, 0, full, full, pt, vc, ldv, a, e, ac, dvp, al);
                else if (w == 16) pv_kern(1, 0, full, 0, pt, vc, ldv, a, e, ac, dvp, al);
                else if (w > 16) pv_kern(2, 1, full, tail, pt, vc, ldv, a, e, ac, dvp, al);
                else pv_kern(1, 1, tail, 0, pt, vc, ldv, a, e, ac, dvp, al);
            }
        }
    }

    float mv[QT], lv[QT];
    _mm512_storeu_ps(mv, m[0]), _mm512_storeu_ps(mv + 16, m[1]);
    _mm512_storeu_ps(lv, l[0]), _mm512_storeu_ps(lv + 16, l[1]);
    for (int r = 0; r < nr; r++) {
        const float il = lv[r] > 0 ? 1.0f / lv[r] : 0.0f;
        float *orow = o + r * J->xs[2];
        const float *arow = acc + r * dvp;
        for (int64_t c = 0; c < Dv; c += 16) {
            __mmask16 mk = Dv - c >= 16 ? 0xFFFF : (__mmask16)((1u << (Dv - c)) - 1);
            _mm512_mask_storeu_ps(orow + c, mk, _mm512_mul_ps(_mm512_load_ps(arow + c), _mm512_set1_ps(il)));
        }
        if (J->lse)
            J->lse[b * J->ls[0] + h * J->ls[1] + i0 + r] = lv[r] > 0 ? mv[r] + logf(lv[r]) : -INFINITY;
    }
}

/* A thread: takes the job's tasks from its counter until none is left. */
static void *worker(void *arg) {
    job_t *J = (job_t *)arg;
    float *ws = aligned_alloc(64, (J->ws * sizeof(float) + 63) / 64 * 64);
    if (!ws) return (void *)1;
    for (;;) {
        int64_t t = __atomic_fetch_add(&J->next, 1, __ATOMIC_RELAXED);
        if (t >= J->ntasks) break;
        J->task(J, t, ws);
    }
    free(ws);
    return NULL;
}

/* Runs the job on nthreads threads of an OpenMP team. Built with -fopenmp, this library needs libgomp.so.1,
 * which the loader finds already loaded by torch: the team is torch's own intra-op pool, so no thread of
 * another pool spins on a core we need right after a torch op (pthreads of our own lost ~10% to that).
 * Returns 0, or -1 when a workspace could not be allocated. */
static int run(job_t *J, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > J->ntasks) nthreads = (int)(J->ntasks ? J->ntasks : 1);
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(|| : bad)
    bad = worker(J) != NULL;
    return bad ? -1 : 0;
}

/* The fields both passes share. dims: B, Hq, Hk, Nq, Nk, D, Dv. strides: q, k, v, then out or dout (batch,
 * head, row), then lse (batch, head); elements. */
static void job_init(job_t *J, const int64_t *dims, const int64_t *strides, int64_t left, int64_t right,
                     float scale) {
    memset(J, 0, sizeof *J);
    J->B = dims[0], J->Hq = dims[1], J->Hk = dims[2], J->Nq = dims[3], J->Nk = dims[4], J->D = dims[5];
    J->Dv = dims[6];
    for (int i = 0; i < 3; i++) {
        J->qs[i] = strides[i], J->ks[i] = strides[3 + i], J->vs[i] = strides[6 + i], J->xs[i] = strides[9 + i];
    }
    J->ls[0] = strides[12], J->ls[1] = strides[13];
    J->left = left, J->right = right, J->scale = scale;
    J->ntiles = (J->Nq + QT - 1) / QT;
    J->dvp = (J->Dv + 31) / 32 * 32, J->dp = (J->D + 31) / 32 * 32;
}

/* ------------------------------------------------------------------------------------------- backward
 * The gradients of the same calls, FlashAttention-2 style: per 32-row tile, recompute the scores, p from the
 * saved lse, dP = dO·vᵀ (the QK micro-kernel on dO and v), dS = p·(dP − delta)·scale, then dQ += dS·k for the
 * tile's rows, and dK += dSᵀ·q, dV += pᵀ·dO for the keys the tile sees. A task owns one kv head (all its
 * query heads and a share of their tiles) and accumulates dK/dV in its own fp32 buffer: no two threads write
 * the same memory, and the caller sums the shares. */

/* out[o][c0..c0+32) += Σ_{r in [ra, rb)} a[o·lao + r·lar] · b[r·ldb + c0..], for o < no (≤ 8): scalar
 * broadcasts of a against rows of b, 16 accumulators; masks for a column tail. out rows have stride ldo. */
AVX512 INLINE void outer_kern(const int no, const int nv, const int masked, __mmask16 m0, __mmask16 m1,
                              const float *a, int64_t lao, int64_t lar, const float *b, int64_t ldb, int64_t ra,
                              int64_t rb, float *out, int64_t ldo) {
    __m512 acc[8][2];
#pragma GCC unroll 8
    for (int o = 0; o < 8; o++) acc[o][0] = acc[o][1] = _mm512_setzero_ps();
    for (int64_t r = ra; r < rb; r++) {
        const float *br = b + r * ldb;
        __m512 b0 = masked ? _mm512_maskz_loadu_ps(m0, br) : _mm512_loadu_ps(br);
        __m512 b1 = nv > 1 ? (masked ? _mm512_maskz_loadu_ps(m1, br + 16) : _mm512_loadu_ps(br + 16))
                           : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int o = 0; o < 8; o++) {
            if (o < no) {
                __m512 ab = _mm512_set1_ps(a[o * lao + r * lar]);
                acc[o][0] = _mm512_fmadd_ps(ab, b0, acc[o][0]);
                if (nv > 1) acc[o][1] = _mm512_fmadd_ps(ab, b1, acc[o][1]);
            }
        }
    }
#pragma GCC unroll 8
    for (int o = 0; o < 8; o++) {
        if (o < no) {
            float *p = out + o * ldo;
            _mm512_mask_storeu_ps(p, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, p), acc[o][0]));
            if (nv > 1)
                _mm512_mask_storeu_ps(p + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, p + 16), acc[o][1]));
        }
    }
}

/* outer_kern over all ncol columns of b and out, in groups of 32, for no outputs (any count). */
AVX512 static void outer_any(int no, const float *a, int64_t lao, int64_t lar, const float *b, int64_t ldb,
                             int64_t ra, int64_t rb, float *out, int64_t ldo, int64_t ncol) {
    if (ra >= rb) return;
    for (int64_t c = 0; c < ncol; c += 32) {
        const int64_t w = ncol - c < 32 ? ncol - c : 32;
        const __mmask16 full = 0xFFFF, tail = (__mmask16)((1u << (w % 16)) - 1);
        const float *bc = b + c;
        float *oc = out + c;
        for (int o0 = 0; o0 < no; o0 += 8) {
            const int n = no - o0 < 8 ? no - o0 : 8;
            const float *ao = a + o0 * lao;
            float *oo = oc + o0 * ldo;
            if (n == 8 && w == 32) outer_kern(8, 2, 0, full, full, ao, lao, lar, bc, ldb, ra, rb, oo, ldo);
            else if (n == 8 && w == 16) outer_kern(8, 1, 0, full, 0, ao, lao, lar, bc, ldb, ra, rb, oo, ldo);
            else if (n == 8 && w > 16) outer_kern(8, 2, 1, full, tail, ao, lao, lar, bc, ldb, ra, rb, oo, ldo);
            else if (n == 8) outer_kern(8, 1, 1, tail, 0, ao, lao, lar, bc, ldb, ra, rb, oo, ldo);
            else
                for (int o = 0; o < n; o++)
                    outer_kern(1, w > 16 ? 2 : 1, 1, w >= 16 ? full : tail, w > 16 ? (w == 32 ? full : tail) : 0,
                               ao + o * lao, lao, lar, bc, ldb, ra, rb, oo + o * ldo, ldo);
        }
    }
}

/* Tile t of query head h, accumulating into dk, dv (this task's (Nk, D) and (Nk, Dv) shares of kv head hk).
 * ws: QT·D (q, transposed) + QT·Dv (dout, transposed) + 2·KC·QT (p, dS) + QT·dp (dq). */
AVX512 static void tile_bwd(const job_t *J, int64_t b, int64_t h, int64_t t, float *dk, float *dv, float *ws) {
    const int64_t hk = h / (J->Hq / J->Hk), i0 = t * QT, nr = J->Nq - i0 < QT ? J->Nq - i0 : QT;
    const int64_t D = J->D, Dv = J->Dv, Nk = J->Nk, dp = J->dp;
    const float *q = J->q + b * J->qs[0] + h * J->qs[1] + i0 * J->qs[2];
    const float *g = J->dout + b * J->xs[0] + h * J->xs[1] + i0 * J->xs[2];
    const float *k = J->k + b * J->ks[0] + hk * J->ks[1];
    const float *v = J->v + b * J->vs[0] + hk * J->vs[1];
    float *dq = J->dq + ((b * J->Hq + h) * J->Nq + i0) * D;
    float *qt = ws, *gt = qt + QT * D, *st = gt + QT * Dv, *dst = st + (int64_t)KC * QT, *acc = dst + (int64_t)KC * QT;

    rows_t R;
    row_ranges(&R, i0, nr, J->Nq, Nk, J->left, J->right);
    const int32_t *lo = R.lo, *hi = R.hi;
    const int64_t jmin = R.jmin, jmax = R.jmax, *hl = R.hl, *hr = R.hr, *fl = R.fl, *fr = R.fr;
    float lsev[QT] __attribute__((aligned(64))), delv[QT] __attribute__((aligned(64)));
    for (int r = 0; r < QT; r++) {
        const int sees = r < nr && lo[r] < hi[r];
        lsev[r] = sees ? J->lse[b * J->ls[0] + h * J->ls[1] + i0 + r] : 0.0f;
        delv[r] = sees ? J->delta[b * J->ls[0] + h * J->ls[1] + i0 + r] : 0.0f;
    }
    pack_t(qt, q, J->qs[2], nr, D);
    pack_t(gt, g, J->xs[2], nr, Dv);
    memset(acc, 0, sizeof(float) * QT * dp);

    const __m512 sc = _mm512_set1_ps(J->scale), l2e = _mm512_set1_ps(LOG2E);
    for (int64_t c0 = jmin; c0 < jmax; c0 += KC) {
        const int64_t c1 = c0 + KC < jmax ? c0 + KC : jmax;
        tile_scores(&R, c0, c1, qt, k, J->ks[2], D, st);
        tile_scores(&R, c0, c1, gt, v, J->vs[2], Dv, dst);
        /* p = exp(s·scale − lse) and dS = p·(dP − delta)·scale where visible, 0 elsewhere in the chunk */
        for (int s = 0; s < 2; s++) {
            const __m512 L = _mm512_load_ps(lsev + 16 * s), Dl = _mm512_load_ps(delv + 16 * s);
            for (int64_t j = c0; j < c1; j++) {
                float *pp = st + (j - c0) * QT + 16 * s, *pd = dst + (j - c0) * QT + 16 * s;
                if (j < hl[s] || j >= hr[s]) {
                    _mm512_store_ps(pp, _mm512_setzero_ps());
                    _mm512_store_ps(pd, _mm512_setzero_ps());
                    continue;
                }
                const __mmask16 ok = j < fl[s] || j >= fr[s] ? sees(&R, s, j) : 0xFFFF;
                __m512 p = _mm512_maskz_mov_ps(ok, exp2v(_mm512_mul_ps(_mm512_fmsub_ps(_mm512_load_ps(pp), sc, L),
                                                                       l2e)));
                __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_load_ps(pd), Dl)), sc);
                _mm512_store_ps(pp, p);
                _mm512_store_ps(pd, ds);
            }
        }
        /* dQ (tile rows, by 8-row blocks over the keys they see) += dS·k */
        for (int r0 = 0; r0 < QT; r0 += RB) {
            int64_t a, e;
            block_keys(&R, r0, c0, c1, &a, &e);
            if (a < e)
                outer_any(RB, dst + r0, 1, QT, k + c0 * J->ks[2], J->ks[2], a - c0, e - c0, acc + r0 * dp, dp, D);
        }
        /* dK += dSᵀ·q and dV += pᵀ·dO, by 8-key groups over the rows that see them */
        for (int64_t j = c0; j < c1; j += KG) {
            const int nk = c1 - j < KG ? (int)(c1 - j) : KG;
            int ra = 0, rb = 0;
            while (ra < QT && hi[ra] <= j) ra++;                 /* first row that sees a key >= j */
            rb = ra;
            while (rb < QT && lo[rb] < j + nk && lo[rb] < hi[rb]) rb++;   /* ... through the last that sees < j+nk */
            if (ra >= rb) continue;
            outer_any(nk, dst + (j - c0) * QT, QT, 1, q, J->qs[2], ra, rb, dk + j * D, D, D);
            outer_any(nk, st + (j - c0) * QT, QT, 1, g, J->xs[2], ra, rb, dv + j * Dv, Dv, Dv);
        }
    }
    for (int r = 0; r < nr; r++) memcpy(dq + r * D, acc + r * dp, sizeof(float) * D);
}

/* Task: a share (part) of one kv head's query tiles, all its query heads, into that share's dK/dV. */
AVX512 static void bwd_task(const job_t *J, int64_t task, float *ws) {
    const int64_t G = J->Hq / J->Hk, part = task % J->parts, bh = task / J->parts, b = bh / J->Hk, hk = bh % J->Hk;
    const int64_t t0 = J->ntiles * part / J->parts, t1 = J->ntiles * (part + 1) / J->parts;
    float *dk = J->dk + ((part * J->B + b) * J->Hk + hk) * J->Nk * J->D;
    float *dv = J->dv + ((part * J->B + b) * J->Hk + hk) * J->Nk * J->Dv;
    for (int64_t h = hk * G; h < (hk + 1) * G; h++)
        for (int64_t t = t0; t < t1; t++) tile_bwd(J, b, h, t, dk, dv, ws);
}

/* dims: B, Hq, Hk, Nq, Nk, D, Dv, parts. strides: q, k, v, dout (b, h, n), then lse/delta (b, h).
 * dq: (B, Hq, Nq, D) contiguous; dk, dv: (parts, B, Hk, Nk, D|Dv) contiguous and zeroed; part p of a kv head
 * takes its query tiles [p·T/parts, (p+1)·T/parts). delta = rowsum(dout·out) − dlse. Returns 0 or -1. */
int qkv_attn_bwd_f32(const float *q, const float *k, const float *v, const float *dout, const float *lse,
                     const float *delta, float *dq, float *dk, float *dv, const int64_t *dims,
                     const int64_t *strides, int64_t left, int64_t right, float scale, int nthreads) {
    job_t J;
    job_init(&J, dims, strides, left, right, scale);
    J.q = q, J.k = k, J.v = v, J.dout = dout, J.lse = (float *)lse, J.delta = delta;   /* lse: read only */
    J.dq = dq, J.dk = dk, J.dv = dv;
    J.parts = dims[7] < 1 ? 1 : dims[7];
    J.ntasks = J.B * J.Hk * J.parts;
    J.ws = (size_t)(QT * J.D + QT * J.Dv + 2 * (int64_t)KC * QT + QT * J.dp);
    J.task = bwd_task;
    return run(&J, nthreads);
}

/* dims: B, Hq, Hk, Nq, Nk, D, Dv. strides: q (b, h, n), k, v, o, then lse (b, h) — elements, last dims 1.
 * lse may be NULL. Returns 0, or -1 when memory or threads could not be had. */
int qkv_attn_fwd_f32(const float *q, const float *k, const float *v, float *o, float *lse, const int64_t *dims,
                     const int64_t *strides, int64_t left, int64_t right, float scale, int nthreads) {
    job_t J;
    job_init(&J, dims, strides, left, right, scale);
    J.q = q, J.k = k, J.v = v, J.o = o, J.lse = lse;
    J.ntasks = J.B * J.Hq * J.ntiles;
    J.ws = (size_t)(QT * J.D + (int64_t)KC * QT + QT * J.dvp);
    J.task = tile;
    return run(&J, nthreads);
}
