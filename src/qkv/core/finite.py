"""Non-finite values (NaN, ±inf) in the inputs: the rule that keys a row cannot see never touch it.

A product ``p·v`` with ``p = 0`` is NaN when ``v`` is NaN or infinite, so a plain matmul of probabilities and
values lets a NaN in a key that a row cannot see (``p = 0``) spread into that row; so does the backward's
``ds·k``, ``dsᵀ·q`` and ``pᵀ·dO``. :func:`matmul_skip_zeros` is the matmul in which an exactly zero entry of
the left factor contributes nothing, whatever it meets. Engines run plain matmuls first and use it only when
a result is not finite (a leak always shows as a NaN), so finite inputs pay nothing.
"""
from __future__ import annotations

import torch

__all__ = ["all_finite", "finite_result", "matmul_skip_zeros", "NonFiniteInputs", "nonfinite_names",
           "refuse_nonfinite"]


class NonFiniteInputs(ValueError):
    """An engine found, after running, that NaN/inf inputs may have made its result wrong and that it cannot
    compute such a call exactly. ``backend="auto"`` then runs the call on an engine that can (tiled)."""


def nonfinite_names(q, k, v, bias=None) -> list[str]:
    """Which of q, k, v hold a NaN or inf, and whether bias holds a NaN or +inf (-inf is masking). One summing
    pass over each and one device-to-host read for all of them (a sum that overflows counts as non-finite)."""
    named = [(n, t, torch.float64 if n == "bias" or t.dtype == torch.float64 else torch.float32)
             for n, t in (("q", q), ("k", k), ("v", v), ("bias", bias))
             if t is not None and t.numel() and t.device.type != "meta"]
    if not named:
        return []
    sums = torch.stack([t.detach().sum(dtype=acc).to(torch.float64) for _, t, acc in named]).tolist()
    return [n for (n, _, _), s in zip(named, sums)
            if s != s or s == float("inf") or (n != "bias" and s == float("-inf"))]


def refuse_nonfinite(backend: str, why: str, q, k, v, bias=None) -> None:
    """Raise NonFiniteInputs naming each of q, k, v, bias that holds NaN/inf (see :func:`nonfinite_names`), with
    ``why`` the engine ``backend`` cannot compute such a call exactly; nothing when all are finite."""
    bad = nonfinite_names(q, k, v, bias)
    if bad:
        raise NonFiniteInputs(
            f"backend={backend!r} cannot serve this call: {', '.join(bad)} hold{'s' if len(bad) == 1 else ''} NaN "
            f"or inf values, {why}; use backend='tiled' (or 'auto')")


def all_finite(*ts: torch.Tensor | None) -> bool:
    """Whether every given tensor (None skipped) holds only finite values. One summing pass each (no bool
    copy): a NaN or inf makes the sum non-finite; a sum that overflows says False too (the caller then takes
    its exact path, which is right either way)."""
    for t in ts:
        if t is None or t.numel() == 0 or t.device.type == "meta":       # meta tensors hold no values
            continue
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        if not bool(torch.isfinite(t.sum(dtype=acc))):
            return False
    return True


def finite_result(out: torch.Tensor, lse: torch.Tensor | None = None) -> bool:
    """Whether an attention result is what finite inputs give: out finite, lse finite or −inf (a row that
    sees no key). Anything else (NaN, +inf) means non-finite inputs reached it, rightly or through a 0·NaN."""
    if not all_finite(out):
        return False
    if lse is None or lse.numel() == 0:
        return True
    # lse: finite, or -inf on rows that see nothing; its sum is NaN or +inf exactly when an entry is
    total = float(lse.sum(dtype=torch.float64))
    return total == total and total != float("inf")


def matmul_skip_zeros(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (a: (..., n, K), b: (..., K, X), batch dims broadcast) in which a zero entry ``a[.., i, k]``
    contributes nothing, even where ``b[.., k, :]`` is NaN or ±inf; a non-zero one meets them as usual (NaN,
    or ±inf with the sign of the product; +inf and −inf together give NaN). Costs a plain matmul when ``b`` is
    finite; otherwise two more, over the contraction indices whose row of ``b`` is not finite only."""
    bad = ~torch.isfinite(b)
    if not bool(bad.any()):
        return a @ b
    c = a @ b.masked_fill(bad, 0)
    K, X = b.shape[-2], b.shape[-1]
    cols = bad.any(-1).reshape(-1, K).any(0).nonzero().squeeze(1)        # contraction indices to correct
    au, bu = a.index_select(-1, cols), b.index_select(-2, cols)
    ind = torch.cat([torch.isposinf(bu), torch.isneginf(bu), torch.isnan(bu)], -1).to(c.dtype)
    pos = (au > 0).to(c.dtype) @ ind                                     # counts: exact in the float dtype
    neg = (au < 0).to(c.dtype) @ ind
    pinf = (pos[..., :X] + neg[..., X:2 * X]) > 0
    ninf = (pos[..., X:2 * X] + neg[..., :X]) > 0
    nan = (pos[..., 2 * X:] + neg[..., 2 * X:]) > 0
    fix = torch.where(nan | (pinf & ninf), float("nan"),
                      torch.where(pinf, float("inf"), torch.where(ninf, float("-inf"), 0.0))).to(c.dtype)
    return c + fix
