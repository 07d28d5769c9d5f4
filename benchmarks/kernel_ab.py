#!/usr/bin/env python
"""A/B of two builds of qkv's CPU kernel in one process, beside SDPA: each named .so is swapped in as the kernel
in turn, and the providers are alternated call by call (medians and p25-p75 of the per-call times).

    python benchmarks/kernel_ab.py --lib base=/tmp/attn_base.so --lib new=src/qkv/_attn_cpu*.so \\
        --isa avx2 --case causal --mode fwd fwdbwd

Cases (B=1 H=8 D=64 fp32 unless said): causal (N=4096), window (255,0) N=4096, decode32k / decode4k
(Hq=32 Hkv=8 D=128 one query row; --dtype bf16 for bf16), plus ``read`` (a plain read of K and V) for decoding.
Run with ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 to hold torch to AVX2.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch
import torch.nn.functional as F

import qkv
from qkv.engines import cpu_kernel as ck


def _open(path: str):
    """The library at path, set up as cpu_kernel._load sets up its own."""
    ck._load()
    lib = ctypes.CDLL(path)
    for name in ("qkv_attn_fwd", "qkv_attn_decode", "qkv_attn_bwd", "qkv_rows_plausible"):
        f, g = getattr(lib, name), getattr(ck._lib, name)
        f.argtypes, f.restype = g.argtypes, g.restype
    lib.qkv_isa_name.restype = ctypes.c_char_p
    assert lib.qkv_native_version() == ck._VERSION
    return lib


def _inputs(case: str, dtype, grad: bool):
    g = torch.Generator().manual_seed(0)
    if case.startswith("decode"):
        nk = 32768 if case == "decode32k" else 4096
        shapes = [(1, 32, 1, 128), (1, 8, nk, 128), (1, 8, nk, 128)]
    else:
        shapes = [(1, 8, 4096, 64)] * 3
    return [torch.randn(*s, generator=g).to(dtype).requires_grad_(grad) for s in shapes]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", action="append", default=[], help="name=path of a kernel .so (at least one)")
    ap.add_argument("--isa", default=None)
    ap.add_argument("--case", default="causal", choices=["causal", "window", "decode32k", "decode4k"])
    ap.add_argument("--mode", nargs="+", default=["fwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    libs = {n: _open(p) for n, p in (x.split("=", 1) for x in a.lib)}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    dec = a.case.startswith("decode")
    for mode in a.mode:
        grad = mode == "fwdbwd"
        q, k, v = _inputs(a.case, dtype, grad)
        kw = {"causal": True} if a.case != "window" else {"window": (255, 0)}
        if a.case == "window":
            i = torch.arange(4096)
            dense = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - 255)
        do = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1]).to(dtype) if grad else None

        def run(f):
            if not grad:
                with torch.no_grad():
                    return f()
            out = f()
            q.grad = k.grad = v.grad = None
            out.backward(do)

        fns = {}
        for n, lib in libs.items():
            def fn(lib=lib):
                ck._lib = lib
                return qkv.attention(q, k, v, backend="auto" if dec else "tiled", **kw)
            fns[n] = fn
        if not a.no_sdpa:
            if dec:
                fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            elif a.case == "window":
                fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
            else:
                fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if dec:
            words = [t.detach().view(torch.float32) for t in (k, v)]
            fns["read"] = lambda: [w.sum() for w in words]
        nbytes = sum(t.numel() * t.element_size() for t in (k, v))
        inner = max(1, int(0.05 / max(1e-4, nbytes / 20e9))) if dec else 1
        samples = {n: [] for n in fns}
        with qkv.options(cpu_isa=a.isa):
            for f in fns.values():
                run(f)
            for _ in range(a.reps):
                for n, f in fns.items():
                    t = time.perf_counter()
                    for _ in range(inner):
                        run(f)
                    samples[n].append((time.perf_counter() - t) / inner * 1e3)
        ref = statistics.median(samples["sdpa"]) if "sdpa" in samples else None
        print(f"{a.case} {a.dtype} {mode} isa={a.isa or 'best'} torch={torch.backends.cpu.get_cpu_capability()} "
              f"threads={torch.get_num_threads()}")
        for n, s in samples.items():
            med = statistics.median(s)
            qs = statistics.quantiles(s, n=4) if len(s) > 1 else [med, med, med]
            extra = f"  {ref / med:.2f}x sdpa" if ref else ""
            if dec:
                extra += f"  {nbytes / med / 1e6:.1f} GB/s"
            print(f"  {n:8s} median {med:8.2f} ms  p25-p75 {qs[0]:.2f}-{qs[2]:.2f}  min {min(s):.2f}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
