"""The engine contract: what an engine declares and what it runs.

An engine is one object (usually one module or folder under ``qkv.engines``) with

* ``name`` — what ``backend=`` selects it by; ``summary`` — one line for ``qkv.backends()`` / ``qkv info``;
* ``unavailable(device) -> list[str]`` — every reason it cannot run on that device at all ([] = it can);
* ``supports(call) -> list[str]`` — every reason it cannot serve this validated call ([] = it can), the way
  xformers' ``not_supported_reasons`` does: callers never parse the text, ``auto`` reads typed facts of the
  call (:class:`qkv.core.Call`), and an explicit ``backend=`` that cannot serve a call raises listing them all;
* ``forward(call) -> (out, lse)`` — out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) in
  ``call.lse_dtype`` (float32 unless a caller such as ring attention asks for the accumulation dtype; or None
  when the engine cannot give it and ``call.return_lse`` is False), differentiable in q, k, v and bias.

Adding an engine is its module and one entry in :data:`qkv.dispatch.ENGINES`.
"""
from __future__ import annotations

import torch

from ..core.call import Call

__all__ = ["Engine"]


class Engine:
    """Base class of the engines (see the module docstring)."""

    name: str = ""
    summary: str = ""

    def unavailable(self, device: torch.device) -> list[str]:
        """Every reason this engine cannot run on ``device`` at all; [] when it can."""
        return []

    def supports(self, call: Call) -> list[str]:
        """Every reason this engine cannot serve ``call``; [] when it can (``unavailable`` reasons included)."""
        return self.unavailable(call.device)

    def forward(self, call: Call):
        """(out (B, Hq, Nq, Dv), lse (B, Hq, Nq) float32 or None) for a call this engine supports."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<qkv engine {self.name!r}>"
