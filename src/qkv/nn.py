"""The layer: ``X -> Q = X·W_Q, K = X·W_K, V = X·W_V -> softmax(Q·Kᵀ/√d)·V per head -> W_O``.

``SelfAttention`` is a drop-in multi-head (and grouped-query / multi-query) self-attention module built on
``qkv.attention``; ``RotaryEmbedding`` adds rotary position embeddings (Llama's ``rotate_half`` convention by
default); ``KVCache`` preallocates keys and values for autoregressive decoding. Decoding relies on qkv's
bottom-right aligned causal rule: a chunk of ``Nq`` new queries sits at the *end* of the ``Nk`` cached keys, so
query ``i`` sees key ``j`` iff ``j <= i + Nk - Nq`` — one token at a time, a chunked prefill and a full causal call
all give the same outputs.

Shapes: ``B`` batch, ``N`` new tokens, ``Hq`` query heads, ``Hkv`` key/value heads, ``D`` head dim.
"""
from __future__ import annotations

from numbers import Integral, Real

import torch
from torch import nn

from .api import attention, attention_weights
from .distributed import LAYOUTS, ring_attention, sequence_positions

__all__ = ["SelfAttention", "RotaryEmbedding", "KVCache"]


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------------------------
# Rotary embeddings
# --------------------------------------------------------------------------------------------------------------
class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer / Llama).

    ``RotaryEmbedding(head_dim, base=10000.0, *, rotary_dim=None, interleaved=False, scaling=1.0)``

    The first ``rotary_dim`` (default: all ``head_dim``) features of each head are rotated by the angle
    ``pos / scaling · base^(-2i/rotary_dim)``; the rest pass through (partial rotary, as in GPT-NeoX / Phi).
    ``interleaved=False`` pairs feature ``i`` with ``i + rotary_dim/2`` (Llama / GPT-NeoX ``rotate_half``, the
    Hugging Face convention); ``interleaved=True`` pairs ``2i`` with ``2i+1`` (the RoFormer / GPT-J / Meta original).
    ``scaling`` > 1 is linear position interpolation. Angles are computed in fp32 (fp64 for fp64 inputs) and the
    result has the input's dtype.

    ``forward(x, *, offset=0, positions=None)``: ``x`` ``(B, H, N, head_dim)``; positions are
    ``offset + arange(N)`` unless ``positions`` ``(N,)`` or ``(B, N)`` (integers) is given. Returns the rotated
    tensor, same shape and dtype. ``offset`` is the number of tokens already in a KV cache.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, *, rotary_dim: int | None = None,
                 interleaved: bool = False, scaling: float = 1.0):
        super().__init__()
        if not _is_int(head_dim) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if rotary_dim is None:
            rotary_dim = head_dim
        if not _is_int(rotary_dim) or rotary_dim <= 0 or rotary_dim > head_dim or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be an even int in [2, head_dim={head_dim}], got {rotary_dim!r}")
        if not isinstance(base, Real) or isinstance(base, bool) or not base > 0:
            raise ValueError(f"base must be a positive number, got {base!r}")
        if not isinstance(scaling, Real) or isinstance(scaling, bool) or not scaling > 0:
            raise ValueError(f"scaling must be a positive number, got {scaling!r}")
        self.head_dim = int(head_dim)
        self.rotary_dim = int(rotary_dim)
        self.base = float(base)
        self.interleaved = bool(interleaved)
        self.scaling = float(scaling)
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (rotary_dim/2,) fp64

    def extra_repr(self) -> str:
        s = f"head_dim={self.head_dim}, base={self.base:g}"
        if self.rotary_dim != self.head_dim:
            s += f", rotary_dim={self.rotary_dim}"
        if self.interleaved:
            s += ", interleaved=True"
        if self.scaling != 1.0:
            s += f", scaling={self.scaling:g}"
        return s

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32):
        """``positions`` ``(..., N)`` -> ``(cos, sin)``, each ``(..., N, rotary_dim)`` in ``dtype``, laid out for
        this module's pairing convention (``[f, f]`` for rotate_half, ``[f0, f0, f1, f1, ...]`` interleaved)."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        inv = self.inv_freq.to(device=positions.device, dtype=acc)
        freqs = (positions.to(acc) / self.scaling)[..., None] * inv  # (..., N, rotary_dim/2)
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _positions(self, x: torch.Tensor, offset, positions) -> torch.Tensor:
        B, N = x.shape[0], x.shape[-2]
        if positions is None:
            if isinstance(offset, torch.Tensor):
                if offset.ndim > 1 or offset.dtype.is_floating_point or offset.dtype == torch.bool:
                    raise ValueError(f"offset must be an int or an integer tensor (B,), got {offset.dtype} "
                                     f"{tuple(offset.shape)}")
                ar = torch.arange(N, device=x.device)
                return offset.to(x.device)[..., None] + ar if offset.ndim == 1 else offset.to(x.device) + ar
            if not _is_int(offset) or offset < 0:
                raise ValueError(f"offset must be a non-negative int, got {offset!r}")
            return torch.arange(int(offset), int(offset) + N, device=x.device)
        if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point \
                or positions.dtype == torch.bool:
            raise TypeError(f"positions must be an integer tensor (N,) or (B, N), got "
                            f"{type(positions).__name__}"
                            f"{'' if not isinstance(positions, torch.Tensor) else ' ' + str(positions.dtype)}")
        if positions.shape[-1] != N or positions.ndim not in (1, 2) or \
                (positions.ndim == 2 and positions.shape[0] not in (1, B)):
            raise ValueError(f"positions must have shape ({N},) or ({B}, {N}) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(positions.shape)}")
        return positions.to(x.device)

    def forward(self, x: torch.Tensor, *, offset=0, positions: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating tensor (B, H, N, {self.head_dim}), got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if x.ndim != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must have shape (B, H, N, {self.head_dim}), got {tuple(x.shape)}")
        pos = self._positions(x, offset, positions)  # (N,) or (B, N)
        cos, sin = self.cos_sin(pos, x.dtype)
        if cos.ndim == 3:  # (B, N, r) -> (B, 1, N, r)
            cos, sin = cos[:, None], sin[:, None]
        r = self.rotary_dim
        xr, xp = (x, None) if r == self.head_dim else (x[..., :r], x[..., r:])
        if self.interleaved:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            rot = torch.stack((-x2, x1), dim=-1).flatten(-2)
        else:
            x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
            rot = torch.cat((-x2, x1), dim=-1)
        out = xr * cos + rot * sin
        return out if xp is None else torch.cat((out, xp), dim=-1)


# --------------------------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------------------------
class KVCache:
    """Preallocated key/value cache for one attention layer.

    ``KVCache(batch, n_kv_heads, max_len, head_dim, dtype=torch.float32, device=None, *, v_head_dim=None)``
    holds ``k`` ``(batch, n_kv_heads, max_len, head_dim)`` and ``v`` ``(batch, n_kv_heads, max_len, v_head_dim)``
    (``v_head_dim`` defaults to ``head_dim``). With GQA the cache stores the ``n_kv_heads`` heads only.

    ``append(k, v)`` copies ``k`` ``(batch, n_kv_heads, n, head_dim)`` / ``v`` ``(..., n, v_head_dim)`` at
    position ``length`` and returns views of everything cached so far, ``(batch, n_kv_heads, length, ·)``.
    ``length`` is the number of cached positions; ``keys`` / ``values`` are those views; ``reset()`` empties the cache
    (keeps the memory); ``truncate(n)`` drops everything after the first ``n`` positions (speculative decoding).
    Overflowing ``max_len`` raises ``ValueError``. Use one cache per layer.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 device=None, *, v_head_dim: int | None = None):
        for name, val in (("batch", batch), ("n_kv_heads", n_kv_heads), ("max_len", max_len), ("head_dim", head_dim)):
            if not _is_int(val) or val < (0 if name in ("batch", "max_len") else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name in ('batch', 'max_len') else 'positive'} "
                                 f"int, got {val!r}")
        if v_head_dim is None:
            v_head_dim = head_dim
        if not _is_int(v_head_dim) or v_head_dim < 1:
            raise ValueError(f"v_head_dim must be a positive int, got {v_head_dim!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.batch, self.n_kv_heads, self.max_len = int(batch), int(n_kv_heads), int(max_len)
        self.head_dim, self.v_head_dim = int(head_dim), int(v_head_dim)
        self.k = torch.zeros(self.batch, self.n_kv_heads, self.max_len, self.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(self.batch, self.n_kv_heads, self.max_len, self.v_head_dim, dtype=dtype, device=device)
        self.length = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def keys(self) -> torch.Tensor:
        """Cached keys ``(batch, n_kv_heads, length, head_dim)`` (a view)."""
        return self.k[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        """Cached values ``(batch, n_kv_heads, length, v_head_dim)`` (a view)."""
        return self.v[:, :, : self.length]

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (f"KVCache(batch={self.batch}, n_kv_heads={self.n_kv_heads}, length={self.length}/{self.max_len}, "
                f"head_dim={self.head_dim}, dtype={self.dtype}, device={self.device})")

    def reset(self) -> KVCache:
        self.length = 0
        return self

    def truncate(self, length: int) -> KVCache:
        if not _is_int(length) or not 0 <= length <= self.length:
            raise ValueError(f"length must be an int in [0, {self.length}], got {length!r}")
        self.length = int(length)
        return self

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Append ``k`` ``(batch, n_kv_heads, n, head_dim)`` and ``v`` ``(batch, n_kv_heads, n, v_head_dim)``;
        returns ``(keys, values)``, the cached ``(batch, n_kv_heads, length, ·)`` views after the append."""
        keys, values = self._stage(k, v)
        self.length += k.shape[2]
        return keys, values

    def _stage(self, k: torch.Tensor, v: torch.Tensor):
        """Write ``k``, ``v`` after the cached positions without committing them: returns the views of the cached
        and new positions; ``length`` (what the cache holds) changes only when the caller adds ``n`` to it, so a
        call that fails after staging leaves the cache as it was."""
        for name, t, d in (("k", k, self.head_dim), ("v", v, self.v_head_dim)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.ndim != 4 or t.shape[0] != self.batch or t.shape[1] != self.n_kv_heads or t.shape[3] != d:
                raise ValueError(f"{name} must have shape ({self.batch}, {self.n_kv_heads}, n, {d}) for this cache, "
                                 f"got {tuple(t.shape)}")
            if t.device != self.k.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {self.k.device}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"k and v must have the same length, got k {tuple(k.shape)} and v {tuple(v.shape)}")
        n = k.shape[2]
        if self.length + n > self.max_len:
            raise ValueError(f"KVCache overflow: {self.length} cached + {n} new > max_len={self.max_len}")
        self.k[:, :, self.length: self.length + n] = k
        self.v[:, :, self.length: self.length + n] = v
        return self.k[:, :, : self.length + n], self.v[:, :, : self.length + n]


# --------------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention: ``X -> Q, K, V -> heads -> softmax(Q·Kᵀ·scale)·V -> W_O``.

    ``SelfAttention(d_model, n_heads, *, n_kv_heads=None, head_dim=None, causal=False, bias=True, rope=None,
    window=None, dropout=0.0, qk_norm=False, scale=None)``

    - ``n_kv_heads``: key/value heads (default ``n_heads``); ``n_heads % n_kv_heads == 0`` (GQA; 1 = MQA).
      Query head ``h`` reads kv head ``h // (n_heads // n_kv_heads)``, as Hugging Face's ``repeat_kv``.
    - ``head_dim``: per-head size (default ``d_model // n_heads``, which must then divide evenly).
    - ``causal``: decoder self-attention, bottom-right aligned (right for KV-cache decoding).
    - ``bias``: bias in the four projections ``q_proj``, ``k_proj``, ``v_proj`` (``d_model -> heads·head_dim``) and
      ``o_proj`` (``n_heads·head_dim -> d_model``), named as Llama's so its weights load by name.
    - ``rope``: ``None``/``False`` (no rotary), ``True`` (``RotaryEmbedding(head_dim)``), a number (the RoPE base),
      or a ``RotaryEmbedding``. Applied to q and k (after ``qk_norm``) at absolute positions; with a ``kv_cache``
      the new tokens start at ``kv_cache.length``.
    - ``window``: sliding window. An int ``w`` means each query sees the ``w`` keys before it (and, if not causal,
      the ``w`` after it) plus itself; a pair ``(left, right)`` is passed to ``qkv.attention`` as is.
    - ``dropout``: dropout on the attention probabilities, in training mode only.
    - ``qk_norm``: RMSNorm over ``head_dim`` on each query and key head (OLMo-2 / Qwen-3 style), ``eps=1e-6``.
    - ``scale``: softmax scale (default ``1/sqrt(head_dim)``).
    - ``process_group``: a ``torch.distributed`` group for context parallelism. ``x`` is then this rank's shard of
      the sequence, ``(B, N/W, d_model)``, cut by ``qkv.distributed.shard_sequence(x, layout=sequence_layout,
      dim=1)``; attention runs as ``qkv.distributed.ring_attention`` over the group (masks, windows and RoPE in
      global positions) and the output is the same shard of the single-process output. No ``kv_cache``,
      ``need_weights`` or attention dropout in this mode.
    - ``sequence_layout``: ``"contiguous"`` or ``"zigzag"`` (balanced causal work), with ``process_group``.

    ``forward(x, *, mask=None, kv_cache=None, need_weights=False, positions=None)``

    - ``x``: ``(B, N, d_model)``.
    - ``mask``: anything ``qkv.attention`` accepts as ``mask`` — a bool tensor broadcastable to
      ``(B, n_heads, N, Nk)`` (True = may attend; ``Nk = N`` or, with a cache, the cached length after appending), a
      mask_mod or a BlockMask. ANDed with ``causal``/``window``. Rows with no visible key give 0.
    - ``kv_cache``: a ``KVCache`` for ``(B, n_kv_heads, ·, head_dim)``; the new keys/values are appended and the
      ``N`` queries attend to everything cached (bottom-right causal rule).
    - ``need_weights``: also return the attention probabilities ``(B, n_heads, N, Nk)`` from
      ``qkv.attention_weights`` (fp32, fp64 for fp64 inputs; before dropout; ``ValueError`` past its memory bound).
    - ``positions``: optional integer RoPE positions ``(N,)`` or ``(B, N)`` overriding the default.

    Returns ``out`` ``(B, N, d_model)``, or ``(out, weights)`` when ``need_weights``.
    """

    def __init__(self, d_model: int, n_heads: int, *, n_kv_heads: int | None = None, head_dim: int | None = None,
                 causal: bool = False, bias: bool = True, rope=None, window=None, dropout: float = 0.0,
                 qk_norm: bool = False, scale: float | None = None, process_group=None,
                 sequence_layout: str = "contiguous"):
        super().__init__()
        if sequence_layout not in LAYOUTS:
            raise ValueError(f"sequence_layout must be one of {LAYOUTS}, got {sequence_layout!r}")
        self.process_group, self.sequence_layout = process_group, sequence_layout
        if not _is_int(d_model) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not _is_int(n_heads) or n_heads <= 0:
            raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
        if n_kv_heads is None:
            n_kv_heads = n_heads
        if not _is_int(n_kv_heads) or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads must be a positive int dividing n_heads={n_heads}, got {n_kv_heads!r}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pass head_dim")
            head_dim = d_model // n_heads
        if not _is_int(head_dim) or head_dim <= 0:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        if not isinstance(dropout, Real) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if scale is not None and (not isinstance(scale, Real) or isinstance(scale, bool)):
            raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = int(d_model), int(n_heads), int(n_kv_heads), \
            int(head_dim)
        self.causal = bool(causal)
        self.window = self._check_window(window, self.causal)
        self.dropout = float(dropout)
        self.scale = None if scale is None else float(scale)

        if rope is None or rope is False:
            self.rope = None
        elif rope is True:
            self.rope = RotaryEmbedding(self.head_dim)
        elif isinstance(rope, RotaryEmbedding):
            if rope.head_dim != self.head_dim:
                raise ValueError(f"rope.head_dim={rope.head_dim} does not match head_dim={self.head_dim}")
            self.rope = rope
        elif isinstance(rope, Real) and not isinstance(rope, bool):
            self.rope = RotaryEmbedding(self.head_dim, base=float(rope))
        else:
            raise TypeError(f"rope must be None, a bool, a number (the base) or a RotaryEmbedding, got "
                            f"{type(rope).__name__}")

        self.q_proj = nn.Linear(self.d_model, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(self.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(self.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, self.d_model, bias=bias)
        if qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None

    @staticmethod
    def _check_window(window, causal):
        if window is None:
            return None
        if _is_int(window):
            if window < 0:
                raise ValueError(f"window must be a non-negative int or a (left, right) pair, got {window!r}")
            return (int(window), 0 if causal else int(window))
        if isinstance(window, (tuple, list)) and len(window) == 2 and all(
                w is None or (_is_int(w) and w >= 0) for w in window):
            return tuple(None if w is None else int(w) for w in window)
        raise ValueError(f"window must be None, a non-negative int or a (left, right) pair of non-negative ints or "
                         f"None, got {window!r}")

    def extra_repr(self) -> str:
        s = f"d_model={self.d_model}, n_heads={self.n_heads}"
        if self.n_kv_heads != self.n_heads:
            s += f", n_kv_heads={self.n_kv_heads}"
        s += f", head_dim={self.head_dim}"
        if self.causal:
            s += ", causal=True"
        if self.window is not None:
            s += f", window={self.window}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """A ``KVCache`` sized for this layer: ``(batch, n_kv_heads, max_len, head_dim)``, dtype/device of the
        weights unless given."""
        w = self.k_proj.weight
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, dtype or w.dtype,
                       w.device if device is None else device)

    def forward(self, x: torch.Tensor, *, mask=None, kv_cache: KVCache | None = None, need_weights: bool = False,
                positions: torch.Tensor | None = None):
        # ---- validation, before any work
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor (B, N, d_model={self.d_model}), got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, N, d_model={self.d_model}), got {tuple(x.shape)}")
        B, N, _ = x.shape
        if kv_cache is not None:
            if not isinstance(kv_cache, KVCache):
                raise TypeError(f"kv_cache must be a qkv.KVCache, got {type(kv_cache).__name__}")
            if kv_cache.batch != B or kv_cache.n_kv_heads != self.n_kv_heads or kv_cache.head_dim != self.head_dim \
                    or kv_cache.v_head_dim != self.head_dim:
                raise ValueError(
                    f"kv_cache shape (batch={kv_cache.batch}, n_kv_heads={kv_cache.n_kv_heads}, "
                    f"head_dim={kv_cache.head_dim}, v_head_dim={kv_cache.v_head_dim}) does not match x "
                    f"{tuple(x.shape)} and this layer (n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim})")
            if kv_cache.length + N > kv_cache.max_len:
                raise ValueError(f"kv_cache overflow: {kv_cache.length} cached + {N} new > max_len={kv_cache.max_len}")
            if kv_cache.device != x.device:
                raise ValueError(f"kv_cache is on {kv_cache.device} but x is on {x.device}")
        if self.process_group is not None and (kv_cache is not None or need_weights or
                                               (self.training and self.dropout > 0)):
            raise ValueError("with a process_group (ring attention), SelfAttention takes no kv_cache, "
                             "need_weights or attention dropout in training")
        if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend), a mask_mod or a BlockMask, got a "
                            f"{mask.dtype} tensor (use qkv.attention's bias= for additive float masks)")

        # ---- projections -> heads
        q = self.q_proj(x).view(B, N, self.n_heads, self.head_dim).transpose(1, 2)      # (B, Hq, N, D)
        k = self.k_proj(x).view(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, N, D)
        v = self.v_proj(x).view(B, N, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, N, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = kv_cache.length if kv_cache is not None else 0
        if self.rope is not None and self.process_group is not None and positions is None:
            positions = sequence_positions(N, layout=self.sequence_layout, group=self.process_group,
                                           device=x.device)
        if self.rope is not None:
            q = self.rope(q, offset=offset, positions=positions)
            k = self.rope(k, offset=offset, positions=positions)
        if kv_cache is not None:
            # staged, not committed: the cache grows only once the whole call has succeeded
            k, v = kv_cache._stage(k.to(kv_cache.dtype), v.to(kv_cache.dtype))     # (B, Hkv, Nk, D)
            k, v = k.to(q.dtype), v.to(q.dtype)

        # ---- attention
        kw = dict(causal=self.causal, window=self.window, mask=mask, scale=self.scale)
        if self.process_group is not None:
            out = ring_attention(q, k, v, layout=self.sequence_layout, group=self.process_group, **kw)
        else:
            out = attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, **kw)  # (B, Hq, N, D)
        out = self.o_proj(out.transpose(1, 2).reshape(B, N, self.n_heads * self.head_dim))  # (B, N, d_model)
        weights = attention_weights(q, k, **kw) if need_weights else None          # (B, Hq, N, Nk)
        if kv_cache is not None:
            kv_cache.length += N
        return (out, weights) if need_weights else out
