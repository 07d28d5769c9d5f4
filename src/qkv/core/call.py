"""One attention call, validated and normalised: the semantics every engine shares.

``prepare`` checks every argument before any work (ValueError/TypeError naming the argument and what it saw)
and returns a :class:`Call`. Engines ask the Call, one tile at a time, for what the semantics define:
``visible`` (the AND of all visibility rules), ``scores`` (softcap → ALiBi → bias → score_mod),
``scores_backward`` (the chain rule back through them), ``keep`` (the dropout mask) and ``block_state``
(which tiles can be skipped) — and, for choosing an engine, typed facts (``range_only``, ``plain_causal``,
``every_key_visible``, ``density``). Writing these once is what keeps the engines in agreement.

Positions. Query row i sits at position ``i + offset`` on the key axis (``offset = Nk − Nq`` by default: the
queries are the last Nq positions, FlashAttention's bottom-right rule). Causal and windows are key ranges
relative to that position. A call may also be one block of a larger one (ring attention): ``prepare``'s
private ``_positions=(q_base, k_base, Nq_total, Nk_total)`` places rows and keys at ``q_base + i`` and
``k_base + j`` of a call of Nq_total × Nk_total, so mask_mods, score_mods, dropout and ALiBi see the global
indices and the global bottom-right offset.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import hash as _hash
from .capture import Lifted, lift
from .masks import BlockMask, MaskMod, check_window, mask_result, mod_state, tensor_state
from .masks import causal as _causal
from .masks import sliding_window as _sliding_window

__all__ = ["Call", "prepare", "FLOATS", "score_result"]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t):
    return tuple(t.shape)


def _broadcastable(shape, target) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def as4(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t`` with leading singleton dims up to 4-D."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def tile(t4: torch.Tensor, q0, q1, k0, k1) -> torch.Tensor:
    """Rows q0:q1 and columns k0:k1 of a (.., .., Nq|1, Nk|1)-broadcastable tensor."""
    return t4[..., (slice(q0, q1) if t4.shape[-2] != 1 else slice(None)),
              (slice(k0, k1) if t4.shape[-1] != 1 else slice(None))]


@dataclass
class Call:
    """A validated call. q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv).

    ``rules`` holds the visibility rules other than nothing: ``("mod", f)`` (a mask_mod; causal and windows are
    bound MaskMods), ``("tensor", t4)`` (a bool mask, 4-D view) or ``("block", bm)`` (a BlockMask).
    ``mask`` is what remains of the user's ``mask=`` after normalisation (None when the visibility is given by
    ``causal``/``window`` alone).
    """
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    causal: bool = False
    window: tuple | None = None
    mask: object = None                  # None | bool tensor (4-D view) | mask_mod | BlockMask
    bias: torch.Tensor | None = None     # 4-D view broadcastable to (B, Hq, Nq, Nk)
    score_mod: Callable | None = None
    alibi: torch.Tensor | None = None    # (B|1, Hq) in the accumulation dtype
    softcap: float | None = None
    dropout_p: float = 0.0
    seed: int = 0
    return_lse: bool = False
    rules: list = field(default_factory=list)
    offset: int = 0                      # query row i sits at key position i + offset
    q_base: int = 0                      # index origin of rows and keys seen by mods and dropout
    k_base: int = 0
    lse_dtype: torch.dtype = torch.float32   # dtype of the lse engines return (ring attention asks for the
                                             # acc dtype: fp64 blocks then merge exactly)
    _idx: dict = field(default_factory=dict)
    _lifted: Lifted | None = None
    _caps: tuple | None = None           # the captures the score_mod was rebuilt on (with_inputs)

    # ---- the call's tensors, for engines that save them for a backward of their own
    @property
    def mask_tensor(self) -> torch.Tensor | None:
        """The bool mask tensor rule (a 4-D view), if any."""
        return next((r for kind, r in self.rules if kind == "tensor"), None)

    @property
    def captures(self) -> tuple:
        """Tensors the score_mod reads from its closure, defaults or globals (see :mod:`qkv.core.capture`)."""
        if self.score_mod is None:
            return ()
        return self._caps if self._caps is not None else self.lifted.tensors

    @property
    def lifted(self) -> Lifted | None:
        if self._lifted is None and self.score_mod is not None:
            self._lifted = lift(self.score_mod)
        return self._lifted

    def inputs(self) -> tuple:
        """(q, k, v, bias, alibi, mask tensor, *captures): every tensor the call reads (None where absent)."""
        return (self.q, self.k, self.v, self.bias, self.alibi, self.mask_tensor, *self.captures)

    def with_inputs(self, q, k, v, bias, alibi, mask_tensor, captures) -> Call:
        """The same call reading other tensors (same shapes): the score_mod rebuilt on ``captures``."""
        rules = [("tensor", mask_tensor) if kind == "tensor" else (kind, r) for kind, r in self.rules]
        # a tensor rule is the call's mask (the stripped call of a backward has neither until rebuilt here)
        mask = mask_tensor if mask_tensor is not None or isinstance(self.mask, torch.Tensor) else self.mask
        score_mod = self.lifted.bind(captures) if self.score_mod is not None else None
        new = Call(q, k, v, self.scale, self.causal, self.window, mask, bias, score_mod, alibi, self.softcap,
                   self.dropout_p, self.seed, self.return_lse, rules, self.offset, self.q_base, self.k_base)
        new.lse_dtype = self.lse_dtype
        if self.score_mod is not None:
            new._lifted, new._caps = self._lifted, tuple(captures)
        return new

    # ---- sizes
    @property
    def B(self): return self.q.shape[0]
    @property
    def Hq(self): return self.q.shape[1]
    @property
    def Hkv(self): return self.k.shape[1]
    @property
    def G(self): return self.q.shape[1] // self.k.shape[1]
    @property
    def Nq(self): return self.q.shape[2]
    @property
    def Nk(self): return self.k.shape[2]
    @property
    def D(self): return self.q.shape[3]
    @property
    def Dv(self): return self.v.shape[3]
    @property
    def device(self) -> torch.device: return self.q.device
    @property
    def acc_dtype(self):
        """Accumulation dtype: fp64 for fp64 inputs, else fp32."""
        return torch.float64 if self.q.dtype == torch.float64 else torch.float32

    # ---- typed facts (what engines and auto's policy decide on)
    @property
    def has_mask(self) -> bool:
        """Whether any visibility rule applies (causal, window or mask)."""
        return bool(self.rules)

    @property
    def has_mods(self) -> bool:
        """Whether any score modification applies (softcap, ALiBi, bias, score_mod)."""
        return self.softcap is not None or self.alibi is not None or self.bias is not None or self.score_mod is not None

    @property
    def range_only(self) -> bool:
        """Whether every row's visible keys are one contiguous range given by ``causal``/``window`` alone."""
        return self.mask is None

    def key_range(self) -> tuple[int, int]:
        """(left, right) of a range-only call: key j visible to row i iff
        ``i + offset − left <= j <= i + offset + right`` (unbounded sides reach past every key)."""
        far = self.Nq + self.Nk + abs(self.offset)
        left, right = self.window if self.window is not None else (None, None)
        left, right = far if left is None else left, far if right is None else right
        return left, (min(right, 0) if self.causal else right)

    @property
    def plain_causal(self) -> bool:
        """Causal with Nq == Nk at offset 0 and no other rule: SDPA's ``is_causal``."""
        return (self.causal and self.window is None and self.mask is None and self.Nq == self.Nk
                and self.offset == 0)

    @property
    def every_key_visible(self) -> bool:
        """Whether every row sees every key (no rule, or causal/window ranges that cover all keys — a one-row
        decoding step under causal)."""
        if not self.rules:
            return True
        if self.mask is not None:
            return False
        left, right = self.key_range()
        # row i sees [i + offset - left, i + offset + right]: the last row must reach key 0, the first Nk - 1
        return (self.Nq - 1) + self.offset - left <= 0 and self.offset + right >= self.Nk - 1

    @property
    def training(self) -> bool:
        """Whether a backward through q, k or v may follow (grad mode on and one of them requires grad)."""
        return torch.is_grad_enabled() and (self.q.requires_grad or self.k.requires_grad or self.v.requires_grad)

    @property
    def block_mask(self) -> BlockMask | None:
        return next((r for kind, r in self.rules if kind == "block"), None)

    def density(self, bq: int = 128, bk: int = 128) -> float | None:
        """Fraction of bq×bk score tiles that the visibility rules leave to visit (a BlockMask's own density,
        precomputed when it was built). None when it cannot be known without reading a tensor mask while being
        traced by torch.compile."""
        if not self.rules:
            return 1.0
        bm = self.block_mask
        if bm is not None and len(self.rules) == 1:
            return bm.density
        if any(kind == "tensor" for kind, _ in self.rules) and _compiling():
            return None
        st = self.block_state(*(bm.block_size if bm is not None else (bq, bk)))
        return float((st > 0).float().mean()) if st.numel() else 0.0

    # ---- index tensors for a tile, broadcast to (B, Hq, bq, bk)
    def indices(self, q0, q1, k0, k1):
        dev = self.q.device
        if "bh" not in self._idx:
            self._idx["bh"] = (torch.arange(self.B, device=dev).view(-1, 1, 1, 1),
                               torch.arange(self.Hq, device=dev).view(1, -1, 1, 1))
        b, h = self._idx["bh"]
        qb, kb = self.q_base, self.k_base
        return (b, h, torch.arange(qb + q0, qb + q1, device=dev).view(1, 1, -1, 1),
                torch.arange(kb + k0, kb + k1, device=dev).view(1, 1, 1, -1))

    # ---- visibility
    def visible(self, q0, q1, k0, k1) -> torch.Tensor | None:
        """Bool tile broadcastable to (B, Hq, q1-q0, k1-k0): the AND of every rule; None = no rule."""
        out = None
        for kind, r in self.rules:
            if kind == "block":            # a BlockMask carries its per-element rule: a tensor or a mask_mod
                kind, r = ("tensor", as4(r.tensor)) if r.tensor is not None else ("mod", r.mask_mod)
            if kind == "tensor":
                m = tile(r, q0, q1, k0, k1)
            else:
                m = r(*self.indices(q0, q1, k0, k1))
                if not getattr(r, "_trusted", False):
                    m = mask_result(m, (self.B, self.Hq, q1 - q0, k1 - k0))
                m = torch.as_tensor(m, device=self.q.device)
            out = m if out is None else out & m
        return out

    def block_state(self, bq: int, bk: int) -> torch.Tensor | None:
        """(Bm, Hm, nqb, nkb) int8 tile states (0 skip, 1 partial, 2 full) for bq×bk tiles; None = no rule."""
        st = None
        B, H, Nq, Nk, dev = self.B, self.Hq, self.Nq, self.Nk, self.q.device
        shifted = self.q_base or self.k_base
        for kind, r in self.rules:
            if kind == "tensor":
                s = tensor_state(r, Nq, Nk, bq, bk)
            elif kind == "block":
                if r.block_size != (bq, bk):
                    raise ValueError(f"BlockMask block_size {r.block_size} differs from the engine's {(bq, bk)}")
                s = r.state.to(dev)
            elif shifted:                  # a block of a larger call: evaluate at the global indices
                s = mod_state(_Shifted(r, self.q_base, self.k_base), B, H, Nq, Nk, bq, bk, dev)
            else:
                s = mod_state(r, B, H, Nq, Nk, bq, bk, dev)
            st = s if st is None else torch.minimum(st, s)   # AND of states: EMPTY < PARTIAL < FULL
        return st

    # ---- scores
    def scores(self, s: torch.Tensor, q0, q1, k0, k1) -> torch.Tensor:
        """Apply softcap → ALiBi → bias → score_mod to scaled scores s: (B, Hq, bq, bk) in the acc dtype."""
        s = self._fixed_mods(s, q0, q1, k0, k1)
        if self.score_mod is not None:
            s = score_result(self.score_mod(s, *self.indices(q0, q1, k0, k1)), s)
        return s

    def _fixed_mods(self, s, q0, q1, k0, k1):
        """softcap → ALiBi → bias: the mods before the user's score_mod."""
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        if self.alibi is not None:
            dist = (torch.arange(q0, q1, device=s.device).view(-1, 1) + self.offset
                    - torch.arange(k0, k1, device=s.device).view(1, -1)).abs().to(s.dtype)
            s = s - self.alibi.to(s.dtype)[:, :, None, None] * dist
        if self.bias is not None:
            b = tile(self.bias, q0, q1, k0, k1).to(s.dtype)
            s = s + b
            if self._bias_hides():        # a -inf bias hides its key whatever the score (a NaN one too)
                s = s.masked_fill(b == float("-inf"), float("-inf"))
        return s

    def _bias_hides(self) -> bool:
        """Whether the bias holds -inf entries (known once per call; assumed while being traced)."""
        if torch.compiler.is_compiling():
            return True
        hides = self._idx.get("bias_hides")
        if hides is None:
            hides = self._idx["bias_hides"] = bool((self.bias == float("-inf")).any())
        return hides

    def scores_backward(self, s_raw, ds, q0, q1, k0, k1, dbias, dcaps=None, zero=None):
        """Given dL/d(final scores) ``ds`` of a tile, return dL/d(raw scaled scores), accumulate the bias
        gradient into ``dbias`` (a tensor shaped like ``self.bias``) when given, and the gradients of the
        score_mod's captured tensors that require grad into ``dcaps`` (a list of accumulators, in the order of
        ``self.captures`` restricted to those that require grad) when given. ``zero``: a bool tile where the
        gradient is 0 by structure (zero probabilities), kept 0 through the mods' derivatives (which may be
        NaN there)."""
        if self.score_mod is not None:
            caps = [c for c in self.captures if c.requires_grad] if dcaps is not None else []
            with torch.enable_grad():
                pre = self._fixed_mods(s_raw, q0, q1, k0, k1).detach().requires_grad_(True)
                post = score_result(self.score_mod(pre, *self.indices(q0, q1, k0, k1)), pre)
                if post.requires_grad:
                    grads = torch.autograd.grad(post, [pre, *caps], ds.expand_as(post), allow_unused=True)
                else:                      # the mod ignores s and every capture: nothing flows back
                    grads = [None] * (1 + len(caps))
            for acc, g in zip(dcaps or (), grads[1:]):
                if g is not None:
                    acc += g
            ds = grads[0] if grads[0] is not None else torch.zeros_like(s_raw)
            if zero is not None:
                ds = ds.masked_fill_(zero, 0.0)
        if dbias is not None:
            _accumulate(dbias, ds, q0, q1, k0, k1)
        if self.softcap is not None:
            t = torch.tanh(s_raw / self.softcap)
            ds = ds * (1 - t * t)
            if zero is not None:
                ds = ds.masked_fill_(zero, 0.0)
        return ds

    # ---- dropout: a counter-based keep-mask, identical on every engine for the same seed
    def keep(self, q0, q1, k0, k1) -> torch.Tensor:
        return _hash.uniform(self.seed, *self.indices(q0, q1, k0, k1)) >= self.dropout_p


def score_result(out, s: torch.Tensor) -> torch.Tensor:
    """What a score_mod returned for scores ``s``, checked and cast to ``s``'s dtype and shape (a wider result,
    e.g. from a captured fp64 table, is cast back, as FlexAttention does)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"score_mod must return a floating tensor (the modified scores), got "
                        f"{'None' if out is None else type(out).__name__}")
    if not out.dtype.is_floating_point:
        raise TypeError(f"score_mod must return floating scores, got a {out.dtype} tensor")
    if out.shape != s.shape:
        if out.dim() > s.dim() or any(a not in (1, b) for a, b in zip(reversed(out.shape), reversed(s.shape))):
            raise ValueError(f"score_mod returned shape {tuple(out.shape)} for scores of shape {tuple(s.shape)}: "
                             f"it must be elementwise (index captured tensors with b, h, q_idx, kv_idx)")
        out = out.expand(s.shape).contiguous()
    return out if out.dtype == s.dtype else out.to(s.dtype)


class _Shifted:
    """A mask_mod evaluated at indices shifted by (q_base, k_base) (a block of a larger call)."""

    def __init__(self, mod, qb: int, kb: int):
        self.mod, self.qb, self.kb = mod, qb, kb

    def __call__(self, b, h, q, kv):
        return self.mod(b, h, q + self.qb, kv + self.kb)

    def block_classes(self, qs, qe, ks, ke):
        f = getattr(self.mod, "block_classes", None)
        return None if f is None else f(qs + self.qb, qe + self.qb, ks + self.kb, ke + self.kb)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _accumulate(dbias: torch.Tensor, ds: torch.Tensor, q0, q1, k0, k1):
    """Add ds (B, Hq, bq, bk) into the bias-shaped accumulator tile, summing broadcast dims."""
    t = tile(dbias, q0, q1, k0, k1)
    dims = [i for i in range(4) if t.shape[i] == 1 and ds.shape[i] != 1]
    t += (ds.sum(dims, keepdim=True) if dims else ds).to(t.dtype)


# ------------------------------------------------------------------------------------------ validation

def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {_shape(t)}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def _number(name, x, *, positive=False):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    if not math.isfinite(x) or (positive and x <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {x!r}")
    return float(x)


def _meet(a, b):
    """Intersection of two windows (left, right), None = unbounded; either may be None (no window)."""
    if a is None or b is None:
        return b if a is None else a
    return tuple(y if x is None else x if y is None else min(x, y) for x, y in zip(a, b))


def _probe_index(device):
    i = torch.zeros(1, 1, 1, 1, dtype=torch.int64, device=device)
    return i, i, i, i


def _probe_mask_mod(mod, device):
    """Evaluate a user's mask_mod at one index (0, 0, 0, 0) so that a wrong result type or shape is reported
    before any work (the full evaluation checks it again, tile by tile)."""
    mask_result(mod(*_probe_index(device)), (1, 1, 1, 1))


def _probe_score_mod(mod, device, dtype):
    """Evaluate a score_mod on one zero score at index (0, 0, 0, 0): a wrong result is reported before any work."""
    s = torch.zeros(1, 1, 1, 1, dtype=dtype, device=device)
    with torch.no_grad():
        score_result(mod(s, *_probe_index(device)), s)


def prepare(q, k, v, *, causal=False, window=None, mask=None, bias=None, score_mod=None, alibi_slopes=None,
            softcap=None, scale=None, dropout_p=0.0, generator=None, return_lse=False, _positions=None,
            _seed=None) -> Call:
    """Validate every argument (before any work) and return the normalised :class:`Call`.

    ``_positions=(q_base, k_base, Nq_total, Nk_total)`` (internal: ring attention) makes this call the block of
    rows ``q_base:q_base+Nq`` and keys ``k_base:k_base+Nk`` of a call of Nq_total × Nk_total: visibility, mods
    and dropout are those of the whole call, ``bias``/``mask`` tensors are this block's.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same heads and length, got k {_shape(k)}, v {_shape(v)}")
    if k.shape[3] != D:
        raise ValueError(f"q and k must have the same head dim D, got q {_shape(q)}, k {_shape(k)}")
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads must be a multiple of kv heads (GQA), got Hq={Hq}, Hkv={Hkv}")
    full = (B, Hq, Nq, Nk)

    q_base, k_base, Nq_all, Nk_all = 0, 0, Nq, Nk
    if _positions is not None:
        q_base, k_base, Nq_all, Nk_all = (int(x) for x in _positions)
        if not (0 <= q_base and q_base + Nq <= Nq_all and 0 <= k_base and k_base + Nk <= Nk_all):
            raise ValueError(f"_positions {_positions} do not hold a block of (Nq, Nk) = {(Nq, Nk)}")
    offset = (Nk_all - Nq_all) + q_base - k_base

    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    else:
        scale = _number("scale", scale)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"window must be a pair (left, right), got {window!r}")
        try:
            check_window(*window)
        except ValueError as e:
            raise ValueError(f"window={tuple(window)!r}: {e}") from None
        window = tuple(window)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a floating tensor, got "
                            f"{bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        if not _broadcastable(bias.shape, full):
            raise ValueError(f"bias of shape {_shape(bias)} does not broadcast to (B, Hq, Nq, Nk) = {full}")
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device}, q on {q.device}")
        bias = as4(bias)
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be callable, got {type(score_mod).__name__}")
    alibi = None
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.dtype.is_floating_point:
            raise TypeError(f"alibi_slopes must be a floating tensor, got {type(alibi_slopes).__name__}")
        if _shape(alibi_slopes) not in ((Hq,), (B, Hq), (1, Hq)):
            raise ValueError(f"alibi_slopes must be (Hq,) = ({Hq},) or (B, Hq) = ({B}, {Hq}), got "
                             f"{_shape(alibi_slopes)}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}")
        alibi = alibi_slopes.to(dtype=torch.float64 if q.dtype == torch.float64 else torch.float32).reshape(-1, Hq)
    if softcap is not None:
        softcap = _number("softcap", softcap, positive=True)
    dropout_p = _number("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")

    if isinstance(mask, MaskMod) and mask.window is not None:
        # mask=masks.sliding_window(l, r) is window=(l, r): the same call, so the same engine paths
        window, mask = _meet(window, mask.window), None
    if window == (None, None):
        window = None

    rules = []
    if causal:
        rules.append(("mod", _causal().bind(Nq_all, Nk_all)))
    if window is not None:
        rules.append(("mod", _sliding_window(*window).bind(Nq_all, Nk_all)))
    if mask is not None:
        if isinstance(mask, BlockMask):
            if _positions is not None:
                raise ValueError("a BlockMask describes a whole call; pass its mask_mod for a block of one")
            if mask.shape[2:] != (Nq, Nk) or not _broadcastable(mask.shape[:2], (B, Hq)):
                raise ValueError(f"BlockMask was built for (B, H, Nq, Nk) = {mask.shape}, the call has {full}")
            rules.append(("block", mask))
        elif isinstance(mask, torch.Tensor):
            if mask.dtype != torch.bool:
                raise TypeError(f"mask tensor must be bool (True = may attend; use bias= for additive "
                                f"floats), got {mask.dtype}")
            if not _broadcastable(mask.shape, full):
                raise ValueError(f"mask of shape {_shape(mask)} does not broadcast to (B, Hq, Nq, Nk) = {full}")
            if mask.device != q.device:
                raise ValueError(f"mask is on {mask.device}, q on {q.device}")
            mask = as4(mask)
            rules.append(("tensor", mask))
        elif callable(mask):
            mod = mask.bind(Nq_all, Nk_all) if isinstance(mask, MaskMod) else mask
            if isinstance(mod, MaskMod):
                mod.check(B, Hq)
            rules.append(("mod", mod))
        else:
            raise TypeError(f"mask must be a bool tensor, a mask_mod callable or a BlockMask, got "
                            f"{type(mask).__name__}")
    # Last, once every other argument is known good: the user's mods at one index, so that a result of the
    # wrong type or shape is reported before any work.
    for kind, r in rules:
        if kind == "mod" and not getattr(r, "_trusted", False):
            _probe_mask_mod(r, q.device)
    if score_mod is not None:
        _probe_score_mod(score_mod, q.device, torch.float64 if q.dtype == torch.float64 else torch.float32)
    seed = 0
    if _seed is not None:
        seed = int(_seed)
    elif dropout_p > 0:
        # One draw from the generator (or the global RNG) fixes the whole keep-mask.
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator,
                                 device=generator.device if generator is not None else "cpu"))
    return Call(q, k, v, scale, causal, window, mask, bias, score_mod, alibi, softcap, dropout_p, seed,
                return_lse, rules, offset, q_base, k_base)
