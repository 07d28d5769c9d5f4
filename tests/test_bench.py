"""qkv.bench: mask specs, FLOPs, the sweep's records (ok / oom / timeout / unsupported), JSON, plot. Tiny sizes."""
import json
import time

import pytest
import torch

from qkv.tools import bench
from qkv.tools.bench import BenchError, Case, Config, Provider, parse_mask


def tiny(**kw):
    base = dict(device="cpu", seqlens=[32, 64], batch=1, heads=2, head_dim=16, masks=["causal"], modes=["fwd"],
                providers=["tiled", "sdpa", "naive"], reps=2, warmup=1, memory=False, progress=False,
                min_sample_s=0.002)
    base.update(kw)
    return Config(**base)


@pytest.mark.parametrize("text,causal,window,docs,prefix", [
    ("none", False, None, None, None),
    ("causal", True, None, None, None),
    ("window:256", False, (255, 0), None, None),
    ("window:3,5", False, (3, 5), None, None),
    ("document:4", False, None, 4, None),
    ("prefix:0", False, None, None, 0),
    ("causal+document:2", True, None, 2, None),
])
def test_parse_mask(text, causal, window, docs, prefix):
    s = parse_mask(text)
    assert (s.causal, s.window, s.documents, s.prefix) == (causal, window, docs, prefix)


@pytest.mark.parametrize("bad", ["", "foo", "window", "window:0", "window:x", "document:0", "prefix:-1",
                                 "causal:3", "window:1,2,3"])
def test_parse_mask_errors(bad):
    with pytest.raises(BenchError, match="mask spec"):
        parse_mask(bad)


@pytest.mark.parametrize("spec", ["none", "causal", "window:5", "window:2,3", "document:3", "prefix:7",
                                  "causal+document:3"])
def test_visible_matches_dense_and_semantics(spec):
    n = 37
    s = parse_mask(spec)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    ids = torch.arange(n) * (s.documents or 1) // n
    want = torch.ones(n, n, dtype=torch.bool)
    if s.causal:
        want &= j <= i
    if s.window:
        want &= (j >= i - s.window[0]) & (j <= i + s.window[1])
    if s.documents:
        want &= ids[:, None] == ids[None, :]
    if s.prefix is not None:
        want &= (j < s.prefix) | (j <= i)
    dense = s.dense(n)
    if dense is None:
        dense = torch.ones(n, n, dtype=torch.bool)
    assert torch.equal(dense, want)
    assert s.visible(n) == int(want.sum())


def test_flops_convention():
    c = Case("cpu", "fp32", "causal", "fwd", 2, 3, 10, 16)
    assert c.flops() == 4 * 2 * 3 * (10 * 11 // 2) * 16
    assert Case("cpu", "fp32", "causal", "fwdbwd", 2, 3, 10, 16).flops() == pytest.approx(3.5 * c.flops())
    assert Case("cpu", "fp32", "window:4", "fwd", 1, 1, 10, 1).flops() == 4 * (1 + 2 + 3 + 4 * 7)


def test_resolve_providers():
    assert bench.resolve_providers(["sdpa,naive", "tiled"], "cpu") == ["sdpa", "naive", "tiled"]
    assert "auto" in bench.resolve_providers(["qkv"], "cpu")
    assert "triton" not in bench.resolve_providers(["qkv"], "cpu")   # groups keep what can run here
    with pytest.raises(BenchError, match="unknown provider"):
        bench.resolve_providers(["nope"], "cpu")
    d = bench.default_providers("cpu")
    assert {"auto", "tiled", "sdpa", "naive"} <= set(d)


@pytest.mark.parametrize("kw,msg", [
    (dict(seqlens=[-4]), "seqlens"), (dict(seqlens=[]), "seqlens"), (dict(heads=0), "heads"),
    (dict(dtypes=["int8"]), "dtype"), (dict(modes=["back"]), "mode"), (dict(device="tpu"), "device"),
    (dict(masks=["window:-1"]), "mask"), (dict(providers=["xla"]), "provider")])
def test_config_errors(kw, msg):
    with pytest.raises(BenchError, match=msg):
        tiny(**kw).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_refused_without_cuda():
    with pytest.raises(BenchError, match="CUDA is not available"):
        tiny(device="cuda").validate()


def test_run_schema_and_figures(tmp_path):
    r = bench.run(tiny(masks=["causal", "window:8"], modes=["fwd", "fwdbwd"]))
    assert r["schema"] == bench.SCHEMA
    json.loads(json.dumps(r, default=str))                    # JSON-ready
    m = r["machine"]
    assert m["cpu"]["model"] and m["cpu"]["cores"] >= 1 and m["versions"]["torch"] == torch.__version__
    assert "triton" in m["versions"]
    assert len(r["results"]) == 2 * 2 * 2 * 3                  # masks × modes × seqlens × providers
    for row in r["results"]:
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["tflops"] > 0 and len(row["times_ms"]) == row["reps"] >= 1
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["flops"] == Case("cpu", "fp32", row["mask"], row["mode"], 1, 2, row["N"], 16).flops()
        assert row["max_abs_diff"] < 1e-4                       # every provider computes the same thing
        assert row["speedup_vs_sdpa"] > 0
        if row["provider"] == "sdpa":
            assert row["speedup_vs_sdpa"] == 1.0
    forms = {(x["provider"], x["mask"]): x["mask_form"] for x in r["results"]}
    assert forms[("sdpa", "causal")] == "is_causal=True"
    assert forms[("sdpa", "window:8")] == "dense bool attn_mask"
    assert forms[("tiled", "window:8")] == "window=(7, 0)"
    text = bench.format_table(r)
    assert "TFLOP/s" in text and "tiled" in text and "vs SDPA" in text
    out = tmp_path / "b.png"
    bench.plot(r, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_document_and_prefix_go_to_qkv_as_block_mask(tmp_path):
    r = bench.run(tiny(seqlens=[64], masks=["document:4", "prefix:8"], providers=["tiled", "sdpa"]))
    bench.plot(r, str(tmp_path / "one_n.png"))                 # one N: bars instead of lines
    assert (tmp_path / "one_n.png").stat().st_size > 10_000
    for row in r["results"]:
        assert row["status"] == "ok", row
        assert row["max_abs_diff"] < 1e-4
    assert {x["mask_form"] for x in r["results"] if x["provider"] == "tiled"} == {"qkv.block_mask"}


def test_memory_subprocess_cpu():
    r = bench.run(tiny(seqlens=[1024], heads=4, providers=["naive"], memory=True, reps=1))
    rows = {x["provider"]: x for x in r["results"]}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["memory"]["status"] == "ok" and row["peak_bytes"] >= 0
    # naive materialises a 4×1024×1024 fp32 score matrix (16 MiB) at least once; RSS is page-granular and the
    # allocator may reuse freed pages, so ask for half of it
    assert rows["naive"]["peak_bytes"] >= 8 * 2**20


def _fake(name, fn_or_exc, compiles=False):
    def build(case, info):
        if isinstance(fn_or_exc, BaseException):
            raise fn_or_exc
        return fn_or_exc
    return Provider(name, name, "test", "test provider", lambda d: (True, "test"), build, compiles=compiles)


def test_failures_are_recorded_not_raised(monkeypatch):
    def oom(q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")

    def slow(q, k, v):
        time.sleep(0.3)
        return q * 1

    monkeypatch.setitem(bench.PROVIDERS, "oomer", _fake("oomer", oom))
    monkeypatch.setitem(bench.PROVIDERS, "refuser", _fake("refuser", NotImplementedError("no such thing")))
    monkeypatch.setitem(bench.PROVIDERS, "crasher", _fake("crasher", RuntimeError("boom")))
    monkeypatch.setitem(bench.PROVIDERS, "slow", _fake("slow", slow))
    monkeypatch.setitem(bench.PROVIDERS, "off", Provider("off", "off", "test", "", lambda d: (False, "not here"),
                                                           lambda c, i: None))
    r = bench.run(tiny(providers=["oomer", "refuser", "crasher", "slow", "off", "sdpa"], budget_s=0.2,
                       seqlens=[16, 32]))
    st = {(x["provider"], x["N"]): (x["status"], x["message"]) for x in r["results"]}
    assert st[("oomer", 16)][0] == "oom" and st[("oomer", 32)][0] == "oom"     # not retried at larger N
    assert st[("refuser", 16)][0] == "unsupported"
    assert st[("crasher", 16)] == ("error", "RuntimeError: boom")
    assert st[("slow", 16)][0] == "timeout" and st[("slow", 32)][0] == "timeout"
    assert st[("off", 16)] == ("unavailable", "not here")
    assert st[("sdpa", 16)][0] == st[("sdpa", 32)][0] == "ok"
    assert "OOM" in bench.format_table(r)


def test_flex_backward_on_cpu_is_unsupported_without_compiling():
    r = bench.run(tiny(seqlens=[16], modes=["fwdbwd"], providers=["flex", "sdpa"]))
    row = next(x for x in r["results"] if x["provider"] == "flex")
    if r["providers"]["flex"]["available"]:
        assert row["status"] == "unsupported" and "backward on CPU" in row["message"]
