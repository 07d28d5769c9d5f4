"""What the robustness checks cost: the same calls timed on this tree and on another (e.g. main before them).

    flock /tmp/qkv-bench.lock .venv/bin/python benchmarks/robustness_overhead.py /path/to/other/src

Each round runs every case once per tree, in a fresh subprocess per tree, alternating the trees; the table
gives per case the median over rounds of (this tree's time / the other's) and its spread (min..max), and this
tree's median time. Two threads, fp32, B=1, H=8, D=64.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

CASES = {
    "auto causal N=1024 fwd (SDPA)": "dict(causal=True)",
    "auto mask tensor N=2048 fwd (SDPA dense mask)": "dict(mask=M)",
    "auto bias N=1024 fwd (SDPA)": "dict(bias=BIAS)",
    "tiled causal N=2048 fwd (CPU kernel)": "dict(causal=True, backend='tiled')",
    "tiled causal N=2048 fwd+bwd (CPU kernel)": "dict(causal=True, backend='tiled', grad=True)",
    "tiled decode Nq=1 Nk=8192 causal (CPU kernel)": "dict(causal=True, backend='tiled', decode=True)",
    "tiled window 256 N=4096 fwd+bwd, no kernel (band)":
        "dict(window=(255, 0), backend='tiled', grad=True, nokernel=True)",
    "tiled mask tensor N=2048 fwd+bwd (fused tiles)": "dict(mask=M, backend='tiled', grad=True)",
    "tiled score_mod N=1024 fwd+bwd (ops path)": "dict(score_mod=REL, backend='tiled', grad=True)",
}

CHILD = r"""
import json, sys, time, statistics
import torch
import qkv
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
REL = lambda s, b, h, i, j: s + 0.01 * (i - j)
def run(spec):
    spec = dict(spec)
    grad, decode, nokernel = spec.pop("grad", False), spec.pop("decode", False), spec.pop("nokernel", False)
    N = 4096 if "window" in spec else 2048 if ("mask" in spec or spec.get("backend") == "tiled") else 1024
    if "score_mod" in spec:
        N = 1024
    Nq, Nk = (1, 8192) if decode else (N, N)
    q = torch.randn(1, 8, Nq, 64, generator=g).requires_grad_(grad)
    k, v = (torch.randn(1, 8, Nk, 64, generator=g).requires_grad_(grad) for _ in range(2))
    if "mask" in spec:
        spec["mask"] = torch.rand(Nq, Nk, generator=g) > 0.5
    if "bias" in spec:
        spec["bias"] = torch.randn(Nq, Nk, generator=g)
    def call():
        with qkv.options(cpu_kernel=not nokernel):
            out = qkv.attention(q, k, v, **spec)
            if grad:
                out.sum().backward()
    for _ in range(2):
        call()
    ts = []
    for _ in range(7 if not decode else 50):
        t = time.perf_counter(); call(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
REL, M, BIAS = REL, "M", "B"
specs = json.loads(sys.argv[1])
res = {}
for name, src in specs.items():
    spec = eval(src, {"REL": REL, "M": "M", "BIAS": "B"})
    res[name] = run(spec)
print(json.dumps(res))
"""


def run_tree(src: str | None) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv):
    other = argv[0] if argv else None
    if not other:
        raise SystemExit(__doc__)
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    rounds = int(argv[1]) if len(argv) > 1 else 3
    ratios, times = {n: [] for n in CASES}, {n: [] for n in CASES}
    for r in range(rounds):
        a, b = (run_tree(here), run_tree(other)) if r % 2 == 0 else tuple(reversed((run_tree(other), run_tree(here))))
        for n in CASES:
            ratios[n].append(a[n] / b[n])
            times[n].append(a[n])
    print(f"{'case':52s} {'this/other':>10s} {'spread':>13s} {'this (ms)':>10s}")
    for n in CASES:
        rs = ratios[n]
        print(f"{n:52s} {statistics.median(rs):10.3f} {min(rs):6.3f}..{max(rs):5.3f} "
              f"{1e3 * statistics.median(times[n]):10.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
