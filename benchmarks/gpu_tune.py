#!/usr/bin/env python
"""One prepared GPU run for the triton engine (H100/H200): the host path, the launch tables, then the bar's figures
with the best tables found, all in one process (< ~8 minutes):

    PYTHONPATH=src python benchmarks/gpu_tune.py --out DIR [--budget 420] [--candidates FILE]

1. decoding without a device-to-host wait: the split-KV kernel's exactness with NaN/inf behind the window on the
   GPU; `qkv.attention` against the launcher alone and against SDPA's backends (batch 8, 32/8 heads, D = 128, 32k
   keys, bf16), the old launch policy (2 programs per SM, 3 stages) beside the new;
2. the host path: `qkv.attention` against the launchers alone (CUDA events over back-to-back calls), small N;
3. launch tables: each candidate configuration (spill-free for sm_90 by ``qkv kernels``' compiler: the
   ``--candidates`` JSON) of the forward, dQ and dK/dV kernels timed alone, no mask and causal, at N = 2k (B = 8)
   and 16k (B = 1), 16k tokens, H·D = 2048, bf16; the best by the geometric mean of its four times;
4. the bar's sweep (D = 128 N = 16k, 1k, 4k, D = 64 N = 16k, 1k, dense/causal, fwd/fwd+bwd: triton, compiled
   Flex, SDPA-cuDNN) with the tables found in 3, as time allows; then window 1024 / 16 documents at 16k.

Writes ``gpu_tune.json`` (every figure) into ``--out`` after each phase.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


DEV = "cuda"
SMOKE = False


def tm(f, reps=10):
    """ms per call: CUDA events over ``reps`` back-to-back calls after one warm call (host path included where
    the host is slower than the device)."""
    import torch
    if SMOKE:
        f()
        t = time.perf_counter()
        f()
        return (time.perf_counter() - t) * 1e3
    f()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        f()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def tm3(f, reps=10):
    """Median of three tm() samples."""
    return sorted(tm(f, reps) for _ in range(3))[1]


# ------------------------------------------------------------------------------------------------ 1. decoding

def decoding():
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import qkv
    from qkv.engines.triton import launch
    from qkv.engines.triton.configs import Config
    from qkv.testing import naive_attention
    res = {}
    W = 100 if SMOKE else 1000
    # exactness: NaN/inf values and keys behind a window must not reach the row; a visible NaN must
    q = torch.randn(2, 8, 1, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 4096 if not SMOKE else 256, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    k[0, 1, 100, 3] = float("nan")
    v[1, 0, 2000 if not SMOKE else 40, 7] = float("inf")
    v[0, 0, 3000 if not SMOKE else 50, 1] = float("nan")
    with torch.no_grad():
        out, lse = qkv.attention(q, k, v, window=(W, 0), backend="triton", return_lse=True)
    ref, rlse = naive_attention(q.cpu(), k.cpu().nan_to_num(0, 0, 0), v.cpu().nan_to_num(0, 0, 0), window=(W, 0))
    res["exact_hidden_max_err"] = float((out.float().cpu() - ref).abs().max())
    res["exact_hidden_finite"] = bool(torch.isfinite(out).all())
    v[0, 0, k.shape[2] - 50, 1] = float("nan")   # seen by batch 0's 4 query heads of kv head 0: column 1
    with torch.no_grad():
        out = qkv.attention(q, k, v, window=(W, 0), backend="triton")
    res["visible_nan_where"] = [int(x) for x in torch.isnan(out).sum((0, 2)).flatten().tolist()][:8]
    res["visible_nan_count"] = int(torch.isnan(out).sum())   # expect 4 (one column of 4 heads)
    print("decode exactness", res, flush=True)

    B, Hq, Hkv, D, N = (2, 4, 2, 32, 512) if SMOKE else (8, 32, 8, 128, 32768)
    q = torch.randn(B, Hq, 1, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, N, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, N, D, device=DEV, dtype=torch.bfloat16)
    ms = {}
    with torch.no_grad():
        ms["qkv.attention triton"] = tm3(lambda: qkv.attention(q, k, v, causal=True, backend="triton"), 30)
        ms["qkv.attention auto"] = tm3(lambda: qkv.attention(q, k, v, causal=True), 30)
        ms["launch.decode (new policy)"] = tm3(lambda: launch.decode(q, k, v, scale=D ** -0.5), 30)
        sms = 4 if SMOKE else torch.cuda.get_device_properties(0).multi_processor_count
        old_splits = max(1, min(-(-2 * sms // (B * Hkv)), -(-N // 256), 128))
        ms["launch.decode (old policy)"] = tm3(lambda: launch.decode(q, k, v, scale=D ** -0.5, num_splits=old_splits,
                                                                    config=Config(16, 64, 4, 3)), 30)
        for name, be in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def run(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            try:
                ms[name] = tm3(run, 30)
            except Exception as e:
                ms[name] = f"{type(e).__name__}"
        bk, bv = torch.empty_like(k), torch.empty_like(v)
        ms["copy"] = tm3(lambda: (bk.copy_(k), bv.copy_(v)), 30)
    res["ms"] = ms
    cache = 2 * k.numel() * k.element_size()
    res["TB/s read"] = {n: cache / (t * 1e-3) / 1e12 for n, t in ms.items() if isinstance(t, float) and n != "copy"}
    print("decode ms", {n: (round(t, 4) if isinstance(t, float) else t) for n, t in ms.items()}, flush=True)
    return res


# ------------------------------------------------------------------------------------------------ 2. host path

def host_path():
    import torch

    import qkv
    from qkv.engines.triton import launch
    res = {}
    for (B, H, N, D) in (((1, 2, 64, 32),) if SMOKE else ((16, 16, 1024, 128), (1, 8, 256, 64))):
        q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
        sc = D ** -0.5
        row = {}
        with torch.no_grad():
            row["fwd qkv.attention"] = tm3(lambda: qkv.attention(q, k, v, causal=True, backend="triton"), 20)
            row["fwd launch.forward"] = tm3(lambda: launch.forward(q, k, v, scale=sc, hi_off=0), 20)
            t = time.perf_counter()
            for _ in range(50):
                qkv.attention(q, k, v, causal=True, backend="triton")
            row["fwd qkv.attention host us (synced per call)"] = (time.perf_counter() - t) / 50 * 1e6
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        do = torch.randn_like(q)

        def fb():
            qg.grad = kg.grad = vg.grad = None
            qkv.attention(qg, kg, vg, causal=True, backend="triton").backward(do)

        def fb_launch():
            out, lse, st = launch.forward(q, k, v, scale=sc, hi_off=0, return_stats=True)
            launch.backward(q, k, v, out, None, do, scale=sc, hi_off=0, stats=st)
        row["fwdbwd qkv.attention"] = tm3(fb, 10)
        row["fwdbwd launchers"] = tm3(fb_launch, 10)
        res[f"B{B} H{H} N{N} D{D} causal"] = row
        print("host path", f"B{B} H{H} N{N} D{D}", {n: round(t, 4) for n, t in row.items()}, flush=True)
    return res


# ------------------------------------------------------------------------------------------------ 3. tables

def tables(cands, clock):
    import torch

    from qkv.engines.triton import launch
    from qkv.engines.triton.configs import Config
    shapes = {128: [(8, 16, 2048), (1, 16, 16384)], 64: [(8, 32, 2048), (1, 32, 16384)]}
    if SMOKE:
        shapes = {128: [(1, 1, 32)], 64: [(1, 1, 32)]}
    res = {"times": [], "best": {}}
    for (kern, D), cfgs in cands.items():
        scores = []
        for cfg in cfgs:
            if clock() < 120:
                res["times"].append({"kernel": kern, "D": D, "cfg": list(cfg), "status": "skipped (time)"})
                continue
            cfg = Config(*cfg)
            ts = []
            try:
                for (B, H, N) in shapes[D]:
                    g = torch.Generator(device=DEV).manual_seed(0)
                    q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=torch.bfloat16, generator=g)
                               for _ in range(3))
                    do = torch.randn_like(q)
                    for causal in (False, True):
                        hi = 0 if causal else None
                        if kern == "fwd":
                            f = lambda: launch.forward(q, k, v, scale=D ** -0.5, hi_off=hi, config=cfg)
                        else:
                            out, _, st = launch.forward(q, k, v, scale=D ** -0.5, hi_off=hi, return_stats=True)
                            kw = {"config_dq" if kern == "bwd_dq" else "config_dkdv": cfg}
                            f = (lambda out=out, st=st, kw=kw:
                                 launch.backward(q, k, v, out, None, do, scale=D ** -0.5, hi_off=hi, stats=st, **kw))
                        ts.append(tm(f, 5 if N > 4096 else 20))
                gm = math.exp(sum(math.log(t) for t in ts) / len(ts))
                scores.append((gm, list(cfg)))
                res["times"].append({"kernel": kern, "D": D, "cfg": list(cfg), "ms": ts, "geomean": gm})
                print(f"{kern:8s} D{D:<3d} {tuple(cfg)}: " + " ".join(f"{t:.3f}" for t in ts) + f"  gm {gm:.3f}",
                      flush=True)
            except Exception as e:
                res["times"].append({"kernel": kern, "D": D, "cfg": list(cfg),
                                     "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"{kern} D{D} {tuple(cfg)}: {type(e).__name__}: {e}"[:300], flush=True)
        if scores:
            scores.sort()
            res["best"][f"{kern} {D}"] = {"cfg": scores[0][1], "geomean": scores[0][0],
                                          "first (table) geomean": next((s for s, c in scores if c == cfgs[0]), None)}
    return res


def apply(best):
    from qkv.engines.triton import configs
    for key, b in best.items():
        kern, D = key.split()
        configs._HALF[90][(kern, int(D), "plain")] = configs.Config(*b["cfg"])


# ------------------------------------------------------------------------------------------------ 4. bar

def bar(clock):
    import gpu_bar
    rows = []
    provs = ["triton", "flex", "sdpa-cudnn"]
    for D, H, N in ((128, 16, 16384), (128, 16, 1024), (64, 32, 16384), (128, 16, 4096), (64, 32, 1024)):
        if clock() < 60:
            rows.append({"D": D, "N": N, "status": "skipped (time)"})
            continue
        rows += gpu_bar._rows(gpu_bar._bench("cuda", [N], max(1, 16384 // N), H, D, ["none", "causal"],
                                             ["fwd", "fwdbwd"], provs, 3, False))
        for r in rows[-12:]:
            print(f"  D{D} N{N} {r['mask']:7s} {r['mode']:7s} {r['provider']:11s} {r.get('tflops') or 0:7.1f} "
                  f"TFLOP/s {r['status']}", flush=True)
    return rows


def masks(clock):
    import gpu_bar
    rows = []
    for m in ("window:1024", "causal+document:16"):
        if clock() < 50:
            break
        rows += gpu_bar._rows(gpu_bar._bench("cuda", [16384], 1, 16, 128, [m], ["fwd", "fwdbwd"], ["triton", "flex"],
                                             3, False))
        for r in rows[-4:]:
            print(f"  {m} {r['mode']:7s} {r['provider']:7s} {r.get('tflops') or 0:7.1f} TFLOP/s {r['status']}",
                  flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--budget", type=float, default=420.0)
    ap.add_argument("--candidates", default=os.path.join(ROOT, "benchmarks", "gpu_tune_candidates.json"))
    ap.add_argument("--smoke", action="store_true", help="CPU tensors in Triton's interpreter: tests the script")
    ap.add_argument("--phases", nargs="+", default=["decoding", "host_path", "tables", "bar", "masks"])
    a = ap.parse_args()
    global DEV, SMOKE
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        DEV, SMOKE = "cpu", True
    t0 = time.perf_counter()
    clock = lambda: a.budget - (time.perf_counter() - t0)
    import torch
    res = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": "cpu" if SMOKE else torch.cuda.get_device_name(0),
           "torch": torch.__version__}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        pass
    cands = {}
    for kern, D, cfg, _regs, spills, _smem, ok in json.load(open(a.candidates)):
        if spills == 0 and ok is True:
            cands.setdefault((kern, D), []).append(cfg)
    os.makedirs(a.out, exist_ok=True)
    for ph in a.phases:
        print(f"[{time.perf_counter() - t0:6.1f} s] {ph}", flush=True)
        try:
            if ph == "decoding":
                res[ph] = decoding()
            elif ph == "host_path":
                res[ph] = host_path()
            elif ph == "tables":
                res[ph] = tables(cands, clock)
                apply(res[ph]["best"])
                print("best", json.dumps(res[ph]["best"]), flush=True)
            elif ph == "bar":
                res[ph] = bar(clock)
            elif ph == "masks":
                res[ph] = masks(clock)
        except Exception as e:
            res[ph + "_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc(limit=6)
        with open(os.path.join(a.out, "gpu_tune.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
