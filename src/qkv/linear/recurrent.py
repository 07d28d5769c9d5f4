"""The recurrent definitions of the linear-attention family, one token at a time: the oracles the chunked engines
are tested against (plain torch ops, differentiable step by step, fp64-capable; O(N) sequential steps, so for
tests and short inputs), and the one-token step functions used for decoding.

Conventions (shared with :mod:`qkv.linear.chunked`): the state ``S`` is ``(B, H, F, Dv)`` (key features by values);
at step t the state first decays by ``exp(g_t)``, then takes the token, then the query reads it:

* linear attention: ``S_t = exp(g_t)·S_{t-1} + φ(k_t)·v_tᵀ``, ``o_t = scale·φ(q_t)ᵀ·S_t``
  (normalised: divided by ``scale·φ(q_t)ᵀ·z_t`` with ``z_t = exp(g_t)·z_{t-1} + φ(k_t)``, carried as the state's
  extra last column); non-causal: every query reads the final state;
* delta rule: ``S_t = exp(g_t)·(I − β_t·k_t·k_tᵀ)·S_{t-1} + β_t·k_t·v_tᵀ``, ``o_t = scale·q_tᵀ·S_t``.
"""
from __future__ import annotations

import torch

from ._validate import DeltaCall, LinearCall, finish_linear, prepare_delta, prepare_linear

__all__ = ["recurrent_linear_attention", "recurrent_delta_rule", "linear_attention_step", "delta_rule_step"]


def _linear_recurrence(c: LinearCall):
    """Validated call -> (o (B, H, N, Dv[+1]) compute dtype, final state (B, H, F, Dv[+1]))."""
    q, k, v, g = c.features(0, c.v.shape[2])
    if c.normalize:                                                    # the state's last column sums φ(k)
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    B, H, N, Fd = q.shape
    S = c.state if c.state is not None else q.new_zeros(B, H, Fd, v.shape[-1])
    outs = []
    for t in range(N):
        if g is not None:
            S = S * torch.exp(g[:, :, t])[..., None, None]
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        if c.causal:
            outs.append((q[:, :, t, :, None] * S).sum(-2))
    if not c.causal:
        o = (q[..., :, None] * S[:, :, None]).sum(-2)
    elif outs:
        o = torch.stack(outs, dim=2)
    else:
        o = q.new_zeros(B, H, 0, v.shape[-1])
    return o, S


def _delta_recurrence(c: DeltaCall):
    """Validated call -> (o (B, H, N, Dv) compute dtype, final state (B, H, D, Dv))."""
    q, k, v, beta, g = c.features(0, c.v.shape[2])
    B, H, N, D = q.shape
    S = c.state if c.state is not None else q.new_zeros(B, H, D, v.shape[-1])
    outs = []
    for t in range(N):
        if g is not None:
            S = S * torch.exp(g[:, :, t])[..., None, None]
        k_t = k[:, :, t]
        recalled = (S * k_t[..., None]).sum(-2)                       # Sᵀk: what the state predicts for k_t
        delta = (v[:, :, t] - recalled) * beta[:, :, t, None]
        S = S + k_t[..., None] * delta[..., None, :]
        outs.append((q[:, :, t, :, None] * S).sum(-2))
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(B, H, 0, v.shape[-1])
    return o, S


def recurrent_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                               feature_map="elu1", decay=None, normalize: bool | None = None,
                               scale: float | None = None, chunk_size: int = 64,
                               initial_state: torch.Tensor | None = None, return_state: bool = False,
                               eps: float = 1e-6):
    """The step-by-step definition of :func:`qkv.linear.linear_attention` (same arguments and results; the oracle).

    q, k: ``(B, Hk, N, D)``, v: ``(B, H, N, Dv)`` with ``H % Hk == 0``. ``chunk_size`` is checked and ignored.
    Returns ``o`` ``(B, H, N, Dv)`` (q's dtype), or ``(o, state)`` with ``return_state``.
    """
    c = prepare_linear(q, k, v, causal=causal, feature_map=feature_map, decay=decay, normalize=normalize,
                          scale=scale, chunk_size=chunk_size, initial_state=initial_state, eps=eps)
    o, S = _linear_recurrence(c)
    o = finish_linear(c, o)
    return (o, S) if return_state else o


def recurrent_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                         g: torch.Tensor | None = None, scale: float | None = None, chunk_size: int = 64,
                         initial_state: torch.Tensor | None = None, return_state: bool = False,
                         qk_l2norm: bool = False):
    """The step-by-step definition of :func:`qkv.linear.delta_rule` (same arguments and results; the oracle).

    q, k: ``(B, Hk, N, D)``, v: ``(B, H, N, Dv)``, beta and g: ``(B, H, N)``. ``chunk_size`` is checked and ignored.
    """
    c = prepare_delta(q, k, v, beta, g=g, scale=scale, chunk_size=chunk_size, initial_state=initial_state,
                         qk_l2norm=qk_l2norm)
    o, S = _delta_recurrence(c)
    o = o.to(c.out_dtype)
    return (o, S) if return_state else o


def linear_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None = None, *,
                          feature_map="elu1", decay=None, normalize: bool | None = None,
                          scale: float | None = None, eps: float = 1e-6):
    """One decoding step of causal linear attention: ``(o, new_state)``.

    q, k: ``(B, Hk, 1, D)``, v: ``(B, H, 1, Dv)``; ``state``: ``(B, H, F, Dv)`` (``Dv + 1`` with ``normalize``) from
    a previous call's ``return_state`` (None = empty); ``decay`` as in :func:`qkv.linear.linear_attention` (a
    per-token one is ``(B, H, 1)``). Returns ``o`` ``(B, H, 1, Dv)`` and the state after the token. Equal to
    ``linear_attention(..., initial_state=state, return_state=True)`` on the one token.
    """
    c = prepare_linear(q, k, v, causal=True, feature_map=feature_map, decay=decay, normalize=normalize,
                          scale=scale, chunk_size=1, initial_state=state, eps=eps, step=True)
    o, S = _linear_recurrence(c)
    return finish_linear(c, o), S


def delta_rule_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                    state: torch.Tensor | None = None, *, g: torch.Tensor | None = None, scale: float | None = None,
                    qk_l2norm: bool = False):
    """One decoding step of the (gated) delta rule: ``(o, new_state)``.

    q, k: ``(B, Hk, 1, D)``, v: ``(B, H, 1, Dv)``, beta and g: ``(B, H, 1)``; ``state``: ``(B, H, D, Dv)`` or None.
    Equal to ``delta_rule(..., initial_state=state, return_state=True)`` on the one token.
    """
    c = prepare_delta(q, k, v, beta, g=g, scale=scale, chunk_size=1, initial_state=state, qk_l2norm=qk_l2norm,
                         step=True)
    o, S = _delta_recurrence(c)
    return o.to(c.out_dtype), S
