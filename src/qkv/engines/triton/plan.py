"""Which tiles the kernels visit: FlexAttention-style block lists, built from the visibility rules of a call.

The kernels visit, per query tile, only the kv tiles listed (and per kv tile the query tiles, for dK/dV);
*full* tiles run with no per-element test, *partial* ones test the index rules computed in the kernel (window
and causal offsets, kv/q lengths, document ids) and, for any other mask, one bit per element of that tile
(``BlockMask.tile_masks``: memory ∝ partial tiles). Tile states of the index rules are analytic: O(tiles).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...core.masks import EMPTY, FULL, PARTIAL, TileMasks

__all__ = ["Lists", "Plan", "build", "window_state", "lengths_state", "doc_state"]


@dataclass
class Lists:
    """Per (b, h, row tile): how many full/partial column tiles and which (int32), plus each partial tile's bitmap
    slot. ``full_num, part_num: (Bs, Hs, rows)``; ``full_idx, part_idx, part_slot: (Bs, Hs, rows, cols)``."""
    full_num: torch.Tensor
    full_idx: torch.Tensor
    part_num: torch.Tensor
    part_idx: torch.Tensor
    part_slot: torch.Tensor
    _orders: dict = field(default_factory=dict)

    def strides(self):
        """(lst_b, lst_h, lst_cols): index of row (b, h, r) in the num arrays is b·lst_b + h·lst_h + r."""
        Bs, Hs, rows, cols = self.full_idx.shape
        return (Hs * rows if Bs > 1 else 0), (rows if Hs > 1 else 0), cols

    def order(self, tile: int, block: int, nblocks: int) -> torch.Tensor:
        """Kernel blocks (``block`` rows each; ``tile`` per list row) in launch order: the blocks of the row tiles
        with the most tiles to visit first (longest-first scheduling keeps the tail of the grid short)."""
        key = (tile, block, nblocks)
        if key not in self._orders:
            work = (self.full_num + self.part_num).sum((0, 1))
            rows = torch.argsort(-work, stable=True)
            r = tile // block
            blocks = (rows[:, None] * r + torch.arange(r, device=rows.device)).flatten()
            self._orders[key] = blocks[blocks < nblocks].to(torch.int32).contiguous()
        return self._orders[key]


@dataclass
class Plan:
    """Block lists for the forward/dQ kernels (``fwd``: rows = query tiles) and the dK/dV kernel (``bwd``: rows =
    kv tiles), at ``tile = (TM, TN)``; ``bits`` the partial tiles' bitmaps (None when no rule needs them)."""
    tile: tuple[int, int]
    fwd: Lists
    bwd: Lists
    bits: torch.Tensor | None
    state: torch.Tensor

    @property
    def density(self) -> float:
        return float((self.state > EMPTY).float().mean())


def _bounds(n: int, t: int, device):
    s = torch.arange(0, n, t, device=device)
    return s, torch.clamp(s + t, max=n)


def window_state(Nq, Nk, tm, tn, lo_off, hi_off, device) -> torch.Tensor:
    """(1, 1, nqt, nkt) states of ``lo_off <= j - i <= hi_off`` (None = unbounded)."""
    qs, qe = _bounds(Nq, tm, device)
    ks, ke = _bounds(Nk, tn, device)
    qs, qe, ks, ke = qs[:, None], qe[:, None], ks[None, :], ke[None, :]
    any_ = torch.ones(len(qs), len(ks[0]), dtype=torch.bool, device=device)
    all_ = any_.clone()
    if hi_off is not None:
        any_ &= ks <= qe - 1 + hi_off
        all_ &= ke - 1 <= qs + hi_off
    if lo_off is not None:
        any_ &= ke - 1 >= qs + lo_off
        all_ &= ks >= qe - 1 + lo_off
    return _state(any_, all_ & any_)[None, None]


def lengths_state(Nq, Nk, tm, tn, kv_lens, q_lens, device) -> torch.Tensor:
    """(B, 1, nqt, nkt) states of keys ``j < kv_lens[b]`` and rows ``i < q_lens[b]``."""
    qs, qe = _bounds(Nq, tm, device)
    ks, ke = _bounds(Nk, tn, device)
    B = (kv_lens if kv_lens is not None else q_lens).shape[0]
    any_ = torch.ones(B, len(qs), len(ks), dtype=torch.bool, device=device)
    all_ = any_.clone()
    if kv_lens is not None:
        L = kv_lens.to(device).view(-1, 1, 1)
        any_ &= ks.view(1, 1, -1) < L
        all_ &= ke.view(1, 1, -1) <= L
    if q_lens is not None:
        L = q_lens.to(device).view(-1, 1, 1)
        any_ &= qs.view(1, -1, 1) < L
        all_ &= qe.view(1, -1, 1) <= L
    return _state(any_, all_ & any_)[:, None]


def doc_state(q_ids, k_ids, tm, tn) -> torch.Tensor:
    """(Bd, 1, nqt, nkt) states of ``q_ids[i] == k_ids[j]`` (int32 ids, -1 = a row that sees nothing): a tile is
    empty when its rows' and keys' id ranges do not meet, full when one id covers both (exact for sorted ids)."""
    def ranges(ids, t, invalid):
        n = ids.shape[-1]
        pad = -n % t
        x = torch.nn.functional.pad(ids, (0, pad), value=invalid).view(ids.shape[0], -1, t)
        valid = x >= 0
        big = torch.iinfo(torch.int32).max
        lo = torch.where(valid, x, big).amin(-1)
        hi = torch.where(valid, x, -1).amax(-1)
        return lo, hi, valid.all(-1)

    qlo, qhi, qall = ranges(q_ids, tm, -1)
    klo, khi, _ = ranges(k_ids, tn, -1)
    # padded key positions only appear in the last tile, which the caller demotes to partial anyway
    any_ = (qlo[:, :, None] <= khi[:, None, :]) & (klo[:, None, :] <= qhi[:, :, None])
    all_ = qall[:, :, None] & (qlo == qhi)[:, :, None] & (klo == khi)[:, None, :] & (qlo[:, :, None] == klo[:, None, :])
    return _state(any_, all_ & any_)[:, None]


def _state(any_, all_) -> torch.Tensor:
    return torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)


def _lists(state: torch.Tensor, slot: torch.Tensor | None) -> Lists:
    full, part = state == FULL, state == PARTIAL

    def lst(sel):
        num = sel.sum(-1, dtype=torch.int32).contiguous()
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32).contiguous()
        return num, idx

    fn, fi = lst(full)
    pn, pi = lst(part)
    ps = torch.full_like(pi, -1) if slot is None else \
        slot.expand_as(state).gather(-1, pi.long()).to(torch.int32).contiguous()
    return Lists(fn, fi, pn, pi, ps)


def build(B, Hq, Nq, Nk, tile, device, *, lo_off=None, hi_off=None, q_ids=None, k_ids=None, kv_lens=None,
          q_lens=None, masks: TileMasks | None = None) -> Plan:
    """The block lists of a call at ``tile = (TM, TN)``: the AND of the index rules' analytic states and the
    element-exact states of ``masks`` (a BlockMask's tile masks at the same tile size)."""
    tm, tn = tile
    nqt, nkt = -(-Nq // tm), -(-Nk // tn)
    st = window_state(Nq, Nk, tm, tn, lo_off, hi_off, device)
    if kv_lens is not None or q_lens is not None:
        st = torch.minimum(st, lengths_state(Nq, Nk, tm, tn, kv_lens, q_lens, device))
    if q_ids is not None:
        st = torch.minimum(st, doc_state(q_ids.to(device), k_ids.to(device), tm, tn))
    slot = bits = None
    if masks is not None:
        ms = masks.state.to(device)
        st = torch.minimum(st, ms)
        slot = torch.where(ms == PARTIAL, masks.slot.to(device), -1)
        bits = masks.bits.to(device).contiguous()
    # Tiles that cross the end of the queries or keys are never full: the kernels' unmasked path has no bounds test.
    edge = torch.zeros(nqt, nkt, dtype=torch.bool, device=device)
    if Nq % tm:
        edge[-1, :] = True
    if Nk % tn:
        edge[:, -1] = True
    st = torch.where(edge & (st == FULL), PARTIAL, st).to(torch.int8)
    st = st.contiguous()
    fwd = _lists(st, slot)
    bwd = _lists(st.transpose(-1, -2), None if slot is None else slot.expand_as(st).transpose(-1, -2))
    return Plan(tuple(tile), fwd, bwd, bits, st)
