"""The triton engine: a validated :class:`~qkv.core.call.Call` mapped onto the fused kernels.

Visibility becomes what the kernels compute from indices — key ranges (causal, windows, ``masks.causal`` of
either alignment), document ids (``masks.document``), lengths (``masks.padding``), also inside
``and_masks`` — and, for any other mask, the bit-packed partial tiles of a BlockMask
(:meth:`~qkv.core.masks.BlockMask.tile_masks`, cached on the BlockMask; built per call for a bool tensor or a
plain mask_mod). ``score_mod`` callables are not fused: the engine says so and ``auto`` keeps them on tiled.

The engine is a :class:`~qkv.engines.kernel.KernelEngine`: ``plan`` (static facts only), ``fwd`` and ``bwd``
on tensors; autograd (every tensor the backward reads saved with ``save_for_backward``) and the torch.compile
custom ops are the shared ones of :mod:`qkv.engines.kernel`. Calls with few query rows per kv head against a
longer cache (decoding) run the split-KV kernel when no gradient is needed; everything else runs the forward
kernel, which keeps its row statistics (2, B, Hq, Nq) for the dQ and dK/dV kernels of the backward. The rules
and block lists are derived again from the call in the backward (kept on a BlockMask, so free there).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ...core.call import Call
from ...core.finite import finite_result, refuse_nonfinite
from ...core.masks import BlockMask, and_masks, block_mask
from ..kernel import KernelEngine
from . import configs, launch
from .load import interpreting
from .plan import Plan

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


# ------------------------------------------------------------------------------------------------ plan

def _mod_parts(m, kinds: list) -> bool:
    """Append to ``kinds`` the index rules mask ``m`` is made of; False when some part needs bitmaps (the same
    decomposition as :func:`_decompose`, from the masks' specs alone: no tensor is read)."""
    spec = getattr(m, "spec", None)
    if spec is None:
        return False
    if spec[0] == "and":
        return all([_mod_parts(child, kinds) for child in spec[1]])
    if spec[0] == "document":
        if "document" in kinds:
            return False
        kinds.append("document")
        return True
    if spec[0] == "padding":
        kinds.append("padding" if spec[2] is None else "q_lens")
        return True
    kinds.append(spec[0])
    return spec[0] in ("causal", "window")


def _index_only(call: Call) -> bool:
    """Whether the call's visibility is key ranges and per-batch key lengths only (what the split-KV decoding
    kernel computes): no documents, query lengths or bitmaps."""
    mask = call.mask
    if mask is None:
        return True
    if isinstance(mask, torch.Tensor):
        return False
    if isinstance(mask, BlockMask):
        mask = mask.mask_mod
    else:
        mask = call.rules[-1][1]
    kinds: list = []
    return mask is not None and _mod_parts(mask, kinds) and set(kinds) <= {"causal", "window", "padding"}


@dataclass(frozen=True)
class _Plan:
    """What the engine runs for a call, from its static facts: the list-tile size, the split-KV decoding kernel
    or the fused forward, and whether the forward keeps its row statistics (2, B, Hq, Nq) for a backward."""
    tile: tuple
    decode: bool
    stats: bool


# ------------------------------------------------------------------------------------------------ engine

class TritonEngine(KernelEngine):
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

    def plan(self, call: Call, training: bool) -> _Plan:
        decode = not training and self.decodes(call, training=False)
        return _Plan(launch.tile_size(call.q), decode, training and not decode)

    def aux_meta(self, call: Call, plan: _Plan) -> list:
        return [((2, call.B, call.Hq, call.Nq), torch.float32)] if plan.stats else []

    def fwd(self, call: Call, plan: _Plan):
        checking = not torch.compiler.is_compiling()
        if checking and plan.stats:
            _refuse_nonfinite(call, "its backward")
        r, lists = _prepared(call, plan.tile)
        alibi = _alibi(call)
        if plan.decode:
            out, lse = launch.decode(call.q, call.k, call.v, scale=call.scale, lo_off=r.lo_off, hi_off=r.hi_off,
                                     softcap=call.softcap, alibi=alibi, kv_lens=r.kv_lens, offset=call.offset)
            stats = None
        else:
            out, lse, stats = launch.forward(call.q, call.k, call.v, bias=call.bias, return_stats=True,
                                             plan=lists, alibi=alibi, **_launch_args(call, r))
            if checking and not plan.stats and not finite_result(out, lse):
                _refuse_nonfinite(call, "its result")
        return out, lse, ([stats] if plan.stats else [])

    def bwd(self, call: Call, plan: _Plan, out, lse, aux, dout, dlse, needs):
        r, lists = _prepared(call, plan.tile)
        need_dbias = call.bias is not None and bool(needs[3])
        dq, dk, dv, dbias = launch.backward(call.q, call.k, call.v, out, None, dout, dlse, bias=call.bias,
                                            need_dbias=need_dbias, stats=aux[0], plan=lists, alibi=_alibi(call),
                                            **_launch_args(call, r))
        return dq, dk, dv, dbias, []

    @staticmethod
    def decodes(call: Call, training: bool | None = None) -> bool:
        """Whether ``call`` runs on the split-KV decoding kernel: inference, at most DECODE_MAX_ROWS rows per kv
        head (G·Nq), at least DECODE_MIN_KEYS_PER_ROW keys per row, no bias or dropout, and a visibility of key
        ranges and key lengths only. ``training`` defaults to ``call.training``."""
        if (call.training if training is None else training) or call.bias is not None or call.dropout_p > 0:
            return False
        if call.G * call.Nq > configs.DECODE_MAX_ROWS or call.Nk < DECODE_MIN_KEYS_PER_ROW * call.Nq:
            return False
        return _index_only(call)


def _alibi(call: Call) -> torch.Tensor | None:
    return None if call.alibi is None else call.alibi.to(torch.float32).contiguous()


def _launch_args(call: Call, r: _Rules) -> dict:
    """The launchers' keyword arguments of a call and its rules (the plan and alibi aside)."""
    return dict(scale=call.scale, lo_off=r.lo_off, hi_off=r.hi_off, softcap=call.softcap, dropout_p=call.dropout_p,
                seed=call.seed, q_ids=r.q_ids, k_ids=r.k_ids, kv_lens=r.kv_lens, q_lens=r.q_lens,
                offset=call.offset, q_base=call.q_base, k_base=call.k_base)


def _refuse_nonfinite(call: Call, what: str) -> None:
    """Raise NonFiniteInputs when the inputs hold NaN/inf: the backward kernels multiply zero probabilities
    with values, keys and queries (0·NaN), and so do the forward kernel's p·v, so a hidden NaN could reach
    {what}. ``auto`` then runs tiled. The split-KV decoding kernel needs no check: a split that ends with a NaN is
    computed again through a product in which zero probabilities contribute nothing, so only the NaN its rows
    see stays, and a decoding step costs no device-to-host wait."""
    refuse_nonfinite("triton", f"which its kernels may let reach rows that cannot see them ({what}: 0·NaN)",
                     call.q, call.k, call.v, call.bias)


ENGINE = TritonEngine().register_kernel()
