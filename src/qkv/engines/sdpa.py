"""The sdpa engine: delegate to ``torch.nn.functional.scaled_dot_product_attention`` when the call fits its
semantics exactly, and say every reason why not when it does not."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..core.call import Call, as4
from ..core.finite import refuse_nonfinite
from . import cpu_kernel as _native
from .base import Engine
from .reference import SCORE_BUDGET_BYTES

__all__ = ["ENGINE", "SdpaEngine", "sdpa_attention", "peak_bytes", "plausible", "direct", "MASK_CHUNK_ELEMENTS"]


#: Most index-grid elements a mask_mod is evaluated on at once while the dense mask is built (its int64
#: temporaries stay O(this), never O(Nq·Nk)).
MASK_CHUNK_ELEMENTS = 2**21


def _mask_shape(call: Call) -> tuple[int, int, int, int]:
    """The shape of the dense additive mask SDPA is given: the broadcast of the bias and the visibility rules
    (a mask_mod may vary along every axis: (B, Hq, Nq, Nk))."""
    shapes = [] if call.bias is None else [tuple(call.bias.shape)]
    for kind, r in call.rules:
        if kind == "tensor":
            shapes.append(tuple(r.shape))
        elif kind == "block" and r.tensor is not None:
            shapes.append(tuple(as4(r.tensor).shape))
        else:
            shapes.append((call.B, call.Hq, call.Nq, call.Nk))
    b, h, _, _ = torch.broadcast_shapes(*shapes, (1, 1, call.Nq, call.Nk))
    return b, h, call.Nq, call.Nk


def _needs_mask(call: Call) -> bool:
    return call.bias is not None or not (call.plain_causal or call.every_key_visible)


class SdpaEngine(Engine):
    """PyTorch's SDPA: fused kernels for no mask and plain causal, a dense additive ``attn_mask`` otherwise."""

    name = "sdpa"
    summary = f"torch {torch.__version__} scaled_dot_product_attention, when a call fits its semantics"

    def supports(self, call: Call) -> list[str]:
        why = []
        if call.score_mod is not None:
            why.append("SDPA has no score_mod")
        if call.alibi is not None:
            why.append("SDPA has no ALiBi (qkv does not materialise it as a bias)")
        if call.softcap is not None:
            why.append("SDPA has no softcap")
        if call.dropout_p > 0:
            why.append("SDPA draws its own dropout mask; qkv's dropout is the counter-based mask every qkv "
                       "engine shares")
        if call.return_lse:
            why.append("SDPA does not return the logsumexp")
        if _needs_mask(call):
            need = peak_bytes(call)
            if need > SCORE_BUDGET_BYTES:
                why.append(f"SDPA would need a dense {need / 2**30:.1f} GiB attn_mask for this mask")
        return why

    def forward(self, call: Call):
        out = sdpa_attention(call)
        if not torch.compiler.is_compiling() and not plausible(out):
            refuse_nonfinite("sdpa", "and SDPA's kernels turn a NaN score into a row of zeros and let hidden values "
                             "reach rows that cannot see them (0·NaN)", call.q, call.k, call.v, call.bias)
        return out, None


def plausible(out: torch.Tensor) -> bool:
    """Whether SDPA's output can only have come from harmless inputs: no NaN (a hidden NaN or inf that leaked
    through 0·NaN) and no row of exact zeros (SDPA's CPU kernels give a row of NaN scores zeros, as a row that
    sees nothing). One pass over the output, not the inputs (a decoding step's keys are far larger); only an
    implausible output has the inputs checked."""
    if out.numel() == 0 or out.device.type == "meta":
        return True
    fast = _native.rows_plausible(out)                  # one C pass on CPU: this is on every call's path
    if fast is not None:
        return fast
    least = float(out.detach().abs().amax(-1).amin())   # the smallest row maximum: NaN propagates, a zero row gives 0
    return least > 0


def direct(call: Call, *, default_scale: bool):
    """For callers that cache what depends only on a call's signature (its shapes, dtypes, devices and flags): a
    function ``run(q, k, v) -> out | None`` that computes any call of the same signature as this engine's forward
    would — SDPA with no mask — and returns None instead of an output that fails :func:`plausible` (the caller
    then takes the full path, where the inputs are checked), or when SDPA refuses the tensors (k or v of another
    dtype than q: the full path's validation says so). None when the signature needs a mask (only no
    mask and plain causal run this way). default_scale: the call's scale was not given, so SDPA is left its
    default, the same 1/sqrt(D)."""
    kw = {} if default_scale else {"scale": call.scale}
    if call.G > 1:
        kw["enable_gqa"] = True
    if call.plain_causal and call.bias is None:
        kw["is_causal"] = True
    elif not call.every_key_visible or call.bias is not None:
        return None
    sdpa = functools.partial(F.scaled_dot_product_attention, **kw)
    check = _native.row_check(call.q.dtype) if call.device.type == "cpu" else None
    if check is None:
        def run(q, k, v):
            try:
                out = sdpa(q, k, v)
            except RuntimeError:        # e.g. k or v of another dtype than q: the caller's full path says so
                return None
            return out if plausible(out) else None
        return run
    rows_plausible, code = check      # the C check inline: this runs on every call of a tiny model
    shape = (call.B, call.Hq, call.Nq, call.Dv)

    def run_cpu(q, k, v):
        try:
            out = sdpa(q, k, v)
        except RuntimeError:
            return None
        return out if rows_plausible(code, out.data_ptr(), shape, out.stride()) else None
    return run_cpu


def peak_bytes(call: Call) -> int:
    """Bytes the sdpa engine allocates beyond its inputs and output for this call: the dense additive mask
    (q's dtype; SDPA reads it in place), while it is built a bounded chunk of mask_mod evaluations, and
    SDPA's own O(N·D) workspace (fp32 gradient buffers; measured: benchmarks/robustness_memory.py)."""
    if not _needs_mask(call):
        return 0
    b, h, nq, nk = _mask_shape(call)
    work = 8 * (call.B * call.Hq * call.Nq + call.B * call.Hkv * call.Nk) * (call.D + call.Dv)  # fp32 grads...
    return b * h * nq * nk * call.q.element_size() + 17 * MASK_CHUNK_ELEMENTS + work


def _attn_mask(call: Call) -> torch.Tensor:
    """The dense additive mask (Bm, Hm, Nq, Nk) in q's dtype: the bias (or 0) where visible, -inf elsewhere.
    Built a chunk of query rows at a time, so a mask_mod's temporaries stay O(MASK_CHUNK_ELEMENTS)."""
    B, Hq, Nq, Nk = call.B, call.Hq, call.Nq, call.Nk
    shape = _mask_shape(call)
    mask = torch.empty(shape, dtype=call.q.dtype, device=call.q.device)
    if call.bias is None:
        mask.zero_()
    else:
        mask.copy_(call.bias.expand(shape))
    if call.rules:
        rows = max(1, MASK_CHUNK_ELEMENTS // max(1, B * Hq * Nk))
        for r0 in range(0, Nq, rows):
            r1 = min(Nq, r0 + rows)
            vis = call.visible(r0, r1, 0, Nk)
            mask[:, :, r0:r1].masked_fill_(~vis, float("-inf"))
    return mask


def sdpa_attention(call: Call) -> torch.Tensor:
    """out (B, Hq, Nq, Dv) from SDPA. Causal with Nq == Nk is SDPA's ``is_causal``; rows that see every key
    need no mask; any other visibility rule becomes a dense additive ``attn_mask`` (-inf where hidden, the
    bias elsewhere) in q's dtype, which SDPA reads as it is (a bool mask it would first convert: measured)."""
    kw = dict(scale=call.scale, enable_gqa=call.G > 1)
    bias = None if call.bias is None else call.bias.to(call.q.dtype)
    if call.plain_causal and bias is None:
        return F.scaled_dot_product_attention(call.q, call.k, call.v, is_causal=True, **kw)
    if call.every_key_visible:
        return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=bias, **kw)
    return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=_attn_mask(call), **kw)


ENGINE = SdpaEngine()
