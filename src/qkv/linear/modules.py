"""Layers built on the linear-attention family, in the constructor style of ``qkv.SelfAttention``, each with a
decode path that carries a fixed-size state instead of a KV cache.

Shapes: ``x`` ``(B, N, d_model)``; ``B`` batch, ``N`` new tokens.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import compute_dtype
from .chunked import delta_rule, linear_attention
from .recurrent import delta_rule_step, linear_attention_step

__all__ = ["LinearSelfAttention", "GatedDeltaNet"]


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _pos_int(name: str, x) -> int:
    if not _is_int(x) or x <= 0:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return int(x)


def _head_dim(d_model: int, n_heads: int, head_dim) -> int:
    if head_dim is None:
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pass head_dim")
        return d_model // n_heads
    return _pos_int("head_dim", head_dim)


def _check_x(x, d_model: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor (B, N, d_model={d_model}), got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x must have shape (B, N, d_model={d_model}), got {tuple(x.shape)}")


def _softplus_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Per-token log-decays of Mamba-2 / Gated DeltaNet: −exp(A_log)·softplus(a + dt_bias) ≤ 0, in fp32 (fp64 for
    fp64 a). a: (B, N, H) -> (B, H, N)."""
    cd = compute_dtype(a.dtype)
    return (-A_log.to(cd).exp() * F.softplus(a.to(cd) + dt_bias.to(cd))).transpose(1, 2)


def _init_decay_params(n: int):
    # A in [1, 16] and dt in [1e-3, 0.1] log-uniform (the Mamba-2 / Gated DeltaNet initialisation)
    A_log = nn.Parameter(torch.log(torch.empty(n).uniform_(1.0, 16.0)))
    dt = torch.exp(torch.rand(n) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
    dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))        # softplus⁻¹(dt)
    return A_log, dt_bias


class LinearSelfAttention(nn.Module):
    """Multi-head linear self-attention: ``X -> Q, K, V -> heads -> φ(Q)·(φ(K)ᵀ·V) -> W_O`` (O(N), fixed-size state).

    ``LinearSelfAttention(d_model, n_heads, *, head_dim=None, causal=True, bias=True, feature_map="elu1", decay=None,
    normalize=None, scale=None, chunk_size=64, eps=1e-6)``

    - ``head_dim``: per-head size (default ``d_model // n_heads``).
    - ``causal``: decoder form (a token reads the tokens before it), the only one with a state to carry.
    - ``bias``: bias in ``q_proj``, ``k_proj``, ``v_proj`` (``d_model -> n_heads·head_dim``) and ``o_proj``.
    - ``feature_map``, ``normalize``, ``scale``, ``chunk_size``, ``eps``: as :func:`qkv.linear.linear_attention`.
    - ``decay``: ``None``; a number in (0, 1] for every head; a sequence/tensor ``(n_heads,)`` of factors;
      ``"retention"`` (RetNet's fixed ``γ_h = 1 − 2^(−5−h)``); or ``"gated"``: per-token log-decays computed from x
      as in Mamba-2, ``−exp(A_log_h)·softplus(x·W_a + dt_bias)_h`` (parameters ``a_proj``, ``A_log``, ``dt_bias``).
      Factors are buffers (not trained).

    ``forward(x, *, state=None, return_state=False)``

    - ``x``: ``(B, N, d_model)``.
    - ``state``: ``(B, n_heads, F, head_dim)`` (``head_dim + 1`` columns with ``normalize``) from a previous call's
      ``return_state``; the N tokens continue that stream. One token with a state takes the one-step path.
    - Returns ``out`` ``(B, N, d_model)``, or ``(out, state)`` with ``return_state`` (causal only).
    """

    def __init__(self, d_model: int, n_heads: int, *, head_dim: int | None = None, causal: bool = True,
                 bias: bool = True, feature_map="elu1", decay=None, normalize: bool | None = None,
                 scale: float | None = None, chunk_size: int = 64, eps: float = 1e-6):
        super().__init__()
        self.d_model, self.n_heads = _pos_int("d_model", d_model), _pos_int("n_heads", n_heads)
        self.head_dim = _head_dim(self.d_model, self.n_heads, head_dim)
        self.causal = bool(causal)
        self.feature_map, self.normalize, self.eps = feature_map, normalize, eps
        self.scale = None if scale is None else float(scale)
        self.chunk_size = _pos_int("chunk_size", chunk_size)
        H, Dh = self.n_heads, self.head_dim
        self.decay_kind = None
        self.a_proj = None
        if decay is not None and not self.causal:
            raise ValueError("decay needs causal=True (a decay orders the tokens)")
        if isinstance(decay, str):
            if decay == "retention":
                self.register_buffer("decay", 1.0 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32)))
            elif decay == "gated":
                self.a_proj = nn.Linear(self.d_model, H, bias=False)
                self.A_log, self.dt_bias = _init_decay_params(H)
                self.decay = None
            else:
                raise ValueError(f"decay must be None, a number, (n_heads,) factors, 'retention' or 'gated', "
                                 f"got {decay!r}")
            self.decay_kind = decay
        elif decay is None:
            self.decay = None
        else:
            if isinstance(decay, Real) and not isinstance(decay, bool):
                d = torch.full((H,), float(decay))
            else:
                try:
                    d = torch.as_tensor(decay, dtype=torch.float32).flatten()
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(f"decay must be None, a number, (n_heads,) factors, 'retention' or 'gated', "
                                    f"got {type(decay).__name__}") from None
            if d.shape != (H,) or not bool(((d > 0) & (d <= 1)).all()):
                raise ValueError(f"decay factors must be {H} numbers in (0, 1], got {decay!r}")
            self.register_buffer("decay", d)
            self.decay_kind = "factors"
        # checks feature_map / normalize / scale / eps once, on a token
        z = torch.zeros(1, 1, 1, Dh)
        linear_attention(z, z, z, feature_map=feature_map, normalize=normalize, scale=scale, eps=eps,
                         decay=None if self.decay_kind is None else 1.0)
        self.q_proj = nn.Linear(self.d_model, H * Dh, bias=bias)
        self.k_proj = nn.Linear(self.d_model, H * Dh, bias=bias)
        self.v_proj = nn.Linear(self.d_model, H * Dh, bias=bias)
        self.o_proj = nn.Linear(H * Dh, self.d_model, bias=bias)

    def extra_repr(self) -> str:
        s = f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, causal={self.causal}"
        s += f", feature_map={self.feature_map!r}"
        if self.decay_kind is not None:
            s += f", decay={self.decay_kind!r}"
        return s

    def forward(self, x: torch.Tensor, *, state: torch.Tensor | None = None, return_state: bool = False):
        _check_x(x, self.d_model)
        if (state is not None or return_state) and not self.causal:
            raise ValueError("state and return_state need causal=True: the non-causal form has no stream to carry")
        B, N, _ = x.shape
        H, Dh = self.n_heads, self.head_dim

        def heads(t):
            return t.view(B, N, H, Dh).transpose(1, 2)                             # (B, H, N, Dh)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if self.decay_kind == "gated":
            decay = _softplus_decay(self.a_proj(x), self.A_log, self.dt_bias)      # (B, H, N)
        else:
            decay = self.decay
        kw = dict(feature_map=self.feature_map, decay=decay, normalize=self.normalize, scale=self.scale,
                  eps=self.eps)
        if state is not None and N == 1:
            o, new_state = linear_attention_step(q, k, v, state, **kw)
        else:
            o, new_state = linear_attention(q, k, v, causal=self.causal, chunk_size=self.chunk_size,
                                            initial_state=state, return_state=True, **kw)
        out = self.o_proj(o.transpose(1, 2).reshape(B, N, H * Dh))
        return (out, new_state) if return_state else out


class _GatedRMSNorm(nn.Module):
    """RMSNorm over the last dim, then times SiLU(gate) (norm before gate; Qwen3-Next / FLA's FusedRMSNormGated);
    computed in fp32 (fp64 for fp64 inputs)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype, cd = x.dtype, compute_dtype(x.dtype)
        h = x.to(cd)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h.to(dtype) * F.silu(gate.to(cd))).to(dtype)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet layer (Yang, Kautz & Hatamizadeh, 2024; the linear-attention layers of Qwen3-Next).

    ``x -> q, k, v`` (projections, a short causal depthwise convolution and SiLU) ``-> l2-normalised q, k ->`` the
    gated delta rule with ``beta = sigmoid(x·W_b)`` and ``g = −exp(A_log)·softplus(x·W_a + dt_bias)`` ``->``
    ``RMSNorm(o)·SiLU(x·W_z)`` per value head ``-> W_O``.

    ``GatedDeltaNet(d_model, n_heads, *, n_v_heads=None, head_dim=None, v_head_dim=None, conv_size=4, bias=False,
    chunk_size=64, norm_eps=1e-6)``

    - ``n_heads``: query/key heads; ``n_v_heads`` (default ``n_heads``) value heads, a multiple of ``n_heads``
      (value head h reads query/key head ``h // (n_v_heads // n_heads)``, as Qwen3-Next).
    - ``head_dim`` (default ``d_model // n_heads``), ``v_head_dim`` (default ``head_dim``).
    - ``conv_size``: kernel of the causal depthwise convolution over the concatenated ``[q | k | v]`` channels
      (``conv1d``, no bias); 1 disables its memory.
    - ``bias``: bias in the projections ``q_proj, k_proj, v_proj, z_proj, b_proj, a_proj, o_proj``.

    ``forward(x, *, state=None, return_state=False)``

    - ``x``: ``(B, N, d_model)``.
    - ``state``: ``(conv_state, recurrent_state)`` from a previous call's ``return_state``: ``conv_state``
      ``(B, conv_dim, conv_size − 1)`` (the last inputs of the convolution, in x's dtype), ``recurrent_state``
      ``(B, n_v_heads, head_dim, v_head_dim)`` (fp32; fp64 for fp64 x). One token with a state takes the one-step
      path (decoding); several continue the stream (chunked prefill).
    - Returns ``out`` ``(B, N, d_model)``, or ``(out, state)`` with ``return_state``.
    """

    def __init__(self, d_model: int, n_heads: int, *, n_v_heads: int | None = None, head_dim: int | None = None,
                 v_head_dim: int | None = None, conv_size: int = 4, bias: bool = False, chunk_size: int = 64,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.d_model, self.n_heads = _pos_int("d_model", d_model), _pos_int("n_heads", n_heads)
        self.n_v_heads = self.n_heads if n_v_heads is None else _pos_int("n_v_heads", n_v_heads)
        if self.n_v_heads % self.n_heads:
            raise ValueError(f"n_v_heads={self.n_v_heads} must be a multiple of n_heads={self.n_heads}")
        self.head_dim = _head_dim(self.d_model, self.n_heads, head_dim)
        self.v_head_dim = self.head_dim if v_head_dim is None else _pos_int("v_head_dim", v_head_dim)
        self.conv_size = _pos_int("conv_size", conv_size)
        self.chunk_size = _pos_int("chunk_size", chunk_size)
        if not isinstance(norm_eps, Real) or isinstance(norm_eps, bool) or not norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive number, got {norm_eps!r}")
        Hk, Hv, D, Dv = self.n_heads, self.n_v_heads, self.head_dim, self.v_head_dim
        self.key_dim, self.value_dim = Hk * D, Hv * Dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.q_proj = nn.Linear(self.d_model, self.key_dim, bias=bias)
        self.k_proj = nn.Linear(self.d_model, self.key_dim, bias=bias)
        self.v_proj = nn.Linear(self.d_model, self.value_dim, bias=bias)
        self.z_proj = nn.Linear(self.d_model, self.value_dim, bias=bias)
        self.b_proj = nn.Linear(self.d_model, Hv, bias=bias)
        self.a_proj = nn.Linear(self.d_model, Hv, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_size, groups=self.conv_dim, bias=False)
        self.A_log, self.dt_bias = _init_decay_params(Hv)
        self.norm = _GatedRMSNorm(Dv, float(norm_eps))
        self.o_proj = nn.Linear(self.value_dim, self.d_model, bias=bias)

    def extra_repr(self) -> str:
        s = f"d_model={self.d_model}, n_heads={self.n_heads}"
        if self.n_v_heads != self.n_heads:
            s += f", n_v_heads={self.n_v_heads}"
        return s + f", head_dim={self.head_dim}, v_head_dim={self.v_head_dim}, conv_size={self.conv_size}"

    def _check_state(self, state, x):
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            raise TypeError(f"state must be a (conv_state, recurrent_state) pair from return_state, got "
                            f"{type(state).__name__}")
        conv, rec = state
        B = x.shape[0]
        want = (B, self.conv_dim, self.conv_size - 1)
        if not isinstance(conv, torch.Tensor) or tuple(conv.shape) != want:
            raise ValueError(f"conv_state must have shape {want}, got "
                             f"{tuple(conv.shape) if isinstance(conv, torch.Tensor) else type(conv).__name__}")
        if conv.device != x.device:
            raise ValueError(f"conv_state is on {conv.device} but x is on {x.device}")
        return conv.to(x.dtype), rec                                   # rec is checked by the delta rule

    def forward(self, x: torch.Tensor, *, state=None, return_state: bool = False):
        _check_x(x, self.d_model)
        B, N, _ = x.shape
        Hk, Hv, D, Dv, K = self.n_heads, self.n_v_heads, self.head_dim, self.v_head_dim, self.conv_size
        conv_state, rec = self._check_state(state, x) if state is not None else (None, None)

        mixed = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1).transpose(1, 2)  # (B, C, N)
        if conv_state is None:
            conv_state = mixed.new_zeros(B, self.conv_dim, K - 1)
        full = torch.cat([conv_state, mixed], dim=-1)                                   # (B, C, K - 1 + N)
        mixed = F.silu(F.conv1d(full, self.conv1d.weight, groups=self.conv_dim))        # (B, C, N)
        new_conv = full[..., full.shape[-1] - (K - 1):]
        q, k, v = torch.split(mixed.transpose(1, 2), [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(B, N, Hk, D).transpose(1, 2)
        k = k.reshape(B, N, Hk, D).transpose(1, 2)
        v = v.reshape(B, N, Hv, Dv).transpose(1, 2)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)                           # (B, Hv, N)
        g = _softplus_decay(self.a_proj(x), self.A_log, self.dt_bias)                  # (B, Hv, N) fp32
        if rec is not None and N == 1:
            o, new_rec = delta_rule_step(q, k, v, beta, rec, g=g, qk_l2norm=True)
        else:
            o, new_rec = delta_rule(q, k, v, beta, g=g, qk_l2norm=True, chunk_size=self.chunk_size,
                                    initial_state=rec, return_state=True)
        o = self.norm(o.transpose(1, 2), self.z_proj(x).view(B, N, Hv, Dv))            # (B, N, Hv, Dv)
        out = self.o_proj(o.reshape(B, N, Hv * Dv))
        return (out, (new_conv, new_rec)) if return_state else out
