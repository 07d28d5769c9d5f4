"""Reporting a sweep: the human table, the JSON file, the PNG plot."""
from __future__ import annotations

import json

__all__ = ["format_table", "write_json", "plot"]


# --------------------------------------------------------------------------------------------- output
def _fmt_bytes(b) -> str:
    if b is None:
        return "-"
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.1f} MiB"


def format_table(result: dict) -> str:
    """The human table: one row per (case, provider)."""
    cfg = result["config"]
    m = result["machine"]
    dev = cfg["device"]
    where = (m["gpus"][0]["name"] if dev == "cuda" and m["gpus"] else
             f"{m['cpu']['model']} ({m['cpu']['torch_threads']} threads)")
    head = (f"qkv bench on {dev}: {where}; torch {m['versions']['torch']}; B={cfg['batch']} H={cfg['heads']} "
            f"D={cfg['head_dim']}; {cfg['reps']} reps, median [p25-p75 spread]")
    cols = ["provider", "dtype", "mask", "mode", "N", "ms", "spread", "TFLOP/s", "peak mem", "vs SDPA", "note"]
    body = []
    for r in result["results"]:
        ok = r["status"] == "ok" and r.get("median_ms") is not None
        note = []
        if r["status"] != "ok":
            note.append(f"{r['status'].upper()}: {r.get('message', '')}")
        if r.get("compile_s") is not None:
            note.append(f"compile {r['compile_s']:.1f} s")
        if r.get("max_abs_diff") is not None and r.get("diff_vs") != r["provider"]:
            note.append(f"|Δ| vs {r['diff_vs']} {r['max_abs_diff']:.1e}")
        body.append([r["provider"], r["dtype"], r["mask"], r["mode"], str(r["N"]),
                     f"{r['median_ms']:.2f}" if ok else "-",
                     f"±{r['spread_pct']:.0f}%" if ok else "",
                     f"{r['tflops']:.3g}" if ok else "-",
                     _fmt_bytes(r.get("peak_bytes")),
                     f"{r['speedup_vs_sdpa']:.2f}x" if r.get("speedup_vs_sdpa") else "-",
                     "; ".join(note)[:110]])
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    right = {4, 5, 6, 7, 8, 9}

    def fmt(cells):
        return "  ".join((c.rjust(w) if i in right else c.ljust(w)) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [head, fmt(cols).rstrip(), fmt(["-" * w for w in widths]).rstrip()]
    prev = None
    for b in body:
        key = tuple(b[1:5])
        if prev is not None and key != prev and b[1:4] != list(prev[:3]):
            lines.append("")
        prev = key
        lines.append(fmt(b).rstrip())
    lines.append(f"({result['elapsed_s']:.1f} s; FLOPs on visible entries: 4·B·H·visible·D fwd, ×3.5 fwd+bwd)")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")


def _lines(ax, sub, provs, style, labels, key, scale, ns):
    import matplotlib.ticker
    for p in provs:
        pts = [(r["N"], r[key] * scale) for r in sub if r["provider"] == p and r.get(key)]
        bad = [(r["N"], r["status"]) for r in sub if r["provider"] == p and not r.get(key)
               and r["status"] not in ("unavailable", "ok")]
        lab = labels[p] + (" (" + ", ".join(f"{s} N={n}" for n, s in bad[:2]) + ")" if bad else "")
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=lab, linewidth=1.8, markersize=6, **style[p])
    ref = [(r["N"], r[key] * scale) for r in sub if r.get(key)]
    if key == "median_ms" and ref and len({n for n, _ in ref}) > 1:
        n0 = min(n for n, _ in ref)
        y0 = max(y for n, y in ref if n == n0)
        xs = sorted({n for n, _ in ref})
        ax.plot(xs, [y0 * (n / n0) ** 2 for n in xs], ":", color="0.5", linewidth=1, label="∝ N²")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("sequence length N")
    if ax.lines:
        ax.legend(fontsize=8, loc="upper left")


def _bars(ax, sub, provs, style, labels, key, scale):
    """One N: a bar per provider, value written on it; failed points named instead of drawn."""
    xs, names = [], []
    for i, p in enumerate(provs):
        r = next((r for r in sub if r["provider"] == p), None)
        if r is None:
            continue
        xs.append(i)
        names.append(labels[p])
        if r.get(key):
            y = r[key] * scale
            ax.bar(i, y, color=style[p]["color"], width=0.6)
            txt = (f"{y:,.0f}" if y >= 100 else f"{y:.3g}") + (
                f"\n{r['speedup_vs_sdpa']:.2f}x SDPA" if key == "median_ms"
                                  and r.get("speedup_vs_sdpa") and r["family"] != "sdpa" else "")
            ax.annotate(txt, (i, y), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                        textcoords="offset points")
        else:
            ax.annotate(r["status"], (i, 0.5), xycoords=("data", "axes fraction"), ha="center", fontsize=9,
                        color="0.4")
    ax.set_xticks(xs, names, fontsize=8)
    ax.set_xlim(-0.6, max(xs, default=0) + 0.6)
    ys = [r[key] * scale for r in sub if r.get(key)]
    if ys and max(ys) / min(ys) > 30:       # log only when the values span orders of magnitude
        ax.set_yscale("log")
        ax.set_ylim(min(ys) / 4, max(ys) * 4)
    elif ys:
        ax.set_ylim(0, max(ys) * 1.25)


def plot(result: dict, path: str) -> None:
    """PNG: per (dtype, mask, mode) a row of panels, time vs N and peak memory vs N, log-log."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    cfg = result["config"]
    rs = result["results"]
    configs = list(dict.fromkeys((r["dtype"], r["mask"], r["mode"]) for r in rs))
    has_mem = any(r.get("peak_bytes") is not None for r in rs)
    ncol = 2 if has_mem else 1
    fig, axes = plt.subplots(len(configs), ncol, figsize=(6.2 * ncol, 4.3 * len(configs)), squeeze=False)
    provs = list(dict.fromkeys(r["provider"] for r in rs))
    cmap = plt.get_cmap("tab10")
    style = {p: dict(color=cmap(i % 10), marker="os^vDP*Xph"[i % 10]) for i, p in enumerate(provs)}
    labels = {r["provider"]: r["label"] for r in rs}
    panels = [("median_ms", 1.0, "time per call (ms)", "time"),
              ("peak_bytes", 1 / 2**20, "peak memory growth (MiB)", "memory")][:ncol]
    for row, (dt, mk, mode) in enumerate(configs):
        sub = [r for r in rs if (r["dtype"], r["mask"], r["mode"]) == (dt, mk, mode)]
        ns = sorted({r["N"] for r in sub})
        for col, (key, scale, ylabel, what) in enumerate(panels):
            ax = axes[row][col]
            if len(ns) == 1:
                _bars(ax, sub, provs, style, labels, key, scale)
            else:
                _lines(ax, sub, provs, style, labels, key, scale, ns)
            ax.set_ylabel(ylabel)
            if len(ns) > 1:
                ax.set_yscale("log")
            ax.grid(True, which="both", axis="y" if len(ns) == 1 else "both", alpha=0.3)
            ax.set_title(f"{mk}, {dt}, {mode}" + (f", N={ns[0]}" if len(ns) == 1 else "") + f" — {what}",
                         fontsize=10)
    m = result["machine"]
    where = m["gpus"][0]["name"] if cfg["device"] == "cuda" and m["gpus"] else m["cpu"]["model"]
    fig.suptitle(f"qkv bench — {cfg['device']} ({where}), B={cfg['batch']} H={cfg['heads']} D={cfg['head_dim']}, "
                 f"torch {m['versions']['torch']}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
