/* What the kernel's translation units share: the job of one call, the table each instruction-set variant
 * exports, and the runner (attn_cpu.c) that spreads a job's tasks over torch's OpenMP threads.
 *
 * The kernel body (attn_kernel.h) is compiled once per variant (attn_avx512.c, attn_avx2.c, attn_neon.c), each
 * on its own vector wrappers (vec_*.h); attn_cpu.c is compiled for the baseline CPU and picks among the
 * variants at run time. */
#ifndef QKV_ATTN_COMMON_H
#define QKV_ATTN_COMMON_H

#include <stddef.h>
#include <stdint.h>

enum { QKV_F32 = 0, QKV_BF16 = 1, QKV_F16 = 2 };   /* element type of q, k, v (and dout) */

typedef struct job job_t;
struct job {
    const void *q, *k, *v;          /* element type dt; rows contiguous, other strides free */
    float *o, *lse;                 /* forward: out (fp32), and lse (may be NULL); the backward reads lse */
    const void *dout;               /* backward: dout (type dt) */
    const float *delta;             /* backward: rowsum(dout·out) − dlse, (b, h, n) with the lse's strides */
    float *dq, *dk, *dv;            /* backward: dq (B, Hq, Nq, D); dk, dv (parts, B, Hk, Nk, D|Dv) shares */
    int64_t B, Hq, Hk, Nq, Nk, D, Dv;
    int64_t qs[3], ks[3], vs[3];    /* strides (elements) of batch, head, row; last dims are 1 */
    int64_t xs[3], ls[2];           /* ... of out (forward) or dout (backward); of lse and delta (batch, head) */
    int64_t left, right;            /* key j visible to row i iff i+off-left <= j <= i+off+right, off = Nk−Nq */
    float scale;
    int dt;
    int pf;                         /* fetch values ahead into L2 during QK (long rows) */
    int64_t ntiles, tt, parts, ntasks, next;   /* tiles per (b, h); tiles per pass; backward shares */
    int64_t dvp, dp;                /* Dv, D rounded up to a column block: row strides of tile accumulators */
    int64_t nsplit, split, jlo, jhi;            /* decoding: key splits of [jlo, jhi), keys per split */
    float *po, *plse;                           /* decoding: partial outputs and lse per split */
    size_t ws;                      /* workspace floats per thread */
    void (*task)(const job_t *, int64_t, float *);
};

/* One instruction-set variant of the kernel. */
typedef struct {
    const char *name;
    int (*runs)(void);                      /* whether this CPU can run it */
    int (*fwd)(job_t *J, int nthreads);     /* tiles of query rows */
    int (*bwd)(job_t *J, int nthreads);
    int (*decode)(job_t *J, int nthreads);  /* few query rows: a kv head's query heads together, keys split */
} qkv_isa_t;

/* Runs J's tasks (J->task, J->ntasks) on nthreads threads, each with a workspace of J->ws floats.
 * Returns 0, or -1 when a workspace could not be allocated. */
int qkv_run_job(job_t *J, int nthreads);

/* The library's entry points (attn_cpu.c; ctypes in src/qkv/engines/cpu_kernel.py, and the C tests). */
int qkv_native_version(void);
int qkv_isa_count(void);
const char *qkv_isa_name(int i);
int qkv_isa_runs(int i);
int qkv_decode_rows_max(void);
int qkv_attn_fwd(int isa, int dt, int tt, const void *q, const void *k, const void *v, float *o, float *lse,
                 const int64_t *dims, const int64_t *strides, int64_t left, int64_t right, float scale, int nthreads);
int qkv_attn_decode(int isa, int dt, const void *q, const void *k, const void *v, float *o, float *lse,
                    const int64_t *dims, const int64_t *strides, int64_t left, int64_t right, float scale,
                    int nthreads);
int qkv_attn_bwd(int isa, int dt, const void *q, const void *k, const void *v, const void *dout, const float *lse,
                 const float *delta, float *dq, float *dk, float *dv, const int64_t *dims, const int64_t *strides,
                 int64_t left, int64_t right, float scale, int nthreads);

#endif
