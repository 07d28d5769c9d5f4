"""The public functions: ``attention``, ``attention_weights``, ``select_backend``, ``backends``.

Each validates its arguments (:func:`qkv.core.call.prepare`), asks the registry (:mod:`qkv.dispatch`) which
engine runs the call, and runs it. Every engine computes the same semantics (see ``docs/semantics.md``).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from . import dispatch
from .core.call import Call, prepare
from .core.finite import NonFiniteInputs
from .core.options import current as _options
from .dispatch import Selection
from .engines.reference import reference_weights
from .engines.sdpa import direct

__all__ = ["attention", "attention_weights", "backends", "select_backend", "BackendInfo", "Selection"]


class BackendInfo(NamedTuple):
    """An engine of the registry: its name, whether it can run on the device asked about, and what it is (or
    why it cannot run there)."""
    name: str
    available: bool
    reason: str


def backends(device: str | torch.device | None = None) -> list[BackendInfo]:
    """The registered engines, in order, and whether each can run on ``device`` (default CPU), and why not."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = []
    for e in dispatch.ENGINES:
        why = e.unavailable(dev)
        out.append(BackendInfo(e.name, not why, "; ".join(why) if why else e.summary))
    return out


def _empty(call: Call):
    """Zero-size calls: empty outputs, or zeros (lse = -inf) when there are no keys; still differentiable."""
    out = call.q.new_zeros(call.B, call.Hq, call.Nq, call.Dv)
    touch = call.q.sum() + call.k.sum() + call.v.sum() + (call.bias.sum() if call.bias is not None else 0)
    out = out + (0 * touch.to(out.dtype)).nan_to_num(0.0, 0.0, 0.0)    # a NaN input stays out of the zeros
    lse = torch.full((call.B, call.Hq, call.Nq), float("-inf"), device=call.q.device)
    return out, lse


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              window: tuple[int | None, int | None] | None = None, mask=None, bias: torch.Tensor | None = None,
              score_mod=None, alibi_slopes: torch.Tensor | None = None, softcap: float | None = None,
              scale: float | None = None, dropout_p: float = 0.0, generator: torch.Generator | None = None,
              return_lse: bool = False, backend: str = "auto"):
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
    backend: "auto" (see :func:`select_backend`) or a registered engine (:func:`backends`: "reference",
    "tiled", "sdpa", ...); an explicit backend that cannot serve the call raises ValueError giving every reason.
    """
    key = None
    if (mask is bias is score_mod is alibi_slopes is softcap is window is generator is None and return_lse is False
            and backend == "auto" and (causal is True or causal is False) and (scale is None or type(scale) is float)
            and type(dropout_p) in (int, float) and dropout_p == 0 and not _compiling()
            and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        # The common call (causal or nothing, default everything else): validated and dispatched once per
        # signature, then run directly. The key holds what dispatch reads; k's and v's dtypes are left out
        # because SDPA refuses a dtype that differs from q's (the run then returns None: the full path raises),
        # and whether autograd records the call is read only for the signatures where auto's pick depends on it.
        key = (q.shape, k.shape, v.shape, q.dtype, q.device, k.device, v.device, causal, scale, _options().serial)
        run = _FAST.get(key)
        if run is not None:
            if run.__class__ is tuple:
                run = run[_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)]
            out = None if run is None else run(q, k, v)
            if out is not None:
                return out
    call = prepare(q, k, v, causal=causal, window=window, mask=mask, bias=bias, score_mod=score_mod,
                   alibi_slopes=alibi_slopes, softcap=softcap, scale=scale, dropout_p=dropout_p,
                   generator=generator, return_lse=return_lse)
    eng = dispatch.choose(call, backend)
    if call.B * call.Hq * call.Nq == 0 or call.Nk == 0 or call.device.type == "meta":
        out, lse = _empty(call)          # meta tensors: results of the right shape and dtype, no values
    else:
        try:
            out, lse = eng.forward(call)
        except NonFiniteInputs:
            if backend != "auto":
                raise
            # auto's pick found NaN/inf inputs it cannot compute exactly: the tiled engine can
            eng = dispatch.engine("tiled")
            out, lse = eng.forward(call)
        if key is not None and eng.name == "sdpa":
            _remember(key, call)
    return (out, lse) if return_lse else out


_FAST: dict = {}
_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled


def _remember(key, call: Call) -> None:
    """Cache the direct SDPA call for this signature (what dispatch chose; SDPA reads any strides). An output
    SDPA may have got wrong from NaN/inf inputs (sdpa.plausible) makes it return None: the full path instead.
    The entry is the run when auto picks SDPA with and without autograd, else a pair (without, with) holding
    None where the pick is not known to be SDPA."""
    run = direct(call, default_scale=key[8] is None)
    if run is None:
        return
    if len(_FAST) >= 4096:
        _FAST.clear()
    if _sdpa_either_way(call):
        _FAST[key] = run
    else:
        pair = list(_FAST.get(key) or (None, None))
        pair[call.training] = run
        _FAST[key] = tuple(pair)


def _sdpa_either_way(call: Call) -> bool:
    """Whether auto would pick SDPA for this call (which it did) also with autograd the other way round."""
    try:
        if call.training:
            with torch.no_grad():
                return dispatch.auto(call).name == "sdpa"
        with torch.enable_grad():
            return dispatch.auto(dataclasses.replace(call, q=call.q.detach().requires_grad_())).name == "sdpa"
    except RuntimeError:      # e.g. an inference-mode tensor cannot require grad: the key keeps the grad flag
        return False


def select_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> Selection:
    """What ``backend="auto"`` would run for this call, and why. Takes the same arguments as
    :func:`attention` (``backend`` excepted)."""
    kwargs.pop("backend", None)
    return dispatch.auto(prepare(q, k, v, **kwargs))


def attention_weights(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False, window=None, mask=None,
                      bias: torch.Tensor | None = None, score_mod=None, alibi_slopes: torch.Tensor | None = None,
                      softcap: float | None = None, scale: float | None = None) -> torch.Tensor:
    """The attention probabilities, for inspection: (B, Hq, Nq, Nk), fp32 (fp64 for fp64 inputs).

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); same masks and mods as :func:`attention` (no dropout). Entry
    (b, h, i, j) is how much query i attends to key j; fully masked rows are 0. Computed a block of rows at a
    time; raises ValueError when the result itself would exceed the reference engine's memory budget.
    """
    v = k[..., :0]   # the weights never read v; a zero-width view satisfies validation
    call = prepare(q, k, v, causal=causal, window=window, mask=mask, bias=bias, score_mod=score_mod,
                   alibi_slopes=alibi_slopes, softcap=softcap, scale=scale)
    return reference_weights(call)
