/* qkv's CPU attention kernel: the entry points, loaded with ctypes (src/qkv/engines/cpu_kernel.py, which releases the
 * GIL). Plain C with no Python or torch headers, compiled for the baseline CPU; the kernel itself
 * (attn_kernel.h) is compiled once per instruction set in its own translation unit, and these entry points
 * run the variant the caller names — the caller picks the best one this CPU runs (qkv_isa_runs), or a lower
 * one on request.
 *
 * Work runs on torch's OpenMP threads (see qkv_run_job). Built without OpenMP (the C test harness), the same
 * code runs serially.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attn_common.h"

#if defined(__x86_64__) || defined(_M_X64)
extern const qkv_isa_t qkv_isa_avx512, qkv_isa_avx2;
static const qkv_isa_t *const ISAS[] = {&qkv_isa_avx512, &qkv_isa_avx2};   /* best first */
#define NISA 2
#elif defined(__aarch64__)
extern const qkv_isa_t qkv_isa_neon;
static const qkv_isa_t *const ISAS[] = {&qkv_isa_neon};
#define NISA 1
#else
static const qkv_isa_t *const ISAS[] = {NULL};
#define NISA 0
#endif

int qkv_native_version(void) { return 4; }

/* The variants compiled in, best first; their names; whether this CPU runs them. */
int qkv_isa_count(void) { return NISA; }
const char *qkv_isa_name(int i) { return i >= 0 && i < NISA ? ISAS[i]->name : NULL; }
int qkv_isa_runs(int i) { return i >= 0 && i < NISA && ISAS[i]->runs(); }

/* Whether an attention output can only have come from finite inputs: every row of x (B, H, N, D; strides in
 * elements) finite, with an entry that is not zero. (SDPA's CPU kernels give a row of NaN scores zeros.) Reads
 * the bits: no floating-point traps, any element type the kernel takes. 1 or 0. This runs on every call SDPA
 * serves, so rows of unit stride take an AVX2 loop on x86-64 CPUs that have it (~4x the plain loop). */
/* The row at element o: 1 when finite (no exponent field all ones) with a non-zero entry. wide: fp32 (else a
 * 16-bit type); em: the exponent bits. */
static int row_plausible(const void *x, int wide, int64_t o, int64_t D, int64_t sd, uint32_t em) {
    uint32_t bad = 0, any = 0;
    for (int64_t d = 0; d < D; d++) {
        const int64_t i = o + d * sd;
        const uint32_t u = wide ? ((const uint32_t *)x)[i] : ((const uint16_t *)x)[i];
        bad |= (u & em) == em, any |= u & (wide ? 0x7fffffffu : 0x7fffu);
    }
    return !bad && (any || D == 0);
}

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <immintrin.h>
#define QKV_ROWS_AVX2 1
/* Unit-stride rows (D >= the lanes of a vector) with AVX2. A row's largest magnitude (its bits without the sign,
 * compared as integers: the order of the magnitudes) is 0 for a row of zeros, and of all rows it reaches the
 * exponent field exactly when an entry is inf or NaN: one and + one max per vector, a test per row. E: the
 * lane type; MAX, GT, SET1: its intrinsics; ABS: the magnitude mask. */
#define QKV_ROWS_BODY(E, MAX, GT, SET1, ABS)                                                                   \
    const int64_t L = 32 / sizeof(E), D4 = D / (4 * L) * (4 * L), Dv = D / L * L;                             \
    const __m256i absm = SET1(ABS), z = _mm256_setzero_si256();                                                \
    __m256i all = z;                                                                                           \
    uint32_t tail_all = 0;                                                                                     \
    for (int64_t b = 0; b < B; b++)                                                                            \
        for (int64_t h = 0; h < H; h++)                                                                        \
            for (int64_t n = 0; n < N; n++) {                                                                  \
                const E *p = (const E *)x + b * sb + h * sh + n * sn;                                          \
                __m256i m0 = z, m1 = z, m2 = z, m3 = z;                                                        \
                int64_t d = 0;                                                                                 \
                for (; d < D4; d += 4 * L) {                                                                   \
                    m0 = MAX(m0, _mm256_and_si256(absm, _mm256_loadu_si256((const __m256i *)(p + d))));        \
                    m1 = MAX(m1, _mm256_and_si256(absm, _mm256_loadu_si256((const __m256i *)(p + d + L))));    \
                    m2 = MAX(m2, _mm256_and_si256(absm, _mm256_loadu_si256((const __m256i *)(p + d + 2 * L)))); \
                    m3 = MAX(m3, _mm256_and_si256(absm, _mm256_loadu_si256((const __m256i *)(p + d + 3 * L)))); \
                }                                                                                              \
                for (; d < Dv; d += L)                                                                         \
                    m0 = MAX(m0, _mm256_and_si256(absm, _mm256_loadu_si256((const __m256i *)(p + d))));        \
                uint32_t t = 0;                                                                                \
                for (; d < D; d++) {                                                                           \
                    const uint32_t a = p[d] & (uint32_t)(ABS);                                                 \
                    t = a > t ? a : t;                                                                         \
                }                                                                                              \
                m0 = MAX(MAX(m0, m1), MAX(m2, m3));                                                            \
                if (t == 0 && _mm256_testz_si256(m0, m0)) return 0;                                            \
                all = MAX(all, m0), tail_all = t > tail_all ? t : tail_all;                                    \
            }                                                                                                  \
    return !_mm256_movemask_epi8(GT(all, SET1((E)(em - 1)))) && tail_all < em;

__attribute__((target("avx2"))) static int rows_avx2_32(const void *x, int64_t B, int64_t H, int64_t N, int64_t D,
                                                         int64_t sb, int64_t sh, int64_t sn, uint32_t em) {
    QKV_ROWS_BODY(uint32_t, _mm256_max_epi32, _mm256_cmpgt_epi32, _mm256_set1_epi32, 0x7fffffff)
}

__attribute__((target("avx2"))) static int rows_avx2_16(const void *x, int64_t B, int64_t H, int64_t N, int64_t D,
                                                         int64_t sb, int64_t sh, int64_t sn, uint32_t em) {
    QKV_ROWS_BODY(uint16_t, _mm256_max_epi16, _mm256_cmpgt_epi16, _mm256_set1_epi16, 0x7fff)
}

static int has_avx2(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") != 0;
    }
    return known;
}
#endif

int qkv_rows_plausible(int dt, const void *x, int64_t B, int64_t H, int64_t N, int64_t D, int64_t sb, int64_t sh,
                       int64_t sn, int64_t sd) {
    const int wide = dt == QKV_F32;
    const uint32_t em = wide ? 0x7f800000u : dt == QKV_BF16 ? 0x7f80u : 0x7c00u;
#ifdef QKV_ROWS_AVX2
    if (sd == 1 && D >= (wide ? 8 : 16) && has_avx2())
        return wide ? rows_avx2_32(x, B, H, N, D, sb, sh, sn, em) : rows_avx2_16(x, B, H, N, D, sb, sh, sn, em);
#endif
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t n = 0; n < N; n++)
                if (!row_plausible(x, wide, b * sb + h * sh + n * sn, D, sd, em)) return 0;
    return 1;
}

/* Decoding takes at most this many query rows per head (the rows of a kv head's query heads form its tile). */
int qkv_decode_rows_max(void) { return 16; }

/* A thread: takes the job's tasks from its counter until none is left. */
static int worker(job_t *J) {
    float *ws = aligned_alloc(64, ((J->ws + 16) * sizeof(float) + 63) / 64 * 64);
    if (!ws) return 1;
    for (;;) {
        const int64_t t = __atomic_fetch_add(&J->next, 1, __ATOMIC_RELAXED);
        if (t >= J->ntasks) break;
        J->task(J, t, ws);
    }
    free(ws);
    return 0;
}

/* Runs the job on nthreads threads of an OpenMP team. Built with -fopenmp, this library needs libgomp.so.1,
 * which the loader finds already loaded by torch: the team is torch's own intra-op pool, so no thread of
 * another pool spins on a core we need right after a torch op (pthreads of our own lost ~10% to that). */
int qkv_run_job(job_t *J, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > J->ntasks) nthreads = (int)(J->ntasks ? J->ntasks : 1);
    J->next = 0;
    int bad = 0;
#pragma omp parallel num_threads(nthreads) reduction(|| : bad)
    bad = worker(J) != 0;
    return bad ? -1 : 0;
}

/* The fields every call shares. dims: B, Hq, Hk, Nq, Nk, D, Dv. strides: q, k, v, then out or dout (batch,
 * head, row), then lse (batch, head); elements. Returns 0, or -2 when the variant or type is not one this CPU
 * runs. */
static int job_init(job_t *J, int isa, int dt, const int64_t *dims, const int64_t *strides, int64_t left,
                    int64_t right, float scale) {
    memset(J, 0, sizeof *J);
    if (!qkv_isa_runs(isa) || dt < QKV_F32 || dt > QKV_F16) return -2;
    J->B = dims[0], J->Hq = dims[1], J->Hk = dims[2], J->Nq = dims[3], J->Nk = dims[4], J->D = dims[5];
    J->Dv = dims[6];
    for (int i = 0; i < 3; i++) {
        J->qs[i] = strides[i], J->ks[i] = strides[3 + i], J->vs[i] = strides[6 + i], J->xs[i] = strides[9 + i];
    }
    J->ls[0] = strides[12], J->ls[1] = strides[13];
    J->left = left, J->right = right, J->scale = scale, J->dt = dt;
    return 0;
}

/* Forward by tiles of query rows, tt tiles per pass (0: the default, 1). Writes out (fp32) and lse (may be
 * NULL). Returns 0, -1 when memory could not be had, -2 for a variant this CPU does not run. */
int qkv_attn_fwd(int isa, int dt, int tt, const void *q, const void *k, const void *v, float *o, float *lse,
                 const int64_t *dims, const int64_t *strides, int64_t left, int64_t right, float scale,
                 int nthreads) {
    job_t J;
    int rc = job_init(&J, isa, dt, dims, strides, left, right, scale);
    if (rc) return rc;
    J.q = q, J.k = k, J.v = v, J.o = o, J.lse = lse, J.tt = tt < 1 ? 1 : tt;
    return ISAS[isa]->fwd(&J, nthreads);
}

/* out and lse of row (b, h, i) from the splits' partial results, weighted by their lse. */
static void merge_task(const job_t *J, int64_t row, float *ws) {
    (void)ws;
    const int64_t ns = J->nsplit, Dv = J->Dv, i = row % J->Nq, h = row / J->Nq % J->Hq, b = row / J->Nq / J->Hq;
    const float *pl = J->plse + row * ns, *po = J->po + row * ns * Dv;
    float *o = J->o + b * J->xs[0] + h * J->xs[1] + i * J->xs[2];
    float m = -INFINITY;
    for (int64_t s = 0; s < ns; s++) m = pl[s] > m ? pl[s] : m;
    float w[64], sum = 0.0f;
    for (int64_t s = 0; s < ns; s++) sum += w[s] = m == -INFINITY ? 0.0f : expf(pl[s] - m);
    const float is = sum > 0 ? 1.0f / sum : 0.0f;
    for (int64_t c = 0; c < Dv; c++) {
        float x = 0.0f;
        for (int64_t s = 0; s < ns; s++) x += w[s] * po[s * Dv + c];
        o[c] = x * is;
    }
    if (J->lse) J->lse[b * J->ls[0] + h * J->ls[1] + i] = sum > 0 ? m + logf(sum) : -INFINITY;
}

/* Forward for few query rows (Nq <= qkv_decode_rows_max()): the query heads of a kv head together, the keys
 * split in ranges of their own (chosen from the shape alone: results do not depend on the thread count), the
 * partial results merged by their lse. Same arguments and results as qkv_attn_fwd. */
int qkv_attn_decode(int isa, int dt, const void *q, const void *k, const void *v, float *o, float *lse,
                    const int64_t *dims, const int64_t *strides, int64_t left, int64_t right, float scale,
                    int nthreads) {
    job_t J;
    int rc = job_init(&J, isa, dt, dims, strides, left, right, scale);
    if (rc) return rc;
    if (J.Nq > qkv_decode_rows_max()) return -2;
    J.q = q, J.k = k, J.v = v, J.o = o, J.lse = lse;
    /* the union of the rows' key ranges (both bounds grow with the row) */
    const int64_t off = J.Nk - J.Nq;
    int64_t lo = J.Nk, hi = 0;
    for (int64_t i = 0; i < J.Nq; i++) {
        int64_t a = i + off - left, e = i + off + right + 1;
        a = a < 0 ? 0 : a > J.Nk ? J.Nk : a, e = e < 0 ? 0 : e > J.Nk ? J.Nk : e;
        if (a < e) lo = a < lo ? a : lo, hi = e > hi ? e : hi;
    }
    const int64_t span = hi > lo ? hi - lo : 0;
    int64_t ns = (span + 511) / 512;
    ns = ns < 1 ? 1 : ns > 64 ? 64 : ns;
    J.split = ((span + ns - 1) / ns + 15) / 16 * 16;
    J.nsplit = J.split ? (span + J.split - 1) / J.split : 1;
    J.jlo = span ? lo : 0, J.jhi = span ? hi : 0;
    const int64_t rows = J.B * J.Hq * J.Nq;
    J.po = malloc(sizeof(float) * (size_t)(rows * J.nsplit * J.Dv + 1));
    J.plse = malloc(sizeof(float) * (size_t)(rows * J.nsplit + 1));
    rc = J.po && J.plse ? ISAS[isa]->decode(&J, nthreads) : -1;
    if (!rc) {
        J.ntasks = rows, J.ws = 0, J.task = merge_task;
        rc = qkv_run_job(&J, nthreads);
    }
    free(J.po);
    free(J.plse);
    return rc;
}

/* Backward. dims: B, Hq, Hk, Nq, Nk, D, Dv, parts. strides: q, k, v, dout (b, h, n), then lse/delta (b, h).
 * dq: (B, Hq, Nq, D) fp32 contiguous; dk, dv: (parts, B, Hk, Nk, D|Dv) fp32 contiguous and zeroed; part p of a
 * kv head takes its query tiles [p·T/parts, (p+1)·T/parts). delta = rowsum(dout·out) − dlse. Returns 0, -1 or
 * -2 as the forward. */
int qkv_attn_bwd(int isa, int dt, const void *q, const void *k, const void *v, const void *dout, const float *lse,
                 const float *delta, float *dq, float *dk, float *dv, const int64_t *dims, const int64_t *strides,
                 int64_t left, int64_t right, float scale, int nthreads) {
    job_t J;
    int rc = job_init(&J, isa, dt, dims, strides, left, right, scale);
    if (rc) return rc;
    J.q = q, J.k = k, J.v = v, J.dout = dout, J.lse = (float *)lse, J.delta = delta;   /* lse: read only */
    J.dq = dq, J.dk = dk, J.dv = dv, J.parts = dims[7];
    return ISAS[isa]->bwd(&J, nthreads);
}
