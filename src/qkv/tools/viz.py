"""Make attention visible: heatmap PNGs, a per-token terminal summary, a self-contained HTML page.

The drawing functions are pure: they take the tokens (``list[str]``, length N) and attention probabilities
(``weights``: a tensor or array of shape ``(L, H, N, N)``, or ``(H, N, N)`` for one layer, or a list of per-layer
``(1, H, N, N)`` tensors as the encoder returns them), and write files. Entry ``weights[l, h, i, j]`` is how much
token i (the query, a row) attends to token j (the key, a column) in layer l, head h; rows sum to 1.
:func:`show` only wires the bundled encoder (``qkv.models.MiniLM``) in front of :func:`render`.

Layers and heads are numbered from 0 everywhere (PNG titles, file names, the summary, the HTML page, the
``layer=``/``head=`` arguments), like the indices of the weights tensor and of Hugging Face's ``attentions``.

The summary rule (:func:`strongest_targets`): for each source token that is not special (``[CLS]``, ``[SEP]``,
``[PAD]``, ``<s>``... which are sinks, not words), every candidate target j (not special, not the token itself)
is scored by its largest weight over the chosen layers and heads, ``max_{l,h} w[l, h, i, j]``, and remembers the
(layer, head) where that maximum is. The line shows the best target first, then the runners-up:
``bank → river 0.50 (layer 0, head 4) · muddy 0.32 (layer 0, head 3) · fisherman 0.30 (layer 0, head 10)``.
Special tokens are excluded because most heads park their weight on them; self because it says nothing
about relations between words. When several heads are searched, *positional* heads (:func:`positional_heads`:
on average at least half of a token's weight on its previous token, or on its next one) are left out too and
named in the summary's header: they point at the neighbour whatever the words are (layer 0 head 2 of MiniLM
gives every token 1.00 on its predecessor) and would otherwise win every line. Punctuation and word pieces
are ordinary tokens and stay.
"""
from __future__ import annotations

import html as _html
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "show", "render", "strongest_targets", "positional_heads", "format_summary", "plot_layer", "plot_head", "write_html",
    "is_special",
]

_SPECIAL = {
    "[CLS]", "[SEP]", "[PAD]", "[MASK]", "<s>", "</s>", "<pad>", "<mask>", "<bos>", "<eos>", "<|endoftext|>",
    "<|begin_of_text|>", "<|end_of_text|>",
}


def is_special(token: str) -> bool:
    """True for tokenizer markers (``[CLS]``, ``[SEP]``, ``[PAD]``, ``<s>``, ``<|endoftext|>``, ...)."""
    t = token.strip()
    if t in _SPECIAL:
        return True
    if len(t) > 2 and t[0] == "[" and t[-1] == "]" and t[1:-1].isupper() and t != "[UNK]":
        return True
    return len(t) > 4 and t.startswith("<|") and t.endswith("|>")


# --------------------------------------------------------------------------------------------- inputs
def _as_lhnn(weights: Any, n_tokens: int | None = None) -> np.ndarray:
    """Weights as float32 numpy ``(L, H, N, N)``; accepts (L,H,N,N), (H,N,N) or a list of (1,H,N,N)/(H,N,N)."""
    if isinstance(weights, (list, tuple)):
        layers = [_to_numpy(w) for w in weights]
        layers = [w[0] if w.ndim == 4 and w.shape[0] == 1 else w for w in layers]
        if not layers or any(w.ndim != 3 for w in layers):
            raise ValueError(f"weights: expected a list of per-layer (1, H, N, N) or (H, N, N) arrays, got shapes "
                             f"{[tuple(_to_numpy(w).shape) for w in weights]}")
        w = np.stack(layers)
    else:
        w = _to_numpy(weights)
        if w.ndim == 3:
            w = w[None]
        if w.ndim != 4:
            raise ValueError(f"weights: expected shape (L, H, N, N) or (H, N, N), got {tuple(w.shape)}")
    if w.shape[-1] != w.shape[-2]:
        raise ValueError(f"weights: self-attention maps must be square (N, N), got {tuple(w.shape)}")
    if n_tokens is not None and w.shape[-1] != n_tokens:
        raise ValueError(f"weights: {w.shape[-1]} keys per row but {n_tokens} tokens were given")
    return np.ascontiguousarray(w, dtype=np.float32)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, on any device / dtype
        return x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=np.float32)


def _select(count: int, which: int | Iterable[int] | None, name: str) -> list[int]:
    if which is None:
        return list(range(count))
    items = [which] if isinstance(which, (int, np.integer)) else list(which)
    for x in items:
        if not isinstance(x, (int, np.integer)) or isinstance(x, bool) or not 0 <= x < count:
            raise ValueError(f"{name}={x!r} is out of range: the model has {count} {name}s, numbered 0..{count - 1}")
    return [int(x) for x in items]


def _label(token: str) -> str:
    return token if len(token) <= 14 else token[:13] + "…"


# --------------------------------------------------------------------------------------------- summary
def positional_heads(tokens: Sequence[str], weights: Any, *, threshold: float = 0.5) -> list[tuple[int, int]]:
    """(layer, head) pairs that, on average over the non-special tokens, put at least ``threshold`` of a
    token's weight on its previous token, or on its next one. weights: (L, H, N, N)."""
    w = _as_lhnn(weights, len(tokens))
    special = np.array([is_special(t) for t in tokens], dtype=bool)
    found = set()
    for d in (-1, 1):
        rows = [i for i in range(len(tokens)) if not special[i] and 0 <= i + d < len(tokens)]
        if not rows:
            continue
        rows_a = np.array(rows)
        frac = w[:, :, rows_a, rows_a + d].mean(-1)  # (L, H)
        found.update((int(l), int(h)) for l, h in zip(*np.nonzero(frac >= threshold)))
    return sorted(found)


def strongest_targets(tokens: Sequence[str], weights: Any, *, k: int = 3, layers: Iterable[int] | int | None = None,
                      heads: Iterable[int] | int | None = None, sources: Iterable[int] | None = None,
                      skip_positional: bool = True) -> list[dict]:
    """For each non-special source token, its ``k`` strongest targets across the chosen layers and heads.

    weights: (L, H, N, N) (or (H, N, N)). The rule is in the module docstring: target j of source i scores
    ``max over (l, h) of weights[l, h, i, j]``, special tokens and j == i excluded, and (when
    ``skip_positional`` and more than one head is searched) the heads of :func:`positional_heads` left out.
    Returns one dict per source, ``{"index", "token", "targets": [{"index", "token", "weight", "layer",
    "head"}, ...]}`` best first.
    """
    w = _as_lhnn(weights, len(tokens))
    L, H, N, _ = w.shape
    ls, hs = _select(L, layers, "layer"), _select(H, heads, "head")
    pairs = [(l, h) for l in ls for h in hs]
    if skip_positional and len(pairs) > 1:
        skip = set(positional_heads(tokens, w))
        pairs = [p for p in pairs if p not in skip] or pairs
    special = np.array([is_special(t) for t in tokens], dtype=bool)
    flat = w[[p[0] for p in pairs], [p[1] for p in pairs]]  # (pairs, N, N)
    best = flat.max(axis=0)  # (N, N): max over layer/head for each (i, j)
    where = flat.argmax(axis=0)
    rows = []
    for i in (range(N) if sources is None else sources):
        if special[i]:
            continue
        score = best[i].copy()
        score[special] = -1.0
        score[i] = -1.0
        order = [int(j) for j in np.argsort(-score, kind="stable")[:k] if score[j] >= 0]
        targets = []
        for j in order:
            lay, hd = pairs[int(where[i, j])]
            targets.append({"index": j, "token": tokens[j], "weight": float(best[i, j]), "layer": lay, "head": hd})
        rows.append({"index": int(i), "token": tokens[i], "targets": targets})
    return rows


def format_summary(rows: list[dict]) -> str:
    """Lines like ``bank → river 0.31 (layer 3, head 7) · muddy 0.24 (layer 0, head 3)``."""
    if not rows:
        return ""
    width = max(len(r["token"]) for r in rows)
    lines = []
    for r in rows:
        parts = [f"{t['token']} {t['weight']:.2f} (layer {t['layer']}, head {t['head']})" for t in r["targets"]]
        lines.append(f"{r['token']:>{width}} → " + (" · ".join(parts) if parts else "(no other token)"))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- PNGs
def matplotlib_classes():
    """matplotlib's object API (``Figure``, no pyplot): no global backend switch, nothing left open."""
    from matplotlib.colors import PowerNorm
    from matplotlib.figure import Figure

    return Figure, PowerNorm


_CMAP = "Purples"   # white (0) → deep purple (1): a uniform row stays pale, peaks stand out
_GAMMA = 0.5        # sqrt colour scale: shows the 0.05–0.2 weights that carry meaning without hiding the peaks


def _draw_panel(ax, m: np.ndarray, tokens: Sequence[str], norm, *, fontsize: float, ylabels: bool = True,
                annotate: bool = False):
    n = len(tokens)
    im = ax.imshow(m, cmap=_CMAP, norm=norm, interpolation="nearest", aspect="equal")
    step = max(1, math.ceil(n / 64))  # past 64 tokens label every step-th one
    ticks = list(range(0, n, step))
    labels = [_label(tokens[i]) for i in ticks]
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels if ylabels else [], fontsize=fontsize)
    ax.tick_params(length=0, pad=1.5)
    if n <= 64:  # thin white cell borders, as two line collections (cheap; minor ticks are not)
        edges = np.arange(-0.5, n, 1.0)
        ax.vlines(edges, -0.5, n - 0.5, colors="#ffffff", linewidth=0.35)
        ax.hlines(edges, -0.5, n - 0.5, colors="#ffffff", linewidth=0.35)
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylim(n - 0.5, -0.5)
    for s in ax.spines.values():
        s.set_color("#bbbbbb")
    if annotate:
        for i in range(n):
            for j in range(n):
                if m[i, j] >= 0.1:
                    ax.text(j, i, f"{m[i, j]:.2f}"[1:] if m[i, j] < 1 else "1", ha="center", va="center",
                            fontsize=fontsize * 0.78, color="white" if m[i, j] > 0.3 else "#222222")
    return im


def plot_layer(tokens: Sequence[str], weights: Any, path: str | os.PathLike, *, layer: int | None = None,
               heads: Iterable[int] | None = None, title: str | None = None) -> str:
    """A grid of heads for one layer. weights: (H, N, N). Rows = query (attends from), columns = key (to)."""
    Figure, PowerNorm = matplotlib_classes()
    w = _as_lhnn(weights, len(tokens))
    if w.shape[0] != 1:
        raise ValueError(f"weights: plot_layer takes one layer (H, N, N), got {tuple(w.shape)}")
    w = w[0]
    hs = _select(w.shape[0], heads, "head")
    n = len(tokens)
    ncols = math.ceil(math.sqrt(len(hs)))
    nrows = ncols - 1 if ncols * (ncols - 1) >= len(hs) else ncols
    panel = min(8.0, max(2.6, 0.15 * n))          # the heatmap square, inches
    fs = float(min(9.0, max(4.0, panel * 72 / max(n, 1) * 0.72)))
    longest = max((len(_label(t)) for t in tokens), default=1)
    lab = (longest * 0.62 * fs + 8) / 72           # room for the tick labels, inches
    top, bottom_pad, right = 0.75, 0.15, 1.3
    cw, ch = panel + lab + 0.25, panel + lab + 0.45  # one grid cell: labels left/below, title above
    W, Hh = ncols * cw + right, nrows * ch + top + bottom_pad
    fig = Figure(figsize=(W, Hh))
    norm = PowerNorm(gamma=_GAMMA, vmin=0.0, vmax=1.0)
    im = None
    for a, hh in enumerate(hs):
        r, c = divmod(a, ncols)
        x0 = c * cw + lab
        y0 = Hh - top - (r + 1) * ch + lab + 0.05
        ax = fig.add_axes((x0 / W, y0 / Hh, panel / W, panel / Hh))
        im = _draw_panel(ax, w[hh], tokens, norm, fontsize=fs)
        ax.set_title(f"head {hh}", fontsize=fs + 3, pad=4)
    sup = title or (f"layer {layer}" if layer is not None else "attention")
    fig.text(0.5, 1 - 0.3 / Hh, f"{sup}   ·   row = token attending (query), column = token attended to (key)",
             ha="center", va="center", fontsize=14)
    cax = fig.add_axes(((W - right + 0.25) / W, 0.25, 0.16 / W, 0.5))
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("attention weight", fontsize=11)
    cb.set_ticks([0, 0.05, 0.2, 0.5, 1.0])
    fig.savefig(path, dpi=100, facecolor="white")
    return str(path)


def plot_head(tokens: Sequence[str], weights: Any, path: str | os.PathLike, *, layer: int | None = None,
              head: int | None = None, title: str | None = None, highlight: int | None = None) -> str:
    """One head, large, with the weights ≥ 0.1 written in the cells (up to 40 tokens). weights: (N, N).
    ``highlight``: a row (query token index) to frame."""
    Figure, PowerNorm = matplotlib_classes()
    m = _to_numpy(weights)
    if m.ndim != 2 or m.shape != (len(tokens), len(tokens)):
        raise ValueError(f"weights: plot_head takes one (N, N) map for {len(tokens)} tokens, got {tuple(m.shape)}")
    n = len(tokens)
    side = min(16.0, max(5.5, 0.34 * n + 2.0))
    cell_pt = (side - 2.0) * 72 / max(n, 1)
    fs = float(min(11.0, max(4.0, cell_pt * 0.5)))
    fig = Figure(figsize=(side + 1.3, side + 0.4))
    ax = fig.subplots()
    norm = PowerNorm(gamma=_GAMMA, vmin=0.0, vmax=1.0)
    im = _draw_panel(ax, m, tokens, norm, fontsize=fs, annotate=n <= 40)
    if highlight is not None and 0 <= highlight < n:
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((-0.5, highlight - 0.5), n, 1, fill=False, edgecolor="#e8590c", linewidth=2.2,
                               clip_on=False, zorder=5))
        step = max(1, math.ceil(n / 64))
        if highlight % step == 0:
            ax.get_yticklabels()[highlight // step].set_color("#e8590c")
    where = " · ".join(x for x in (f"layer {layer}" if layer is not None else "",
                                   f"head {head}" if head is not None else "") if x)
    ax.set_title((title or where or "attention") + "\nrow = token attending (query), column = token attended to (key)",
                 fontsize=12)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label("attention weight")
    cb.set_ticks([0, 0.05, 0.2, 0.5, 1.0])
    fig.tight_layout()
    fig.savefig(path, dpi=100, facecolor="white")
    return str(path)


# --------------------------------------------------------------------------------------------- HTML
SCALE = 1000  # weights are embedded as integers in 1/1000 (3 decimals): small, and exact to what the page shows


def write_html(tokens: Sequence[str], weights: Any, path: str | os.PathLike, *, text: str | None = None,
               layer: int | None = None, head: int | None = None, title: str = "qkv · attention",
               model: str | None = None) -> str:
    """A self-contained page (no network: inline CSS/JS, weights embedded as JSON) to explore the weights.

    weights: (L, H, N, N). Hover a token to see where it attends (background ∝ weight, value under each
    token); click to pin it. Selectors pick the layer and the head, or the average of the heads.
    ``layer``/``head`` preselect. The URL hash can drive it (``#layer=2&head=avg&click=5``; used by the tests).
    """
    w = _as_lhnn(weights, len(tokens))
    L, H, N, _ = w.shape
    layer = _select(L, layer, "layer")[0] if layer is not None else 0
    head = _select(H, head, "head")[0] if head is not None else None
    q = np.rint(np.clip(w, 0.0, 1.0) * SCALE).astype(np.int32)
    data = {
        "tokens": list(tokens), "special": [is_special(t) for t in tokens], "layers": L, "heads": H,
        "scale": SCALE, "layer": layer, "head": "avg" if head is None else head, "text": text or " ".join(tokens),
        "model": model or "", "w": q.tolist(),
    }
    blob = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    blob = blob.replace("<", "\\u003c")  # no "</script>" or "<!--" can end the JSON block early
    page = (_PAGE.replace("__TITLE__", _html.escape(title))
            .replace("__HEADING__", _html.escape(title))
            .replace("__SUB__", _html.escape(text or " ".join(tokens)))
            .replace("__DATA__", blob))
    Path(path).write_text(page, encoding="utf-8")
    return str(path)


_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root{--ink:#1d1b26;--muted:#6b6880;--line:#e4e1ee;--accent:86,44,170;--bg:#fbfaff}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--ink);background:var(--bg)}
header{padding:18px 28px 10px;border-bottom:1px solid var(--line);background:#fff}
h1{font-size:19px;margin:0 0 2px;font-weight:650}
.sub{color:var(--muted);font-size:14px;margin:0}
main{display:flex;flex-wrap:wrap;gap:24px;padding:18px 28px}
.left{flex:1 1 520px;min-width:320px}
.right{flex:0 0 auto}
.controls{display:flex;gap:16px;align-items:center;flex-wrap:wrap;margin-bottom:14px}
label{font-size:13px;color:var(--muted)}
select,button{font:inherit;font-size:14px;padding:4px 8px;border:1px solid var(--line);border-radius:6px;background:#fff;color:var(--ink)}
button{cursor:pointer}
#tokens{display:flex;flex-wrap:wrap;gap:6px 4px;padding:14px;background:#fff;border:1px solid var(--line);border-radius:10px}
.tok{display:inline-flex;flex-direction:column;align-items:center;min-width:30px;padding:4px 7px 2px;border-radius:6px;cursor:pointer;border:2px solid transparent;user-select:none;transition:background-color .08s}
.tok .t{font-size:16px;white-space:pre}
.tok .w{font-size:11px;color:var(--muted);height:14px;font-variant-numeric:tabular-nums}
.tok.special .t{color:#9a97ab;font-size:13px}
.tok.src{border-color:rgb(var(--accent));box-shadow:0 0 0 2px rgba(var(--accent),.15)}
.tok.pinned{border-style:solid;background:#fff}
.tok.dark .t,.tok.dark .w{color:#fff}
#info{margin:14px 2px 0;min-height:48px;font-size:14px}
#info b{font-weight:650}
.hint{color:var(--muted);font-size:13px;margin-top:10px}
canvas{border:1px solid var(--line);border-radius:6px;background:#fff;image-rendering:pixelated;cursor:crosshair}
.cap{font-size:12px;color:var(--muted);margin-top:4px;max-width:340px}
.legend{display:flex;align-items:center;gap:6px;font-size:12px;color:var(--muted);margin-top:8px}
.legend i{display:inline-block;width:120px;height:10px;border-radius:3px;background:linear-gradient(90deg,rgba(var(--accent),0),rgba(var(--accent),1))}
</style></head>
<body>
<header><h1>__HEADING__</h1><p class="sub">__SUB__</p></header>
<main>
<section class="left">
 <div class="controls">
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <button id="clear" type="button">clear</button>
  <span class="legend">0 <i></i> strongest word</span>
 </div>
 <div id="tokens" role="list"></div>
 <div id="info"></div>
 <p class="hint">Hover a token to see where it attends; click to pin it (click again to unpin). Colour is
 proportional to the weight, the darkest being the strongest word (special tokens and the token itself aside,
 clamped); the number under each token is the weight itself.
 Layers and heads are numbered from 0.</p>
</section>
<section class="right">
 <canvas id="map" width="340" height="340"></canvas>
 <div class="cap" id="mapcap"></div>
</section>
</main>
<script id="qkv-data" type="application/json">__DATA__</script>
<script>
(function(){
"use strict";
var D=JSON.parse(document.getElementById("qkv-data").textContent);
var N=D.tokens.length, S=D.scale;
var layerSel=document.getElementById("layer"), headSel=document.getElementById("head");
var box=document.getElementById("tokens"), info=document.getElementById("info");
var canvas=document.getElementById("map"), cap=document.getElementById("mapcap");
var pinned=null, hovered=null, chips=[];
function opt(sel,value,text){var o=document.createElement("option");o.value=value;o.textContent=text;sel.appendChild(o);}
for(var l=0;l<D.layers;l++)opt(layerSel,String(l),String(l));
opt(headSel,"avg","average of heads");
for(var h=0;h<D.heads;h++)opt(headSel,String(h),String(h));
layerSel.value=String(D.layer);headSel.value=String(D.head);
// row i of the current (layer, head) map, as weights in [0, 1]
function row(i){
  var l=+layerSel.value, hv=headSel.value, out=new Array(N), j, h;
  if(hv==="avg"){for(j=0;j<N;j++){var s=0;for(h=0;h<D.heads;h++)s+=D.w[l][h][i][j];out[j]=s/D.heads/S;}}
  else{var r=D.w[l][+hv][i];for(j=0;j<N;j++)out[j]=r[j]/S;}
  return out;
}
function where(){return "layer "+layerSel.value+", "+(headSel.value==="avg"?"average of heads":"head "+headSel.value);}
D.tokens.forEach(function(t,i){
  var c=document.createElement("span");c.className="tok"+(D.special[i]?" special":"");c.setAttribute("role","listitem");
  c.dataset.i=i;c.dataset.w="";
  var a=document.createElement("span");a.className="t";a.textContent=t;
  var b=document.createElement("span");b.className="w";
  c.appendChild(a);c.appendChild(b);
  c.addEventListener("mouseenter",function(){hovered=i;paint();});
  c.addEventListener("mouseleave",function(){hovered=null;paint();});
  c.addEventListener("click",function(){pinned=(pinned===i?null:i);paint();});
  box.appendChild(c);chips.push(c);
});
function paint(){
  var src=(pinned!==null)?pinned:hovered;
  document.body.dataset.source=(src===null?"":String(src));
  if(src===null){
    chips.forEach(function(c){c.style.backgroundColor="";c.classList.remove("src","pinned","dark");c.dataset.w="";c.lastChild.textContent="";});
    info.innerHTML="";info.appendChild(document.createTextNode("Hover or click a token ("+where()+")."));
    drawMap(null);return;
  }
  // colour ∝ weight, scaled so that the strongest word (special tokens and the token itself aside) is darkest:
  // most heads park most of their weight on [CLS]/[SEP], which would leave the words pale (those clamp at 1)
  var r=row(src), mx=0, j;
  for(j=0;j<N;j++)if(j!==src&&!D.special[j]&&r[j]>mx)mx=r[j];
  if(mx<=0)for(j=0;j<N;j++)if(r[j]>mx)mx=r[j];
  chips.forEach(function(c,j){
    var a=mx>0?Math.min(1,r[j]/mx):0;
    c.style.backgroundColor="rgba(86,44,170,"+a.toFixed(3)+")";
    c.classList.toggle("dark",a>0.55);
    c.classList.toggle("src",j===src);c.classList.toggle("pinned",j===src&&pinned===src);
    var s=r[j].toFixed(3);c.dataset.w=s;c.lastChild.textContent=s;
  });
  var order=[];for(j=0;j<N;j++)if(j!==src&&!D.special[j])order.push(j);
  order.sort(function(x,y){return r[y]-r[x];});
  info.innerHTML="";
  var b=document.createElement("b");b.textContent=D.tokens[src];info.appendChild(b);
  info.appendChild(document.createTextNode(" → "+order.slice(0,5).map(function(j){return D.tokens[j]+" "+r[j].toFixed(2);}).join(" · ")+
    "   ("+where()+(pinned===src?", pinned":"")+")"));
  drawMap(src);
}
function drawMap(src){
  var ctx=canvas.getContext("2d"), W=canvas.width, cell=W/N, i, j, rr;
  ctx.fillStyle="#fff";ctx.fillRect(0,0,W,W);
  for(i=0;i<N;i++){rr=row(i);for(j=0;j<N;j++){var v=Math.sqrt(rr[j]);ctx.fillStyle="rgba(86,44,170,"+v.toFixed(3)+")";ctx.fillRect(j*cell,i*cell,Math.ceil(cell),Math.ceil(cell));}}
  if(src!==null){ctx.strokeStyle="#e8590c";ctx.lineWidth=2;ctx.strokeRect(1,src*cell+1,W-2,Math.max(cell-2,1));}
  cap.textContent="The whole map ("+where()+"): row = token attending, column = token attended to; √ colour scale. Click a row to pin that token.";
}
canvas.addEventListener("click",function(e){var r=canvas.getBoundingClientRect();var i=Math.floor((e.clientY-r.top)/r.height*N);if(i>=0&&i<N){pinned=(pinned===i?null:i);paint();}});
canvas.addEventListener("mousemove",function(e){var r=canvas.getBoundingClientRect();var i=Math.floor((e.clientY-r.top)/r.height*N),j=Math.floor((e.clientX-r.left)/r.width*N);
  if(i>=0&&i<N&&j>=0&&j<N)canvas.title=D.tokens[i]+" → "+D.tokens[j]+"  "+row(i)[j].toFixed(3);});
layerSel.addEventListener("change",paint);headSel.addEventListener("change",paint);
document.getElementById("clear").addEventListener("click",function(){pinned=null;hovered=null;paint();});
// URL hash drives the page (for links and tests): #layer=2&head=avg&click=5 (or hover=5)
var P={};location.hash.replace(/^#/,"").split("&").forEach(function(kv){var p=kv.split("=");if(p[0])P[decodeURIComponent(p[0])]=decodeURIComponent(p[1]||"");});
if(P.layer!==undefined){layerSel.value=P.layer;layerSel.dispatchEvent(new Event("change"));}
if(P.head!==undefined){headSel.value=P.head;headSel.dispatchEvent(new Event("change"));}
paint();
if(P.click!==undefined&&chips[+P.click])chips[+P.click].dispatchEvent(new MouseEvent("click",{bubbles:true}));
if(P.hover!==undefined&&chips[+P.hover])chips[+P.hover].dispatchEvent(new MouseEvent("mouseenter"));
document.body.dataset.ready="1";
})();
</script>
</body></html>
"""


# --------------------------------------------------------------------------------------------- wiring
def render(tokens: Sequence[str], weights: Any, *, layer: int | None = None, head: int | None = None,
           out: str | os.PathLike = "qkv-out", text: str | None = None, model: str | None = None,
           k: int = 3, echo: bool = True, highlight: int | None = None) -> dict:
    """Write the PNGs, ``summary.txt`` and ``attention.html`` for these tokens and weights (L, H, N, N).

    ``layer=None``: one PNG per layer; ``head=None``: a grid of all heads, else that head alone, large.
    Returns ``{"png": [paths], "html": path, "summary": path}``; prints the summary when ``echo``.
    """
    w = _as_lhnn(weights, len(tokens))
    L, H = w.shape[:2]
    ls = _select(L, layer, "layer")
    hs = _select(H, head, "head") if head is not None else None
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    pngs = []
    for l in ls:
        if hs is None:
            pngs.append(plot_layer(tokens, w[l], outdir / f"attention-layer{l}.png", layer=l,
                                   title=f"{model + ' · ' if model else ''}layer {l}"))
        else:
            pngs.append(plot_head(tokens, w[l, hs[0]], outdir / f"attention-layer{l}-head{hs[0]}.png", layer=l,
                                  head=hs[0], title=f"{model + ' · ' if model else ''}layer {l} · head {hs[0]}",
                                  highlight=highlight))
    rows = strongest_targets(tokens, w, k=k, layers=ls, heads=hs)
    scope = (f"layer {ls[0]}" if len(ls) == 1 else f"layers {ls[0]}–{ls[-1]}") + \
        (f", head {hs[0]}" if hs is not None else f", heads 0–{H - 1}")
    skipped = [p for p in positional_heads(tokens, w) if p[0] in ls] if hs is None else []
    note = ("\n  positional heads left out (they attend to the previous/next token whatever it is): "
            + ", ".join(f"layer {a} head {b}" for a, b in skipped)) if skipped else ""
    summary = (f"Where each token attends most ({scope}; weight = max over those layers and heads;\n"
               f"  special tokens and the token itself excluded){note}\n" + format_summary(rows))
    spath = outdir / "summary.txt"
    spath.write_text(summary + "\n", encoding="utf-8")
    html = write_html(tokens, w, outdir / "attention.html", text=text, layer=ls[0], head=head,
                      title=f"qkv · attention{' in ' + model if model else ''}", model=model)
    paths = {"png": [str(p) for p in pngs], "html": html, "summary": str(spath)}
    if echo:
        print(summary)
        print(f"\nwrote {len(pngs)} PNG{'s' if len(pngs) != 1 else ''}: " + ", ".join(paths["png"]))
        print(f"wrote the interactive page: {html}  (open it in a browser; it needs no network)")
    return paths


_MODEL_NAME = "all-MiniLM-L6-v2"
_ENCODER = None


def _encoder():
    """The bundled encoder (``qkv.models.MiniLM``), loaded once per process."""
    global _ENCODER
    if _ENCODER is None:
        from qkv.models import MiniLM

        _ENCODER = MiniLM.from_pretrained()
        if hasattr(_ENCODER, "eval"):
            _ENCODER.eval()
    return _ENCODER


def attention_of(text: str) -> tuple[list[str], Any]:
    """Run the bundled encoder on ``text``: its tokens (with [CLS]/[SEP]) and weights, a (L, H, N, N) tensor."""
    import torch

    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text: expected a non-empty string, got {text!r}")
    model = _encoder()
    enc = model.tokenize([text])
    with torch.no_grad():
        _, weights = model(enc["input_ids"], attention_mask=enc.get("attention_mask"), need_weights=True)
    w = torch.stack([x[0] for x in weights]).float()  # (L, H, N, N)
    tokens = list(model.tokens(text))
    n = w.shape[-1]
    if len(tokens) != n:
        raise RuntimeError(f"qkv.models: tokens(text) gave {len(tokens)} tokens but the weights have {n} keys")
    return tokens, w


def show(text: str, *, layer: int | None = None, head: int | None = None, out: str | os.PathLike = "qkv-out",
         echo: bool = True) -> dict:
    """Attention maps of the bundled encoder (all-MiniLM-L6-v2 run by qkv's own layers) for ``text``.

    Writes into ``out``: ``attention-layer{L}.png`` (a grid of the 12 heads; one per layer, or only ``layer``),
    or ``attention-layer{L}-head{H}.png`` when ``head`` is given; ``summary.txt``; ``attention.html`` (all
    layers and heads, self-contained). Prints the per-token summary (see the module docstring for the rule).
    Layers and heads count from 0. Returns ``{"png": [paths], "html": path, "summary": path}``.
    """
    tokens, w = attention_of(text)
    L, H = w.shape[:2]
    _select(L, layer, "layer") if layer is not None else None
    _select(H, head, "head") if head is not None else None
    return render(tokens, w, layer=layer, head=head, out=out, text=text, model=_MODEL_NAME, echo=echo)
