"""qkv's engines: each computes the same semantics (:mod:`qkv.core`) under the contract of :mod:`.base`.

``reference`` (the oracle), ``tiled`` (FlashAttention in torch ops, with qkv's C kernel on CPU —
:mod:`.cpu_kernel`), ``sdpa`` (PyTorch's SDPA when a call fits), ``triton`` (fused Triton kernels for CUDA).
The registry is :mod:`qkv.dispatch`.
"""
__all__ = ["base", "reference", "sdpa", "tiled", "cpu_kernel", "triton"]
