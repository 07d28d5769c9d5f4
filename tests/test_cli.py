"""The qkv command: bench end to end (tiny), info, show/demo wiring, one-line errors with exit status 2."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import qkv
import qkv.tools
from qkv.tools import cli

TINY = ["--device", "cpu", "--seqlens", "32", "64", "--heads", "2", "--head-dim", "16", "--reps", "2",
        "--warmup", "1", "--quiet"]


def _env():
    src = os.path.dirname(os.path.dirname(os.path.abspath(qkv.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_bench_end_to_end(tmp_path, capsys):
    j, p = tmp_path / "b.json", tmp_path / "b.png"
    rc = cli.main(["bench", *TINY, "--mask", "causal", "--providers", "tiled", "sdpa", "--no-memory",
                   "--json", str(j), "--plot", str(p)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "tiled" in out and "sdpa" in out and "TFLOP/s" in out
    data = json.loads(j.read_text())
    assert data["schema"] == "qkv-bench/1" and data["config"]["seqlens"] == [32, 64]
    assert data["command"].startswith("qkv bench --device cpu")
    assert {r["provider"] for r in data["results"]} == {"tiled", "sdpa"}
    assert all(r["status"] == "ok" for r in data["results"])
    assert p.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,needle", [
    (["bench", "--providers", "bogus"], "unknown provider"),
    (["bench", "--mask", "window:0"], "mask spec"),
    (["bench", "--mask", "diagonal"], "mask spec"),
    (["bench", "--seqlens", "-5"], "positive integer"),
    (["bench", "--seqlens", "0"], "positive integer"),
    (["bench", "--heads", "two"], "positive integer"),
    (["bench", "--mode", "sideways"], "invalid choice"),
    (["bench", "--dtype", "int8"], "dtype"),
    (["bench", "--shapes", "huge"], "shape set"),
    (["bench", "--device", "tpu"], "device"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_one_line_exit_2(argv, needle, capsys, tmp_path):
    j = tmp_path / "never.json"
    assert cli.main([*argv, "--json", str(j)] if argv[0] == "bench" else argv) == 2
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and needle in cap.err and "Traceback" not in cap.err
    assert not j.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_exit_2(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_python_dash_m_and_no_traceback():
    r = subprocess.run([sys.executable, "-m", "qkv", "bench", "--providers", "nope"], capture_output=True,
                       text=True, env=_env(), timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "qkv", "info"], capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch" in r.stdout and "AVX-512" in r.stdout and "tiled" in r.stdout


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "qkv engines on cpu" in out and "AMX" in out and "bench providers" in out
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["versions"]["torch"] == torch.__version__


def test_show_and_demo_are_wired(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)                      # --out directories are made before the work
    calls = []
    fake_viz = types.SimpleNamespace(show=lambda text, **kw: calls.append(("show", text, kw)))
    fake_demo = types.SimpleNamespace(run=lambda **kw: calls.append(("demo", kw)))
    for name, mod in (("viz", fake_viz), ("demo", fake_demo)):
        monkeypatch.setitem(sys.modules, f"qkv.tools.{name}", mod)
        monkeypatch.setattr(qkv.tools, name, mod, raising=False)
    assert cli.main(["show", "the river bank", "--layer", "2", "--head", "3", "--out", "d"]) == 0
    assert cli.main(["show", "hi"]) == 0
    assert cli.main(["demo"]) == 0
    assert cli.main(["demo", "--out", "x"]) == 0
    assert calls == [("show", "the river bank", {"layer": 2, "head": 3, "out": "d"}),
                     ("show", "hi", {"layer": None, "head": None, "out": "qkv-out"}),
                     ("demo", {"out": "qkv-out"}), ("demo", {"out": "x"})]


def test_issue2_bar_commands_parse_and_validate():
    """benchmarks/issue2_bar.py's commands stay valid `qkv bench` invocations (parsed and validated, not run)."""
    import importlib.util

    from qkv.tools import bench
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "issue2_bar.py")
    spec = importlib.util.spec_from_file_location("issue2_bar", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert set(mod.FIGURES) == {"1", "2a", "2b", "3"}
    parser = cli.build_parser()
    for name in mod.FIGURES:
        argv = mod.command(name)
        assert argv[:2] == ["qkv", "bench"]
        a = parser.parse_args(argv[1:])
        cfg = bench.Config(device=a.device, dtypes=a.dtype or ["fp32"], seqlens=a.seqlens, batch=a.batch, heads=a.heads,
                           head_dim=a.head_dim, masks=a.mask, modes=a.mode, providers=a.providers).validate()
        assert a.json.endswith(f"issue2_{name}.json") and a.plot.endswith(f"issue2_{name}.png")
        if name == "2a":
            assert cfg.providers == ["tiled", "sdpa", "flex"] and cfg.masks == ["window:256"]
            assert bench.parse_mask("window:256").window == (255, 0)


def _unwritable(tmp_path):
    """A path no one can write (as root too): below a regular file."""
    f = tmp_path / "file"
    f.write_text("x")
    return str(f / "sub")


@pytest.mark.parametrize("argv,needle", [
    (["show", ""], "TEXT"),
    (["show", "   "], "TEXT"),
    (["show", "hello", "--layer", "99"], "--layer 99 is out of range"),
    (["show", "hello", "--head", "-1"], "--head"),
    (["show", "hello", "--head", "12"], "--head 12 is out of range"),
    (["show", "hello", "--layer", "x"], "--layer"),
    (["show", "hello", "--out", "UNWRITABLE"], "--out"),
    (["demo", "--out", "UNWRITABLE"], "--out"),
    (["bench", "--json", "UNWRITABLE/b.json"], "--json"),
    (["bench", "--plot", "UNWRITABLE"], "--plot"),
    (["check", "--json", "UNWRITABLE"], "--json"),
])
def test_user_errors_are_one_line_exit_2_before_any_work(argv, needle, capsys, monkeypatch, tmp_path):
    # these printed a traceback (exit 1); the bench/check ones only after the whole run
    bad = _unwritable(tmp_path)
    argv = [a.replace("UNWRITABLE", bad) for a in argv]
    monkeypatch.chdir(tmp_path)
    worked = []
    from qkv.tools import bench, check, demo, viz
    monkeypatch.setattr(viz, "show", lambda *a, **kw: worked.append("show"))
    monkeypatch.setattr(demo, "run", lambda *a, **kw: worked.append("demo"))
    monkeypatch.setattr(bench, "run", lambda *a, **kw: worked.append("bench"))
    monkeypatch.setattr(check, "run_checks", lambda *a, **kw: worked.append("check") or [])
    assert cli.main(argv) == 2
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and needle in cap.err and "Traceback" not in cap.err, cap.err
    assert not worked, f"work done before the error: {worked}"


def test_show_with_a_bad_layer_in_a_subprocess_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qkv", "show", "hi", "--layer", "99"], capture_output=True, text=True,
                       env=_env(), timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
