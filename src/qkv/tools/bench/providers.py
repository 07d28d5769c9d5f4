"""Providers: the ways of computing attention that a sweep compares (qkv's engines, SDPA and its forced
backends, compiled FlexAttention, the naive math), each preparing its own natural mask form outside the timing."""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .specs import BenchError, Case, MaskSpec

__all__ = ["Provider", "PROVIDERS", "ALIASES", "LINEAR_DEFAULT", "default_providers", "resolve_providers"]

# --------------------------------------------------------------------------------------------- providers
def _qkv():
    import qkv
    return qkv


def _qkv_engine_status(engine: str, device: str) -> tuple[bool, str]:
    """Whether one of qkv's engines (or auto) can run on ``device``, from the registry."""
    if engine == "auto":
        return True, "picks the fastest capable engine (qkv.select_backend)"
    for b in _qkv().backends(device):
        if b.name == engine:
            return b.available, b.reason
    return False, f"qkv.backends() does not list {engine!r}"


def _cuda_ok(device: str) -> tuple[bool, str]:
    if device != "cuda":
        return False, "CUDA only"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


@dataclass
class Provider:
    name: str
    label: str
    family: str                                  # qkv | sdpa | flex | naive | linear
    doc: str
    _available: Callable[[str], tuple[bool, str]]
    _build: Callable[[Case, dict], Callable]   # (case, state) -> fn(q, k, v) -> out
    compiles: bool = False

    def available(self, device: str) -> tuple[bool, str]:
        try:
            return self._available(device)
        except Exception as e:  # pragma: no cover - defensive
            return False, f"{type(e).__name__}: {e}"

    def build(self, case: Case) -> tuple[Callable, dict]:
        """Prepare everything outside the timed region (masks, compiled fn); returns (fn, info)."""
        info: dict = {}
        t0 = time.perf_counter()
        fn = self._build(case, info)
        if case.device == "cuda":
            torch.cuda.synchronize()
        info["setup_s"] = time.perf_counter() - t0
        return fn, info


def _qkv_build(engine: str):
    def build(case: Case, info: dict):
        qkv = _qkv()
        spec, n = case.spec, case.N
        kw: dict = {}
        if spec.documents or spec.prefix is not None:
            kw["mask"] = _qkv_block_mask(qkv, spec, case)
            info["mask_form"] = "qkv.block_mask"
        else:
            if spec.causal:
                kw["causal"] = True
            if spec.window is not None:
                kw["window"] = spec.window
            info["mask_form"] = ", ".join(f"{k}={v}" for k, v in kw.items()) or "none"
        del n

        def fn(q, k, v):
            return qkv.attention(q, k, v, backend=engine, **kw)
        return fn
    return build


def _qkv_block_mask(qkv, spec: MaskSpec, case: Case):
    """The spec as one qkv BlockMask (causal/window folded in, so empty blocks are skipped)."""
    m = qkv.masks
    mods = []
    if spec.causal:
        mods.append(m.causal())
    if spec.window is not None:
        mods.append(m.sliding_window(*spec.window))
    if spec.documents:
        mods.append(m.document(spec.doc_ids(case.N, case.device)))
    if spec.prefix is not None:
        mods.append(m.prefix_lm(spec.prefix))
    mod = mods[0] if len(mods) == 1 else m.and_masks(*mods)
    try:
        return qkv.block_mask(mod, 1, 1, case.N, case.N, device=case.device)
    except TypeError:
        return qkv.block_mask(mod, 1, 1, case.N, case.N)


def _sdpa_build(backend: str | None):
    def build(case: Case, info: dict):
        import torch.nn.functional as F
        spec = case.spec
        kw: dict = {}
        if spec.only_causal:
            kw["is_causal"] = True
            info["mask_form"] = "is_causal=True"
        elif not spec.is_none:
            kw["attn_mask"] = spec.dense(case.N, case.device)[None, None].contiguous()
            info["mask_form"] = "dense bool attn_mask"
        else:
            info["mask_form"] = "none"
        if backend is None:
            def fn(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, **kw)
            return fn
        from torch.nn.attention import SDPBackend, sdpa_kernel
        be = getattr(SDPBackend, backend)

        def fn(q, k, v):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v, **kw)
        return fn
    return build


def _sdpa_cpu_or_cuda(backend: str):
    def avail(device: str):
        if device == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA device"
        if backend in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION") and device != "cuda":
            return False, "CUDA only"
        return True, f"torch.nn.attention.sdpa_kernel(SDPBackend.{backend})"
    return avail


_FLEX_COMPILED: dict = {}


def _flex_available(device: str):
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception as e:
        return False, f"torch.nn.attention.flex_attention not importable: {e}"
    if device == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, "torch.compile(flex_attention) + create_block_mask"
    import shutil
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if not cxx:
        return False, "torch.compile on CPU needs a C++ compiler (none found)"
    return True, f"torch.compile(flex_attention) on CPU via {os.path.basename(cxx)}; forward only on CPU"


def _flex_build(case: Case, info: dict):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if case.device == "cpu" and case.mode == "fwdbwd":
        raise NotImplementedError("FlexAttention does not support backward on CPU (torch "
                                  f"{torch.__version__.split('+')[0]})")
    fa = _FLEX_COMPILED.get("fn")
    if fa is None:
        import torch._dynamo.config as dcfg
        for attr in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):  # one compile per shape in a sweep, never eager fallback
            if hasattr(dcfg, attr):
                setattr(dcfg, attr, max(getattr(dcfg, attr), 256))
        fa = _FLEX_COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    mm = case.spec.mask_mod(case.N, case.device)
    bm = None
    if mm is not None:
        bm = create_block_mask(mm, None, None, case.N, case.N, device=case.device)
        info["mask_form"] = "flex create_block_mask"
    else:
        info["mask_form"] = "none"

    def fn(q, k, v):
        return fa(q, k, v, block_mask=bm)
    return fn


def _naive_build(case: Case, info: dict):
    spec = case.spec
    mask = None if spec.is_none else spec.dense(case.N, case.device)
    info["mask_form"] = "dense bool masked_fill" if mask is not None else "none"
    scale = 1.0 / math.sqrt(case.D)

    def fn(q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(s, dim=-1), v)
    return fn


def _linear_build(kind: str):
    """qkv.linear's O(N) family, causal (or unmasked for plain linear attention): not softmax attention, so the
    sweep times it beside the exact engines to show where the quadratic cost overtakes it."""
    def build(case: Case, info: dict):
        spec = case.spec
        if not (spec.is_none or spec.only_causal):
            raise NotImplementedError(f"the linear-attention family takes no mask but causal, got {case.mask!r}")
        causal = spec.only_causal
        if kind != "linear" and not causal:
            raise NotImplementedError(f"{kind} is causal only")
        lin = _qkv().linear
        g = torch.Generator().manual_seed(1)
        shape = (case.B, case.H, case.N)
        info["mask_form"] = f"causal={causal}"
        if kind == "linear":
            def fn(q, k, v):
                return lin.linear_attention(q, k, v, causal=causal)
        elif kind == "linear-decay":
            decay = (-0.1 * torch.rand(shape, generator=g)).to(case.device)

            def fn(q, k, v):
                return lin.linear_attention(q, k, v, decay=decay)
        else:
            beta = torch.rand(shape, generator=g).to(case.device)
            decay = (-0.1 * torch.rand(shape, generator=g)).to(case.device)

            def fn(q, k, v):
                return lin.delta_rule(q, k, v, beta, g=decay, qk_l2norm=True)
        return fn
    return build


def _linear_providers() -> list[Provider]:
    ok = (lambda d: (True, "qkv.linear, chunked, torch ops") if d == "cpu" or torch.cuda.is_available()
          else (False, "no CUDA device"))
    return [
        Provider("linear", "qkv linear (elu+1, normalised)", "linear",
                 "qkv.linear_attention(q, k, v): φ(q)·(φ(k)ᵀ·v) / φ(q)·Σφ(k)", ok, _linear_build("linear")),
        Provider("linear-decay", "qkv linear, per-token decay", "linear",
                 "qkv.linear_attention(q, k, v, decay=(B,H,N) log-decays): Mamba-2 SSD / GLA form", ok,
                 _linear_build("linear-decay")),
        Provider("deltanet", "qkv gated delta rule", "linear",
                 "qkv.linear.delta_rule(q, k, v, beta, g=..., qk_l2norm=True): Gated DeltaNet (Qwen3-Next)", ok,
                 _linear_build("deltanet")),
    ]


LINEAR_DEFAULT = ["auto", "linear", "linear-decay", "deltanet"]


def _qkv_providers() -> list[Provider]:
    """``auto`` and one provider per engine of qkv's registry (``qkv.backends()``), in its order. qkv's ``sdpa``
    engine is PyTorch's SDPA, which the ``sdpa`` providers below time directly."""
    ps = [Provider("auto", "qkv auto", "qkv", "qkv.attention(backend='auto')",
                   lambda d: _qkv_engine_status("auto", d), _qkv_build("auto"))]
    for b in _qkv().backends():
        if b.name == "sdpa":
            continue
        ps.append(Provider(b.name, f"qkv {b.name}", "qkv", f"qkv.attention(backend={b.name!r})",
                           lambda d, _n=b.name: _qkv_engine_status(_n, d), _qkv_build(b.name)))
    return ps


def _registry() -> dict[str, Provider]:
    ps = _qkv_providers() + [
        Provider("sdpa", "SDPA", "sdpa", "torch SDPA, torch picks the kernel",
                 lambda d: (True, "torch.nn.functional.scaled_dot_product_attention")
                 if d == "cpu" or torch.cuda.is_available() else (False, "no CUDA device"), _sdpa_build(None)),
        Provider("sdpa-flash", "SDPA flash", "sdpa", "SDPA forced to FLASH_ATTENTION",
                 _sdpa_cpu_or_cuda("FLASH_ATTENTION"), _sdpa_build("FLASH_ATTENTION")),
        Provider("sdpa-efficient", "SDPA mem-efficient", "sdpa", "SDPA forced to EFFICIENT_ATTENTION",
                 _sdpa_cpu_or_cuda("EFFICIENT_ATTENTION"), _sdpa_build("EFFICIENT_ATTENTION")),
        Provider("sdpa-cudnn", "SDPA cuDNN", "sdpa", "SDPA forced to CUDNN_ATTENTION",
                 _sdpa_cpu_or_cuda("CUDNN_ATTENTION"), _sdpa_build("CUDNN_ATTENTION")),
        Provider("sdpa-math", "SDPA math", "sdpa", "SDPA forced to MATH",
                 _sdpa_cpu_or_cuda("MATH"), _sdpa_build("MATH")),
        Provider("flex", "flex (compiled)", "flex", "torch.compile(flex_attention) with create_block_mask",
                 _flex_available, _flex_build, compiles=True),
        Provider("naive", "naive math", "naive", "softmax(q·kᵀ/√d, masked)·v, materialised",
                 lambda d: (True, "materialises the N×N scores") if d == "cpu" or torch.cuda.is_available()
                 else (False, "no CUDA device"), _naive_build),
    ] + _linear_providers()
    return {p.name: p for p in ps}


PROVIDERS = _registry()
ALIASES = {"qkv": [p.name for p in PROVIDERS.values() if p.family == "qkv"],
           "sdpa-all": ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                                                            "sdpa-math"],
           "torch": ["sdpa", "flex"], "flex_attention": ["flex"], "math": ["naive"],
           "linear-all": ["linear", "linear-decay", "deltanet"]}


def default_providers(device: str) -> list[str]:
    """auto, tiled, (triton), sdpa, naive; flex too on CUDA. On CPU flex is opt-in: its first compile takes
    ~30 s with a cold inductor cache."""
    names = ["auto", "tiled"] + (["triton"] if device == "cuda" and "triton" in PROVIDERS else []) + ["sdpa"]
    if device == "cuda":
        names.append("flex")
    names.append("naive")
    return [n for n in names if PROVIDERS[n].available(device)[0] or n in ("auto", "tiled", "sdpa")]


def resolve_providers(names: list[str] | None, device: str) -> list[str]:
    if not names:
        return default_providers(device)
    out: list[str] = []
    for raw in names:
        for n in (x.strip().lower() for x in raw.split(",")):
            if not n:
                continue
            expanded = ALIASES.get(n, [n])
            for e in expanded:
                if e not in PROVIDERS:
                    raise BenchError(f"unknown provider {n!r}; choose from {', '.join(PROVIDERS)} "
                                     f"(or groups: {', '.join(ALIASES)})")
                if n in ALIASES and not PROVIDERS[e].available(device)[0]:
                    continue  # a group expands to what can run here
                if e not in out:
                    out.append(e)
    return out


