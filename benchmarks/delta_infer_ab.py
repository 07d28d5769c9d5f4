"""A/B of the delta rule's inference forward: this tree's ``qkv.linear.delta_rule`` against the same function from
another git revision (and transformers' ``torch_chunk_gated_delta_rule``), in one process, alternated.

``python benchmarks/delta_infer_ab.py --old main --threads 2``: B=1 H=8 N=4096 D=64 fp32, Qwen3-Next's gates, qk
l2 norm (the bar's row 1 forward). Prints wall-clock medians with p25-p75 in ms (the minimum
and the median process CPU time), the ratios, the load average, and the largest
difference between the two qkv versions and transformers. Run under ``flock /tmp/qkv-bench.lock``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import qkv.linear
from qkv.linear.chunked import delta_rule

HERE = os.path.dirname(os.path.abspath(__file__))


def _old_module(rev: str):
    """qkv.linear.chunked as of git revision ``rev``, loaded beside this tree's (same package, own name)."""
    src = subprocess.run(["git", "-C", HERE, "show", f"{rev}:src/qkv/linear/chunked.py"], check=True,
                         capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "chunked_old.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("qkv.linear._chunked_ab_old", path,
                                                  submodule_search_locations=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "qkv.linear"
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _variant(sets: str):
    """this tree's delta_rule with constants of qkv.linear.chunked set (and restored) around each call"""
    import qkv.linear.chunked as chunked
    pairs = [(n, eval(v)) for n, v in (kv.split("=") for kv in sets.split(",") if kv)]

    def call(*args, **kw):
        saved = [(n, getattr(chunked, n)) for n, _ in pairs]
        for n, v in pairs:
            setattr(chunked, n, v)
        try:
            return delta_rule(*args, **kw)
        finally:
            for n, v in saved:
                setattr(chunked, n, v)
    return call


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="main", help="git revision to compare with (default main)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole comparison this many times")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME:ATTR=VALUE[,ATTR=VALUE]: also time this tree with module constants of "
                         "qkv.linear.chunked changed (e.g. C64:_INFER_CHUNK=64); repeatable")
    ap.add_argument("--shape", default="1,8,8,4096,64,64", help="B,Hk,H,N,D,Dv")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    B, Hk, H, N, D, Dv = (int(x) for x in a.shape.split(","))
    old = _old_module(a.old)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, Hk, D, generator=g)
    k = torch.randn(B, N, Hk, D, generator=g)
    v = torch.randn(B, N, H, Dv, generator=g)
    beta = torch.sigmoid(torch.randn(B, N, H, generator=g))
    gg = -torch.rand(H, generator=g) * 4 * torch.nn.functional.softplus(torch.randn(B, N, H, generator=g) - 4)

    def t(x):
        return x.transpose(1, 2)

    fns = {"old": lambda: old.delta_rule(t(q), t(k), t(v), t(beta), g=t(gg), qk_l2norm=True),
           "new": lambda: delta_rule(t(q), t(k), t(v), t(beta), g=t(gg), qk_l2norm=True)}
    for spec in a.variant:
        name, _, sets = spec.partition(":")
        fns[name] = (lambda f: lambda: f(t(q), t(k), t(v), t(beta), g=t(gg), qk_l2norm=True))(_variant(sets))
    if not a.no_transformers:
        from transformers.models.qwen3_next import modeling_qwen3_next as mq
        fns["transformers"] = lambda: t(mq.torch_chunk_gated_delta_rule(q, k, v, gg, beta,
                                                                         use_qk_l2norm_in_kernel=True)[0])
    with torch.no_grad():
        outs = {n: f() for n, f in fns.items()}
    print(f"{qkv.linear.__name__}: old={a.old} vs this tree, B={B} Hk={Hk} H={H} N={N} D={D} Dv={Dv}, "
          f"{torch.get_num_threads()} threads, max|new-old| {(outs['new'] - outs['old']).abs().max().item():.1e}"
          + (f", max|new-transformers| {(outs['new'] - outs['transformers']).abs().max().item():.1e}"
             if "transformers" in outs else ""))
    names = list(fns)
    for rnd in range(a.rounds):
        la = os.getloadavg()[0]
        times = {n: [] for n in names}
        cpu = {n: [] for n in names}
        with torch.no_grad():
            for f in fns.values():
                f()
            for r in range(a.reps):
                for n in names[r % len(names):] + names[:r % len(names)]:
                    t0, c0 = time.perf_counter(), time.process_time()
                    fns[n]()
                    times[n].append(time.perf_counter() - t0)
                    cpu[n].append(time.process_time() - c0)
        med = {n: statistics.median(ts) for n, ts in times.items()}
        parts = []
        for n, ts in times.items():
            qs = statistics.quantiles(ts, n=4)
            parts.append(f"{n} {med[n] * 1e3:.1f} [{qs[0] * 1e3:.1f}-{qs[2] * 1e3:.1f}] "
                         f"(min {min(ts) * 1e3:.1f}, cpu {statistics.median(cpu[n]) * 1e3:.1f})")
        ratio = f"old/new {med['old'] / med['new']:.2f}x"
        if "transformers" in med:
            ratio += (f", transformers/new {med['transformers'] / med['new']:.2f}x, "
                      f"transformers/old {med['transformers'] / med['old']:.2f}x")
        print(f"round {rnd} (load {la:.1f} -> {os.getloadavg()[0]:.1f}): " + ", ".join(parts) + " ms; " + ratio,
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
