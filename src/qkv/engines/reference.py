"""The reference engine: the oracle. Materialises the scores and lets autograd differentiate everything.

Exact to the accumulation dtype (fp64 for fp64 inputs), O(N²) memory, so it refuses calls over a budget.
"""
from __future__ import annotations

import torch

from ..core.call import Call
from .base import Engine

__all__ = ["ENGINE", "ReferenceEngine", "reference_attention", "reference_weights", "SCORE_BUDGET_BYTES"]

#: The reference refuses to materialise more score bytes than this (use the tiled engine instead).
SCORE_BUDGET_BYTES = 2**31


def _check_budget(call: Call, dtype, what="reference"):
    need = call.B * call.Hq * call.Nq * call.Nk * dtype.itemsize
    if need > SCORE_BUDGET_BYTES:
        raise ValueError(
            f"the {what} engine would materialise {need / 2**30:.1f} GiB of scores for (B, Hq, Nq, Nk) = "
            f"{(call.B, call.Hq, call.Nq, call.Nk)}, over its budget of {SCORE_BUDGET_BYTES / 2**30:.0f} GiB"
            + ("; use backend='tiled' (O(N) memory)" if what == "reference" else
               "; ask for fewer rows/heads at a time (the weights themselves are O(N²))"))


def _probs(call: Call, q0: int, q1: int, dtype, dropout: bool):
    """Rows q0:q1 of the probabilities (B, Hq, bq, Nk) in ``dtype`` and their lse (B, Hq, bq)."""
    q = call.q[:, :, q0:q1].to(dtype)
    k = call.k.to(dtype)
    if call.G > 1:
        k = k.repeat_interleave(call.G, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * call.scale
    s = call.scores(s, q0, q1, 0, call.Nk)
    vis = call.visible(q0, q1, 0, call.Nk)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = m.masked_fill(torch.isinf(m), 0.0)                  # fully masked row: exp(-inf - 0) = 0, no NaN
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    empty = l == 0
    p = e / l.masked_fill(empty, 1.0)
    lse = torch.where(empty, float("-inf"), m + torch.log(l.masked_fill(empty, 1.0))).squeeze(-1)
    if dropout and call.dropout_p > 0:
        p = p * call.keep(q0, q1, 0, call.Nk) / (1.0 - call.dropout_p)
    return p, lse


def reference_attention(call: Call, compute_dtype: torch.dtype | None = None):
    """Plain softmax(scale·q·kᵀ + mods)·v on the whole score matrix.

    call: a validated :class:`~qkv.core.call.Call` (q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv)).
    compute_dtype: the dtype of every operation (default: fp32, fp64 for fp64 inputs); tests pass the input
    dtype to get the "plain same-dtype computation" of FlashAttention's tolerance rule.
    Returns out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) in ``call.lse_dtype`` (float32 by default).
    """
    dtype = compute_dtype or call.acc_dtype
    _check_budget(call, dtype)
    p, lse = _probs(call, 0, call.Nq, dtype, dropout=True)
    v = call.v.to(dtype)
    if call.G > 1:
        v = v.repeat_interleave(call.G, dim=1)
    out = torch.matmul(p, v)
    return out.to(call.q.dtype), lse.to(call.lse_dtype)


def reference_weights(call: Call, rows: int = 256) -> torch.Tensor:
    """The softmax matrix (B, Hq, Nq, Nk), fp32 (fp64 for fp64 inputs), computed ``rows`` query rows at a
    time so the temporaries stay O(rows·Nk). No dropout."""
    dtype = call.acc_dtype
    _check_budget(call, dtype, what="attention_weights")
    parts = [_probs(call, q0, min(q0 + rows, call.Nq), dtype, dropout=False)[0] for q0 in range(0, call.Nq, rows)]
    if not parts:
        return call.q.new_zeros((call.B, call.Hq, 0, call.Nk), dtype=dtype)
    return torch.cat(parts, dim=2)


class ReferenceEngine(Engine):
    """The oracle: every call, any device, within its score budget."""

    name = "reference"
    summary = "materialises the scores (the oracle); O(N²) memory, bounded"

    def supports(self, call: Call) -> list[str]:
        need = call.B * call.Hq * call.Nq * call.Nk * call.acc_dtype.itemsize
        if need > SCORE_BUDGET_BYTES:
            return [f"it would materialise {need / 2**30:.1f} GiB of scores, over its budget of "
                    f"{SCORE_BUDGET_BYTES / 2**30:.0f} GiB (use backend='tiled': O(N) memory)"]
        return []

    def forward(self, call: Call):
        return reference_attention(call)


ENGINE = ReferenceEngine()
