#!/usr/bin/env python
"""The bar of attn_implementation="qkv" in transformers, side by side in one process, CPU fp32, one layer.

    flock /tmp/qkv-bench.lock python benchmarks/hf_bar.py            # every figure, -> benchmarks/results/hf_bar.json
    python benchmarks/hf_bar.py --only mistral_window --reps 5       # some of them
    python benchmarks/hf_bar.py --threads 1 --out benchmarks/results/hf_bar_1thread.json

Figures (same random weights for both implementations; forward, inference mode; providers alternated each
repetition; the bar reads the median of the per-repetition ratios sdpa/qkv; also reported: their spread
(min-max) and the ratio of the fastest repetitions, the least disturbed by other load on the machine):
  mistral_window  MistralModel, hidden 256, 4 heads x 64 (no GQA), intermediate 512, sliding_window=256,
                  B=1, N=4096: "qkv" >= 3x "sdpa" (sdpa gets transformers' dense sliding-window mask).
  llama_padded    LlamaModel, same sizes, B=4 x N=2048, left padding of 0 / 256 / 512 / 1280 tokens (25% of
                  the batch): "qkv" >= 1.2x "sdpa".
  llama_unpadded  the same batch without padding: "qkv" >= 0.95x "sdpa".
  overhead        (times: median, min, max over single calls, interleaved; the differences are of the minima)
                  one attention call as a model makes it (the integration's attention function with the mask
                  transformers built for "qkv", plan cached, as in every layer after the first) minus the bare
                  qkv.attention call it makes (same tensors, same arguments), B=1 H=4 D=64, N=1 (decoding over
                  512 cached keys) and N=128: <= 50 us. Also reported: the per-forward cost of reading the mask
                  (the first layer's plan), and the same difference for transformers' sdpa function.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "hf_bar.json")

BARS = {"mistral_window": 3.0, "llama_padded": 1.2, "llama_unpadded": 0.95, "overhead_us": 50.0}


def _cpu() -> str:
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        avx512 = " avx512f" in info
    except (OSError, StopIteration):
        avx512 = False
    return f"{name}; AVX-512 {'yes' if avx512 else 'no'}; {torch.get_num_threads()} threads"


def _models(kind: str):
    import transformers

    import qkv.integrations.transformers  # noqa: F401  (registers "qkv")

    common = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=8192,
                  pad_token_id=0)
    if kind == "mistral":
        cfg, cls = transformers.MistralConfig(sliding_window=256, **common), transformers.MistralModel
    else:
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaModel
    torch.manual_seed(0)
    models = {}
    for impl in ("sdpa", "qkv"):
        m = cls._from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
        if models:
            m.load_state_dict(next(iter(models.values())).state_dict())
        models[impl] = m
    return models


def _inputs(B, N, pads=None):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1024, (B, N), generator=g)
    am = torch.ones(B, N, dtype=torch.long)
    for b, p in enumerate(pads or ()):
        am[b, :p] = 0
        ids[b, :p] = 0
    return {"input_ids": ids, "attention_mask": am}


def _side_by_side(models, kw, reps, real=None):
    """Median/min/max seconds per provider (alternated), after one warm-up each; and the max abs difference
    of the outputs at real tokens."""
    times = {k: [] for k in models}
    outs = {}
    with torch.inference_mode():
        for k, m in models.items():
            outs[k] = m(**kw).last_hidden_state
        for _ in range(reps):
            for k, m in models.items():
                t = time.perf_counter()
                m(**kw)
                times[k].append(time.perf_counter() - t)
    a, b = outs["qkv"], outs["sdpa"]
    if real is not None:
        a, b = a[real], b[real]
    stats = {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v)}
             for k, v in times.items()}
    ratios = [s / q for s, q in zip(times["sdpa"], times["qkv"])]
    return stats, {"speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
                   "speedup_max": max(ratios), "speedup_of_fastest": min(times["sdpa"]) / min(times["qkv"]),
                   "max_abs_diff": (a - b).abs().max().item()}


def fig_mistral_window(reps):
    stats, r = _side_by_side(_models("mistral"), _inputs(1, 4096), reps)
    return {"what": "MistralModel 1 layer, hidden 256, 4x64 heads, sliding_window=256, B=1 N=4096, forward",
            "times": stats, **r, "attention_only": _attention_only(reps), "bar": BARS["mistral_window"],
            "met": r["speedup_median"] >= BARS["mistral_window"]}


def _attention_only(reps):
    """The layer's attention call alone: qkv.attention(causal, window=(255, None)) vs SDPA with transformers'
    dense sliding-window mask (building the mask not counted), B=1 H=4 N=4096 D=64."""
    import qkv

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 4096, 64, generator=g) for _ in range(3))
    i = torch.arange(4096)
    dense = ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 256))[None, None]
    fns = {"qkv": lambda: qkv.attention(q, k, v, causal=True, window=(255, None), scale=0.125),
           "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=0.125)}
    times = {n: [] for n in fns}
    with torch.inference_mode():
        for f in fns.values():
            f()
        for _ in range(reps):
            for n, f in fns.items():
                t = time.perf_counter()
                f()
                times[n].append(time.perf_counter() - t)
    out = {n: 1e3 * statistics.median(v) for n, v in times.items()}
    out["speedup_median"] = statistics.median(s / q for s, q in zip(times["sdpa"], times["qkv"]))
    return out


PADS = (0, 256, 512, 1280)


def fig_llama_padded(reps):
    kw = _inputs(4, 2048, PADS)
    stats, r = _side_by_side(_models("llama"), kw, reps, real=kw["attention_mask"].bool())
    return {"what": f"LlamaModel 1 layer, hidden 256, 4x64 heads, B=4 N=2048, left padding {PADS} (25%), forward",
            "times": stats, **r, "bar": BARS["llama_padded"], "met": r["speedup_median"] >= BARS["llama_padded"]}


def fig_llama_unpadded(reps):
    stats, r = _side_by_side(_models("llama"), _inputs(4, 2048), reps)
    return {"what": "LlamaModel 1 layer, hidden 256, 4x64 heads, B=4 N=2048, no padding, forward",
            "times": stats, **r, "bar": BARS["llama_unpadded"],
            "met": r["speedup_median"] >= BARS["llama_unpadded"]}


def _overhead_row(nq, past, reps):
    """One size of the overhead figure: the integration's call (plan cached), its bare qkv.attention call, the
    first layer's (mask request + plan), and transformers' sdpa function vs bare SDPA."""
    import transformers
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_causal_mask

    import qkv
    import qkv.integrations.transformers as qkv_hf

    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=64)
    cfg._attn_implementation = "qkv"
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 1
    nk = nq + past
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 64, generator=g) for n in (nq, nk, nk))
    cache = transformers.DynamicCache(config=cfg)
    if past:
        cache.update(torch.randn(1, 4, past, 64), torch.randn(1, 4, past, 64), 0)
    emb = torch.zeros(1, nq, 256)
    ones = torch.ones(1, nk, dtype=torch.long)

    def make_mask():
        return create_causal_mask(config=cfg, inputs_embeds=emb, attention_mask=ones, cache=cache)

    mask = make_mask()
    qkv_hf.qkv_attention_forward(module, q, k, v, mask, scaling=0.125)       # builds the plan once
    plan = next(iter(mask._qkv_mask.plans.values()))
    fns = {
        "layer": lambda: qkv_hf.qkv_attention_forward(module, q, k, v, mask, scaling=0.125),
        "bare": lambda: qkv.attention(q, k[:, :, :plan.nk], v[:, :, :plan.nk], causal=plan.causal,
                                      window=plan.window, mask=plan.mask, scale=0.125),
        "first_layer": lambda: qkv_hf.qkv_attention_forward(module, q, k, v, make_mask(), scaling=0.125),
        "sdpa_layer": lambda: sdpa_attention_forward(module, q, k, v, None, scaling=0.125, is_causal=True),
        "sdpa_bare": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=nq > 1,
                                                                              scale=0.125),
    }
    # single calls, the providers interleaved call by call, many times: the fastest call of each is the one no
    # other process on the machine disturbed
    ts = {n: [] for n in fns}
    for _ in range(40 * reps):
        for n, f in fns.items():
            t = time.perf_counter()
            f()
            ts[n].append((time.perf_counter() - t) * 1e6)
    res = {n: (statistics.median(v), min(v), max(v)) for n, v in ts.items()}
    return {
        "qkv_layer_us": res["layer"], "qkv_bare_us": res["bare"],
        "overhead_us": res["layer"][1] - res["bare"][1],
        "first_layer_extra_us (mask request + plan, once per forward)": res["first_layer"][1] - res["layer"][1],
        "sdpa_layer_us": res["sdpa_layer"], "sdpa_bare_us": res["sdpa_bare"],
        "sdpa_overhead_us": res["sdpa_layer"][1] - res["sdpa_bare"][1],
        "plan": {"nk": plan.nk, "causal": plan.causal, "window": plan.window, "mask": type(plan.mask).__name__}}


def fig_overhead(reps):
    with torch.inference_mode():
        rows = {name: _overhead_row(nq, past, reps) for name, nq, past in (("decode_1x512", 1, 511),
                                                                          ("prefill_128", 128, 0))}
    worst = max(r["overhead_us"] for r in rows.values())
    return {"what": "per attention call: integration function (plan cached) minus its bare qkv.attention call",
            "rows": rows, "worst_overhead_us": worst, "bar": BARS["overhead_us"], "met": worst <= BARS["overhead_us"]}


FIGURES = {"mistral_window": fig_mistral_window, "llama_padded": fig_llama_padded,
           "llama_unpadded": fig_llama_unpadded, "overhead": fig_overhead}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(FIGURES))
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers

    result = {"cpu": _cpu(), "torch": torch.__version__, "transformers": transformers.__version__, "figures": {}}
    for name in a.only or FIGURES:
        t = time.time()
        fig = FIGURES[name](a.reps)
        fig["wall_s"] = round(time.time() - t, 1)
        result["figures"][name] = fig
        head = (f"{fig['speedup_median']:.2f}x (spread {fig['speedup_min']:.2f}-{fig['speedup_max']:.2f}; "
                f"fastest vs fastest {fig['speedup_of_fastest']:.2f}x)"
                if "speedup_median" in fig else f"worst {fig['worst_overhead_us']:.1f} us")
        print(f"{name:15s} {head}  bar {fig['bar']}  {'met' if fig['met'] else 'NOT met'}", flush=True)
        print(json.dumps({k: v for k, v in fig.items() if k not in ("what",)}, indent=1, default=str), flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"cpu: {result['cpu']}; wrote {os.path.relpath(a.out)}")


if __name__ == "__main__":
    sys.exit(main())
