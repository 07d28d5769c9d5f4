"""Triton kernels of the linear-attention family's chunked forms (forward), for CUDA tensors.

Three kernels; chunks of ``BT`` tokens; ``b_r`` the cumulative log-decay from the chunk's start (inclusive),
recomputed in each kernel from the per-token log-decays (a masked ``BT×BT`` sum: no scan, no buffer):

* ``_wy_kernel`` (delta rule only; grid ``(chunks, B·H)``): ``A = strictly_lower(β_r·(k_r·k_s)·e^{b_r − b_s})``,
  ``T = (I + A)⁻¹`` by forward substitution row by row inside the chunk (registers only), then
  ``W = T·(β∘e^b∘K)`` and ``U = T·(β∘V)``, written in fp32.
* ``_state_kernel`` (grid ``(Dv blocks, B·H)``): the only sequential part, chunk by chunk; writes the state at
  each chunk's start. Delta rule: ``u = U − W·S`` (written over U: the corrected values), linear attention:
  ``u = V``; then ``S ← e^{b_last}·S + (K∘e^{b_last − b})ᵀ·u``.
* ``_out_kernel`` (grid ``(chunks, Dv blocks, B·H)``): ``o = ((Q·Kᵀ)∘E)·u + (Q∘e^b)·S_c`` with ``E_rs =
  e^{b_r − b_s}`` for ``s ≤ r`` (0 above).

Queries and keys are read where they lie (any strides, key head ``h // REP`` for value head h), in their dtype,
and prepared per row inside the kernels: the feature map of linear attention (elu + 1, relu, identity), the l2
normalisation of the delta rule (a per-row factor applied after the products), ``scale``. Every product
accumulates in fp32; fp32 inputs take exact fp32 products (``ieee``), 16-bit inputs tf32 on the fp32 operands.

This file is executed twice by :func:`qkv.linear._triton.kernels`: compiled (GPUs, ``qkv kernels``) and for
Triton's interpreter (``TRITON_INTERPRET=1``: CPU tensors), selected by the global ``_INTERPRET`` — the same
scheme, for the same reasons, as the exact-attention kernels (``qkv/engines/triton/kernels.py``).
"""
import triton.language as tl

_INTERPRET = globals().get("_INTERPRET", False)
if _INTERPRET:
    from triton.runtime.interpreter import InterpretedFunction

    class _jit(InterpretedFunction):
        """An interpreted kernel or helper; a helper runs inside its kernel's launch (which has already switched
        triton.language to the interpreter), so it does not switch it again."""

        def __call__(self, *args, **kwargs):
            return self.rewrite()(*args, **kwargs)
else:
    from triton.runtime.jit import JITFunction as _jit
# No @triton.jit function of Triton's library (tl.sum, tl.cumsum, ...): they are compiled or interpreted depending
# on TRITON_INTERPRET when triton was imported, and either kind breaks the other mode.
if _INTERPRET:
    _SUM = tl.standard._sum_combine
else:
    @_jit
    def _SUM(a, b):
        return a + b
# The interpreter holds bfloat16 as raw uint16 in numpy: there, products are taken in fp64 (see _dot).
_UPCAST = tl.constexpr(_INTERPRET)


@_jit
def _dot(a, b, acc, PREC: tl.constexpr):
    if _UPCAST:
        c = tl.dot(a.to(tl.float64), b.to(tl.float64), input_precision="ieee").to(tl.float32)
        return c if acc is None else acc + c
    return tl.dot(a, b, acc, input_precision=PREC)


@_jit
def _rsum(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _SUM)


@_jit
def _fmap(x, FMAP: tl.constexpr):
    """The feature map on fp32 x: 0 identity, 1 elu(x) + 1, 2 relu."""
    if FMAP == 1:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FMAP == 2:
        return tl.maximum(x, 0.0)
    else:
        return x


@_jit
def _chunk_decay(Gb, sgn, t0, N, BT: tl.constexpr):
    """(b, b_last): the chunk's cumulative log-decays b (BT,) from its start (0 past N) and b at its last token."""
    r = tl.arange(0, BT)
    g = tl.load(Gb + (t0 + r).to(tl.int64) * sgn, mask=t0 + r < N, other=0.0).to(tl.float32)
    b = _rsum(tl.where(r[None, :] <= r[:, None], g[None, :], 0.0), 1)
    return b, _rsum(g, 0)


@_jit
def _load_rows(Xb, sxn, sxd, t0, N, d0, D, BT: tl.constexpr, BD: tl.constexpr):
    """Rows [t0, t0 + BT) and columns [d0, d0 + BD) of a (N, D) matrix as fp32, 0 outside."""
    r = t0 + tl.arange(0, BT)
    c = d0 + tl.arange(0, BD)
    x = tl.load(Xb + r[:, None].to(tl.int64) * sxn + c[None, :] * sxd, mask=(r[:, None] < N) & (c[None, :] < D),
                other=0.0)
    return x.to(tl.float32)


@_jit
def _load_feat(Xb, sxn, sxd, t0, N, d0, D, BT: tl.constexpr, BD: tl.constexpr, FMAP: tl.constexpr):
    """Like _load_rows, with the feature map applied (0 outside: φ(0) need not be 0)."""
    x = _load_rows(Xb, sxn, sxd, t0, N, d0, D, BT, BD)
    if FMAP != 0:
        r = t0 + tl.arange(0, BT)
        c = d0 + tl.arange(0, BD)
        x = tl.where((r[:, None] < N) & (c[None, :] < D), _fmap(x, FMAP), 0.0)
    return x


@_jit
def _load_v(Vb, svn, svd, t0, N, v0, Dv, BT: tl.constexpr, BV: tl.constexpr, ONES: tl.constexpr):
    """V's block, with a virtual last column of ones at index Dv when ONES (the normaliser's)."""
    v = _load_rows(Vb, svn, svd, t0, N, v0, Dv, BT, BV)
    if ONES:
        r = t0 + tl.arange(0, BT)
        c = v0 + tl.arange(0, BV)
        v = tl.where((c[None, :] == Dv) & (r[:, None] < N), 1.0, v)
    return v


# ------------------------------------------------------------------------------------------------ delta rule

@_jit
def _wy_kernel(K, V, Beta, G, W, U,
               skb, skh, skn, skd, svb, svh, svn, svd, sbb, sbh, sbn, sgb, sgh, sgn,
               H, REP, N, D, Dv,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, GATED: tl.constexpr, L2: tl.constexpr,
               PREC: tl.constexpr):
    """Per chunk: T = (I + A)⁻¹, W = T·(β∘e^b∘K̂), U = T·(β∘V) (K̂: the l2-normalised keys when L2)."""
    ic = tl.program_id(0)
    ibh = tl.program_id(1)
    b = ibh // H
    h = ibh % H
    t0 = ic * BT
    r = tl.arange(0, BT)
    rows = t0 + r
    Kb = K + b.to(tl.int64) * skb + (h // REP).to(tl.int64) * skh
    Vb = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    beta = tl.load(Beta + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh + rows.to(tl.int64) * sbn, mask=rows < N,
                   other=0.0).to(tl.float32)
    # K·Kᵀ over blocks of D (and the rows' squared norms)
    A = tl.full((BT, BT), 0.0, tl.float32)
    ss = tl.full((BT,), 0.0, tl.float32)
    for d0 in range(0, D, BK):
        k = _load_rows(Kb, skn, skd, t0, N, d0, D, BT, BK)
        A = _dot(k, tl.trans(k), A, PREC)
        if L2:
            ss += _rsum(k * k, 1)
    rk = tl.rsqrt(ss + 1e-6)
    if L2:
        A = A * rk[:, None] * rk[None, :]
    strict = r[:, None] > r[None, :]
    fx = beta
    if GATED:
        bb, _ = _chunk_decay(G + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh, sgn, t0, N, BT)
        A = A * tl.exp(tl.where(strict, bb[:, None] - bb[None, :], 0.0))
        fx = beta * tl.exp(bb)
    A = tl.where(strict, A * beta[:, None], 0.0)
    # M = T − I by forward substitution: row i of M = a + Σ_j a_j·M_j with a = −A_i (rows j < i final; a_j = 0
    # for j ≥ i). Every step is a masked reduction over the chunk's rows: registers only.
    M = -A
    for i in range(1, BT):
        sel = r[:, None] == i
        a = _rsum(tl.where(sel, M, 0.0), 0)
        a = a + _rsum(a[:, None] * M, 0)
        M = tl.where(sel, a[None, :], M)
    T = tl.where(r[:, None] == r[None, :], 1.0, M)
    Wb = W + ibh.to(tl.int64) * N * D
    for d0 in range(0, D, BK):
        k = _load_rows(Kb, skn, skd, t0, N, d0, D, BT, BK)
        if L2:
            k = k * rk[:, None]
        w = _dot(T, k * fx[:, None], None, PREC)
        c = d0 + tl.arange(0, BK)
        tl.store(Wb + rows[:, None].to(tl.int64) * D + c[None, :], w, mask=(rows[:, None] < N) & (c[None, :] < D))
    Ub = U + ibh.to(tl.int64) * N * Dv
    for v0 in range(0, Dv, BV):
        v = _load_rows(Vb, svn, svd, t0, N, v0, Dv, BT, BV)
        u = _dot(T, v * beta[:, None], None, PREC)
        c = v0 + tl.arange(0, BV)
        tl.store(Ub + rows[:, None].to(tl.int64) * Dv + c[None, :], u, mask=(rows[:, None] < N) & (c[None, :] < Dv))


# ------------------------------------------------------------------------------------------------ shared

@_jit
def _state_kernel(K, V, W, U, G, S0, Hs, Sout,
                  skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn,
                  H, REP, N, D, Dv, NC,
                  BT: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, FMAP: tl.constexpr,
                  GATED: tl.constexpr, L2: tl.constexpr, DELTA: tl.constexpr, ONES: tl.constexpr,
                  HAS_S0: tl.constexpr, PREC: tl.constexpr):
    """The scan over chunks for one block of BV state columns of one head: writes the state at every chunk's start
    into Hs (B·H, NC, D, Dv), the corrected values over U (DELTA), and the final state into Sout (B·H, D, Dv).
    Dv counts the virtual column of ones when ONES. States are fp32. A chunk is taken BS rows at a time (every row
    reads the state at the chunk's start; their contributions are summed, then added): fewer registers."""
    iv = tl.program_id(0)
    ibh = tl.program_id(1)
    b = ibh // H
    h = ibh % H
    v0 = iv * BV
    dd = tl.arange(0, BD)
    cv = v0 + tl.arange(0, BV)
    smask = (dd[:, None] < D) & (cv[None, :] < Dv)
    soff = dd[:, None].to(tl.int64) * Dv + cv[None, :]
    if HAS_S0:
        S = tl.load(S0 + ibh.to(tl.int64) * D * Dv + soff, mask=smask, other=0.0)
    else:
        S = tl.full((BD, BV), 0.0, tl.float32)
    Kb = K + b.to(tl.int64) * skb + (h // REP).to(tl.int64) * skh
    Vb = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    Gb = G + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh
    Wb = W + ibh.to(tl.int64) * N * D
    Ub = U + ibh.to(tl.int64) * N * Dv
    Hb = Hs + ibh.to(tl.int64) * NC * D * Dv
    rc = tl.arange(0, BT)
    rs = tl.arange(0, BS)
    for ic in range(0, NC):
        t0 = ic * BT
        tl.store(Hb + ic * (D * Dv) + soff, S, mask=smask)
        if GATED:
            gc = tl.load(Gb + (t0 + rc).to(tl.int64) * sgn, mask=t0 + rc < N, other=0.0).to(tl.float32)
            bl = _rsum(gc, 0)
        dS = tl.full((BD, BV), 0.0, tl.float32)
        for j in range(0, BT, BS):
            r0 = t0 + j
            rows = r0 + rs
            k = _load_feat(Kb, skn, skd, r0, N, 0, D, BS, BD, FMAP)
            if L2:
                k = k * tl.rsqrt(_rsum(k * k, 1) + 1e-6)[:, None]
            if DELTA:
                w = _load_rows(Wb, D, 1, r0, N, 0, D, BS, BD)
                u = _load_rows(Ub, Dv, 1, r0, N, v0, Dv, BS, BV)
                u = u - _dot(w, S, None, PREC)
                tl.store(Ub + rows[:, None].to(tl.int64) * Dv + cv[None, :], u,
                         mask=(rows[:, None] < N) & (cv[None, :] < Dv))
            else:
                u = _load_v(Vb, svn, svd, r0, N, v0, Dv - ONES, BS, BV, ONES)
            if GATED:
                # e^{b_last − b_r} = e^{Σ g_s over the chunk's tokens s after r}
                after = _rsum(tl.where(rc[None, :] > (j + rs)[:, None], gc[None, :], 0.0), 1)
                k = k * tl.exp(after)[:, None]
            dS = _dot(tl.trans(k), u, dS, PREC)
        if GATED:
            S = S * tl.exp(bl)
        S += dS
    tl.store(Sout + ibh.to(tl.int64) * D * Dv + soff, S, mask=smask)


@_jit
def _out_kernel(Q, K, V, U, G, Hs, O,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn,
                sob, soh, son, sod,
                H, REP, N, D, Dv, NC, scale,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FMAP: tl.constexpr, GATED: tl.constexpr,
                L2: tl.constexpr, DELTA: tl.constexpr, ONES: tl.constexpr, PREC: tl.constexpr):
    """o = scale·(((Q·Kᵀ)∘E)·u + (Q∘e^b)·S_c) for one chunk and one block of BV output columns."""
    ic = tl.program_id(0)
    iv = tl.program_id(1)
    ibh = tl.program_id(2)
    b = ibh // H
    h = ibh % H
    t0 = ic * BT
    v0 = iv * BV
    r = tl.arange(0, BT)
    rows = t0 + r
    cv = v0 + tl.arange(0, BV)
    Qb = Q + b.to(tl.int64) * sqb + (h // REP).to(tl.int64) * sqh
    Kb = K + b.to(tl.int64) * skb + (h // REP).to(tl.int64) * skh
    Hb = Hs + (ibh.to(tl.int64) * NC + ic) * D * Dv
    P = tl.full((BT, BT), 0.0, tl.float32)
    o = tl.full((BT, BV), 0.0, tl.float32)
    sq = tl.full((BT,), 0.0, tl.float32)
    sk = tl.full((BT,), 0.0, tl.float32)
    for d0 in range(0, D, BK):
        q = _load_feat(Qb, sqn, sqd, t0, N, d0, D, BT, BK, FMAP)
        k = _load_feat(Kb, skn, skd, t0, N, d0, D, BT, BK, FMAP)
        cd = d0 + tl.arange(0, BK)
        s = tl.load(Hb + cd[:, None].to(tl.int64) * Dv + cv[None, :], mask=(cd[:, None] < D) & (cv[None, :] < Dv),
                    other=0.0)
        P = _dot(q, tl.trans(k), P, PREC)
        o = _dot(q, s, o, PREC)
        if L2:
            sq += _rsum(q * q, 1)
            sk += _rsum(k * k, 1)
    fq = tl.full((BT,), 0.0, tl.float32) + scale
    if L2:
        fq = fq * tl.rsqrt(sq + 1e-6)
        P = P * tl.rsqrt(sk + 1e-6)[None, :]
    causal = r[:, None] >= r[None, :]
    if GATED:
        bb, _ = _chunk_decay(G + b.to(tl.int64) * sgb + h.to(tl.int64) * sgh, sgn, t0, N, BT)
        P = P * tl.exp(tl.where(causal, bb[:, None] - bb[None, :], 0.0))
        o = o * tl.exp(bb)[:, None]
    P = tl.where(causal, P, 0.0)
    if DELTA:
        u = _load_rows(U + ibh.to(tl.int64) * N * Dv, Dv, 1, t0, N, v0, Dv, BT, BV)
    else:
        u = _load_v(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh, svn, svd, t0, N, v0, Dv - ONES, BT, BV, ONES)
    o = _dot(P, u, o, PREC) * fq[:, None]
    Ob = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    tl.store(Ob + rows[:, None].to(tl.int64) * son + cv[None, :] * sod, o.to(O.dtype.element_ty),
             mask=(rows[:, None] < N) & (cv[None, :] < Dv))
