"""Launchers of the Triton kernels, with explicit arguments (no Call): what the engine and the tests call.

Shapes: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), any strides; out (B, Hq, Nq, Dv) in q's dtype,
lse (B, Hq, Nq) fp32 (natural log). Visibility arguments (all ANDed):

* ``lo_off, hi_off``: key j visible to row i iff ``lo_off <= j - i <= hi_off`` (None = unbounded). Causal
  (bottom-right) is ``hi_off = Nk - Nq``; ``window=(l, r)`` is ``lo_off = Nk - Nq - l, hi_off = Nk - Nq + r``.
* ``kv_lens, q_lens``: int (B,) — keys ``j < kv_lens[b]``; rows ``i >= q_lens[b]`` see nothing.
* ``q_ids, k_ids``: int32 (Bd, Nq) / (Bd, Nk), Bd ∈ {1, B}: same document (-1 on a row: sees nothing).
* ``masks``: a BlockMask's :class:`~qkv.masks.TileMasks` at ``tile`` (any other mask, bit-packed partial tiles).

Score mods: ``softcap`` (float), ``alibi`` (B|1, Hq) fp32 slopes, ``bias`` (4-D, broadcastable to
(B, Hq, Nq, Nk)). Dropout: ``dropout_p`` with the 31-bit ``seed`` of qkv's counter-based keep-mask.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math

import torch

from . import configs, load
from .load import interpreting, module
from .plan import build as build_plan

__all__ = ["forward", "backward", "decode", "make_plan", "needs_lists", "tile_size", "device_problem", "recording",
           "LOG2E"]

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
_MAX_SPLITS = 128
_PROGRAMS_PER_SM = 8


# (arch, calls) while recording launches for a compile target (see recording), else None
_TARGET: contextvars.ContextVar = contextvars.ContextVar("qkv_triton_target", default=None)


def recording(arch: int):
    """Inside this block the launchers do not run kernels: they record each launch they would make on a GPU of
    ``arch`` (80, 90, ...) — yields the list of ``(kernel name, JITFunction, args, kwargs)`` — so that the
    launches can be compiled for that target without a GPU (``qkv kernels``). Tensors may be CPU tensors."""
    return load.recording(_TARGET, arch)


def device_problem(t: torch.Tensor) -> str | None:
    """Why the kernels cannot run on ``t``'s device, or None."""
    if t.device.type == "cuda" or interpreting() or _TARGET.get() is not None:
        return None
    return (f"Triton kernels run on CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 to run them on CPU "
            f"tensors in Triton's interpreter (slow: for tests)")


def _arch(t: torch.Tensor) -> int | None:
    """Config table of the tensor's device; None = the interpreter."""
    if _TARGET.get() is not None:
        return _TARGET.get()[0]
    if interpreting():
        return None
    return _device_arch(t.device.index if t.device.index is not None else torch.cuda.current_device())


@functools.cache
def _device_arch(index: int) -> int:
    return configs.arch_of(torch.cuda.get_device_capability(index))


def tile_size(t: torch.Tensor) -> tuple[int, int]:
    """The tile of the block lists and partial bitmaps for tensors on ``t``'s device."""
    return configs.INTERPRET_TILE if _arch(t) is None else configs.TILE


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (x - 1).bit_length()))


def _k(t: torch.Tensor):
    if _TARGET.get() is not None:
        return load.Recorder(_TARGET.get()[1], lambda: module(interpret=False))
    problem = device_problem(t)
    if problem:
        raise ValueError(problem)
    return module(interpret=interpreting())


def _quick_interpreter(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _fast_interpreter():
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def _fast_interpreter():
    """Under the interpreter, skip its integer-overflow checks while our kernels run (they double its cost;
    the dropout hash overflows uint32 on purpose)."""
    if not interpreting() or _TARGET.get() is not None:
        yield
        return
    try:
        from triton.runtime import interpreter as _interp
        builder = _interp.interpreter_builder
        saved = builder.options
        builder.options = dataclasses.replace(saved, sanitize_overflow=False)
    except (ImportError, AttributeError, TypeError):
        yield
        return
    try:
        yield
    finally:
        builder.options = saved


def _prec(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _strides4(t: torch.Tensor | None):
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def _alibi_args(alibi, like):
    if alibi is None:
        return like, 0, 0
    a = alibi.to(torch.float32)
    return a, (a.stride(0) if a.shape[0] > 1 else 0), a.stride(1)


def _doc_args(q_ids, k_ids, like):
    if q_ids is None:
        return like, like, 0, 0
    return q_ids, k_ids, (q_ids.stride(0) if q_ids.shape[0] > 1 else 0), (k_ids.stride(0) if k_ids.shape[0] > 1 else 0)


def _lists_args(plan, lists, tile, like):
    if plan is None:
        z = torch.zeros(1, dtype=torch.int32, device=like.device)
        return (z, z, z, z, z, z, z, 0, 0, 0), (tile[0], tile[1])
    bits = plan.bits if plan.bits is not None and plan.bits.numel() else torch.zeros(1, dtype=torch.int32,
                                                                                    device=like.device)
    b, h, cols = lists.strides()
    return (lists.full_num, lists.full_idx, lists.part_num, lists.part_idx, lists.part_slot, None, bits, b, h,
            cols), plan.tile


def needs_lists(q_ids=None, masks=None) -> bool:
    return q_ids is not None or masks is not None


def make_plan(q, k, *, lo_off=None, hi_off=None, q_ids=None, k_ids=None, kv_lens=None, q_lens=None, masks=None,
              tile=None):
    """The block lists of a call (None when the index bounds alone drive the kernels: no lists needed)."""
    if not needs_lists(q_ids, masks):
        return None
    B, Hq, Nq, _ = q.shape
    return build_plan(B, Hq, Nq, k.shape[2], tile or tile_size(q), q.device, lo_off=lo_off, hi_off=hi_off,
                       q_ids=q_ids, k_ids=k_ids, kv_lens=kv_lens, q_lens=q_lens, masks=masks)


def _sizes(q, k, v):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bd, bdv = _pow2(D), _pow2(Dv)
    return B, Hq, Hkv, Nq, Nk, D, Dv, bd, bdv


@_quick_interpreter
def forward(q, k, v, *, scale, lo_off=None, hi_off=None, softcap=None, alibi=None, bias=None, dropout_p=0.0,
            seed=0, q_ids=None, k_ids=None, kv_lens=None, q_lens=None, masks=None, plan=None, offset=None, q_base=0,
            k_base=0, config=None, return_stats=False):
    """The fused forward: (out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) fp32), and with ``return_stats`` also
    the row statistics the kernel wrote, (2, B, Hq, Nq) fp32: the base-2 row max and log2 of the row sum (what
    :func:`backward` reads: p recomputed from them is as exact as the forward's)."""
    K = _k(q)
    B, Hq, Hkv, Nq, Nk, D, Dv, bd, bdv = _sizes(q, k, v)
    if plan is None and needs_lists(q_ids, masks):
        plan = make_plan(q, k, lo_off=lo_off, hi_off=hi_off, q_ids=q_ids, k_ids=k_ids, kv_lens=kv_lens,
                         q_lens=q_lens, masks=masks)
    cls = configs.feature_class(lists=plan is not None, bias=bias is not None, dropout=dropout_p > 0,
                                softcap=softcap is not None, alibi=alibi is not None)
    cfg = config or configs.config("fwd", bd, q.element_size(), _arch(q), cls)
    out = torch.empty(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
    stats = torch.empty(2, B, Hq, Nq, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    num_m = -(-Nq // cfg.block_m)
    lst, tile = _lists_args(plan, plan.fwd if plan else None, tile_size(q), q)
    if plan is not None:
        lst = lst[:5] + (plan.fwd.order(tile[0], cfg.block_m, num_m),) + lst[6:]
    else:
        lst = lst[:5] + (lst[0],) + lst[6:]
    ab = _alibi_args(alibi, q)
    di = _doc_args(q_ids, k_ids, q)
    z = lst[0]
    K._fwd_kernel[(num_m, B * Hq)](
        q, k, v, out, lse, stats, B * Hq * Nq, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        bias if bias is not None else q, *_strides4(bias), *ab, *di,
        kv_lens if kv_lens is not None else z, q_lens if q_lens is not None else z, *lst,
        Hq, Hq // Hkv, Nq, Nk, D, Dv, Nk - Nq if offset is None else offset, num_m, float(scale),
        float(softcap or 1.0), int(lo_off or 0), int(hi_off or 0), float(dropout_p), int(seed), q_base, k_base,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, BLOCK_DV=bdv, TILE_M=tile[0], TILE_N=tile[1],
        W=-(-tile[1] // 32), HAS_LO=lo_off is not None, HAS_HI=hi_off is not None, SOFTCAP=softcap is not None,
        ALIBI=alibi is not None, BIAS=bias is not None, DOC=q_ids is not None, KVLEN=kv_lens is not None,
        QLEN=q_lens is not None, LISTS=plan is not None, BITS=plan is not None and plan.bits is not None,
        DROPOUT=dropout_p > 0, REVERSE=hi_off is not None and lo_off is None, DOT_PREC=_prec(q),
        EVEN_D=D == bd, EVEN_DV=Dv == bdv, STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_opts(q))
    return (out, lse, stats) if return_stats else (out, lse)


def _opts(t):
    return {"enable_fp_fusion": True} if _arch(t) is not None else {}


@_quick_interpreter
def backward(q, k, v, out, lse, dout, dlse=None, *, scale, lo_off=None, hi_off=None, softcap=None, alibi=None,
             bias=None, need_dbias=False, dropout_p=0.0, seed=0, q_ids=None, k_ids=None, kv_lens=None, q_lens=None,
             masks=None, plan=None, offset=None, q_base=0, k_base=0, config_dq=None, config_dkdv=None, stats=None):
    """Gradients (dq, dk, dv, dbias) of the forward above given dout (B, Hq, Nq, Dv) and optionally dlse (B, Hq, Nq).
    dbias (bias's shape, bias's dtype) only with ``need_dbias``. Rows with lse = -inf get zero gradients.
    ``stats``: the forward's row statistics (``return_stats``), read instead of ``lse`` (which may then be None);
    from ``lse`` alone p is recomputed with one rounding of lse more (fine for 16-bit inputs)."""
    K = _k(q)
    B, Hq, Hkv, Nq, Nk, D, Dv, bd, bdv = _sizes(q, k, v)
    G = Hq // Hkv
    if plan is None and needs_lists(q_ids, masks):
        plan = make_plan(q, k, lo_off=lo_off, hi_off=hi_off, q_ids=q_ids, k_ids=k_ids, kv_lens=kv_lens,
                         q_lens=q_lens, masks=masks)
    delta = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    dl = None if dlse is None else dlse.to(torch.float32).contiguous()
    bm_delta = 64 if bdv <= 64 else 32 if bdv <= 128 else 16
    K._bwd_delta_kernel[(-(-Nq // bm_delta), B * Hq)](
        out, dout, dl if dl is not None else delta, delta, *out.stride(), *dout.stride(), Hq, Nq, Dv,
        BLOCK_M=bm_delta, BLOCK_DV=bdv, DL=dl is not None, num_warps=8 if bdv > 128 else 4, **_opts(q))
    if stats is None:
        stats = torch.stack([lse.to(torch.float32) * LOG2E, torch.zeros_like(lse, dtype=torch.float32)])
    stats = stats.contiguous()
    dq = torch.empty(B, Hq, Nq, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, Hkv, Nk, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, Hkv, Nk, Dv, dtype=v.dtype, device=q.device)
    arch = _arch(q)
    ab = _alibi_args(alibi, q)
    di = _doc_args(q_ids, k_ids, q)
    z = torch.zeros(1, dtype=torch.int32, device=q.device)
    kvl = kv_lens if kv_lens is not None else z
    flags = dict(HAS_LO=lo_off is not None, HAS_HI=hi_off is not None, SOFTCAP=softcap is not None,
                 ALIBI=alibi is not None, BIAS=bias is not None, DOC=q_ids is not None, KVLEN=kv_lens is not None,
                 LISTS=plan is not None, BITS=plan is not None and plan.bits is not None, DROPOUT=dropout_p > 0,
                 DOT_PREC=_prec(q), EVEN_D=D == bd, EVEN_DV=Dv == bdv, BLOCK_D=bd, BLOCK_DV=bdv)
    off = Nk - Nq if offset is None else offset
    scal = (float(scale), float(softcap or 1.0), int(lo_off or 0), int(hi_off or 0), float(dropout_p), int(seed),
            q_base, k_base)
    bias_arg = bias if bias is not None else q

    # dQ (and dBias): one program per query block, like the forward
    dbias32 = None
    db_flags = dict(DBIAS=False, DB_SUM_M=False, DB_SUM_N=False, DB_ATOMIC=False)
    if need_dbias and bias is not None:
        dbias32 = torch.zeros(bias.shape, dtype=torch.float32, device=q.device)
        Bb, Hb, Mb, Nb = bias.shape
        db_flags = dict(DBIAS=True, DB_SUM_M=Mb == 1, DB_SUM_N=Nb == 1,
                        DB_ATOMIC=(Bb == 1 and B > 1) or (Hb == 1 and Hq > 1))
    cls = configs.feature_class(lists=plan is not None, bias=bias is not None, dropout=dropout_p > 0,
                                softcap=softcap is not None, alibi=alibi is not None)
    cfg = config_dq or configs.config("bwd_dq", bd, q.element_size(), arch, cls)
    num_m = -(-Nq // cfg.block_m)
    lst, tile = _lists_args(plan, plan.fwd if plan else None, tile_size(q), q)
    order = plan.fwd.order(tile[0], cfg.block_m, num_m) if plan is not None else lst[0]
    lst = lst[:5] + (order,) + lst[6:]
    K._bwd_dq_kernel[(num_m, B * Hq)](
        q, k, v, dout, dq, stats, B * Hq * Nq, delta, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
        *dq.stride(),
        bias_arg, *_strides4(bias), dbias32 if dbias32 is not None else q, *_strides4(dbias32), *ab, *di, kvl, *lst,
        Hq, G, Nq, Nk, D, Dv, off, num_m, *scal,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TILE_M=tile[0], TILE_N=tile[1], W=-(-tile[1] // 32),
        REVERSE=hi_off is not None and lo_off is None, STAGES=cfg.num_stages, **flags, **db_flags,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_opts(q))

    # dK, dV: one program per kv block and kv head, looping over the group's query heads
    cfg = config_dkdv or configs.config("bwd_dkdv", bd, q.element_size(), arch, cls)
    num_n = -(-Nk // cfg.block_n)
    lst, tile = _lists_args(plan, plan.bwd if plan else None, tile_size(q), q)
    order = plan.bwd.order(tile[1], cfg.block_n, num_n) if plan is not None else lst[0]
    lst = lst[:5] + (order,) + lst[6:]
    K._bwd_dkdv_kernel[(num_n, B * Hkv)](
        q, k, v, dout, dk, dv, stats, B * Hq * Nq, delta, *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
        *dk.stride(),
        *dv.stride(), bias_arg, *_strides4(bias), *ab, *di, kvl, *lst,
        Hq, Hkv, G, Nq, Nk, D, Dv, off, num_n, *scal,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TILE_M=tile[0], TILE_N=tile[1], W=-(-tile[1] // 32),
        STAGES=cfg.num_stages, **flags, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_opts(q))
    dbias = None if dbias32 is None else dbias32.to(bias.dtype)
    return dq, dk, dv, dbias


@_quick_interpreter
def decode(q, k, v, *, scale, lo_off=None, hi_off=None, softcap=None, alibi=None, kv_lens=None, offset=None,
           num_splits=None, config=None):
    """Split-KV (flash-decoding) forward for few query rows per kv head (G·Nq <= DECODE_MAX_ROWS): the keys are
    split across programs, each reading its split of one kv head once for all G query heads; the splits are merged
    by their LSE. Returns (out, lse) like :func:`forward` (no bias, dropout, documents or bitmaps here)."""
    K = _k(q)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    bd, bdv = _pow2(D), _pow2(Dv)
    if G * Nq > configs.DECODE_MAX_ROWS:
        raise ValueError(f"decode takes at most {configs.DECODE_MAX_ROWS} rows per kv head (G·Nq), got {G * Nq}")
    arch = _arch(q)
    cfg = config or configs.decode_config(bd, G * Nq, q.element_size(), arch)
    if num_splits is None:
        sms = 4 if arch is None else torch.cuda.get_device_properties(q.device).multi_processor_count
        # about eight programs per SM: on an H200 (B=8, 8 kv heads, 32k keys) 8–32 per SM ran within 3% of the
        # best of 36 launches, two per SM 12% slower (benchmarks/NOTES.md)
        want = -(-_PROGRAMS_PER_SM * sms // max(1, B * Hkv))
        num_splits = max(1, min(want, -(-Nk // (4 * cfg.block_n)), _MAX_SPLITS))
    per_split = -(-Nk // num_splits)                   # ceil divisions, rounded up to whole kv blocks
    split_len = -(-per_split // cfg.block_n) * cfg.block_n
    num_splits = max(1, -(-Nk // split_len))
    op = torch.empty(B, Hq, Nq, num_splits, Dv, dtype=torch.float32, device=q.device)
    lp = torch.empty(B, Hq, Nq, num_splits, dtype=torch.float32, device=q.device)
    ab = _alibi_args(alibi, q)
    z = torch.zeros(1, dtype=torch.int32, device=q.device)
    K._decode_kernel[(num_splits, B * Hkv)](
        q, k, v, op, lp, *q.stride(), *k.stride(), *v.stride(), *ab, kv_lens if kv_lens is not None else z,
        Hq, Hkv, G, Nq, Nk, D, Dv, Nk - Nq if offset is None else offset, split_len, num_splits, float(scale),
        float(softcap or 1.0),
        int(lo_off or 0), int(hi_off or 0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, BLOCK_DV=bdv, HAS_LO=lo_off is not None,
        HAS_HI=hi_off is not None, SOFTCAP=softcap is not None, ALIBI=alibi is not None, KVLEN=kv_lens is not None,
        DOT_PREC=_prec(q), EVEN_D=D == bd, EVEN_DV=Dv == bdv, STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_opts(q))
    out = torch.empty(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    K._merge_kernel[(B * Hq * Nq,)](op, lp, out, lse, *out.stride()[:4], Hq, Nq, Dv, num_splits,
                                    BLOCK_S=_pow2(num_splits, 2), BLOCK_DV=bdv, num_warps=4, **_opts(q))
    return out, lse
