"""``qkv kernels``: the triton engine's default launch configurations compile for Ampere (sm_80) and Hopper
(sm_90) with no GPU here, without register spills, within the target's shared memory, on tensor cores (mma /
wgmma). Compiles run in two processes with Triton's cache in a temporary directory."""
import json

import pytest

pytest.importorskip("triton")

from qkv.tools import cli


def test_default_configurations_compile_without_spills(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    rc = cli.main(["kernels", "--arch", "sm_80", "sm_90", "--head-dim", "128", "--dtype", "bf16",
                   "--variant", "plain", "masked", "--jobs", "2", "--json", str(out)])
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())
    bad = [r for r in rows if not r["ok"]]
    assert rc == 0 and not bad, text
    kinds = {(r["kernel"], r["arch"], r["variant"]) for r in rows}
    for arch in (80, 90):
        for k in ("fwd", "bwd_dq", "bwd_dkdv"):
            assert {(k, arch, "plain"), (k, arch, "masked")} <= kinds
        assert ("decode", arch, "plain") in kinds and ("merge", arch, "plain") in kinds
    for r in rows:
        if r["kernel"] in ("fwd", "bwd_dq", "bwd_dkdv"):
            assert r["mma"] == ("wgmma" if r["arch"] == 90 else "mma"), r
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] == 0 and r["shared"] <= r["smem_limit"]
    assert "within their target's registers" in text


def test_small_fp32_configurations_compile_without_spills(tmp_path, capsys):
    """fp32 at D = 32: where ptxas capped the D = 64 configurations at 128 registers and spilled (the full report,
    benchmarks/results/triton_kernels.json, compiles every head dim and dtype)."""
    out = tmp_path / "kernels.json"
    rc = cli.main(["kernels", "--arch", "sm_80", "sm_90", "--head-dim", "32", "--dtype", "fp32", "--kernel", "fwd",
                   "bwd_dq", "bwd_dkdv", "--jobs", "2", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert rc == 0 and len(rows) == 18 and all(r["ok"] for r in rows), capsys.readouterr().out


def test_kernels_command_reports_a_failure_with_status_1(tmp_path, capsys, monkeypatch):
    """A configuration over the shared-memory limit is reported (ok = no) and makes the command exit 1."""
    from qkv.engines.triton import configs
    monkeypatch.setitem(configs.SMEM_LIMIT, 90, 16)
    rc = cli.main(["kernels", "--arch", "sm_90", "--head-dim", "64", "--kernel", "merge", "--jobs", "1",
                   "--dtype", "bf16"])
    text = capsys.readouterr().out
    assert rc == 1 and "NO" in text and "0/1 within" in text


def test_kernels_command_rejects_unknown_targets(capsys):
    assert cli.main(["kernels", "--arch", "sm_75"]) == 2
    assert "invalid choice" in capsys.readouterr().err
