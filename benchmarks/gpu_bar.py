#!/usr/bin/env python
"""The triton engine's GPU bar in one command: correctness on the GPU, then speed side by side (< 8 minutes).

    PYTHONPATH=src python benchmarks/gpu_bar.py            # on a CUDA machine (H100/H200)
    PYTHONPATH=src python benchmarks/gpu_bar.py --smoke    # CPU, Triton's interpreter, tiny shapes: tests the script

Phases, each given what is left of ``--budget`` (seconds; the most telling first, so that a short budget still
gives the key numbers; a phase that runs out records what it skipped):

1. correctness: the triton engine against the fp64 oracle on the GPU (FlashAttention's rule), forward and
   backward, every mask kind, mods, GQA, odd head dims, decoding;
2. decoding: batch 8, 32 query / 8 kv heads, D = 128, a 32k cache, bf16: triton's split-KV kernel vs each SDPA
   backend, and the bandwidth of a plain copy of the cache (what any decoder is bounded by);
3. window 1024 and 16 causal documents × 1024 at N = 16k (B = 1, H = 16, D = 128): triton vs compiled
   FlexAttention and SDPA (dense masks) with ``qkv bench``, forward and forward+backward, plus the first call
   (block mask + call) in a fresh process with warm compile caches;
4. dense and causal, D = 64 (H = 32) and 128 (H = 16), N = 1k..16k at 16k tokens per batch (B = 16k / N), bf16,
   forward and forward+backward TFLOP/s: triton vs SDPA's flash / cuDNN / efficient backends and compiled Flex.

Writes ``benchmarks/results/gpu_bar_<time>.json`` (every raw figure, the machine) and ``.md`` (the tables and the
verdict of each claim of the bar).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

# Figures the bar compares against (issue: measured on an H200, bf16)
FLEX_REF = {"D128 N16384 none fwd": 432, "D128 N16384 none fwdbwd": 394, "D128 N16384 causal fwd": 410,
            "D128 N16384 causal fwdbwd": 385, "window fwd": 306, "document fwd": 259}
FIRST_CALL_FLEX_REF = {"window": 5.3, "document": 3.7}
DECODE_SDPA_REF_MS = 0.257


class Clock:
    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)


def _sync(dev):
    import torch
    if dev == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ phase 1

def correctness(dev, smoke, clock):
    import torch

    import qkv
    from qkv.testing import compare, make_qkv
    dt = torch.float32 if smoke else torch.bfloat16
    n = 48 if smoke else 300
    ids = torch.arange(n, device=dev) // (n // 3)
    cases = [
        ("dense D64", dict(D=64), {}),
        ("causal D128 GQA", dict(D=128, Hq=4, Hkv=2), dict(causal=True)),
        ("causal Nq<Nk D59", dict(D=59, Nq=n // 2), dict(causal=True)),
        ("window", dict(D=64), dict(window=(33, 7))),
        ("causal+documents", dict(D=128), dict(mask=qkv.masks.and_masks(qkv.masks.causal(), qkv.masks.document(ids)))),
        ("bitmap mask", dict(D=64), dict(mask=lambda b, h, i, j: (i + j) % 3 != 0)),
        ("bias+alibi+softcap", dict(D=64), dict(bias=torch.randn(1, 2, n, n, device=dev).requires_grad_(),
                                               alibi_slopes=torch.rand(2, device=dev), softcap=20.0, causal=True)),
        ("D256 fp16", dict(D=256, dtype=torch.float32 if smoke else torch.float16), dict(causal=True)),
        ("fp32 D128", dict(D=128, dtype=torch.float32), dict(window=(64, 0))),
    ]
    out = []
    for name, shape, kw in cases:
        if clock.left() < 30:
            out.append({"case": name, "status": "skipped (time)"})
            continue
        s = dict(B=2, Hq=2, Hkv=1, Nq=n, Nk=n, D=64, dtype=dt)
        s.update(shape)
        q, k, v = make_qkv(s["B"], s["Hq"], s["Hkv"], s["Nq"], s["Nk"], s["D"], dtype=s["dtype"], device=dev)
        kw = dict(kw)
        bias = kw.pop("bias", None)
        m = kw.get("mask")
        if isinstance(m, qkv.masks.MaskMod):
            kw["oracle_mask"] = m.bind(s["Nq"], s["Nk"])
        t = time.perf_counter()
        try:
            compare("triton", q, k, v, grad=True, bias=bias, **kw)
            out.append({"case": name, "status": "pass", "s": time.perf_counter() - t})
        except Exception as e:
            out.append({"case": name, "status": "FAIL", "message": f"{type(e).__name__}: {e}"[:400]})
    # decoding: few rows, long cache, no gradient -> the split-KV kernel
    q, k, v = make_qkv(2, 8, 2, 1, 16 * n, 128, dtype=dt, device=dev)
    from qkv.core.call import prepare
    from qkv.engines.triton import ENGINE
    try:
        assert ENGINE.decodes(prepare(q, k, v, causal=True))
        with torch.no_grad():
            compare("triton", q, k, v, causal=True)
        out.append({"case": "decode split-KV", "status": "pass"})
    except Exception as e:
        out.append({"case": "decode split-KV", "status": "FAIL", "message": f"{type(e).__name__}: {e}"[:400]})
    return out


# ------------------------------------------------------------------------------------------------ phase 2

def _time(fn, dev, reps=20):
    import torch
    fn()
    _sync(dev)
    ts = []
    for _ in range(reps):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    return ts[len(ts) // 2], ts


def decoding(dev, smoke, clock):
    import torch
    import torch.nn.functional as F

    import qkv
    B, Hq, Hkv, D, N = (2, 4, 2, 32, 256) if smoke else (8, 32, 8, 128, 32768)
    dt = torch.float32 if smoke else torch.bfloat16
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt)
    k = torch.randn(B, Hkv, N, D, device=dev, dtype=dt)
    v = torch.randn(B, Hkv, N, D, device=dev, dtype=dt)
    cache_bytes = 2 * k.numel() * k.element_size()
    res = {"shape": dict(B=B, Hq=Hq, Hkv=Hkv, D=D, cache=N, dtype=str(dt)), "cache_bytes": cache_bytes, "ms": {}}
    with torch.no_grad():
        res["ms"]["triton"], _ = _time(lambda: qkv.attention(q, k, v, causal=True, backend="triton"), dev)
        backends = {}
        if dev == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
        for name, be in backends.items():
            def run(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            try:
                res["ms"][name], _ = _time(run, dev)
            except Exception as e:
                res["ms"][name] = None
                res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:200]
        buf_k, buf_v = torch.empty_like(k), torch.empty_like(v)
        res["ms"]["copy"], _ = _time(lambda: (buf_k.copy_(k), buf_v.copy_(v)), dev)
    res["TB/s read"] = {n: cache_bytes / (ms * 1e-3) / 1e12 for n, ms in res["ms"].items() if ms and n != "copy"}
    res["TB/s read"]["copy (read+write)"] = 2 * cache_bytes / (res["ms"]["copy"] * 1e-3) / 1e12
    sd = [ms for n, ms in res["ms"].items() if n.startswith("sdpa") and ms]
    res["sdpa_best_ms"] = min(sd) if sd else None
    return res


# ------------------------------------------------------------------------------------------------ phases 3, 4

def _bench(dev, seqlens, batch, heads, head_dim, masks, modes, providers, reps, smoke):
    from qkv.tools import bench
    cfg = bench.Config(device=dev, dtypes=["fp32" if smoke else "bf16"], seqlens=seqlens, batch=batch, heads=heads,
                       head_dim=head_dim, masks=masks, modes=modes, providers=providers, reps=reps, warmup=1,
                       budget_s=60.0, memory=False, progress=False, min_sample_s=0.02)
    return bench.run(cfg)


FIRST_CALL = textwrap.dedent('''
    import os, sys, time, json
    sys.path.insert(0, {src!r})
    import torch, qkv
    from qkv.tools.bench.specs import Case
    dev, provider, mask, N, D = {dev!r}, {provider!r}, {mask!r}, {N}, {D}
    case = Case(dev, {dtype!r}, mask, "fwd", 1, {H}, N, D)
    q, k, v, _ = case.inputs(0)
    torch.zeros(1, device=dev); torch.cuda.synchronize() if dev == "cuda" else None
    from qkv.tools.bench.providers import PROVIDERS
    t = time.perf_counter()
    fn, info = PROVIDERS[provider].build(case)
    with torch.no_grad():
        fn(q, k, v)
    torch.cuda.synchronize() if dev == "cuda" else None
    print(json.dumps({{"first_call_s": time.perf_counter() - t, "setup_s": info["setup_s"]}}))
''')


def first_call(dev, provider, mask, N, D, H, smoke):
    """Block mask + first call in a fresh process, run twice: the first fills Triton's/inductor's disk caches,
    the second is the figure (warm caches, cold process)."""
    code = FIRST_CALL.format(src=os.path.join(ROOT, "src"), dev=dev, provider=provider, mask=mask, N=N, D=D, H=H,
                             dtype="fp32" if smoke else "bf16")
    env = dict(os.environ)
    last = None
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:
            return {"status": "error", "message": (r.stderr or r.stdout)[-400:]}
        last = json.loads(r.stdout.strip().splitlines()[-1])
    return dict(last, status="ok")


def _rows(result):
    return [{k: r.get(k) for k in ("provider", "N", "D", "B", "H", "mask", "mode", "status", "median_ms", "tflops",
                                    "first_call_ms", "compile_s", "max_abs_diff", "message")}
            for r in result["results"]]


def masks_16k(dev, smoke, clock):
    N, H, D = (128, 2, 32) if smoke else (16384, 16, 128)
    win = "window:32" if smoke else "window:1024"
    doc = "causal+document:4" if smoke else "causal+document:16"
    provs = ["triton", "sdpa"] if smoke else ["triton", "flex", "sdpa-efficient", "sdpa-cudnn"]
    out = {"rows": [], "first_call": {}}
    for m in (win, doc):
        if clock.left() < 60:
            out["rows"].append({"mask": m, "status": "skipped (time)"})
            continue
        out["rows"] += _rows(_bench(dev, [N], 1, H, D, [m], ["fwd", "fwdbwd"], provs, 3, smoke))
        for p in (["triton"] if smoke else ["triton", "flex"]):
            if clock.left() < 60:
                out["first_call"][f"{p} {m}"] = {"status": "skipped (time)"}
                continue
            out["first_call"][f"{p} {m}"] = first_call(dev, p, m, N, D, H, smoke)
    return out


def sweep(dev, smoke, clock):
    if smoke:
        seqlens, dims, provs = [64, 128], [(16, 2)], ["triton", "sdpa"]
    else:
        seqlens, dims = [1024, 2048, 4096, 8192, 16384], [(128, 16), (64, 32)]
        provs = ["triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex"]
    tokens = 256 if smoke else 16384
    rows = []
    # longest first: the bar's reference figures are at N = 16k
    for D, H in dims:
        for N in sorted(seqlens, reverse=True):
            if clock.left() < 25:
                rows.append({"D": D, "N": N, "status": "skipped (time)"})
                continue
            rows += _rows(_bench(dev, [N], max(1, tokens // N), H, D, ["none", "causal"], ["fwd", "fwdbwd"], provs,
                                 3, smoke))
    return rows


# ------------------------------------------------------------------------------------------------ report

def verdicts(res):
    """The bar's claims, each with the measured figures."""
    out = []
    rows = [r for r in res.get("sweep", []) if r.get("status") == "ok"]
    by = {}
    for r in rows:
        by.setdefault((r["D"], r["N"], r["mask"], r["mode"]), {})[r["provider"]] = r["tflops"]
    for (D, N, mask, mode), t in sorted(by.items()):
        tri, flex = t.get("triton"), t.get("flex")
        if tri is None or flex is None:
            out.append((f"D{D} N{N} {mask} {mode}: triton >= flex", "unmeasured", f"triton {tri}, flex {flex}"))
            continue
        out.append((f"D{D} N{N} {mask} {mode}: triton >= flex", "met" if tri >= flex else "NOT met",
                    f"triton {tri:.0f} vs flex {flex:.0f} TFLOP/s" + "".join(
                        f", {p} {v:.0f}" for p, v in t.items() if p.startswith("sdpa") and v)))
    for r in res.get("masks_16k", {}).get("rows", []):
        if r.get("provider") == "triton" and r.get("status") == "ok":
            flex = next((x for x in res["masks_16k"]["rows"] if x.get("provider") == "flex" and x.get("mask") ==
                         r["mask"] and x.get("mode") == r["mode"] and x.get("status") == "ok"), None)
            f = flex["tflops"] if flex else None
            out.append((f"{r['mask']} N16k {r['mode']}: triton >= flex (useful TFLOP/s)",
                        "unmeasured" if f is None else ("met" if r["tflops"] >= f else "NOT met"),
                        f"triton {r['tflops']:.0f}" + (f" vs flex {f:.0f}" if f else "")))
    for name, fc in res.get("masks_16k", {}).get("first_call", {}).items():
        if name.startswith("triton") and fc.get("status") == "ok":
            out.append((f"first call {name} < 1 s (warm caches)", "met" if fc["first_call_s"] < 1 else "NOT met",
                        f"{fc['first_call_s']:.2f} s"))
    dec = res.get("decoding")
    if dec and dec.get("sdpa_best_ms"):
        out.append(("decoding: triton <= SDPA's best", "met" if dec["ms"]["triton"] <= dec["sdpa_best_ms"] else
                    "NOT met", f"triton {dec['ms']['triton']:.3f} ms vs SDPA {dec['sdpa_best_ms']:.3f} ms; "
                               f"copy {dec['TB/s read']['copy (read+write)']:.2f} TB/s"))
    fails = [c for c in res.get("correctness", []) if c["status"] == "FAIL"]
    out.insert(0, ("correctness on the GPU (FA rule)", "met" if not fails else "NOT met",
                   f"{len(res.get('correctness', [])) - len(fails)} passed, {len(fails)} failed"))
    return out


def markdown(res):
    lines = [f"# triton engine GPU bar — {res['created']}", "", f"Machine: {res['machine'].get('gpus')}", "",
             "| claim | verdict | figures |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in verdicts(res)]
    lines += ["", "## correctness", ""] + [f"- {c['case']}: {c['status']} {c.get('message', '')}"
                                           for c in res.get("correctness", [])]
    if res.get("decoding"):
        d = res["decoding"]
        lines += ["", "## decoding", "", f"shape {d['shape']}", ""] + [
            f"- {n}: {ms if ms is None else round(ms, 4)} ms" for n, ms in d["ms"].items()] + [
            f"- {n}: {v:.2f} TB/s" for n, v in d["TB/s read"].items()]
    lines += ["", "## timings (TFLOP/s, median of 3)", "", "| D | N | mask | mode | provider | ms | TFLOP/s | status |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res.get("sweep", []) + res.get("masks_16k", {}).get("rows", []):
        lines.append(f"| {r.get('D')} | {r.get('N')} | {r.get('mask')} | {r.get('mode')} | {r.get('provider')} | "
                     f"{r.get('median_ms') and round(r['median_ms'], 3)} | {r.get('tflops') and round(r['tflops'], 1)}"
                     f" | {r.get('status')} {r.get('message') or ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all phases (default 450)")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton's interpreter, tiny shapes (tests the script)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--phases", nargs="+", default=["correctness", "decoding", "masks_16k", "sweep"])
    a = ap.parse_args(argv)
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from qkv.tools.info import machine_info
    dev = "cpu" if a.smoke else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("gpu_bar: no CUDA device here (use --smoke to test the script on CPU)", file=sys.stderr)
        return 2
    clock = Clock(a.budget)
    res = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv), "machine": machine_info(),
           "smoke": a.smoke, "budget_s": a.budget}
    phases = {"correctness": correctness, "decoding": decoding, "masks_16k": masks_16k, "sweep": sweep}
    for name in a.phases:
        t = time.perf_counter()
        print(f"[{time.perf_counter() - clock.t0:6.1f} s] {name} ...", flush=True)
        try:
            res[name] = phases[name](dev, a.smoke, clock)
        except Exception as e:
            res[name + "_error"] = f"{type(e).__name__}: {e}"
            print(f"  {name} failed: {e}", flush=True)
            traceback.print_exc(limit=8)
        res.setdefault("phase_s", {})[name] = time.perf_counter() - t
    res["elapsed_s"] = time.perf_counter() - clock.t0
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"gpu_bar{'_smoke' if a.smoke else ''}_{time.strftime('%Y%m%d_%H%M%S')}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))
    for claim, verdict, figs in verdicts(res):
        print(f"{verdict:10s} {claim}: {figs}")
    print(f"wrote {stem}.json, {stem}.md ({res['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
