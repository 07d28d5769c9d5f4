"""The tiled engine: FlashAttention's algorithm in torch ops, so it runs on any torch device.

Forward: for each block of queries, the kv tiles that the mask leaves visible are grouped into runs
(consecutive tiles of one kind: *full* runs need no per-element mask, *partial* ones do; empty tiles are
never touched). Each run yields its softmax-normalised output and row logsumexp; runs are merged by their
LSE (the online softmax, a run at a time). Only the output and the LSE are kept. Backward recomputes each
run's probabilities from that global LSE. Memory is O(N·block), never O(N²). GQA folds the query heads of
one kv head into the rows of each run, so K and V are never repeated.

A run is computed by one of two tile kernels with the same contract:
* ``_ops`` — plain torch ops (matmul, fused softmax, matmul); every feature (score mods, dropout, bias grads).
* ``_fused`` — on CPU, for runs with no score mods and no dropout, PyTorch's fused flash kernel for the tile
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, which take the global out and LSE,
  so each run's gradient is exact). It keeps the score tile in cache; the tiling, skipping and LSE merge
  remain qkv's. ``qkv.options(tiled_fused=False)`` turns it off.

Sliding windows (``window=`` with no other mask or mod) take a banded path for the query blocks whose whole
window lies inside the keys (see ``_Band``): no tiles and no merge there, one softmax per row over a band of
BAND_Q + left + right keys. In training it keeps those probabilities for the backward when they fit in
``qkv.options(band_keep_bytes=...)`` (256 MiB) and are at most ``band_keep_ratio`` (8) times as many values as q
(B·Hq·N·span: O(N·window), not O(N²)), which spares the backward one of its five matmuls;
``band_keep_bytes=0`` recomputes them instead.

On CPUs with AVX-512, calls whose visibility is a key range (no mask, causal, windows) with no score mods or
dropout run forward and backward on qkv's C kernel (:mod:`qkv.engines.cpu_kernel`), all rows at once; the schedule, the
band path and the backward below then stay idle (nothing is kept for the backward).
"""
from __future__ import annotations

import torch

from ..core.call import Call
from ..core.finite import all_finite, finite_result, matmul_skip_zeros
from ..core.options import get_options
from . import cpu_kernel as _native
from .kernel import KernelEngine

__all__ = ["ENGINE", "TiledEngine", "tiled_attention", "BLOCK_Q", "BLOCK_K", "TILE_BYTES", "BAND_Q",
           "BAND_TILE_BYTES", "BAND_ALIGN"]

BLOCK_Q = 128            # query rows per step
BLOCK_K = 128            # kv tile (the granularity at which masks are skipped)
TILE_BYTES = 32 * 2**20  # most bytes of one temporary score tile (B·Hq·BLOCK_Q·keys): bounds the memory
MIN_FULL = 4             # shorter stretches of full tiles are masked along with their partial neighbours
FUSED_BLOCK_Q = 1024     # most query rows per fused-kernel call (it tiles inside); see _fused_rows
BAND_Q = 64              # query block of the banded sliding-window path
BAND_ALIGN = 16          # band width rounded up to a multiple of this (extra keys masked)
BAND_TILE_BYTES = (2**21, 2**20)  # most bytes of one band score tile, (inference, training): a chunk of blocks
                                  # of one head stays in cache (the backward holds two tiles; measured)

_NEG = float("-inf")
_aten = torch.ops.aten


def _schedule(call: Call, bq: int, bk: int, skip: range = range(0), fused: bool | None = None):
    """Per query block, the kv runs to visit: a list of (k0, k1, partial), each run a whole number of kv
    tiles of one kind (full or partial); on the torch-ops path a run's score tile fits in TILE_BYTES.
    Blocks in ``skip`` (the band path's) get None: planning them costs Python time the band path saves.
    ``fused``: plan for the fused kernel (default: whether the call takes it)."""
    Nq, Nk = call.Nq, call.Nk
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    row_bytes = call.B * call.Hq * bq * call.acc_dtype.itemsize
    # kv tiles per run: the ops path materialises a run's score tile, the fused kernel tiles inside itself but
    # is handed a partial run's mask (and the mask_mod evaluated over it), so partial runs stay in TILE_BYTES
    bounded = max(1, TILE_BYTES // (row_bytes * bk))
    per_full = nkb if (_use_fused(call) if fused is None else fused) else bounded
    state = call.block_state(bq, bk)
    if state is None:
        step = per_full * bk
        runs = [(k0, min(k0 + step, Nk), False) for k0 in range(0, Nk, step)]
        return [runs] * nqb
    st = state.reshape(-1, nqb, nkb)
    visit = (st > 0).any(0).tolist()
    full = (st == 2).all(0).tolist()
    sched = []
    for i in range(nqb):
        if i in skip:
            sched.append(None)
            continue
        # Mark each visited tile masked (P) or not (F); a stretch of fewer than MIN_FULL full tiles is cheaper
        # masked inside its neighbours' run than as runs of its own (fewer, larger ops).
        marks = [None if not visit[i][j] else ("F" if full[i][j] else "P") for j in range(nkb)]
        j = 0
        while j < nkb:
            if marks[j] == "F":
                j1 = j
                while j1 < nkb and marks[j1] == "F":
                    j1 += 1
                if j1 - j < MIN_FULL and ((j > 0 and marks[j - 1]) or (j1 < nkb and marks[j1])):
                    marks[j:j1] = ["P"] * (j1 - j)
                j = j1
            else:
                j += 1
        runs, j = [], 0
        while j < nkb:
            if marks[j] is None:
                j += 1
                continue
            j0 = j
            per_run = per_full if marks[j0] == "F" else bounded
            while j < nkb and marks[j] == marks[j0] and j - j0 < per_run:
                j += 1
            runs.append((j0 * bk, min(j * bk, Nk), marks[j0] == "P"))
        sched.append(runs)
    return sched


def _head(x: torch.Tensor, G: int, n: int, gi: int) -> torch.Tensor:
    """Rows of query head ``gi`` from folded rows (.., .., G·n, X) -> (.., .., n, X). Fused backward calls go
    one query head at a time so dK/dV sum n rows per head, then heads (as the reference accumulates)."""
    return x if G == 1 else x.unflatten(2, (G, n))[:, :, gi].contiguous()


def _exact_schedule(call: Call):
    """(bq, schedule) of the exact torch-ops path: no fused kernel, no band (see _fwd)."""
    bm = call.block_mask
    bq, bk = bm.block_size if bm is not None else (BLOCK_Q, BLOCK_K)
    return bq, _schedule(call, bq, bk, fused=False)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its rows are contiguous and no dimension is broadcast (stride 0), else a contiguous
    copy: what PyTorch's fused CPU kernel reads correctly (it assumes stride(-1) == 1)."""
    if t.stride(-1) == 1 and all(st or n <= 1 for st, n in zip(t.stride(), t.shape)):
        return t
    return t.contiguous()


def _two_sum(a: torch.Tensor, b: torch.Tensor):
    """(hi, lo) with hi = fl(a + b) and hi + lo = a + b exactly (Knuth's TwoSum); lo = 0 where hi is not
    finite."""
    hi = a + b
    bb = hi - a
    lo = (a - (hi - bb)) + (b - bb)
    return hi, lo.masked_fill_(~torch.isfinite(hi), 0.0)


def _use_fused(call: Call) -> bool:
    return (get_options().tiled_fused and call.q.device.type == "cpu" and not call.has_mods and call.dropout_p == 0
            and call.D == call.Dv and call.D > 0 and hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"))


class _Tile:
    """One q block (rows q0:q1) of a call, in the folded GQA layout (B, Hkv, G·n, ·)."""

    def __init__(self, call: Call, q0: int, q1: int, exact: bool = False):
        self.call, self.q0, self.q1, self.n = call, q0, q1, q1 - q0
        self.fold = (call.B, call.Hkv, call.G * self.n)
        self.exact = exact       # the exact path: zero probabilities never meet (maybe NaN) values

    def rows(self, t4: torch.Tensor) -> torch.Tensor:
        """Rows q0:q1 of a (B, Hq, N, X) tensor, folded to (B, Hkv, G·n, X)."""
        c, N, X = self.call, t4.shape[2], t4.shape[-1]
        return t4.reshape(c.B, c.Hkv, c.G, N, X)[..., self.q0:self.q1, :].reshape(*self.fold, X)

    def mask(self, k0, k1, dtype):
        """The run's visibility for the fused kernel: (additive 0/-inf mask (Bm, Hkv|1, G·n, c), dead rows,
        False), or (None, None, True) when it is exactly the square lower triangle (the kernel's is_causal)."""
        c = self.call
        vis = c.visible(self.q0, self.q1, k0, k1)
        vis = vis.expand(*vis.shape[:2], self.n, k1 - k0)
        if c.G == 1 and self.n == k1 - k0 and vis.shape[:2] == (1, 1) and torch.equal(
                vis[0, 0], torch.ones(self.n, self.n, dtype=torch.bool, device=vis.device).tril_()):
            return None, None, True
        if c.G > 1:
            vis = vis.expand(vis.shape[0], c.Hq, self.n, k1 - k0).reshape(vis.shape[0], c.Hkv, c.G * self.n, -1)
        add = torch.zeros(vis.shape, dtype=dtype, device=vis.device).masked_fill_(~vis, _NEG)
        return add, ~vis.any(-1, keepdim=True), False


# ------------------------------------------------- forward of one run -> (m (.., 1), r (.., 1), o)
# A run's result is its output o (softmax-normalised over the run's keys) and its logsumexp as m + r: m the
# row max of the scores (a score itself, exact), r = log Σ exp(s − m) (small). Kept apart, they merge
# without the rounding of an fp32 lse of large magnitude (_merge).

def _fused_fwd(t: _Tile, qb, k, v, k0, k1, partial):
    c = t.call
    add, dead, tri = t.mask(k0, k1, qb.dtype) if partial else (None, None, False)
    o, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
        qb, k[:, :, k0:k1], v[:, :, k0:k1], is_causal=tri, attn_mask=add, scale=c.scale)
    lse = lse.unsqueeze(-1).to(c.acc_dtype)
    o = o.to(c.acc_dtype)
    if dead is not None and bool(dead.any()):
        lse = lse.masked_fill(dead.expand_as(lse), _NEG)   # the kernel reports lse 0 for an empty row
    return lse, torch.zeros_like(lse), o


def _ops_fwd(t: _Tile, qb, k, v, k0, k1, partial):
    # One fused softmax per run (each row stays in cache) and its lse from the row max: 2 sweeps of the
    # score tile instead of the 4 of max / subtract / exp / sum.
    c, n, cw = t.call, t.n, k1 - k0
    s = torch.matmul(qb, k[:, :, k0:k1].transpose(-1, -2)).view(c.B, c.Hq, n, cw)
    if c.has_mods:
        s = c.scores(s, t.q0, t.q1, k0, k1)
    if partial:
        s = s.masked_fill_(~c.visible(t.q0, t.q1, k0, k1), _NEG)
    m, arg = s.max(-1, keepdim=True)
    p = torch.softmax(s, -1)
    r = -torch.log(p.gather(-1, arg))                    # p at the max is exp(0) / Σ exp(s − m)
    r = r.masked_fill_(m == float("inf"), 0.0)           # a +inf score: lse +inf (the output is NaN)
    if partial or c.has_mods or t.exact:
        # rows whose scores here are all -inf (masked, -inf through a bias or score_mod, or infinite inputs)
        # see no key in this run: softmax gave NaN, the run contributes nothing
        dead = m == _NEG
        if bool(dead.any()):
            p = p.masked_fill_(dead, 0.0)
            r = r.masked_fill_(dead, 0.0)
    if c.dropout_p:
        p = p.mul_(c.keep(t.q0, t.q1, k0, k1)).mul_(1.0 / (1.0 - c.dropout_p))
    mm = matmul_skip_zeros if t.exact else torch.matmul
    o = mm(p.view(*t.fold, cw), v[:, :, k0:k1])
    return m.reshape(*t.fold, 1), r.reshape(*t.fold, 1), o


def _merge(m_a, r_a, o_a, m_b, r_b, o_b):
    """Two runs over disjoint keys -> the run over both (the online softmax). m + r is each one's lse; a run
    with m = -inf saw no key and contributes nothing. The weights exp(m_x − m + r_x) subtract two scores of
    like magnitude (exact), so the merge adds no error of the size of |lse| (an fp32 lse merge would)."""
    m = torch.maximum(m_a, m_b)
    ms = m.masked_fill(m == _NEG, 0.0)
    wa, wb = torch.exp(m_a - ms + r_a), torch.exp(m_b - ms + r_b)
    tot = wa + wb
    tot = tot.masked_fill(tot == 0, 1.0)
    r = torch.log(tot).masked_fill_(m == float("inf"), 0.0)     # a +inf score: lse +inf, the output NaN
    return m, r, o_a * (wa / tot) + o_b * (wb / tot)


# ------------------------------------------------------------------------------ banded (sliding window)

class _Band:
    """A sliding-window call seen as a band: query block b (rows b·bq .. b·bq+bq) reads the ``span =
    lead + bq + left + right`` keys from ``b·bq + off - left - lead`` on (``lead`` masked keys pad span to a
    multiple of BAND_ALIGN), with the same in-tile pattern for every interior
    block (one whose keys all exist). Those blocks need no tiling or LSE merge: a row's whole window is in
    its band, so one softmax per row is exact. Per head, the bands are overlapping strided views of K and V
    (never copied) and a chunk of blocks is one batched matmul, one in-place fused softmax (and its fused
    backward), one batched matmul. Edge blocks take the general schedule."""

    def __init__(self, call: Call, bq: int, left: int, right: int):
        # The band starts `lead` masked keys early so that span is a multiple of BAND_ALIGN: row-length tails
        # cost the matmul and softmax kernels ~7% (measured, NOTES step 17).
        self.lead = -(bq + left + right) % BAND_ALIGN
        self.bq, self.left, self.right, self.span = bq, left, right, self.lead + bq + left + right
        self.off, self._mask = call.offset, None
        nqb = call.Nq // bq                                    # whole blocks only
        ok = [b for b in range(nqb) if self.key0(b) >= 0 and self.key0(b) + self.span <= call.Nk]
        self.blocks = range(ok[0], ok[-1] + 1) if ok else range(0)

    @staticmethod
    def plan(call: Call, bq: int):
        if call.has_mods or call.dropout_p or call.mask is not None or call.window is None \
                or call.window[0] is None or min(call.D, call.Dv) == 0:
            return None
        left, right = call.window
        right = 0 if call.causal else right
        if right is None or bq + left + right >= call.Nk // 2:
            return None
        band = _Band(call, bq, left, right)
        return band if len(band.blocks) >= 2 else None

    def key0(self, b: int) -> int:
        """First key of query block b's band."""
        return b * self.bq + self.off - self.left - self.lead

    def chunks(self, call: Call, training: bool):
        """Runs of interior blocks whose score tile (blocks·bq·span) fits in BAND_TILE_BYTES."""
        per = self.bq * self.span * call.acc_dtype.itemsize
        step = max(1, BAND_TILE_BYTES[training] // per)
        for b0 in range(self.blocks.start, self.blocks.stop, step):
            yield b0, min(b0 + step, self.blocks.stop)

    def kept_size(self, call: Call) -> int:
        """Values of the kept probabilities: (B, Hq, blocks, bq, span), laid out chunk by chunk."""
        return call.B * call.Hq * len(self.blocks) * self.bq * self.span

    def kept_views(self, call: Call, flat: torch.Tensor):
        """The (n, bq, span) views of ``flat`` for every (head, chunk) in the order the band path visits."""
        at = 0
        for _ in _band_heads(call):
            for b0, b1 in self.chunks(call, True):
                size = (b1 - b0) * self.bq * self.span
                yield flat[at:at + size].view(b1 - b0, self.bq, self.span)
                at += size

    def may_keep(self, call: Call) -> bool:
        """Whether the band's probabilities, (B, Hq, blocks, bq, span) in the acc dtype, are small enough to keep
        for the backward: at most ``band_keep_bytes``, and at most ``band_keep_ratio`` times the values of q
        (:func:`qkv.options`)."""
        n = call.B * call.Hq * len(self.blocks) * self.bq * self.span
        opts = get_options()
        return n * call.acc_dtype.itemsize <= opts.band_keep_bytes and n <= opts.band_keep_ratio * call.q.numel()

    def _edges(self, call: Call):
        """The in-band mask: row r sees band columns lead + r .. lead + r + left + right, so only the first
        lead + bq - 1 columns and those from lead + left + right + 1 on hold masked entries. Returns (a, b,
        additive mask of the columns before a (bq, a), of the columns from b on (bq, span - b))."""
        if self._mask is None:
            r = torch.arange(self.bq, device=call.q.device).view(-1, 1)
            c = torch.arange(self.span, device=call.q.device).view(1, -1)
            vis = (c >= r + self.lead) & (c <= r + self.lead + self.left + self.right)
            add = torch.zeros(vis.shape, dtype=call.acc_dtype, device=vis.device).masked_fill_(~vis, _NEG)
            a = min(self.lead + self.bq - 1, self.span)
            b = max(self.lead + self.left + self.right + 1, a)
            self._mask = a, b, add[:, :a], add[:, b:]
        return self._mask

    def blocks_of(self, x: torch.Tensor, dtype=None) -> torch.Tensor:
        """One head's rows (N, X) as whole query blocks (N // bq, bq, X): a view when x is contiguous."""
        x = x[: x.shape[0] // self.bq * self.bq]
        x = x if dtype is None else x.to(dtype)
        return x.view(-1, self.bq, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, self.bq, x.shape[-1])

    def scores(self, call: Call, qc, k, b0, b1, out):
        """Masked scaled scores of blocks b0..b1 of one head into out (n, bq, span); qc: their query blocks
        (n, bq, D) in the acc dtype, k: the head's contiguous (Nk, D)."""
        torch.baddbmm(out, qc, self.bands(k, b0, b1, transposed=True), beta=0, alpha=call.scale, out=out)
        a, b, add_a, add_b = self._edges(call)
        out[..., :a] += add_a                                  # the mask only where it has -inf entries
        out[..., b:] += add_b

    def bands(self, x: torch.Tensor, b0: int, b1: int, transposed: bool = False) -> torch.Tensor:
        """The key bands of blocks b0..b1 of one head's contiguous (Nk, X): an overlapping (nb, span, X) view
        (or (nb, X, span) with ``transposed``)."""
        X = x.shape[-1]
        at = x.storage_offset() + self.key0(b0) * X
        if transposed:
            return x.as_strided((b1 - b0, X, self.span), (self.bq * X, 1, X), at)
        return x.as_strided((b1 - b0, self.span, X), (self.bq * X, X, 1), at)

    def scatter(self, acc: torch.Tensor, g: torch.Tensor, b0: int, b1: int):
        """Add band gradients g (nb, span, X) into one head's acc (Nk, X). Bands overlap, but the j-th
        bq-wide slice of every band is disjoint from the others': one strided add per slice."""
        X, bq = acc.shape[-1], self.bq
        for j in range(0, self.span, bq):
            w = min(bq, self.span - j)
            acc.as_strided((b1 - b0, w, X), (bq * X, X, 1), acc.storage_offset() + (self.key0(b0) + j) * X) \
                .add_(g[:, j:j + w])


def _softmax_(s: torch.Tensor, alias: bool | None = None):
    """Row softmax of s in place (the tile stays in cache). ATen's CPU kernel works a row at a time, so its
    output may alias its input (``alias``, the default on CPU); elsewhere it goes through a temporary."""
    if s.device.type == "cpu" if alias is None else alias:
        _aten._softmax.out(s, -1, False, out=s)
    else:
        s.copy_(torch.softmax(s, -1))


def _softmax_backward_(ds: torch.Tensor, p: torch.Tensor, alias: bool | None = None):
    """ds <- p·(ds − Σ_row p·ds), the softmax backward, in place as in _softmax_."""
    if ds.device.type == "cpu" if alias is None else alias:
        _aten._softmax_backward_data.out(ds, p, -1, ds.dtype, grad_input=ds)
    else:
        ds.copy_(_aten._softmax_backward_data(ds, p, -1, ds.dtype))


def _band_heads(call: Call):
    """(batch, query head, its kv head) of every head the band path visits, one at a time."""
    for b in range(call.B):
        for h in range(call.Hq):
            yield b, h, h // call.G


def _band_fwd(call: Call, band: _Band, q, k, v, out, lse, out_acc, kept: torch.Tensor | None):
    """Writes the interior rows of out, and of lse when the call returns it (nothing else reads them: the
    band backward works on whole rows). With keep, returns the probabilities for the backward (which then
    skips recomputing them): one (blocks, bq, span) tensor per head and chunk, in loop order. Chunk-sized
    allocations, not one large one: the allocator can reuse them from step to step.
    Per-head views are made once per head: the chunk loop is a handful of ops (it runs ~40 times a call)."""
    acc, bq = call.acc_dtype, band.bq
    k, v = k.to(acc).contiguous(), v.to(acc).contiguous()
    direct = out_acc is None and out.dtype == acc and out.is_contiguous()   # bmm writes straight into out
    kept, buf = (None if kept is None else band.kept_views(call, kept)), None
    for b, h, kv in _band_heads(call):
        qh, kh, vh = band.blocks_of(q[b, h], acc), k[b, kv], v[b, kv]
        oh = band.blocks_of(out[b, h]) if direct else None
        for b0, b1 in band.chunks(call, kept is not None):
            n = b1 - b0
            if kept is not None:
                s = next(kept)
            else:
                buf = torch.empty(n, bq, band.span, dtype=acc, device=q.device) if buf is None else buf
                s = buf[:n]
            band.scores(call, qh[b0:b1], kh, b0, b1, out=s)
            if call.return_lse:
                m = s.amax(-1)
            _softmax_(s)
            if call.return_lse:
                lse[b, h, b0 * bq:b1 * bq] = m.view(-1) - s.amax(-1).log_().view(-1)   # p_max = exp(m - lse)
            if direct:
                torch.bmm(s, band.bands(vh, b0, b1), out=oh[b0:b1])
            else:
                o = torch.bmm(s, band.bands(vh, b0, b1)).view(n * bq, -1)
                out[b, h, b0 * bq:b1 * bq] = o
                if out_acc is not None:
                    out_acc[b, h, b0 * bq:b1 * bq] = o


def _band_bwd(call: Call, band: _Band, q, k, v, dout, dlse, dq, dk, dv, kept):
    """dq, dk, dv: contiguous accumulators in the acc dtype. The softmax backward runs on whole rows, so it
    needs neither the saved output nor the LSE: p is the forward's (kept) or recomputed by the same softmax."""
    acc, bq = call.acc_dtype, band.bq
    k, v = k.to(acc).contiguous(), v.to(acc).contiguous()
    bufs, kept = None, None if kept is None else band.kept_views(call, kept)
    for b, h, kv in _band_heads(call):
        qh, doh, dqh = band.blocks_of(q[b, h], acc), band.blocks_of(dout[b, h], acc), band.blocks_of(dq[b, h])
        kh, vh, dkh, dvh = k[b, kv], v[b, kv], dk[b, kv], dv[b, kv]
        dlh = None if dlse is None else band.blocks_of(dlse[b, h].unsqueeze(-1), acc)
        for b0, b1 in band.chunks(call, True):
            n = b1 - b0
            if bufs is None:
                bufs = [torch.empty(n, bq, band.span, dtype=acc, device=q.device) for _ in range(2)]
            ds, qc, do = bufs[1][:n], qh[b0:b1], doh[b0:b1]
            kb = band.bands(kh, b0, b1)
            if kept is not None:
                p = next(kept)
            else:
                p = bufs[0][:n]
                band.scores(call, qc, kh, b0, b1, out=p)
                _softmax_(p)
            torch.bmm(do, band.bands(vh, b0, b1, transposed=True), out=ds)
            _softmax_backward_(ds, p)                            # p·(dp − Σ p·dp); brings a kept p into cache
            band.scatter(dvh, torch.bmm(p.transpose(1, 2), do), b0, b1)
            if dlh is not None:                                   # d lse_i / d s_ij = p_ij
                ds.addcmul_(p, dlh[b0:b1])
            # the scale rides the GEMMs (alpha); with beta=0 baddbmm's first argument only gives the shape
            torch.baddbmm(dqh[b0:b1], ds, kb, beta=0, alpha=call.scale, out=dqh[b0:b1])
            band.scatter(dkh, torch.baddbmm(kb, ds.transpose(1, 2), qc, beta=0, alpha=call.scale), b0, b1)


def _fwd(call: Call, q, k, v, bq, sched, band=None, keep=False, lo=False):
    """out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) in the acc dtype, the acc-dtype copy of out that a
    half-precision backward reads (or None), the band's kept probabilities (flat, or None) and, with ``lo``,
    the low part of the lse (lse_hi + lse_lo is the row's logsumexp to twice the acc dtype's precision: the
    backward's exp(s − lse) then stays exact when |lse| is large) or None.

    A result that is not finite comes from NaN/inf inputs; the fast paths (fused kernel, band) may also have
    let a hidden one in through a 0·NaN, so such a call is computed again on the exact path, where keys a row
    cannot see never touch it. The kept band probabilities are then NaN: the backward recomputes them."""
    fused = _use_fused(call)
    # PyTorch's fused kernel gives a row of NaN scores the result of a row that sees nothing (0, lse 0), which
    # no check of the result can tell: q or k that are not finite go to the exact path first.
    if not (fused and not all_finite(q, k)):
        res = _fwd_pass(call, q, k, v, bq, sched, band, keep, exact=False)
        if finite_result(res[0], res[1]):
            return res if lo else res[:4] + (None,)
    ebq, esched = _exact_schedule(call)
    out, lse, out_acc, _, lse_lo = _fwd_pass(call, q, k, v, ebq, esched, None, False, exact=True)
    kept = torch.full((band.kept_size(call),), float("nan"), dtype=call.acc_dtype, device=q.device) if keep else None
    return out, lse, None if fused else out_acc, kept, lse_lo if lo else None


def _fwd_pass(call: Call, q, k, v, bq, sched, band, keep, exact: bool):
    B, Hq, Nq, Dv = call.B, call.Hq, call.Nq, call.Dv
    fused = not exact and _use_fused(call)
    run_fwd = _fused_fwd if fused else _ops_fwd
    if fused:
        q, k, v = _dense(q), _dense(k), _dense(v)
    else:
        k, v = k.to(call.acc_dtype), v.to(call.acc_dtype)
    out = torch.empty(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Nq, dtype=call.acc_dtype, device=q.device)   # fp64 for fp64: backward reads it
    lse_lo = torch.zeros_like(lse)
    # The ops path keeps an fp32 copy of a half-precision output: backward's rowsum(dO·O) needs it unrounded.
    out_acc = None if fused or q.dtype == call.acc_dtype else torch.empty(B, Hq, Nq, Dv, dtype=call.acc_dtype,
                                                                            device=q.device)
    out5 = out.view(B, call.Hkv, call.G, Nq, Dv)
    lse5, lo5 = lse.view(B, call.Hkv, call.G, Nq), lse_lo.view(B, call.Hkv, call.G, Nq)
    kept = torch.empty(band.kept_size(call), dtype=call.acc_dtype, device=q.device) if keep else None
    if band is not None:
        _band_fwd(call, band, q, k, v, out, lse, out_acc, kept)
    for i, runs in enumerate(sched):
        if band is not None and i in band.blocks:
            continue
        t = _Tile(call, i * bq, min((i + 1) * bq, Nq), exact)
        if not runs:
            out5[..., t.q0:t.q1, :] = 0
            lse5[..., t.q0:t.q1] = _NEG
            continue
        qb = t.rows(q) if fused else t.rows(q).to(call.acc_dtype) * call.scale
        m = r = o = None
        for k0, k1, partial in runs:
            m_c, r_c, o_c = run_fwd(t, qb, k, v, k0, k1, partial)
            m, r, o = (m_c, r_c, o_c) if o is None else _merge(m, r, o, m_c, r_c, o_c)
        out5[..., t.q0:t.q1, :] = o.view(B, call.Hkv, call.G, t.n, Dv)
        hi, lo = _two_sum(m, r)
        lse5[..., t.q0:t.q1] = hi.view(B, call.Hkv, call.G, t.n)
        lo5[..., t.q0:t.q1] = lo.view(B, call.Hkv, call.G, t.n)
        if out_acc is not None:
            out_acc.view(B, call.Hkv, call.G, Nq, Dv)[..., t.q0:t.q1, :] = o.view(B, call.Hkv, call.G, t.n, Dv)
    return out, lse, out_acc, kept, lse_lo


# ------------------------------------------------------------- backward of one run (accumulates grads)

def _fused_bwd(t: _Tile, g, k0, k1, partial):
    c = t.call
    add, _, tri = t.mask(k0, k1, g["qb"].dtype) if partial else (None, None, False)
    kc, vc = g["k"][:, :, k0:k1], g["v"][:, :, k0:k1]
    # One call per query head of a kv group (not the folded rows): dk and dv then sum over n rows per head
    # and over heads last, as the reference does, instead of one long fp32 sum over G·n rows.
    G, n = c.G, t.n

    def head(x, gi):
        return _head(x, G, n, gi)

    for gi in range(G):
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            head(g["dob"], gi), head(g["qb"], gi), kc, vc, head(g["ob"], gi),
            head(g["lb"].unsqueeze(-1), gi).squeeze(-1),
            0.0, tri, attn_mask=None if add is None else head(add, gi), scale=c.scale)
        if G == 1:
            g["dqb"] += dq
        else:
            g["dqb"].unflatten(2, (G, n))[:, :, gi] += dq
        g["dk"][:, :, k0:k1] += dk
        g["dv"][:, :, k0:k1] += dv


def _ops_bwd(t: _Tile, g, k0, k1, partial):
    c, n, cw = t.call, t.n, k1 - k0
    qb, dob, kc, vc = g["qb"], g["dob"], g["k"][:, :, k0:k1], g["v"][:, :, k0:k1]
    s_raw = torch.matmul(qb, kc.transpose(-1, -2)).view(c.B, c.Hq, n, cw)
    vis = c.visible(t.q0, t.q1, k0, k1) if partial else None
    s = c.scores(s_raw, t.q0, t.q1, k0, k1) if c.has_mods else s_raw
    if s is s_raw and c.has_mods:
        s = s.clone()                                      # s_raw is read again by scores_backward
    if vis is not None:
        s = s.masked_fill_(~vis, _NEG)
    p = s.sub_(g["lb"])
    if g["lo"] is not None:                                # the lse's low part (see _fwd)
        p = p.sub_(g["lo"])
    p = p.exp_()
    dp = torch.matmul(dob, vc.transpose(-1, -2)).view(c.B, c.Hq, n, cw)
    pd = p
    if c.dropout_p:
        keep = c.keep(t.q0, t.q1, k0, k1).to(p.dtype) * (1.0 / (1.0 - c.dropout_p))
        pd, dp = p * keep, dp * keep
    g["dv"][:, :, k0:k1] += _per_head_t_matmul(pd, dob, c.G, t.exact)
    ds = dp.sub_(g["db"]).mul_(p)
    zero = None
    if t.exact:                                            # p = 0 times a NaN dp (a NaN value) is 0 here
        zero = p == 0
        ds = ds.masked_fill_(zero, 0.0)
        if c.has_mods:                 # nor do scores that are hidden (maybe NaN) reach the mods' derivatives
            s_raw = s_raw.masked_fill_(zero, 0.0)
    if c.has_mods:
        ds = c.scores_backward(s_raw, ds, t.q0, t.q1, k0, k1, g["dbias"], g["dcaps"], zero=zero)
    ds = ds.reshape(*t.fold, cw)
    g["dqb"] += matmul_skip_zeros(ds, kc) if t.exact else torch.matmul(ds, kc)
    g["dk"][:, :, k0:k1] += _per_head_t_matmul(ds, qb, c.G, t.exact)


def _per_head_t_matmul(a, b, G, skip_zeros: bool = False):
    """sum over the G query heads of a kv head of aᵀ·b: a (B, Hkv, G·n, c) (or (B, Hq, n, c)), b (B, Hkv, G·n, X)
    -> (B, Hkv, c, X); per-head products first, then the sum over heads (as the reference accumulates).
    ``skip_zeros``: zero entries of a contribute nothing, even against NaN or inf in b."""
    B, Hkv, X = b.shape[0], b.shape[1], b.shape[-1]
    n = b.shape[2] // G
    a5 = a.reshape(B, Hkv, G, n, a.shape[-1])
    out = (matmul_skip_zeros if skip_zeros else torch.matmul)(a5.transpose(-1, -2), b.view(B, Hkv, G, n, X))
    return out.sum(2) if G > 1 else out.squeeze(2)


def _bwd(call: Call, q, k, v, out, lse, dout, dlse, bq, sched, need_dbias, band=None, kept=None, dcaps=None,
         lo=None):
    """(dq, dk, dv, dbias), accumulating the score_mod captures' gradients into ``dcaps``. Gradients that are
    not finite come from NaN/inf inputs or outputs; the fast paths may also have let a hidden one in through a
    0·NaN, so such a backward is computed again on the exact path (zero probabilities and zero score
    gradients never meet NaN/inf values). The band path leaves the lse of its rows unwritten, so after it
    the exact path first recomputes the forward's out and lse."""
    if not (_use_fused(call) and dlse is None and not all_finite(q, k)):      # (see _fwd)
        grads = _bwd_pass(call, q, k, v, out, lse, dout, dlse, bq, sched, need_dbias, band, kept, dcaps, lo, False)
        if all_finite(*grads, *(dcaps or ())):
            return grads
        for d in dcaps or ():
            d.zero_()
    ebq, esched = _exact_schedule(call)
    if band is not None:
        out, lse, out_acc, _, lo = _fwd_pass(call, q, k, v, ebq, esched, None, False, exact=True)
        out = out if out_acc is None else out_acc
    return _bwd_pass(call, q, k, v, out, lse, dout, dlse, ebq, esched, need_dbias, None, None, dcaps, lo, True)


def _bwd_pass(call: Call, q, k, v, out, lse, dout, dlse, bq, sched, need_dbias, band, kept, dcaps, lo,
              exact: bool):
    B, Hq, Hkv, G, Nq, D, Dv = call.B, call.Hq, call.Hkv, call.G, call.Nq, call.D, call.Dv
    acc = call.acc_dtype
    fused = not exact and _use_fused(call) and dlse is None
    lse_safe = lse.masked_fill(lse == _NEG, float("inf")).unsqueeze(-1)   # exp(s - inf) = 0 on empty rows
    g = dict(dk=torch.zeros(B, Hkv, call.Nk, D, dtype=acc, device=q.device),
             dv=torch.zeros(B, Hkv, call.Nk, Dv, dtype=acc, device=q.device),
             dbias=torch.zeros(call.bias.shape, dtype=acc, device=q.device) if need_dbias else None,
             dcaps=dcaps, lo=None)
    lo_all = None
    if fused:
        q, k, v, out = _dense(q), _dense(k), _dense(v), _dense(out)
        g.update(k=k, v=v)
        dout = _dense(dout.to(q.dtype))
    else:
        g.update(k=k.to(acc), v=v.to(acc))
        # delta_i = sum_d dO·O (FlashAttention-2), minus the lse cotangent: d lse_i / d s_ij = p_ij.
        delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - dlse.to(acc).unsqueeze(-1)
        lse_safe = lse_safe.to(acc)
        lo_all = None if lo is None else lo.to(acc).unsqueeze(-1)
    dq = torch.empty(B, Hq, Nq, D, dtype=acc, device=q.device)     # every row is written below
    dq5 = dq.view(B, Hkv, G, Nq, D)
    run_bwd = _fused_bwd if fused else _ops_bwd
    if band is not None:
        _band_bwd(call, band, q, k, v, dout, dlse, dq, g["dk"], g["dv"], kept)
    for i, runs in enumerate(sched):
        if band is not None and i in band.blocks:
            continue
        if not runs:                                       # rows that see no key
            dq5[..., i * bq:(i + 1) * bq, :] = 0
            continue
        t = _Tile(call, i * bq, min((i + 1) * bq, Nq), exact)
        if fused:
            g.update(qb=t.rows(q), dob=t.rows(dout), ob=t.rows(out), lb=t.rows(lse_safe).squeeze(-1))
        else:
            g.update(qb=t.rows(q).to(acc) * call.scale, dob=t.rows(dout).to(acc),
                     lb=lse_safe[:, :, t.q0:t.q1], db=delta[:, :, t.q0:t.q1],
                     lo=None if lo_all is None else lo_all[:, :, t.q0:t.q1])
        g["dqb"] = torch.zeros(*t.fold, D, dtype=acc, device=q.device)
        for k0, k1, partial in runs:
            run_bwd(t, g, k0, k1, partial)
        dqb = g["dqb"] if fused else g["dqb"] * call.scale
        dq5[..., t.q0:t.q1, :] = dqb.view(B, Hkv, G, t.n, D)
    dbias = g["dbias"]
    return (dq.to(q.dtype), g["dk"].to(k.dtype), g["dv"].to(v.dtype),
            None if dbias is None else dbias.to(call.bias.dtype))


def _native_fwd(call: Call):
    """The CPU kernel's out and lse for a call it serves; a result that is not finite is computed again on
    the exact path. Finite inputs give a finite result; a NaN score makes its row NaN in the kernel (its exp
    propagates NaN), and so does a hidden non-finite value within the last group of keys past a row's range
    (0·NaN): the result check sees every case, so the inputs are never scanned (a decoding step would read
    its keys twice)."""
    out, lse = _native.attention_fwd(call)
    if finite_result(out, lse):
        return out, lse
    bq, sched = _exact_schedule(call)
    out, lse, _, _, _ = _fwd_pass(call, call.q, call.k, call.v, bq, sched, None, False, exact=True)
    return out, lse


def _native_bwd(call: Call, out, lse, dout, dlse):
    """The CPU kernel's (dq, dk, dv); gradients that are not finite are computed again on the exact path."""
    grads = _native.attention_bwd(call, out, lse, dout, dlse)     # NaN scores give NaN gradients (see above)
    if all_finite(*grads):
        return grads
    bq, sched = _exact_schedule(call)
    return _bwd_pass(call, call.q, call.k, call.v, out, lse, dout, dlse, bq, sched, False, None, None, None, None,
                     True)[:3]


class _Plan:
    """What the tiled engine does for a call, decided from its static facts (no tensor data): the CPU kernel
    (``native``), the band path (``band``, with ``keep`` its probabilities for the backward), PyTorch's fused
    tile kernel (``fused``), an acc-dtype copy of a half-precision output for the backward (``out_acc``).
    The schedule (``bq``, ``bk``, ``sched``) may read a mask's data and is made when the forward runs."""

    __slots__ = ("native", "band", "keep", "fused", "out_acc", "lse_lo", "block_size", "bq", "bk", "sched")

    def __init__(self, call: Call, training: bool, block_size: tuple[int, int] | None = None):
        self.block_size = block_size
        self.native = not block_size and _native.serves(call)
        bm = call.block_mask
        self.band = None if block_size or bm is not None or self.native else _Band.plan(call, BAND_Q)
        # The band path keeps its probabilities for a backward that will run (which then skips their recompute).
        self.keep = bool(self.band is not None and training and self.band.may_keep(call))
        self.fused = not self.native and _use_fused(call)
        self.out_acc = not self.native and not self.fused and call.q.dtype != call.acc_dtype
        # the low part of the lse (see _fwd) for the ops path's backward; fp64 needs none
        self.lse_lo = not self.native and not self.fused and call.acc_dtype != torch.float64
        self.bq = self.bk = self.sched = None

    def aux_meta(self, call: Call) -> list:
        meta = []
        if self.out_acc:
            meta.append(((call.B, call.Hq, call.Nq, call.Dv), call.acc_dtype))
        if self.keep:
            meta.append(((self.band.kept_size(call),), call.acc_dtype))
        if self.lse_lo:
            meta.append(((call.B, call.Hq, call.Nq), call.acc_dtype))
        return meta

    def schedule(self, call: Call) -> None:
        """Choose the tiles and plan the runs of every query block (once per plan)."""
        if self.native or self.sched is not None:
            return
        bm = call.block_mask
        if self.block_size:
            bq, bk = self.block_size
        elif self.band:
            bq, bk = BAND_Q, BAND_Q
        elif bm is not None:
            bq, bk = bm.block_size                  # the grid its states were built on
        else:
            bq, bk = (_fused_rows(call) if self.fused else BLOCK_Q), BLOCK_K
        self.bq, self.bk = bq, bk
        self.sched = _schedule(call, bq, bk, self.band.blocks if self.band else range(0))


class TiledEngine(KernelEngine):
    """FlashAttention's algorithm in torch ops (and, on CPU, qkv's C kernel): every call, any device."""

    name = "tiled"

    @property
    def summary(self) -> str:
        ok, why = _native.available()
        return ("FlashAttention's algorithm in torch ops; any device, every feature; "
                + (f"on CPU, unmasked/causal/window calls and decoding run on qkv's C kernel ({_native.isa()})"
                   if ok else f"no CPU kernel ({why})"))

    def supports(self, call: Call) -> list[str]:
        return []

    def plan(self, call: Call, training: bool) -> _Plan:
        return _Plan(call, training)

    def aux_meta(self, call: Call, plan: _Plan) -> list:
        return plan.aux_meta(call)

    def fwd(self, call: Call, plan: _Plan):
        if plan.native:
            out, lse = _native_fwd(call)
            return out, lse, []
        plan.schedule(call)
        out, lse, out_acc, kept, lo = _fwd(call, call.q, call.k, call.v, plan.bq, plan.sched, plan.band, plan.keep,
                                           plan.lse_lo)
        return out, lse, [t for t in (out_acc, kept, lo) if t is not None]

    def bwd(self, call: Call, plan: _Plan, out, lse, aux, dout, dlse, needs):
        if plan.native:                       # the kernel's backward, from its forward's out and lse
            dq, dk, dv = _native_bwd(call, out, lse, dout, dlse)
            return dq, dk, dv, None, []
        plan.schedule(call)
        aux = list(aux)
        out_acc = aux.pop(0) if plan.out_acc else None
        kept = aux.pop(0) if plan.keep else None
        lo = aux.pop(0) if plan.lse_lo else None
        need_dbias = call.bias is not None and needs[3]
        dcaps = [torch.zeros_like(c) for c in call.captures if c.requires_grad]
        dq, dk, dv, dbias = _bwd(call, call.q, call.k, call.v, out if out_acc is None else out_acc, lse, dout,
                                 dlse, plan.bq, plan.sched, need_dbias, plan.band, kept, dcaps, lo)
        return dq, dk, dv, dbias, dcaps


ENGINE = TiledEngine().register_kernel()


def tiled_attention(call: Call, block_size: tuple[int, int] | None = None):
    """FlashAttention, tiled in torch. call: a validated Call (q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D),
    v: (B, Hkv, Nk, Dv)). block_size: (BQ, BK), default the BlockMask's own or (BLOCK_Q, BLOCK_K).
    Returns out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) float32; differentiable in q, k, v, bias,
    the score_mod's captured tensors (and lse). The banded path fills its rows of lse only when
    ``call.return_lse`` (nothing else reads them)."""
    if block_size is None:
        return ENGINE.forward(call)
    return _BlockSized(block_size).forward(call)


class _BlockSized(TiledEngine):
    """The tiled engine on a fixed tile grid (tests use small tiles to reach every path on small shapes)."""

    def __init__(self, block_size):
        self.block_size = block_size
        self.name = f"tiled@{block_size[0]}x{block_size[1]}"

    def plan(self, call: Call, training: bool) -> _Plan:
        return _Plan(call, training, self.block_size)


def _fused_rows(call: Call) -> int:
    """Query rows per fused call: the largest of FUSED_BLOCK_Q, FUSED_BLOCK_Q/2, ..., BLOCK_Q whose coarser
    tiles add at most 15% to the visited score area, partial tiles counted half (fewer, larger calls; sparse
    masks keep fine rows; measured in benchmarks/NOTES.md).
    Only analytic rules are probed; a tensor mask or a plain mask_mod keeps BLOCK_Q."""
    if not call.rules:
        return FUSED_BLOCK_Q
    if not all(kind == "mod" and getattr(r, "analytic", False) for kind, r in call.rules):
        return BLOCK_Q

    def area(bq):                     # partial tiles count half: about what the kernel does inside them
        st = call.block_state(bq, BLOCK_K)
        st = st.reshape(-1, *st.shape[-2:])
        return (float((st == 2).all(0).sum()) + 0.5 * float(((st > 0).any(0) & ~(st == 2).all(0)).sum())) * bq

    fine, bq = area(BLOCK_Q), FUSED_BLOCK_Q
    while bq > BLOCK_Q and area(bq) > 1.15 * fine:
        bq //= 2
    return bq
