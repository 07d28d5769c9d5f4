"""Merging partial attention results by their logsumexp — the one rule that the tiled engine's runs, split-KV
decoding and ring attention all use.

A partial result over a set of keys is ``(lse, o)``: ``o`` softmax-normalised over those keys, ``lse`` their
logsumexp. Two partials over disjoint key sets combine exactly into the result over the union:
``lse = log(e^lse_a + e^lse_b)``, ``o = o_a·e^(lse_a − lse) + o_b·e^(lse_b − lse)``. A side that saw no key
(``lse = −inf``) contributes nothing; when neither did, the result is 0 with ``lse = −inf`` (never NaN).
"""
from __future__ import annotations

import torch

__all__ = ["merge", "merge_stack"]

_NEG = float("-inf")


def merge(lse_a: torch.Tensor, o_a: torch.Tensor, lse_b: torch.Tensor, o_b: torch.Tensor):
    """Combine two partials over disjoint keys. lse: (..., n, 1), o: (..., n, Dv), any float dtype (compute in
    the dtype given; pass fp32/fp64). Returns (lse, o) of the same shapes."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.masked_fill(lse == _NEG, 0.0)
    return lse, o_a * torch.exp(lse_a - safe) + o_b * torch.exp(lse_b - safe)


def merge_stack(lse: torch.Tensor, o: torch.Tensor, dim: int = 0):
    """Combine S partials stacked along ``dim``: lse (S, ..., n) and o (S, ..., n, Dv) (``dim`` counts in lse's
    dims; o has the same leading dims plus Dv). Returns (lse (..., n), o (..., n, Dv))."""
    total = torch.logsumexp(lse, dim=dim)
    safe = total.masked_fill(total == _NEG, 0.0)
    w = torch.exp(lse - safe.unsqueeze(dim))                        # 0 for partials that saw no key
    return total, (o * w.unsqueeze(-1)).sum(dim)
