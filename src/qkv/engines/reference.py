"""The reference engine: the oracle. Materialises the scores and lets autograd differentiate everything.

Exact to the accumulation dtype (fp64 for fp64 inputs), O(N²) memory, so it refuses calls over a budget.
"""
from __future__ import annotations

import torch

from ..core.call import Call
from ..core.finite import all_finite, matmul_skip_zeros
from .base import Engine

__all__ = ["ENGINE", "ReferenceEngine", "reference_attention", "reference_weights", "SCORE_BUDGET_BYTES",
           "EVAL_ELEMENTS", "peak_bytes", "weights_peak_bytes"]

#: The reference refuses calls whose peak memory (:func:`peak_bytes`, scores and their autograd copies) would
#: exceed this (use the tiled engine instead).
SCORE_BUDGET_BYTES = 2**31

#: Most elements a mask_mod or the dropout hash is evaluated on at once (their int64 temporaries stay
#: O(this)); the bool results are assembled into one (·, ·, Nq, Nk) mask.
EVAL_ELEMENTS = 2**21

# Live (B, Hq, Nq, Nk) tensors in the compute dtype at the peak: scores, masked copies, exp, probabilities
# and what autograd keeps of them. Measured (benchmarks/robustness_memory.py, benchmarks/NOTES.md): 3.3 in
# inference, 6.6-7.6 with a backward (bias, score_mod and softcap the most).
_LIVE_INFER, _LIVE_TRAIN = 4, 8


def _keeps_graph(call: Call) -> bool:
    """Whether autograd records the call (so its scores are kept for a backward)."""
    return torch.is_grad_enabled() and (call.score_mod is not None or any(
        t is not None and t.requires_grad for t in (call.q, call.k, call.v, call.bias)))


def peak_bytes(call: Call, dtype: torch.dtype | None = None) -> int:
    """Bytes the reference engine allocates at its peak for ``call`` computed in ``dtype`` (default the
    accumulation dtype), beyond inputs and output: its live score-sized tensors, the bool visibility and
    dropout masks, and a bounded chunk of mask_mod / hash evaluation."""
    E = call.B * call.Hq * call.Nq * call.Nk
    it = (dtype or call.acc_dtype).itemsize
    masks = (1 if call.rules else 0) + (1 if call.dropout_p > 0 else 0)
    return E * (it * (_LIVE_TRAIN if _keeps_graph(call) else _LIVE_INFER) + masks) + 24 * EVAL_ELEMENTS


def weights_peak_bytes(call: Call, rows: int) -> int:
    """attention_weights' peak: the result (B, Hq, Nq, Nk) in the accumulation dtype, plus one block of
    ``rows`` query rows of the reference's temporaries."""
    it = call.acc_dtype.itemsize
    blk = call.B * call.Hq * min(rows, call.Nq) * call.Nk
    return call.B * call.Hq * call.Nq * call.Nk * it + blk * (it * _LIVE_INFER + 2) + 24 * EVAL_ELEMENTS


def _check_budget(call: Call, dtype, what="reference", rows: int = 0):
    need = weights_peak_bytes(call, rows) if what == "attention_weights" else peak_bytes(call, dtype)
    if need > SCORE_BUDGET_BYTES:
        raise ValueError(
            f"the {what} engine would need {need / 2**30:.1f} GiB for (B, Hq, Nq, Nk) = "
            f"{(call.B, call.Hq, call.Nq, call.Nk)} (the scores and their copies), over its budget of "
            f"{SCORE_BUDGET_BYTES / 2**30:.0f} GiB"
            + ("; use backend='tiled' (O(N) memory)" if what == "reference" else
               "; ask for fewer rows/heads at a time (the weights themselves are O(N²))"))


def _rows_of(fn, q0: int, q1: int, per_row: int):
    """A bool tile fn(r0, r1) (broadcastable to (B, Hq, r1-r0, Nk)) for rows q0:q1, evaluated a chunk of rows
    at a time (each chunk at most EVAL_ELEMENTS index elements) and assembled in one bool tensor."""
    rows = max(1, EVAL_ELEMENTS // max(1, per_row))
    if q1 - q0 <= rows:
        return fn(q0, q1)
    out = None
    for r0 in range(q0, q1, rows):
        r1 = min(q1, r0 + rows)
        m = fn(r0, r1)
        if out is None:
            out = torch.empty((*m.shape[:2], q1 - q0, m.shape[-1]), dtype=torch.bool, device=m.device)
        if m.shape[0] > out.shape[0] or m.shape[1] > out.shape[1]:     # a later chunk varies along more axes
            out = out.expand(max(m.shape[0], out.shape[0]), max(m.shape[1], out.shape[1]), *out.shape[2:]).clone()
        out[:, :, r0 - q0:r1 - q0] = m
    return out


class _Scores(torch.autograd.Function):
    """``q @ kt``, whose backward skips the zero entries of the score gradient (keys a row cannot see get
    ds = 0 exactly): a NaN in a hidden key or a row that sees nothing reaches no gradient."""

    @staticmethod
    def forward(ctx, q, kt):
        ctx.save_for_backward(q, kt)
        return q @ kt

    @staticmethod
    def backward(ctx, ds):
        q, kt = ctx.saved_tensors
        dq = matmul_skip_zeros(ds, kt.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        dkt = matmul_skip_zeros(ds.transpose(-1, -2), q).transpose(-1, -2) if ctx.needs_input_grad[1] else None
        return dq, dkt


class _Mix(torch.autograd.Function):
    """``p @ v`` in which a zero probability contributes nothing, even against a NaN or infinite value (keys a
    row cannot see never touch it); its backward gives those probabilities a zero gradient."""

    @staticmethod
    def forward(ctx, p, v):
        ctx.save_for_backward(p, v)
        return matmul_skip_zeros(p, v)

    @staticmethod
    def backward(ctx, dout):
        p, v = ctx.saved_tensors
        dp = (dout @ v.transpose(-1, -2)).masked_fill_(p == 0, 0.0) if ctx.needs_input_grad[0] else None
        dv = matmul_skip_zeros(p.transpose(-1, -2), dout) if ctx.needs_input_grad[1] else None
        return dp, dv


def _probs(call: Call, q0: int, q1: int, dtype, dropout: bool):
    """Rows q0:q1 of the probabilities (B, Hq, bq, Nk) in ``dtype`` and their lse (B, Hq, bq)."""
    q = call.q[:, :, q0:q1].to(dtype)
    k = call.k.to(dtype)
    if call.G > 1:
        k = k.repeat_interleave(call.G, dim=1)
    if call.Nk == 0:
        z = q.new_zeros(q.shape[0], q.shape[1], q.shape[2], 0)
        return z, torch.full(q.shape[:3], float("-inf"), dtype=dtype, device=q.device)
    s = _Scores.apply(q, k.transpose(-1, -2)) * call.scale
    per_row = call.B * call.Hq * call.Nk
    vis = None if not call.rules else _rows_of(lambda a, b: call.visible(a, b, 0, call.Nk), q0, q1, per_row)
    hide = None if vis is None else ~vis
    if call.has_mods and not torch.compiler.is_compiling() and not all_finite(call.q, call.k, call.bias):
        # A NaN score that the mods turn into -inf (or that a mask hides) must not reach their derivatives
        # (0·NaN): find those positions first, then differentiate the mods with 0 there.
        with torch.no_grad():
            s0 = call.scores(s.detach() if hide is None else s.detach().masked_fill(hide, 0.0), q0, q1, 0, call.Nk)
            dead = s0 == float("-inf")
        hide = dead if hide is None else hide | dead
    if hide is not None:
        s = s.masked_fill(hide, 0.0)        # hidden scores (maybe NaN) never reach the mods or their gradients
    s = call.scores(s, q0, q1, 0, call.Nk)
    if hide is not None:
        s = s.masked_fill(hide, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = m.masked_fill(torch.isinf(m), 0.0)                  # fully masked row: exp(-inf - 0) = 0, no NaN
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    empty = l == 0
    p = e / l.masked_fill(empty, 1.0)
    lse = torch.where(empty, float("-inf"), m + torch.log(l.masked_fill(empty, 1.0))).squeeze(-1)
    if dropout and call.dropout_p > 0:
        p = p * _rows_of(lambda a, b: call.keep(a, b, 0, call.Nk), q0, q1, per_row) / (1.0 - call.dropout_p)
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
    out = _Mix.apply(p, v)
    return out.to(call.q.dtype), lse.to(call.lse_dtype)


def reference_weights(call: Call, rows: int = 256) -> torch.Tensor:
    """The softmax matrix (B, Hq, Nq, Nk), fp32 (fp64 for fp64 inputs), computed ``rows`` query rows at a
    time so the temporaries stay O(rows·Nk). No dropout."""
    dtype = call.acc_dtype
    _check_budget(call, dtype, what="attention_weights", rows=rows)
    out = call.q.new_empty((call.B, call.Hq, call.Nq, call.Nk), dtype=dtype)
    for q0 in range(0, call.Nq, rows):
        q1 = min(q0 + rows, call.Nq)
        out[:, :, q0:q1] = _probs(call, q0, q1, dtype, dropout=False)[0]
    return out


class ReferenceEngine(Engine):
    """The oracle: every call, any device, within its score budget."""

    name = "reference"
    summary = "materialises the scores (the oracle); O(N²) memory, bounded"

    def supports(self, call: Call) -> list[str]:
        need = peak_bytes(call)
        if need > SCORE_BUDGET_BYTES:
            return [f"it would need {need / 2**30:.1f} GiB for the scores and their copies, over its budget of "
                    f"{SCORE_BUDGET_BYTES / 2**30:.0f} GiB (use backend='tiled': O(N) memory)"]
        return []

    def forward(self, call: Call):
        return reference_attention(call)


ENGINE = ReferenceEngine()
