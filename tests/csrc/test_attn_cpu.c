/* C-level tests of qkv's CPU kernel (src/qkv/csrc): every variant compiled in that this CPU runs, against a
 * plain C reference, on the awkward shapes and key-range geometries of tests/test_native.py, for fp32, bf16
 * and fp16 inputs: the forward by tiles (one and three tiles per pass), the decoding path (few query rows, keys
 * split), and the backward.
 *
 * FlashAttention's rule, as tests/_oracle.py: err = max |kernel − reference in double|, bounded by
 * factor × (the same error of a plain fp32 computation) + 1e-5, factor 2 for out and lse, 3 for gradients;
 * -inf entries (lse of rows that see no key) must coincide. Half inputs are exactly fp32 values, and the kernel
 * computes in fp32, so the fp32 plain computation sets their bound too. Built with OpenMP, each call also runs
 * on 1 and 3 threads, which must give the same bits.
 *
 * Usage: test_attn_cpu [-q] (-q: the smaller set, for emulators). Exit 0 when every check passes. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attn_common.h"

#define NONE INT64_MIN   /* an unbounded side of a window */

typedef struct { int B, Hq, Hk, Nq, Nk, D, Dv; } shape_t;
typedef struct { const char *name; int causal; int64_t left, right; } geom_t;

static const shape_t SHAPES[] = {
    {1, 1, 1, 1, 1, 40, 40},
    {2, 2, 2, 97, 97, 59, 59},
    {1, 8, 2, 33, 70, 40, 24},       /* GQA, Nq < Nk, Dv != D */
    {1, 4, 1, 70, 33, 111, 111},     /* MQA, Nq > Nk (causal: the first rows see nothing) */
    {2, 3, 3, 1, 97, 59, 16},        /* decoding */
    {1, 2, 2, 97, 1, 40, 40},
    {1, 2, 1, 1023, 1023, 64, 48},   /* several key chunks (512) per row without a window */
    {1, 8, 2, 1, 1500, 64, 64},      /* decoding with GQA, several key splits */
    {2, 6, 2, 16, 700, 40, 24},      /* 16 query rows (the most decoding takes), GQA */
    {1, 4, 4, 5, 1100, 111, 33},
};
#define NSHAPES (int)(sizeof SHAPES / sizeof *SHAPES)
static const geom_t GEOMS[] = {
    {"none", 0, NONE, NONE},
    {"causal", 1, NONE, NONE},
    {"window255", 1, 255, 0},
    {"window_two_sided", 0, 16, 7},
    {"window_left_only", 0, 5, NONE},
    {"window_right_only", 0, NONE, 3},
    {"diagonal", 0, 0, 0},
    {"causal_and_right", 1, 40, 9},
};
#define NGEOMS (int)(sizeof GEOMS / sizeof *GEOMS)
static const char *DT_NAMES[] = {"fp32", "bf16", "fp16"};

static int failures = 0, checks = 0;

/* ------------------------------------------------------------------------------------------- numbers */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double uniform(void) {
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return ((rng_state >> 11) + 0.5) / 9007199254740992.0;
}
static double normal(void) { return sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform()); }

static uint16_t f32_to_bf16(float f) {       /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}
static float bf16_to_f32_(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint16_t f32_to_f16(float f) {        /* normal range only (test data are ~N(0, 1)) */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000;
    int32_t e = (int32_t)((u >> 23) & 0xFF) - 127 + 15;
    uint32_t m = u & 0x7FFFFF;
    if (e <= 0) return (uint16_t)sign;       /* flush tiny values (|x| < 6e-5) to zero */
    uint32_t h = ((uint32_t)e << 10) | (m >> 13);
    const uint32_t rest = m & 0x1FFF;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}
static float f16_to_f32_(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    uint32_t u = e == 0 ? sign : sign | ((e - 15 + 127) << 23) | (m << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* A tensor of n elements: the exact fp32 values (x) and the same values in the element type under test (raw). */
typedef struct { float *x; void *raw; } tensor_t;
static tensor_t make(int64_t n, int dt, double sd) {
    tensor_t t = {malloc(sizeof(float) * (size_t)n), malloc(4 * (size_t)n)};
    for (int64_t i = 0; i < n; i++) {
        float f = (float)(sd * normal());
        if (dt == QKV_BF16) ((uint16_t *)t.raw)[i] = f32_to_bf16(f), f = bf16_to_f32_(((uint16_t *)t.raw)[i]);
        else if (dt == QKV_F16) ((uint16_t *)t.raw)[i] = f32_to_f16(f), f = f16_to_f32_(((uint16_t *)t.raw)[i]);
        else ((float *)t.raw)[i] = f;
        t.x[i] = f;
    }
    return t;
}
static void drop(tensor_t t) { free(t.x), free(t.raw); }

/* ------------------------------------------------------------------------------------------ reference */
typedef struct {
    const shape_t *s;
    int64_t left, right, qs[3], ks[3], vs[3];
    double scale;
} call_t;

static int visible(const call_t *c, int64_t i, int64_t j) {
    const int64_t off = c->s->Nk - c->s->Nq;
    return j >= i + off - c->left && j <= i + off + c->right;
}

/* Attention in double (ref_f64) and in float (ref_f32: the plain fp32 computation), forward and, given dout,
 * backward (reference.h, compiled once per type). */
#define REAL double
#define REF_NAME ref_f64
#include "reference.h"
#undef REAL
#undef REF_NAME
#define REAL float
#define REF_NAME ref_f32
#include "reference.h"
#undef REAL
#undef REF_NAME

/* ------------------------------------------------------------------------------------------------ checks */
static double max_err(const double *a, const double *ref, int64_t n, int *inf_mismatch, int *nan) {
    double e = 0;
    for (int64_t i = 0; i < n; i++) {
        if (isnan(a[i])) { *nan = 1; continue; }
        if (isinf(ref[i]) || isinf(a[i])) {
            if (a[i] != ref[i]) *inf_mismatch = 1;
            continue;
        }
        const double d = fabs(a[i] - ref[i]);
        e = d > e ? d : e;
    }
    return e;
}

static void check(const char *what, const char *ctx, const double *got, const double *plain, const double *ref,
                  int64_t n, double factor) {
    int infm = 0, nan = 0, infp = 0, nanp = 0;
    const double eg = max_err(got, ref, n, &infm, &nan), ep = max_err(plain, ref, n, &infp, &nanp);
    const double bound = factor * ep + 1e-5;
    checks++;
    if (nan || infm || !(eg <= bound)) {
        failures++;
        printf("FAIL %s %s: err %.3e bound %.3e%s%s\n", ctx, what, eg, bound, nan ? " (NaN)" : "",
               infm ? " (infinities differ)" : "");
    }
}

static double *to_double(const float *x, int64_t n) {
    double *d = malloc(sizeof(double) * (size_t)(n ? n : 1));
    for (int64_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}

#ifdef _OPENMP
static int same_bits(const float *a, const float *b, int64_t n) { return memcmp(a, b, sizeof(float) * n) == 0; }
#endif

/* ----------------------------------------------------------------------------------------------- a case */
typedef struct {
    tensor_t q, k, v, g;
    call_t c;
    int64_t strides[14], dims[8];
    double *ref_o, *ref_l, *pl_o, *pl_l, *ref_dq, *ref_dk, *ref_dv, *pl_dq, *pl_dk, *pl_dv;
} case_t;

/* q stored (B, Nq, Hq, D) when transposed (rows of one head are not adjacent), k and v (B, Hk, Nk, ·). */
static void case_init(case_t *t, const shape_t *s, const geom_t *g, int dt, int transposed, int grad) {
    const int64_t far = s->Nq + s->Nk;
    int64_t left = g->left == NONE ? far : g->left, right = g->right == NONE ? far : g->right;
    if (g->causal) right = right < 0 ? right : 0;
    t->c = (call_t){s, left, right, {0}, {0}, {0}, 1.0 / sqrt((double)s->D)};
    if (transposed) t->c.qs[0] = (int64_t)s->Nq * s->Hq * s->D, t->c.qs[1] = s->D, t->c.qs[2] = (int64_t)s->Hq * s->D;
    else t->c.qs[0] = (int64_t)s->Hq * s->Nq * s->D, t->c.qs[1] = (int64_t)s->Nq * s->D, t->c.qs[2] = s->D;
    t->c.ks[0] = (int64_t)s->Hk * s->Nk * s->D, t->c.ks[1] = (int64_t)s->Nk * s->D, t->c.ks[2] = s->D;
    t->c.vs[0] = (int64_t)s->Hk * s->Nk * s->Dv, t->c.vs[1] = (int64_t)s->Nk * s->Dv, t->c.vs[2] = s->Dv;
    const int64_t nq = (int64_t)s->B * s->Hq * s->Nq;
    t->q = make(nq * s->D, dt, 1.0);
    t->k = make((int64_t)s->B * s->Hk * s->Nk * s->D, dt, 1.0);
    t->v = make((int64_t)s->B * s->Hk * s->Nk * s->Dv, dt, 1.0);
    t->g = make(nq * s->Dv, dt, 1.0);
    const int64_t st[14] = {t->c.qs[0], t->c.qs[1], t->c.qs[2], t->c.ks[0], t->c.ks[1], t->c.ks[2],
                            t->c.vs[0], t->c.vs[1], t->c.vs[2],
                            (int64_t)s->Hq * s->Nq * s->Dv, (int64_t)s->Nq * s->Dv, s->Dv,
                            (int64_t)s->Hq * s->Nq, s->Nq};
    memcpy(t->strides, st, sizeof st);
    const int64_t dims[8] = {s->B, s->Hq, s->Hk, s->Nq, s->Nk, s->D, s->Dv, 1};
    memcpy(t->dims, dims, sizeof dims);
    const int64_t nk = (int64_t)s->B * s->Hk * s->Nk;
    t->ref_o = malloc(sizeof(double) * nq * s->Dv), t->ref_l = malloc(sizeof(double) * nq);
    t->pl_o = malloc(sizeof(double) * nq * s->Dv), t->pl_l = malloc(sizeof(double) * nq);
    t->ref_dq = t->ref_dk = t->ref_dv = t->pl_dq = t->pl_dk = t->pl_dv = NULL;
    if (grad) {
        t->ref_dq = malloc(sizeof(double) * nq * s->D), t->pl_dq = malloc(sizeof(double) * nq * s->D);
        t->ref_dk = malloc(sizeof(double) * nk * s->D), t->pl_dk = malloc(sizeof(double) * nk * s->D);
        t->ref_dv = malloc(sizeof(double) * nk * s->Dv), t->pl_dv = malloc(sizeof(double) * nk * s->Dv);
    }
    ref_f64(&t->c, t->q.x, t->k.x, t->v.x, t->g.x, t->ref_o, t->ref_l, t->ref_dq, t->ref_dk, t->ref_dv);
    ref_f32(&t->c, t->q.x, t->k.x, t->v.x, t->g.x, t->pl_o, t->pl_l, t->pl_dq, t->pl_dk, t->pl_dv);
}

static void case_free(case_t *t) {
    drop(t->q), drop(t->k), drop(t->v), drop(t->g);
    double *ps[] = {t->ref_o, t->ref_l, t->pl_o, t->pl_l, t->ref_dq, t->ref_dk, t->ref_dv, t->pl_dq, t->pl_dk, t->pl_dv};
    for (unsigned i = 0; i < sizeof ps / sizeof *ps; i++) free(ps[i]);
}

enum { PATH_TILES = 0, PATH_TILES3 = 1, PATH_DECODE = 2 };  /* tiles: one or three per pass */
static const char *PATH_NAMES[] = {"tiles", "tiles/3", "decode"};

static int forward(const case_t *t, int isa, int dt, int path, float *o, float *lse, int nthreads) {
    const float scale = (float)t->c.scale;
    if (path == PATH_DECODE)
        return qkv_attn_decode(isa, dt, t->q.raw, t->k.raw, t->v.raw, o, lse, t->dims, t->strides, t->c.left,
                               t->c.right, scale, nthreads);
    return qkv_attn_fwd(isa, dt, path == PATH_TILES3 ? 3 : 1, t->q.raw, t->k.raw, t->v.raw, o, lse, t->dims,
                        t->strides, t->c.left, t->c.right, scale, nthreads);
}

static void run_forward(const case_t *t, int isa, int dt, int path, const char *ctx) {
    const shape_t *s = t->c.s;
    const int64_t nq = (int64_t)s->B * s->Hq * s->Nq;
    float *o = malloc(sizeof(float) * nq * s->Dv), *lse = malloc(sizeof(float) * nq);
    int rc = forward(t, isa, dt, path, o, lse, 2);
    if (rc) {
        failures++, checks++;
        printf("FAIL %s forward returned %d\n", ctx, rc);
    } else {
        double *od = to_double(o, nq * s->Dv), *ld = to_double(lse, nq);
        check("out", ctx, od, t->pl_o, t->ref_o, nq * s->Dv, 2.0);
        check("lse", ctx, ld, t->pl_l, t->ref_l, nq, 2.0);
        free(od), free(ld);
#ifdef _OPENMP
        float *o1 = malloc(sizeof(float) * nq * s->Dv), *l1 = malloc(sizeof(float) * nq);
        float *o3 = malloc(sizeof(float) * nq * s->Dv), *l3 = malloc(sizeof(float) * nq);
        checks++;
        if (forward(t, isa, dt, path, o1, l1, 1) || forward(t, isa, dt, path, o3, l3, 3)
            || !same_bits(o, o1, nq * s->Dv) || !same_bits(o, o3, nq * s->Dv) || !same_bits(lse, l1, nq)
            || !same_bits(lse, l3, nq)) {
            failures++;
            printf("FAIL %s: results depend on the thread count\n", ctx);
        }
        free(o1), free(l1), free(o3), free(l3);
#endif
    }
    free(o), free(lse);
}

static void run_backward(const case_t *t, int isa, int dt, int parts, const char *ctx) {
    const shape_t *s = t->c.s;
    const int64_t nq = (int64_t)s->B * s->Hq * s->Nq, nk = (int64_t)s->B * s->Hk * s->Nk;
    float *o = malloc(sizeof(float) * nq * s->Dv), *lse = malloc(sizeof(float) * nq), *delta = malloc(sizeof(float) * nq);
    float *dq = malloc(sizeof(float) * nq * s->D);
    float *dk = calloc((size_t)(parts * nk * s->D), sizeof(float)), *dv = calloc((size_t)(parts * nk * s->Dv), sizeof(float));
    int rc = forward(t, isa, dt, PATH_TILES, o, lse, 2);
    for (int64_t r = 0; r < nq; r++) {      /* delta = rowsum(dout·out), in fp32 as the wrapper computes it */
        float x = 0;
        for (int e = 0; e < s->Dv; e++) x += t->g.x[r * s->Dv + e] * o[r * s->Dv + e];
        delta[r] = x;
    }
    int64_t dims[8];
    memcpy(dims, t->dims, sizeof dims);
    dims[7] = parts;
    int64_t strides[14];
    memcpy(strides, t->strides, sizeof strides);   /* dout: contiguous (B, Hq, Nq, Dv), like out */
    if (!rc)
        rc = qkv_attn_bwd(isa, dt, t->q.raw, t->k.raw, t->v.raw, t->g.raw, lse, delta, dq, dk, dv, dims, strides,
                          t->c.left, t->c.right, (float)t->c.scale, 2);
    if (rc) {
        failures++, checks++;
        printf("FAIL %s backward returned %d\n", ctx, rc);
    } else {
        for (int p = 1; p < parts; p++) {
            for (int64_t i = 0; i < nk * s->D; i++) dk[i] += dk[p * nk * s->D + i];
            for (int64_t i = 0; i < nk * s->Dv; i++) dv[i] += dv[p * nk * s->Dv + i];
        }
        double *a = to_double(dq, nq * s->D), *b = to_double(dk, nk * s->D), *c = to_double(dv, nk * s->Dv);
        check("dq", ctx, a, t->pl_dq, t->ref_dq, nq * s->D, 3.0);
        check("dk", ctx, b, t->pl_dk, t->ref_dk, nk * s->D, 3.0);
        check("dv", ctx, c, t->pl_dv, t->ref_dv, nk * s->Dv, 3.0);
        free(a), free(b), free(c);
    }
    free(o), free(lse), free(delta), free(dq), free(dk), free(dv);
}

/* vsum_lanes and the other lane shuffles are covered through the decoding path; the declines here. */
static void run_declines(void) {
    const int64_t dims[8] = {1, 1, 1, 17, 17, 8, 8, 1}, strides[14] = {0};
    float x[1] = {0};
    checks++;
    if (qkv_attn_fwd(-1, QKV_F32, 1, x, x, x, x, x, dims, strides, 0, 0, 1.0f, 1) != -2
        || qkv_attn_fwd(0, 7, 1, x, x, x, x, x, dims, strides, 0, 0, 1.0f, 1) != -2
        || qkv_attn_decode(0, QKV_F32, x, x, x, x, x, dims, strides, 0, 0, 1.0f, 1) != -2) {
        failures++;
        printf("FAIL: a bad variant, type or decoding row count was not refused\n");
    }
}

/* A NaN score is never taken for a masked one: the rows whose visible scores include a NaN (a NaN in their query
 * row, or in a key they see) get a non-finite out or lse, on every path (the caller's result check relies on
 * it), and the other rows stay finite. fp32, no mask and causal. */
static void run_nan_rows(int isa) {
    enum { Hq = 2, Nk = 100, D = 16 };
    for (int path = PATH_TILES; path <= PATH_DECODE; path++)
        for (int causal = 0; causal <= 1; causal++) {
            const int Nq = path == PATH_DECODE ? 8 : 40, off = Nk - Nq, rq = Nq / 2, jk = off + 3;
            const int64_t dims[8] = {1, Hq, 1, Nq, Nk, D, D, 1};
            const int64_t st[14] = {Hq * Nq * D, Nq * D, D, Nk * D, Nk * D, D, Nk * D, Nk * D, D,
                                    Hq * Nq * D, Nq * D, D, Hq * Nq, Nq};
            float *q = malloc(sizeof(float) * Hq * Nq * D), *k = malloc(sizeof(float) * Nk * D);
            float *v = malloc(sizeof(float) * Nk * D), *o = malloc(sizeof(float) * Hq * Nq * D);
            float *l = malloc(sizeof(float) * Hq * Nq);
            for (int i = 0; i < Hq * Nq * D; i++) q[i] = (float)normal();
            for (int i = 0; i < Nk * D; i++) k[i] = (float)normal(), v[i] = (float)normal();
            q[(Nq + rq) * D + 5] = NAN;             /* head 1, row rq */
            k[jk * D + 2] = NAN;                    /* key jk: seen by every row i with jk <= i + off (causal) */
            const int rc = path == PATH_DECODE
                ? qkv_attn_decode(isa, QKV_F32, q, k, v, o, l, dims, st, Nk, causal ? 0 : Nk, 0.25f, 2)
                : qkv_attn_fwd(isa, QKV_F32, 1, q, k, v, o, l, dims, st, Nk, causal ? 0 : Nk, 0.25f, 2);
            checks++;
            int bad = rc != 0;
            for (int h = 0; h < Hq && !bad; h++)
                for (int i = 0; i < Nq && !bad; i++) {
                    const int sees_nan = (h == 1 && i == rq) || !causal || jk <= i + off;
                    int finite = isfinite(l[h * Nq + i]);
                    for (int d = 0; d < D; d++) finite &= isfinite(o[(h * Nq + i) * D + d]);
                    if (finite == sees_nan) {
                        bad = 1;
                        printf("FAIL %s %s %s: row %d of head %d is %s\n", qkv_isa_name(isa), PATH_NAMES[path],
                               causal ? "causal" : "none", i, h, finite ? "finite (a NaN score was hidden)"
                                                                         : "not finite (it sees no NaN)");
                    }
                }
            failures += bad;
            free(q), free(k), free(v), free(o), free(l);
        }
}

int main(int argc, char **argv) {
    const int quick = argc > 1 && strcmp(argv[1], "-q") == 0;
    int nisa = 0;
    printf("qkv CPU kernel C tests (%s):", quick ? "quick set" : "full set");
    for (int i = 0; i < qkv_isa_count(); i++) {
        printf(" %s%s", qkv_isa_name(i), qkv_isa_runs(i) ? "" : " (not on this CPU)");
        nisa += qkv_isa_runs(i);
    }
#ifdef _OPENMP
    printf("; OpenMP: 1/2/3 threads\n");
#else
    printf("; serial build\n");
#endif
    if (!nisa) {
        printf("FAIL: no variant of the kernel runs on this CPU\n");
        return 1;
    }
    if (nisa) run_declines();
    for (int isa = 0; isa < qkv_isa_count(); isa++)
        if (qkv_isa_runs(isa)) run_nan_rows(isa);
    for (int si = 0; si < NSHAPES; si++) {
        const shape_t *s = &SHAPES[si];
        const int big = (int64_t)s->Nq * s->Nk > 100000;
        for (int gi = 0; gi < NGEOMS; gi++) {
            for (int dt = QKV_F32; dt <= QKV_F16; dt++) {
                /* the quick set: every shape and geometry in fp32, the half types on a third of them; the large
                 * shape (its reference dominates the run time) causal, and window255 with gradients */
                if (quick && dt != QKV_F32 && (gi % 3 != dt || big)) continue;
                if (big && (dt != QKV_F32 ? gi % 4 : quick && gi != 1 && gi != 2)) continue;
                const int grad = dt != QKV_F16 && (!big || (quick ? gi == 2 : gi % 2 == 0));
                case_t t;
                case_init(&t, s, &GEOMS[gi], dt, (si + gi) % 2, grad);
                for (int isa = 0; isa < qkv_isa_count(); isa++) {
                    if (!qkv_isa_runs(isa)) continue;
                    for (int path = PATH_TILES; path <= PATH_DECODE; path++) {
                        if (path == PATH_DECODE && s->Nq > qkv_decode_rows_max()) continue;
                        if (path == PATH_TILES3 && quick && big) continue;
                        char ctx[200];
                        snprintf(ctx, sizeof ctx, "%s %s B%d Hq%d Hk%d Nq%d Nk%d D%d Dv%d %s %s", qkv_isa_name(isa),
                                 PATH_NAMES[path], s->B, s->Hq, s->Hk, s->Nq, s->Nk, s->D, s->Dv, GEOMS[gi].name,
                                 DT_NAMES[dt]);
                        run_forward(&t, isa, dt, path, ctx);
                    }
                    if (grad) {
                        char ctx[200];
                        snprintf(ctx, sizeof ctx, "%s backward B%d Hq%d Hk%d Nq%d Nk%d D%d Dv%d %s %s",
                                 qkv_isa_name(isa), s->B, s->Hq, s->Hk, s->Nq, s->Nk, s->D, s->Dv, GEOMS[gi].name,
                                 DT_NAMES[dt]);
                        run_backward(&t, isa, dt, 1 + (si + gi) % 3, ctx);
                    }
                }
                case_free(&t);
            }
        }
    }
    printf("%d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
