"""Extra GPU checks: the tiled, auto and triton engines on CUDA against the fp64 oracle (forward and backward),
and the linear family on CUDA against its recurrent definition.

    PYTHONPATH=src python benchmarks/gpu_extra.py      # on a CUDA machine
"""

import traceback

import torch

import qkv
from qkv.linear import delta_rule, linear_attention, recurrent_delta_rule, recurrent_linear_attention
from qkv.testing import compare, make_qkv

dev = "cuda"
n = 300
ids = torch.arange(n, device=dev) // 100
cases = [
    ("dense", {}),
    ("causal", dict(causal=True)),
    ("window", dict(window=(33, 7))),
    ("doc mask", dict(mask=qkv.masks.and_masks(qkv.masks.causal(), qkv.masks.document(ids)))),
    ("softcap+alibi", dict(causal=True, softcap=20.0, alibi_slopes=torch.rand(2, device=dev))),
]
for be in ("tiled", "auto", "triton"):
    for name, kw in cases:
        for dt in (torch.bfloat16, torch.float32):
            q, k, v = make_qkv(2, 2, 1, n, n, 64, dtype=dt, device=dev)
            kw2 = dict(kw)
            m = kw2.get("mask")
            if isinstance(m, qkv.masks.MaskMod):
                kw2["oracle_mask"] = m.bind(n, n)
            try:
                compare(be, q, k, v, grad=True, **kw2)
                r = "pass"
            except Exception as e:
                r = f"FAIL {type(e).__name__}: {str(e)[:300]}"
            sel = qkv.select_backend(q, k, v, **kw).name if be == "auto" else ""
            print(f"{be:7s} {name:14s} {str(dt):15s} {r} {sel}", flush=True)
# linear family on CUDA against the recurrent oracle in fp64

g = torch.Generator(device=dev).manual_seed(0)
B, H, N, D = 1, 2, 200, 32
q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.float64, generator=g) for _ in range(3))
beta = torch.rand(B, H, N, device=dev, dtype=torch.float64, generator=g)
gl = -torch.rand(B, H, N, device=dev, dtype=torch.float64, generator=g) * 0.1
for name, a, b in [
    (
        "delta_rule",
        lambda: delta_rule(q, k, v, beta, g=gl, qk_l2norm=True),
        lambda: recurrent_delta_rule(q, k, v, beta, g=gl, qk_l2norm=True),
    ),
    (
        "linear_attention",
        lambda: linear_attention(q, k, v, decay=gl, feature_map="identity", scale=1.0),
        lambda: recurrent_linear_attention(q, k, v, decay=gl, feature_map="identity", scale=1.0),
    ),
]:
    try:
        e = (a() - b()).abs().max().item()
        print(f"linear {name}: max |chunked - recurrent| fp64 on cuda = {e:.2e}", "pass" if e < 1e-9 else "FAIL")
    except Exception:
        traceback.print_exc(limit=5)
