"""The kernels, compiled or interpreted: ``kernels.py`` executed once per mode, so one process can run
interpreted kernels on CPU tensors and still compile the same kernels for a GPU target (``qkv kernels``)."""
from __future__ import annotations

import importlib.util
import os
import sys
import threading

__all__ = ["interpreting", "module"]

_LOCK = threading.Lock()


def interpreting() -> bool:
    """Whether Triton's interpreter is switched on (``TRITON_INTERPRET=1``): then CPU tensors run the kernels."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def module(interpret: bool):
    """The kernel module: JITFunctions (``interpret=False``) or Triton-interpreter functions."""
    name = f"{__package__}.kernels_{'interpreted' if interpret else 'compiled'}"
    mod = sys.modules.get(name)
    if mod is not None:
        return mod
    with _LOCK:
        mod = sys.modules.get(name)
        if mod is None:
            spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "kernels.py"))
            mod = importlib.util.module_from_spec(spec)
            mod._INTERPRET = interpret
            spec.loader.exec_module(mod)
            sys.modules[name] = mod
    return mod
