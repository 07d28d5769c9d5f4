"""qkv.linear on a CUDA GPU: the Triton kernels against the torch-ops chunked engine and transformers' torch fallback
(one short run, under ~2 minutes on an H200; needs only torch, triton, transformers and qkv):

    PYTHONPATH=src python benchmarks/gpu_linear.py [--quick]

1. Correctness on CUDA: backend="triton" against backend="torch" (fp32 and bf16 inputs; the gated delta rule with
   l2-normalised q/k, GQA and an initial state; linear attention with per-token decays and with the normaliser):
   outputs, final states and gradients (the triton path's backward is the torch engine's, recomputed).
2. Timing, gated delta rule (Gated DeltaNet / Qwen3-Next: per-token log-decays, qk_l2norm), bf16 inputs, H=16,
   D=Dv=128, B in {1, 8}, N in {4096, 16384}: forward (no autograd) and forward+backward of qkv triton, qkv torch
   (chunked) and transformers' ``torch_chunk_gated_delta_rule``; medians of CUDA-event timings; then linear attention
   with per-token decays (triton vs torch). Prints a table and writes benchmarks/results/gpu_linear_<gpu>.json.

The first triton call's time (JIT compile of the kernels, Triton's disk cache cold or warm) is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from qkv.linear import delta_rule, linear_attention

T0 = time.perf_counter()
DEADLINE = 105.0            # seconds: cells after this are skipped (the whole run stays under ~2 minutes)
DEV = "cuda"


def _sync():
    torch.cuda.synchronize()


def timed(f, budget=0.6, most=10):
    """Median and spread (min, max) in ms of f() over reps after one warm-up, up to ``most`` reps or ``budget``
    seconds (at least 2)."""
    f()
    _sync()
    ts = []
    start = time.perf_counter()
    while len(ts) < most and (len(ts) < 2 or time.perf_counter() - start < budget):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts), min(ts), max(ts)


def inputs(B, Hk, H, N, D, Dv, dtype, grad=False, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Hk, N, D, device=DEV, dtype=dtype, generator=g)
    k = torch.randn(B, Hk, N, D, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(B, H, N, Dv, device=DEV, dtype=dtype, generator=g)
    beta = torch.rand(B, H, N, device=DEV, dtype=dtype, generator=g)
    lg = torch.nn.functional.logsigmoid(torch.randn(B, H, N, device=DEV, generator=g) + 4).to(dtype)
    ts = [q, k, v, beta, lg]
    if grad:
        ts = [t.requires_grad_() for t in ts]
    return ts


# --------------------------------------------------------------------------------------------- correctness

def _grads(fn, ts, seed=5):
    leaves = [t.detach().clone().requires_grad_() for t in ts]
    o, S = fn(*leaves)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    go = torch.randn(o.shape, device=DEV, generator=gen).to(o.dtype)
    gs = torch.randn(S.shape, device=DEV, generator=gen)
    ((o.float() * go.float()).sum() + (S * gs).sum()).backward()
    return [o.detach(), S.detach()] + [t.grad for t in leaves]


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def correctness():
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, beta, lg = inputs(2, 2, 4, 1000, 128, 128, dtype, seed=1)
        s0 = 0.1 * torch.randn(2, 4, q.shape[-1], v.shape[-1], device=DEV)
        names = ["o", "state", "dq", "dk", "dv", "dbeta", "dg", "ds0"]
        cases = {
            "delta_rule(g, l2norm, GQA, state)": (
                lambda be: lambda q, k, v, b, g, s: delta_rule(q, k, v, b, g=g, qk_l2norm=True, initial_state=s,
                                                               return_state=True, backend=be),
                [q, k, v, beta, lg, s0], names),
            "linear_attention(decay, elu1)": (
                lambda be: lambda q, k, v, g: linear_attention(q, k, v, decay=g.float(), return_state=True,
                                                               backend=be),
                [q, k, v, lg], ["o", "state", "dq", "dk", "dv", "ddecay"]),
            "linear_attention(normalize)": (
                lambda be: lambda q, k, v: linear_attention(q, k, v, return_state=True, backend=be),
                [q, k, v], ["o", "state", "dq", "dk", "dv"]),
        }
        for name, (mk, ts, nm) in cases.items():
            a = _grads(mk("triton"), ts)
            b = _grads(mk("torch"), ts)
            errs = {n: _rel(x, y) for n, x, y in zip(nm, a, b)}
            tol = 2e-4 if dtype == torch.float32 else 3e-2
            ok = all(e < tol for e in errs.values())
            rows.append({"case": name, "dtype": str(dtype).replace("torch.", ""), "max_rel_err": errs, "ok": ok})
            print(f"  {name:36s} {rows[-1]['dtype']:9s} {'ok ' if ok else 'BAD'} "
                  + " ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
    return rows


def sweep():
    """Forward only, triton vs torch: other head dims, dtypes, chunk sizes, N = 1 (each a new JIT specialisation)."""
    rows = []
    for D, dtype, N, chunk, gated in [(64, torch.float16, 777, 64, True), (256, torch.bfloat16, 777, 64, True),
                                      (256, torch.float32, 300, 64, True), (128, torch.float32, 777, 64, False),
                                      (128, torch.bfloat16, 1, 64, True), (128, torch.bfloat16, 777, 16, True),
                                      (100, torch.bfloat16, 500, 32, False)]:
        q, k, v, beta, lg = inputs(2, 1, 4, N, D, D, dtype, seed=3)
        g = lg if gated else None
        errs = {}
        for name, f in {
            "delta": lambda be: delta_rule(q, k, v, beta, g=g, qk_l2norm=True, chunk_size=chunk, return_state=True,
                                           backend=be),
            "linear": lambda be: linear_attention(q, k, v, decay=g.float() if gated else torch.full((4,), 0.95,
                                                  device=DEV), feature_map="relu", chunk_size=chunk,
                                                  return_state=True, backend=be),
        }.items():
            (oa, sa), (ob, sb) = f("triton"), f("torch")
            errs[name] = (_rel(oa, ob), _rel(sa, sb))
        tol = 2e-4 if dtype == torch.float32 else 3e-2
        ok = all(e < tol for pair in errs.values() for e in pair)
        rows.append({"D": D, "dtype": str(dtype), "N": N, "chunk": chunk, "gated": gated, "errs": errs, "ok": ok})
        print(f"  D={D:3d} {str(dtype):15s} N={N:4d} chunk={chunk:2d} gated={gated!s:5s} {'ok ' if ok else 'BAD'} "
              + " ".join(f"{n} o {a:.1e} S {b:.1e}" for n, (a, b) in errs.items()), flush=True)
    return rows


# --------------------------------------------------------------------------------------------- timing

def _hf():
    try:
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule
        return torch_chunk_gated_delta_rule
    except Exception as e:          # an older transformers: the column is left out
        print(f"transformers' torch_chunk_gated_delta_rule unavailable: {e}")
        return None


def timing(sizes, hf):
    rows = []
    H, D = 16, 128
    for B, N in sizes:
        for mode in ("fwd", "fwd+bwd"):
            if time.perf_counter() - T0 > DEADLINE:
                print(f"  B={B} N={N} {mode}: skipped (time budget)")
                continue
            grad = mode == "fwd+bwd"
            try:
                q, k, v, beta, lg = inputs(B, H, H, N, D, D, torch.bfloat16, grad=grad)
            except torch.OutOfMemoryError:
                print(f"  B={B} N={N}: out of memory for the inputs")
                continue
            go = torch.randn(B, H, N, D, device=DEV, dtype=torch.bfloat16)
            tr = [t.detach().transpose(1, 2).contiguous().requires_grad_(grad) for t in (q, k, v)]
            tb, tg = (t.detach().transpose(1, 2).contiguous().requires_grad_(grad) for t in (beta, lg))

            def qkv_run(be):
                def f():
                    with torch.set_grad_enabled(grad):
                        o = delta_rule(q, k, v, beta, g=lg, qk_l2norm=True, backend=be)
                    if grad:
                        o.backward(go)
                return f

            def hf_run():
                gor = go.transpose(1, 2)

                def f():
                    with torch.set_grad_enabled(grad):
                        o, _ = hf(tr[0], tr[1], tr[2], g=tg, beta=tb, use_qk_l2norm_in_kernel=True)
                    if grad:
                        o.backward(gor)
                return f

            provs = {"qkv triton": qkv_run("triton"), "qkv torch": qkv_run("torch")}
            if hf is not None:
                provs["transformers"] = hf_run()
            res = {}
            for name, f in provs.items():
                if time.perf_counter() - T0 > DEADLINE + 10:
                    break
                try:
                    res[name] = timed(f)
                except torch.OutOfMemoryError:
                    res[name] = None
                    torch.cuda.empty_cache()
                for t in (q, k, v, beta, lg, *tr, tb, tg):
                    t.grad = None
            base = res.get("qkv triton")
            line = f"  B={B} N={N:6d} {mode:8s}"
            for name, r in res.items():
                if r is None:
                    line += f" | {name} OOM"
                    continue
                ratio = f" ({r[0] / base[0]:.1f}x)" if base and name != "qkv triton" else ""
                line += f" | {name} {r[0]:8.2f} ms{ratio}"
            print(line, flush=True)
            rows.append({"kind": "gated_delta_rule", "B": B, "H": H, "N": N, "D": D, "dtype": "bfloat16",
                         "mode": mode, "ms": {n: (None if r is None else {"median": r[0], "min": r[1], "max": r[2]})
                                               for n, r in res.items()}})
            torch.cuda.empty_cache()
    return rows


def timing_linear(sizes):
    rows = []
    H, D = 16, 128
    for B, N in sizes:
        for mode in ("fwd", "fwd+bwd"):
            if time.perf_counter() - T0 > DEADLINE:
                print(f"  linear B={B} N={N} {mode}: skipped (time budget)")
                continue
            grad = mode == "fwd+bwd"
            q, k, v, _, lg = inputs(B, H, H, N, D, D, torch.bfloat16, grad=grad)
            dec = lg.detach().float().requires_grad_(grad)
            go = torch.randn(B, H, N, D, device=DEV, dtype=torch.bfloat16)
            res = {}
            for be in ("triton", "torch"):
                def f(be=be):
                    with torch.set_grad_enabled(grad):
                        o = linear_attention(q, k, v, decay=dec, feature_map="identity", backend=be)
                    if grad:
                        o.backward(go)
                res["qkv " + be] = timed(f)
            r0 = res["qkv triton"][0]
            print(f"  linear(decay) B={B} N={N:6d} {mode:8s} | qkv triton {r0:8.2f} ms | qkv torch "
                  f"{res['qkv torch'][0]:8.2f} ms ({res['qkv torch'][0] / r0:.1f}x)", flush=True)
            rows.append({"kind": "linear_attention_decay", "B": B, "H": H, "N": N, "D": D, "dtype": "bfloat16",
                         "mode": mode, "ms": {n: {"median": r[0], "min": r[1], "max": r[2]} for n, r in res.items()}})
            torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one small size only")
    ap.add_argument("--sweep", action="store_true", help="also check more head dims, dtypes and chunk sizes (JIT)")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}", flush=True)
    import triton
    print(f"triton {triton.__version__}", flush=True)

    # first call: the JIT compiles the three delta-rule kernels (bf16)
    q, k, v, beta, lg = inputs(1, 2, 2, 256, 128, 128, torch.bfloat16)
    t = time.perf_counter()
    delta_rule(q, k, v, beta, g=lg, qk_l2norm=True, backend="triton")
    _sync()
    first = time.perf_counter() - t
    t = time.perf_counter()
    linear_attention(q, k, v, decay=lg.float(), backend="triton")
    _sync()
    first_lin = time.perf_counter() - t
    print(f"first call (JIT): delta_rule {first:.2f} s, linear_attention {first_lin:.2f} s", flush=True)

    print("correctness: triton vs torch chunked on CUDA (max |diff| / max |torch|)", flush=True)
    corr = correctness()
    if a.sweep:
        corr += sweep()
    sizes = [(1, 4096)] if a.quick else [(1, 4096), (1, 16384), (8, 4096), (8, 16384)]
    print("timing: gated delta rule, bf16, H=16, D=Dv=128 (median ms; ratio = time / qkv triton)", flush=True)
    rows = timing(sizes, _hf())
    print("timing: linear attention with per-token decays, bf16, H=16, D=Dv=128", flush=True)
    rows += timing_linear(sizes[:1] + sizes[-1:] if len(sizes) > 1 else sizes)
    out = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "first_call_s":
           {"delta_rule": first, "linear_attention": first_lin}, "correctness": corr, "timing": rows,
           "wall_s": time.perf_counter() - T0}
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    tag = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
    path = os.path.join(os.path.dirname(__file__), "results", f"gpu_linear_{tag}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path} ({time.perf_counter() - T0:.0f} s)", flush=True)
    if not all(r["ok"] for r in corr):
        raise SystemExit("correctness: some case differs from the torch engine (see above)")


if __name__ == "__main__":
    main()
