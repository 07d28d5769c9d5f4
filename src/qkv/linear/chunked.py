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

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _validate as _v

__all__ = ["linear_attention", "delta_rule"]


# ----------------------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------------------
def _chunks(x: torch.Tensor, C: int, nc: int) -> torch.Tensor:
    """(B, H, N, ...) -> (B, H, nc, C, ...), zero-padded at the end (a zero token changes nothing: k = v = 0,
    q = 0, g = 0, beta = 0)."""
    pad = nc * C - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0) * (x.ndim - 3) + (0, pad))
    return x.reshape(x.shape[0], x.shape[1], nc, C, *x.shape[3:])


def _unchunk(x: torch.Tensor, N: int) -> torch.Tensor:
    """(B, H, nc, C, ...) -> (B, H, N, ...)."""
    B, H, nc, C = x.shape[:4]
    return x.reshape(B, H, nc * C, *x.shape[4:])[:, :, :N]


def _masks(C: int, device):
    tri = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    return tri, tri.tril(-1)


class _Decay:
    """The per-chunk decay factors of log-decays g (B, H, N), or the neutral ones when g is None."""

    def __init__(self, g, C: int, nc: int, tri: torch.Tensor, like: torch.Tensor):
        self.gated = g is not None
        if self.gated:
            b = _chunks(g, C, nc).cumsum(-1)                         # (B, H, nc, C)
            bl = b[..., -1:]
            self.b = b
            self.eb = b.exp()                                        # e^{b_r}: the decay from the chunk start
            self.ekd = (bl - b).exp()                                # e^{b_last − b_s}: to the chunk end
            self.a = bl.exp()                                        # (B, H, nc, 1)
            diff = (b[..., :, None] - b[..., None, :]).masked_fill(~tri, float("-inf"))
            self.E = diff.exp()                                      # (B, H, nc, C, C), 0 above the diagonal
        else:
            self.E = tri.to(like.dtype)

    def q(self, x):        # x (B, H, nc, C, ·) ∘ e^{b}
        return x * self.eb[..., None] if self.gated else x

    def k(self, x):        # x ∘ e^{b_last − b}
        return x * self.ekd[..., None] if self.gated else x


def _scan(U: torch.Tensor, a, s0) -> torch.Tensor:
    """States at every chunk boundary: out[:, :, c] = state at the start of chunk c (c = 0..nc, the last one is the
    final state), from S_{c+1} = a_c·S_c + U_c. U: (B, H, nc, F, Dv); a: (B, H, nc, 1) or None."""
    B, H, nc, Fd, Dv = U.shape
    out = U.new_empty(B, H, nc + 1, Fd, Dv)
    if s0 is None:
        out[:, :, 0].zero_()
    else:
        out[:, :, 0].copy_(s0)
    if a is None:
        torch.cumsum(U, dim=2, out=out[:, :, 1:])
        if s0 is not None:
            out[:, :, 1:] += s0[:, :, None]
        return out
    for c in range(nc):
        torch.addcmul(U[:, :, c], out[:, :, c], a[:, :, c, :, None], out=out[:, :, c + 1])
    return out


def _rscan(X: torch.Tensor, a, ds_final) -> torch.Tensor:
    """Gradients w.r.t. the states at every chunk boundary (the reverse of ``_scan``): out[:, :, c] = dL/dS_c, with
    dS_c = a_c·dS_{c+1} + X_c and dS_nc = ds_final. X: (B, H, nc, F, Dv)."""
    B, H, nc, Fd, Dv = X.shape
    out = X.new_empty(B, H, nc + 1, Fd, Dv)
    if ds_final is None:
        out[:, :, nc].zero_()
    else:
        out[:, :, nc].copy_(ds_final)
    if a is None:
        out[:, :, :nc] = X.flip(2).cumsum(2).flip(2)
        if ds_final is not None:
            out[:, :, :nc] += ds_final[:, :, None]
        return out
    for c in range(nc - 1, -1, -1):
        torch.addcmul(X[:, :, c], out[:, :, c + 1], a[:, :, c, :, None], out=out[:, :, c])
    return out


def _rcumsum(x: torch.Tensor) -> torch.Tensor:
    """Reverse cumulative sum over the last dim, accumulated in fp64."""
    return x.double().flip(-1).cumsum(-1).flip(-1).to(x.dtype)


def _t(x):
    return x.transpose(-1, -2)


# ----------------------------------------------------------------------------------------------------------
# gated linear attention (causal)
# ----------------------------------------------------------------------------------------------------------
def _gla_parts(q, k, v, g, s0, C):
    B, H, N, Fd = q.shape
    nc = -(-N // C)
    tri, _ = _masks(C, q.device)
    qc, kc, vc = _chunks(q, C, nc), _chunks(k, C, nc), _chunks(v, C, nc)
    dec = _Decay(g, C, nc, tri, q)
    P = (qc @ _t(kc)) * dec.E                                          # (B, H, nc, C, C)
    kd = dec.k(kc)
    states = _scan(_t(kd) @ vc, dec.a if dec.gated else None, s0)     # (B, H, nc + 1, F, Dv)
    return nc, qc, kc, vc, dec, P, kd, states


class _GatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, C):
        N = q.shape[2]
        nc, qc, kc, vc, dec, P, kd, states = _gla_parts(q, k, v, g, s0, C)
        o = P @ vc
        o += dec.q(qc) @ states[:, :, :nc]
        ctx.save_for_backward(q, k, v, g, s0)
        ctx.C = C
        ctx.set_materialize_grads(False)
        return _unchunk(o, N), states[:, :, nc].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, do, ds_final):
        q, k, v, g, s0 = ctx.saved_tensors
        C = ctx.C
        N = q.shape[2]
        nc, qc, kc, vc, dec, P, kd, states = _gla_parts(q, k, v, g, s0, C)
        a = dec.a if dec.gated else None
        if do is None:
            do = v.new_zeros(v.shape)
        doc = _chunks(do, C, nc)
        dstates = _rscan(_t(dec.q(qc)) @ doc, a, ds_final)             # dL/d(state at each boundary)
        dnext = dstates[:, :, 1:]
        dP = (doc @ _t(vc)) * dec.E
        dq = dP @ kc + dec.q(doc @ _t(states[:, :, :nc]))
        dk = _t(dP) @ qc + dec.k(vc @ _t(dnext))
        dv = _t(P) @ doc + kd @ dnext
        dq, dk, dv = _unchunk(dq, N), _unchunk(dk, N), _unchunk(dv, N)
        dg = None
        if g is not None and ctx.needs_input_grad[3]:
            # With B_t the log-decay summed from the sequence start, every term of the outputs and of the final
            # state carries exp(B_t − B_s) between a query/state read at t and a key at s; so
            # dL/dB_t = q_t·dq_t − k_t·dk_t (+ <dS_N, S_N> at the end), and dL/dg_s = Σ_{t ≥ s} dL/dB_t.
            dB = (q * dq).sum(-1) - (k * dk).sum(-1)
            dg = _rcumsum(dB)
            if ds_final is not None:
                dg = dg + (ds_final * states[:, :, nc]).sum((-1, -2))[..., None]
        ds0 = dstates[:, :, 0] if s0 is not None and ctx.needs_input_grad[4] else None
        return dq, dk, dv, dg, ds0, None


def _linear_noncausal(q, k, v, s0):
    S = _t(k) @ v                                                      # (B, H, F, Dv)
    if s0 is not None:
        S = S + s0
    return q @ S, S


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, feature_map="elu1",
                     decay=None, normalize: bool | None = None, scale: float | None = None, chunk_size: int = 64,
                     initial_state: torch.Tensor | None = None, return_state: bool = False, eps: float = 1e-6):
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

    Returns:
        ``o`` ``(B, H, N, Dv)`` in q's dtype, or ``(o, state)``. The computation runs in fp32 (fp64 for fp64 inputs).
        Gradients flow to q, k, v, a decay tensor and initial_state; the backward recomputes the chunk quantities
        (nothing per step or per chunk is stored).
    """
    c = _v.prepare_linear(q, k, v, causal=causal, feature_map=feature_map, decay=decay, normalize=normalize,
                          scale=scale, chunk_size=chunk_size, initial_state=initial_state, eps=eps)
    B, H, N, Fd = c.q.shape
    if N == 0 or B == 0:
        o = c.q.new_zeros(B, H, N, c.v.shape[-1])
        S = c.state.clone() if c.state is not None else c.q.new_zeros(B, H, Fd, c.v.shape[-1])
    elif not c.causal:
        o, S = _linear_noncausal(c.q, c.k, c.v, c.state)
    else:
        o, S = _GatedLinear.apply(c.q, c.k, c.v, c.g, c.state, min(c.chunk_size, N))
    o = _v.finish_linear(c, o)
    return (o, S) if return_state else o


# ----------------------------------------------------------------------------------------------------------
# gated delta rule
# ----------------------------------------------------------------------------------------------------------
def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + A)⁻¹ for strictly lower-triangular A (..., C, C)."""
    C = A.shape[-1]
    eye = torch.eye(C, dtype=A.dtype, device=A.device).expand(A.shape).contiguous()
    return torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)


def _delta_parts(q, k, v, beta, g, C):
    """The chunk-parallel quantities of the delta rule (all but the scan)."""
    N = q.shape[2]
    D = q.shape[-1]
    nc = -(-N // C)
    tri, stri = _masks(C, q.device)
    qc, kc, vc, bc = (_chunks(x, C, nc) for x in (q, k, v, beta))
    dec = _Decay(g, C, nc, tri, q)
    KK = kc @ _t(kc)                                                   # (B, H, nc, C, C)
    A = (KK * dec.E * bc[..., :, None]).masked_fill_(~stri, 0.0)
    T = _unit_lower_inverse(A)
    X = dec.q(kc * bc[..., None])                                      # β∘e^b∘K
    Z = T @ torch.cat([X, vc * bc[..., None]], dim=-1)                 # [W | U0] = T·[β∘e^b∘K | β∘V]
    W, U0 = Z[..., :D], Z[..., D:]
    kd = dec.k(kc)
    return nc, qc, kc, vc, bc, dec, KK, T, X, Z, W, U0, kd


def _to_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, H, nc, r, c) -> (nc, B·H, r, c) contiguous: each chunk's operand is one contiguous batch."""
    B, H, nc = x.shape[:3]
    return x.reshape(B * H, nc, *x.shape[3:]).transpose(0, 1).contiguous()


def _from_scan(x: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """(nc, B·H, r, c) -> (B, H, nc, r, c)."""
    nc = x.shape[0]
    return x.transpose(0, 1).reshape(B, H, nc, *x.shape[2:])


class _GatedDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, s0, C):
        B, H, N, D = q.shape
        Dv = v.shape[-1]
        nc, qc, kc, vc, bc, dec, KK, T, X, Z, W, U0, kd = _delta_parts(q, k, v, beta, g, C)
        # the scan: u_c = U0_c − W_c·S_c; S_{c+1} = a_c·S_c + Kd_cᵀ·u_c
        Ws, U0s, KdTs = _to_scan(W), _to_scan(U0), _to_scan(_t(kd))
        a = _to_scan(dec.a[..., None]) if dec.gated else None          # (nc, B·H, 1, 1)
        us = q.new_empty(nc, B * H, C, Dv)
        Ss = q.new_empty(nc + 1, B * H, D, Dv)
        if s0 is None:
            Ss[0].zero_()
        else:
            Ss[0].copy_(s0.reshape(B * H, D, Dv))
        for c in range(nc):
            torch.baddbmm(U0s[c], Ws[c], Ss[c], alpha=-1.0, out=us[c])
            torch.baddbmm(Ss[c] * a[c] if a is not None else Ss[c], KdTs[c], us[c], out=Ss[c + 1])
        u, states = _from_scan(us, B, H), _from_scan(Ss[:nc], B, H)
        o = ((qc @ _t(kc)) * dec.E) @ u
        o += dec.q(qc) @ states
        ctx.save_for_backward(q, k, v, beta, g, s0, _unchunk(u, N))
        ctx.C = C
        ctx.set_materialize_grads(False)
        return _unchunk(o, N), Ss[nc].reshape(B, H, D, Dv).clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, do, ds_final):
        q, k, v, beta, g, s0, u = ctx.saved_tensors
        C = ctx.C
        B, H, N, D = q.shape
        Dv = v.shape[-1]
        nc, qc, kc, vc, bc, dec, KK, T, X, Z, W, U0, kd = _delta_parts(q, k, v, beta, g, C)
        a = dec.a if dec.gated else None
        uc = _chunks(u, C, nc)
        states = _scan(_t(kd) @ uc, a, s0)                              # (B, H, nc + 1, D, Dv)
        st = states[:, :, :nc]
        if do is None:
            do = v.new_zeros(v.shape)
        doc = _chunks(do, C, nc)
        QK = qc @ _t(kc)
        P = QK * dec.E
        qd = dec.q(qc)
        # reverse scan: du_c = Pᵀ·dO_c + Kd_c·dS_{c+1};  dS_c = a_c·dS_{c+1} + Qdᵀ·dO_c − W_cᵀ·du_c
        PdO, QdO = _to_scan(_t(P) @ doc), _to_scan(_t(qd) @ doc)
        Kds, WTs = _to_scan(kd), _to_scan(_t(W))
        aS = _to_scan(a[..., None]) if a is not None else None
        dus = q.new_empty(nc, B * H, C, Dv)
        dSs = q.new_empty(nc + 1, B * H, D, Dv)
        if ds_final is None:
            dSs[nc].zero_()
        else:
            dSs[nc].copy_(ds_final.reshape(B * H, D, Dv))
        for c in range(nc - 1, -1, -1):
            torch.baddbmm(PdO[c], Kds[c], dSs[c + 1], out=dus[c])
            base = QdO[c] + (dSs[c + 1] * aS[c] if aS is not None else dSs[c + 1])
            torch.baddbmm(base, WTs[c], dus[c], alpha=-1.0, out=dSs[c])
        du = _from_scan(dus, B, H)
        dnext = _from_scan(dSs[1:], B, H)

        # outputs: o = P·u + Qd·S
        dOu = doc @ _t(uc)
        dP = dOu * dec.E                                                 # dL/d(Q·Kᵀ)
        dQd = doc @ _t(st)
        dq = dP @ kc + dec.q(dQd)
        dk = _t(dP) @ qc
        # state updates: S' = a·S + Kdᵀ·u
        dKd = uc @ _t(dnext)
        dk += dec.k(dKd)
        # u = U0 − W·S, [W | U0] = T·[X | Y]  ->  d[X | Y] = Tᵀ·d[W | U0],  dA = −tril₋₁(d[X | Y]·[W | U0]ᵀ)
        dZ = torch.cat([-(du @ _t(st)), du], dim=-1)
        dXY = _t(T) @ dZ
        dA = -(dXY @ _t(Z))
        _, stri = _masks(C, q.device)
        dA.masked_fill_(~stri, 0.0)
        dX, dY = dXY[..., :D], dXY[..., D:]
        # A = β_r·(k_r·k_s)·E_rs (strictly lower)
        G = dA * dec.E * bc[..., :, None]
        dk += G @ kc + _t(G) @ kc
        dbeta = (dA * KK * dec.E).sum(-1)
        # X = β∘e^b∘K, Y = β∘V
        bx = dec.q(bc[..., None])                                      # β∘e^b, (…, C, 1)
        dk += dX * bx
        dbeta += (dX * dec.q(kc)).sum(-1) + (dY * vc).sum(-1)
        dv = dY * bc[..., None]
        dg = None
        if dec.gated and ctx.needs_input_grad[4]:
            dEE = (dOu * QK + dA * bc[..., :, None] * KK) * dec.E        # dL/dE ∘ E
            db = dEE.sum(-1) - dEE.sum(-2)
            db += (dQd * qd).sum(-1) + (dX * X).sum(-1)
            kdt = (dKd * kd).sum(-1)
            db -= kdt
            db[..., -1] += kdt.sum(-1) + (dnext * st).sum((-1, -2)) * dec.a[..., 0]
            dg = _unchunk(_rcumsum(db)[..., None], N)[..., 0]
        ds0 = dSs[0].reshape(B, H, D, Dv) if s0 is not None and ctx.needs_input_grad[5] else None
        return (_unchunk(dq, N), _unchunk(dk, N), _unchunk(dv, N), _unchunk(dbeta[..., None], N)[..., 0], dg,
                ds0, None)


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, g: torch.Tensor | None = None,
               scale: float | None = None, chunk_size: int = 64, initial_state: torch.Tensor | None = None,
               return_state: bool = False, qk_l2norm: bool = False):
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
        chunk_size: tokens per chunk (≥ 1).
        initial_state: ``(B, H, D, Dv)``, fp32 (fp64 for fp64 inputs).
        return_state: also return the final state ``(B, H, D, Dv)``.
        qk_l2norm: l2-normalise q and k over D first (``x/sqrt(Σx² + 1e-6)``).

    Returns ``o`` ``(B, H, N, Dv)`` in q's dtype, or ``(o, state)``. Same meaning as transformers'
    ``torch_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=qk_l2norm)`` in the (B, H, N, D)
    layout. Gradients flow to q, k, v, beta, g and initial_state; the backward recomputes the chunk quantities from
    the inputs and the corrected values ``u`` ``(B, H, N, Dv)`` saved by the forward.
    """
    c = _v.prepare_delta(q, k, v, beta, g=g, scale=scale, chunk_size=chunk_size, initial_state=initial_state,
                         qk_l2norm=qk_l2norm)
    B, H, N, D = c.q.shape
    if N == 0 or B == 0:
        o = c.q.new_zeros(B, H, N, c.v.shape[-1])
        S = c.state.clone() if c.state is not None else c.q.new_zeros(B, H, D, c.v.shape[-1])
    else:
        o, S = _GatedDelta.apply(c.q, c.k, c.v, c.beta, c.g, c.state, min(c.chunk_size, N))
    o = o.to(c.out_dtype)
    return (o, S) if return_state else o
