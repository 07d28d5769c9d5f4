"""The triton engine: a validated :class:`~qkv.core.call.Call` mapped onto the fused kernels.

Visibility becomes what the kernels compute from indices — key ranges (causal, windows, ``masks.causal`` of
either alignment), document ids (``masks.document``), lengths (``masks.padding``), also inside
``and_masks`` — and, for any other mask, the bit-packed partial tiles of a BlockMask
(:meth:`~qkv.core.masks.BlockMask.tile_masks`, cached on the BlockMask; built per call for a bool tensor or a
plain mask_mod). ``score_mod`` callables are not fused: the engine says so and ``auto`` keeps them on tiled.

Calls with few query rows per kv head against a longer cache (decoding) run the split-KV kernel when no
gradient is needed; everything else runs the forward kernel under an autograd Function whose backward runs
the dQ and dK/dV kernels (tensors reach the backward only through ``save_for_backward``).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ...core.call import Call
from ...core.masks import BlockMask, and_masks, block_mask
from ..base import Engine
from . import configs, launch
from .load import interpreting
from .plan import Lists, Plan

__all__ = ["ENGINE", "TritonEngine", "DECODE_MIN_KEYS_PER_ROW"]

#: The split-KV decoding kernel serves inference calls with at most DECODE_MAX_ROWS rows per kv head (G·Nq)
#: and at least this many keys per query row (a cache much longer than the new rows).
DECODE_MIN_KEYS_PER_ROW = 8


@dataclass
class _Rules:
    """The call's visibility as kernel arguments (see :mod:`.launch`)."""
    lo_off: int | None = None
    hi_off: int | None = None
    q_ids: torch.Tensor | None = None
    k_ids: torch.Tensor | None = None
    kv_lens: torch.Tensor | None = None
    q_lens: torch.Tensor | None = None
    masks: object = None              # TileMasks of the rules the kernels cannot compute from indices
    docs: int = 0                     # document rules seen (only one can be computed from ids)

    def narrow(self, lo=None, hi=None):
        if lo is not None:
            self.lo_off = lo if self.lo_off is None else max(self.lo_off, lo)
        if hi is not None:
            self.hi_off = hi if self.hi_off is None else min(self.hi_off, hi)


def _ids_at(ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (N,) or (B, N) read at positions pos (n,): values (Bi, n) and whether each position exists."""
    ids2 = ids if ids.dim() == 2 else ids[None]
    n = ids2.shape[-1]
    valid = (pos >= 0) & (pos < n)
    return ids2[:, pos.clamp(0, max(n - 1, 0))], valid


def _doc_ids(call: Call, kid, qid, moff, device):
    """(q_ids (Bd, Nq), k_ids (Bd, Nk)) int32 ranks of the document ids at the call's positions: equal ranks =
    same document; -1 for a row and -2 for a key whose position has no id (they see nothing)."""
    qpos = call.q_base + torch.arange(call.Nq, device=device) + (moff if qid is None else 0)
    kpos = call.k_base + torch.arange(call.Nk, device=device)
    kid = kid.to(device)
    qv, qok = _ids_at(kid if qid is None else qid.to(device), qpos)
    kv, kok = _ids_at(kid, kpos)
    _, inv = torch.unique(torch.cat([qv.flatten(), kv.flatten()]), return_inverse=True)
    qr, kr = inv[:qv.numel()].view(qv.shape), inv[qv.numel():].view(kv.shape)
    qr = torch.where(qok, qr, -1).to(torch.int32)
    kr = torch.where(kok, kr, -2).to(torch.int32)
    Bd = max(qr.shape[0], kr.shape[0])
    return qr.expand(Bd, -1).contiguous(), kr.expand(Bd, -1).contiguous()


def _lengths(x, B, device) -> torch.Tensor:
    x = torch.as_tensor(x, device=device).to(torch.int64)
    x = x.expand(B) if x.dim() == 0 else x.reshape(B)
    return x.clamp(-2**31, 2**31 - 1).to(torch.int32).contiguous()


def _index_rule(call: Call, r: _Rules, m, moff: int) -> bool:
    """Add mask ``m`` (evaluated with offset ``moff``) to ``r`` if the kernels compute it from indices."""
    spec = getattr(m, "spec", None)
    if spec is None:
        return False
    kind = spec[0]
    shift = call.q_base - call.k_base            # k_base + j <= q_base + i + c  <=>  j - i <= shift + c
    if kind == "causal":
        r.narrow(hi=shift + (moff if spec[1] else 0))
        return True
    if kind == "window":
        left, right = spec[1], spec[2]
        r.narrow(None if left is None else shift + moff - left, None if right is None else shift + moff + right)
        return True
    if kind == "document" and r.docs == 0:
        r.q_ids, r.k_ids = _doc_ids(call, spec[1], spec[2], moff, call.device)
        r.docs = 1
        return True
    if kind == "padding":
        kl = _lengths(spec[1], call.B, call.device) - call.k_base
        r.kv_lens = kl if r.kv_lens is None else torch.minimum(r.kv_lens, kl)
        if spec[2] is not None:
            ql = _lengths(spec[2], call.B, call.device) - call.q_base
            r.q_lens = ql if r.q_lens is None else torch.minimum(r.q_lens, ql)
        return True
    return False


def _decompose(call: Call, r: _Rules, m, moff: int, sizes) -> list:
    """Add the parts of ``m`` the kernels compute from indices to ``r``; return the others (as bound masks)."""
    spec = getattr(m, "spec", None)
    if spec is not None and spec[0] == "and":
        rest = []
        for child in spec[1]:
            rest += _decompose(call, r, child, moff, sizes)
        return rest
    if _index_rule(call, r, m, moff):
        return []
    return [m.bind(*sizes) if hasattr(m, "bind") and sizes is not None else m]


class _ShiftedMod:
    """A mask_mod evaluated at global positions (this call is a block of a larger one)."""

    def __init__(self, mod, qb, kb):
        self.mod, self.qb, self.kb = mod, qb, kb

    def __call__(self, b, h, q, kv):
        return self.mod(b, h, q + self.qb, kv + self.kb)


def rules(call: Call, tile: tuple[int, int]) -> _Rules:
    """The visibility of ``call`` as kernel arguments, partial-tile bitmaps at ``tile`` for what remains."""
    r = _Rules()
    if call.causal or call.window is not None:
        left, right = call.window if call.window is not None else (None, None)
        if call.causal:
            right = 0 if right is None else min(right, 0)
        r.narrow(None if left is None else call.offset - left, None if right is None else call.offset + right)
    mask = call.mask
    if mask is None:
        return r
    B, Hq, Nq, Nk, dev = call.B, call.Hq, call.Nq, call.Nk, call.device
    if isinstance(mask, BlockMask):
        trial = _Rules(r.lo_off, r.hi_off)
        if mask.mask_mod is not None and not _decompose(call, trial, mask.mask_mod, mask.mask_mod.offset
                                                        if hasattr(mask.mask_mod, "offset") else 0, None):
            return trial                           # its rule is computed in the kernels: no bitmaps needed
        r.masks = mask.tile_masks(tile, dev)
        return r
    if isinstance(mask, torch.Tensor):
        r.masks = block_mask(mask, B, Hq, Nq, Nk, block_size=tile, device=dev).tile_masks(tile, dev)
        return r
    mask = call.rules[-1][1]                      # the user's mask, bound to the call's sizes by prepare
    rest = _decompose(call, r, mask, getattr(mask, "offset", 0), getattr(mask, "sizes", None))
    if rest:
        m = rest[0] if len(rest) == 1 else and_masks(*rest)
        if call.q_base or call.k_base:
            m = _ShiftedMod(m, call.q_base, call.k_base)
        r.masks = block_mask(m, B, Hq, Nq, Nk, block_size=tile, device=dev).tile_masks(tile, dev)
    return r


def _prepared(call: Call, tile) -> tuple[_Rules, Plan | None]:
    """The call's rules and block lists; with a BlockMask, built once and kept on it (its mask decides them,
    with the call's causal/window and sizes)."""
    def build():
        r = rules(call, tile)
        plan = launch.make_plan(call.q, call.k, lo_off=r.lo_off, hi_off=r.hi_off, q_ids=r.q_ids, k_ids=r.k_ids,
                                kv_lens=r.kv_lens, q_lens=r.q_lens, masks=r.masks, tile=tile)
        return r, plan

    bm = call.block_mask
    if bm is None:
        return build()
    key = ("triton", tuple(tile), str(call.device), call.causal, call.window, call.B, call.Hq, call.Nq, call.Nk)
    return bm.cached(key, build)


# ------------------------------------------------------------------------------------------------ autograd

_AUX = ("alibi", "q_ids", "k_ids", "kv_lens", "q_lens")


@dataclass
class _Args:
    """The non-tensor launch arguments; tensors travel as autograd inputs (saved with save_for_backward)."""
    scale: float
    lo_off: int | None
    hi_off: int | None
    softcap: float | None
    dropout_p: float
    seed: int
    offset: int
    q_base: int
    k_base: int
    tile: tuple | None
    has: tuple                 # which of _AUX are present
    has_bits: bool

    def kwargs(self, aux, plan):
        kw = dict(scale=self.scale, lo_off=self.lo_off, hi_off=self.hi_off, softcap=self.softcap,
                  dropout_p=self.dropout_p, seed=self.seed, offset=self.offset, q_base=self.q_base,
                  k_base=self.k_base, plan=plan)
        kw.update(dict(zip(_AUX, aux)))
        return kw


def _plan_tensors(plan: Plan | None) -> list:
    if plan is None:
        return []
    t = [plan.state]
    for lst in (plan.fwd, plan.bwd):
        t += [lst.full_num, lst.full_idx, lst.part_num, lst.part_idx, lst.part_slot]
    return t + ([plan.bits] if plan.bits is not None else [])


def _plan_from(tile, tensors, has_bits) -> Plan | None:
    if not tensors:
        return None
    st, f = tensors[0], tensors[1:11]
    return Plan(tuple(tile), Lists(*f[:5]), Lists(*f[5:]), tensors[11] if has_bits else None, st)


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, args: _Args, *tensors):
        ctx.set_materialize_grads(False)
        n_aux = len(args.has)
        aux = list(tensors[:n_aux])
        plan = _plan_from(args.tile, list(tensors[n_aux:]), args.has_bits)
        out, lse, stats = launch.forward(q, k, v, bias=bias, return_stats=True,
                                         **args.kwargs(_expand(aux, args.has), plan))
        ctx.save_for_backward(q, k, v, bias, out, stats, *tensors)
        ctx.args = args
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, bias, out, stats, *tensors = ctx.saved_tensors
        args = ctx.args
        n_aux = len(args.has)
        aux = _expand(tensors[:n_aux], args.has)
        plan = _plan_from(args.tile, list(tensors[n_aux:]), args.has_bits)
        if dout is None:
            dout = torch.zeros_like(out)
        need_dbias = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = launch.backward(q, k, v, out, None, dout, dlse, bias=bias, need_dbias=need_dbias,
                                            stats=stats, **args.kwargs(aux, plan))
        return (dq, dk, dv, dbias, None) + (None,) * len(tensors)


def _expand(aux, has):
    """The _AUX tensors in order, None where absent (``aux`` holds the present ones)."""
    it = iter(aux)
    return [next(it) if name in has else None for name in _AUX]


# ------------------------------------------------------------------------------------------------ engine

class TritonEngine(Engine):
    """qkv's fused Triton kernels: forward and backward for every mask and mod except score_mod callables,
    split-KV decoding; CUDA (or Triton's interpreter on CPU tensors)."""

    name = "triton"
    summary = ("fused Triton kernels (forward, backward, split-KV decoding); causal/window/document/padding "
               "masks from indices, any other mask as bit-packed partial tiles; no compile step")

    def unavailable(self, device: torch.device) -> list[str]:
        why = []
        if importlib.util.find_spec("triton") is None:
            why.append("triton is not installed (pip install triton)")
        dev = torch.device(device)
        if dev.type != "cuda" and not interpreting():
            why.append(f"the Triton kernels run on CUDA tensors, not {dev}; set TRITON_INTERPRET=1 to run them "
                       f"on CPU tensors in Triton's interpreter (slow: for tests)")
        return why

    def supports(self, call: Call) -> list[str]:
        why = self.unavailable(call.device)
        if call.q.dtype == torch.float64:
            why.append("float64: the kernels compute in fp32 at most; backend='tiled' or 'reference' take fp64")
        if call.score_mod is not None:
            why.append("score_mod callables are not fused into the kernels (a Python function would need a "
                       "compile step); backend='tiled' runs them")
        limit = 256
        if call.device.type == "cuda" and not interpreting():
            limit = configs.MAX_HEAD_DIM[configs.arch_of(torch.cuda.get_device_capability(call.device))]
        if max(call.D, call.Dv) > limit:
            why.append(f"head dims up to {limit} on this device (got D={call.D}, Dv={call.Dv})")
        return why

    def forward(self, call: Call):
        tile = launch.tile_size(call.q)
        r, plan = _prepared(call, tile)
        alibi = None if call.alibi is None else call.alibi.to(torch.float32).contiguous()
        if self.decodes(call, r):
            return launch.decode(call.q, call.k, call.v, scale=call.scale, lo_off=r.lo_off, hi_off=r.hi_off,
                                  softcap=call.softcap, alibi=alibi, kv_lens=r.kv_lens, offset=call.offset)
        present = dict(alibi=alibi, q_ids=r.q_ids, k_ids=r.k_ids, kv_lens=r.kv_lens, q_lens=r.q_lens)
        has = tuple(n for n in _AUX if present[n] is not None)
        args = _Args(call.scale, r.lo_off, r.hi_off, call.softcap, call.dropout_p,
                     call.seed, call.offset, call.q_base, call.k_base, None if plan is None else plan.tile, has,
                     plan is not None and plan.bits is not None)
        return _TritonAttention.apply(call.q, call.k, call.v, call.bias, args, *(present[n] for n in has),
                                      *_plan_tensors(plan))

    @staticmethod
    def decodes(call: Call, r: _Rules | None = None) -> bool:
        """Whether ``call`` runs on the split-KV decoding kernel (inference, few rows per kv head, long cache,
        no bias, dropout, documents, row lengths or bitmaps)."""
        if call.training or call.bias is not None or call.dropout_p > 0:
            return False
        if call.G * call.Nq > configs.DECODE_MAX_ROWS or call.Nk < DECODE_MIN_KEYS_PER_ROW * call.Nq:
            return False
        if r is None:
            return call.mask is None
        return r.q_ids is None and r.masks is None and r.q_lens is None


ENGINE = TritonEngine()
