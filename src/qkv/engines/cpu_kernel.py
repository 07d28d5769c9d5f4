"""qkv's CPU attention kernel (``src/qkv/csrc``), loaded with ctypes (its output check also as a Python module).

It computes the exact forward, out and lse, and the backward of calls whose visibility is a key *range* per
query row — no mask, causal, sliding windows (bottom-right aligned) — with no score mods and no dropout, in
fp32 from fp32, bf16 or fp16 inputs (half inputs are converted as they are loaded, never copied to fp32).
The tiled engine runs its forward and backward on it when it serves the call (``serves``). It is built at
install time (``setup.py``, optional) and runs on torch's OpenMP pool, ``torch.get_num_threads()`` threads.

One C source, compiled once per instruction set: ``avx512`` and ``avx2`` (AVX2 + FMA + F16C) on x86-64,
``neon`` on ARM64. The best variant this CPU runs is used; ``with qkv.options(cpu_isa="avx2")`` (default: the
environment variable ``QKV_CPU_ISA``) runs a lower one, and ``cpu_isa="none"`` or
``qkv.options(cpu_kernel=False)`` turns the kernel off (the tiled engine then computes those calls in torch
ops). ``isa()`` tells which variant runs.

Calls with few query rows (``Nq <= DECODE_ROWS``: decoding) take the kernel's decoding path: the query heads
of each kv head form one tile, each key and value is read once for all of them, and the keys are split across
threads (partial results merged by their lse).
"""
from __future__ import annotations

import ctypes
import importlib.util

import torch

from ..core.call import Call
from ..core.options import get_options

__all__ = ["DECODE_ROWS", "available", "variants", "isa", "serves", "attention_fwd", "attention_bwd",
           "rows_plausible", "row_check"]

#: Calls with at most this many query rows run on the decoding path (the C library's qkv_decode_rows_max()).
DECODE_ROWS = 16
_VERSION = 4                 # qkv_native_version() of the C source this wrapper speaks to
_lib = None
_why = None                  # why the kernel cannot run here (None: not probed yet, or loaded)
_variants: list[tuple[str, bool]] = []   # compiled-in variants, best first, and whether this CPU runs them
_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_NEEDS = {"avx512": "AVX-512 F/DQ/VL/BW", "avx2": "AVX2 + FMA + F16C", "neon": "ARM64 NEON"}


def _load():
    global _lib, _why, _variants
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
        return None
    lib.qkv_isa_name.restype = ctypes.c_char_p
    _variants = [(lib.qkv_isa_name(i).decode(), bool(lib.qkv_isa_runs(i))) for i in range(lib.qkv_isa_count())]
    if not any(runs for _, runs in _variants):
        _why = ("this CPU runs none of the CPU kernel's variants ("
                + (", ".join(f"{n}: {_NEEDS.get(n, n)}" for n, _ in _variants) or "none built for this architecture")
                + ")")
        return None
    i64p, i64, f32, i32, ptr = (ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_float, ctypes.c_int,
                                ctypes.c_void_p)
    tail = [i64p, i64p, i64, i64, f32, i32]
    lib.qkv_attn_fwd.argtypes = [i32, i32, i32] + [ptr] * 5 + tail
    lib.qkv_attn_decode.argtypes = [i32, i32] + [ptr] * 5 + tail
    lib.qkv_attn_bwd.argtypes = [i32, i32] + [ptr] * 9 + tail
    lib.qkv_rows_plausible.argtypes = [i32, ptr] + [i64] * 8
    for f in (lib.qkv_attn_fwd, lib.qkv_attn_decode, lib.qkv_attn_bwd, lib.qkv_rows_plausible):
        f.restype = ctypes.c_int
    assert lib.qkv_decode_rows_max() == DECODE_ROWS
    _lib = lib
    return _lib


def variants() -> list[tuple[str, bool]]:
    """The kernel's variants built for this architecture, best first, as ``(name, runs on this CPU)``;
    empty when the kernel is not built or cannot be loaded."""
    _load()
    return list(_variants)


def isa() -> str | None:
    """The variant the kernel runs now: ``qkv.options(cpu_isa=...)`` when set (``"none"``: off), else the best
    this CPU runs; None when the kernel is off or cannot run here. Raises ValueError when ``cpu_isa`` names a
    variant that is not built or that this CPU cannot run."""
    i = _choice()
    return None if i is None else _variants[i][0]


_chosen: dict = {}           # (cpu_isa, variants) -> the variant's index, or why none (a str)


def _choice() -> int | None:
    """Index of the variant to run (see ``isa``), resolved once per value of the cpu_isa option."""
    opts = get_options()
    if not opts.cpu_kernel or not _ready():
        return None
    key = (opts.cpu_isa, tuple(_variants))
    got = _chosen.get(key)
    if got is None:
        got = _chosen[key] = _resolve((opts.cpu_isa or "").strip().lower())
    if isinstance(got, str):
        raise ValueError(got)
    return got if got >= 0 else None


def _resolve(want: str):
    if want == "none":
        return -1
    if not want:
        return next(i for i, (_, runs) in enumerate(_variants) if runs)
    for i, (name, runs) in enumerate(_variants):
        if name == want:
            if not runs:
                return (f"cpu_isa={want!r} (qkv.options or QKV_CPU_ISA): this CPU cannot run it (needs "
                        f"{_NEEDS.get(name, name)}); it runs " + ", ".join(n for n, r in _variants if r))
            return i
    return (f"cpu_isa={want!r} (qkv.options or QKV_CPU_ISA) is not a variant of the CPU kernel here; choose one "
            "of " + ", ".join([n for n, _ in _variants] + ["none"]))


def available() -> tuple[bool, str]:
    """Whether the kernel can run on this machine, and if not, why (and which variant it runs)."""
    if _load() is None:
        return False, _why
    try:
        name = isa()
    except ValueError as e:
        return False, str(e)
    if name is None:
        return False, ("turned off (qkv.options(cpu_kernel=False))" if not get_options().cpu_kernel
                       else "turned off (cpu_isa='none')")
    others = [n for n, runs in _variants if runs and n != name]
    return True, (f"{name} CPU kernel (causal / sliding-window / unmasked, forward and backward, decoding; fp32 "
                  f"compute from fp32/bf16/fp16)" + (f"; also runs here: {', '.join(others)}" if others else ""))


def serves(call: Call) -> bool:
    """Whether the kernel computes this call exactly: CPU, fp32/fp16/bf16, visibility given by ``causal``
    and ``window`` alone, no score mods, no dropout, D and Dv > 0, scale > 0. Raises ValueError when the
    cpu_isa option asks for a variant this machine cannot run."""
    return (call.q.device.type == "cpu" and call.q.dtype in _DT and not call.has_mods
            and not call.dropout_p and call.mask is None and min(call.D, call.Dv) > 0 and call.scale > 0
            and max(call.Nq, call.Nk) < 2**30 and _choice() is not None)


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


def _rows(*ts, dtype=None):
    """Views whose rows are contiguous (what the kernel reads; other strides are free), in ``dtype`` if given."""
    ts = (t if dtype is None else t.to(dtype) for t in ts)
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _check(rc: int):
    if rc == -2:
        raise RuntimeError("qkv's CPU kernel refused the call: the variant or element type does not run here")
    if rc != 0:
        raise MemoryError("qkv's CPU attention kernel could not allocate its workspace or start its threads")


def _tiles_per_pass(call: Call) -> int:
    """Tiles a task takes through each chunk of keys together: 4 when rows are long (K and V then come from
    memory once per four tiles; benchmarks/NOTES.md), else 1 (finer tasks)."""
    left, right = _range(call)
    return 4 if min(call.Nk, left + right + 1) > 1024 else 1


def attention_fwd(call: Call, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) float32 of a call the kernel ``serves``.
    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv), any strides. path: "decode" or "tiles";
    default "decode" for at most DECODE_ROWS query rows."""
    lib = _load()
    if path is None:
        path = "decode" if call.Nq <= DECODE_ROWS else "tiles"
    if path not in ("decode", "tiles") or (path == "decode" and call.Nq > DECODE_ROWS):
        raise ValueError(f"path must be 'tiles', or 'decode' for at most {DECODE_ROWS} query rows, got {path!r} "
                         f"for {call.Nq} rows")
    q, k, v = _rows(call.q, call.k, call.v)
    out = torch.empty(call.B, call.Hq, call.Nq, call.Dv, dtype=torch.float32)
    lse = torch.empty(call.B, call.Hq, call.Nq, dtype=torch.float32)
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            *_geometry(call, q, k, v, out, lse), torch.get_num_threads())
    if path == "decode":
        _check(lib.qkv_attn_decode(_choice(), _DT[q.dtype], *args))
    else:
        _check(lib.qkv_attn_fwd(_choice(), _DT[q.dtype], _tiles_per_pass(call), *args))
    return out.to(call.q.dtype), lse


def attention_bwd(call: Call, out, lse, dout, dlse=None):
    """(dq, dk, dv) in the inputs' dtypes for a call the kernel ``serves``, from its forward's out
    (B, Hq, Nq, Dv) and lse (B, Hq, Nq) float32, the output gradient dout (B, Hq, Nq, Dv) and, when the lse
    was used, its gradient dlse (B, Hq, Nq). Probabilities are recomputed from lse (nothing kept)."""
    lib = _load()
    # q, k, v and dout are read in one element type: the inputs', unless dout comes in another (then fp32)
    dtype = None if dout.dtype == call.q.dtype else torch.float32
    q, k, v, g = _rows(call.q, call.k, call.v, dout, dtype=dtype)
    delta = (g.to(torch.float32) * out.to(torch.float32)).sum(-1)   # rowsum(dO·O): the softmax backward's row term
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
    _check(lib.qkv_attn_bwd(_choice(), _DT[q.dtype], q.data_ptr(), k.data_ptr(), v.data_ptr(), g.data_ptr(),
                            lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                            *_geometry(call, q, k, v, g, lse, parts), nthreads))
    dk, dv = (x[0] if parts == 1 else x.sum(0) for x in (dk, dv))
    return dq.to(call.q.dtype), dk.to(call.k.dtype), dv.to(call.v.dtype)


_rows_fn = False             # the library's rows_plausible called through the CPython API (False: not looked up)


def row_check(dtype: torch.dtype):
    """``(f, code)`` such that ``f(code, out.data_ptr(), out.shape, out.stride())`` is :func:`rows_plausible`
    for a CPU output out (B, H, N, Dv) of this dtype — a C function called through the CPython API (~0.2 µs, where
    a ctypes call costs ~3.5 µs), for callers that check an output on every call; None when the library is not
    built or does not take this dtype."""
    global _rows_fn
    if _rows_fn is False:
        try:                           # the compiled library, imported as a Python module
            _rows_fn = getattr(importlib.import_module("qkv._attn_cpu"), "rows_plausible", None)
        except ImportError:            # not built, or a build that is a ctypes library only
            _rows_fn = None
    if _rows_fn is None or dtype not in _DT:
        return None
    return _rows_fn, _DT[dtype]


def rows_plausible(out: torch.Tensor) -> bool | None:
    """Whether every row of an attention output out (B, H, N, Dv) is finite and not all zeros, read in one C
    pass (well under a microsecond on a small output, where three torch reductions cost ~13 µs); None when the
    library is not built or out is not a CPU fp32/bf16/fp16 tensor of 4 dims (the caller then checks in torch)."""
    if out.device.type != "cpu" or out.dim() != 4:
        return None
    check = row_check(out.dtype)
    if check is not None:
        f, code = check
        return f(code, out.data_ptr(), out.shape, out.stride())
    lib = _lib if _lib is not None else _load()
    if lib is None or out.dtype not in _DT:
        return None
    return bool(lib.qkv_rows_plausible(_DT[out.dtype], out.data_ptr(), *out.shape, *out.stride()))
