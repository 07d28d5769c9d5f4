"""Compile the engine's kernels for GPU targets without a GPU, and report their resources (``qkv kernels``).

Each launch configuration is compiled exactly as the engine would launch it: the launchers run on small CPU
tensors with the kernels replaced by a recorder, and the recorded arguments are specialised (types, 16-byte
divisibility, constants) by Triton's own binder for the target, then ``triton.compile``\\ d to PTX and cubin.
``ptxas -v`` (shipped in Triton's wheel) gives registers and spill bytes; Triton's metadata gives shared memory;
the PTX says whether tensor-core instructions are used (``wgmma`` on Hopper, ``mma.sync`` on Ampere).
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch

from . import configs, launch

__all__ = ["Row", "ARCHS", "plan", "compile_one", "run", "format_table"]

ARCHS = {"sm_80": 80, "sm_86": 86, "sm_90": 90}
_DTYPES = {2: torch.bfloat16, 4: torch.float32}


@dataclass
class Row:
    kernel: str
    arch: int
    head_dim: int          # padded head dim (BLOCK_D)
    dtype: str
    variant: str
    config: str
    registers: int
    spill_bytes: int       # spill stores + spill loads, bytes per thread
    shared: int            # bytes of shared memory per block
    smem_limit: int
    mma: str               # "wgmma", "mma" or "none"
    seconds: float

    @property
    def ok(self) -> bool:
        return self.spill_bytes == 0 and self.shared <= self.smem_limit


def _variant_kwargs(variant: str, B, Hq, Nq, Nk, D, dtype):
    """Launcher keywords of a variant, one per config class of :func:`.configs.feature_class` (and "causal" for
    decoding): "plain" — key ranges and lengths (no mask, causal, windows, padding); "masked" — block lists with
    document ids and partial-tile bitmaps, softcap, ALiBi; "all" — every feature at once (bias, dropout)."""
    if variant == "causal":
        return {"hi_off": Nk - Nq}
    kw = {"lo_off": -256, "hi_off": Nk - Nq, "kv_lens": torch.full((B,), Nk, dtype=torch.int32),
          "q_lens": torch.full((B,), Nq, dtype=torch.int32)}
    if variant == "plain":
        return kw
    ids = torch.arange(Nk, dtype=torch.int32).view(1, -1) // 64
    from ...core.masks import TileMasks
    tm, tn = configs.TILE
    nqt, nkt = -(-Nq // tm), -(-Nk // tn)
    st = torch.full((1, 1, nqt, nkt), 1, dtype=torch.int8)
    slot = torch.arange(nqt * nkt, dtype=torch.int32).view(1, 1, nqt, nkt)
    bits = torch.zeros(nqt * nkt, tm, -(-tn // 32), dtype=torch.int32)
    kw.update(q_ids=ids[:, Nk - Nq:].contiguous(), k_ids=ids, masks=TileMasks(st, slot, bits), softcap=30.0,
              alibi=torch.ones(1, Hq))
    if variant == "masked":
        return kw
    kw.update(bias=torch.zeros(B, Hq, Nq, Nk, dtype=dtype), dropout_p=0.1, seed=12345)
    return kw


def _launches(kernel: str, arch: int, block_d: int, elem: int, variant: str, config=None):
    """Record the launches of one (kernel, head dim, dtype, variant) on ``arch``: [(name, fn, args, kwargs)]."""
    dt = _DTYPES[elem]
    B, Hq, Hkv, N, D = 1, 2, 1, 256, block_d
    q = torch.zeros(B, Hq, N, D, dtype=dt)
    k = torch.zeros(B, Hkv, N, D, dtype=dt)
    v = torch.zeros(B, Hkv, N, D, dtype=dt)
    with launch.recording(arch) as calls:
        if kernel == "decode":
            qd = torch.zeros(B, Hq, 1, D, dtype=dt)
            kw = {} if variant == "plain" else {"hi_off": N - 1}
            launch.decode(qd, k, v, scale=0.1, num_splits=4, config=config, **kw)
            return [c for c in calls if c[0] == "_decode_kernel"]
        if kernel == "merge":
            qd = torch.zeros(B, Hq, 1, D, dtype=dt)
            launch.decode(qd, k, v, scale=0.1, num_splits=4)
            return [c for c in calls if c[0] == "_merge_kernel"]
        kw = _variant_kwargs(variant, B, Hq, N, N, D, dt)
        need_dbias = "bias" in kw
        if kernel == "fwd":
            launch.forward(q, k, v, scale=0.1, config=config, **kw)
        else:
            out, lse = torch.zeros(B, Hq, N, D, dtype=dt), torch.zeros(B, Hq, N)
            other = configs.Config(32, 32, 4, 1)     # the backward's other kernel: recorded, not compiled
            cfg = {"config_dq": config if kernel == "bwd_dq" else other,
                   "config_dkdv": config if kernel == "bwd_dkdv" else other}
            if config is None:
                cfg = {}
            launch.backward(q, k, v, out, lse, out, scale=0.1, need_dbias=need_dbias, **cfg, **kw)
    name = {"fwd": "_fwd_kernel", "bwd_dq": "_bwd_dq_kernel", "bwd_dkdv": "_bwd_dkdv_kernel",
            "bwd_delta": "_bwd_delta_kernel"}[kernel]
    return [c for c in calls if c[0] == name]


def _compile(fn, args, kwargs, arch: int, cache_dir: str | None):
    """triton.compile one recorded launch for ``cuda:arch`` (specialised by Triton's binder, as a launch is), with
    Triton's compile cache in ``cache_dir`` (None: a temporary directory, removed after). Returns the compiled
    kernel and the ptxas log Triton printed ('' when the kernel came from the cache)."""
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, knobs.cache.scope(), knobs.nvidia.scope(), \
            contextlib.redirect_stdout(log):
        knobs.cache.dir = cache_dir or tmp
        knobs.nvidia.dump_ptxas_log = True
        ck = triton.compile(src, target=target, options=options.__dict__)
    return ck, log.getvalue()


def _usage(log: str) -> tuple[int, int] | None:
    """(registers, spill bytes per thread) from a ``ptxas -v`` log, None if it has none."""
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    if not regs:
        return None
    return max(regs), sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from running ``ptxas -v`` on the PTX (the flags Triton compiles with)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", "-lineinfo",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True)
    return _usage(res.stderr + res.stdout) or (0, 0)


def _mma(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "none"


def plan(archs=("sm_80", "sm_90"), *, head_dims=(16, 32, 64, 128, 256), dtypes=(2, 4),
         variants=("plain", "masked", "all"),
         kernels_=("fwd", "bwd_dq", "bwd_dkdv", "bwd_delta", "decode", "merge")):
    """The (kernel, arch, head dim, element bytes, variant) configurations to compile."""
    out = []
    for a in archs:
        if a not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {a!r}")
        for kern in kernels_:
            for bd in head_dims:
                for elem in dtypes:
                    for var in (("plain",) if kern in ("merge", "bwd_delta") else ("plain", "causal")
                                if kern == "decode" else variants):
                        out.append((kern, ARCHS[a], bd, elem, var))
    return out


def _config_text(kw) -> str:
    """'128x64 w8 s3': rows x keys per block (or the splits merged), warps, pipeline stages."""
    if "BT" in kw:                                         # the linear-attention kernels: chunk x value columns
        tile = f"{kw['BT']}x{kw['BV']}"
    elif "BLOCK_N" in kw:
        tile = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}"
    elif "BLOCK_S" in kw:
        tile = f"{kw['BLOCK_S']} splits"
    else:
        tile = f"{kw.get('BLOCK_M', '?')} rows"
    return f"{tile} w{kw.get('num_warps', 4)} s{kw.get('num_stages', 1)}"


def compile_one(kernel: str, arch: int, block_d: int, elem: int, variant: str, config=None,
                cache_dir: str | None = None, launches=None) -> Row:
    """Compile one configuration (``config``: a :class:`~.configs.Config` instead of the table's) and measure it.
    ``launches``: the function recording the launch (same arguments as this module's own, for this engine's
    kernels), for kernels kept elsewhere (the linear-attention family's)."""
    t = time.perf_counter()
    (name, fn, args, kw), = (launches or _launches)(kernel, arch, block_d, elem, variant, config)
    ck, log = _compile(fn, args, kw, arch, cache_dir)
    regs, spills = _usage(log) or _ptxas_usage(ck.asm["ptx"], arch)
    md = ck.metadata
    cfg = _config_text(kw)
    return Row(kernel, arch, block_d, str(_DTYPES[elem]).replace("torch.", ""), variant, cfg, regs, spills,
               int(md.shared), configs.SMEM_LIMIT[arch], _mma(ck.asm["ptx"]), time.perf_counter() - t)


def format_table(rows) -> str:
    head = ("kernel", "arch", "D", "dtype", "variant", "config", "regs", "spill B", "smem B", "limit", "mma", "ok")
    lines = [head] + [(r.kernel, f"sm_{r.arch}", str(r.head_dim), r.dtype, r.variant, r.config, str(r.registers),
                       str(r.spill_bytes), str(r.shared), str(r.smem_limit), r.mma, "yes" if r.ok else "NO")
                      for r in rows]
    w = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(line)).rstrip() for line in lines)


def _one(item) -> Row:
    try:
        return compile_one(*item)
    except Exception as e:
        kernel, arch, block_d, elem, variant = item[:5]
        return Row(kernel, arch, block_d, str(_DTYPES[elem]).replace("torch.", ""), variant,
                   f"error: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}", 0, -1, 0,
                   configs.SMEM_LIMIT[arch], "none", 0.0)


def run(items, jobs: int = 1, cache_dir: str | None = None, on_row=None) -> list[Row]:
    """Compile every ``(kernel, arch, head_dim, elem_bytes, variant)`` item (``plan()``; a sixth element: the
    ``launches`` function of :func:`compile_one`), in ``jobs`` processes; ``on_row(row)`` is called as each
    finishes. Rows come back in the items' order."""
    items = [tuple(it[:5]) + (None, cache_dir) + tuple(it[5:]) for it in items]
    if jobs <= 1:
        rows = []
        for it in items:
            rows.append(_one(it))
            if on_row:
                on_row(rows[-1])
        return rows
    import concurrent.futures as cf
    import multiprocessing
    with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        futs = {ex.submit(_one, it): i for i, it in enumerate(items)}
        rows = [None] * len(items)
        for f in cf.as_completed(futs):
            rows[futs[f]] = f.result()
            if on_row:
                on_row(rows[futs[f]])
    return rows
