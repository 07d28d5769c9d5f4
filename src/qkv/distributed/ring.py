"""Ring attention: exact attention over a sequence sharded across the ranks of a torch.distributed group.

Each of the W ranks holds its part of q, k and v (see :mod:`qkv.distributed.layout`). The K/V parts travel the
ring: at step s, rank r holds the keys of rank (r − s) mod W, computes its queries against them while
``batch_isend_irecv`` passes them on to rank r + 1 and receives the next ones from rank r − 1, and merges the
partial result into its running output by logsumexp (:func:`qkv.core.merge.merge`, in fp32, fp64 for fp64
inputs). Every block is one call of a qkv engine (``dispatch.choose``) built by ``prepare`` with the block's
global positions, so causal, windows, ALiBi, mask_mods and BlockMasks mean what they mean for
``qkv.attention`` on the gathered tensors.

What is never computed: a (query chunk, key chunk) pair that the visibility rules leave empty is skipped
(causal: a rank only computes keys at or before its queries; a window: only the chunks in reach), and the ring
stops after the last step any rank needs (a causal window of w < N/W keys on the contiguous layout: two steps).
Inside a computed pair, the engine skips the empty tiles itself.

Backward (a ``torch.autograd.Function``): the ring runs again; each rank recomputes each block's (out, lse)
with the engine, back-propagates ``dO·w`` and the lse term through it (``w = exp(lse_block − lse)``, the block's
weight in the merge), accumulates dQ locally and adds dK/dV to a gradient buffer that travels with the keys; one
last hop returns each dK/dV to its owner.

Counting: ``with ring_stats() as st:`` records, per phase, the pairs and 128×128 score tiles computed against
those of a ring that skips nothing, and the bytes sent.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from .. import dispatch
from ..core.call import Call, as4, prepare, tile
from ..core.masks import BlockMask
from ..core.merge import merge
from .layout import LAYOUTS, Segment, check_collectively, group_info, segments

__all__ = ["ring_attention", "ring_stats", "RingStats", "RingCounts", "STATS_TILE"]

#: Side of the score tiles that :class:`RingStats` counts (the tiled engine's block).
STATS_TILE = 128

_NEG = float("-inf")
_TAG_KV, _TAG_GRAD = 11, 12      # gloo matches point-to-point messages by (peer, tag): keys and grads apart


# ----------------------------------------------------------------------------------------------- counting

@dataclass
class RingCounts:
    """What one phase (forward or backward) of the ring calls in a :func:`ring_stats` context did on this rank.

    ``blocks``/``tiles``: (query chunk, key chunk) pairs and STATS_TILE² score tiles computed (tiles the mask
    leaves in the computed pairs); ``blocks_dense``/``tiles_dense``: the same for a ring that skips nothing
    (every pair of every one of the W steps, every tile). ``engine_calls``: engine calls that computed them
    (pairs where every key is visible join into one call when adjacent). ``calls``: ring calls counted;
    ``steps``: ring steps run; ``bytes_sent``: bytes this rank sent (keys/values, and in the backward their
    gradients); ``wait_seconds``: time spent blocked on the ring's messages after the step's compute
    (communication that compute did not hide, or a peer that is behind)."""
    calls: int = 0
    steps: int = 0
    blocks: int = 0
    blocks_dense: int = 0
    engine_calls: int = 0
    tiles: int = 0
    tiles_dense: int = 0
    bytes_sent: int = 0
    wait_seconds: float = 0.0

    @property
    def tile_fraction(self) -> float:
        """tiles / tiles_dense: the share of a non-skipping ring's work that was done."""
        return self.tiles / self.tiles_dense if self.tiles_dense else 0.0


@dataclass
class RingStats:
    """Counts of the ring calls made on this rank inside a :func:`ring_stats` context."""
    forward: RingCounts = field(default_factory=RingCounts)
    backward: RingCounts = field(default_factory=RingCounts)


_STATS: contextvars.ContextVar = contextvars.ContextVar("qkv_ring_stats", default=None)


@contextlib.contextmanager
def ring_stats() -> Iterator[RingStats]:
    """``with ring_stats() as st:`` — count what the ring calls (and their backward passes) made on this rank
    in the block compute and communicate (see :class:`RingCounts`)."""
    st = RingStats()
    token = _STATS.set(st)
    try:
        yield st
    finally:
        _STATS.reset(token)


# ----------------------------------------------------------------------------------------------- the plan

class _Pair(NamedTuple):
    q: Segment          # rows of the local queries
    k: Segment          # rows of the keys held at that step
    tiles: int          # score tiles the mask leaves (STATS_TILE²)
    full: bool          # every key visible to every row, and no mod depends on positions


class _Block(NamedTuple):
    """One engine call of a step: local query rows q0:q1 against held key rows k0:k1.

    kind "global": one pair, a block of the whole call at its global positions (qg, kg), every rule and mod;
    "free": pairs where every row sees every key and no mod depends on positions (no rule at all, so
    adjacent ones are one call); "local causal": step 0 of a plain causal call, where this rank's queries
    against its own keys are causal in local order (its segments are in global order)."""
    q0: int
    q1: int
    k0: int
    k1: int
    kind: str
    qg: int = 0
    kg: int = 0


@dataclass
class _Plan:
    """Everything a ring call needs beyond the tensors: who the peers are, and what each step computes."""
    group: object
    rank: int
    W: int
    ranks: list          # global ranks of the group, by group rank
    N: int
    layout: str
    kw: dict             # prepare's keyword arguments shared by every block
    mask: object         # None | mask_mod | bool tensor (4-D, global)
    backend: str
    pairs: list = field(default_factory=list)    # per step: the _Pairs it computes (what ring_stats counts)
    blocks: list = field(default_factory=list)   # per step: the _Blocks (engine calls) that compute them
    dense: tuple = (0, 0)                        # (pairs, tiles) of a ring that skips nothing
    steps: int = 1
    stats: RingStats | None = None

    def peer(self, shift: int) -> int:
        return self.ranks[(self.rank + shift) % self.W]

    def pair_call(self, q, k, v, qs: Segment, ks: Segment) -> Call:
        """The block of the whole call: local query rows ``qs`` against held keys ``ks``, global positions."""
        b = _Block(qs.local, qs.local + qs.length, ks.local, ks.local + ks.length, "global", qs.start, ks.start)
        return self.call(_rows(q, b.q0, b.q1), _rows(k, b.k0, b.k1), _rows(v, b.k0, b.k1), b)

    def call(self, q, k, v, b: _Block) -> Call:
        """The validated call of block ``b`` on its rows: q (B, Hq, q1-q0, D), k and v (B, Hkv, k1-k0, ·)."""
        kw = self.kw
        if b.kind == "global":
            mask = self.mask
            if isinstance(mask, torch.Tensor):
                mask = tile(mask, b.qg, b.qg + b.q1 - b.q0, b.kg, b.kg + b.k1 - b.k0)
            call = prepare(q, k, v, mask=mask, return_lse=True, _positions=(b.qg, b.kg, self.N, self.N), **kw)
        else:
            call = prepare(q, k, v, causal=b.kind == "local causal", softcap=kw["softcap"], scale=kw["scale"],
                           return_lse=True)
        call.lse_dtype = call.acc_dtype         # fp64 blocks merge exactly
        return call


def _tiles(call: Call) -> tuple[int, int, bool]:
    """(tiles the call's rules leave, all tiles, whether every tile is full) on the STATS_TILE grid; a tile
    counts when any (b, h) needs it."""
    nq, nk = -(-call.Nq // STATS_TILE), -(-call.Nk // STATS_TILE)
    st = call.block_state(STATS_TILE, STATS_TILE)
    if st is None:
        return nq * nk, nq * nk, True
    return int((st.reshape(-1, nq, nk) > 0).any(0).sum()), nq * nk, bool((st == 2).all())


def _coalesce(pairs: list) -> list:
    """The engine calls for one step's pairs: each non-free pair alone; free pairs joined where their rows
    are adjacent in local storage (first the keys of one query segment, then query segments with the same
    keys)."""
    blocks = [_Block(p.q.local, p.q.local + p.q.length, p.k.local, p.k.local + p.k.length, "global",
                     p.q.start, p.k.start) for p in pairs if not p.full]
    free = sorted((p.q.local, p.q.local + p.q.length, p.k.local, p.k.local + p.k.length) for p in pairs if p.full)
    rows = []                                   # (q0, q1, k0, k1), keys joined
    for q0, q1, k0, k1 in free:
        if rows and rows[-1][:2] == (q0, q1) and rows[-1][3] == k0:
            rows[-1] = (q0, q1, rows[-1][2], k1)
        else:
            rows.append((q0, q1, k0, k1))
    joined = []                                 # query segments joined
    for q0, q1, k0, k1 in sorted(rows, key=lambda r: (r[2], r[3], r[0])):
        if joined and joined[-1][2:] == (k0, k1) and joined[-1][1] == q0:
            joined[-1] = (joined[-1][0], q1, k0, k1)
        else:
            joined.append((q0, q1, k0, k1))
    return blocks + [_Block(*r, "free") for r in joined]


def _mask_rule(mask, B: int, Hq: int, N: int):
    """The user's mask as blocks take it: a mask_mod as is, a bool tensor (or a BlockMask's) to slice per block."""
    if mask is None:
        return None
    if isinstance(mask, BlockMask):
        if mask.shape[2:] != (N, N):
            raise ValueError(f"mask: a BlockMask for ring attention is built for the whole sequence (Nq, Nk) = "
                             f"{(N, N)}, got one for {mask.shape[2:]}")
        return mask.mask_mod if mask.mask_mod is not None else _mask_rule(mask.tensor, B, Hq, N)
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask tensor must be bool (True = may attend), got {mask.dtype}")
        m = as4(mask)
        if m.dim() != 4 or any(s not in (1, t) for s, t in zip(m.shape, (B, Hq, N, N))):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the whole call "
                             f"(B, Hq, N, N) = {(B, Hq, N, N)}")
        return m
    if callable(mask):
        return mask
    raise TypeError(f"mask must be a mask_mod, a BlockMask or a bool tensor in global positions, got "
                    f"{type(mask).__name__}")


def _build_plan(q, k, v, *, causal, window, mask, alibi_slopes, softcap, scale, layout, group, backend):
    """Validate this rank's arguments and plan its steps (which pairs each step computes). Local: no
    communication."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    group, rank, W = group_info(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N/W, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    n = q.shape[2]
    if k.shape[2] != n or v.shape[2] != n:
        raise ValueError(f"q, k and v must hold the same positions (self-attention shards), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if layout == "zigzag" and n % 2:
        raise ValueError(f"the zigzag layout holds two equal chunks per rank, but q has {n} positions "
                         f"(shard with qkv.distributed.shard_sequence(x, layout='zigzag'))")
    N = n * W
    kw = dict(causal=causal, window=window, alibi_slopes=alibi_slopes, softcap=softcap, scale=scale)
    rule = _mask_rule(mask, q.shape[0], q.shape[1], N)
    plan = _Plan(group, rank, W, dist.get_process_group_ranks(group or dist.group.WORLD), N, layout, kw, rule,
                 backend)
    mine = segments(layout, rank, W, n)
    empty = q.shape[0] * q.shape[1] == 0 or n == 0
    # The probe of every (step, pair) uses this rank's own keys as stand-ins: the rules depend only on the
    # positions and lengths, which are the same on every rank. Its validation is the whole call's.
    probe = prepare(q, k, v, return_lse=True, _positions=(mine[0].start, mine[0].start, N, N),
                    mask=None if isinstance(rule, torch.Tensor) else rule, **kw)
    dispatch.choose(probe, backend)             # an engine that cannot serve the blocks fails here, everywhere
    dense_pairs = dense_tiles = 0
    positional = alibi_slopes is not None          # a mod that depends on positions: no block is free
    plain_causal = causal and window is None and rule is None and not positional
    for s in range(W):
        todo = []
        for ks in ([] if empty else segments(layout, (rank - s) % W, W, n)):
            for qs in mine:
                seen, total, full = _tiles(plan.pair_call(q, k, v, qs, ks))
                dense_pairs, dense_tiles = dense_pairs + 1, dense_tiles + total
                if seen:
                    todo.append(_Pair(qs, ks, seen, full and not positional))
        plan.pairs.append(todo)
        if s == 0 and plain_causal and len(mine) > 1 and todo:
            plan.blocks.append([_Block(0, n, 0, n, "local causal")])
        else:
            plan.blocks.append(_coalesce(todo))
    plan.dense = (dense_pairs, dense_tiles)
    return plan


# ------------------------------------------------------------------------------------------ communication

def _wait(reqs, counts: RingCounts | None = None, what: str = "keys"):
    """Wait for this step's messages; a peer that died or timed out becomes a RuntimeError saying so."""
    t0 = time.perf_counter()
    try:
        for r in reqs:
            r.wait()
    except RuntimeError as e:
        raise RuntimeError(f"ring_attention on rank {dist.get_rank()}: a message ({what}) of the ring failed — a "
                           f"rank of the group died, stopped calling or timed out: {e}") from e
    if counts is not None and reqs:
        counts.wait_seconds += time.perf_counter() - t0


class _KeyRing:
    """The keys and values travelling the ring, packed in one flat buffer (one message per step), double
    buffered: step s computes on one while the next arrives in the other."""

    def __init__(self, plan: _Plan, k: torch.Tensor, v: torch.Tensor):
        self.plan, self.kshape, self.vshape = plan, k.shape, v.shape
        self.nk = k.numel()
        self.cur = torch.cat([k.reshape(-1), v.reshape(-1)]) if plan.steps > 1 else None
        self.k, self.v = k, v
        self.nxt, self.reqs = None, []

    def start(self, s: int, counts: RingCounts | None):
        """Send what this step holds on to the next rank and receive the next step's keys (if any)."""
        p = self.plan
        if s + 1 >= p.steps:
            return
        if self.nxt is None:
            self.nxt = torch.empty_like(self.cur)
        self.reqs = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, self.cur, p.peer(1), p.group, _TAG_KV),
            dist.P2POp(dist.irecv, self.nxt, p.peer(-1), p.group, _TAG_KV)])
        if counts is not None:
            counts.bytes_sent += self.cur.numel() * self.cur.element_size()

    def held(self):
        """(k, v) of this step: (B, Hkv, n, D), (B, Hkv, n, Dv)."""
        if self.cur is None:
            return self.k, self.v
        return self.cur[:self.nk].view(self.kshape), self.cur[self.nk:].view(self.vshape)

    def finish(self, counts: RingCounts | None):
        _wait(self.reqs, counts)
        self.reqs = []
        if self.nxt is not None:
            self.cur, self.nxt = self.nxt, self.cur


class _GradRing:
    """dK/dV travelling behind the keys. At step s a rank adds its share for the keys it holds to what the
    previous rank accumulated for them, then passes the sum on (the last step: straight to the owner)."""

    def __init__(self, plan: _Plan, k: torch.Tensor, v: torch.Tensor, acc):
        self.plan, self.kshape, self.vshape, self.acc = plan, k.shape, v.shape, acc
        self.nk, self.size, self.device = k.numel(), k.numel() + v.numel(), k.device
        self.mine = self.inc = self.sending = None
        self.reqs = []

    def fresh(self):
        """A zero (dk, dv) accumulator for this step's keys."""
        self.mine = torch.zeros(self.size, dtype=self.acc, device=self.device)
        return self.mine[:self.nk].view(self.kshape), self.mine[self.nk:].view(self.vshape)

    def pass_on(self, s: int, counts: RingCounts | None):
        p = self.plan
        _wait(self.reqs, counts, "gradients")
        if self.reqs:
            self.mine += self.inc
        self.reqs = []
        if p.steps == 1:
            self.inc = self.mine
            return
        last = s == p.steps - 1
        to, frm = (p.peer(1), p.peer(-1)) if not last else (p.peer(1 - p.steps), p.peer(p.steps - 1))
        self.inc, self.sending = torch.empty_like(self.mine), self.mine    # alive until its send completes
        self.reqs = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, self.mine, to, p.group, _TAG_GRAD),
            dist.P2POp(dist.irecv, self.inc, frm, p.group, _TAG_GRAD)])
        if counts is not None:
            counts.bytes_sent += self.mine.numel() * self.mine.element_size()

    def result(self, counts: RingCounts | None):
        """This rank's own (dk, dv), once the last hop has arrived."""
        _wait(self.reqs, counts, "gradients")
        self.reqs = []
        return self.inc[:self.nk].view(self.kshape), self.inc[self.nk:].view(self.vshape)


# ------------------------------------------------------------------------------------------ forward/backward

def _count(plan: _Plan, counts: RingCounts | None):
    if counts is not None:
        counts.calls += 1
        counts.steps += plan.steps
        counts.blocks += sum(len(p) for p in plan.pairs)
        counts.tiles += sum(x.tiles for p in plan.pairs for x in p)
        counts.blocks_dense += plan.dense[0]
        counts.engine_calls += sum(len(b) for b in plan.blocks)
        counts.tiles_dense += plan.dense[1]


def _rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows a:b of the sequence dim (2) of a (B, H, n, ·) or (B, H, n) tensor."""
    return t.narrow(2, a, b - a)


def _ring_forward(plan: _Plan, q, k, v):
    """out (B, Hq, n, Dv) and lse (B, Hq, n), both in the accumulation dtype."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, n, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    out = torch.zeros(B, Hq, n, Dv, dtype=acc, device=q.device)
    lse = torch.full((B, Hq, n), _NEG, dtype=acc, device=q.device)
    counts = plan.stats.forward if plan.stats is not None else None
    _count(plan, counts)
    ring = _KeyRing(plan, k, v)
    started = torch.zeros(n, dtype=torch.bool)             # rows that hold a partial result already
    for s in range(plan.steps):
        ring.start(s, counts)                              # the next keys travel while this step computes
        kh, vh = ring.held()
        for b in plan.blocks[s]:
            call = plan.call(_rows(q, b.q0, b.q1), _rows(kh, b.k0, b.k1), _rows(vh, b.k0, b.k1), b)
            o_b, l_b = dispatch.choose(call, plan.backend).forward(call)
            lo, oo = _rows(lse, b.q0, b.q1), _rows(out, b.q0, b.q1)
            if bool(started[b.q0:b.q1].any()):
                lm, om = merge(lo.unsqueeze(-1), oo, l_b.to(acc).unsqueeze(-1), o_b)
                lo.copy_(lm.squeeze(-1))
                oo.copy_(om)
            else:                                          # the first partial of these rows: nothing to merge
                lo.copy_(l_b)
                oo.copy_(o_b)
                started[b.q0:b.q1] = True
        ring.finish(counts)
    return out, lse


def _ring_backward(plan: _Plan, q, k, v, out, lse, dout, dlse):
    """(dq, dk, dv) of this rank's shards, given its out/lse (acc dtype) and their gradients."""
    acc = out.dtype
    counts = plan.stats.backward if plan.stats is not None else None
    _count(plan, counts)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dout = dout.to(acc)
    # delta = rowsum(dO·O) − dLSE: the softmax backward's row term of the merged result.
    delta = (dout * out).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    lse_safe = lse.masked_fill(lse == _NEG, 0.0)           # rows that see no key: every block weight is 0
    ring, grads = _KeyRing(plan, k, v), _GradRing(plan, k, v, acc)
    for s in range(plan.steps):
        ring.start(s, counts)
        kh, vh = ring.held()
        dk_s, dv_s = grads.fresh()
        for b in plan.blocks[s]:
            qs = _rows(q, b.q0, b.q1).detach().requires_grad_(True)
            ks = _rows(kh, b.k0, b.k1).detach().requires_grad_(True)
            vs = _rows(vh, b.k0, b.k1).detach().requires_grad_(True)
            with torch.enable_grad():
                call = plan.call(qs, ks, vs, b)
                o_b, l_b = dispatch.choose(call, plan.backend).forward(call)
            # The block's weight in the merge, w = exp(lse_b − lse): the merged output's gradient reaches the
            # block as dO·w, and its lse as w·(dO·O_b − delta) (d lse/d lse_b = w, d O/d lse_b = w·(O_b − O)).
            w = torch.exp(l_b.detach().to(acc) - _rows(lse_safe, b.q0, b.q1))
            do = _rows(dout, b.q0, b.q1)
            g_out = (w.unsqueeze(-1) * do).to(o_b.dtype)
            g_lse = w * ((do * o_b.detach().to(acc)).sum(-1) - _rows(delta, b.q0, b.q1))
            gq, gk, gv = torch.autograd.grad((o_b, l_b), (qs, ks, vs), (g_out, g_lse.to(l_b.dtype)),
                                             allow_unused=True)
            for acc_t, g, a, e in ((dq, gq, b.q0, b.q1), (dk_s, gk, b.k0, b.k1), (dv_s, gv, b.k0, b.k1)):
                if g is not None:
                    _rows(acc_t, a, e).add_(g.to(acc))
        grads.pass_on(s, counts)                           # this step's dK/dV go on while the next computes
        ring.finish(counts)
    dk, dv = grads.result(counts)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        ctx.set_materialize_grads(False)
        out, lse = _ring_forward(plan, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out.to(q.dtype), lse.to(torch.float32)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _ring_backward(ctx.plan, q, k, v, out, lse, dout, dlse)
        return dq, dk, dv, None


# ------------------------------------------------------------------------------------------------ public

def _describe(x):
    if isinstance(x, torch.Tensor):
        return (str(x.dtype), tuple(x.shape))
    return type(x).__name__ if x is not None and not isinstance(x, (int, float, str, bool)) else x


def _mask_kind(mask):
    if mask is None:
        return None
    if isinstance(mask, BlockMask):
        return ("BlockMask", mask.shape)
    if isinstance(mask, torch.Tensor):
        return ("tensor", tuple(mask.shape))
    return "mask_mod" if callable(mask) else type(mask).__name__


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                   window: tuple[int | None, int | None] | None = None, mask=None,
                   alibi_slopes: torch.Tensor | None = None, softcap: float | None = None,
                   scale: float | None = None, layout: str = "contiguous", group=None, return_lse: bool = False,
                   backend: str = "auto"):
    """Exact attention over a sequence sharded across the ranks of a process group (context parallelism).

    Every rank of ``group`` (default: the world) calls it with its own part of the sequence, laid out by
    ``layout`` (:func:`qkv.distributed.shard_sequence`): q: (B, Hq, N/W, D), k: (B, Hkv, N/W, D),
    v: (B, Hkv, N/W, Dv), the same shapes, dtype and arguments on every rank. The result is this rank's part of
    ``qkv.attention(Q, K, V, ...)`` on the gathered tensors — the same semantics: causal (bottom-right, here
    Nq = Nk), ``window``, ``mask`` (a mask_mod, a BlockMask built for (B|1, H|1, N, N), or a bool tensor
    broadcastable to (B, Hq, N, N), all in global positions), ``alibi_slopes``, ``softcap``, ``scale``. GQA as in
    ``attention``. ``backend`` picks the engine of every block ("auto" or one that returns the logsumexp).

    ``layout``: ``"contiguous"`` (rank r holds positions r·N/W …) or ``"zigzag"`` (rank r holds chunks r and
    2W−1−r of 2W: balanced causal work). Differentiable in q, k and v (the backward runs the ring again).

    Returns out (B, Hq, N/W, Dv) in q's dtype, and with ``return_lse`` also lse (B, Hq, N/W) float32.

    Errors: invalid arguments on any rank, or arguments that differ between ranks (shapes, dtype, layout, masks),
    raise ValueError/TypeError on every rank before any work (one all_gather of a few integers checks them).
    A rank that dies makes the others raise when they next wait for it (gloo: at once when its connection
    closes; otherwise within the group's timeout); a rank that never calls makes them raise at the timeout.
    """
    group_info(group)
    problem = None
    plan = None
    try:
        plan = _build_plan(q, k, v, causal=causal, window=window, mask=mask, alibi_slopes=alibi_slopes,
                           softcap=softcap, scale=scale, layout=layout, group=group, backend=backend)
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    except (ValueError, TypeError) as e:
        problem = e
    _, _, W = group_info(group)
    need = [int(bool(p)) for p in plan.pairs] if plan is not None else [0] * W
    fields = {"layout": layout if isinstance(layout, str) else repr(layout), "q": _describe(q), "k": _describe(k),
              "v": _describe(v), "causal": _describe(causal), "window": _describe(window),
              "mask": _mask_kind(mask), "alibi_slopes": _describe(alibi_slopes), "softcap": _describe(softcap),
              "scale": _describe(scale), "return_lse": _describe(return_lse), "backend": _describe(backend),
              "grad": bool(torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                                           for t in (q, k, v)))}
    # the check's few integers travel on q's device when the group's backend needs it (NCCL), else on CPU
    device = (q.device if isinstance(q, torch.Tensor) and q.device.type != "cpu"
              and "nccl" in str(dist.get_backend(group)) else torch.device("cpu"))
    needs = check_collectively("ring_attention", group, device, fields, problem, need)
    plan.steps = 1 + max((s for row in needs for s, x in enumerate(row) if x), default=0)
    plan.stats = _STATS.get()
    out, lse = _Ring.apply(q, k, v, plan)
    return (out, lse) if return_lse else out
