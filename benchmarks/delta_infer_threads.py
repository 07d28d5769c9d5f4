"""CPU time per thread of the delta rule's inference forward: ``python benchmarks/delta_infer_threads.py --threads 2``.

B=1 H=8 N=4096 D=64 fp32 (the bar's row 1 forward), 30 calls; prints the wall-clock and process CPU time per call
and each thread's user/system CPU per call (from ``/proc/self/task``, Linux only). On a loaded machine the wall
clock says little, but the CPU per thread does: with torch's OpenMP threads it shows the time the threads spend
waiting at the barrier after each op (spinning, so counted as CPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from qkv.linear import delta_rule


def _ticks() -> dict:
    out = {}
    for t in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{t}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        out[t] = (int(st[11]), int(st[12]))                          # utime, stime in clock ticks
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=30)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    B, H, N, D = 1, 8, 4096, 64
    q, k, v = (torch.randn(B, N, H, D, generator=g).transpose(1, 2) for _ in range(3))
    beta = torch.sigmoid(torch.randn(B, H, N, generator=g))
    gg = -torch.rand(H, 1, generator=g) * 4 * torch.nn.functional.softplus(torch.randn(B, H, N, generator=g) - 4)
    tick = os.sysconf("SC_CLK_TCK")
    with torch.no_grad():
        for _ in range(3):
            delta_rule(q, k, v, beta, g=gg, qk_l2norm=True)
        t0, c0, before = time.perf_counter(), time.process_time(), _ticks()
        for _ in range(a.calls):
            delta_rule(q, k, v, beta, g=gg, qk_l2norm=True)
        wall, cpu, after = time.perf_counter() - t0, time.process_time() - c0, _ticks()
    print(f"{a.threads} threads, load {os.getloadavg()[0]:.1f}: "
          f"wall {wall / a.calls * 1e3:.1f} ms, process CPU {cpu / a.calls * 1e3:.1f} ms per call")
    for t, (u, s) in after.items():
        u0, s0 = before.get(t, (0, 0))
        if u - u0 + s - s0:
            print(f"  thread {t}: user {(u - u0) / tick / a.calls * 1e3:.1f} ms, "
                  f"system {(s - s0) / tick / a.calls * 1e3:.1f} ms per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
