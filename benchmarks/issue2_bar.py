#!/usr/bin/env python
"""Reproduce the figures of issue 2's bar, one ``qkv bench`` command each, and judge them.

    python benchmarks/issue2_bar.py                 # run all, write benchmarks/results/issue2_*.{json,png}
    python benchmarks/issue2_bar.py --only 1 3      # some of them
    python benchmarks/issue2_bar.py --dry-run       # print the commands (they are also in benchmarks/README.md)
    python benchmarks/issue2_bar.py --judge         # only re-read the JSON files and print the verdicts

The bar (CPU, fp32 unless said, measured side by side in one process):
  1   causal B=1 H=8 D=64 N=4096, fp32 and bf16, fwd and fwd+bwd: auto >= 0.95x SDPA, tiled >= 0.8x SDPA
  2a  causal sliding window of 256 keys (window=(255, 0)), N=8192, fwd: tiled >= 20x SDPA given the dense bool
      mask, and >= 2x torch.compile(flex_attention) with its block mask (flex's compile time reported apart)
  2b  the same window at N=4096, fwd+bwd: tiled >= 10x SDPA with the dense mask
  3   causal fwd+bwd N=32768 H=2 D=64 on tiled: peak memory growth < 1 GiB (one fp32 score matrix: 8 GiB)
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results")

# name -> (what, argv after `qkv bench`)
FIGURES = {
    "1": ("causal N=4096, fp32+bf16, fwd+fwdbwd: auto and tiled vs SDPA",
          "--device cpu --seqlens 4096 --batch 1 --heads 8 --head-dim 64 --mask causal --dtype fp32 bf16 "
          "--mode fwd fwdbwd --providers auto tiled sdpa --reps 15"),
    "2a": ("window (255,0) N=8192 fwd: tiled vs SDPA dense mask vs compiled flex",
           "--device cpu --seqlens 8192 --batch 1 --heads 8 --head-dim 64 --mask window:256 --mode fwd "
           "--providers tiled sdpa flex --reps 9 --budget 120"),
    "2b": ("window (255,0) N=4096 fwd+bwd: tiled vs SDPA dense mask",
           "--device cpu --seqlens 4096 --batch 1 --heads 8 --head-dim 64 --mask window:256 --mode fwdbwd "
           "--providers tiled sdpa --reps 9 --budget 120"),
    "3": ("causal fwd+bwd N=32768 H=2 D=64 on tiled: peak memory growth",
          "--device cpu --seqlens 32768 --batch 1 --heads 2 --head-dim 64 --mask causal --mode fwdbwd "
          "--providers tiled --reps 2 --warmup 0 --budget 600"),
}


def command(name: str, out: str = OUT) -> list[str]:
    rel = os.path.relpath(out)
    return ["qkv", "bench", *shlex.split(FIGURES[name][1]), "--json", os.path.join(rel, f"issue2_{name}.json"),
            "--plot", os.path.join(rel, f"issue2_{name}.png")]


def _rows(data, **match):
    return [r for r in data["results"] if all(r.get(k) == v for k, v in match.items())]


def _one(data, **match):
    rs = _rows(data, **match)
    return rs[0] if rs else None


def _ratio(data, fast, slow, **match):
    a, b = _one(data, provider=fast, **match), _one(data, provider=slow, **match)
    if not a or not b or not a.get("median_ms") or not b.get("median_ms"):
        why = [f"{r['provider']}: {r['status']} {r.get('message', '')}".strip() for r in (a, b) if r]
        return None, "; ".join(why) or "missing"
    return b["median_ms"] / a["median_ms"], f"{a['median_ms']:.1f} ms vs {b['median_ms']:.1f} ms"


def judge(name: str, path: str) -> list[tuple[str, bool | None, str]]:
    """(claim, met?, figures) for one figure's JSON."""
    with open(path) as f:
        d = json.load(f)
    out = []
    if name == "1":
        for dt in ("fp32", "bf16"):
            for mode in ("fwd", "fwdbwd"):
                for prov, need in (("auto", 0.95), ("tiled", 0.8)):
                    x, fig = _ratio(d, prov, "sdpa", dtype=dt, mode=mode)
                    out.append((f"{prov} {dt} {mode} >= {need}x SDPA", None if x is None else x >= need,
                                f"{x:.2f}x ({fig})" if x else fig))
    elif name == "2a":
        x, fig = _ratio(d, "tiled", "sdpa")
        out.append(("tiled >= 20x SDPA(dense mask), fwd N=8192", None if x is None else x >= 20,
                    f"{x:.1f}x ({fig})" if x else fig))
        x, fig = _ratio(d, "tiled", "flex")
        fl = _one(d, provider="flex")
        comp = f"; flex compile {fl['compile_s']:.1f} s" if fl and fl.get("compile_s") is not None else ""
        out.append(("tiled >= 2x compiled flex, fwd N=8192", None if x is None else x >= 2,
                    (f"{x:.1f}x ({fig})" if x else fig) + comp))
    elif name == "2b":
        x, fig = _ratio(d, "tiled", "sdpa")
        out.append(("tiled >= 10x SDPA(dense mask), fwd+bwd N=4096", None if x is None else x >= 10,
                    f"{x:.1f}x ({fig})" if x else fig))
    elif name == "3":
        r = _one(d, provider="tiled")
        pk = r.get("peak_bytes") if r else None
        out.append(("tiled fwd+bwd N=32768 H=2 peak growth < 1 GiB", None if pk is None else pk < 2**30,
                    f"{pk / 2**20:.0f} MiB, {r['median_ms'] / 1e3:.1f} s per call" if pk and r.get("median_ms")
                    else (f"{pk / 2**20:.0f} MiB" if pk else f"{r['status']} {r.get('message', '')}" if r
                          else "missing")))
    return out


def machine_line(path: str) -> str:
    with open(path) as f:
        m = json.load(f)["machine"]
    c = m["cpu"]
    return (f"{c['model']}, {c['usable_cores']} cores ({c['torch_threads']} torch threads), "
            f"{(c['memory_bytes'] or 0) / 2**30:.0f} GiB, features {' '.join(c['features']) or '-'}; "
            f"torch {m['versions']['torch']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES))
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--judge", action="store_true", help="do not run, read the JSON files")
    a = ap.parse_args(argv)
    if not a.dry_run:
        os.makedirs(a.out, exist_ok=True)
    for name in a.only:
        cmd = command(name, a.out)
        if a.dry_run:
            print(f"# {name}: {FIGURES[name][0]}\n{shlex.join(cmd)}")
            continue
        if not a.judge:
            print(f"== {name}: {FIGURES[name][0]}\n$ {shlex.join(cmd)}", flush=True)
            r = subprocess.run([sys.executable, "-m", "qkv", *cmd[1:]])
            if r.returncode:
                print(f"   (exit {r.returncode})")
    if a.dry_run:
        return 0
    lines, met_all, machine = [], True, None
    for name in a.only:
        path = os.path.join(a.out, f"issue2_{name}.json")
        if not os.path.exists(path):
            lines.append(f"{name}: no {path}")
            met_all = False
            continue
        machine = machine or machine_line(path)
        for claim, met, fig in judge(name, path):
            met_all &= bool(met)
            lines.append(f"{name:3s} {'MET ' if met else ('n/a ' if met is None else 'MISS')} {claim}: {fig}")
    print("\nissue 2 bar" + (f" on {machine}" if machine else ""))
    print("\n".join(lines))
    with open(os.path.join(a.out, "issue2_bar.txt"), "w") as f:
        f.write(f"machine: {machine}\n" + "\n".join(lines) + "\n")
    return 0 if met_all else 1


if __name__ == "__main__":
    sys.exit(main())
