"""Sweep the split-KV decoding kernel's launch parameters on the GPU, kernel alone (one prepared run):

PYTHONPATH=src python benchmarks/gpu_decode_sweep.py
"""

import itertools
import time

import torch
import torch.nn.functional as F

from gpu_tune import tm  # (benchmarks/ is the script's directory)
from qkv.engines.triton import launch
from qkv.engines.triton.configs import Config

t0 = time.perf_counter()
B, Hq, Hkv, D, Nk = 8, 32, 8, 128, 32768
q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(B, Hkv, Nk, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn(B, Hkv, Nk, D, device="cuda", dtype=torch.bfloat16)

ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
print(f"sdpa {tm(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), 30):.3f} ms", flush=True)
print(f"default {tm(lambda: launch.decode(q, k, v, scale=D**-0.5), 30):.3f} ms", flush=True)
res = []
for ns, bn, (w, st) in itertools.product((8, 16, 32, 64), (32, 64, 128), ((4, 3), (4, 2), (8, 3))):
    if time.perf_counter() - t0 > 130:
        print("time up")
        break
    cfg = Config(16, bn, w, st)
    try:
        f = lambda: launch.decode(q, k, v, scale=D**-0.5, num_splits=ns, config=cfg)
        out = f()[0]
        err = (out.float() - ref.float()).abs().max().item()
        ms = tm(f, 30)
        res.append((ms, bn, w, st, ns, err))
        print(f"bn {bn:3d} warps {w} stages {st} splits {ns:3d}: {ms:.3f} ms  err {err:.1e}", flush=True)
    except Exception as e:
        print(f"bn {bn} w {w} st {st} ns {ns}: {str(e)[:100]}", flush=True)
res.sort()
print("best:", res[:5])
