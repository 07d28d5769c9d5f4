"""``qkv kernels``: compile the triton engine's kernels for GPU targets on any machine (no GPU needed) and report
registers, spill bytes, shared memory and whether tensor-core instructions are used, per configuration.

Exit status 1 when a configuration spills registers or needs more shared memory than its target has."""
from __future__ import annotations

import json
import os
import sys

__all__ = ["main", "DEFAULT_ARCHS", "DTYPES"]

DEFAULT_ARCHS = ("sm_80", "sm_90")
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}


def main(archs=DEFAULT_ARCHS, *, head_dims=None, dtypes=None, kernels=None, variants=None, jobs=None,
         json_path=None, cache_dir=None, out=None) -> int:
    out = sys.stdout if out is None else out   # read per call: a test may have swapped sys.stdout
    try:
        import triton  # noqa: F401
    except ImportError:
        print("qkv kernels: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    from ..engines.triton import report
    from ..linear._triton import REPORT_KERNELS, report_items
    kernels = tuple(kernels or ("fwd", "bwd_dq", "bwd_dkdv", "bwd_delta", "decode", "merge", *REPORT_KERNELS))
    hd = tuple(head_dims or (16, 32, 64, 128, 256))
    dts = tuple(sorted({DTYPES[d] for d in (dtypes or ("bf16", "fp32"))}))
    items = report.plan(list(archs), head_dims=hd, dtypes=dts, variants=tuple(variants or ("plain", "masked", "all")),
                        kernels_=tuple(k for k in kernels if k not in REPORT_KERNELS))
    items += report_items([report.ARCHS[a] for a in archs], hd, dts, tuple(k for k in kernels if k in REPORT_KERNELS))
    jobs = jobs or min(len(items), os.cpu_count() or 1)
    print(f"compiling {len(items)} kernel configurations for {', '.join(archs)} ({jobs} processes)...",
          file=out, flush=True)
    done = []

    def progress(r):
        done.append(r)
        print(f"  [{len(done)}/{len(items)}] {r.kernel} sm_{r.arch} D={r.head_dim} {r.dtype} {r.variant}: "
              f"{'ok' if r.ok else 'NO'} ({r.seconds:.0f} s)", file=sys.stderr, flush=True)

    rows = report.run(items, jobs=jobs, cache_dir=cache_dir, on_row=progress)
    print(report.format_table(rows), file=out)
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)}/{len(rows)} within their target's registers (no spills) and shared memory",
          file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump([dict(r.__dict__, ok=r.ok) for r in rows], f, indent=1)
        print(f"wrote {json_path}", file=out)
    return 1 if bad else 0
