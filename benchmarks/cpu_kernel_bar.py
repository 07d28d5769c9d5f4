#!/usr/bin/env python
"""Reproduce every timed figure of the CPU-kernel bar (issue 12) in one command, and judge them.

    python benchmarks/cpu_kernel_bar.py --isa avx2               # the bar: the AVX2 variant, all figures
    python benchmarks/cpu_kernel_bar.py --isa avx512 --only u d  # some figures, another variant
    python benchmarks/cpu_kernel_bar.py --isa avx2 --torch-isa avx2   # torch's kernels held to AVX2 as well
    python benchmarks/cpu_kernel_bar.py --dry-run                # print the commands
    python benchmarks/cpu_kernel_bar.py --judge --isa avx2       # re-read the JSON files, print the verdicts

``--isa`` runs qkv's kernel in that variant (``QKV_CPU_ISA`` for the ``qkv bench`` subprocesses,
``qkv.options(cpu_isa=...)`` in process); ``--torch-isa avx2`` also holds PyTorch's own kernels to AVX2
(``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``; inductor reads the first), which
makes an AVX-512 machine stand in for an AVX2-only one on both sides.

The bar (side by side in one process, fp32 unless said, B=1 H=8 D=64):
  w8  window (255, 0) N=8192 forward: tiled >= 25x SDPA with the dense mask and >= 2x compiled FlexAttention
  w4  window (255, 0) N=4096 forward+backward: tiled >= 15x SDPA with the dense mask
  c   causal N=4096 forward and forward+backward: auto >= 1.2x SDPA (fp32); bf16 forward+backward >= 1.0x
  u   unmasked N=8192 D=128 forward: tiled (and auto) >= 1.0x SDPA
  d   decoding, Hq=32 Hkv=8 D=128, one query row, Nk = 4096 and 32768, fp32 and bf16: auto >= 3x SDPA and
      >= 70% of the bandwidth of a plain read of the same K/V bytes, measured in the same run
Figures w8, w4, c, u are ``qkv bench`` commands; d is timed here (qkv bench has no GQA decoding shape).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results")

COMMON = "--device cpu --batch 1 --heads 8 --head-dim 64"
FIGURES = {
    "w8": ("window (255,0) N=8192 fwd: tiled vs SDPA + dense mask vs compiled flex",
           f"{COMMON} --seqlens 8192 --mask window:256 --mode fwd --providers tiled sdpa flex --reps 9 --budget 120"),
    "w4": ("window (255,0) N=4096 fwd+bwd: tiled vs SDPA + dense mask",
           f"{COMMON} --seqlens 4096 --mask window:256 --mode fwdbwd --providers tiled sdpa --reps 9 --budget 120"),
    "c": ("causal N=4096, fp32 + bf16, fwd + fwd+bwd: auto and tiled vs SDPA",
          f"{COMMON} --seqlens 4096 --mask causal --dtype fp32 bf16 --mode fwd fwdbwd --providers auto tiled sdpa "
          "--reps 11"),
    "u": ("unmasked N=8192 D=128 fwd: tiled and auto vs SDPA",
          "--device cpu --batch 1 --heads 8 --head-dim 128 --seqlens 8192 --mask none --mode fwd "
          "--providers tiled auto sdpa --reps 7 --budget 120"),
}
DECODE = dict(Hq=32, Hkv=8, D=128, lengths=(4096, 32768), dtypes=("fp32", "bf16"), reps=15)
TORCH_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _tag(isa: str | None, torch_isa: str | None) -> str:
    return (isa or "best") + (f"_torch-{torch_isa}" if torch_isa else "")


def command(name: str, out: str, tag: str) -> list[str]:
    rel = os.path.relpath(out)
    return ["qkv", "bench", *shlex.split(FIGURES[name][1]),
            "--json", os.path.join(rel, f"cpu_kernel_{tag}_{name}.json"),
            "--plot", os.path.join(rel, f"cpu_kernel_{tag}_{name}.png")]


# ------------------------------------------------------------------------------------------------ decoding
def _median_ms(fn, reps: int, inner: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t) / inner * 1e3)
    return out


def decode_figure(path: str, isa: str | None) -> None:
    """Decoding side by side in this process: qkv auto (the kernel's decoding path), SDPA, and a plain read of
    the same K/V bytes (their sum, read as fp32 words); providers alternated, medians."""
    import torch
    import torch.nn.functional as F

    import qkv
    from qkv.tools.info import machine_info
    rows = []
    with qkv.options(cpu_isa=isa), torch.no_grad():
        for dt_name in DECODE["dtypes"]:
            dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt_name]
            for nk in DECODE["lengths"]:
                g = torch.Generator().manual_seed(0)
                q = torch.randn(1, DECODE["Hq"], 1, DECODE["D"], generator=g).to(dt)
                k = torch.randn(1, DECODE["Hkv"], nk, DECODE["D"], generator=g).to(dt)
                v = torch.randn(1, DECODE["Hkv"], nk, DECODE["D"], generator=g).to(dt)
                words = [t.view(torch.float32) for t in (k, v)]
                nbytes = sum(t.numel() * t.element_size() for t in (k, v))
                chosen = qkv.select_backend(q, k, v, causal=True)
                fns = {"auto": lambda: qkv.attention(q, k, v, causal=True),
                       "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                       "read": lambda: [w.sum() for w in words]}
                inner = max(1, int(0.05 / max(1e-4, nbytes / 20e9)))   # ~50 ms samples at ~20 GB/s
                samples = {n: [] for n in fns}
                for f in fns.values():
                    f()
                for _ in range(DECODE["reps"]):
                    for n, f in fns.items():
                        samples[n] += _median_ms(f, 1, inner)
                for n, s in samples.items():
                    med = statistics.median(s)
                    rows.append({"provider": n, "dtype": dt_name, "Nk": nk, "bytes": nbytes, "median_ms": med,
                                 "GBps": nbytes / med / 1e6, "samples_ms": s,
                                 "auto_choice": f"{chosen.name}: {chosen.reason}" if n == "auto" else None})
                line = "  ".join(f"{r['provider']} {r['median_ms']:.2f} ms ({r['GBps']:.1f} GB/s)"
                                 for r in rows[-3:])
                print(f"   decode {dt_name} Nk={nk} ({nbytes / 2**20:.0f} MiB K+V): {line}", flush=True)
    with open(path, "w") as f:
        json.dump({"machine": machine_info(), "isa": isa, "shape": {k: v for k, v in DECODE.items()},
                   "threads": torch.get_num_threads(), "results": rows}, f, indent=1)


# ------------------------------------------------------------------------------------------------- judging
def _rows(data, **match):
    return [r for r in data["results"] if all(r.get(k) == v for k, v in match.items())]


def _ratio(data, fast, slow, **match):
    a, b = (next(iter(_rows(data, provider=p, **match)), None) for p in (fast, slow))
    if not a or not b or not a.get("median_ms") or not b.get("median_ms"):
        why = [f"{r['provider']}: {r.get('status')} {r.get('message', '')}".strip() for r in (a, b) if r]
        return None, "; ".join(why) or "missing"
    return b["median_ms"] / a["median_ms"], f"{a['median_ms']:.1f} ms vs {b['median_ms']:.1f} ms"


def _claim(out, text, x, need, fig, fmt="{:.2f}x"):
    out.append((f"{text} >= {need}x", None if x is None else x >= need, (fmt.format(x) + f" ({fig})") if x else fig))


def judge(name: str, path: str) -> list[tuple[str, bool | None, str]]:
    with open(path) as f:
        d = json.load(f)
    out = []
    if name == "w8":
        x, fig = _ratio(d, "tiled", "sdpa")
        _claim(out, "tiled vs SDPA(dense mask), window fwd N=8192", x, 25, fig, "{:.1f}x")
        x, fig = _ratio(d, "tiled", "flex")
        fl = next(iter(_rows(d, provider="flex")), None)
        comp = f"; flex compile {fl['compile_s']:.1f} s" if fl and fl.get("compile_s") is not None else ""
        _claim(out, "tiled vs compiled flex, window fwd N=8192", x, 2, fig + comp)
    elif name == "w4":
        x, fig = _ratio(d, "tiled", "sdpa")
        _claim(out, "tiled vs SDPA(dense mask), window fwd+bwd N=4096", x, 15, fig, "{:.1f}x")
    elif name == "c":
        for dt, mode, need in (("fp32", "fwd", 1.2), ("fp32", "fwdbwd", 1.2), ("bf16", "fwdbwd", 1.0),
                               ("bf16", "fwd", None)):
            for prov in ("auto", "tiled"):
                x, fig = _ratio(d, prov, "sdpa", dtype=dt, mode=mode)
                if need is None or prov == "tiled":
                    out.append((f"{prov} {dt} {mode} vs SDPA (no bar)", None, f"{x:.2f}x ({fig})" if x else fig))
                else:
                    _claim(out, f"{prov} {dt} {mode} causal N=4096 vs SDPA", x, need, fig)
    elif name == "u":
        for prov in ("tiled", "auto"):
            x, fig = _ratio(d, prov, "sdpa")
            _claim(out, f"{prov} vs SDPA, unmasked fwd N=8192 D=128", x, 1.0, fig)
    elif name == "d":
        for dt in DECODE["dtypes"]:
            for nk in DECODE["lengths"]:
                r = {p: next(iter(_rows(d, provider=p, dtype=dt, Nk=nk)), None) for p in ("auto", "sdpa", "read")}
                if not all(r.values()):
                    out.append((f"decode {dt} Nk={nk}", False, "missing"))
                    continue
                a, s, rd = (r[p]["median_ms"] for p in ("auto", "sdpa", "read"))
                fig = f"auto {a:.2f} ms, SDPA {s:.2f} ms, read {rd:.2f} ms ({r['read']['GBps']:.1f} GB/s)"
                _claim(out, f"decode {dt} Nk={nk} auto vs SDPA", s / a, 3, fig)
                _claim(out, f"decode {dt} Nk={nk} auto's share of the read bandwidth", rd / a, 0.7,
                       f"{r['auto']['GBps']:.1f} of {r['read']['GBps']:.1f} GB/s", "{:.0%}")
    return out


def machine_line(path: str) -> str:
    with open(path) as f:
        m = json.load(f)["machine"]
    c = m["cpu"]
    return (f"{c['model']}, {c['usable_cores']} cores ({c['torch_threads']} torch threads), features "
            f"{' '.join(c['features']) or '-'}; torch {m['versions']['torch']} ({c.get('torch_cpu_capability')}); "
            f"qkv kernel {c.get('qkv_kernel', '?')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = list(FIGURES) + ["d"]
    ap.add_argument("--only", nargs="+", choices=names, default=names)
    ap.add_argument("--isa", default=None, help="qkv's kernel variant (avx512, avx2, neon; default: the best)")
    ap.add_argument("--torch-isa", choices=["avx2"], default=None, help="hold PyTorch's kernels to AVX2 as well")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--judge", action="store_true", help="do not run, read the JSON files")
    a = ap.parse_args(argv)
    tag = _tag(a.isa, a.torch_isa)
    env = dict(os.environ)
    if a.isa:
        env["QKV_CPU_ISA"] = a.isa
    if a.torch_isa:
        env.update(TORCH_AVX2)
    if a.torch_isa and not a.dry_run and not a.judge and any(os.environ.get(k) != v for k, v in TORCH_AVX2.items()):
        # torch reads these when it loads: run this script again with them set
        return subprocess.run([sys.executable, *sys.argv], env=env).returncode
    if not a.dry_run:
        os.makedirs(a.out, exist_ok=True)
    for name in a.only:
        if name == "d":
            if a.dry_run:
                print(f"# d: decoding, timed in process: python {os.path.relpath(__file__)} --only d"
                      + (f" --isa {a.isa}" if a.isa else ""))
            elif not a.judge:
                print("== d: decoding Hq=32 Hkv=8 D=128, auto vs SDPA vs a plain read", flush=True)
                decode_figure(os.path.join(a.out, f"cpu_kernel_{tag}_d.json"), a.isa)
            continue
        cmd = command(name, a.out, tag)
        prefix = "".join(f"{k}={v} " for k, v in env.items() if k in TORCH_AVX2 or k == "QKV_CPU_ISA")
        if a.dry_run:
            print(f"# {name}: {FIGURES[name][0]}\n{prefix}{shlex.join(cmd)}")
            continue
        if not a.judge:
            print(f"== {name}: {FIGURES[name][0]}\n$ {prefix}{shlex.join(cmd)}", flush=True)
            r = subprocess.run([sys.executable, "-m", "qkv", *cmd[1:]], env=env)
            if r.returncode:
                print(f"   (exit {r.returncode})")
    if a.dry_run:
        return 0
    lines, met_all, machine = [], True, None
    for name in a.only:
        path = os.path.join(a.out, f"cpu_kernel_{tag}_{name}.json")
        if not os.path.exists(path):
            lines.append(f"{name}: no {path}")
            met_all = False
            continue
        machine = machine or machine_line(path)
        for claim, met, fig in judge(name, path):
            met_all &= met is not False
            lines.append(f"{name:3s} {'MET ' if met else ('--  ' if met is None else 'MISS')} {claim}: {fig}")
    head = f"CPU kernel bar, qkv variant {a.isa or 'best'}" + (f", torch held to {a.torch_isa}" if a.torch_isa else "")
    print(f"\n{head}" + (f"\non {machine}" if machine else ""))
    print("\n".join(lines))
    with open(os.path.join(a.out, f"cpu_kernel_{tag}_bar.txt"), "w") as f:
        f.write(f"{head}\nmachine: {machine}\n" + "\n".join(lines) + "\n")
    return 0 if met_all else 1


if __name__ == "__main__":
    sys.exit(main())
