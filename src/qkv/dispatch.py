"""The engine registry and ``auto``'s policy.

:data:`ENGINES` lists the engines in order; ``qkv.backends()``, ``select_backend``, ``backend="auto"``,
``qkv info``, ``qkv check`` and ``qkv bench --providers`` all read it. Adding an engine is its module and one
entry here (or :func:`register`). ``auto`` decides on typed facts of the validated call (:class:`qkv.core.Call`:
``range_only``, ``plain_causal``, ``every_key_visible``, ``density``, the engines' ``supports``), never on
the text of a reason. Its thresholds come from measurements recorded in ``benchmarks/NOTES.md``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .core.call import Call
from .engines import cpu_kernel
from .engines.base import Engine
from .engines.reference import ENGINE as _REFERENCE
from .engines.sdpa import ENGINE as _SDPA
from .engines.tiled import ENGINE as _TILED
from .engines.triton import ENGINE as _TRITON
from .engines.triton import TritonEngine

__all__ = ["ENGINES", "Selection", "register", "engine", "names", "choose", "auto",
           "AUTO_TILED_DENSITY", "AUTO_KERNEL_ROWS", "AUTO_DECODE_ROWS", "AUTO_DECODE_KEYS"]

#: The engines, in order: what ``backend=`` may name (besides "auto").
ENGINES: list[Engine] = [_REFERENCE, _TILED, _SDPA, _TRITON]

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

#: auto sends decoding calls (at most ``cpu_kernel.DECODE_ROWS`` query rows, inference) that the CPU kernel
#: serves to its decoding path when the rows of a kv head's query heads (G·Nq) are at most this many, and for
#: fp32 when the keys times G reach AUTO_DECODE_KEYS: it reads K and V once for all G heads where SDPA reads
#: them per query head. Measured (benchmarks/NOTES.md step 21, one thread, D = 64/128): bf16 4-12x SDPA at one
#: query row from 64 keys on; fp32 GQA (G = 4) 1.3-2.1x from 1024 keys, MHA 1.1-1.25x from 4096 keys, below
#: that 0.6-0.9x; 64 rows (G = 4, Nq = 16) 0.7-1.2x.
AUTO_DECODE_ROWS = 16
AUTO_DECODE_KEYS = 4096


class Selection(NamedTuple):
    """What ``auto`` runs for a call, and why."""
    name: str
    reason: str


def register(new: Engine, *, before: str | None = None) -> None:
    """Add an engine to the registry (at the end, or before the one named ``before``). Its name must be new."""
    if not isinstance(new, Engine):
        raise TypeError(f"engine must be a qkv.engines.base.Engine, got {type(new).__name__}")
    if not new.name or new.name == "auto" or new.name in names():
        raise ValueError(f"engine name {new.name!r} is empty, 'auto' or already registered ({names()})")
    at = len(ENGINES) if before is None else names().index(before)
    ENGINES.insert(at, new)


def names() -> list[str]:
    return [e.name for e in ENGINES]


def engine(name: str) -> Engine:
    """The registered engine called ``name`` (ValueError listing the names otherwise)."""
    for e in ENGINES:
        if e.name == name:
            return e
    raise ValueError(f"backend must be 'auto' or one of {tuple(names())}, got {name!r}")


def choose(call: Call, backend: str) -> Engine:
    """The engine that runs ``call``: auto's pick, or the named one when it supports the call (ValueError
    listing every reason otherwise)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        return engine(auto(call).name)
    e = engine(backend)
    why = e.supports(call)
    if why:
        raise ValueError(f"backend={backend!r} cannot serve this call: " + "; ".join(why))
    return e


def _auto_cuda(call: Call) -> Selection | None:
    """auto on a CUDA device, or None to fall through to the device-independent rules. Measured on an H200
    (bf16; benchmarks/gpu_bar.py, benchmarks/gpu_tune.py, benchmarks/NOTES.md): decoding steps go to triton's
    split-KV kernel, which needs no device-to-host wait (32k cached keys: 0.264 ms through ``qkv.attention``,
    SDPA through qkv 0.330 ms, SDPA-cuDNN called alone 0.248 ms). Otherwise SDPA's fused kernels (cuDNN on
    Hopper, FlashAttention-2) are the fastest on the calls they serve natively — no mask, or plain causal — by
    1.4–2.5× over the triton engine, so they keep those calls unless the logsumexp is asked for. The triton engine
    takes every other mask and mod it supports (SDPA would run them as dense masked attention); score_mod
    callables go to tiled."""
    if _TRITON.supports(call):
        return None
    if TritonEngine.decodes(call):
        return Selection("triton", f"decoding ({call.Nq} query rows x {call.G} heads per kv head, {call.Nk} keys): "
                                   f"triton's split-KV kernel reads each kv head once for its query heads, with no "
                                   f"device-to-host wait")
    if not _SDPA.supports(call) and (not call.has_mask or call.plain_causal or call.every_key_visible):
        return Selection("sdpa", "no mask or plain causal on CUDA: SDPA's fused kernels (cuDNN, FlashAttention-2) "
                                 "are the fastest here (measured on an H200)")
    return Selection("triton", "a mask or mod SDPA has no fused kernel for: triton computes it in its kernels and "
                               "skips the empty tiles")


def auto(call: Call) -> Selection:
    """The policy: the fastest engine that supports the call, by rules measured on this project's machines."""
    if call.device.type == "cuda":
        pick = _auto_cuda(call)
        if pick is not None:
            return pick
    sdpa_ok = not _SDPA.supports(call)
    if not sdpa_ok:
        return Selection("tiled", "SDPA cannot serve it (" + "; ".join(_SDPA.supports(call)) + ")")
    if (call.G * call.Nq <= AUTO_DECODE_ROWS and call.Nq <= cpu_kernel.DECODE_ROWS and not call.training
            and (call.q.dtype != torch.float32 or call.G * call.Nk >= AUTO_DECODE_KEYS) and cpu_kernel.serves(call)):
        return Selection("tiled", f"decoding ({call.Nq} query rows x {call.G} heads per kv head, {call.Nk} keys): "
                                  f"qkv's CPU kernel reads K and V once for the {call.G} heads (benchmarks/NOTES.md)")
    if call.Nq >= AUTO_KERNEL_ROWS and (call.has_mask or not call.training) and cpu_kernel.serves(call):
        return Selection("tiled", f"{'training' if call.training else 'inference'} with {call.Nq} >= "
                                  f"{AUTO_KERNEL_ROWS} query rows: qkv's CPU kernel is faster than SDPA here "
                                  f"(benchmarks/NOTES.md)")
    if not call.has_mask:
        return Selection("sdpa", "no mask: SDPA's fused kernel is fastest (benchmarks/NOTES.md)")
    if call.plain_causal:
        return Selection("sdpa", "plain causal with Nq == Nk: SDPA's fused causal kernel is fastest")
    if call.every_key_visible:
        return Selection("sdpa", "every row sees every key (a decoding step): no mask needed")
    density = call.density()
    if density is None:
        return Selection("sdpa", "a bool tensor mask while compiling: its density is not read (build a "
                                 "BlockMask to let auto skip empty tiles)")
    if density <= AUTO_TILED_DENSITY:
        return Selection("tiled", f"mask leaves {density:.0%} of the score tiles: tiled skips the rest, "
                                  f"SDPA with a dense mask would pay for all of them")
    return Selection("sdpa", f"mask leaves {density:.0%} of the score tiles: SDPA with a dense mask is faster")
