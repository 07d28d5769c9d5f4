"""qkv.scores helpers (ALiBi slopes, softcap, relative_bias) and the score modifiers through attention."""
import pytest
import torch

import qkv
from qkv.testing import alibi_slopes_paper, compare, index_grids, make_qkv


@pytest.mark.parametrize("n", [1, 2, 3, 6, 8, 12, 16, 20, 32])
def test_alibi_slopes_are_the_papers(n):
    got = qkv.scores.alibi_slopes(n)
    assert got.shape == (n,)
    torch.testing.assert_close(got.double(), alibi_slopes_paper(n), rtol=1e-6, atol=0)


def test_alibi_slopes_8_heads_exact():
    assert qkv.scores.alibi_slopes(8).tolist() == [2.0 ** -(i + 1) for i in range(8)]


def test_alibi_slopes_bad_heads():
    with pytest.raises(ValueError, match="n_heads"):
        qkv.scores.alibi_slopes(0)


def test_softcap_helper():
    s = torch.linspace(-100, 100, 41, dtype=torch.float64)
    torch.testing.assert_close(qkv.scores.softcap(s, 30.0), 30.0 * torch.tanh(s / 30.0))
    with pytest.raises(ValueError, match="cap"):
        qkv.scores.softcap(s, 0.0)
    with pytest.raises(ValueError, match="cap"):
        qkv.scores.softcap(s, float("nan"))


def my_relative_bias(table, md, offset=0):
    def mod(s, b, h, q, kv):
        rel = torch.clamp(kv - q - offset, -md, md) + md
        return s + table.to(s.dtype)[h, rel]
    return mod


def test_relative_bias_values():
    H, md = 3, 4
    table = torch.randn(H, 2 * md + 1, dtype=torch.float64)
    mod = qkv.scores.relative_bias(table, md)
    b, h, i, j = index_grids(1, H, 6, 11)
    s = torch.zeros(1, H, 6, 11, dtype=torch.float64)
    got = torch.broadcast_to(mod(s, b, h, i, j), (1, H, 6, 11))
    for hh in range(H):
        for ii in range(6):
            for jj in range(11):
                assert got[0, hh, ii, jj] == table[hh, max(-md, min(md, jj - ii)) + md]


def test_relative_bias_bad_table():
    with pytest.raises(ValueError, match="table"):
        qkv.scores.relative_bias(torch.zeros(2, 5), 3)


def test_relative_bias_through_attention_grads_reach_table():
    H, md = 2, 3
    q, k, v = make_qkv(1, H, H, 9, 9, 8, dtype=torch.float32, seed=3)
    table = torch.randn(H, 2 * md + 1, dtype=torch.float64)
    g = torch.randn(1, H, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    results = {}
    for name, dt in (("qkv", torch.float32), ("oracle", torch.float64)):
        t = table.to(dt).clone().requires_grad_()
        ql, kl, vl = (x.to(dt).clone().requires_grad_() for x in (q, k, v))
        if name == "qkv":
            out = qkv.attention(ql, kl, vl, score_mod=qkv.scores.relative_bias(t, md), backend="tiled")
        else:
            from qkv.testing import naive_attention
            out, _ = naive_attention(ql, kl, vl, score_mod=my_relative_bias(t, md))
        out.backward(g.to(dt))
        results[name] = (out.detach().double(), t.grad, ql.grad)
    assert results["qkv"][1] is not None, "no gradient reached the table captured by the score_mod"
    for a, b in zip(results["qkv"], results["oracle"]):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("slope_shape", ["H", "BH"])
def test_alibi_kwarg_matches_oracle(backend, slope_shape):
    B, H, Nq, Nk = 2, 4, 7, 13
    q, k, v = make_qkv(B, H, 2, Nq, Nk, 16, seed=11)
    slopes = qkv.scores.alibi_slopes(H)
    if slope_shape == "BH":
        slopes = torch.stack([slopes, slopes.flip(0) * 0.5])
    mine = alibi_slopes_paper(H).float()
    if slope_shape == "BH":
        mine = torch.stack([mine, mine.flip(0) * 0.5])
    compare(backend, q, k, v, alibi_slopes=slopes, causal=True, oracle_kw={"alibi_slopes": mine}, grad=True)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_softcap_kwarg_equals_score_mod_helper(backend):
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8, seed=2, scale_in=4.0)
    compare(backend, q, k, v, softcap=2.5, grad=True)
    a = qkv.attention(q, k, v, softcap=2.5, backend=backend)
    b = qkv.attention(q, k, v, score_mod=lambda s, *_: qkv.scores.softcap(s, 2.5), backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
