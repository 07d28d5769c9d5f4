"""qkv: exact self-attention for PyTorch, one semantics on every engine.

``qkv.attention(q, k, v, causal=..., window=..., mask=..., ...)`` computes softmax(scale·q·kᵀ + mods)·v with
FlashAttention's conventions (bottom-right causal, fully masked rows = 0, natural-log LSE) on any device;
see the README for the tour and ``shared/DESIGN.md`` for the contract.
"""
from . import masks, scores
from .attention import BackendInfo, Selection, attention, attention_weights, backends, select_backend
from .masks import BlockMask, block_mask
from .nn import KVCache, RotaryEmbedding, SelfAttention

__version__ = "0.1.0"

__all__ = [
    "attention", "attention_weights", "block_mask", "BlockMask", "masks", "scores",
    "backends", "select_backend", "BackendInfo", "Selection",
    "SelfAttention", "KVCache", "RotaryEmbedding", "__version__",
]
