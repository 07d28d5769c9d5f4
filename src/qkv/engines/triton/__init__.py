"""The triton engine: qkv's fused Triton kernels for CUDA (and Triton's interpreter on CPU tensors).

See :mod:`.engine` for how a call maps onto the kernels, :mod:`.kernels` for the kernels, :mod:`.launch` for
their launchers and ``docs/triton.md`` for the design.
"""
from .engine import DECODE_MIN_KEYS_PER_ROW, ENGINE, TritonEngine

__all__ = ["ENGINE", "TritonEngine", "DECODE_MIN_KEYS_PER_ROW"]
