"""qkv check: the FlashAttention tolerance rule against the fp64 reference, and its exit status."""
import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.tools import check, cli

SMALL = [(1, 2, 1, 9, 13, 8, 8), (1, 2, 2, 12, 7, 8, 6)]


def test_plain_attention_matches_sdpa_fp64():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g, dtype=torch.float64) for _ in range(3))
    vis = torch.ones(11, 11, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(check.plain_attention(q, k, v, vis),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_plain_attention_empty_rows_are_zero_with_zero_grads():
    q, k, v = (torch.randn(1, 1, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    vis = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    vis[..., 2, :] = False
    out = check.plain_attention(q, k, v, vis)
    out.sum().backward()
    assert torch.all(out[..., 2, :] == 0) and torch.isfinite(q.grad).all() and torch.all(q.grad[..., 2, :] == 0)


def test_engines_pass_on_a_small_grid():
    res = check.run_checks("cpu", ["fp32"], ["tiled", "reference", "auto"], shapes=SMALL,
                           masks=["causal", "document", "bool tensor", "mods"])
    assert res and all(r["status"] == "pass" for r in res), [r for r in res if r["status"] != "pass"]
    assert {r["engine"] for r in res} == {"tiled", "reference", "auto"}
    assert any(r["dtype"] == "fp64" for r in res)              # the oracle itself vs DESIGN §2
    text = check.format_results(res)
    assert "pass" in text and "FAIL" not in text


def test_cli_check_exit_status(monkeypatch, capsys):
    monkeypatch.setattr(check, "SHAPES", SMALL[:1])
    monkeypatch.setattr(check, "MASKS", ["causal", "window(6,2)"])
    assert cli.main(["check", "--device", "cpu", "--dtype", "fp32", "--engines", "tiled"]) == 0
    assert "0 failed" in capsys.readouterr().out

    real = qkv.attention

    def broken(q, k, v, **kw):
        out = real(q, k, v, **kw)
        return out * 1.01 if kw.get("backend") == "tiled" else out
    monkeypatch.setattr(qkv, "attention", broken)
    assert cli.main(["check", "--device", "cpu", "--dtype", "fp32", "--engines", "tiled"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "over tolerance" in out


@pytest.mark.parametrize("argv", [["check", "--engines", "warp"], ["check", "--dtype", "int4"],
                                  ["check", "--device", "tpu"]])
def test_cli_check_bad_args(argv, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err
