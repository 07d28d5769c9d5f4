"""Peak memory of the engines that check a memory budget (reference, sdpa) against what they declare.

Each point runs in a fresh subprocess: inputs are allocated, the peak RSS is reset (/proc/self/clear_refs),
the call (and its backward) runs, and the peak above the inputs is compared with the engine's declared bound
(``qkv.engines.reference.peak_bytes``, ``qkv.engines.sdpa.peak_bytes``). Linux only.

    .venv/bin/python benchmarks/robustness_memory.py            # the table of benchmarks/NOTES.md
    .venv/bin/python benchmarks/robustness_memory.py --quick    # two points
"""
from __future__ import annotations

import json
import subprocess
import sys

POINTS = [  # engine, N, H, dtype, features, backward
    ("reference", 2048, 4, "float32", "none", False),
    ("reference", 2048, 4, "float32", "none", True),
    ("reference", 2048, 4, "float32", "mask_mod", False),
    ("reference", 2048, 4, "float32", "mask_mod", True),
    ("reference", 2048, 4, "float32", "dropout+mask_mod", True),
    ("reference", 2048, 4, "float16", "alibi+bias+score_mod+softcap", True),
    ("reference", 2048, 4, "float32", "bias+score_mod+softcap", True),
    ("reference", 1536, 4, "float64", "mask_mod", True),
    ("reference", 2048, 4, "bfloat16", "mask_mod", True),
    ("sdpa", 4096, 4, "float32", "mask_mod", False),
    ("sdpa", 4096, 4, "float32", "mask_mod", True),
    ("sdpa", 4096, 4, "bfloat16", "bool", True),
    ("sdpa", 4096, 4, "float32", "bias+bool", True),
    ("auto", 4096, 4, "float32", "mask_mod", False),
]

CHILD = r"""
import json, sys, gc, torch
import qkv
from qkv.core.call import prepare
from qkv.engines import reference, sdpa
engine, N, H, dtype, feat, bwd = json.loads(sys.argv[1])
torch.set_num_threads(2)
dt = getattr(torch, dtype)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, H, N, 64, generator=g).to(dt).requires_grad_(bwd) for _ in range(3))
kw = {}
if "mask_mod" in feat:
    kw["mask"] = lambda b, h, i, j: (i - j) % 3 != 1          # dense; int64 temporaries
if "bool" in feat:
    kw["mask"] = torch.rand(N, N, generator=g) > 0.1
if "bias" in feat:
    kw["bias"] = torch.randn(N, N, generator=g).to(dt)
if "score_mod" in feat:
    kw["score_mod"] = lambda s, b, h, i, j: s + 0.01 * (i - j)
if "dropout" in feat:
    kw["dropout_p"] = 0.1
if "alibi" in feat:
    kw["alibi_slopes"] = torch.rand(H, generator=g)
if "softcap" in feat:
    kw["softcap"] = 30.0
call = prepare(q, k, v, **kw)
declared = {"reference": reference.peak_bytes, "sdpa": sdpa.peak_bytes}.get(engine, sdpa.peak_bytes)(call)
def rss():
    d = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "VmHWM:")):
            a, b = line.split(":"); d[a] = int(b.split()[0]) * 1024
    return d
gc.collect()
base = rss()["VmRSS"]
open("/proc/self/clear_refs", "w").write("5")
out = qkv.attention(q, k, v, backend=engine, **kw)
picked = qkv.select_backend(q, k, v, **kw).name if engine == "auto" else engine
if bwd:
    out.float().sum().backward()
del out
peak = rss()["VmHWM"] - base
print(json.dumps(dict(peak=peak, declared=declared, picked=picked)))
"""


def main(argv):
    points = POINTS[:2] if "--quick" in argv else POINTS
    print("engine     N     H  dtype     features                  mode     peak MiB  declared MiB  ratio")
    for p in points:
        r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(p)], capture_output=True, text=True)
        if r.returncode:
            print(p, "FAILED", r.stderr[-500:])
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        eng, N, H, dt, feat, bwd = p
        name = eng if eng != "auto" else f"auto>{d['picked']}"
        print(f"{name:10s} {N:5d} {H:2d}  {dt:9s} {feat:25s} {'fwd+bwd' if bwd else 'fwd':8s} "
              f"{d['peak'] / 2**20:8.0f}  {d['declared'] / 2**20:12.0f}  {d['peak'] / max(1, d['declared']):5.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
