/* Times qkv's CPU kernel alone (no Python, no torch): the forward, backward or decoding path of one shape, for
 * profiling (perf record) and A/B of kernel changes. Built by `make build/kernel_bench`.
 *
 * Usage: kernel_bench MODE ISA DT B Hq Hk Nq Nk D LEFT RIGHT THREADS REPS
 *   MODE fwd|bwd|dec; ISA avx512|avx2|neon; DT fp32|bf16; LEFT/RIGHT -1 = unbounded (causal: LEFT -1 RIGHT 0).
 * Prints the median, min and max wall milliseconds of REPS calls, and the median and min process CPU time (the
 * figure to compare on a loaded machine at 1 thread). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "attn_common.h"

static double clk(clockid_t c) {
    struct timespec t;
    clock_gettime(c, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
static int cmp(const void *a, const void *b) { double x = *(const double *)a, y = *(const double *)b; return (x > y) - (x < y); }

static void *rnd(size_t n, int dt) {
    if (dt == QKV_F32) {
        float *p = malloc(n * 4);
        for (size_t i = 0; i < n; i++) p[i] = (float)rand() / RAND_MAX - 0.5f;
        return p;
    }
    uint16_t *p = malloc(n * 2);
    for (size_t i = 0; i < n; i++) {
        float f = (float)rand() / RAND_MAX - 0.5f;
        uint32_t u;
        memcpy(&u, &f, 4);
        p[i] = (uint16_t)(u >> 16);
    }
    return p;
}

int main(int argc, char **argv) {
    if (argc != 14) {
        fprintf(stderr, "usage: %s MODE ISA DT B Hq Hk Nq Nk D LEFT RIGHT THREADS REPS\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1], *isaname = argv[2];
    const int dt = strcmp(argv[3], "fp32") ? QKV_BF16 : QKV_F32;
    int64_t B = atoll(argv[4]), Hq = atoll(argv[5]), Hk = atoll(argv[6]), Nq = atoll(argv[7]), Nk = atoll(argv[8]);
    int64_t D = atoll(argv[9]), left = atoll(argv[10]), right = atoll(argv[11]);
    int nth = atoi(argv[12]), reps = atoi(argv[13]);
    if (left < 0) left = Nk + Nq;
    if (right < 0) right = Nk + Nq;
    int isa = -1;
    for (int i = 0; i < qkv_isa_count(); i++)
        if (!strcmp(qkv_isa_name(i), isaname)) isa = i;
    if (isa < 0 || !qkv_isa_runs(isa)) {
        fprintf(stderr, "variant %s does not run here\n", isaname);
        return 2;
    }
    void *q = rnd(B * Hq * Nq * D, dt), *k = rnd(B * Hk * Nk * D, dt), *v = rnd(B * Hk * Nk * D, dt);
    void *g = rnd(B * Hq * Nq * D, dt);
    float *o = malloc(sizeof(float) * B * Hq * Nq * D), *lse = malloc(sizeof(float) * B * Hq * Nq);
    float *delta = calloc(B * Hq * Nq, sizeof(float));
    const int64_t parts = 2;
    float *dq = malloc(sizeof(float) * B * Hq * Nq * D), *dk = malloc(sizeof(float) * parts * B * Hk * Nk * D);
    float *dv = malloc(sizeof(float) * parts * B * Hk * Nk * D);
    int64_t dims[8] = {B, Hq, Hk, Nq, Nk, D, D, parts};
    int64_t strides[14] = {Hq * Nq * D, Nq * D, D, Hk * Nk * D, Nk * D, D, Hk * Nk * D, Nk * D, D,
                           Hq * Nq * D, Nq * D, D, Hq * Nq, Nq};
    const float scale = 0.125f;
    const int tt = Nk > 1024 && (left + right + 1) > 1024 ? 4 : 1;
    qkv_attn_fwd(isa, dt, tt, q, k, v, o, lse, dims, strides, left, right, scale, nth);   /* lse for bwd */
    double *t = malloc(sizeof(double) * reps), *u = malloc(sizeof(double) * reps);
    for (int r = 0; r < reps + 1; r++) {
        double t0 = clk(CLOCK_MONOTONIC), u0 = clk(CLOCK_PROCESS_CPUTIME_ID);
        int rc;
        if (!strcmp(mode, "fwd")) rc = qkv_attn_fwd(isa, dt, tt, q, k, v, o, lse, dims, strides, left, right, scale, nth);
        else if (!strcmp(mode, "dec")) rc = qkv_attn_decode(isa, dt, q, k, v, o, lse, dims, strides, left, right, scale, nth);
        else {
            memset(dk, 0, sizeof(float) * parts * B * Hk * Nk * D), memset(dv, 0, sizeof(float) * parts * B * Hk * Nk * D);
            rc = qkv_attn_bwd(isa, dt, q, k, v, g, lse, delta, dq, dk, dv, dims, strides, left, right, scale, nth);
        }
        if (rc) {
            fprintf(stderr, "rc %d\n", rc);
            return 1;
        }
        if (r) t[r - 1] = (clk(CLOCK_MONOTONIC) - t0) * 1e3, u[r - 1] = (clk(CLOCK_PROCESS_CPUTIME_ID) - u0) * 1e3;
    }
    qsort(t, reps, sizeof(double), cmp);
    qsort(u, reps, sizeof(double), cmp);
    printf("%s %s %s N=%lld/%lld D=%lld %dt: wall median %.2f ms (min %.2f, max %.2f); cpu median %.2f (min %.2f)\n",
           mode, isaname, argv[3], (long long)Nq, (long long)Nk, (long long)D, nth, t[reps / 2], t[0], t[reps - 1],
           u[reps / 2], u[0]);
    return 0;
}
