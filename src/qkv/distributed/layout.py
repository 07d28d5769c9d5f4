"""How a sequence is cut across the ranks of a process group, and the collective checks every call starts with.

Two layouts of a sequence of N positions over W ranks:

* ``"contiguous"``: rank r holds positions ``[r·N/W, (r+1)·N/W)`` (N divisible by W).
* ``"zigzag"``: the sequence is cut into 2W chunks of N/(2W); rank r holds chunks r and 2W−1−r, in that order
  (N divisible by 2W). Under a causal mask every rank then has the same amount of work: an early chunk (few
  keys before it) paired with a late one (many).

A rank's local tensor is its chunks concatenated along the sequence dim; ``segments`` says where each chunk sits
globally. ``shard_sequence``/``gather_sequence`` convert between the whole tensor and the local one;
``sequence_positions`` gives the global positions of the local rows (for RoPE).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["LAYOUTS", "Segment", "segments", "shard_sequence", "gather_sequence", "sequence_positions",
           "group_info", "check_collectively"]

LAYOUTS = ("contiguous", "zigzag")


class Segment(NamedTuple):
    """A run of positions a rank holds: global start, start within the local tensor, length."""
    start: int
    local: int
    length: int


def _check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _parts(layout: str, W: int) -> int:
    return W if layout == "contiguous" else 2 * W


def segments(layout: str, rank: int, world: int, n_local: int) -> list[Segment]:
    """The segments rank ``rank`` of ``world`` holds when each rank holds ``n_local`` positions
    (sequence length ``world · n_local``)."""
    _check_layout(layout)
    if layout == "contiguous":
        return [Segment(rank * n_local, 0, n_local)]
    c = n_local // 2
    return [Segment(rank * c, 0, c), Segment((2 * world - 1 - rank) * c, c, c)]


def group_info(group):
    """(group, rank in it, its size); ValueError when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
    return group, dist.get_rank(group), dist.get_world_size(group)


def _dim(x: torch.Tensor, dim: int) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D tensor, got {dim!r}")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, *, layout: str = "contiguous", group=None, dim: int = 2) -> torch.Tensor:
    """This rank's part of ``x``, the whole sequence (e.g. q: (B, H, N, D) with ``dim=2``).

    Returns (…, N/W, …) along ``dim``: a view for ``"contiguous"``, the two chunks concatenated for ``"zigzag"``
    (differentiable either way). N must be divisible by W (contiguous) or 2W (zigzag). Local: no communication.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_layout(layout)
    _, rank, W = group_info(group)
    dim = _dim(x, dim)
    N = x.shape[dim]
    parts = _parts(layout, W)
    if N % parts:
        raise ValueError(f"the sequence (dim {dim} of x, shape {tuple(x.shape)}) has {N} positions, not divisible "
                         f"into {parts} equal parts ({layout!r} layout over {W} ranks)")
    segs = segments(layout, rank, W, N // W)
    pieces = [x.narrow(dim, s.start, s.length) for s in segs]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def gather_sequence(x_local: torch.Tensor, *, layout: str = "contiguous", group=None, dim: int = 2) -> torch.Tensor:
    """The whole tensor on every rank, from each rank's part (the inverse of :func:`shard_sequence`).

    x_local: (…, N/W, …) along ``dim``, the same shape on every rank (checked collectively: a mismatch raises
    ValueError on every rank). Returns (…, N, …). Not differentiable (an all_gather).
    """
    if not isinstance(x_local, torch.Tensor):
        raise TypeError(f"x_local must be a torch.Tensor, got {type(x_local).__name__}")
    _check_layout(layout)
    group, rank, W = group_info(group)
    dim = _dim(x_local, dim)
    n = x_local.shape[dim]
    problem = None
    if layout == "zigzag" and n % 2:
        problem = f"a zigzag part holds two equal chunks, but dim {dim} has {n} positions"
    device = x_local.device if "nccl" in str(dist.get_backend(group)) else torch.device("cpu")
    check_collectively("gather_sequence", group, device,
                       {"shape": tuple(x_local.shape), "dim": dim, "layout": LAYOUTS.index(layout),
                        "dtype": str(x_local.dtype)}, problem)
    x = x_local.contiguous()
    parts = [torch.empty_like(x) for _ in range(W)]
    dist.all_gather(parts, x, group=group)
    pieces = []
    for r in range(W):
        for s in segments(layout, r, W, n):
            pieces.append((s.start, parts[r].narrow(dim, s.local, s.length)))
    pieces.sort(key=lambda p: p[0])
    return torch.cat([p for _, p in pieces], dim)


def sequence_positions(n_local: int, *, layout: str = "contiguous", group=None, device=None) -> torch.Tensor:
    """Global positions (n_local,) int64 of this rank's rows (RoPE needs them: a shard's rows are not
    ``arange(n_local)``)."""
    _check_layout(layout)
    _, rank, W = group_info(group)
    if layout == "zigzag" and n_local % 2:
        raise ValueError(f"a zigzag part holds two equal chunks, got n_local={n_local}")
    return torch.cat([torch.arange(s.start, s.start + s.length, device=device)
                      for s in segments(layout, rank, W, n_local)])


# ------------------------------------------------------------------------------------------ collective checks

def _encode(value) -> list[int]:
    """A metadata value as int64s (ints, bools, None, floats by their bits, strings by a stable hash)."""
    if value is None:
        return [-(2**62)]
    if isinstance(value, bool):
        return [int(value)]
    if isinstance(value, int):
        return [value]
    if isinstance(value, float):
        return [int(torch.tensor(value, dtype=torch.float64).view(torch.int64))]
    if isinstance(value, str):
        h = 1469598103934665603
        for ch in value.encode():
            h = ((h ^ ch) * 1099511628211) % 2**63
        return [h]
    if isinstance(value, (tuple, list)):
        return [len(value)] + [x for v in value for x in _encode(v)]
    raise TypeError(f"cannot encode {type(value).__name__}")


def check_collectively(what: str, group, device, fields: dict, problem: str | Exception | None = None,
                       extra: list[int] | None = None) -> list[list[int]]:
    """Every rank of ``group`` sends its ``fields`` (and whether it found a ``problem`` in its own arguments)
    in one all_gather; every rank then raises the same ValueError when a rank had a problem or any field
    differs between ranks — so a mismatched call is an error everywhere instead of a hang (the rank with the
    problem raises it: a string as ValueError, an exception as itself). ``extra`` (ints,
    the same count on every rank) travels along unchecked; returns every rank's ``extra``.

    A rank that never arrives makes the others raise when the group's timeout expires.
    """
    extra = list(extra or [])
    names = list(fields)
    enc = [_encode(fields[k]) for k in names]
    flat = [x for e in enc for x in e]
    # header: problem flag, counts, so that differing lengths are themselves a detected mismatch
    row = [int(problem is not None), len(flat), len(extra)] + flat + extra
    rank = dist.get_rank(group)
    try:
        size = torch.tensor([len(row)], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, size, group=group)
        width = max(int(s) for s in sizes)
        mine = torch.full((width,), -1, dtype=torch.int64, device=device)
        mine[:len(row)] = torch.tensor(row, dtype=torch.int64)
        rows = [torch.empty_like(mine) for _ in sizes]
        dist.all_gather(rows, mine, group=group)
    except RuntimeError as e:
        raise RuntimeError(f"{what} on rank {rank}: the ranks' argument check (an all_gather) failed — a rank of "
                           f"the group died, or did not call {what} within the group's timeout: {e}") from e
    rows = [r.tolist() for r in rows]
    if isinstance(problem, Exception):
        raise problem
    if problem is not None:
        raise ValueError(f"{what} on rank {rank}: {problem}")
    bad = [r for r, row_r in enumerate(rows) if row_r[0]]
    if bad:
        raise ValueError(f"{what}: rank(s) {bad} of the group rejected their arguments (see the error there); "
                         f"every rank stops")
    ref = rows[0]
    for r, row_r in enumerate(rows):
        if row_r[1:3] != ref[1:3] or row_r[3:3 + ref[1]] != ref[3:3 + ref[1]]:
            diff = _first_difference(names, enc, row_r, ref)
            raise ValueError(f"{what}: the ranks disagree — {diff} differs between rank 0 and rank {r} "
                             f"(every rank must call it with the same shapes, dtype, layout and masks)")
    return [row_r[3 + row_r[1]:3 + row_r[1] + row_r[2]] for row_r in rows]


def _first_difference(names, enc, row, ref) -> str:
    at = 3
    for name, e in zip(names, enc):
        a, b = ref[at:at + len(e)], row[at:at + len(e)]
        if a != b:
            show = (lambda x: x[1:] if len(x) > 1 else x[0]) if len(e) > 1 else (lambda x: x[0])
            return f"{name!r} ({show(a)} vs {show(b)}, as encoded)"
        at += len(e)
    return "the set of arguments"
