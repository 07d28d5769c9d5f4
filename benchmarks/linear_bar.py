"""The linear-attention family's speed bar, one command: ``python benchmarks/linear_bar.py``.

1. Qwen3-Next's gated delta rule: qkv.linear.delta_rule against transformers' own torch fallback
   (``torch_chunk_gated_delta_rule``), N = 4096, in one process, providers alternated, forward and
   forward+backward; at B=1 H=8 D=64 and at Qwen3-Next-80B's linear-attention heads (16 key heads, 32 value heads,
   D = Dv = 128). Goal: qkv ≥ 3× faster.
2. Linear cost: causal forward at N = 8192 and 32768 (B=1 H=8 D=64) of linear attention (elu+1, normalised),
   linear attention with per-token decays (Mamba-2 SSD form) and the gated delta rule. Goal: ≤ 5× the time for 4×
   the tokens.
3. At N = 32768, causal forward: each of them against qkv's exact engine (``qkv.attention(causal=True)``).
   Goal: ≥ 10× faster.

Writes ``benchmarks/results/linear_bar.json`` (every sample) and ``linear_bar.txt`` (the verdicts; ``--name`` changes
the stem). Run on a quiet
machine (``flock /tmp/qkv-bench.lock python benchmarks/linear_bar.py``): CPU timings move with any other load.
``--threads N`` sets torch's threads (default: torch's own), ``--quick`` shrinks the repetitions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

import qkv
from qkv.linear import delta_rule, linear_attention

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results")


def _cpu() -> str:
    model, avx512 = platform.processor() or "?", False
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        for line in txt.splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        avx512 = "avx512f" in txt
    except OSError:
        pass
    return f"{model}{', AVX-512' if avx512 else ''}"


def side_by_side(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Median/p25/p75 seconds of each callable, timed in rounds with the order rotated each round."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    out = {}
    for n, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[n] = {"median_s": statistics.median(ts), "p25_s": q[0], "p75_s": q[2], "samples_s": ts}
    return out


# ---- 1: Qwen3-Next's gated delta rule vs transformers' fallback -------------------------------------------------
def delta_vs_transformers(B, Hk, Hv, N, D, Dv, mode, reps):
    from transformers.models.qwen3_next import modeling_qwen3_next as mq
    from transformers.utils import logging
    logging.set_verbosity_error()
    g = torch.Generator().manual_seed(0)
    need = mode == "fwdbwd"
    q = torch.randn(B, N, Hk, D, generator=g).requires_grad_(need)
    k = torch.randn(B, N, Hk, D, generator=g).requires_grad_(need)
    v = torch.randn(B, N, Hv, Dv, generator=g).requires_grad_(need)
    # Qwen3-Next's own gates: beta = sigmoid(b), g = -exp(A_log)·softplus(a + dt_bias)
    beta = torch.sigmoid(torch.randn(B, N, Hv, generator=g)).requires_grad_(need)
    gg = (-torch.rand(Hv, generator=g) * 4 * torch.nn.functional.softplus(torch.randn(B, N, Hv, generator=g) - 4)
          ).requires_grad_(need)
    do = torch.randn(B, N, Hv, Dv, generator=g)

    def t(x):
        return x.transpose(1, 2)

    def run(fn):
        def call():
            o = fn()
            if need:
                o.backward(do)
                for x in (q, k, v, beta, gg):
                    x.grad = None
        return call

    fns = {"transformers": run(lambda: mq.torch_chunk_gated_delta_rule(q, k, v, gg, beta,
                                                                       use_qk_l2norm_in_kernel=True)[0]),
           "qkv": run(lambda: t(delta_rule(t(q), t(k), t(v), t(beta), g=t(gg), qk_l2norm=True)))}
    # agreement of the two (fp32), once
    with torch.no_grad():
        diff = (mq.torch_chunk_gated_delta_rule(q, k, v, gg, beta, use_qk_l2norm_in_kernel=True)[0]
                - t(delta_rule(t(q), t(k), t(v), t(beta), g=t(gg), qk_l2norm=True))).abs().max().item()
    res = side_by_side(fns, reps)
    return {"B": B, "Hk": Hk, "Hv": Hv, "N": N, "D": D, "Dv": Dv, "mode": mode, "max_abs_diff": diff,
            "timings": res, "speedup": res["transformers"]["median_s"] / res["qkv"]["median_s"]}


# ---- 2, 3: linear cost and the exact engine ---------------------------------------------------------------------
def _providers(B, H, N, D):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    decay = -0.1 * torch.rand(B, H, N, generator=g)
    beta = torch.rand(B, H, N, generator=g)
    return {"linear": lambda: linear_attention(q, k, v),
            "linear-decay": lambda: linear_attention(q, k, v, decay=decay),
            "deltanet": lambda: delta_rule(q, k, v, beta, g=decay, qk_l2norm=True),
            "exact": lambda: qkv.attention(q, k, v, causal=True)}


def scaling(B, H, D, reps):
    rows = {}
    with torch.no_grad():
        for N in (8192, 32768):
            fns = _providers(B, H, N, D)
            if N != 32768:
                fns.pop("exact")
            rows[N] = side_by_side(fns, reps if N != 32768 else max(2, reps // 2))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, not the figures)")
    ap.add_argument("--name", default="linear_bar", help="results file stem (default linear_bar)")
    ap.add_argument("--skip-qwen-shape-fwdbwd", action="store_true",
                    help="skip transformers' fallback fwd+bwd at Qwen3-Next's heads (~1 min per call on 2 cores)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    reps = 3 if a.quick else 9
    os.makedirs(OUT, exist_ok=True)
    meta = {"cpu": _cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg_start": os.getloadavg(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["python"] + sys.argv)}
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    lines = [f"qkv.linear bar on {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, load average "
             f"{meta['loadavg_start'][0]:.1f} at the start"]
    result = {"meta": meta, "delta": [], "scaling": None}

    # 1
    for shape in ((1, 8, 8, 4096, 64, 64), (1, 16, 32, 4096, 128, 128)):
        for mode in ("fwd", "fwdbwd"):
            if mode == "fwdbwd" and shape[1] == 16 and a.skip_qwen_shape_fwdbwd:
                continue
            r = delta_vs_transformers(*shape, mode, reps if shape[1] == 8 else 3)
            result["delta"].append(r)
            tt, tq = r["timings"]["transformers"], r["timings"]["qkv"]
            lines.append(f"1. gated delta rule B={shape[0]} Hk={shape[1]} Hv={shape[2]} N={shape[3]} D={shape[4]} "
                         f"{mode:6s}: transformers {tt['median_s'] * 1e3:8.1f} ms "
                         f"[{tt['p25_s'] * 1e3:.0f}-{tt['p75_s'] * 1e3:.0f}], qkv {tq['median_s'] * 1e3:7.1f} ms "
                         f"[{tq['p25_s'] * 1e3:.0f}-{tq['p75_s'] * 1e3:.0f}]: {r['speedup']:.2f}x "
                         f"(goal >= 3x: {'met' if r['speedup'] >= 3 else 'NOT met'}; |diff| {r['max_abs_diff']:.1e})")
            print(lines[-1], flush=True)

    # 2, 3
    sc = scaling(1, 8, 64, reps)
    result["scaling"] = {str(n): v for n, v in sc.items()}
    for name in ("linear", "linear-decay", "deltanet"):
        t8, t32 = sc[8192][name]["median_s"], sc[32768][name]["median_s"]
        lines.append(f"2. {name:12s} causal fwd B=1 H=8 D=64: N=8192 {t8 * 1e3:7.1f} ms, N=32768 {t32 * 1e3:7.1f} ms:"
                     f" {t32 / t8:.2f}x for 4x the tokens (goal <= 5x: {'met' if t32 / t8 <= 5 else 'NOT met'})")
        print(lines[-1], flush=True)
    te = sc[32768]["exact"]["median_s"]
    for name in ("linear", "linear-decay", "deltanet"):
        t32 = sc[32768][name]["median_s"]
        lines.append(f"3. N=32768 causal fwd: exact (qkv.attention) {te * 1e3:.0f} ms vs {name} {t32 * 1e3:.0f} ms: "
                     f"{te / t32:.1f}x (goal >= 10x: {'met' if te / t32 >= 10 else 'NOT met'})")
        print(lines[-1], flush=True)
    meta["loadavg_end"] = os.getloadavg()
    with open(os.path.join(OUT, f"{a.name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(OUT, f"{a.name}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(OUT, a.name)}.json and .txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
