"""A counter-based 32-bit integer hash in plain torch int64 ops.

Shared by dropout (so every engine draws the same keep-mask for element (b, h, i, j) from one seed) and
by the random blocks of BigBird masks. Products are split in 16-bit halves so nothing overflows int64.
"""
import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32 without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A well-mixed 32-bit hash (the 'lowbias32' constants) of an int64 tensor, elementwise."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seed: int, *indices: torch.Tensor) -> torch.Tensor:
    """A float32 in [0, 1) for each broadcast combination of ``indices``, fixed by ``seed``."""
    h = hash32(torch.as_tensor(seed & _M32, dtype=torch.int64, device=indices[0].device))
    for idx in indices:
        h = hash32(h ^ hash32(idx.to(torch.int64) + 0x9E3779B9))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))
