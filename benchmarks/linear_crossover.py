"""Linear vs exact attention over N on this machine: where the quadratic cost overtakes the linear one.

``python benchmarks/linear_crossover.py`` runs ``qkv bench --kind linear`` (qkv's exact engine through ``auto``,
causal, against linear attention, linear attention with per-token decays and the gated delta rule; B=1 H=8 D=64
fp32, N = 256 … 32768, forward and forward+backward, peak memory), writes
``benchmarks/results/linear_crossover.{json,png}`` and prints, per mode, the first N from which each linear
provider is faster than the exact engine. ``--judge`` re-reads the JSON; ``--dry-run`` prints the command; other
arguments are passed on to ``qkv bench`` (e.g. ``--seqlens 512 2048 --reps 3``). Run it on a quiet machine
(``flock /tmp/qkv-bench.lock python benchmarks/linear_crossover.py``).
"""
from __future__ import annotations

import json
import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
JSON = os.path.join(HERE, "results", "linear_crossover.json")
PNG = os.path.join(HERE, "results", "linear_crossover.png")
ARGS = ["bench", "--kind", "linear", "--seqlens", *[str(256 << i) for i in range(8)], "--mode", "fwd", "fwdbwd",
        "--batch", "1", "--heads", "8", "--head-dim", "64", "--reps", "5", "--budget", "120"]


def crossover(result: dict) -> list[str]:
    """Per (mode, linear provider): the first N from which it is faster than the exact engine, and the speedups."""
    rows = [r for r in result["results"] if r["status"] == "ok"]
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        exact = {r["N"]: r["median_ms"] for r in rows if r["mode"] == mode and r["family"] != "linear"}
        for prov in dict.fromkeys(r["provider"] for r in rows if r["family"] == "linear"):
            mine = {r["N"]: r["median_ms"] for r in rows if r["mode"] == mode and r["provider"] == prov}
            ns = sorted(set(mine) & set(exact))
            faster = [n for n in ns if mine[n] < exact[n] and all(mine[m] < exact[m] for m in ns if m >= n)]
            ratio = ", ".join(f"{n}: {exact[n] / mine[n]:.2g}x" for n in ns)
            where = f"faster from N = {faster[0]}" if faster else "never faster in this range"
            lines.append(f"{mode:6s} {prov:12s} {where}  (exact/linear time: {ratio})")
    return lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--judge" in argv:
        with open(JSON) as f:
            print("\n".join(crossover(json.load(f))))
        return 0
    args = ARGS + argv + ["--json", JSON, "--plot", PNG]
    if "--dry-run" in argv:
        print(shlex.join(["qkv", *[a for a in args if a != "--dry-run"]]))
        return 0
    os.makedirs(os.path.dirname(JSON), exist_ok=True)
    from qkv.tools.cli import main as qkv_main
    rc = qkv_main(args)
    if rc == 0:
        with open(JSON) as f:
            print("\n".join(crossover(json.load(f))))
    return rc


if __name__ == "__main__":
    sys.exit(main())
