"""The chunked engines of the linear-attention family: O(N·C·D + N·D·Dv) time, torch ops on any device.

The sequence is cut into chunks of C tokens. Inside a chunk the work is quadratic in C (a masked C×C matrix, like
attention); across chunks only the ``(F, Dv)`` state travels. Each engine is a ``torch.autograd.Function`` whose
backward recomputes what it needs from the inputs (and, for the delta rule, the chunk's corrected values ``u``, one
``(N, Dv)`` tensor): no per-step state and no per-chunk state is kept between the passes. The recurrences they
compute are written out in :mod:`qkv.linear.recurrent`.

Notation per chunk (rows r, s = positions in the chunk): ``b_r`` = cumulative log-decay from the chunk's start
(inclusive), ``E_rs = exp(b_r − b_s)`` for ``s ≤ r`` (0 above), ``a = exp(b_last)`` (the chunk's total decay),
``S`` the state at the chunk's start.

* Gated linear attention: ``o = ((Q·Kᵀ)∘E)·V + (Q∘e^b)·S``; ``S' = a·S + (K∘e^{b_last−b})ᵀ·V``.
* Gated delta rule (the WY / UT-transform form): with ``A_rs = β_r·(k_r·k_s)·E_rs`` for ``s < r`` and
  ``T = (I + A)⁻¹``, the corrected values are ``u = T·(β∘V) − T·(β∘e^b∘K)·S`` (one chunk-sized triangular system
  instead of C dependent steps); then ``o = ((Q·Kᵀ)∘E)·u + (Q∘e^b)·S`` and ``S' = a·S + (K∘e^{b_last−b})ᵀ·u``.

The only sequential part is the scan over chunks (a few matmuls per chunk); everything else runs as batched matmuls
over all chunks at once.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._triton import resolve, run_delta, run_linear
from ._validate import finish_linear, prepare_delta, prepare_linear

__all__ = ["linear_attention", "delta_rule"]


# ----------------------------------------------------------------------------------------------------------
# shared pieces. Inside the engines tensors are chunk-major, (nc, B·H, C, ·): each chunk's slice is one contiguous
# batch for the sequential scan, and all chunks together are one batch for the parallel work.
# ----------------------------------------------------------------------------------------------------------
def _to_chunks(x: torch.Tensor, C: int, ones: bool = False) -> torch.Tensor:
    """(B, H, N, *r) -> (nc, B·H, C, *r), contiguous, zero-padded at the end (one copy; a zero token changes
    nothing: q = k = v = 0, g = 0, beta = 0). ``ones``: x is (B, H, N, Dv) and gets a last column of ones
    (the normaliser's), (nc, B·H, C, Dv + 1)."""
    B, H, N = x.shape[:3]
    r = tuple(x.shape[3:])
    nc, full = -(-N // C), N // C
    out = x.new_empty(nc, B, H, C, *r[:-1], r[-1] + 1) if ones else x.new_empty(nc, B, H, C, *r)
    dst = out[..., :-1] if ones else out
    if full:
        perm = (2, 0, 1, 3) + tuple(range(4, 4 + len(r)))
        dst[:full].copy_(x[:, :, :full * C].unflatten(2, (full, C)).permute(perm))
    if ones:
        out[..., -1] = 1.0
    if full < nc:
        tail = N - full * C
        out[full, :, :, tail:].zero_()
        dst[full, :, :, :tail].copy_(x[:, :, full * C:])
    return out.view(nc, B * H, C, *out.shape[4:])


def _from_chunks(x: torch.Tensor, B: int, H: int, N: int) -> torch.Tensor:
    """(nc, B·H, C, *r) -> (B, H, N, *r)."""
    nc, _, C = x.shape[:3]
    r = tuple(x.shape[3:])
    perm = (1, 2, 0, 3) + tuple(range(4, 4 + len(r)))
    return x.view(nc, B, H, C, *r).permute(perm).reshape(B, H, nc * C, *r)[:, :, :N]


def _b3(x: torch.Tensor) -> torch.Tensor:
    """(..., r, c) -> (batch, r, c) view, for baddbmm_."""
    return x.reshape(-1, *x.shape[-2:])


def _t(x):
    return x.transpose(-1, -2)


class _Decay:
    """Per-chunk decay factors of chunk-major log-decays g (nc, B·H, C), or the causal mask alone when g is None."""

    def __init__(self, g, C: int, device):
        self.tri = torch.ones(C, C, dtype=torch.bool, device=device).tril()
        self.gated = g is not None
        if self.gated:
            b = g.cumsum(-1)                                         # b_r: log-decay from the chunk start
            bl = b[..., -1:]
            self.eb = b.exp()[..., None]                             # (nc, BH, C, 1): e^{b_r}
            self.ekd = (bl - b).exp()[..., None]                     # e^{b_last − b_s}: to the chunk end
            self.a = bl.exp()[..., None]                             # (nc, BH, 1, 1): the chunk's decay
            E = b[..., :, None] - b[..., None, :]
            self.E = E.masked_fill_(~self.tri, float("-inf")).exp_()  # (nc, BH, C, C), 0 above the diagonal

    def mask_(self, x):
        """x (nc, BH, C, C) ∘ E in place (∘ the causal mask without decay)."""
        return x.mul_(self.E) if self.gated else x.tril_()

    def q(self, x):
        """x ∘ e^{b} (rows)."""
        return x * self.eb if self.gated else x

    def k(self, x):
        """x ∘ e^{b_last − b} (rows)."""
        return x * self.ekd if self.gated else x


def _scan(U: torch.Tensor, a, s0) -> torch.Tensor:
    """States at every chunk boundary, (nc + 1, BH, F, Dv): out[c] = state at the start of chunk c (out[nc] the
    final state), from S_{c+1} = a_c·S_c + U_c. U: (nc, BH, F, Dv); a: (nc, BH, 1, 1) or None; s0: (BH, F, Dv)."""
    nc = U.shape[0]
    out = U.new_empty(nc + 1, *U.shape[1:])
    if s0 is None:
        out[0].zero_()
    else:
        out[0].copy_(s0)
    for c in range(nc):
        if a is None:
            torch.add(U[c], out[c], out=out[c + 1])
        else:
            torch.addcmul(U[c], out[c], a[c], out=out[c + 1])
    return out


def _rscan(X: torch.Tensor, a, ds_final) -> torch.Tensor:
    """The reverse of ``_scan``: out[c] = dL/dS_c with dS_c = a_c·dS_{c+1} + X_c and dS_nc = ds_final."""
    nc = X.shape[0]
    out = X.new_empty(nc + 1, *X.shape[1:])
    if ds_final is None:
        out[nc].zero_()
    else:
        out[nc].copy_(ds_final)
    for c in range(nc - 1, -1, -1):
        if a is None:
            torch.add(X[c], out[c + 1], out=out[c])
        else:
            torch.addcmul(X[c], out[c + 1], a[c], out=out[c])
    return out


def _rcumsum(x: torch.Tensor) -> torch.Tensor:
    """Reverse cumulative sum over the last dim, accumulated in fp64."""
    return x.double().flip(-1).cumsum(-1).flip(-1).to(x.dtype)


def _flat_state(s, BH: int):
    return None if s is None else s.reshape(BH, *s.shape[2:])


def _segment_len(BH: int, C: int, Fd: int, Dv: int) -> int:
    """Tokens per segment (a multiple of C): the public functions run a long sequence as a chain of segments
    joined by the state, so that every temporary, (chunks, BH, C, C) and (chunks, BH, F, Dv) included, stays
    within ~8 MB (fp32). That keeps the work in cache and out of fresh, page-faulting allocations (glibc maps
    blocks over 32 MB anew on every call) and bounds the memory beyond the inputs and outputs, whatever N."""
    per = max(1, _SEGMENT_ELEMS // (BH * max(C * C, Fd * Dv, C * (Fd + Dv))))
    return per * C


_SEGMENT_ELEMS = 1 << 21


class _Output:
    """The segments' outputs joined along N: written into one preallocated tensor when nothing needs a gradient
    (peak memory: the output plus one segment), concatenated otherwise (autograd sees each segment)."""

    def __init__(self, N: int, inputs):
        self.N = N
        self.grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
        self.parts, self.buf = [], None

    def put(self, t0: int, t1: int, o: torch.Tensor) -> None:
        if self.grad or (t0 == 0 and t1 == self.N):
            self.parts.append(o)
            return
        if self.buf is None:
            self.buf = o.new_empty(*o.shape[:2], self.N, *o.shape[3:])
        self.buf[:, :, t0:t1] = o

    def result(self) -> torch.Tensor:
        if self.buf is not None:
            return self.buf
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts, dim=2)


# ----------------------------------------------------------------------------------------------------------
# gated linear attention (causal)
# ----------------------------------------------------------------------------------------------------------
def _gla_parts(qc, kc, vc, gc, S):
    """One segment's chunk quantities from the state S (BH, F, Dv) at its start."""
    dec = _Decay(gc, qc.shape[2], qc.device)
    P = dec.mask_(qc @ _t(kc))                                       # (n, BH, C, C)
    kd = dec.k(kc)
    states = _scan(_t(kd) @ vc, dec.a if dec.gated else None, S)    # (n + 1, BH, F, Dv)
    return dec, P, kd, states


class _GatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, C, ones):
        B, H, N, Fd = q.shape
        Dv = v.shape[-1] + ones
        qc, kc, vc = _to_chunks(q, C), _to_chunks(k, C), _to_chunks(v, C, ones)
        gc = None if g is None else _to_chunks(g, C)
        s0f = _flat_state(s0, B * H)
        dec, P, kd, states = _gla_parts(qc, kc, vc, gc, s0f)
        o = P @ vc
        _b3(o).baddbmm_(_b3(dec.q(qc)), _b3(states[:-1]))
        S = states[-1].clone()                                          # not a view: the boundary states go
        ctx.save_for_backward(qc, kc, vc, gc, s0f, S)
        ctx.shape, ctx.ones = (B, H, N), ones
        ctx.set_materialize_grads(False)
        return _from_chunks(o, B, H, N), S.reshape(B, H, Fd, Dv).clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, do, ds_final):
        qc, kc, vc, gc, s0, S_final = ctx.saved_tensors
        B, H, N = ctx.shape
        nc, BH, C, Fd = qc.shape
        Dv = vc.shape[-1]
        doc = _to_chunks(do, C) if do is not None else vc.new_zeros(vc.shape)
        dsf = _flat_state(ds_final, BH)
        dec, P, kd, states = _gla_parts(qc, kc, vc, gc, s0)
        dstates = _rscan(_t(dec.q(qc)) @ doc, dec.a if dec.gated else None, dsf)   # dL/d(boundary states)
        dnext = dstates[1:]
        dP = dec.mask_(doc @ _t(vc))
        dq = dec.q(doc @ _t(states[:-1]))
        _b3(dq).baddbmm_(_b3(dP), _b3(kc))
        dk = dec.k(vc @ _t(dnext))
        _b3(dk).baddbmm_(_b3(_t(dP)), _b3(qc))
        dv = _t(P) @ doc
        _b3(dv).baddbmm_(_b3(kd), _b3(dnext))
        dg = None
        if gc is not None and ctx.needs_input_grad[3]:
            # With B_t the log-decay summed from the call's start, every term of the outputs and of the final
            # state carries exp(B_t − B_s) between a query/state read at t and a key (or the initial state, s = 0)
            # at s; so dL/dB_t = q_t·dq_t − k_t·dk_t (+ <dS_N, S_N> at the end), and dL/dg_s = Σ_{t ≥ s} dL/dB_t.
            dB = _from_chunks((qc * dq).sum(-1) - (kc * dk).sum(-1), B, H, N)
            dg = _rcumsum(dB)
            if dsf is not None:
                dg = dg + (dsf * S_final).sum((-1, -2)).view(B, H, 1)
        ds0 = dstates[0].reshape(B, H, Fd, Dv) if s0 is not None and ctx.needs_input_grad[4] else None
        if ctx.ones:                                                    # the constant column has no gradient
            dv = dv[..., :-1]
        return (_from_chunks(dq, B, H, N), _from_chunks(dk, B, H, N), _from_chunks(dv, B, H, N), dg, ds0, None,
                None)


def _linear_noncausal(q, k, v, s0):
    S = _t(k) @ v                                                      # (B, H, F, Dv)
    if s0 is not None:
        S = S + s0
    return q @ S, S


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, feature_map="elu1",
                     decay=None, normalize: bool | None = None, scale: float | None = None, chunk_size: int = 64,
                     initial_state: torch.Tensor | None = None, return_state: bool = False, eps: float = 1e-6,
                     backend: str = "auto"):
    """Linear attention ``φ(Q)·(φ(K)ᵀ·V)`` and its decayed forms (RetNet retention, Mamba-2 SSD, gated linear
    attention with scalar gates, lightning attention), chunked: O(N) time, O(1) state.

    Args:
        q, k: ``(B, Hk, N, D)``; v: ``(B, H, N, Dv)`` with ``H % Hk == 0`` (value head h reads query/key head
            ``h // (H // Hk)``, as Mamba-2's groups). Any strides; float16/bfloat16/float32/float64.
        causal: token t reads tokens ≤ t (the recurrent form). ``False``: every token reads every token (no decay
            allowed then).
        feature_map: φ applied to q and k: ``"elu1"`` (elu(x) + 1, Katharopoulos et al.), ``"relu"``, ``"identity"``,
            or a callable ``(B, Hk, N, D) -> (B, Hk, N, F)`` (F may differ from D).
        decay: None; a number or a ``(H,)`` tensor of factors in (0, 1] (retention: the state shrinks by the factor
            at every step); or a ``(B, H, N)`` tensor of per-token log-decays ≤ 0 (the state is multiplied by
            ``exp(decay[b, h, t])`` before token t enters). Differentiable when a tensor.
        normalize: divide each output by ``scale·φ(q_t)·Σ_s φ(k_s)`` (the same decayed sum), with ``|den|`` lifted to
            at least ``eps`` (sign kept) so a row that sees ~nothing gives ~0, not inf. Default: on without a decay,
            off with one.
        scale: multiplies φ(q); default ``1/sqrt(F)``.
        chunk_size: tokens per chunk C (≥ 1): cost ~ N·C·F + N·F·Dv. Results do not depend on it beyond rounding.
        initial_state: ``(B, H, F, Dv)`` (``Dv + 1`` columns with ``normalize``: the last is ``Σφ(k)``), fp32 (fp64
            for fp64 inputs): the state left by a previous call's ``return_state``.
        return_state: also return the final state (same layout), so that a stream can be processed in pieces.
        eps: the normaliser's guard.
        backend: ``"auto"`` (the Triton kernels for CUDA tensors when triton is installed and they serve the call,
            else torch ops), ``"torch"`` or ``"triton"`` (a ValueError naming every reason when the kernels cannot
            serve the call: CPU tensors without ``TRITON_INTERPRET=1``, fp64, ``causal=False``, head dims over
            256). See docs/linear.md.

    Returns:
        ``o`` ``(B, H, N, Dv)`` in q's dtype, or ``(o, state)``. The computation runs in fp32 (fp64 for fp64 inputs).
        Gradients flow to q, k, v, a decay tensor and initial_state; the backward recomputes the chunk quantities
        (nothing per step or per chunk is stored).
    """
    c = prepare_linear(q, k, v, causal=causal, feature_map=feature_map, decay=decay, normalize=normalize,
                       scale=scale, chunk_size=chunk_size, initial_state=initial_state, eps=eps)
    if resolve(backend, c) == "triton":
        return run_linear(c, feature_map=feature_map, decay=decay, normalize=normalize, scale=scale,
                          chunk_size=chunk_size, eps=eps, return_state=return_state)
    B, H, N = c.v.shape[:3]
    Dv1 = c.dv + c.normalize
    if N == 0 or B == 0:
        qf = c.features(0, 0)[0]
        o = qf.new_zeros(B, H, N, Dv1)
        S = c.state.clone() if c.state is not None else qf.new_zeros(B, H, qf.shape[-1], Dv1)
    elif not c.causal:
        qf, kf, vf, _ = c.features(0, N)
        if c.normalize:
            vf = torch.cat([vf, vf.new_ones(B, H, N, 1)], dim=-1)
        o, S = _linear_noncausal(qf, kf, vf, c.state)
    else:
        # a chain of segments joined by the state (see _segment_len); each runs chunk by chunk
        C = min(c.chunk_size, N)
        L = _segment_len(B * H, C, c.q.shape[-1], Dv1)
        S, out = c.state, _Output(N, (q, k, v, decay, initial_state))
        for t0 in range(0, N, L):
            t1 = min(N, t0 + L)
            qf, kf, vf, g = c.features(t0, t1)
            o, S = _GatedLinear.apply(qf, kf, vf, g, S, min(C, t1 - t0), c.normalize)
            out.put(t0, t1, finish_linear(c, o))
        o = out.result()
        return (o, S) if return_state else o
    o = finish_linear(c, o)
    return (o, S) if return_state else o


# ----------------------------------------------------------------------------------------------------------
# gated delta rule
# ----------------------------------------------------------------------------------------------------------
def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + strictly_lower(A))⁻¹ for A (..., C, C); A's diagonal and upper triangle are not read."""
    C = A.shape[-1]
    eye = torch.eye(C, dtype=A.dtype, device=A.device).expand(A.shape)
    return torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)


def _delta_parts(qc, kc, vc, bc, dec, u0_out=None):
    """The chunk-parallel quantities of the delta rule: T = (I + A)⁻¹, X = β∘e^b∘K, Y = β∘V, W = T·X, U0 = T·Y
    (written into ``u0_out`` when given)."""
    kb = kc * bc[..., None]
    A = kb @ _t(kc)                                                    # β_r·(k_r·k_s); the solve reads s < r only
    if dec.gated:
        A.mul_(dec.E)
    T = _unit_lower_inverse(A)
    X = kb.mul_(dec.eb) if dec.gated else kb
    Y = vc * bc[..., None]
    return T, X, Y, T @ X, torch.matmul(T, Y, out=u0_out)


def _delta_fwd(qc, kc, vc, bc, gc, S, o, us):
    """One segment of the delta rule from the state S (BH, D, Dv) at its start: writes the outputs o and the
    corrected values us (n, BH, C, Dv) of its chunks; returns the state at its end."""
    n, BH, C, D = qc.shape
    Dv = vc.shape[-1]
    dec = _Decay(gc, C, qc.device)
    _, _, _, W, _ = _delta_parts(qc, kc, vc, bc, dec, u0_out=us)      # us holds U0 until the scan corrects it
    kdT = _t(dec.k(kc))
    a = dec.a if dec.gated else None
    # the scan: u_c = U0_c − W_c·S_c;  S_{c+1} = a_c·S_c + Kd_cᵀ·u_c  (in place: no temporaries per chunk)
    Ss = qc.new_empty(n + 1, BH, D, Dv)
    Ss[0].copy_(S)
    for c in range(n):
        us[c].baddbmm_(W[c], Ss[c], alpha=-1.0)
        if a is not None:
            torch.mul(Ss[c], a[c], out=Ss[c + 1])
        else:
            Ss[c + 1].copy_(Ss[c])
        Ss[c + 1].baddbmm_(kdT[c], us[c])
    torch.matmul(dec.mask_(qc @ _t(kc)), us, out=o)
    _b3(o).baddbmm_(_b3(dec.q(qc)), _b3(Ss[:n]))
    return Ss[n]


def _delta_bwd(qc, kc, vc, bc, gc, S, us, doc, dS, dq, dk, dv, dbeta, db):
    """The backward of one segment: from the state S at its start, its saved corrected values us, the output
    gradients doc and the gradient dS of the state at its end, writes dq, dk, dv, dbeta and db (the gradient of the
    in-chunk cumulative log-decays; None without decay) for its chunks; returns the gradient of S."""
    n, BH, C, D = qc.shape
    Dv = vc.shape[-1]
    dec = _Decay(gc, C, qc.device)
    T, X, Y, W, U0 = _delta_parts(qc, kc, vc, bc, dec)
    kd = dec.k(kc)
    a = dec.a if dec.gated else None
    st = _scan(_t(kd) @ us, a, S)[:n]                                 # states at the chunk starts
    QK = qc @ _t(kc)
    qd = dec.q(qc)
    # reverse scan: du_c = P_cᵀ·dO_c + Kd_c·dS_{c+1};  dS_c = a_c·dS_{c+1} + Qd_cᵀ·dO_c − W_cᵀ·du_c
    # (the parts that do not depend on the scan are computed for all chunks first, into the scan's buffers)
    dus = torch.matmul(_t(dec.mask_(QK.clone())), doc)
    dSs = qc.new_empty(n + 1, BH, D, Dv)
    torch.matmul(_t(qd), doc, out=dSs[:n])
    dSs[n].copy_(dS)
    WT = _t(W)
    for c in range(n - 1, -1, -1):
        dus[c].baddbmm_(kd[c], dSs[c + 1])
        if a is not None:
            dSs[c].addcmul_(dSs[c + 1], a[c])
        else:
            dSs[c].add_(dSs[c + 1])
        dSs[c].baddbmm_(WT[c], dus[c], alpha=-1.0)
    dnext = dSs[1:]

    # o = (QK∘E)·u + Qd·S
    dOu = doc @ _t(us)
    dEE = dOu * QK if dec.gated else None                            # dL/dE (before ∘E), first part
    dP = dec.mask_(dOu)                                              # dL/d(Q·Kᵀ)
    dQd = doc @ _t(st)
    if dec.gated:
        torch.mul(dQd, dec.eb, out=dq)
    else:
        dq.copy_(dQd)
    _b3(dq).baddbmm_(_b3(dP), _b3(kc))
    torch.matmul(_t(dP), qc, out=dk)
    # S' = a·S + Kdᵀ·u
    dKd = us @ _t(dnext)
    dk += dec.k(dKd)
    # u = U0 − W·S, W = T·X, U0 = T·Y, T = (I + A)⁻¹  ->  dX = Tᵀ·dW, dY = Tᵀ·dU0, dA = −tril₋₁(dX·Wᵀ + dY·U0ᵀ)
    TT = _t(T)
    dX = TT @ (dus @ _t(st))
    dX.neg_()                                                       # dW = −du·Sᵀ
    dY = TT @ dus                                                   # dU0 = du
    dA = dX @ _t(W)
    _b3(dA).baddbmm_(_b3(dY), _b3(_t(U0)))
    dA.tril_(-1).neg_()
    # A = β_r·(k_r·k_s)·E_rs (s < r)
    KK = kc @ _t(kc)
    dAE = dA * dec.E if dec.gated else dA
    torch.sum(dAE * KK, -1, out=dbeta)
    G = dAE * bc[..., :, None]
    _b3(dk).baddbmm_(_b3(G), _b3(kc))
    _b3(dk).baddbmm_(_b3(_t(G)), _b3(kc))
    # X = β∘e^b∘K, Y = β∘V
    dk += dX * dec.q(bc[..., None])
    dbeta += (dX * dec.q(kc)).sum(-1) + (dY * vc).sum(-1)
    torch.mul(dY, bc[..., None], out=dv)
    if db is not None:
        dEE += dA * bc[..., :, None] * KK
        dEE.mul_(dec.E)
        torch.sub(dEE.sum(-1), dEE.sum(-2), out=db)
        db += (dQd * qd).sum(-1) + (dX * X).sum(-1)
        kdt = (dKd * kd).sum(-1)
        db -= kdt
        db[..., -1] += kdt.sum(-1) + (dnext * st).sum((-1, -2)) * a[..., 0, 0]
    return dSs[0]


def _block_chunks(BH: int, C: int, D: int, Dv: int) -> int:
    """Chunks per block of the inference path: each of its buffers (~7.5 of (C, D) per chunk and head) holds
    ~_BLOCK_ELEMS elements (256 KiB in fp32) on 1 thread, so that the block's working set stays in the core's L2, and
    ~_BLOCK_ELEMS_THREADS with several intra-op threads, where each op's fixed cost (an OpenMP hand-off and barrier)
    outweighs the cache; the buffers, reused from block to block, are paged in once per call. Measured (delta rule
    fwd, B=1 H=8 N=4096 D=64, 2-core AVX-512 Xeon): 1 thread, 2^16 against 2^17: 33.1 vs 35.9 ms of CPU; 2 threads,
    2^18 against 2^17: 23.0 / 21.7 vs 26.5 / 25.6 ms (2^19: 24.8 / 25.1; 2^16: 27.7 / 31.0)."""
    per = _BLOCK_ELEMS if torch.get_num_threads() == 1 else _BLOCK_ELEMS_THREADS
    return max(1, per // (BH * C * max(C, D, Dv)))


_BLOCK_ELEMS = 1 << 16
_BLOCK_ELEMS_THREADS = 1 << 18
# Chunk size cap of the inference path: with C = 32 instead of 64 the chunk-quadratic work (A, T, W, U0, Q·Kᵀ)
# halves while the state work stays; measured ~12% faster at D = 64 on a 2-core AVX-512 Xeon, equal at D = 128.
_INFER_CHUNK = 32


def _chunk_scalars(x: torch.Tensor, C: int, nc: int) -> torch.Tensor:
    """(B, H, N) -> (nc, B, H, C, 1), contiguous, zero-padded at the end."""
    N = x.shape[-1]
    if nc * C != N:
        x = torch.nn.functional.pad(x, (0, nc * C - N))
    return x.unflatten(-1, (nc, C)).permute(2, 0, 1, 3).contiguous()[..., None]


def _chunk_rows(x: torch.Tensor, C: int) -> torch.Tensor:
    """(B, Hs, n·C, E) -> a (n, B, Hs, 1, C, E) view (the 1 broadcasts a key head over its value heads)."""
    return x.unflatten(2, (x.shape[2] // C, C)).permute(2, 0, 1, 3, 4).unsqueeze(3)


def _inv_norms(x: torch.Tensor, scale: float) -> torch.Tensor:
    """scale / sqrt(Σx² + 1e-6) per row of x (B, Hs, N, D): (B, Hs, N), from one reduction that reads x in place."""
    r = torch.linalg.vector_norm(x, dim=-1).square_().add_(1e-6).rsqrt_()
    return r.mul_(scale) if scale != 1.0 else r


def _delta_infer_heads(q, k, v, beta, g, s0, out, s_out, scale: float, l2: bool, C: int) -> None:
    """The delta rule's forward without autograd for a group of heads: q, k ``(B, Hk, N, D)``, v ``(B, H, N, Dv)``,
    beta and g ``(B, H, N)`` (g may be None), s0 ``(B, H, D, Dv)`` or None, all in the compute dtype and any strides;
    writes the outputs into ``out`` ``(B, H, N, Dv)`` and the final state into ``s_out`` ``(B, H, D, Dv)``.

    The chunks run in blocks of a few (``_block_chunks``): per block, every chunk-parallel quantity (features, decay
    factors, ``A``, ``T``, ``W``, ``U0``, ``(Q·Kᵀ)∘E``) is computed for the block's chunks at once into buffers
    allocated once per call, then the scan corrects ``u`` and carries the state chunk by chunk, then the block's
    outputs are two batched products. Nothing full-length is made besides the output and per-token scalars. The
    inputs are read in place, once per block: q, k and v are copied into the block with the l2 normalisation,
    ``scale`` and ``β`` as per-row factors (computed for the whole call at once); the decays then enter in place
    (Q becomes Q∘e^b and K becomes K∘e^{b_last − b} once Q·Kᵀ and A are made; the output takes Y's buffer, T takes
    E's), so that a block keeps ~7.5 buffers of (C, D) per chunk and head in the core's cache. The views of the
    buffers are made once per block length (the per-op overhead is a fair share of the time at these sizes)."""
    B, H, N, Dv = v.shape
    Hk, D = q.shape[1], q.shape[-1]
    rep, BH, cd, dev = H // Hk, B * H, v.dtype, v.device
    nc, full = -(-N // C), N // C
    gated = g is not None

    def grouped(x):
        """(nc, B, H, C, 1) value-head scalars -> (nc, B, Hk, rep, C, 1) view."""
        return x.view(x.shape[0], B, Hk, rep, C, 1)

    # per-row factors for the whole call (small: one scalar per token and head); key-head ones (nc, B, Hk, 1, C, 1)
    bt = _chunk_scalars(beta, C, nc)                                 # (nc, B, H, C, 1)
    f_y = bt.unsqueeze(3)                                            # Y = β∘V
    if l2:
        f_q = _chunk_scalars(_inv_norms(q, scale), C, nc).unsqueeze(3)   # Q = scale·q/|q|
        f_k = _chunk_scalars(_inv_norms(k, 1.0), C, nc).unsqueeze(3)     # K = k/|k|
    else:
        f_q, f_k = scale, None
    if gated:
        b = _chunk_scalars(g, C, nc).cumsum(-2)                      # b_r: log-decay from the chunk start
        bl = b[..., -1:, :]
        eb = b.exp()
        f_qd = grouped(eb)                                           # Q -> Q∘e^b
        f_x = grouped(bt * eb)                                       # X = β∘e^b∘K
        f_kd = grouped((bl - b).exp_())                              # K -> K∘e^{b_last − b}
        a = bl.exp().view(nc, BH, 1, 1).unbind(0)                    # the chunks' decays
        bcol = b.view(nc, BH, C, 1)
        brow = bt.view(nc, BH, C, 1)                                 # β_r: A = β_r·(k_r·k_s)·E_rs
    else:
        f_x = grouped(bt)                                            # X = β∘K
    nb = min(nc, _block_chunks(BH, C, D, Dv))

    def emp(*shape):
        return torch.empty(*shape, dtype=cd, device=dev)

    bufs = {n: emp(nb, B, Hk, rep, C, D) for n in ("q", "k", "x")}
    bufs.update(y=emp(nb, B, H, 1, C, Dv), u=emp(nb * BH, C, Dv), w=emp(nb * BH, C, D))
    bufs.update({n: emp(nb * BH, C, C) for n in ("A", "QK", "E")})  # E: the decays, then T (without decay: T)
    Ss = emp(nb + 1, BH, D, Dv)
    if s0 is None:
        Ss[0].zero_()
    else:
        Ss[0].view(B, H, D, Dv).copy_(s0)
    eye = torch.eye(C, dtype=cd, device=dev).expand(nb * BH, C, C)
    views = {}

    def block_views(n):
        """The buffers' views for a block of n chunks (made once per n)."""
        if n not in views:
            M = n * BH
            w = {name: t[:n] for name, t in bufs.items() if t.shape[0] == nb}     # (n, B, Hk, rep|1, C, ·)
            w.update({name: t[:M] for name, t in bufs.items() if t.shape[0] == nb * BH})
            for name in ("q", "k", "x", "y"):
                w["f" + name] = w[name].view(M, C, w[name].shape[-1])  # as a batch of matrices
            w["fkT"] = _t(w["fk"])
            w["eye"] = eye[:M]
            U4, W4 = w["u"].view(n, BH, C, Dv), w["w"].view(n, BH, C, D)
            kdT = _t(w["fk"].view(n, BH, C, D))                        # Kd once the decays are in (K without)
            w["scan"] = list(zip(U4.unbind(0), W4.unbind(0), kdT.unbind(0), Ss[:n].unbind(0), Ss[1:n + 1].unbind(0)))
            w["Sn"] = Ss[:n].view(M, D, Dv)
            w["on"] = w["y"].view(n, B, H, C, Dv)                       # the outputs, in Y's buffer
            views[n] = w
        return views[n]

    def rows(x, t0, n):
        """the rows of x (B, Hs, N, E) for chunks [t0 / C, t0 / C + n) as (n, B, Hs, 1, C, E): a view of x, or a
        zero-padded copy for the last, partial chunk."""
        if t0 + n * C <= N:
            return _chunk_rows(x[:, :, t0:t0 + n * C], C)
        return _chunk_rows(torch.nn.functional.pad(x[:, :, t0:], (0, 0, 0, t0 + n * C - N)), C)

    # blocks: the full chunks in groups of nb, then the last, partial chunk (if any) alone
    starts = [(c0, min(full, c0 + nb) - c0) for c0 in range(0, full, nb)] + ([(full, 1)] if full < nc else [])
    for c0, n in starts:
        w, t0, c1 = block_views(n), c0 * C, c0 + n
        qs, ks, vs = rows(q, t0, n), rows(k, t0, n), rows(v, t0, n)
        qs, ks = (x.expand(n, B, Hk, rep, C, D) for x in (qs, ks))    # a key head read by its value heads
        torch.mul(qs, f_q if f_k is None else f_q[c0:c1], out=w["q"])
        if f_k is None:
            w["k"].copy_(ks)
        else:
            torch.mul(ks, f_k[c0:c1], out=w["k"])
        torch.mul(vs, f_y[c0:c1], out=w["y"])
        torch.mul(w["k"], f_x[c0:c1], out=w["x"])
        QK = torch.bmm(w["fq"], w["fkT"], out=w["QK"])
        if gated:
            bc_ = bcol[c0:c1].reshape(n * BH, C, 1)
            E = torch.sub(bc_, _t(bc_), out=w["E"])
            E.tril_().exp_().tril_()                                 # 0 above the diagonal; no exp(+large)
            QK.mul_(E)
            A = torch.bmm(w["fk"], w["fkT"], out=w["A"]).mul_(E.mul_(brow[c0:c1].reshape(n * BH, C, 1)))
            w["q"].mul_(f_qd[c0:c1])                                 # Q∘e^b
            w["k"].mul_(f_kd[c0:c1])                                 # Kd = K∘e^{b_last − b}
        else:
            QK.tril_()
            A = torch.bmm(w["fx"], w["fkT"], out=w["A"])
        T = torch.linalg.solve_triangular(A, w["eye"], upper=False, unitriangular=True, out=w["E"])  # (out=: ~2.5×
        torch.bmm(T, w["fx"], out=w["w"])                                                         # faster)
        U = torch.bmm(T, w["fy"], out=w["u"])                        # U0 = T·Y, corrected in place by the scan
        for i, (u, Wc, kdT, S, S1) in enumerate(w["scan"]):
            u.baddbmm_(Wc, S, alpha=-1.0)                            # u = U0 − W·S
            if gated:
                torch.mul(S, a[c0 + i], out=S1)
            else:
                S1.copy_(S)
            S1.baddbmm_(kdT, u)                                      # S' = a·S + Kdᵀ·u
        O = torch.bmm(QK, U, out=w["fy"])
        O.baddbmm_(w["fq"], w["Sn"])                                 # o = ((Q·Kᵀ)∘E)·u + (Q∘e^b)·S
        m = min(n * C, N - t0)
        if m == n * C:
            out[:, :, t0:t0 + m].unflatten(2, (n, C)).copy_(w["on"].permute(1, 2, 0, 3, 4))
        else:
            out[:, :, t0:].copy_(w["on"][0, :, :, :m])
        Ss[0].copy_(Ss[n])
    s_out.copy_(Ss[0].view(B, H, D, Dv))


def _delta_infer(c, C: int):
    """The delta rule's forward without autograd (nothing to save for a backward): ``(o (B, H, N, Dv), S (B, H, D,
    Dv))`` in the compute dtype, from the validated call ``c``."""
    B, H, N, Dv = c.v.shape
    D, cd, dev = c.q.shape[-1], c.cd, c.v.device
    out = torch.empty(B, H, N, Dv, dtype=cd, device=dev)
    S = torch.empty(B, H, D, Dv, dtype=cd, device=dev)
    _delta_infer_heads(c.q.to(cd), c.k.to(cd), c.v.to(cd), c.beta.to(cd), None if c.g is None else c.g.to(cd),
                       None if c.state is None else c.state.to(cd), out, S, c.scale, c.qk_l2norm, C)
    return out, S


class _GatedDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, s0, C):
        B, H, N, D = q.shape
        Dv = v.shape[-1]
        qc, kc, vc, bc = (_to_chunks(x, C) for x in (q, k, v, beta))
        gc = None if g is None else _to_chunks(g, C)
        nc, BH = qc.shape[:2]
        s0f = _flat_state(s0, BH)
        o = q.new_empty(nc, BH, C, Dv)
        us = q.new_empty(nc, BH, C, Dv)
        S = _delta_fwd(qc, kc, vc, bc, gc, s0f if s0f is not None else q.new_zeros(BH, D, Dv), o, us)
        ctx.save_for_backward(qc, kc, vc, bc, gc, s0f, us)
        ctx.shape = (B, H, N)
        ctx.set_materialize_grads(False)
        return _from_chunks(o, B, H, N), S.reshape(B, H, D, Dv).clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, do, ds_final):
        qc, kc, vc, bc, gc, s0, us = ctx.saved_tensors
        B, H, N = ctx.shape
        nc, BH, C, D = qc.shape
        Dv = vc.shape[-1]
        doc = _to_chunks(do, C) if do is not None else vc.new_zeros(vc.shape)
        dS = ds_final.reshape(BH, D, Dv) if ds_final is not None else qc.new_zeros(BH, D, Dv)
        dq, dk, dv = torch.empty_like(qc), torch.empty_like(kc), torch.empty_like(vc)
        dbeta = torch.empty_like(bc)
        db = torch.empty_like(gc) if gc is not None and ctx.needs_input_grad[4] else None
        dS = _delta_bwd(qc, kc, vc, bc, gc, s0 if s0 is not None else qc.new_zeros(BH, D, Dv), us, doc, dS,
                            dq, dk, dv, dbeta, db)
        dg = _from_chunks(_rcumsum(db), B, H, N) if db is not None else None
        ds0 = dS.reshape(B, H, D, Dv) if s0 is not None and ctx.needs_input_grad[5] else None
        return (_from_chunks(dq, B, H, N), _from_chunks(dk, B, H, N), _from_chunks(dv, B, H, N),
                _from_chunks(dbeta, B, H, N), dg, ds0, None)


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, g: torch.Tensor | None = None,
               scale: float | None = None, chunk_size: int = 64, initial_state: torch.Tensor | None = None,
               return_state: bool = False, qk_l2norm: bool = False, backend: str = "auto"):
    """The delta rule (DeltaNet) and the gated delta rule (Gated DeltaNet, the linear layers of Qwen3-Next), causal,
    chunked: O(N) time, O(1) state.

    The state ``S`` ``(D, Dv)`` per head is corrected rather than only added to: at token t it decays by ``exp(g_t)``,
    then ``S ← S + β_t·k_t·(v_t − Sᵀk_t)ᵀ`` (it moves the value it recalls for k_t towards v_t), then
    ``o_t = scale·Sᵀq_t``.

    Args:
        q, k: ``(B, Hk, N, D)``; v: ``(B, H, N, Dv)`` with ``H % Hk == 0`` (value head h reads head ``h // (H // Hk)``).
        beta: ``(B, H, N)`` writing strengths in [0, 2].
        g: ``(B, H, N)`` per-token log-decays ≤ 0 (Gated DeltaNet), or None (DeltaNet).
        scale: multiplies q (after the l2 normalisation); default ``1/sqrt(D)``.
        chunk_size: tokens per chunk (≥ 1). Without autograd at most 32 are used (faster on CPU; the results do not
            depend on the chunk size beyond rounding).
        initial_state: ``(B, H, D, Dv)``, fp32 (fp64 for fp64 inputs).
        return_state: also return the final state ``(B, H, D, Dv)``.
        qk_l2norm: l2-normalise q and k over D first (``x/sqrt(Σx² + 1e-6)``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``, as for :func:`linear_attention`.

    Returns ``o`` ``(B, H, N, Dv)`` in q's dtype, or ``(o, state)``. Same meaning as transformers'
    ``torch_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=qk_l2norm)`` in the (B, H, N, D)
    layout. Gradients flow to q, k, v, beta, g and initial_state; the backward recomputes the chunk quantities from
    the inputs and the corrected values ``u`` ``(B, H, N, Dv)`` saved by the forward.
    """
    c = prepare_delta(q, k, v, beta, g=g, scale=scale, chunk_size=chunk_size, initial_state=initial_state,
                      qk_l2norm=qk_l2norm)
    if resolve(backend, c) == "triton":
        return run_delta(c, scale=scale, chunk_size=chunk_size, return_state=return_state)
    B, H, N, Dv = c.v.shape
    D = c.q.shape[-1]
    if N == 0 or B == 0:
        o = c.v.new_zeros(B, H, N, Dv, dtype=c.cd)
        S = c.state.clone() if c.state is not None else c.v.new_zeros(B, H, D, Dv, dtype=c.cd)
    else:
        # a chain of segments joined by the state (see _segment_len); each runs chunk by chunk
        C = min(c.chunk_size, N)
        out = _Output(N, (q, k, v, beta, g, initial_state))
        if not out.grad:
            o, S = _delta_infer(c, min(C, _INFER_CHUNK))
            o = o.to(c.out_dtype)
            return (o, S) if return_state else o
        L = _segment_len(B * H, C, D, Dv)
        S = c.state
        for t0 in range(0, N, L):
            t1 = min(N, t0 + L)
            qq, kk, vv, bb, gg = c.features(t0, t1)
            o, S = _GatedDelta.apply(qq, kk, vv, bb, gg, S, min(C, t1 - t0))
            out.put(t0, t1, o.to(c.out_dtype))
        o = out.result()
    o = o.to(c.out_dtype)
    return (o, S) if return_state else o
