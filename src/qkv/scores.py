"""Score modifiers: ALiBi slopes, logit soft-capping, learned relative-position bias.

``alibi_slopes=`` and ``softcap=`` are also plain keyword arguments of :func:`qkv.attention`; these helpers
give the standard slopes and let the same modifiers be written as a ``score_mod``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["alibi_slopes", "softcap", "relative_bias"]


def alibi_slopes(n_heads: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The ALiBi paper's per-head slopes, ``(n_heads,)``: a geometric sequence starting at ``2^(-8/n)``;
    for a head count that is not a power of two, the slopes of the next lower power of two followed by every
    other slope of the next higher one (as the paper's reference code does)."""
    if not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be an int >= 1, got {n_heads!r}")

    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = pow2(p) if p == n_heads else pow2(p) + pow2(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=dtype, device=device)


def softcap(s: torch.Tensor, cap: float) -> torch.Tensor:
    """Logit soft-capping (Gemma 2, Grok): ``cap · tanh(s / cap)``."""
    if not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
        raise ValueError(f"cap must be a finite number > 0, got {cap!r}")
    return cap * torch.tanh(s / cap)


def relative_bias(table: torch.Tensor, max_distance: int, offset: int = 0):
    """A learned relative-position bias as a ``score_mod``: adds ``table[h, clamp(j - i - offset, ±max_distance)
    + max_distance]``. ``table: (H, 2·max_distance + 1)``; gradients reach ``table`` (captured by the
    score_mod). score_mods see row indices (FlexAttention's convention): for queries that are the last Nq of
    Nk positions (KV cache), pass ``offset = Nk - Nq``."""
    if (not isinstance(table, torch.Tensor) or table.dim() != 2 or not isinstance(max_distance, int)
            or table.shape[1] != 2 * max_distance + 1):
        raise ValueError(f"table must be (H, 2*max_distance+1), got "
                         f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__} "
                         f"with max_distance={max_distance!r}")

    def mod(s, b, h, q_idx, kv_idx):
        rel = (kv_idx - q_idx - offset).clamp(-max_distance, max_distance) + max_distance
        return s + table.to(s.dtype)[h, rel]

    return mod
