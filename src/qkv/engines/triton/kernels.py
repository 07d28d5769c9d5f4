"""The Triton kernels of the triton engine (forward, backward, split-KV decoding), FlashAttention-2's algorithm.

Conventions shared by every kernel:

* Scores are kept in base 2: ``s2 = log2(e) · s`` so that the softmax uses ``exp2`` (one MUFU op); the scale
  ``scale · log2(e)`` is folded into the QKᵀ product, and the natural-log LSE is ``ln(2) · (m + log2 l)``.
* Score mods follow DESIGN §2 in order: softcap ``c·tanh(s/c)``, ALiBi ``−slope·|i + off − j|``, bias.
* Visibility: ``lo_off <= j − i <= hi_off`` (causal and windows, bottom-right aligned by the caller), keys
  ``j < kv_end`` (padding: per batch), same document id (``QId``/``KId``: int32 per position) and, for any
  other mask, one bit per element of the *partial* mask tiles (``Bits``: int32 words, ``slot`` = which tile,
  ``-1`` = none). A tile that the host marked *full* runs with none of these tests (``MASKED=False``).
* Rows with no visible key: ``m = −inf`` is replaced by 0 before subtracting (no ``−inf − −inf``), so they
  end with ``l = 0`` -> out 0, lse −inf; the backward reads ``lse = +inf`` for them -> p = 0 -> gradients 0.
* Dropout: the counter-based keep-mask of ``qkv._hash.uniform(seed, b, h, i, j) >= p``, the lowbias32 hash
  recomputed bit for bit with uint32 arithmetic (wrap-around multiplication is the mod 2**32 of the host's).

This file is executed twice by :mod:`.load`: once as compiled kernels (for GPUs) and once for Triton's
interpreter (``TRITON_INTERPRET=1``: CPU tensors, numpy), selected by the global ``_INTERPRET``.
"""
import triton.language as tl

# Set by .load before this file runs. JITFunction, not triton.jit: with TRITON_INTERPRET=1 in the environment
# triton.jit would hand back interpreted kernels, and the compiled copy must stay compilable for `qkv kernels`.
_INTERPRET = globals().get("_INTERPRET", False)
if _INTERPRET:
    from triton.runtime.interpreter import InterpretedFunction

    class _jit(InterpretedFunction):
        """An interpreted kernel or helper. A helper runs inside a kernel's launch, which has already switched
        triton.language to the interpreter (and switches it back when the launch ends); the base class would
        switch it again on every helper call, at a large cost, and never switch those changes back, leaving
        triton.language unusable for compiling kernels later in the process."""

        def __call__(self, *args, **kwargs):
            return self.rewrite()(*args, **kwargs)
else:
    from triton.runtime.jit import JITFunction as _jit
# Reductions through tl.reduce (what tl.max / tl.sum do) and no @triton.jit function of Triton's library: those
# are compiled or interpreted depending on TRITON_INTERPRET when triton was imported, and either kind breaks the
# other mode. The interpreter recognises Triton's own combine functions and reduces with numpy.
if _INTERPRET:
    _MAX = tl.standard._elementwise_max
    _SUM = tl.standard._sum_combine
else:                           # the same combines, as this module's own JITFunctions (Triton's may be interpreted)
    @_jit
    def _MAX(a, b):
        return tl.maximum(a, b)

    @_jit
    def _SUM(a, b):
        return a + b
# The interpreter holds bfloat16 as raw uint16 in numpy and its dot would multiply those: there, products are
# taken in fp64 (see _dot).
_UPCAST = tl.constexpr(_INTERPRET)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
GOLDEN = 0x9E3779B9


# ------------------------------------------------------------------------------------------------ helpers

@_jit
def _hash32(x):
    """lowbias32 of a uint32 tensor (qkv._hash.hash32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@_jit
def _seed_hash(seed, b, h):
    """The hash state after (seed, b, h): the first three steps of qkv._hash.uniform, one scalar per program."""
    s = _hash32(tl.cast(seed, tl.uint32))
    s = _hash32(s ^ _hash32(b.to(tl.uint32) + 0x9E3779B9))
    return _hash32(s ^ _hash32(h.to(tl.uint32) + 0x9E3779B9))


@_jit
def _keep(hh, qi, kj, dropout_p):
    """Keep-mask of broadcast row indices qi and key indices kj: uniform(seed, b, h, i, j) >= p."""
    hq = _hash32(hh ^ _hash32(qi.to(tl.uint32) + 0x9E3779B9))
    x = _hash32(hq ^ _hash32(kj.to(tl.uint32) + 0x9E3779B9))
    u = (x >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return u >= dropout_p


@_jit
def _dot(a, b, acc, PREC: tl.constexpr):
    if _UPCAST:
        # numpy's float32 matmul (BLAS) sums in an order that depends on the operands' layout, so the backward's
        # transposed recomputation of the scores would differ from the forward's by a few ulps (a GPU's ordered
        # FMA chain does not): products in fp64 rounded once to fp32 are layout-independent.
        c = tl.dot(a.to(tl.float64), b.to(tl.float64), input_precision="ieee").to(tl.float32)
        return c if acc is None else acc + c
    return tl.dot(a, b, acc, input_precision=PREC)


@_jit
def _tanh(x):
    e = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@_jit
def _scores(qk, qi, kj, off, scale, softcap, slope, Biasb, sbm, sbn, Nq, Nk,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr):
    """Final scores in base 2 from the raw dot products qk (fp32), with qi/kj broadcast index tensors of any
    orientation. Also returns tanh(s/c) (the softcap's backward needs it; qk itself when there is no cap)."""
    if SOFTCAP:
        t = _tanh(qk * (scale / softcap))
        s = t * (softcap * 1.4426950408889634)
    else:
        t = qk
        s = qk * (scale * 1.4426950408889634)
    if ALIBI:
        s -= (slope * 1.4426950408889634) * tl.abs(qi + off - kj).to(tl.float32)
    if BIAS:
        bias = tl.load(Biasb + qi.to(tl.int64) * sbm + kj * sbn, mask=(qi < Nq) & (kj < Nk), other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    return s, t


@_jit
def _visible(qi, kj, kv_end, lo_off, hi_off, qid, KIdb, Bits, slot, m0, n0,
             W: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, DOC: tl.constexpr,
             BITS: tl.constexpr):
    """Per-element visibility of a masked tile; qi/kj broadcast index tensors (either orientation), qid the
    rows' document ids broadcast like qi, (m0, n0) the corner of the mask tile the bits describe."""
    ok = kj < kv_end
    if HAS_LO:
        ok = ok & (kj >= qi + lo_off)
    if HAS_HI:
        ok = ok & (kj <= qi + hi_off)
    if DOC:
        kid = tl.load(KIdb + kj, mask=kj < kv_end, other=-2)
        ok = ok & (qid == kid)
    if BITS:
        c = kj - n0
        r = qi - m0
        # (the interpreter wants a mask of the pointers' shape: slot broadcast through the indices)
        word = tl.load(Bits + r * W + (c >> 5), mask=(r * 0 + c * 0 + slot) >= 0, other=-1)
        ok = ok & (((word >> (c & 31)) & 1) != 0)
    return ok


# ------------------------------------------------------------------------------------------------ forward

@_jit
def _fwd_tile(acc, l_i, m_i, q, Kb, Vb, n0, offs_m, offs_n, offs_d, offs_dv, skn, skd, svn, svd, D, Dv,
              Nq, Nk, kv_end, off, scale, softcap, slope, Biasb, sbm, sbn, lo_off, hi_off, qid, KIdb,
              Bitsb, slot, m0t, n0t, hh, dropout_p, qb, kb,
              MASKED: tl.constexpr, W: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
              SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr, DOC: tl.constexpr,
              BITS: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr,
              EVEN_DV: tl.constexpr, EXACT: tl.constexpr = False):
    kj = n0 + offs_n
    kt_ptrs = Kb + kj[None, :] * skn + offs_d[:, None] * skd
    v_ptrs = Vb + kj[:, None] * svn + offs_dv[None, :] * svd
    if MASKED:
        kt = tl.load(kt_ptrs, mask=(kj[None, :] < Nk) & (offs_d[:, None] < D), other=0.0)
    elif EVEN_D:
        kt = tl.load(kt_ptrs)
    else:
        kt = tl.load(kt_ptrs, mask=offs_d[:, None] < D, other=0.0)
    qk = _dot(q, kt, None, DOT_PREC)
    qi = offs_m[:, None]
    kk = kj[None, :]
    s, t = _scores(qk, qi, kk, off, scale, softcap, slope, Biasb, sbm, sbn, Nq, Nk, SOFTCAP, ALIBI, BIAS)
    if MASKED:
        vis = _visible(qi, kk, kv_end, lo_off, hi_off, qid[:, None], KIdb, Bitsb, slot, m0t, n0t,
                       W, HAS_LO, HAS_HI, DOC, BITS)
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
    m_use = tl.where(m_new * 0.0 == 0.0, m_new, 0.0)    # -inf (nothing seen), +inf or NaN: shift by 0 (the oracle's)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
    if DROPOUT:
        keep = _keep(hh, qi + qb, kk + kb, dropout_p)
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    if MASKED:
        v = tl.load(v_ptrs, mask=(kj[:, None] < Nk) & (offs_dv[None, :] < Dv), other=0.0)
    elif EVEN_DV:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=offs_dv[None, :] < Dv, other=0.0)
    acc = acc * alpha[:, None]
    if EXACT:
        acc = _exact_pv(acc, p, v, DOT_PREC)
    else:
        acc = _dot(p.to(v.dtype), v, acc, DOT_PREC)
    return acc, l_i, m_new


@_jit
def _exact_pv(acc, p, v, DOT_PREC: tl.constexpr):
    """acc + p·v in which a zero probability contributes nothing, even against a NaN or infinite value (the plain
    product makes 0·NaN = NaN there): the finite values through one product; then one product of 0/1 (p != 0)
    with a code per value (NaN 1, +inf 128, -inf 16384: exact in every input dtype, and exact counts in the fp32
    sum while a tile has fewer than 128 keys) says per output element whether a key it sees holds NaN, +inf or
    -inf in that column."""
    tl.static_assert(v.shape[0] < 128)
    fin = v * 0.0 == 0.0
    acc = _dot(p.to(v.dtype), tl.where(fin, v, 0.0).to(v.dtype), acc, DOT_PREC)
    code = tl.where(fin, 0.0, tl.where(v != v, 1.0, tl.where(v > 0.0, 128.0, 16384.0))).to(v.dtype)
    c = _dot(tl.where(p != 0.0, 1.0, 0.0).to(v.dtype), code, None, DOT_PREC)
    n_minus = tl.floor(c * (1.0 / 16384.0))
    c = c - n_minus * 16384.0
    n_plus = tl.floor(c * (1.0 / 128.0))
    n_nan = c - n_plus * 128.0
    fix = tl.where((n_nan > 0.0) | ((n_plus > 0.0) & (n_minus > 0.0)), float("nan"),
                   tl.where(n_plus > 0.0, float("inf"), tl.where(n_minus > 0.0, float("-inf"), 0.0)))
    return acc + fix


@_jit
def _any_nan(acc):
    """Whether a 2-D fp32 tile holds a NaN (as an int32 scalar)."""
    return tl.reduce(tl.reduce(tl.where(acc != acc, 1, 0), 1, _MAX), 0, _MAX)


@_jit
def _fwd_kernel(Q, K, V, O, LSE, L, NS,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                Bias, sbb, sbh, sbm, sbn, Alibi, sab, sah,
                QId, KId, sqib, skib, KvLen, QLen,
                FullNum, FullIdx, PartNum, PartIdx, PartSlot, Order, Bits, lst_b, lst_h, lst_cols,
                Hq, G, Nq, Nk, D, Dv, off, num_m, scale, softcap, lo_off, hi_off, dropout_p, seed, q_base, k_base,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                TILE_M: tl.constexpr, TILE_N: tl.constexpr, W: tl.constexpr,
                HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                BIAS: tl.constexpr, DOC: tl.constexpr, KVLEN: tl.constexpr, QLEN: tl.constexpr,
                LISTS: tl.constexpr, BITS: tl.constexpr, DROPOUT: tl.constexpr, REVERSE: tl.constexpr,
                DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, STAGES: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, query head). Grid (num_m, B·Hq)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)      # 64-bit offsets: a (B, H, N, N) bias passes 2**31 elements
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // G
    if LISTS:
        mblk = tl.load(Order + pid)            # query blocks with the most tiles first
    elif REVERSE:
        mblk = num_m - 1 - pid                 # causal: the last rows see the most keys: start them first
    else:
        mblk = pid
    m0 = mblk * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    Biasb = Bias + b * sbb + h * sbh
    kv_end = Nk
    if KVLEN:
        kv_end = tl.minimum(tl.load(KvLen + b), Nk)
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + b * sab + h * sah)
    qid = offs_m
    KIdb = KId + b * skib
    if DOC:
        qid = tl.load(QId + b * sqib + offs_m, mask=offs_m < Nq, other=-1)
    hh = 0
    if DROPOUT:
        hh = _seed_hash(seed, b, h)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0, tl.float32)
    if LISTS:
        row = b * lst_b + h * lst_h + m0 // TILE_M
        m0t = (m0 // TILE_M) * TILE_M
        nfull = tl.load(FullNum + row)
        for t in tl.range(0, nfull * (TILE_N // BLOCK_N), num_stages=STAGES):
            n0t = tl.load(FullIdx + row * lst_cols + t // (TILE_N // BLOCK_N)) * TILE_N
            n0 = n0t + (t % (TILE_N // BLOCK_N)) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, Kb, Vb, n0, offs_m, offs_n, offs_d, offs_dv, skn, skd,
                svn, svd, D, Dv, Nq, Nk, kv_end, off, scale, softcap, slope, Biasb, sbm, sbn, lo_off,
                hi_off, qid, KIdb, Bits, -1, m0t, n0t, hh, dropout_p, q_base, k_base,
                False, W, HAS_LO, HAS_HI, SOFTCAP, ALIBI, BIAS, DOC, BITS, DROPOUT, DOT_PREC, EVEN_D,
                EVEN_DV)
        npart = tl.load(PartNum + row)
        for t in tl.range(0, npart * (TILE_N // BLOCK_N)):
            n0t = tl.load(PartIdx + row * lst_cols + t // (TILE_N // BLOCK_N)) * TILE_N
            slot = tl.load(PartSlot + row * lst_cols + t // (TILE_N // BLOCK_N))
            Bitsb = Bits + slot.to(tl.int64) * (TILE_M * W)
            n0 = n0t + (t % (TILE_N // BLOCK_N)) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, Kb, Vb, n0, offs_m, offs_n, offs_d, offs_dv, skn, skd,
                svn, svd, D, Dv, Nq, Nk, kv_end, off, scale, softcap, slope, Biasb, sbm, sbn, lo_off,
                hi_off, qid, KIdb, Bitsb, slot, m0t, n0t, hh, dropout_p, q_base, k_base,
                True, W, HAS_LO, HAS_HI, SOFTCAP, ALIBI, BIAS, DOC, BITS, DROPOUT, DOT_PREC, EVEN_D,
                EVEN_DV)
    else:
        # Key range of the block's rows, split into the keys every row sees (no per-element test) and the
        # masked edges around them (the causal diagonal, window edges, the last partial block).
        last = tl.minimum(m0 + BLOCK_M, Nq) - 1
        lo = 0
        hi = kv_end
        full_lo = 0
        full_hi = kv_end
        if HAS_LO:
            lo = tl.maximum(m0 + lo_off, 0)
            full_lo = tl.maximum(last + lo_off, 0)
        if HAS_HI:
            hi = tl.minimum(last + hi_off + 1, kv_end)
            full_hi = tl.minimum(m0 + hi_off + 1, kv_end)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.maximum(hi, lo)
        c1 = tl.minimum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, hi)
        c2 = tl.maximum(tl.minimum((full_hi // BLOCK_N) * BLOCK_N, hi), c1)
        for n0 in tl.range(c1, c2, BLOCK_N, num_stages=STAGES):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, Kb, Vb, n0, offs_m, offs_n, offs_d, offs_dv, skn, skd, svn, svd, D, Dv,
                Nq, Nk, kv_end, off, scale, softcap, slope, Biasb, sbm, sbn, lo_off, hi_off, qid, KIdb,
                Bits, -1, m0, n0, hh, dropout_p, q_base, k_base,
                False, W, HAS_LO, HAS_HI, SOFTCAP, ALIBI, BIAS, False, False, DROPOUT, DOT_PREC, EVEN_D,
                EVEN_DV)
        # the masked blocks: before the unmasked range (window edge), then after it (the diagonal)
        nf = (c1 - lo + BLOCK_N - 1) // BLOCK_N
        nb = (hi - c2 + BLOCK_N - 1) // BLOCK_N
        for t in tl.range(0, nf + nb):
            n0 = tl.where(t < nf, lo + t * BLOCK_N, c2 + (t - nf) * BLOCK_N)
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, Kb, Vb, n0, offs_m, offs_n, offs_d, offs_dv, skn, skd, svn, svd, D, Dv,
                Nq, Nk, kv_end, off, scale, softcap, slope, Biasb, sbm, sbn, lo_off, hi_off, qid, KIdb,
                Bits, -1, m0, n0, hh, dropout_p, q_base, k_base,
                True, W, HAS_LO, HAS_HI, SOFTCAP, ALIBI, BIAS, False, False, DROPOUT, DOT_PREC, EVEN_D,
                EVEN_DV)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    # The row statistics in base 2, kept apart: lse2 = m + log2(l). The backward's p = 2^((s - m) - log2 l) is
    # as exact as a softmax (s - m is exact near the max); 2^(s - lse2) would lose ulp(lse2) to rounding.
    m_out = tl.where(empty, float("-inf"), m_i)
    ll = tl.log2(l_safe)
    if QLEN:
        dead = offs_m >= tl.load(QLen + b)
        out = tl.where(dead[:, None], 0.0, out)
        m_out = tl.where(dead, float("-inf"), m_out)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod, out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < Nq) & (offs_dv[None, :] < Dv))
    tl.store(L + pid_bh * Nq + offs_m, m_out, mask=offs_m < Nq)
    tl.store(L + NS + pid_bh * Nq + offs_m, ll, mask=offs_m < Nq)
    lse = tl.where(m_out == float("-inf"), float("-inf"), (m_out + ll) * 0.6931471805599453)
    tl.store(LSE + pid_bh * Nq + offs_m, lse, mask=offs_m < Nq)


# ------------------------------------------------------------------------------------------------ backward

@_jit
def _bwd_delta_kernel(O, DO, DLSE, Delta, sob, soh, som, sod, sdob, sdoh, sdom, sdod, Hq, Nq, Dv,
                      BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, DL: tl.constexpr):
    """FlashAttention-2's row term delta_i = Σ_d dO·O − dlse_i (d lse_i / d s_ij = p_ij), fp32 (B, Hq, Nq)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)      # 64-bit offsets: a (B, H, N, N) bias passes 2**31 elements
    h = (pid_bh % Hq).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_DV)
    ok = (rows[:, None] < Nq) & (d[None, :] < Dv)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * som + d[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + d[None, :] * sdod, mask=ok, other=0.0)
    delta = tl.reduce(o.to(tl.float32) * do.to(tl.float32), 1, _SUM)
    if DL:
        delta -= tl.load(DLSE + pid_bh * Nq + rows, mask=rows < Nq, other=0.0)
    tl.store(Delta + pid_bh * Nq + rows, delta, mask=rows < Nq)


@_jit
def _dbias_add(ds, qi, kj, DBb, sdbm, sdbn, Nq, Nk,
               SUM_M: tl.constexpr, SUM_N: tl.constexpr, ATOMIC: tl.constexpr):
    """Add dL/d(final scores) of a tile into the fp32 bias-gradient buffer (bias-shaped, broadcast dims summed:
    within the tile here, across programs by atomics). qi: (BM,) rows, kj: (BN,) keys."""
    if SUM_M:
        if SUM_N:
            tl.atomic_add(DBb, tl.reduce(tl.reduce(ds, 1, _SUM), 0, _SUM))
        else:
            tl.atomic_add(DBb + kj * sdbn, tl.reduce(ds, 0, _SUM), mask=kj < Nk)
    elif SUM_N:
        tl.atomic_add(DBb + qi * sdbm, tl.reduce(ds, 1, _SUM), mask=qi < Nq)
    else:
        ptrs = DBb + qi[:, None].to(tl.int64) * sdbm + kj[None, :] * sdbn
        ok = (qi[:, None] < Nq) & (kj[None, :] < Nk)
        if ATOMIC:
            tl.atomic_add(ptrs, ds, mask=ok)
        else:
            tl.store(ptrs, ds, mask=ok)


@_jit
def _dq_tile(dq, q, do, mrow, llrow, delta, Kb, Vb, n0, offs_m, offs_n, offs_d, offs_dv, skn, skd, svn, svd, D, Dv,
             Nq, Nk, kv_end, off, scale, softcap, slope, Biasb, sbm, sbn, DBb, sdbm, sdbn, lo_off, hi_off, qid,
             KIdb, Bitsb, slot, m0t, n0t, hh, dropout_p, qb, kb,
             MASKED: tl.constexpr, W: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
             SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr, DBIAS: tl.constexpr,
             DB_SUM_M: tl.constexpr, DB_SUM_N: tl.constexpr, DB_ATOMIC: tl.constexpr, DOC: tl.constexpr,
             BITS: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr,
             EVEN_DV: tl.constexpr):
    kj = n0 + offs_n
    k_ptrs = Kb + kj[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = Vb + kj[:, None] * svn + offs_dv[None, :] * svd
    if MASKED:
        k = tl.load(k_ptrs, mask=(kj[:, None] < Nk) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_ptrs, mask=(kj[:, None] < Nk) & (offs_dv[None, :] < Dv), other=0.0)
    else:
        if EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < D, other=0.0)
        if EVEN_DV:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < Dv, other=0.0)
    qk = _dot(q, tl.trans(k), None, DOT_PREC)
    qi = offs_m[:, None]
    kk = kj[None, :]
    s, t = _scores(qk, qi, kk, off, scale, softcap, slope, Biasb, sbm, sbn, Nq, Nk, SOFTCAP, ALIBI, BIAS)
    if MASKED:
        vis = _visible(qi, kk, kv_end, lo_off, hi_off, qid[:, None], KIdb, Bitsb, slot, m0t, n0t,
                       W, HAS_LO, HAS_HI, DOC, BITS)
        s = tl.where(vis, s, float("-inf"))
    p = tl.exp2((s - mrow[:, None]) - llrow[:, None])
    dp = _dot(do, tl.trans(v), None, DOT_PREC)
    if DROPOUT:
        keep = _keep(hh, qi + qb, kk + kb, dropout_p)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = p * (dp - delta[:, None])
    if DBIAS:
        _dbias_add(ds, offs_m, kj, DBb, sdbm, sdbn, Nq, Nk, DB_SUM_M, DB_SUM_N, DB_ATOMIC)
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq = _dot(ds.to(k.dtype), k, dq, DOT_PREC)
    return dq


@_jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, L2, NS, Delta,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
                   sdqb, sdqh, sdqm, sdqd,
                   Bias, sbb, sbh, sbm, sbn, DBias, sdbb, sdbh, sdbm, sdbn, Alibi, sab, sah,
                   QId, KId, sqib, skib, KvLen,
                   FullNum, FullIdx, PartNum, PartIdx, PartSlot, Order, Bits, lst_b, lst_h, lst_cols,
                   Hq, G, Nq, Nk, D, Dv, off, num_m, scale, softcap, lo_off, hi_off, dropout_p, seed, q_base, k_base,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   TILE_M: tl.constexpr, TILE_N: tl.constexpr, W: tl.constexpr,
                   HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                   BIAS: tl.constexpr, DBIAS: tl.constexpr, DB_SUM_M: tl.constexpr, DB_SUM_N: tl.constexpr,
                   DB_ATOMIC: tl.constexpr, DOC: tl.constexpr, KVLEN: tl.constexpr, LISTS: tl.constexpr,
                   BITS: tl.constexpr, DROPOUT: tl.constexpr, REVERSE: tl.constexpr, DOT_PREC: tl.constexpr,
                   EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, STAGES: tl.constexpr):
    """dQ (and dBias) for BLOCK_M query rows of one (batch, query head), keys as in the forward. Grid (num_m, B·Hq)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)      # 64-bit offsets: a (B, H, N, N) bias passes 2**31 elements
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // G
    if LISTS:
        mblk = tl.load(Order + pid)
    elif REVERSE:
        mblk = num_m - 1 - pid
    else:
        mblk = pid
    m0 = mblk * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m < Nq
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=rows[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
                 mask=rows[:, None] & (offs_dv[None, :] < Dv), other=0.0)
    mrow = tl.load(L2 + pid_bh * Nq + offs_m, mask=rows, other=float("inf"))
    mrow = tl.where(mrow == float("-inf"), float("inf"), mrow)      # rows that see nothing: p = 0
    llrow = tl.load(L2 + NS + pid_bh * Nq + offs_m, mask=rows, other=0.0)
    delta = tl.load(Delta + pid_bh * Nq + offs_m, mask=rows, other=0.0)
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    Biasb = Bias + b * sbb + h * sbh
    DBb = DBias + b * sdbb + h * sdbh
    kv_end = Nk
    if KVLEN:
        kv_end = tl.minimum(tl.load(KvLen + b), Nk)
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + b * sab + h * sah)
    qid = offs_m
    KIdb = KId + b * skib
    if DOC:
        qid = tl.load(QId + b * sqib + offs_m, mask=rows, other=-1)
    hh = 0
    if DROPOUT:
        hh = _seed_hash(seed, b, h)
    dq = tl.full([BLOCK_M, BLOCK_D], 0, tl.float32)
    if LISTS:
        row = b * lst_b + h * lst_h + m0 // TILE_M
        m0t = (m0 // TILE_M) * TILE_M
        nfull = tl.load(FullNum + row)
        for t in tl.range(0, nfull * (TILE_N // BLOCK_N), num_stages=STAGES):
            n0t = tl.load(FullIdx + row * lst_cols + t // (TILE_N // BLOCK_N)) * TILE_N
            n0 = n0t + (t % (TILE_N // BLOCK_N)) * BLOCK_N
            dq = _dq_tile(dq, q, do, mrow, llrow, delta, Kb, Vb, n0, offs_m, offs_n, offs_d, offs_dv,
                          skn, skd, svn, svd, D, Dv, Nq, Nk, kv_end, off, scale, softcap, slope, Biasb, sbm,
                          sbn, DBb, sdbm, sdbn, lo_off, hi_off, qid, KIdb, Bits, -1, m0t, n0t, hh, dropout_p,
                          q_base, k_base, False, W, HAS_LO, HAS_HI, SOFTCAP, ALIBI, BIAS, DBIAS, DB_SUM_M, DB_SUM_N,
                          DB_ATOMIC, DOC, BITS, DROPOUT, DOT_PREC, EVEN_D, EVEN_DV)
        npart = tl.load(PartNum + row)
        for t in tl.range(0, npart * (TILE_N // BLOCK_N)):
            n0t = tl.load(PartIdx + row * lst_cols + t // (TILE_N // BLOCK_N)) * TILE_N
            slot = tl.load(PartSlot + row * lst_cols + t // (TILE_N // BLOCK_N))
            Bitsb = Bits + slot.to(tl.int64) * (TILE_M * W)
            n0 = n0t + (t % (TILE_N // BLOCK_N)) * BLOCK_N
            dq = _dq_tile(dq, q, do, mrow, llrow, delta, Kb, Vb, n0, offs_m, offs_n, offs_d, offs_dv,
                          skn, skd, svn, svd, D, Dv, Nq, Nk, kv_end, off, scale, softcap, slope, Biasb, sbm,
                          sbn, DBb, sdbm, sdbn, lo_off, hi_off, qid, KIdb, Bitsb, slot, m0t, n0t, hh,
                          dropout_p, q_base, k_base,
                          True, W, HAS_LO, HAS_HI, SOFTCAP, ALIBI, BIAS, DBIAS, DB_SUM_M, DB_SUM_N,
                          DB_ATOMIC, DOC, BITS, DROPOUT, DOT_PREC, EVEN_D, EVEN_DV)
    else:
        last = tl.minimum(m0 + BLOCK_M, Nq) - 1
        lo = 0
        hi = kv_end
        full_lo = 0
        full_hi = kv_end
        if HAS_LO:
            lo = tl.maximum(m0 + lo_off, 0)
            full_lo = tl.maximum(last + lo_off, 0)
        if HAS_HI:
            hi = tl.minimum(last + hi_off + 1, kv_end)
            full_hi = tl.minimum(m0 + hi_off + 1, kv_end)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.maximum(hi, lo)
        c1 = tl.minimum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, hi)
        c2 = tl.maximum(tl.minimum((full_hi // BLOCK_N) * BLOCK_N, hi), c1)
        for n0 in tl.range(c1, c2, BLOCK_N, num_stages=STAGES):
            dq = _dq_tile(dq, q, do, mrow, llrow, delta, Kb, Vb, n0, offs_m, offs_n, offs_d, offs_dv, skn, skd, svn,
                          svd, D, Dv, Nq, Nk, kv_end, off, scale, softcap, slope, Biasb, sbm, sbn, DBb, sdbm,
                          sdbn, lo_off, hi_off, qid, KIdb, Bits, -1, m0, n0, hh, dropout_p, q_base, k_base,
                          False, W, HAS_LO, HAS_HI, SOFTCAP, ALIBI, BIAS, DBIAS, DB_SUM_M, DB_SUM_N, DB_ATOMIC,
                          False, False, DROPOUT, DOT_PREC, EVEN_D, EVEN_DV)
        # the masked blocks: before the unmasked range (window edge), then after it (the diagonal)
        nf = (c1 - lo + BLOCK_N - 1) // BLOCK_N
        nb = (hi - c2 + BLOCK_N - 1) // BLOCK_N
        for t in tl.range(0, nf + nb):
            n0 = tl.where(t < nf, lo + t * BLOCK_N, c2 + (t - nf) * BLOCK_N)
            dq = _dq_tile(dq, q, do, mrow, llrow, delta, Kb, Vb, n0, offs_m, offs_n, offs_d, offs_dv, skn, skd, svn,
                          svd, D, Dv, Nq, Nk, kv_end, off, scale, softcap, slope, Biasb, sbm, sbn, DBb, sdbm,
                          sdbn, lo_off, hi_off, qid, KIdb, Bits, -1, m0, n0, hh, dropout_p, q_base, k_base,
                          True, W, HAS_LO, HAS_HI, SOFTCAP, ALIBI, BIAS, DBIAS, DB_SUM_M, DB_SUM_N, DB_ATOMIC,
                          False, False, DROPOUT, DOT_PREC, EVEN_D, EVEN_DV)
    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=rows[:, None] & (offs_d[None, :] < D))


@_jit
def _dkdv_tile(dk, dv, k, v, Qb, DOb, L2b, LLb, Deltab, m0, offs_m, kj, offs_d, offs_dv, sqm, sqd, sdom, sdod, D, Dv,
               Nq, Nk, kv_end, off, scale, softcap, slope, Biasb, sbm, sbn, lo_off, hi_off, QIdb, KIdb, Bitsb,
               slot, m0t, n0t, hh, dropout_p, qb, kb,
               MASKED: tl.constexpr, W: tl.constexpr, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BIAS: tl.constexpr, DOC: tl.constexpr,
               BITS: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr,
               EVEN_DV: tl.constexpr):
    """One (BLOCK_N keys) × (BLOCK_M rows) step, computed transposed: sᵀ = k·qᵀ, so pᵀ and dsᵀ come out of
    the MMA in the layout the dV and dK products take them."""
    qi = m0 + offs_m
    rows = qi < Nq
    q_ptrs = Qb + qi[:, None] * sqm + offs_d[None, :] * sqd
    do_ptrs = DOb + qi[:, None] * sdom + offs_dv[None, :] * sdod
    if MASKED:
        q = tl.load(q_ptrs, mask=rows[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(do_ptrs, mask=rows[:, None] & (offs_dv[None, :] < Dv), other=0.0)
    else:
        if EVEN_D:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=offs_d[None, :] < D, other=0.0)
        if EVEN_DV:
            do = tl.load(do_ptrs)
        else:
            do = tl.load(do_ptrs, mask=offs_dv[None, :] < Dv, other=0.0)
    mrow = tl.load(L2b + qi, mask=rows, other=float("inf"))
    mrow = tl.where(mrow == float("-inf"), float("inf"), mrow)
    llrow = tl.load(LLb + qi, mask=rows, other=0.0)
    delta = tl.load(Deltab + qi, mask=rows, other=0.0)
    qk = _dot(k, tl.trans(q), None, DOT_PREC)           # (BLOCK_N, BLOCK_M)
    qq = qi[None, :]
    kk = kj[:, None]
    s, t = _scores(qk, qq, kk, off, scale, softcap, slope, Biasb, sbm, sbn, Nq, Nk, SOFTCAP, ALIBI, BIAS)
    if MASKED:
        qid = qq
        if DOC:
            qid = tl.load(QIdb + qq, mask=qq < Nq, other=-1)
        vis = _visible(qq, kk, kv_end, lo_off, hi_off, qid, KIdb, Bitsb, slot, m0t, n0t,
                       W, HAS_LO, HAS_HI, DOC, BITS)
        s = tl.where(vis, s, float("-inf"))
    p = tl.exp2((s - mrow[None, :]) - llrow[None, :])
    dp = _dot(v, tl.trans(do), None, DOT_PREC)
    if DROPOUT:
        keep = _keep(hh, qq + qb, kk + kb, dropout_p)
        pd = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    else:
        pd = p
    dv = _dot(pd.to(do.dtype), do, dv, DOT_PREC)
    ds = p * (dp - delta[None, :])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dk = _dot(ds.to(q.dtype), q, dk, DOT_PREC)
    return dk, dv


@_jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, L2, NS, Delta,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
                     sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                     Bias, sbb, sbh, sbm, sbn, Alibi, sab, sah,
                     QId, KId, sqib, skib, KvLen,
                     FullNum, FullIdx, PartNum, PartIdx, PartSlot, Order, Bits, lst_b, lst_h, lst_cols,
                     Hq, Hkv, G, Nq, Nk, D, Dv, off, num_n, scale, softcap, lo_off, hi_off, dropout_p, seed,
                     q_base, k_base, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr, W: tl.constexpr,
                     HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                     BIAS: tl.constexpr, DOC: tl.constexpr, KVLEN: tl.constexpr, LISTS: tl.constexpr,
                     BITS: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr,
                     EVEN_DV: tl.constexpr, STAGES: tl.constexpr):
    """dK, dV for BLOCK_N keys of one (batch, kv head): the G query heads of the group are visited in turn, so
    K/V are read once and dK/dV summed in registers (no atomics). Grid (num_n, B·Hkv)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    if LISTS:
        nblk = tl.load(Order + pid)
    else:
        nblk = pid                              # bottom-right causal: the first keys are seen by the most rows
    n0 = nblk * BLOCK_N
    kj = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    keys = kj < Nk
    k = tl.load(K + b * skb + hk * skh + kj[:, None] * skn + offs_d[None, :] * skd,
                mask=keys[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + hk * svh + kj[:, None] * svn + offs_dv[None, :] * svd,
                mask=keys[:, None] & (offs_dv[None, :] < Dv), other=0.0)
    kv_end = Nk
    if KVLEN:
        kv_end = tl.minimum(tl.load(KvLen + b), Nk)
    QIdb = QId + b * sqib
    KIdb = KId + b * skib
    dk = tl.full([BLOCK_N, BLOCK_D], 0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0, tl.float32)
    for g in range(0, G):
        h = hk * G + g
        bh = b * Hq + h
        Qb = Q + b * sqb + h * sqh
        DOb = DO + b * sdob + h * sdoh
        L2b = L2 + bh * Nq
        LLb = L2 + NS + bh * Nq
        Deltab = Delta + bh * Nq
        Biasb = Bias + b * sbb + h * sbh
        slope = 0.0
        if ALIBI:
            slope = tl.load(Alibi + b * sab + h * sah)
        hh = 0
        if DROPOUT:
            hh = _seed_hash(seed, b, h)
        if LISTS:
            row = b * lst_b + h * lst_h + n0 // TILE_N
            n0t = (n0 // TILE_N) * TILE_N
            nfull = tl.load(FullNum + row)
            for t in tl.range(0, nfull * (TILE_M // BLOCK_M), num_stages=STAGES):
                m0t = tl.load(FullIdx + row * lst_cols + t // (TILE_M // BLOCK_M)) * TILE_M
                m0 = m0t + (t % (TILE_M // BLOCK_M)) * BLOCK_M
                dk, dv = _dkdv_tile(dk, dv, k, v, Qb, DOb, L2b, LLb, Deltab, m0, offs_m, kj, offs_d,
                                    offs_dv, sqm, sqd, sdom, sdod, D, Dv, Nq, Nk, kv_end, off, scale, softcap,
                                    slope, Biasb, sbm, sbn, lo_off, hi_off, QIdb, KIdb, Bits, -1, m0t, n0t,
                                    hh, dropout_p, q_base, k_base,
                                    False, W, HAS_LO, HAS_HI, SOFTCAP, ALIBI, BIAS, DOC, BITS, DROPOUT,
                                    DOT_PREC, EVEN_D, EVEN_DV)
            npart = tl.load(PartNum + row)
            for t in tl.range(0, npart * (TILE_M // BLOCK_M)):
                m0t = tl.load(PartIdx + row * lst_cols + t // (TILE_M // BLOCK_M)) * TILE_M
                slot = tl.load(PartSlot + row * lst_cols + t // (TILE_M // BLOCK_M))
                Bitsb = Bits + slot.to(tl.int64) * (TILE_M * W)
                m0 = m0t + (t % (TILE_M // BLOCK_M)) * BLOCK_M
                dk, dv = _dkdv_tile(dk, dv, k, v, Qb, DOb, L2b, LLb, Deltab, m0, offs_m, kj, offs_d,
                                    offs_dv, sqm, sqd, sdom, sdod, D, Dv, Nq, Nk, kv_end, off, scale, softcap,
                                    slope, Biasb, sbm, sbn, lo_off, hi_off, QIdb, KIdb, Bitsb, slot, m0t,
                                    n0t, hh, dropout_p, q_base, k_base,
                                    True, W, HAS_LO, HAS_HI, SOFTCAP, ALIBI, BIAS, DOC, BITS, DROPOUT,
                                    DOT_PREC, EVEN_D, EVEN_DV)
        else:
            # Rows that see some key of the block, split into rows that see all of them (no per-element
            # test) and the masked edges; a block that crosses the end of the keys is masked throughout.
            lastk = tl.minimum(n0 + BLOCK_N, kv_end) - 1
            qlo = 0
            qhi = Nq
            full_lo = 0
            full_hi = Nq
            if HAS_HI:
                qlo = tl.maximum(n0 - hi_off, 0)
                full_lo = tl.maximum(lastk - hi_off, 0)
            if HAS_LO:
                qhi = tl.minimum(lastk - lo_off + 1, Nq)
                full_hi = tl.minimum(n0 - lo_off + 1, Nq)
            qhi = tl.where(n0 < kv_end, qhi, 0)
            full_lo = tl.where(n0 + BLOCK_N <= kv_end, full_lo, Nq)
            qlo = (qlo // BLOCK_M) * BLOCK_M
            qhi = tl.maximum(qhi, qlo)
            c1 = tl.minimum(((full_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, qhi)
            c2 = tl.maximum(tl.minimum((full_hi // BLOCK_M) * BLOCK_M, qhi), c1)
            for m0 in tl.range(c1, c2, BLOCK_M, num_stages=STAGES):
                dk, dv = _dkdv_tile(dk, dv, k, v, Qb, DOb, L2b, LLb, Deltab, m0, offs_m, kj, offs_d, offs_dv, sqm, sqd,
                                    sdom, sdod, D, Dv, Nq, Nk, kv_end, off, scale, softcap, slope, Biasb, sbm, sbn,
                                    lo_off, hi_off, QIdb, KIdb, Bits, -1, m0, n0, hh, dropout_p, q_base, k_base,
                                    False, W, HAS_LO, HAS_HI, SOFTCAP, ALIBI, BIAS, False, False, DROPOUT,
                                    DOT_PREC, EVEN_D, EVEN_DV)
            # the masked blocks: before the unmasked range (window edge), then after it (the diagonal)
            nf = (c1 - qlo + BLOCK_M - 1) // BLOCK_M
            nb = (qhi - c2 + BLOCK_M - 1) // BLOCK_M
            for t in tl.range(0, nf + nb):
                m0 = tl.where(t < nf, qlo + t * BLOCK_M, c2 + (t - nf) * BLOCK_M)
                dk, dv = _dkdv_tile(dk, dv, k, v, Qb, DOb, L2b, LLb, Deltab, m0, offs_m, kj, offs_d, offs_dv, sqm, sqd,
                                    sdom, sdod, D, Dv, Nq, Nk, kv_end, off, scale, softcap, slope, Biasb, sbm, sbn,
                                    lo_off, hi_off, QIdb, KIdb, Bits, -1, m0, n0, hh, dropout_p, q_base, k_base,
                                    True, W, HAS_LO, HAS_HI, SOFTCAP, ALIBI, BIAS, False, False, DROPOUT,
                                    DOT_PREC, EVEN_D, EVEN_DV)
    dk = dk * scale
    tl.store(DK + b * sdkb + hk * sdkh + kj[:, None] * sdkn + offs_d[None, :] * sdkd, dk.to(DK.dtype.element_ty),
             mask=keys[:, None] & (offs_d[None, :] < D))
    tl.store(DV + b * sdvb + hk * sdvh + kj[:, None] * sdvn + offs_dv[None, :] * sdvd, dv.to(DV.dtype.element_ty),
             mask=keys[:, None] & (offs_dv[None, :] < Dv))


# ------------------------------------------------------------------------------------------------ decoding

@_jit
def _decode_kernel(Q, K, V, OP, LP,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, Alibi, sab, sah, KvLen,
                   Hq, Hkv, G, Nq, Nk, D, Dv, off, split_len, num_splits, scale, softcap, lo_off, hi_off,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                   KVLEN: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                   STAGES: tl.constexpr):
    """Split-KV decoding: one program takes the G·Nq query rows of a kv head's group (its G query heads) against
    one split of the keys, so each key and value is read once for the whole group. Writes the split's
    normalised output and base-2 LSE, merged by _merge_kernel. Grid (num_splits, B·Hkv)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    nrows = G * Nq
    valid = r < nrows
    g = r // Nq
    i = r % Nq
    h = hk * G + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqm + offs_d[None, :] * sqd,
                mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    kv_end = Nk
    if KVLEN:
        kv_end = tl.minimum(tl.load(KvLen + b), Nk)
    slope = tl.full([BLOCK_M, 1], 0, tl.float32)
    if ALIBI:
        slope = tl.load(Alibi + b * sab + h * sah, mask=valid, other=0.0)[:, None]
    start = pid_s * split_len
    end = tl.minimum(start + split_len, kv_end)
    lo = start
    hi = end
    full_lo = start
    full_hi = end
    if HAS_LO:
        lo = tl.maximum(lo, lo_off)
        full_lo = tl.maximum(full_lo, Nq - 1 + lo_off)
    if HAS_HI:
        hi = tl.minimum(hi, Nq - 1 + hi_off + 1)
        full_hi = tl.minimum(full_hi, hi_off + 1)
    lo = tl.maximum((lo // BLOCK_N) * BLOCK_N, start)
    hi = tl.maximum(hi, lo)
    c1 = tl.minimum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, hi)
    c2 = tl.maximum(tl.minimum((full_hi // BLOCK_N) * BLOCK_N, hi), c1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0, tl.float32)
    for n0 in tl.range(c1, c2, BLOCK_N, num_stages=STAGES):
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, Kb, Vb, n0, i, offs_n, offs_d, offs_dv, skn, skd, svn, svd, D, Dv,
            Nq, Nk, kv_end, off, scale, softcap, slope, K, 0, 0, lo_off, hi_off, i, K, K, -1, 0, n0, 0, 0.0, 0, 0,
            False, 1, HAS_LO, HAS_HI, SOFTCAP, ALIBI, False, False, False, False, DOT_PREC, EVEN_D, EVEN_DV)
    # the masked blocks: before the unmasked range (window edge), then after it (the diagonal)
    nf = (c1 - lo + BLOCK_N - 1) // BLOCK_N
    nb = (hi - c2 + BLOCK_N - 1) // BLOCK_N
    for t in tl.range(0, nf + nb):
        n0 = tl.where(t < nf, lo + t * BLOCK_N, c2 + (t - nf) * BLOCK_N)
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, Kb, Vb, n0, i, offs_n, offs_d, offs_dv, skn, skd, svn, svd, D, Dv,
            Nq, Nk, kv_end, off, scale, softcap, slope, K, 0, 0, lo_off, hi_off, i, K, K, -1, 0, n0, 0, 0.0, 0, 0,
            True, 1, HAS_LO, HAS_HI, SOFTCAP, ALIBI, False, False, False, False, DOT_PREC, EVEN_D, EVEN_DV)
    if _any_nan(acc) > 0:
        # A NaN in the rows: a NaN they see, or a NaN/inf value behind a zero probability (0·NaN). The split
        # again, every tile through the exact product: only the first kind stays. (Decoding is memory-bound and
        # its row blocks small, so this costs one reduction per program; the forward kernel's result is checked
        # by the engine instead.)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.full([BLOCK_M], 0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_DV], 0, tl.float32)
        for n0 in tl.range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, Kb, Vb, n0, i, offs_n, offs_d, offs_dv, skn, skd, svn, svd, D, Dv,
                Nq, Nk, kv_end, off, scale, softcap, slope, K, 0, 0, lo_off, hi_off, i, K, K, -1, 0, n0, 0, 0.0, 0,
                0, True, 1, HAS_LO, HAS_HI, SOFTCAP, ALIBI, False, False, False, False, DOT_PREC, EVEN_D, EVEN_DV,
                True)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    row = (b * Hq + h) * Nq + i                 # (B, Hq, Nq) row of each program row
    tl.store(OP + (row[:, None] * num_splits + pid_s) * Dv + offs_dv[None, :], out,
             mask=valid[:, None] & (offs_dv[None, :] < Dv))
    tl.store(LP + row * num_splits + pid_s, lse2, mask=valid)


@_jit
def _merge_kernel(OP, LP, O, L, sob, soh, som, sod, Hq, Nq, Dv, num_splits,
                  BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Merge the splits of one query row by their LSE: out = Σ 2^(lse_s − M)·o_s / Σ 2^(lse_s − M)."""
    row = tl.program_id(0)
    b = row // (Hq * Nq)
    h = (row // Nq) % Hq
    i = row % Nq
    s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    l2 = tl.load(LP + row * num_splits + s, mask=s < num_splits, other=float("-inf"))
    m = tl.reduce(l2, 0, _MAX)
    m_use = tl.where(m * 0.0 == 0.0, m, 0.0)
    w = tl.exp2(l2 - m_use)
    tot = tl.reduce(w, 0, _SUM)
    o = tl.load(OP + (row * num_splits + s[:, None]) * Dv + offs_dv[None, :],
                mask=(s[:, None] < num_splits) & (offs_dv[None, :] < Dv), other=0.0)
    empty = tot == 0.0
    out = tl.reduce(o * w[:, None], 0, _SUM) / tl.where(empty, 1.0, tot)
    lse = tl.where(empty, float("-inf"), (m_use + tl.log2(tl.where(empty, 1.0, tot))) * 0.6931471805599453)
    tl.store(O + b * sob + h * soh + i * som + offs_dv * sod, out.to(O.dtype.element_ty), mask=offs_dv < Dv)
    tl.store(L + row, lse)
