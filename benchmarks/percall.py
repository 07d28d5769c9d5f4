"""Per-call cost of qkv.attention against SDPA on a tiny call, side by side in one process.

    python benchmarks/percall.py [--rounds 31] [--calls 2000] [--threads 1]

The default case is the one of the engine-contract bar: B=1 H=8 N=16 D=64, causal, fp32, 1 thread, CPU —
where the call itself costs almost nothing, so the ratio measures qkv's Python (validation and dispatch)
over SDPA's. Providers are alternated round by round; each round times ``--calls`` back-to-back calls. Prints
the median time per call of each, the median of the per-round ratios and its p25–p75 spread — by the wall
clock and by the thread's CPU time (which leaves out the time other processes take the core: on a shared
machine the CPU-time ratio is the steadier one).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import qkv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cases = {
        "causal B=1 H=8 N=16 D=64": (torch.randn(1, 8, 16, 64), {}),
        "decode step Nq=1 Nk=512 (GQA 8/2)": (torch.randn(1, 8, 1, 64), dict(kv=(1, 2, 512, 64))),
    }
    for name, (q, extra) in cases.items():
        k = v = torch.randn(*extra["kv"]) if "kv" in extra else q
        gqa = k.shape[1] != q.shape[1]

        def run_qkv():
            return qkv.attention(q, k, v, causal=True)

        def run_sdpa():
            if gqa:
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        torch.testing.assert_close(run_qkv(), run_sdpa())
        fns = {"qkv": run_qkv, "sdpa": run_sdpa}
        for f in fns.values():
            for _ in range(200):
                f()
        times = {(n, c): [] for n in fns for c in ("wall", "cpu")}
        for r in range(a.rounds):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for n in order:
                f = fns[n]
                t0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(a.calls):
                    f()
                times[n, "cpu"].append((time.thread_time() - c0) / a.calls * 1e6)
                times[n, "wall"].append((time.perf_counter() - t0) / a.calls * 1e6)
        for clock in ("wall", "cpu"):
            ratios = sorted(x / y for x, y in zip(times["qkv", clock], times["sdpa", clock]))
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            print(f"{name} [{clock}]: qkv {statistics.median(times['qkv', clock]):.1f} µs, sdpa "
                  f"{statistics.median(times['sdpa', clock]):.1f} µs per call; qkv/sdpa median "
                  f"{statistics.median(ratios):.3f} (p25-p75 {q1:.3f}-{q3:.3f}, {a.rounds} rounds, {a.threads} thread)")


if __name__ == "__main__":
    main()
