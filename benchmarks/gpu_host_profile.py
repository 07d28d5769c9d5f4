"""Where the host time of a triton-engine call goes on a CUDA machine (cProfile, 200 calls each):

    PYTHONPATH=src python benchmarks/gpu_host_profile.py
"""
import cProfile
import pstats
import time

import torch

import qkv

dev = "cuda"
q, k, v = (torch.randn(16, 16, 1024, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
qd = torch.randn(8, 32, 1, 128, device=dev, dtype=torch.bfloat16)
kd, vd = (torch.randn(8, 8, 32768, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
do = torch.randn_like(q)


def fwd():
    with torch.no_grad():
        qkv.attention(q, k, v, causal=True, backend="triton")


def dec():
    with torch.no_grad():
        qkv.attention(qd, kd, vd, causal=True, backend="triton")


def fb():
    qkv.attention(qg, kg, vg, causal=True, backend="triton").backward(do)


for name, f, n in (("fwd N1k", fwd, 200), ("decode 32k", dec, 200), ("fwd+bwd N1k", fb, 50)):
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    print(f"== {name}: {(time.perf_counter() - t) / n * 1e6:.0f} us per call (wall, back to back)", flush=True)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)
