"""``qkv.attention``: validation, semantics and dispatch to the engines.

Every engine computes the semantics of DESIGN §2 (see :mod:`qkv._call`); ``backend="auto"`` chooses among
those that can serve the call, by rules drawn from the measurements in ``benchmarks/NOTES.md``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _call, _native
from .reference import reference_attention, reference_weights
from .sdpa import sdpa_attention, sdpa_supports
from .tiled import BLOCK_K, BLOCK_Q, tiled_attention

__all__ = ["attention", "attention_weights", "backends", "select_backend", "BackendInfo", "Selection"]

BACKENDS = ("reference", "tiled", "sdpa", "triton")

#: auto sends a masked call to the tiled engine when the mask leaves at most this fraction of score tiles.
#: Measured (benchmarks/NOTES.md, 2-core AMD EPYC, fp32, B=1 H=8 N=4096 D=64, document masks): tiled costs
#: ≈ 1.09 × density × SDPA-with-a-dense-mask (which pays for every tile), so they break even near 0.92.
AUTO_TILED_DENSITY = 0.85

#: auto sends a call that the CPU kernel serves (no mask, causal, windows) to the tiled engine from this many
#: query rows on: in inference always, in training when it is masked. Measured (benchmarks/NOTES.md steps
#: 18-19, 2 threads, B=1 H=8, D=64/128): forward 1.2-2.1x SDPA's from 256 rows to 8192 (one exception: full
#: attention at N=8192 D=128, 0.87x); forward+backward causal 1.15-1.63x, but unmasked 0.78-1.29x (so
#: unmasked training stays on SDPA); below 256 rows the fixed cost of a call dominates (64 rows: 0.4-0.8x).
AUTO_KERNEL_ROWS = 256


class BackendInfo(NamedTuple):
    name: str
    available: bool
    reason: str


class Selection(NamedTuple):
    name: str
    reason: str


def backends(device=None) -> list[BackendInfo]:
    """Which engines can run here (on ``device``, default CPU), and why not."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    kernel, why_not = _native.available()
    return [
        BackendInfo("reference", True, "materialises the scores (the oracle); O(N²) memory, bounded"),
        BackendInfo("tiled", True, "FlashAttention's algorithm in torch ops; any device, every feature; "
                    + ("on CPU, causal/window calls run on qkv's C kernel" if kernel
                       else f"no CPU kernel ({why_not})")),
        BackendInfo("sdpa", True, f"torch {torch.__version__} scaled_dot_product_attention, when a call fits"),
        BackendInfo("triton", False, "qkv's Triton kernels are not in this release"
                    + ("" if dev.type == "cuda" else "; they would need a CUDA device")),
    ]


def _capable(call: _call.Call, name: str) -> tuple[bool, str]:
    if name in ("reference", "tiled"):
        return True, "serves every call"
    if name == "sdpa":
        return sdpa_supports(call)
    return False, next(b.reason for b in backends(call.q.device) if b.name == name)


def _auto(call: _call.Call) -> Selection:
    ok, why = sdpa_supports(call)
    if not ok:
        return Selection("tiled", f"sdpa cannot serve it ({why})")
    if call.Nq >= AUTO_KERNEL_ROWS and (call.has_mask or not call.training) and _native.serves(call):
        return Selection("tiled", f"{'training' if call.training else 'inference'} with {call.Nq} >= "
                                  f"{AUTO_KERNEL_ROWS} query rows: qkv's CPU kernel is faster than SDPA here "
                                  f"(benchmarks/NOTES.md)")
    if not call.has_mask:
        return Selection("sdpa", "no mask: SDPA's fused kernel is fastest (benchmarks/NOTES.md)")
    if why.startswith("is_causal"):
        return Selection("sdpa", "plain causal with Nq == Nk: SDPA's fused causal kernel is fastest")
    if why.startswith("one query"):
        return Selection("sdpa", "a decoding step (one query, causal): every key is visible, no mask needed")
    bm = call.block_mask
    st = call.block_state(*(bm.block_size if bm is not None else (BLOCK_Q, BLOCK_K)))
    density = float((st > 0).float().mean())
    if density <= AUTO_TILED_DENSITY:
        return Selection("tiled", f"mask leaves {density:.0%} of the score tiles: tiled skips the rest, "
                                  f"SDPA with a dense mask would pay for all of them")
    return Selection("sdpa", f"mask leaves {density:.0%} of the score tiles: SDPA with a dense mask is faster")


def _choose(call: _call.Call, backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        return _auto(call).name
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    ok, why = _capable(call, backend)
    if not ok:
        raise ValueError(f"backend={backend!r} cannot serve this call: {why}")
    return backend


def _empty(call: _call.Call):
    """Zero-size calls: empty outputs, or zeros (lse = -inf) when there are no keys; still differentiable."""
    out = call.q.new_zeros(call.B, call.Hq, call.Nq, call.Dv)
    touch = call.q.sum() + call.k.sum() + call.v.sum() + (call.bias.sum() if call.bias is not None else 0)
    out = out + 0 * touch.to(out.dtype)
    lse = torch.full((call.B, call.Hq, call.Nq), float("-inf"), device=call.q.device)
    return out, lse


def attention(q, k, v, *, causal=False, window=None, mask=None, bias=None, score_mod=None, alibi_slopes=None,
              softcap=None, scale=None, dropout_p=0.0, generator=None, return_lse=False, backend="auto"):
    """Exact attention ``softmax(scale·q·kᵀ + mods, over visible keys) · v``.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv); ``Hq % Hkv == 0`` (GQA: query head h reads kv
    head ``h // (Hq // Hkv)``); any strides; float16/bfloat16/float32/float64, accumulated in fp32 (fp64).

    Visibility (all ANDed; True = may attend):
      causal: bottom-right aligned, key j visible to query i iff ``j <= i + Nk - Nq`` (FlashAttention's rule;
        queries are the last Nq positions). ``mask=qkv.masks.causal(align="top_left")`` is SDPA's.
      window: ``(left, right)``, visible iff ``i + off - left <= j <= i + off + right`` (``off = Nk - Nq``,
        ``None`` = unbounded).
      mask: a bool tensor broadcastable to (B, Hq, Nq, Nk), a mask_mod ``f(b, h, q_idx, kv_idx) -> bool``, or a
        :class:`qkv.BlockMask` (reusable; lets engines skip empty tiles without evaluating the mask).
    Score mods, in this order: ``softcap`` c (``c·tanh(s/c)``); ``alibi_slopes`` (Hq,) or (B, Hq) (adds
    ``-slope·|i + off - j|``); ``bias`` broadcastable to (B, Hq, Nq, Nk) (differentiable); ``score_mod(s, b, h,
    q_idx, kv_idx)`` (elementwise, on broadcast index tensors; differentiable).
    scale: default ``1/sqrt(D)``. dropout_p: drops probabilities with a counter-based mask drawn from one
    seed taken from ``generator`` (or the global RNG): the same keep-mask on every engine.

    A query row with no visible key returns 0 (lse = -inf, gradients 0). Returns out (B, Hq, Nq, Dv) in q's
    dtype, and with ``return_lse`` also lse (B, Hq, Nq) float32, the natural-log logsumexp of the final scores.
    backend: "auto" (see :func:`select_backend`), "tiled", "reference", "sdpa" or "triton"; an explicit
    backend that cannot serve the call raises ValueError saying why.
    """
    call = _call.prepare(q, k, v, causal=causal, window=window, mask=mask, bias=bias, score_mod=score_mod,
                         alibi_slopes=alibi_slopes, softcap=softcap, scale=scale, dropout_p=dropout_p,
                         generator=generator, return_lse=return_lse)
    name = _choose(call, backend)
    if call.B * call.Hq * call.Nq == 0 or call.Nk == 0:
        out, lse = _empty(call)
    elif name == "reference":
        out, lse = reference_attention(call)
    elif name == "tiled":
        out, lse = tiled_attention(call)
    else:
        out, lse = sdpa_attention(call), None
    return (out, lse) if return_lse else out


def select_backend(q, k, v, **kwargs) -> Selection:
    """What ``backend="auto"`` would run for this call, and why. Takes the same arguments as
    :func:`attention` (``backend`` excepted)."""
    kwargs.pop("backend", None)
    return _auto(_call.prepare(q, k, v, **kwargs))


def attention_weights(q, k, *, causal=False, window=None, mask=None, bias=None, score_mod=None,
                      alibi_slopes=None, softcap=None, scale=None) -> torch.Tensor:
    """The attention probabilities, for inspection: (B, Hq, Nq, Nk), fp32 (fp64 for fp64 inputs).

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); same masks and mods as :func:`attention` (no dropout). Entry
    (b, h, i, j) is how much query i attends to key j; fully masked rows are 0. Computed a block of rows at a
    time; raises ValueError when the result itself would exceed the reference engine's memory budget.
    """
    v = k[..., :0]   # the weights never read v; a zero-width view satisfies validation
    call = _call.prepare(q, k, v, causal=causal, window=window, mask=mask, bias=bias, score_mod=score_mod,
                         alibi_slopes=alibi_slopes, softcap=softcap, scale=scale)
    return reference_weights(call)
