/* The reference of tests/csrc/test_attn_cpu.c, in the floating type REAL (every operation rounds to it), named
 * REF_NAME: out (B, Hq, Nq, Dv), lse (B, Hq, Nq) and, when dq is given, dq (B, Hq, Nq, D), dk, dv (B, Hk, Nk, ·)
 * for the output gradient dout (B, Hq, Nq, Dv), all contiguous, in double. q, k, v: strides of the call. */
static void REF_NAME(const call_t *c, const float *q, const float *k, const float *v, const float *dout,
                     double *out_, double *lse, double *dq_, double *dk_, double *dv_) {
    const shape_t *s = c->s;
    const int G = s->Hq / s->Hk;
    const int64_t nq = (int64_t)s->B * s->Hq * s->Nq, nk = (int64_t)s->B * s->Hk * s->Nk;
    const REAL scale = (REAL)c->scale;
    REAL *p = malloc(sizeof(REAL) * s->Nk), *ds = malloc(sizeof(REAL) * s->Nk), *o = malloc(sizeof(REAL) * s->Dv);
    REAL *dq = NULL, *dk = NULL, *dv = NULL;
    if (dq_) {
        dq = calloc((size_t)(nq * s->D), sizeof(REAL));
        dk = calloc((size_t)(nk * s->D), sizeof(REAL));
        dv = calloc((size_t)(nk * s->Dv), sizeof(REAL));
    }
    for (int b = 0; b < s->B; b++)
        for (int h = 0; h < s->Hq; h++)
            for (int i = 0; i < s->Nq; i++) {
                const int hk = h / G;
                const float *qi = q + b * c->qs[0] + h * c->qs[1] + i * c->qs[2];
                const int64_t row = ((int64_t)b * s->Hq + h) * s->Nq + i;
                int ja = 0, jb = s->Nk;                  /* the row's keys are [ja, jb) */
                while (ja < jb && !visible(c, i, ja)) ja++;
                while (jb > ja && !visible(c, i, jb - 1)) jb--;
                REAL m = -INFINITY, l = 0;
                for (int j = ja; j < jb; j++) {
                    const float *kj = k + b * c->ks[0] + hk * c->ks[1] + j * c->ks[2];
                    REAL x = 0;
                    for (int d = 0; d < s->D; d++) x += (REAL)qi[d] * (REAL)kj[d];
                    p[j] = x * scale;
                    m = p[j] > m ? p[j] : m;
                }
                for (int j = ja; j < jb; j++) l += p[j] = (REAL)exp((REAL)(p[j] - m));
                for (int j = ja; j < jb; j++) p[j] /= l;
                lse[row] = jb > ja ? (double)(REAL)(m + (REAL)log(l)) : -INFINITY;
                for (int e = 0; e < s->Dv; e++) {
                    REAL x = 0;
                    for (int j = ja; j < jb; j++) x += p[j] * (REAL)v[b * c->vs[0] + hk * c->vs[1] + j * c->vs[2] + e];
                    out_[row * s->Dv + e] = o[e] = x;
                }
                if (!dq_) continue;
                const float *g = dout + row * s->Dv;
                REAL delta = 0;
                for (int e = 0; e < s->Dv; e++) delta += (REAL)g[e] * o[e];
                for (int j = ja; j < jb; j++) {
                    const float *vj = v + b * c->vs[0] + hk * c->vs[1] + j * c->vs[2];
                    REAL x = 0;
                    for (int e = 0; e < s->Dv; e++) x += (REAL)g[e] * (REAL)vj[e];
                    ds[j] = p[j] * (x - delta) * scale;
                }
                for (int j = ja; j < jb; j++) {
                    const float *kj = k + b * c->ks[0] + hk * c->ks[1] + j * c->ks[2];
                    REAL *dkj = dk + (((int64_t)b * s->Hk + hk) * s->Nk + j) * s->D;
                    REAL *dvj = dv + (((int64_t)b * s->Hk + hk) * s->Nk + j) * s->Dv;
                    for (int d = 0; d < s->D; d++) {
                        dq[row * s->D + d] += ds[j] * (REAL)kj[d];
                        dkj[d] += ds[j] * (REAL)qi[d];
                    }
                    for (int e = 0; e < s->Dv; e++) dvj[e] += p[j] * (REAL)g[e];
                }
            }
    if (dq_) {
        for (int64_t i = 0; i < nq * s->D; i++) dq_[i] = dq[i];
        for (int64_t i = 0; i < nk * s->D; i++) dk_[i] = dk[i];
        for (int64_t i = 0; i < nk * s->Dv; i++) dv_[i] = dv[i];
    }
    free(p), free(ds), free(o), free(dq), free(dk), free(dv);
}
