"""Checking and preparing the arguments of the linear-attention family, shared by the chunked engines, the
recurrent oracles and the one-token step functions, so that all of them refuse the same calls with the same
words and compute on the same prepared tensors.

Every check runs before any work. A validated call's ``features(t0, t1)`` prepares a range of tokens for the
engines, in the compute dtype (fp64 for fp64 inputs, fp32 otherwise), with the query/key heads expanded to the
value heads (the chunked functions prepare the sequence a segment at a time, so that no full-length temporary is
made; the oracles take it whole):

* linear attention: ``scale·φ(q)`` and ``φ(k)`` ``(B, H, n, F)``, ``v`` ``(B, H, n, Dv)``, log-decays ``(B, H, n)``
  or None (with ``normalize`` the engines give v a last column of ones, so that the state carries ``Σφ(k)``);
* delta rule: ``q`` (l2-normalised if asked, scaled), ``k`` ``(B, H, n, D)``, ``v``, ``beta`` and ``g``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real

import torch
import torch.nn.functional as F

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FEATURE_MAPS = ("elu1", "relu", "identity")


def _shape(t) -> tuple:
    return tuple(t.shape)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the engines compute and keep states in: fp64 for fp64 inputs, fp32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tensor(name: str, t, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor {layout}, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {_shape(t)}")
    return t


def _same_device(q: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def _check_qkv(q, k, v, *, step: bool = False):
    n = "1" if step else "N"
    _tensor("q", q, 4, f"(B, Hk, {n}, D)")
    _tensor("k", k, 4, f"(B, Hk, {n}, D)")
    _tensor("v", v, 4, f"(B, H, {n}, Dv)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _same_device(q, k=k, v=v)
    if _shape(q) != _shape(k):
        raise ValueError(f"q and k must have the same shape (B, Hk, N, D), got q {_shape(q)} and k {_shape(k)}")
    B, Hk, N, D = q.shape
    if v.shape[0] != B or v.shape[2] != N:
        raise ValueError(f"v must have shape (B={B}, H, N={N}, Dv) like q, got {_shape(v)}")
    H = v.shape[1]
    if Hk == 0 or H % Hk:
        raise ValueError(f"the value heads H={H} (v {_shape(v)}) must be a multiple of the query/key heads "
                         f"Hk={Hk} (q {_shape(q)}): value head h reads query/key head h // (H // Hk)")
    if step and N != 1:
        raise ValueError(f"a step takes one token: q, k, v must have N = 1, got q {_shape(q)}")
    return B, Hk, H, N, D, v.shape[3]


def _check_int(name: str, x, low: int) -> int:
    if not isinstance(x, Integral) or isinstance(x, bool) or x < low:
        raise ValueError(f"{name} must be an int >= {low}, got {x!r}")
    return int(x)


def _check_scale(scale) -> float | None:
    if scale is None:
        return None
    if not isinstance(scale, Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def _per_token(name: str, t, B: int, H: int, N: int, what: str) -> torch.Tensor:
    _tensor(name, t, 3, f"(B={B}, H={H}, N={N}) of {what}")
    if _shape(t) != (B, H, N):
        raise ValueError(f"{name} must have shape (B={B}, H={H}, N={N}) ({what}), got {_shape(t)}")
    return t


def _check_log_decays(name: str, g: torch.Tensor) -> None:
    # `not (g <= 0)` also catches NaN
    if g.numel() and not bool((g.detach() <= 0).all()):
        bad = g.detach()[~(g.detach() <= 0)]
        raise ValueError(f"{name} holds log-decays, which must be <= 0 (a decay factor exp({name}) in (0, 1]); "
                         f"got {bad.numel()} entries that are not, e.g. {bad.flatten()[0].item():.4g}")


def _check_state(state, B: int, H: int, F_: int, Dv: int, dtype: torch.dtype, device, extra: str = ""):
    layout = f"(B={B}, H={H}, {F_}, {Dv}){extra}"
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"initial_state must be a tensor {layout}, got {type(state).__name__}")
    if _shape(state) != (B, H, F_, Dv):
        raise ValueError(f"initial_state must have shape {layout}, got {_shape(state)}")
    if state.dtype != dtype:
        raise TypeError(f"initial_state must be {dtype} (states are kept in {dtype} for these inputs), "
                        f"got {state.dtype}")
    if state.device != device:
        raise ValueError(f"initial_state is on {state.device} but q is on {device}")
    return state


def _expand_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """(B, Hk, ...) -> (B, H, ...): value head h reads query/key head h // (H // Hk)."""
    rep = H // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


# ----------------------------------------------------------------------------------------------------------
# linear attention
# ----------------------------------------------------------------------------------------------------------
@dataclass
class LinearCall:
    """A validated linear-attention call; ``features(t0, t1)`` prepares the tokens [t0, t1) for the engines."""
    q: torch.Tensor                 # (B, Hk, N, D) as given
    k: torch.Tensor
    v: torch.Tensor                 # (B, H, N, Dv)
    g: torch.Tensor | None          # (B, H, N) log-decays in the compute dtype (possibly an expanded view), or None
    state: torch.Tensor | None      # (B, H, F, Dv[+1]) or None
    fmap: Callable
    custom_map: bool
    scale: float | None
    causal: bool
    normalize: bool
    eps: float
    chunk_size: int
    cd: torch.dtype                 # compute dtype
    out_dtype: torch.dtype

    @property
    def dv(self) -> int:
        return self.v.shape[-1]

    def features(self, t0: int, t1: int):
        """(scale·φ(q), φ(k), v, g) for tokens [t0, t1): (B, H, n, F), (B, H, n, F), (B, H, n, Dv), (B, H, n) or
        None, in the compute dtype, the query/key heads expanded to the value heads. With ``normalize`` the engines
        append the normaliser's column of ones to v themselves."""
        q, k, v = self.q[:, :, t0:t1], self.k[:, :, t0:t1], self.v[:, :, t0:t1]
        B, H, n = v.shape[:3]
        qf, kf = self.fmap(q.to(self.cd)), self.fmap(k.to(self.cd))
        if self.custom_map:
            for name, x, t in (("q", qf, q), ("k", kf, k)):
                if not isinstance(x, torch.Tensor) or x.ndim != 4 or _shape(x)[:3] != _shape(t)[:3]:
                    raise ValueError(f"feature_map({name}) must return a (B, Hk, N, F) tensor, got "
                                     f"{_shape(x) if isinstance(x, torch.Tensor) else type(x).__name__}")
            if qf.shape[-1] != kf.shape[-1]:
                raise ValueError(f"feature_map gave q and k different feature sizes: {qf.shape[-1]} and "
                                 f"{kf.shape[-1]}")
            qf, kf = qf.to(self.cd), kf.to(self.cd)
            if self.state is not None:
                _check_state(self.state, B, H, qf.shape[-1], self.dv + self.normalize, self.cd, q.device,
                             _NORM_COL if self.normalize else "")
        qf = qf * (1.0 / math.sqrt(qf.shape[-1]) if self.scale is None else self.scale)
        qf, kf = _expand_heads(qf, H), _expand_heads(kf, H)
        return qf, kf, v.to(self.cd), None if self.g is None else self.g[:, :, t0:t1]


_NORM_COL = " (the last column is the normaliser Σφ(k))"


def _feature_map(feature_map) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(feature_map):
        return feature_map
    if feature_map == "elu1":
        return lambda x: F.elu(x) + 1.0
    if feature_map == "relu":
        return F.relu
    if feature_map == "identity":
        return lambda x: x
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS} or a callable, got {feature_map!r}")


def _decay(decay, B: int, H: int, N: int, device, dtype) -> torch.Tensor | None:
    """decay -> (B, H, N) log-decays (differentiable w.r.t. a decay tensor), or None."""
    if decay is None:
        return None
    if isinstance(decay, Real) and not isinstance(decay, bool):
        if not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"decay must lie in (0, 1] (a factor per step), got {decay!r}")
        return torch.tensor(math.log(float(decay)), dtype=dtype, device=device).expand(B, H, N)
    if not isinstance(decay, torch.Tensor):
        raise TypeError(f"decay must be None, a number in (0, 1], a (H,) tensor of factors or a (B, H, N) tensor "
                        f"of log-decays, got {type(decay).__name__}")
    if decay.dtype not in _FLOATS:
        raise TypeError(f"decay must be a floating tensor, got {decay.dtype}")
    if decay.device != device:
        raise ValueError(f"decay is on {decay.device} but q is on {device}")
    if decay.ndim in (0, 1):
        if decay.ndim == 1 and decay.shape[0] != H:
            raise ValueError(f"a decay of factors must have shape (H={H},), got {_shape(decay)}")
        d = decay.detach()
        if not bool(((d > 0) & (d <= 1)).all()):
            raise ValueError(f"decay factors must lie in (0, 1], got min {d.min().item():.4g}, "
                             f"max {d.max().item():.4g}")
        return torch.log(decay.to(dtype)).reshape(1, -1, 1).expand(B, H, N) if decay.ndim == 1 else \
            torch.log(decay.to(dtype)).expand(B, H, N)
    if decay.ndim == 3:
        _per_token("decay", decay, B, H, N, "per-token log-decays <= 0")
        _check_log_decays("decay", decay)
        return decay.to(dtype)
    raise ValueError(f"decay must be a number, a (H={H},) tensor of factors in (0, 1] or a (B={B}, H={H}, N={N}) "
                     f"tensor of log-decays <= 0, got a tensor of shape {_shape(decay)}")


def prepare_linear(q, k, v, *, causal, feature_map, decay, normalize, scale, chunk_size, initial_state, eps,
                   step: bool = False) -> LinearCall:
    B, Hk, H, N, D, Dv = _check_qkv(q, k, v, step=step)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    fmap = _feature_map(feature_map)
    if normalize is not None and not isinstance(normalize, bool):
        raise TypeError(f"normalize must be None or a bool, got {type(normalize).__name__}")
    scale = _check_scale(scale)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    if not isinstance(eps, Real) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    cd = compute_dtype(q.dtype)
    g = _decay(decay, B, H, N, q.device, cd)
    if g is not None and not causal:
        raise ValueError("decay needs causal=True: a decay weighs keys by their distance back in time, which the "
                         "non-causal form (every query reads every key) does not have")
    if normalize is None:
        normalize = decay is None
    if initial_state is not None and not isinstance(initial_state, torch.Tensor):
        raise TypeError(f"initial_state must be a tensor or None, got {type(initial_state).__name__}")
    if initial_state is not None and not callable(feature_map):   # the feature size is known before any work
        _check_state(initial_state, B, H, D, Dv + normalize, cd, q.device, _NORM_COL if normalize else "")
    return LinearCall(q, k, v, g, initial_state, fmap, callable(feature_map), scale, causal, normalize, float(eps),
                      chunk_size, cd, q.dtype)


def finish_linear(call: LinearCall, o: torch.Tensor) -> torch.Tensor:
    """o: (B, H, N, Dv[+1]) in the compute dtype -> the output (B, H, N, Dv) in q's dtype."""
    if call.normalize:
        num, den = o[..., :call.dv], o[..., call.dv:]
        # the guard keeps the sign and lifts |den| to at least eps: a row whose features see ~nothing gives ~0,
        # not inf/NaN (relu features can make den exactly 0, identity features can make it negative)
        den = torch.where(den.abs() < call.eps, torch.where(den < 0, -call.eps, call.eps), den)
        o = num / den
    return o.to(call.out_dtype)


# ----------------------------------------------------------------------------------------------------------
# delta rule
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DeltaCall:
    """A validated delta-rule call; ``features(t0, t1)`` prepares the tokens [t0, t1) for the engines."""
    q: torch.Tensor                 # (B, Hk, N, D) as given
    k: torch.Tensor
    v: torch.Tensor                 # (B, H, N, Dv)
    beta: torch.Tensor              # (B, H, N)
    g: torch.Tensor | None          # (B, H, N) or None
    state: torch.Tensor | None      # (B, H, D, Dv) or None
    scale: float
    qk_l2norm: bool
    chunk_size: int
    cd: torch.dtype
    out_dtype: torch.dtype

    def features(self, t0: int, t1: int):
        """(q, k, v, beta, g) for tokens [t0, t1) in the compute dtype: q, k l2-normalised if asked, q scaled, the
        query/key heads expanded to the value heads."""
        H = self.v.shape[1]
        q, k = self.q[:, :, t0:t1].to(self.cd), self.k[:, :, t0:t1].to(self.cd)
        if self.qk_l2norm:
            q, k = l2norm(q, scale=self.scale), l2norm(k)
        else:
            q = q * self.scale
        q = _expand_heads(q, H)
        return (q, _expand_heads(k, H), self.v[:, :, t0:t1].to(self.cd), self.beta[:, :, t0:t1].to(self.cd),
                None if self.g is None else self.g[:, :, t0:t1].to(self.cd))


def l2norm(x: torch.Tensor, eps: float = 1e-6, scale: float = 1.0) -> torch.Tensor:
    """scale · x / sqrt(Σx² + eps) over the last dim (the normalisation of flash-linear-attention and
    transformers)."""
    r = torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)
    return x * (r * scale if scale != 1.0 else r)


def prepare_delta(q, k, v, beta, *, g, scale, chunk_size, initial_state, qk_l2norm, step: bool = False) -> DeltaCall:
    B, Hk, H, N, D, Dv = _check_qkv(q, k, v, step=step)
    _per_token("beta", beta, B, H, N, "per-token writing strengths in [0, 2]")
    _same_device(q, beta=beta)
    b = beta.detach()
    if b.numel() and not bool(((b >= 0) & (b <= 2)).all()):
        bad = b[~((b >= 0) & (b <= 2))]
        raise ValueError(f"beta must lie in [0, 2] (outside it the delta rule's state update I - beta·k·kᵀ "
                         f"amplifies instead of correcting); got {bad.numel()} entries outside, "
                         f"e.g. {bad.flatten()[0].item():.4g}")
    if g is not None:
        _per_token("g", g, B, H, N, "per-token log-decays <= 0")
        _same_device(q, g=g)
        _check_log_decays("g", g)
    scale = _check_scale(scale)
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    if not isinstance(qk_l2norm, bool):
        raise TypeError(f"qk_l2norm must be a bool, got {type(qk_l2norm).__name__}")
    cd = compute_dtype(q.dtype)
    if initial_state is not None:
        _check_state(initial_state, B, H, D, Dv, cd, q.device)

    return DeltaCall(q, k, v, beta, g, initial_state, 1.0 / math.sqrt(D) if scale is None else scale, qk_l2norm,
                     chunk_size, cd, q.dtype)
