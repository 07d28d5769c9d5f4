"""The kernels, compiled or interpreted: a kernel file executed once per mode, so one process can run
interpreted kernels on CPU tensors and still compile the same kernels for a GPU target (``qkv kernels``); and
the recording of launches for such a target. Also used by :mod:`qkv.linear`'s Triton kernels."""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import sys
import threading

__all__ = ["interpreting", "module", "exec_kernels", "Recorder", "recording"]

_LOCK = threading.Lock()


def interpreting() -> bool:
    """Whether Triton's interpreter is switched on (``TRITON_INTERPRET=1``): then CPU tensors run the kernels."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def exec_kernels(name: str, path: str, interpret: bool):
    """The module ``name``: the kernel file ``path`` executed once (per process) with the global ``_INTERPRET``
    set, so that it defines JITFunctions (``interpret=False``) or Triton-interpreter functions."""
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    with _LOCK:
        mod = sys.modules.get(name)
        if mod is None:
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            mod._INTERPRET = interpret
            spec.loader.exec_module(mod)
            sys.modules[name] = mod
    return mod


def module(interpret: bool):
    """The exact-attention kernel module: JITFunctions (``interpret=False``) or Triton-interpreter functions."""
    return exec_kernels(f"{__package__}.kernels_{'interpreted' if interpret else 'compiled'}",
                        os.path.join(os.path.dirname(__file__), "kernels.py"), interpret)


class Recorder:
    """Stands in for a kernel module while launches are recorded: ``R.name[grid](*args, **kwargs)`` runs nothing
    and appends ``(name, JITFunction, args, kwargs)`` to ``calls``; ``compiled`` gives the compiled module."""

    def __init__(self, calls: list, compiled):
        self.calls, self.compiled = calls, compiled

    def __getattr__(self, name):
        fn = getattr(self.compiled(), name)
        calls = self.calls

        class _Launch:
            def __getitem__(self, grid):
                return lambda *a, **kw: calls.append((name, fn, a, kw))
        return _Launch()


@contextlib.contextmanager
def recording(target: contextvars.ContextVar, arch: int):
    """Set ``target`` to ``(arch, calls)`` for the block and yield ``calls``: launchers that see it set record
    their launches (through a :class:`Recorder`) instead of running them."""
    calls: list = []
    token = target.set((arch, calls))
    try:
        yield calls
    finally:
        target.reset(token)
