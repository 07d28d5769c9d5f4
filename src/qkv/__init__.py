"""qkv: exact self-attention for PyTorch, one semantics on every engine.

``qkv.attention(q, k, v, causal=..., window=..., mask=..., ...)`` computes softmax(scale·q·kᵀ + mods)·v with
FlashAttention's conventions (bottom-right causal, fully masked rows = 0, natural-log LSE) on any device;
the README has the tour, ``docs/semantics.md`` the exact rules and ``docs/architecture.md`` the layers.
"""
from . import distributed, linear, masks, scores
from .api import BackendInfo, Selection, attention, attention_weights, backends, select_backend
from .core.masks import BlockMask, block_mask
from .core.options import get_options, options
from .linear import GatedDeltaNet, LinearSelfAttention, linear_attention
from .nn import KVCache, RotaryEmbedding, SelfAttention

__version__ = "0.1.0"

__all__ = [
    "attention", "attention_weights", "block_mask", "BlockMask", "masks", "scores", "distributed",
    "backends", "select_backend", "BackendInfo", "Selection", "options", "get_options",
    "SelfAttention", "KVCache", "RotaryEmbedding", "__version__",
    "linear", "linear_attention", "LinearSelfAttention", "GatedDeltaNet",
]
