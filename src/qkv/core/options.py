"""Switches a user may flip, as a context manager — never mutable module globals.

``with qkv.options(cpu_kernel=False): ...`` changes them for the code inside the block, in this thread (or
asyncio task) only; ``qkv.get_options()`` tells the current values. Engines read them when a call is made.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import os
from collections.abc import Iterator

import torch

__all__ = ["Options", "options", "get_options", "current"]

_SERIALS = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class Options:
    """The current switches.

    cpu_kernel: run qkv's C kernel for the calls it serves (the tiled engine's fastest CPU path); False
      computes them with torch ops instead (same semantics).
    cpu_isa: force an instruction-set variant of the C kernel (``"avx512"``, ``"avx2"``, ``"neon"``, ...; a
      lower one than the CPU has, e.g. to test it); None = the best this CPU runs. Default from the
      environment variable ``QKV_CPU_ISA``.
    tiled_fused: let the tiled engine hand unmodified runs to PyTorch's fused CPU flash kernel.
    band_keep_bytes: the sliding-window band path keeps its probabilities for the backward up to this many
      bytes per call (0: always recompute them).
    band_keep_ratio: ... and only while they are at most this many times the values of q.
    """
    cpu_kernel: bool = True
    cpu_isa: str | None = None
    tiled_fused: bool = True
    band_keep_bytes: int = 256 * 2**20
    band_keep_ratio: int = 8
    serial: int = dataclasses.field(default=0, compare=False, repr=False)   # set on creation; a cheap cache key

    def __post_init__(self):
        object.__setattr__(self, "serial", next(_SERIALS))


_TYPES = {"cpu_kernel": bool, "cpu_isa": (str, type(None)), "tiled_fused": bool, "band_keep_bytes": int,
          "band_keep_ratio": int}

_current: contextvars.ContextVar[Options] = contextvars.ContextVar(  # Options is frozen: an immutable default
    "qkv_options", default=Options(cpu_isa=os.environ.get("QKV_CPU_ISA") or None))  # noqa: B039
# torch.compile cannot trace ContextVar.get: while tracing, the options come from this mirror of the most
# recent value set (a global, so the compiled graph is guarded on it and retraced when it changes).
_traced = [_current.get()]


#: The options in force, for eager code on a per-call path (no check for tracing; :func:`get_options` has it).
current = _current.get


def get_options() -> Options:
    """The switches in force here (see :class:`Options`)."""
    if torch.compiler.is_compiling():
        return _traced[0]
    return _current.get()


@contextlib.contextmanager
def options(**changes) -> Iterator[Options]:
    """Change switches inside a ``with`` block: ``with qkv.options(cpu_kernel=False): ...``.

    Unknown names raise ``TypeError``; wrongly typed values ``TypeError``; negative sizes ``ValueError``.
    Yields the options in force inside the block; the previous ones come back when it ends (also on error).
    """
    for name, value in changes.items():
        if name not in _TYPES:
            raise TypeError(f"qkv.options() got an unknown switch {name!r}; known: {', '.join(_TYPES)}")
        want = _TYPES[name]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise TypeError(f"qkv.options({name}=...) must be {getattr(want, '__name__', 'str or None')}, "
                            f"got {type(value).__name__}")
        if want is int and value < 0:
            raise ValueError(f"qkv.options({name}=...) must be >= 0, got {value}")
    token = _current.set(dataclasses.replace(_current.get(), **changes))
    _traced[0] = _current.get()
    try:
        yield _current.get()
    finally:
        _current.reset(token)
        _traced[0] = _current.get()
