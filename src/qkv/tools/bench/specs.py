"""Benchmark cases: dtype names, ``--mask`` specs (each provider's natural mask form) and the points of a sweep."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["SCHEMA", "DTYPES", "DTYPE_NAMES", "MODES", "SHAPE_SETS", "BenchError", "MaskSpec", "parse_mask", "Case"]

SCHEMA = "qkv-bench/1"

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "fp64": torch.float64,
          "float64": torch.float64}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
MODES = ("fwd", "fwdbwd")

# Named shape sets: defaults for (batch, heads, head_dim, seqlens) that explicit flags override.
SHAPE_SETS = {
    "tiny": dict(batch=1, heads=2, head_dim=32, seqlens=[64, 128, 256]),
    "cpu": dict(batch=1, heads=8, head_dim=64, seqlens=[512, 1024, 2048, 4096]),
    "long": dict(batch=1, heads=2, head_dim=64, seqlens=[4096, 8192, 16384, 32768]),
    "gpu": dict(batch=4, heads=16, head_dim=128, seqlens=[1024, 2048, 4096, 8192, 16384]),
    "llama": dict(batch=1, heads=32, head_dim=128, seqlens=[2048, 4096, 8192]),
}


class BenchError(ValueError):
    """A bad request (unknown provider, bad mask spec, ...): the CLI prints it on one line and exits 2."""


# --------------------------------------------------------------------------------------------- mask specs
@dataclass(frozen=True)
class MaskSpec:
    """A parsed ``--mask`` spec: terms ANDed together. Nq == Nk in the bench (bottom-right == top-left)."""
    text: str
    causal: bool = False
    window: tuple | None = None       # (left, right), None = unbounded side
    documents: int | None = None
    prefix: int | None = None

    @property
    def is_none(self) -> bool:
        return not (self.causal or self.window or self.documents or self.prefix is not None)

    @property
    def only_causal(self) -> bool:
        return self.causal and self.window is None and self.documents is None and self.prefix is None

    def doc_ids(self, n: int, device="cpu") -> torch.Tensor:
        return torch.arange(n, device=device) * self.documents // max(n, 1)

    def mask_mod(self, n: int, device="cpu") -> Callable | None:
        """A FlexAttention-style ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (tensor ops only), or None."""
        if self.is_none:
            return None
        causal, window, prefix = self.causal, self.window, self.prefix
        ids = self.doc_ids(n, device) if self.documents else None

        def mask_mod(b, h, q_idx, kv_idx):
            ok = q_idx >= kv_idx if causal else (q_idx == q_idx) & (kv_idx == kv_idx)
            if window is not None:
                left, right = window
                if left is not None:
                    ok = ok & (kv_idx >= q_idx - left)
                if right is not None:
                    ok = ok & (kv_idx <= q_idx + right)
            if ids is not None:
                ok = ok & (ids[q_idx] == ids[kv_idx])
            if prefix is not None:
                ok = ok & ((kv_idx < prefix) | (q_idx >= kv_idx))
            return ok
        return mask_mod

    def dense(self, n: int, device="cpu", rows: slice | None = None) -> torch.Tensor | None:
        """The dense ``(n, n)`` bool mask (or the given rows of it); None for no mask."""
        mm = self.mask_mod(n, device)
        if mm is None:
            return None
        rows = rows or slice(0, n)
        q = torch.arange(rows.start, rows.stop, device=device)[:, None]
        kv = torch.arange(n, device=device)[None, :]
        zero = torch.zeros((), dtype=torch.long, device=device)
        return mm(zero, zero, q, kv).expand(q.shape[0], n)

    def visible(self, n: int) -> int:
        """How many of the n×n (query, key) pairs may attend: the FLOP count's base."""
        return _visible(self, n)


_VISIBLE_CACHE: dict = {}


def _visible(spec: MaskSpec, n: int) -> int:
    key = (spec, n)
    if key in _VISIBLE_CACHE:
        return _VISIBLE_CACHE[key]
    if spec.is_none:
        v = n * n
    elif spec.only_causal:
        v = n * (n + 1) // 2
    else:
        v, step = 0, max(1, (1 << 24) // max(n, 1))
        for r in range(0, n, step):
            v += int(spec.dense(n, rows=slice(r, min(n, r + step))).sum())
    _VISIBLE_CACHE[key] = v
    return v


def _pos_int(text: str, what: str, spec: str, minimum: int = 1) -> int:
    try:
        v = int(text)
    except ValueError:
        raise BenchError(f"bad mask spec {spec!r}: {what} must be an integer, got {text!r}") from None
    if v < minimum:
        raise BenchError(f"bad mask spec {spec!r}: {what} must be >= {minimum}, got {v}")
    return v


def parse_mask(text: str) -> MaskSpec:
    """Parse ``none | causal | window:W | window:L,R | document:K | prefix:P``, terms joined by ``+``."""
    if not isinstance(text, str) or not text.strip():
        raise BenchError("bad mask spec '': expected none|causal|window:W|window:L,R|document:K|prefix:P")
    causal, window, documents, prefix = False, None, None, None
    for term in text.strip().lower().split("+"):
        name, _, arg = term.strip().partition(":")
        if name == "none" and not arg:
            continue
        if name == "causal" and not arg:
            causal = True
        elif name == "window" and arg:
            if "," in arg:
                lt, _, rt = arg.partition(",")
                window = (_pos_int(lt, "window left", text, 0), _pos_int(rt, "window right", text, 0))
            else:
                window = (_pos_int(arg, "window size W", text, 1) - 1, 0)
        elif name in ("document", "doc", "documents") and arg:
            documents = _pos_int(arg, "document count K", text, 1)
        elif name in ("prefix", "prefix_lm", "prefix-lm") and arg:
            prefix = _pos_int(arg, "prefix length P", text, 0)
        else:
            raise BenchError(f"bad mask spec {text!r}: unknown term {term!r}; expected none, causal, window:W, "
                             f"window:L,R, document:K or prefix:P (joined by '+')")
    return MaskSpec(text=text.strip(), causal=causal, window=window, documents=documents, prefix=prefix)


# --------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One benchmark point, without the provider."""
    device: str
    dtype: str
    mask: str
    mode: str
    B: int
    H: int
    N: int
    D: int

    @property
    def spec(self) -> MaskSpec:
        return parse_mask(self.mask)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def flops(self) -> float:
        fwd = 4.0 * self.B * self.H * self.spec.visible(self.N) * self.D
        return fwd * (3.5 if self.mode == "fwdbwd" else 1.0)

    def visible_fraction(self) -> float:
        return self.spec.visible(self.N) / max(1, self.N * self.N)

    def inputs(self, seed: int = 0):
        """q, k, v (and the output gradient for fwdbwd), deterministic from ``seed``."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        shape = (self.B, self.H, self.N, self.D)
        need = self.mode == "fwdbwd"
        ts = [torch.randn(shape, generator=g, dtype=torch.float32).to(self.device, self.torch_dtype)
              for _ in range(4 if need else 3)]
        for t in ts[:3]:
            t.requires_grad_(need)
        return ts[0], ts[1], ts[2], (ts[3] if need else None)
