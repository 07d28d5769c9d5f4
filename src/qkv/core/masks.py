"""Visibility rules (mask_mods) and the BlockMask that lets engines skip the work a mask removes.

A mask_mod is FlexAttention's ``f(b, h, q_idx, kv_idx) -> bool`` (True = may attend), evaluated on broadcast
int64 index tensors, so it is written with tensor ops and needs no compile step. The masks built here are
:class:`MaskMod` objects: plain mask_mods that also know

* their alignment: query ``i`` sits at absolute position ``i + Nk - Nq`` (bottom-right, FlashAttention's
  convention: queries are the last Nq positions). ``attention`` binds them to the call's sizes; call
  ``m.bind(Nq, Nk)`` yourself to evaluate a bound copy by hand (unbound, the offset is 0);
* how to classify whole blocks analytically (empty / partial / full), so a BlockMask for causal, window,
  document, padding, prefix and chunked masks costs O(number of blocks), not O(N²).
"""
from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from . import hash as _hash

__all__ = [
    "MaskMod", "BlockMask", "block_mask",
    "causal", "sliding_window", "document", "prefix_lm", "padding", "chunked",
    "dilated", "longformer", "bigbird", "and_masks", "or_masks", "not_mask",
]

_TOKENS = itertools.count(1)
_LIVE: weakref.WeakValueDictionary[int, BlockMask] = weakref.WeakValueDictionary()

# Block states, ordered so that AND of two masks is the elementwise minimum.
EMPTY, PARTIAL, FULL = 0, 1, 2
DEFAULT_BLOCK = 128


class MaskMod:
    """A mask_mod ``f(b, h, q_idx, kv_idx) -> bool`` with alignment and optional block analytics.

    ``fn(m, b, h, q, kv)`` gets the bound mask ``m`` (``m.offset = Nk - Nq``, ``m.sizes = (Nq, Nk)``);
    ``blocks(off, qs, qe, ks, ke)``,
    given block start/end (exclusive) index tensors ``qs, qe: (nqb, 1)`` and ``ks, ke: (1, nkb)``, returns
    ``(any, all)`` bool tensors broadcastable to ``(B, H, nqb, nkb)`` that over- and under-estimate the
    visible set (``any`` may say True for an empty block, ``all`` may say False for a full one: still exact,
    just less work skipped).
    """

    def __init__(self, name: str, fn: Callable, blocks: Callable | None = None, *, offset: int = 0,
                 sizes: tuple[int, int] | None = None, check: Callable | None = None):
        self.name, self._fn, self._blocks, self.offset, self.sizes = name, fn, blocks, offset, sizes
        self._check = check      # check(m, B, H): raise ValueError when the bound mask cannot serve (B, H, sizes)

    def __call__(self, b, h, q_idx, kv_idx):
        return self._fn(self, b, h, q_idx, kv_idx)

    _cacheable = False
    _trusted = True          # built by qkv from its own parts: returns bool tensors of the right shape
    _window = None           # (left, right) when this mask is exactly a sliding window (see sliding_window)
    _spec = None             # what the mask is, for engines that compute it from indices (see spec)

    @property
    def window(self) -> tuple | None:
        """(left, right) when this mask is exactly ``sliding_window(left, right)`` (attention then treats it as
        ``window=``), else None."""
        return self._window

    @property
    def spec(self) -> tuple | None:
        """What this mask is, when it is one of the index rules engines may compute in a kernel instead of
        evaluating it: ``("causal", bottom_right: bool)``, ``("window", left, right)``, ``("document", ids,
        q_ids)``, ``("padding", kv_lens, q_lens)`` (tensors as given, ``q_lens``/``q_ids`` may be None) or
        ``("and", masks)``; else None. The positions are those of the bound mask (``offset``), as in
        ``__call__``."""
        return self._spec

    @property
    def analytic(self) -> bool:
        """Whether whole blocks are classified from a formula (no evaluation of the mask per element)."""
        return self._blocks is not None

    def bind(self, nq: int, nk: int) -> MaskMod:
        """A copy aligned for ``Nq`` queries and ``Nk`` keys (offset ``Nk - Nq``)."""
        m = MaskMod(self.name, self._fn, self._blocks, offset=nk - nq, sizes=(nq, nk), check=self._check)
        m._cacheable, m._window, m._trusted, m._spec = self._cacheable, self._window, self._trusted, self._spec
        if m._check is not None:
            m._check(m, None, None)              # sizes now; the batch when a call or block_mask binds it
        return m

    def check(self, B: int, H: int) -> None:
        """Raise ValueError when this bound mask's arguments (ids, lengths) do not fit a call of batch ``B``,
        ``H`` heads and its bound sizes (a tensor of per-key ids of the wrong length, per-batch lengths of
        the wrong batch size). Unbound masks are not checked."""
        if self._check is not None and self.sizes is not None:
            self._check(self, B, H)

    def block_classes(self, qs, qe, ks, ke):
        """``(any, all)`` per block, or None when this mask has no analytic form."""
        return None if self._blocks is None else self._blocks(self.offset, qs, qe, ks, ke)

    def __repr__(self):
        return f"qkv.masks.{self.name}"


def _call(child, m, b, h, q, kv):
    """Evaluate a child mask with the bound parent's offset and sizes (plain callables need none)."""
    return child._fn(m, b, h, q, kv) if isinstance(child, MaskMod) else child(b, h, q, kv)


def _as_index(x, name: str, *, nonneg: bool = False) -> torch.Tensor:
    """An int64 copy of an int or integer tensor (a copy: editing the caller's tensor later changes nothing)."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
        if x.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor (it holds no values)")
        t = x.detach().to(torch.int64, copy=True)
    elif isinstance(x, int) and not isinstance(x, bool):
        t = torch.tensor(x, dtype=torch.int64)
    else:
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(x).__name__}")
    if nonneg and t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} must be >= 0, got {int(t.min())}")
    return t


def _batch_values(t: torch.Tensor, name: str) -> torch.Tensor:
    """A scalar or (B,) per-batch value: anything else is an error."""
    if t.dim() > 1:
        raise ValueError(f"{name} must be an int or a (B,) tensor, got shape {tuple(t.shape)}")
    return t


def _check_batch(name: str, t: torch.Tensor, B: int):
    if t.dim() == 1 and t.shape[0] != B:
        raise ValueError(f"{name} has {t.shape[0]} entries (one per batch), the call has batch size B={B}")


def _per_batch(t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A scalar or per-batch (B,) tensor, read at the broadcast batch indices ``b``."""
    t = t.to(b.device)
    return t if t.dim() == 0 else t[b]


def _grid_shape(*idx) -> torch.Size:
    return torch.broadcast_shapes(*(getattr(x, "shape", ()) for x in idx))


def mask_result(m, shape, what: str = "mask_mod") -> torch.Tensor:
    """Check what a mask_mod returned for index tensors broadcasting to ``shape``: a bool tensor (or a Python
    bool) broadcastable to ``shape``. Anything else — None, 0/1 floats or ints, a wrong shape — is an error
    naming the mask_mod and what it returned (0/1 floats are never read as an additive bias)."""
    if isinstance(m, bool):
        return torch.tensor(m)
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{what} must return a bool tensor (True = may attend), got "
                        f"{'None' if m is None else type(m).__name__}")
    if m.dtype != torch.bool:
        raise TypeError(f"{what} must return a bool tensor (True = may attend), got a {m.dtype} tensor (use "
                        f"a comparison, e.g. kv_idx <= q_idx; additive float masks go to bias= or score_mod)")
    if m.dim() > len(shape) or any(a not in (1, b) for a, b in zip(reversed(m.shape), reversed(shape))):
        raise ValueError(f"{what} returned shape {tuple(m.shape)} for index tensors of shape {tuple(shape)}: it "
                         f"must be elementwise in (b, h, q_idx, kv_idx) (shape broadcastable to theirs)")
    return m


# ---------------------------------------------------------------------------------------------- masks

def causal(align: str = "bottom_right") -> MaskMod:
    """Key j visible to query i iff ``j <= i + (Nk - Nq)`` (bottom_right) or ``j <= i`` (top_left, SDPA's)."""
    if align not in ("bottom_right", "top_left"):
        raise ValueError(f"align must be 'bottom_right' or 'top_left', got {align!r}")
    br = align == "bottom_right"

    def fn(m, b, h, q, kv):
        off = m.offset
        return kv <= q + (off if br else 0)

    def blocks(off, qs, qe, ks, ke):
        o = off if br else 0
        return ks <= qe - 1 + o, ke - 1 <= qs + o

    m = MaskMod(f"causal(align={align!r})", fn, blocks)
    m._spec = ("causal", br)
    m._cacheable = True      # the name says everything: block states may be cached by (name, sizes)
    return m


def check_window(left, right):
    for name, x in (("left", left), ("right", right)):
        if x is not None and (not isinstance(x, int) or isinstance(x, bool) or x < 0):
            raise ValueError(f"window {name} must be None or an int >= 0, got {x!r}")


def sliding_window(left: int | None, right: int | None = 0) -> MaskMod:
    """Visible iff ``i + off - left <= j <= i + off + right`` (``None`` = unbounded), ``off = Nk - Nq``."""
    check_window(left, right)

    def fn(m, b, h, q, kv):
        off = m.offset
        pos = q + off
        ok = torch.ones((), dtype=torch.bool, device=q.device)
        if left is not None:
            ok = ok & (kv >= pos - left)
        if right is not None:
            ok = ok & (kv <= pos + right)
        return ok

    def blocks(off, qs, qe, ks, ke):
        t = torch.ones((), dtype=torch.bool)
        any_, all_ = t, t
        if right is not None:
            any_, all_ = any_ & (ks <= qe - 1 + off + right), all_ & (ke - 1 <= qs + off + right)
        if left is not None:
            any_, all_ = any_ & (ke - 1 >= qs + off - left), all_ & (ks >= qe - 1 + off - left)
        return any_, all_

    m = MaskMod(f"sliding_window({left}, {right})", fn, blocks)
    m._spec = ("window", left, right)
    m._cacheable = True
    m._window = (left, right)  # qkv.attention treats mask=sliding_window(l, r) as window=(l, r)
    return m


def document(ids: torch.Tensor, q_ids: torch.Tensor | None = None) -> MaskMod:
    """Same-document attention (packed sequences): visible iff query and key carry the same id.

    ``ids: (Nk,)`` or ``(B, Nk)``, the document of each key. Queries default to the ids of their absolute
    positions (``i + Nk - Nq``, the last Nq keys); pass ``q_ids: (Nq,)`` or ``(B, Nq)`` to set them.
    When the ids are sorted (contiguous documents), blocks are classified analytically. The ids are copied:
    editing the tensor afterwards does not change the mask. Binding to a call checks that there is one id
    per key (and per query), and one row per batch.
    """
    kid = _as_index(ids, "ids")
    qid = None if q_ids is None else _as_index(q_ids, "q_ids")
    for name, t in (("ids", kid), ("q_ids", qid)):
        if t is not None and t.dim() not in (1, 2):
            raise ValueError(f"{name} must be (N,) or (B, N), got {tuple(t.shape)}")
    kid = kid[0] if kid.dim() == 2 and kid.shape[0] == 1 else kid
    qid = qid[0] if qid is not None and qid.dim() == 2 and qid.shape[0] == 1 else qid

    def check(m, B, H):
        nq, nk = m.sizes
        if kid.shape[-1] != nk:
            raise ValueError(f"document(ids): ids has {kid.shape[-1]} entries, one per key; the call has "
                             f"Nk={nk} keys")
        if qid is not None and qid.shape[-1] != nq:
            raise ValueError(f"document(q_ids=...): q_ids has {qid.shape[-1]} entries, one per query; the call "
                             f"has Nq={nq} queries")
        for name, t in (("ids", kid), ("q_ids", qid)):
            if B is not None and t is not None and t.dim() == 2 and t.shape[0] != B:
                raise ValueError(f"document({name}): {name} has {t.shape[0]} rows (one per batch), the call has "
                                 f"batch size B={B}")

    def ids_at(t, b, pos):
        t = t.to(pos.device)
        valid = (pos >= 0) & (pos < t.shape[-1])
        p = pos.clamp(0, t.shape[-1] - 1)
        val = t[p] if t.dim() == 1 else t[b, p]
        return torch.where(valid, val, torch.full_like(val, -1)), valid

    def fn(m, b, h, q, kv):
        off = m.offset
        if qid is None:
            a, va = ids_at(kid, b, q + off)
        else:
            a, va = ids_at(qid, b, q)
        c, vc = ids_at(kid, b, kv)
        return (a == c) & va & vc

    def sorted_(t):
        return t.numel() < 2 or bool((t[..., 1:] >= t[..., :-1]).all())

    blocks = None
    if qid is None and sorted_(kid):
        def blocks(off, qs, qe, ks, ke):
            t = kid.to(qs.device)
            n = t.shape[-1]
            t2 = t if t.dim() == 2 else t[None]               # (Bi, n)

            def lo_hi(s, e):                                   # min/max id over positions [s, e)
                sv, ev = s.clamp(0, n - 1), (e - 1).clamp(0, n - 1)
                return t2[:, sv.flatten()].view(-1, 1, *s.shape), t2[:, ev.flatten()].view(-1, 1, *e.shape)

            qlo, qhi = lo_hi(qs + off, qe + off)
            klo, khi = lo_hi(ks, ke)
            inb = (qe - 1 + off >= 0) & (qs + off < n)         # some query row maps into [0, n)
            whole = (qs + off >= 0) & (qe - 1 + off < n)
            any_ = inb & (qlo <= khi) & (klo <= qhi)
            all_ = whole & (qlo == qhi) & (klo == khi) & (qlo == klo)
            return any_, all_

    if kid.numel() == 0:
        blocks = None
    m = MaskMod("document(ids)", fn, blocks, check=check)
    m._spec = ("document", kid, qid)
    return m


def prefix_lm(prefix_len) -> MaskMod:
    """Prefix-LM: every query sees the first ``prefix_len`` keys (int >= 0 or (B,) tensor), causal after that."""
    P = _batch_values(_as_index(prefix_len, "prefix_len", nonneg=True), "prefix_len")
    return or_masks(causal(), MaskMod(
        f"prefix({prefix_len if isinstance(prefix_len, int) else 'tensor'})",
        lambda m, b, h, q, kv: kv < _per_batch(P, b),
        lambda off, qs, qe, ks, ke: (ks < _view4(P, qs), ke <= _view4(P, qs)),
        check=lambda m, B, H: B is not None and _check_batch("prefix_len", P, B)))


def _view4(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-batch (B,) value broadcastable against (B, H, nqb, nkb) block tensors."""
    t = t.to(like.device)
    return t if t.dim() == 0 else t.view(-1, 1, 1, 1)


def padding(kv_lens, q_lens=None) -> MaskMod:
    """Key j visible in batch b iff ``j < kv_lens[b]``; with ``q_lens``, rows ``i >= q_lens[b]`` see nothing.
    Lengths are ints >= 0 or (B,) tensors of them (copied)."""
    KL = _batch_values(_as_index(kv_lens, "kv_lens", nonneg=True), "kv_lens")
    QL = None if q_lens is None else _batch_values(_as_index(q_lens, "q_lens", nonneg=True), "q_lens")

    def check(m, B, H):
        if B is not None:
            _check_batch("kv_lens", KL, B)
            if QL is not None:
                _check_batch("q_lens", QL, B)

    def fn(m, b, h, q, kv):
        ok = kv < _per_batch(KL, b)
        return ok if QL is None else ok & (q < _per_batch(QL, b))

    def blocks(off, qs, qe, ks, ke):
        any_, all_ = ks < _view4(KL, ks), ke <= _view4(KL, ks)
        if QL is not None:
            any_, all_ = any_ & (qs < _view4(QL, qs)), all_ & (qe <= _view4(QL, qs))
        return any_, all_

    m = MaskMod("padding(kv_lens)", fn, blocks, check=check)
    m._spec = ("padding", KL, QL)
    return m


def chunked(chunk_size: int) -> MaskMod:
    """Chunked (local) attention: visible iff query position ``i + off`` and key j share a chunk."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    c = chunk_size

    def blocks(off, qs, qe, ks, ke):
        q0, q1 = torch.div(qs + off, c, rounding_mode="floor"), torch.div(qe - 1 + off, c, rounding_mode="floor")
        k0, k1 = ks // c, (ke - 1) // c
        return (q0 <= k1) & (k0 <= q1), (q0 == q1) & (k0 == k1) & (q0 == k0)

    return MaskMod(f"chunked({c})",
                   lambda m, b, h, q, kv: torch.div(q + m.offset, c, rounding_mode="floor") == kv // c, blocks)


def dilated(window: int, dilation: int, causal: bool = True) -> MaskMod:
    """Dilated window: keys at distance ``d = i + off - j`` with ``d % dilation == 0`` and ``|d| <= window·dilation``
    (``0 <= d`` when causal)."""
    if not isinstance(window, int) or window < 0 or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"window must be an int >= 0 and dilation an int >= 1, got {window!r}, {dilation!r}")
    span = window * dilation
    base = sliding_window(span, 0 if causal else span)

    def fn(m, b, h, q, kv):
        off = m.offset
        return base._fn(m, b, h, q, kv) & ((q + off - kv) % dilation == 0)

    def blocks(off, qs, qe, ks, ke):
        any_, all_ = base._blocks(off, qs, qe, ks, ke)
        return any_, all_ & (dilation == 1)

    return MaskMod(f"dilated({window}, {dilation})", fn, blocks)


def _global(g) -> MaskMod:
    """Global tokens: the first ``g`` positions (int) or the listed positions see and are seen by all."""
    if isinstance(g, int) and not isinstance(g, bool):
        if g < 0:
            raise ValueError(f"global_tokens must be >= 0 (the first g positions) or a sequence of positions, "
                             f"got {g}")
        return MaskMod(f"global({g})", lambda m, b, h, q, kv: (kv < g) | (q + m.offset < g),
                       lambda off, qs, qe, ks, ke: ((ks < g) | (qs + off < g), (ke <= g) | (qe + off <= g)))
    pos = _as_index(torch.as_tensor(g), "global_tokens").flatten()

    def fn(m, b, h, q, kv):
        off = m.offset
        p = pos.to(q.device)
        return torch.isin(kv, p) | torch.isin(q + off, p)

    return MaskMod("global(tokens)", fn)


def longformer(window: int, global_tokens) -> MaskMod:
    """Longformer: a symmetric window of ``window`` keys each side, plus global tokens (int g = first g
    positions, or a sequence of positions) that attend to and are attended by every token."""
    return or_masks(sliding_window(window, window), _global(global_tokens))


def bigbird(window: int, global_tokens, random_blocks: int, block_size: int = 64, seed: int = 0) -> MaskMod:
    """BigBird: window + global tokens + ``random_blocks`` random key blocks per query block (fixed by
    ``seed``, in units of ``block_size`` positions)."""
    if not isinstance(random_blocks, int) or random_blocks < 0 or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"random_blocks must be an int >= 0 and block_size >= 1, "
                         f"got {random_blocks!r}, {block_size!r}")

    def rand(m, b, h, q, kv):
        if m.sizes is None:
            raise ValueError("bigbird's random blocks depend on Nk: bind the mask (m.bind(Nq, Nk)) or pass it "
                             "to attention/block_mask, which bind it")
        nkb = max(1, math.ceil(m.sizes[1] / block_size))
        qb = torch.div(q + m.offset, block_size, rounding_mode="floor")
        kb = kv // block_size
        hit = torch.zeros((), dtype=torch.bool, device=q.device)
        for r in range(random_blocks):
            hit = hit | (kb == _hash.hash32(_hash.hash32(qb * 64 + r) ^ (seed & 0xFFFFFFFF)) % nkb)
        return hit

    return or_masks(sliding_window(window, window), _global(global_tokens), MaskMod("random_blocks", rand))


def and_masks(*masks) -> MaskMod:
    """Visible where every mask is visible."""
    return _combine("and", masks)


def or_masks(*masks) -> MaskMod:
    """Visible where any mask is visible."""
    return _combine("or", masks)


def not_mask(mask) -> MaskMod:
    """Visible where ``mask`` is not."""
    if not callable(mask):
        raise TypeError(f"mask must be a mask_mod callable, got {type(mask).__name__}")

    def blocks(off, qs, qe, ks, ke):
        r = mask._blocks(off, qs, qe, ks, ke)
        return ~r[1], ~r[0]

    def fn(m, b, h, q, kv):
        r = _call(mask, m, b, h, q, kv)
        if not isinstance(mask, MaskMod) or not mask._trusted:
            r = mask_result(r, _grid_shape(b, h, q, kv), "not_mask's mask")
        return ~r

    out = MaskMod(f"not_mask({mask!r})", fn, blocks if isinstance(mask, MaskMod) and mask._blocks is not None else None,
                  check=_children_check([mask]))
    out._trusted = isinstance(mask, MaskMod) and mask._trusted
    return out


def _children_check(masks):
    checks = [m._check for m in masks if isinstance(m, MaskMod) and m._check is not None]
    if not checks:
        return None

    def check(m, B, H):
        for c in checks:
            c(m, B, H)
    return check


def _combine(kind: str, masks: Sequence) -> MaskMod:
    if not masks:
        raise ValueError(f"{kind}_masks needs at least one mask")
    for m in masks:
        if not callable(m):
            raise TypeError(f"{kind}_masks takes mask_mod callables, got {type(m).__name__}")
    op = torch.logical_and if kind == "and" else torch.logical_or

    def part(c, m, b, h, q, kv):
        r = _call(c, m, b, h, q, kv)
        if not (isinstance(c, MaskMod) and c._trusted):      # a user's mask_mod: checked like a top-level one
            r = mask_result(r, _grid_shape(b, h, q, kv), f"{kind}_masks' mask_mod")
        return r

    def fn(m, b, h, q, kv):
        out = part(masks[0], m, b, h, q, kv)
        for c in masks[1:]:
            out = op(out, part(c, m, b, h, q, kv))
        return out

    blocks = None
    if all(isinstance(m, MaskMod) and m._blocks is not None for m in masks):
        def blocks(off, qs, qe, ks, ke):
            rs = [m._blocks(off, qs, qe, ks, ke) for m in masks]
            a, l = rs[0]
            for ra, rl in rs[1:]:
                a, l = op(a, ra), op(l, rl)
            return a, l

    out = MaskMod(f"{kind}_masks({', '.join(map(repr, masks))})", fn, blocks, check=_children_check(masks))
    out._trusted = all(isinstance(m, MaskMod) and m._trusted for m in masks)
    if kind == "and":
        out._spec = ("and", tuple(masks))
    return out


# ------------------------------------------------------------------------------------------ BlockMask

class BlockMask:
    """Which (q-block, kv-block) tiles an engine must visit, and which of them need per-element masking.

    ``state: (Bm, Hm, nqb, nkb) int8`` with 0 = empty (skipped), 1 = partial (mask applied per element),
    2 = full (no per-element work); ``Bm ∈ {1, B}``, ``Hm ∈ {1, H}`` (broadcast). The per-element rule is
    ``mask_mod`` (bound to the sizes) or a bool tensor. Build with :func:`block_mask`; reuse across calls.
    FlexAttention-style index lists (``kv_num_blocks``, ``kv_indices``, ``full_kv_*`` and the transposed
    ``q_*`` lists used by backward passes) are derived from ``state``.
    """

    def __init__(self, state: torch.Tensor, shape: tuple[int, int, int, int], block_size: tuple[int, int],
                 mask_mod=None, tensor: torch.Tensor | None = None):
        self.state, self.shape, self.block_size = state, tuple(shape), tuple(block_size)
        self.mask_mod, self.tensor = mask_mod, tensor
        # Known once, here: calls read them without a host sync (torch.compile traces no data-dependent step).
        self.density = float((state > EMPTY).float().mean()) if state.numel() else 0.0
        self.token = next(_TOKENS)
        _LIVE[self.token] = self

    @staticmethod
    def lookup(token: int) -> BlockMask:
        """The live BlockMask with this ``token`` (how compiled graphs refer to one)."""
        bm = _LIVE.get(token)
        if bm is None:
            raise ValueError(f"no live BlockMask has token {token}: it was freed (keep a reference to it)")
        return bm

    def to_dense(self) -> torch.Tensor:
        """``(Bm, Hm, nqb, nkb)`` int8: 0 skipped, 1 partial, 2 full."""
        return self.state.clone()

    def _lists(self, state):
        n = state.to(torch.int32).sum(-1)
        idx = torch.argsort((~state).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return n, idx

    @property
    def kv_num_blocks(self):
        """Per (b, h, q-block): how many partial kv-blocks (see ``kv_indices``)."""
        return self._lists(self.state == PARTIAL)[0]

    @property
    def kv_indices(self):
        """Per (b, h, q-block): the partial kv-blocks first, in order; the first ``kv_num_blocks`` are valid."""
        return self._lists(self.state == PARTIAL)[1]

    @property
    def full_kv_num_blocks(self):
        return self._lists(self.state == FULL)[0]

    @property
    def full_kv_indices(self):
        return self._lists(self.state == FULL)[1]

    @property
    def q_num_blocks(self):
        """Transposed lists for backward passes: per (b, h, kv-block) the partial q-blocks."""
        return self._lists((self.state == PARTIAL).transpose(-1, -2))[0]

    @property
    def q_indices(self):
        return self._lists((self.state == PARTIAL).transpose(-1, -2))[1]

    @property
    def full_q_num_blocks(self):
        return self._lists((self.state == FULL).transpose(-1, -2))[0]

    @property
    def full_q_indices(self):
        return self._lists((self.state == FULL).transpose(-1, -2))[1]

    def cached(self, key, build):
        """``build()`` once per ``key`` for this BlockMask, then the stored result: a place for what an engine
        derives from the mask (block lists at its tile size, ...) so that reusing the BlockMask reuses it too."""
        cache = self.__dict__.setdefault("_derived", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def tile_masks(self, block_size, device=None) -> TileMasks:
        """The mask at another tile size, for kernels that test elements only in *partial* tiles.

        block_size: (TM, TN), the kernel's tiles (any sizes; they need not divide this mask's blocks). Returns
        :class:`TileMasks` ``(state, slot, bits)``: ``state: (Bm, Hm, ceil(Nq/TM), ceil(Nk/TN)) int8`` (0 empty,
        1 partial, 2 full: exact, from the elements); ``slot`` (same shape, int32): the partial tile's index
        into ``bits``, -1 elsewhere; ``bits: (P, TM, ceil(TN/32)) int32``, bit ``c % 32`` of word ``c // 32`` of
        row ``r`` set when element (r, c) of the tile is visible. Memory is O(partial tiles), never O(Nq·Nk).
        Built once per (block_size, device) on first use and cached on this BlockMask; the mask is evaluated
        only inside tiles that overlap partial blocks (on the device this BlockMask was built on).
        """
        bs = _normalize_block_size(block_size)
        dev = torch.device(device) if device is not None else self.state.device
        cache = self.__dict__.setdefault("_tile_cache", {})
        key = (bs, str(dev))
        if key not in cache:
            cache[key] = TileMasks(*(t.to(dev) for t in _tile_masks(self, *bs)))
        return cache[key]

    def __repr__(self):
        B, H, Nq, Nk = self.shape
        return (f"BlockMask(shape=({B}, {H}, {Nq}, {Nk}), block_size={self.block_size}, "
                f"density={self.density:.3f})")


class TileMasks(NamedTuple):
    """A mask at a kernel's tile size (see :meth:`BlockMask.tile_masks`)."""
    state: torch.Tensor
    slot: torch.Tensor
    bits: torch.Tensor


_TILE_ELEMENTS = 1 << 22     # elements evaluated at once while classifying tiles (bounds the temporary memory)


def _tile_masks(bm: BlockMask, tm: int, tn: int):
    """(state, slot, bits) of ``bm`` at (tm, tn) tiles; see BlockMask.tile_masks."""
    B, H, Nq, Nk = bm.shape
    bq, bk = bm.block_size
    st = bm.state
    dev = st.device
    nqt, nkt = -(-Nq // tm), -(-Nk // tn)
    Bm, Hm = st.shape[:2]
    w = -(-tn // 32)
    if nqt == 0 or nkt == 0:
        z = torch.zeros(Bm, Hm, nqt, nkt, dtype=torch.int8, device=dev)
        return z, z.to(torch.int32) - 1, torch.zeros(0, tm, w, dtype=torch.int32, device=dev)
    qs = torch.arange(nqt, device=dev) * tm
    ks = torch.arange(nkt, device=dev) * tn
    r0, r1 = qs // bq, (torch.clamp(qs + tm, max=Nq) - 1) // bq
    c0, c1 = ks // bk, (torch.clamp(ks + tn, max=Nk) - 1) // bk
    lo = torch.full((Bm, Hm, nqt, nkt), FULL, dtype=torch.int8, device=dev)
    hi = torch.full((Bm, Hm, nqt, nkt), EMPTY, dtype=torch.int8, device=dev)
    for dr in range(int((r1 - r0).max()) + 1):          # the blocks each tile overlaps (one when they nest)
        r = torch.minimum(r0 + dr, r1)
        for dc in range(int((c1 - c0).max()) + 1):
            s = st[:, :, r][:, :, :, torch.minimum(c0 + dc, c1)]
            lo, hi = torch.minimum(lo, s), torch.maximum(hi, s)
    state = torch.where(lo == FULL, FULL, torch.where(hi == EMPTY, EMPTY, PARTIAL)).to(torch.int8)
    slot = torch.full(state.shape, -1, dtype=torch.int32, device=dev)
    cand = (state == PARTIAL).nonzero()
    bits, n = [], 0
    ar_m, ar_n = torch.arange(tm, device=dev), torch.arange(tn, device=dev)
    weights = torch.ones(1, dtype=torch.int64, device=dev) << torch.arange(32, device=dev)
    t4 = None if bm.tensor is None else _as4d(bm.tensor.to(dev))
    step = max(1, _TILE_ELEMENTS // (tm * tn))
    for c in range(0, cand.shape[0], step):
        bi, hi_, ti, tj = cand[c:c + step].unbind(1)
        qi = ti[:, None] * tm + ar_m                                       # (C, tm)
        kj = tj[:, None] * tn + ar_n                                       # (C, tn)
        inq, ink = qi < Nq, kj < Nk
        qc, kc = qi.clamp(max=Nq - 1), kj.clamp(max=Nk - 1)
        es = st[bi[:, None, None], hi_[:, None, None], (qc // bq)[:, :, None], (kc // bk)[:, None, :]]
        if t4 is not None:
            m = t4[bi[:, None, None] if t4.shape[0] > 1 else 0, hi_[:, None, None] if t4.shape[1] > 1 else 0,
                   qc[:, :, None] if t4.shape[2] > 1 else 0, kc[:, None, :] if t4.shape[3] > 1 else 0]
        else:
            m = torch.as_tensor(bm.mask_mod(bi[:, None, None], hi_[:, None, None], qc[:, :, None], kc[:, None, :]),
                                device=dev)
        vis = (es == FULL) | ((es == PARTIAL) & m)
        vis = vis & inq[:, :, None] & ink[:, None, :]
        cnt = vis.sum((1, 2))
        n_in = inq.sum(1) * ink.sum(1)
        cls = torch.where(cnt == 0, EMPTY, torch.where(cnt == n_in, FULL, PARTIAL)).to(torch.int8)
        state[bi, hi_, ti, tj] = cls
        part = cls == PARTIAL
        k = int(part.sum())
        if k:
            slot[bi[part], hi_[part], ti[part], tj[part]] = torch.arange(n, n + k, dtype=torch.int32, device=dev)
            v = torch.nn.functional.pad(vis[part], (0, w * 32 - tn)).view(k, tm, w, 32).to(torch.int64)
            word = (v * weights).sum(-1)
            bits.append(torch.where(word >= 2**31, word - 2**32, word).to(torch.int32))
            n += k
    bits = torch.cat(bits) if bits else torch.zeros(0, tm, w, dtype=torch.int32, device=dev)
    return state, slot, bits


def _as4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _block_bounds(n: int, bs: int, device):
    starts = torch.arange(0, n, bs, device=device, dtype=torch.int64)
    return starts, (starts + bs).clamp(max=n)


def _normalize_block_size(block_size) -> tuple[int, int]:
    if block_size is None:
        return DEFAULT_BLOCK, DEFAULT_BLOCK
    bs = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(bs) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in bs):
        raise ValueError(f"block_size must be an int >= 1 or a pair of them, got {block_size!r}")
    return bs


def _state_from(any_, all_) -> torch.Tensor:
    any_, all_ = torch.as_tensor(any_), torch.as_tensor(all_)
    s = torch.where(all_, FULL, torch.where(any_, PARTIAL, EMPTY)).to(torch.int8)
    while s.dim() < 4:
        s = s.unsqueeze(0)
    return s


_STATE_CACHE: dict = {}


def mod_state(mod, B, H, Nq, Nk, bq, bk, device) -> torch.Tensor:
    """Block states of a mask_mod: analytic when it has a form, else one block-row at a time. States of
    causal and window masks (fully described by their names) are cached: decode steps ask every call."""
    if not getattr(mod, "_cacheable", False):
        return _compute_mod_state(mod, B, H, Nq, Nk, bq, bk, device)
    key = (mod.name, Nq, Nk, bq, bk, str(device))
    st = _STATE_CACHE.get(key)
    if st is None:
        if len(_STATE_CACHE) > 256:
            _STATE_CACHE.clear()
        st = _STATE_CACHE[key] = _compute_mod_state(mod, B, H, Nq, Nk, bq, bk, device)
    return st


#: Most index-grid elements a mask_mod is evaluated on at once when block states are computed: a mask_mod's
#: temporaries (int64 index arithmetic: 8 bytes per element each) stay O(this), never O(Nq·Nk).
EVAL_ELEMENTS = 2**21


def _compute_mod_state(mod, B, H, Nq, Nk, bq, bk, device) -> torch.Tensor:
    qs, qe = _block_bounds(Nq, bq, device)
    ks, ke = _block_bounds(Nk, bk, device)
    nqb, nkb = len(qs), len(ks)
    if nqb == 0 or nkb == 0:
        return torch.zeros(1, 1, nqb, nkb, dtype=torch.int8, device=device)
    classes = getattr(mod, "block_classes", None)      # MaskMods (and shifted ones) may have a formula
    if classes is not None:
        r = classes(qs[:, None], qe[:, None], ks[None, :], ke[None, :])
        if r is not None:
            a, l = (torch.as_tensor(x, device=device) for x in r)
            shape = torch.broadcast_shapes(a.shape, l.shape, (nqb, nkb))
            return _state_from(a.expand(shape), (l & a).expand(shape))
    b = torch.arange(B, device=device).view(-1, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, -1, 1, 1)
    # kv blocks per evaluation: one block-row of bq rows times as many kv blocks as EVAL_ELEMENTS allow
    per = max(1, EVAL_ELEMENTS // max(1, B * H * bq * bk))
    rows = []
    for q0 in range(0, Nq, bq):
        q = torch.arange(q0, min(q0 + bq, Nq), device=device).view(1, 1, -1, 1)
        parts = []
        for j0 in range(0, nkb, per):
            k0, k1 = j0 * bk, min((j0 + per) * bk, Nk)
            kv = torch.arange(k0, k1, device=device).view(1, 1, 1, -1)
            grid = (B, H, q.shape[2], k1 - k0)
            m = mask_result(mod(b, h, q, kv), grid)
            m = m.to(device).expand(torch.broadcast_shapes(m.shape, (1, 1, q.shape[2], k1 - k0)))
            pad = -(k1 - k0) % bk
            a = torch.nn.functional.pad(m, (0, pad), value=False).unflatten(-1, (-1, bk)).any(-1).any(-2, keepdim=True)
            l = torch.nn.functional.pad(m, (0, pad), value=True).unflatten(-1, (-1, bk)).all(-1).all(-2, keepdim=True)
            parts.append(_state_from(a, l))
        rows.append(_broadcast_cat(parts, dim=3))
    return _broadcast_cat(rows)


def _broadcast_cat(rows, dim: int = 2):
    Bm = max(r.shape[0] for r in rows)
    Hm = max(r.shape[1] for r in rows)
    return torch.cat([r.expand(Bm, Hm, *r.shape[2:]) for r in rows], dim=dim)


def tensor_state(mask: torch.Tensor, Nq, Nk, bq, bk) -> torch.Tensor:
    """Block states of a bool tensor broadcastable to (B, H, Nq, Nk) (reads it once)."""
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(*m.shape[:2], Nq, Nk)
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    pq, pk = nqb * bq - Nq, nkb * bk - Nk
    F = torch.nn.functional
    a = F.pad(m, (0, pk, 0, pq), value=False).view(*m.shape[:2], nqb, bq, nkb, bk).any(-1).any(-2)
    l = F.pad(m, (0, pk, 0, pq), value=True).view(*m.shape[:2], nqb, bq, nkb, bk).all(-1).all(-2)
    return _state_from(a, l)


def compact_copy(t: torch.Tensor, device=None) -> torch.Tensor:
    """A contiguous copy of ``t`` with its broadcast (stride-0) dimensions kept at size 1: what a mask or bias
    must hold, never the expanded size."""
    for d in range(t.dim()):
        if t.stride(d) == 0 and t.shape[d] > 1:
            t = t.narrow(d, 0, 1)
    return t.to(device=device if device is not None else t.device, memory_format=torch.contiguous_format,
                copy=True)


def block_mask(mask, B: int, H: int, Nq: int, Nk: int, *, block_size=None, device=None) -> BlockMask:
    """Build a reusable :class:`BlockMask` for ``attention(..., mask=bm)``.

    mask: a mask_mod ``f(b, h, q_idx, kv_idx) -> bool`` (a :class:`MaskMod` is bound to ``Nq, Nk``) or a bool
    tensor broadcastable to ``(B, H, Nq, Nk)``. B, H: sizes (1 means the mask does not vary along it).
    block_size: int or (BQ, BK), default 128. Built analytically for qkv's causal/window/document/padding/
    prefix/chunked masks, else by evaluating one block-row (BQ × Nk) at a time: never O(Nq·Nk) memory.
    """
    for name, x in (("B", B), ("H", H), ("Nq", Nq), ("Nk", Nk)):
        if not isinstance(x, int) or isinstance(x, bool) or x < 0:
            raise ValueError(f"{name} must be an int >= 0, got {x!r}")
    bq, bk = _normalize_block_size(block_size)
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask tensor must be bool (True = may attend), got {mask.dtype}")
        try:
            torch.broadcast_shapes(mask.shape, (B, H, Nq, Nk))
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to (B, H, Nq, Nk) = "
                             f"{(B, H, Nq, Nk)}") from None
        if mask.device.type == "meta":
            raise ValueError("mask is a meta tensor (it holds no values)")
        device = mask.device if device is None else torch.device(device)
        own = compact_copy(mask, device)       # the BlockMask's own copy: later edits of `mask` change nothing
        st = tensor_state(own, Nq, Nk, bq, bk) if Nq and Nk else torch.zeros(1, 1, 0, 0, dtype=torch.int8)
        return BlockMask(st, (B, H, Nq, Nk), (bq, bk), tensor=own)
    if not callable(mask):
        raise TypeError(f"mask must be a mask_mod callable or a bool tensor, got {type(mask).__name__}")
    device = torch.device("cpu") if device is None else torch.device(device)
    mod = mask.bind(Nq, Nk) if isinstance(mask, MaskMod) else mask
    if isinstance(mod, MaskMod):
        mod.check(B, H)
    if Nq == 0 or Nk == 0:
        st = torch.zeros(1, 1, -(-Nq // bq), -(-Nk // bk), dtype=torch.int8, device=device)
    else:
        st = mod_state(mod, B, H, Nq, Nk, bq, bk, device)
    return BlockMask(st, (B, H, Nq, Nk), (bq, bk), mask_mod=mod)
