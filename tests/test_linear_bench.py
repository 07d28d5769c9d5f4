"""``qkv bench --kind linear``: the exact engines beside the linear-attention family (a tiny sweep)."""
from __future__ import annotations

import json

import torch

from qkv.tools.cli import main


def test_bench_kind_linear(tmp_path, capsys):
    out = tmp_path / "lin.json"
    prev = torch.get_num_threads()
    try:
        rc = main(["bench", "--kind", "linear", "--seqlens", "64", "--heads", "2", "--head-dim", "16", "--reps", "1",
                   "--warmup", "0", "--no-memory", "--quiet", "--mask", "causal", "document:2", "--json", str(out)])
    finally:
        torch.set_num_threads(prev)
    assert rc == 0
    res = json.loads(out.read_text())
    rows = {(r["provider"], r["mask"]): r for r in res["results"]}
    assert {p for p, _ in rows} == {"auto", "linear", "linear-decay", "deltanet"}
    for p in ("auto", "linear", "linear-decay", "deltanet"):
        assert rows[(p, "causal")]["status"] == "ok" and rows[(p, "causal")]["median_ms"] > 0
    for p in ("linear", "linear-decay", "deltanet"):       # no mask but causal: recorded as unsupported
        assert rows[(p, "document:2")]["status"] == "unsupported"
        assert "max_abs_diff" not in rows[(p, "causal")]   # a different function: no agreement column
    assert "linear-decay" in capsys.readouterr().out
