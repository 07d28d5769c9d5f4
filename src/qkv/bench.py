"""The measuring instrument: providers, mask specs, timing, FLOPs, peak memory, table, JSON, plot.

A *provider* is one way of computing attention: qkv's engines (``auto``, ``tiled``, ``reference``,
``triton``), PyTorch SDPA (``sdpa``: torch picks; ``sdpa-flash``/``sdpa-efficient``/``sdpa-cudnn``/
``sdpa-math``: forced through ``torch.nn.attention.sdpa_kernel``), ``flex`` (``torch.compile(flex_attention)``
with its own block mask; the compile time is reported separately) and ``naive`` (the materialising math a user
writes: ``softmax(q·kᵀ/√d masked) · v``). Every provider gets the mask in its own natural form:

========== ======================== ============================= ====================================
spec       qkv                      SDPA                          flex
========== ======================== ============================= ====================================
none       (nothing)                (nothing)                     ``block_mask=None``
causal     ``causal=True``          ``is_causal=True``            ``create_block_mask(causal)``
window:W   ``window=(W-1, 0)``      dense bool ``attn_mask``      ``create_block_mask(window)``
window:L,R ``window=(L, R)``        dense bool ``attn_mask``      ``create_block_mask(window)``
document:K ``qkv.block_mask(...)``  dense bool ``attn_mask``      ``create_block_mask(document)``
prefix:P   ``qkv.block_mask(...)``  dense bool ``attn_mask``      ``create_block_mask(prefix_lm)``
========== ======================== ============================= ====================================

``window:W`` is the causal sliding window of W keys (each query sees itself and the W-1 keys before it),
``document:K`` packs K equal-length documents (bidirectional inside each), ``prefix:P`` is prefix-LM (the first
P keys visible to all, causal after). Terms combine with ``+`` (``causal+document:4``); a combination is handed
to qkv as one ``BlockMask`` so that its empty blocks are skipped.

Timing: warm-up, then ``reps`` samples per provider, providers alternated (rotated each round) so that CPU noise
hits all alike; a sample of a fast call runs it several times. CUDA is timed with events. FLOPs count visible
entries only (FlashAttention's convention): ``4·B·H·visible·D`` forward, ``fwdbwd = 3.5×`` forward.
Peak memory: CUDA ``max_memory_allocated`` over the allocation before the call; CPU a fresh subprocess per point
that reports its resident-set growth (setup such as a dense mask, plus the call's high-water mark measured with
``/proc/self/clear_refs``; ``ru_maxrss`` where that is missing). A point that runs out of memory, exceeds the
time budget, or is refused is recorded with its status and the sweep goes on.
"""
from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

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


# --------------------------------------------------------------------------------------------- providers
def _qkv():
    import qkv  # noqa: PLC0415  (lazy: bench must import while the core is being written)
    return qkv


def _qkv_engine_status(engine: str, device: str) -> tuple[bool, str]:
    from .info import engines
    rows = engines(device)
    for name, ok, reason in rows:
        if name == engine:
            return ok, reason or ("available" if ok else "unavailable")
    if engine == "auto":
        try:
            _qkv().attention  # noqa: B018
            return True, "picks the fastest capable engine (qkv.select_backend)"
        except Exception as e:
            return False, f"qkv core unavailable: {e}"
    if len(rows) == 1 and rows[0][0] == "qkv":
        return False, rows[0][2]
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
    family: str                                  # qkv | sdpa | flex | naive
    doc: str
    _available: Callable[[str], tuple[bool, str]]
    _build: Callable[["Case", dict], Callable]   # (case, state) -> fn(q, k, v) -> out
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


def _registry() -> dict[str, Provider]:
    ps = [
        Provider("auto", "qkv auto", "qkv", "qkv.attention(backend='auto')",
                 lambda d: _qkv_engine_status("auto", d), _qkv_build("auto")),
        Provider("tiled", "qkv tiled", "qkv", "qkv.attention(backend='tiled'): FlashAttention in torch ops",
                 lambda d: _qkv_engine_status("tiled", d), _qkv_build("tiled")),
        Provider("triton", "qkv triton", "qkv", "qkv.attention(backend='triton'): fused kernels (CUDA)",
                 lambda d: _qkv_engine_status("triton", d) if _cuda_ok(d)[0] else _cuda_ok(d),
                 _qkv_build("triton")),
        Provider("reference", "qkv reference", "qkv", "qkv.attention(backend='reference'): materialises scores",
                 lambda d: _qkv_engine_status("reference", d), _qkv_build("reference")),
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
    ]
    return {p.name: p for p in ps}


PROVIDERS = _registry()
ALIASES = {"qkv": ["auto", "tiled", "triton"], "sdpa-all": ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                                                            "sdpa-math"],
           "torch": ["sdpa", "flex"], "flex_attention": ["flex"], "math": ["naive"]}


def default_providers(device: str) -> list[str]:
    """auto, tiled, (triton), sdpa, naive; flex too on CUDA. On CPU flex is opt-in: its first compile takes
    ~30 s with a cold inductor cache."""
    names = ["auto", "tiled"] + (["triton"] if device == "cuda" else []) + ["sdpa"]
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


# --------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    device: str = "cpu"
    dtypes: list = field(default_factory=lambda: ["fp32"])
    seqlens: list = field(default_factory=lambda: [512, 1024, 2048])
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    masks: list = field(default_factory=lambda: ["causal"])
    modes: list = field(default_factory=lambda: ["fwd"])
    providers: list = field(default_factory=list)
    reps: int = 5
    warmup: int = 2
    budget_s: float = 60.0         # one call longer than this (measured or predicted) is recorded as timeout
    memory: bool = True
    seed: int = 0
    min_sample_s: float = 0.05     # a sample repeats a fast call until it lasts about this long
    progress: bool = True

    def validate(self) -> "Config":
        dev = str(self.device).lower()
        if dev.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BenchError(f"--device {self.device}: CUDA is not available here "
                                 f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'}"
                                 f" CUDA)")
            dev = "cuda"
        elif dev != "cpu":
            raise BenchError(f"--device must be cpu or cuda, got {self.device!r}")
        self.device = dev
        dts = []
        for d in self.dtypes:
            if str(d).lower() not in DTYPES:
                raise BenchError(f"unknown dtype {d!r}; choose from fp32, bf16, fp16, fp64")
            dts.append(DTYPE_NAMES[DTYPES[str(d).lower()]])
        self.dtypes = list(dict.fromkeys(dts))
        for name, v in (("--batch", self.batch), ("--heads", self.heads), ("--head-dim", self.head_dim),
                        ("--reps", self.reps)):
            if not isinstance(v, int) or v < 1:
                raise BenchError(f"{name} must be a positive integer, got {v!r}")
        if not self.seqlens:
            raise BenchError("--seqlens needs at least one length")
        for n in self.seqlens:
            if not isinstance(n, int) or n < 1:
                raise BenchError(f"--seqlens: lengths must be positive integers, got {n!r}")
        self.seqlens = sorted(dict.fromkeys(self.seqlens))
        if self.warmup < 0:
            raise BenchError(f"--warmup must be >= 0, got {self.warmup}")
        if not self.budget_s > 0:
            raise BenchError(f"--budget must be > 0 seconds, got {self.budget_s}")
        self.masks = [parse_mask(m).text for m in self.masks]
        for m in self.modes:
            if m not in MODES:
                raise BenchError(f"--mode must be fwd or fwdbwd, got {m!r}")
        self.providers = resolve_providers(self.providers, self.device)
        if not self.providers:
            raise BenchError("no provider to run")
        return self


# --------------------------------------------------------------------------------------------- memory
def _proc_status() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "failed to allocate" in msg \
        or "defaultcpuallocator" in msg


def _classify(e: BaseException) -> tuple[str, str]:
    """(status, one-line message) of an exception raised by a provider."""
    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    if _is_oom(e):
        return "oom", msg
    if isinstance(e, (NotImplementedError, ValueError, TypeError)) or "no available kernel" in str(e).lower():
        return "unsupported", msg
    return "error", msg


def _step(fn: Callable, q, k, v, do):
    if do is None:
        with torch.no_grad():
            return fn(q, k, v)
    q.grad = k.grad = v.grad = None
    out = fn(q, k, v)
    out.backward(do)
    return out


def _memory_worker() -> None:
    """Entry of the CPU memory subprocess: reads a JSON job on stdin, prints one JSON line."""
    job = json.loads(sys.stdin.read())
    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    case = Case(**job["case"])
    p = PROVIDERS[job["provider"]]
    res: dict = {}
    try:
        _prime(p, case)
        q, k, v, do = case.inputs(job.get("seed", 0))
        gc.collect()
        base = _proc_status().get("VmRSS", _maxrss())
        fn, info = p.build(case)
        gc.collect()
        after_setup = _proc_status().get("VmRSS", base)
        if job.get("warm", True) or p.compiles:  # a first call (compile, caches) outside the measurement
            t0 = time.perf_counter()
            out = _step(fn, q, k, v, do)
            res["first_call_s"] = time.perf_counter() - t0
            del out
            if do is not None:
                q.grad = k.grad = v.grad = None
            gc.collect()
        can_reset = _reset_peak_rss()
        before = _proc_status().get("VmRSS", after_setup)
        t0 = time.perf_counter()
        out = _step(fn, q, k, v, do)
        res["call_s"] = time.perf_counter() - t0
        st = _proc_status()
        if can_reset and "VmHWM" in st:
            call_peak = max(0, st["VmHWM"] - before)
            res["method"] = "VmHWM after clear_refs (call) + VmRSS growth (setup)"
        else:
            call_peak = max(0, _maxrss() - before)
            res["method"] = "ru_maxrss"
        res.update(status="ok", setup_bytes=max(0, after_setup - base), call_peak_bytes=call_peak,
                   peak_bytes=max(0, after_setup - base) + call_peak, baseline_rss_bytes=base,
                   maxrss_growth_bytes=max(0, _maxrss() - base), setup_s=info.get("setup_s"))
    except BaseException as e:  # noqa: BLE001 - every failure is a result
        res["status"], res["message"] = _classify(e)
    sys.stdout.write("\n" + json.dumps(res) + "\n")
    sys.stdout.flush()


def _prime(p: Provider, case: Case) -> None:
    """Load what a provider imports (and its thread pools) before the baseline, so that library code is not
    counted as the provider's memory: a tiny call for most, the compile stack's imports for compiled ones."""
    if p.compiles:
        import importlib
        importlib.import_module("torch._dynamo")
        importlib.import_module("torch._inductor.compile_fx")
        from torch.nn.attention.flex_attention import create_block_mask
        create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 128, 128, device=case.device)
        return
    from dataclasses import replace
    tiny = replace(case, B=1, H=1, N=min(case.N, 64))
    try:
        fn, _ = p.build(tiny)
        _step(fn, *tiny.inputs())
    except Exception:  # the real call reports the failure
        pass


def _run_memory_subprocess(case: Case, provider: str, seed: int, timeout: float, warm: bool = True) -> dict:
    import qkv as _pkg  # the package dir must be importable in the child
    root = os.path.dirname(os.path.dirname(os.path.abspath(_pkg.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # glibc: a fixed mmap threshold returns every large freed block to the OS at once, so RSS follows the live
    # tensors instead of malloc's retained heap (which would hide a second call's growth)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    job = {"case": asdict(case), "provider": provider, "seed": seed, "threads": torch.get_num_threads(),
           "warm": warm}
    try:
        r = subprocess.run([sys.executable, "-c", "from qkv.bench import _memory_worker; _memory_worker()"],
                           input=json.dumps(job), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "message": f"memory subprocess exceeded {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
    if r.returncode == 0 and lines:
        return json.loads(lines[-1])
    if r.returncode in (-9, 137):
        return {"status": "oom", "message": "memory subprocess killed (SIGKILL: out of memory)"}
    tail = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
    return {"status": "error", "message": f"memory subprocess exit {r.returncode}: {tail}"}


def _predicted_bytes(provider: Provider, case: Case) -> int:
    """A rough lower bound of what a materialising provider needs; 0 for O(N) ones."""
    el = case.torch_dtype.itemsize
    n2 = case.B * case.H * case.N * case.N
    if provider.name in ("naive", "sdpa-math", "reference") or (provider.name.startswith("sdpa")
                                                              and not case.spec.is_none
                                                              and not case.spec.only_causal):
        mats = 3 if case.mode == "fwd" else 5
        el = 8 if provider.name == "reference" else el
        return mats * n2 * el + case.N * case.N
    return 0


def _available_bytes(device: str) -> int | None:
    if device == "cuda":
        try:
            return int(torch.cuda.mem_get_info()[0])
        except Exception:
            return None
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------- timing
def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_sample(fn, args, inner: int, device: str) -> float:
    """Seconds per call, averaged over ``inner`` back-to-back calls."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            _step(fn, *args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        _step(fn, *args)
    return (time.perf_counter() - t0) / inner


def _summary(times: list[float]) -> dict:
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    med = statistics.median(ts)
    return {"median_ms": med * 1e3, "min_ms": ts[0] * 1e3, "max_ms": ts[-1] * 1e3, "p25_ms": q[0] * 1e3,
            "p75_ms": q[2] * 1e3, "spread_pct": 100.0 * (q[2] - q[0]) / med if med > 0 else 0.0}


def _cases(cfg: Config) -> list[list[Case]]:
    """Cases grouped by (dtype, mask, mode), each group ordered by N."""
    groups = []
    for dt in cfg.dtypes:
        for m in cfg.masks:
            for mode in cfg.modes:
                groups.append([Case(cfg.device, dt, m, mode, cfg.batch, cfg.heads, n, cfg.head_dim)
                               for n in cfg.seqlens])
    return groups


def _base_row(p: Provider, c: Case) -> dict:
    return {"provider": p.name, "label": p.label, "family": p.family, **asdict(c),
            "flops": c.flops(), "visible_fraction": c.visible_fraction(), "status": "ok", "message": ""}


def run(cfg: Config) -> dict:
    """Run the sweep described by ``cfg`` (validated here); returns the JSON-ready result dict."""
    from .info import machine_info
    cfg.validate()
    provs = [PROVIDERS[n] for n in cfg.providers]
    groups = _cases(cfg)
    total = sum(len(g) for g in groups) * len(provs)
    bar = None
    if cfg.progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, desc="qkv bench", unit="pt", file=sys.stderr,
                       dynamic_ncols=True, leave=False)
        except Exception:
            bar = None
    t_start = time.perf_counter()
    results: list[dict] = []
    prov_info = {}
    for p in provs:
        ok, reason = p.available(cfg.device)
        prov_info[p.name] = {"label": p.label, "family": p.family, "doc": p.doc, "available": ok,
                             "reason": reason}
    for group in groups:
        last: dict[str, tuple] = {}          # provider -> (flops, seconds per call, status)
        for case in group:
            rows = {p.name: _base_row(p, case) for p in provs}
            live: list[Provider] = []
            for p in provs:
                row = rows[p.name]
                if not prov_info[p.name]["available"]:
                    row.update(status="unavailable", message=prov_info[p.name]["reason"])
                    continue
                prev = last.get(p.name)
                if prev and prev[2] in ("oom", "timeout"):
                    row.update(status=prev[2], message=f"skipped: {prev[2]} at a shorter length")
                    continue
                if prev and prev[1]:
                    est = prev[1] * case.flops() / max(prev[0], 1.0)
                    row["predicted_call_s"] = est
                    if est > cfg.budget_s:
                        row.update(status="timeout", message=f"skipped: predicted {est:.1f} s per call "
                                                             f"> budget {cfg.budget_s:g} s")
                        continue
                need, avail = _predicted_bytes(p, case), _available_bytes(cfg.device)
                if need and avail and need > 0.9 * avail:
                    row.update(status="oom", message=f"skipped: needs ~{need / 2**30:.1f} GiB, "
                                                     f"{avail / 2**30:.1f} GiB available")
                    continue
                live.append(p)
            # memory pass first on CPU (a fresh subprocess per point): it also finds OOM/timeouts safely
            if cfg.memory and cfg.device == "cpu":
                for p in list(live):
                    if bar:
                        bar.set_postfix_str(f"memory {p.name} N={case.N} {case.mask} {case.mode}", refresh=True)
                    mem = _run_memory_subprocess(case, p.name, cfg.seed, timeout=4 * cfg.budget_s + 120,
                                                 warm=cfg.warmup > 0)
                    rows[p.name]["memory"] = mem
                    if mem.get("status") == "ok":
                        rows[p.name]["peak_bytes"] = mem["peak_bytes"]
                        if mem.get("call_s", 0) > cfg.budget_s:
                            rows[p.name].update(status="timeout", message=f"one call took {mem['call_s']:.1f} s"
                                                f" > budget {cfg.budget_s:g} s", one_call_s=mem["call_s"])
                            live.remove(p)
                    elif mem.get("status") in ("oom", "timeout", "unsupported"):
                        rows[p.name].update(status=mem["status"], message=mem.get("message", ""))
                        live.remove(p)
            _time_group(cfg, case, live, rows, bar)
            for p in provs:
                r = rows[p.name]
                last[p.name] = (case.flops(), (r.get("median_ms") or 0) / 1e3 or r.get("one_call_s"),
                                r["status"])
            if bar:
                bar.update(len(provs))
            _finish_rows(rows)
            results.extend(rows.values())
    if bar:
        bar.close()
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
            "elapsed_s": time.perf_counter() - t_start, "machine": machine_info(),
            "config": asdict(cfg), "providers": prov_info, "results": results}


def _time_group(cfg: Config, case: Case, live: list[Provider], rows: dict, bar) -> None:
    """Warm up and time the live providers of one case, alternating between them."""
    args = case.inputs(cfg.seed)
    fns: dict[str, Callable] = {}
    inner: dict[str, int] = {}
    outs: dict[str, torch.Tensor] = {}
    for p in live:
        row = rows[p.name]
        if bar:
            bar.set_postfix_str(f"warm-up {p.name} N={case.N} {case.mask} {case.mode}", refresh=True)
        try:
            fn, info = p.build(case)
            row.update(setup_s=info["setup_s"], mask_form=info.get("mask_form"))
            _sync(case.device)
            t0 = time.perf_counter()
            out = _step(fn, *args)
            _sync(case.device)
            first = time.perf_counter() - t0
            row["first_call_ms"] = first * 1e3
            outs[p.name] = out.detach()
            del out
            if first > cfg.budget_s and not p.compiles:  # a compiled provider's first call is its compile
                row.update(status="timeout", message=f"first call took {first:.1f} s > budget {cfg.budget_s:g} s",
                           one_call_s=first)
                continue
            # warm-up: a few more calls, fewer when calls are slow
            est = first
            n_warm = cfg.warmup if first * cfg.warmup < cfg.budget_s / 4 else 0
            if p.compiles:
                n_warm = max(1, cfg.warmup)  # the first call compiled: time at least one compiled call
            for _ in range(n_warm):
                t0 = time.perf_counter()
                _step(fn, *args)
                _sync(case.device)
                est = time.perf_counter() - t0
            if p.compiles:
                row["compile_s"] = max(0.0, first - est)
                if est > cfg.budget_s:
                    row.update(status="timeout", message=f"a compiled call took {est:.1f} s > budget "
                                                         f"{cfg.budget_s:g} s", one_call_s=est)
                    continue
            fns[p.name] = fn
            inner[p.name] = max(1, min(100, int(cfg.min_sample_s / max(est, 1e-6))))
            row["_est"] = est
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, KeyboardInterrupt):
                raise
            row["status"], row["message"] = _classify(e)
        finally:
            if case.mode == "fwdbwd":
                for t in args[:3]:
                    t.grad = None
            if case.device == "cuda" and rows[p.name]["status"] == "oom":
                torch.cuda.empty_cache()
    if not fns:
        return
    # how many rounds fit in the budget (at least 1)
    slowest = max(rows[n]["_est"] * inner[n] for n in fns)
    reps = max(1, min(cfg.reps, int(cfg.budget_s * len(fns) / max(slowest * len(fns), 1e-9))))
    if bar:
        bar.set_postfix_str(f"timing {len(fns)} providers x {reps} reps N={case.N} {case.mask} {case.mode}",
                            refresh=True)
    times: dict[str, list[float]] = {n: [] for n in fns}
    order = list(fns)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            rot = order[r % len(order):] + order[:r % len(order)]
            for name in rot:
                if name not in fns:
                    continue
                try:
                    times[name].append(_time_sample(fns[name], args, inner[name], case.device))
                except BaseException as e:  # noqa: BLE001
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    rows[name]["status"], rows[name]["message"] = _classify(e)
                    del fns[name]
    finally:
        if gc_was:
            gc.enable()
    for name, ts in times.items():
        if not ts or rows[name]["status"] != "ok":
            continue
        row = rows[name]
        row.update(_summary(ts))
        row.update(times_ms=[t * 1e3 for t in ts], reps=len(ts), inner=inner[name])
        row["tflops"] = row["flops"] / (row["median_ms"] / 1e3) / 1e12
    # CUDA memory in-process, one provider at a time
    if cfg.memory and case.device == "cuda":
        for name, fn in fns.items():
            rows[name]["memory"] = _cuda_memory(fn, args)
            if rows[name]["memory"].get("status") == "ok":
                rows[name]["peak_bytes"] = rows[name]["memory"]["peak_bytes"]
    # agreement with a baseline output (sdpa, else naive, else the first one)
    base = next((n for n in ("sdpa", "naive", "sdpa-math", "reference") if n in outs), next(iter(outs), None))
    for name, o in outs.items():
        if base is not None and rows[name]["status"] == "ok":
            rows[name]["max_abs_diff"] = float((o.float() - outs[base].float()).abs().max()) if o.numel() else 0.0
            rows[name]["diff_vs"] = base


def _cuda_memory(fn, args) -> dict:
    try:
        q, k, v, do = args
        if do is not None:
            q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = _step(fn, *args)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        if do is not None:
            q.grad = k.grad = v.grad = None
        return {"status": "ok", "peak_bytes": int(peak), "method": "torch.cuda.max_memory_allocated"}
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, KeyboardInterrupt):
            raise
        s, m = _classify(e)
        torch.cuda.empty_cache()
        return {"status": s, "message": m}


def _finish_rows(rows: dict) -> None:
    sd = next((rows[n] for n in ("sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math")
               if n in rows and rows[n].get("median_ms")), None)
    for r in rows.values():
        r.pop("_est", None)
        if sd is not None and r.get("median_ms"):
            r["speedup_vs_sdpa"] = sd["median_ms"] / r["median_ms"]
            r["sdpa_ref"] = sd["provider"]


# --------------------------------------------------------------------------------------------- output
def _fmt_bytes(b) -> str:
    if b is None:
        return "-"
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.1f} MiB"


def format_table(result: dict) -> str:
    """The human table: one row per (case, provider)."""
    cfg = result["config"]
    m = result["machine"]
    dev = cfg["device"]
    where = (m["gpus"][0]["name"] if dev == "cuda" and m["gpus"] else
             f"{m['cpu']['model']} ({m['cpu']['torch_threads']} threads)")
    head = (f"qkv bench on {dev}: {where}; torch {m['versions']['torch']}; B={cfg['batch']} H={cfg['heads']} "
            f"D={cfg['head_dim']}; {cfg['reps']} reps, median [p25-p75 spread]")
    cols = ["provider", "dtype", "mask", "mode", "N", "ms", "spread", "TFLOP/s", "peak mem", "vs SDPA", "note"]
    body = []
    for r in result["results"]:
        ok = r["status"] == "ok" and r.get("median_ms") is not None
        note = []
        if r["status"] != "ok":
            note.append(f"{r['status'].upper()}: {r.get('message', '')}")
        if r.get("compile_s") is not None:
            note.append(f"compile {r['compile_s']:.1f} s")
        if r.get("max_abs_diff") is not None and r.get("diff_vs") != r["provider"]:
            note.append(f"|Δ| vs {r['diff_vs']} {r['max_abs_diff']:.1e}")
        body.append([r["provider"], r["dtype"], r["mask"], r["mode"], str(r["N"]),
                     f"{r['median_ms']:.2f}" if ok else "-",
                     f"±{r['spread_pct']:.0f}%" if ok else "",
                     f"{r['tflops']:.3g}" if ok else "-",
                     _fmt_bytes(r.get("peak_bytes")),
                     f"{r['speedup_vs_sdpa']:.2f}x" if r.get("speedup_vs_sdpa") else "-",
                     "; ".join(note)[:110]])
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    right = {4, 5, 6, 7, 8, 9}

    def fmt(cells):
        return "  ".join((c.rjust(w) if i in right else c.ljust(w)) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [head, fmt(cols).rstrip(), fmt(["-" * w for w in widths]).rstrip()]
    prev = None
    for b in body:
        key = tuple(b[1:5])
        if prev is not None and key != prev and b[1:4] != list(prev[:3]):
            lines.append("")
        prev = key
        lines.append(fmt(b).rstrip())
    lines.append(f"({result['elapsed_s']:.1f} s; FLOPs on visible entries: 4·B·H·visible·D fwd, ×3.5 fwd+bwd)")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")


def _lines(ax, sub, provs, style, labels, key, scale, ns):
    import matplotlib.ticker
    for p in provs:
        pts = [(r["N"], r[key] * scale) for r in sub if r["provider"] == p and r.get(key)]
        bad = [(r["N"], r["status"]) for r in sub if r["provider"] == p and not r.get(key)
               and r["status"] not in ("unavailable", "ok")]
        lab = labels[p] + (" (" + ", ".join(f"{s} N={n}" for n, s in bad[:2]) + ")" if bad else "")
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=lab, linewidth=1.8, markersize=6, **style[p])
    ref = [(r["N"], r[key] * scale) for r in sub if r.get(key)]
    if key == "median_ms" and ref and len({n for n, _ in ref}) > 1:
        n0 = min(n for n, _ in ref)
        y0 = max(y for n, y in ref if n == n0)
        xs = sorted({n for n, _ in ref})
        ax.plot(xs, [y0 * (n / n0) ** 2 for n in xs], ":", color="0.5", linewidth=1, label="∝ N²")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("sequence length N")
    if ax.lines:
        ax.legend(fontsize=8, loc="upper left")


def _bars(ax, sub, provs, style, labels, key, scale):
    """One N: a bar per provider, value written on it; failed points named instead of drawn."""
    xs, names = [], []
    for i, p in enumerate(provs):
        r = next((r for r in sub if r["provider"] == p), None)
        if r is None:
            continue
        xs.append(i)
        names.append(labels[p])
        if r.get(key):
            y = r[key] * scale
            ax.bar(i, y, color=style[p]["color"], width=0.6)
            txt = (f"{y:,.0f}" if y >= 100 else f"{y:.3g}") + (f"\n{r['speedup_vs_sdpa']:.2f}x SDPA" if key == "median_ms"
                                  and r.get("speedup_vs_sdpa") and r["family"] != "sdpa" else "")
            ax.annotate(txt, (i, y), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                        textcoords="offset points")
        else:
            ax.annotate(r["status"], (i, 0.5), xycoords=("data", "axes fraction"), ha="center", fontsize=9,
                        color="0.4")
    ax.set_xticks(xs, names, fontsize=8)
    ax.set_xlim(-0.6, max(xs, default=0) + 0.6)
    ys = [r[key] * scale for r in sub if r.get(key)]
    if ys and max(ys) / min(ys) > 30:       # log only when the values span orders of magnitude
        ax.set_yscale("log")
        ax.set_ylim(min(ys) / 4, max(ys) * 4)
    elif ys:
        ax.set_ylim(0, max(ys) * 1.25)


def plot(result: dict, path: str) -> None:
    """PNG: per (dtype, mask, mode) a row of panels, time vs N and peak memory vs N, log-log."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    cfg = result["config"]
    rs = result["results"]
    configs = list(dict.fromkeys((r["dtype"], r["mask"], r["mode"]) for r in rs))
    has_mem = any(r.get("peak_bytes") is not None for r in rs)
    ncol = 2 if has_mem else 1
    fig, axes = plt.subplots(len(configs), ncol, figsize=(6.2 * ncol, 4.3 * len(configs)), squeeze=False)
    provs = list(dict.fromkeys(r["provider"] for r in rs))
    cmap = plt.get_cmap("tab10")
    style = {p: dict(color=cmap(i % 10), marker="os^vDP*Xph"[i % 10]) for i, p in enumerate(provs)}
    labels = {r["provider"]: r["label"] for r in rs}
    panels = [("median_ms", 1.0, "time per call (ms)", "time"),
              ("peak_bytes", 1 / 2**20, "peak memory growth (MiB)", "memory")][:ncol]
    for row, (dt, mk, mode) in enumerate(configs):
        sub = [r for r in rs if (r["dtype"], r["mask"], r["mode"]) == (dt, mk, mode)]
        ns = sorted({r["N"] for r in sub})
        for col, (key, scale, ylabel, what) in enumerate(panels):
            ax = axes[row][col]
            if len(ns) == 1:
                _bars(ax, sub, provs, style, labels, key, scale)
            else:
                _lines(ax, sub, provs, style, labels, key, scale, ns)
            ax.set_ylabel(ylabel)
            if len(ns) > 1:
                ax.set_yscale("log")
            ax.grid(True, which="both", axis="y" if len(ns) == 1 else "both", alpha=0.3)
            ax.set_title(f"{mk}, {dt}, {mode}" + (f", N={ns[0]}" if len(ns) == 1 else "") + f" — {what}",
                         fontsize=10)
    m = result["machine"]
    where = m["gpus"][0]["name"] if cfg["device"] == "cuda" and m["gpus"] else m["cpu"]["model"]
    fig.suptitle(f"qkv bench — {cfg['device']} ({where}), B={cfg['batch']} H={cfg['heads']} D={cfg['head_dim']}, "
                 f"torch {m['versions']['torch']}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
