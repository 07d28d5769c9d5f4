"""qkv's CPU attention kernel (``src/qkv/csrc/attn_cpu.c``), loaded with ctypes.

It computes the exact forward, out and lse, of calls whose visibility is a key *range* per query row — no
mask, causal, sliding windows (bottom-right aligned) — with no score mods and no dropout, on CPUs with
AVX-512, in fp32 (fp16/bf16 inputs are computed in fp32, as every engine accumulates them). The tiled engine
runs its forward and backward on it when it serves the call (``serves``). It is built at
install time (``setup.py``, optional) and runs on torch's OpenMP pool, ``torch.get_num_threads()`` threads.

``with qkv.options(cpu_kernel=False)`` turns it off (the tiled engine then computes those calls in torch ops).
"""
from __future__ import annotations

import ctypes
import importlib.util

import torch

from ..core.call import Call
from ..core.options import get_options

__all__ = ["available", "serves", "attention_fwd", "attention_bwd"]

_VERSION = 2                 # qkv_native_version() of the C source this wrapper speaks to
_lib = None
_why = None                  # why the kernel cannot run here (None: not probed yet, or loaded)


def _load():
    global _lib, _why
    if _lib is not None or _why is not None:
        return _lib
    spec = importlib.util.find_spec("qkv._attn_cpu")
    if spec is None or not spec.origin:
        _why = "the CPU kernel was not built (setup.py builds it at install; it needs a C compiler)"
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:
        _why = f"the CPU kernel could not be loaded: {e}"
        return None
    if lib.qkv_native_version() != _VERSION:
        _why = f"the CPU kernel is a stale build (version {lib.qkv_native_version()}, want {_VERSION}): reinstall"
    elif not lib.qkv_native_supported():
        _why = "this CPU lacks AVX-512 (F, DQ, VL, BW), which the CPU kernel needs"
    else:
        lib.qkv_attn_fwd_f32.restype = ctypes.c_int
        tail = [ctypes.POINTER(ctypes.c_int64)] * 2 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
        lib.qkv_attn_fwd_f32.argtypes = [ctypes.c_void_p] * 5 + tail
        lib.qkv_attn_bwd_f32.restype = ctypes.c_int
        lib.qkv_attn_bwd_f32.argtypes = [ctypes.c_void_p] * 9 + tail
        _lib = lib
    return _lib


def available() -> tuple[bool, str]:
    """Whether the kernel can run on this machine, and if not, why."""
    if _load() is None:
        return False, _why
    return True, "AVX-512 CPU kernel (causal / sliding-window / unmasked, forward and backward, fp32)"


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def serves(call: Call) -> bool:
    """Whether the kernel computes this call exactly: CPU, fp32/fp16/bf16, visibility given by ``causal``
    and ``window`` alone, no score mods, no dropout, D and Dv > 0."""
    return (get_options().cpu_kernel and call.q.device.type == "cpu" and call.q.dtype in _DTYPES and not call.has_mods
            and not call.dropout_p and call.mask is None and min(call.D, call.Dv) > 0
            and max(call.Nq, call.Nk) < 2**30 and _ready())


@torch.compiler.assume_constant_result
def _ready() -> bool:
    """Whether the kernel is loaded and runs here (a constant to torch.compile: loading is not traced)."""
    return _load() is not None


def _range(call: Call) -> tuple[int, int]:
    """(left, right) as the kernel reads them: key j is visible to query i iff
    i + (Nk - Nq) - left <= j <= i + (Nk - Nq) + right (the call's own offset folded in)."""
    left, right = call.key_range()
    shift = call.offset - (call.Nk - call.Nq)
    return left - shift, right + shift


def _geometry(call: Call, q, k, v, x, lse, *more):
    """The kernel's shape arguments: dims (B, Hq, Hkv, Nq, Nk, D, Dv, *more), strides (q, k, v, x: batch,
    head, row; lse: batch, head), the key range (left, right) and the scale."""
    dims = (ctypes.c_int64 * (7 + len(more)))(call.B, call.Hq, call.Hkv, call.Nq, call.Nk, call.D, call.Dv, *more)
    strides = (ctypes.c_int64 * 14)(*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *x.stride()[:3],
                                    *lse.stride()[:2])
    return (dims, strides, *_range(call), call.scale)


def _rows(*ts):
    """fp32 views whose rows are contiguous (what the kernel reads; other strides are free)."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in (t.to(torch.float32) for t in ts)]


def _check(rc: int):
    if rc != 0:
        raise MemoryError("qkv's CPU attention kernel could not allocate its workspace or start its threads")


def attention_fwd(call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) float32 of a call the kernel ``serves``.
    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv), any strides."""
    lib = _load()
    q, k, v = _rows(call.q, call.k, call.v)
    out = torch.empty(call.B, call.Hq, call.Nq, call.Dv, dtype=torch.float32)
    lse = torch.empty(call.B, call.Hq, call.Nq, dtype=torch.float32)
    _check(lib.qkv_attn_fwd_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                *_geometry(call, q, k, v, out, lse), torch.get_num_threads()))
    return out.to(call.q.dtype), lse


def attention_bwd(call: Call, out, lse, dout, dlse=None):
    """(dq, dk, dv) in the inputs' dtypes for a call the kernel ``serves``, from its forward's out
    (B, Hq, Nq, Dv) and lse (B, Hq, Nq) float32, the output gradient dout (B, Hq, Nq, Dv) and, when the lse
    was used, its gradient dlse (B, Hq, Nq). Probabilities are recomputed from lse (nothing kept)."""
    lib = _load()
    q, k, v, g = _rows(call.q, call.k, call.v, dout)
    delta = (g * out.to(torch.float32)).sum(-1)          # rowsum(dO·O): the softmax backward's row term
    if dlse is not None:
        delta = delta - dlse.to(torch.float32)           # d lse / d s = p: folds into the same term
    lse, delta = lse.to(torch.float32).contiguous(), delta.contiguous()
    B, Hq, Hkv, Nq, Nk = call.B, call.Hq, call.Hkv, call.Nq, call.Nk
    # A task owns one kv head's dK/dV share; with fewer kv heads than twice the threads, their query tiles are
    # split into parts with shares of their own, summed here.
    nthreads = torch.get_num_threads()
    parts = max(1, min(-(-2 * nthreads // (B * Hkv)), -(-Nq // 32)))
    dq = torch.empty(B, Hq, Nq, call.D, dtype=torch.float32)
    dk = torch.zeros(parts, B, Hkv, Nk, call.D, dtype=torch.float32)
    dv = torch.zeros(parts, B, Hkv, Nk, call.Dv, dtype=torch.float32)
    _check(lib.qkv_attn_bwd_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), g.data_ptr(), lse.data_ptr(),
                                delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                                *_geometry(call, q, k, v, g, lse, parts), nthreads))
    dk, dv = (x[0] if parts == 1 else x.sum(0) for x in (dk, dv))
    return dq.to(call.q.dtype), dk.to(call.k.dtype), dv.to(call.v.dtype)
