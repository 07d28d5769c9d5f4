"""qkv.core.call: what prepare accepts and what the Call's semantic methods make of the user's mods."""
import pytest
import torch

import qkv
from qkv.testing import compare, make_qkv


@pytest.mark.parametrize("backend", ["reference", "tiled", "auto"])
def test_score_mod_wider_than_the_scores_is_cast_back(backend):
    # fp32 inputs and a captured fp64 table crashed every engine ("expected scalar type Float but found
    # Double"); FlexAttention casts the mod's result back to the scores' dtype, so does qkv
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, seed=3)
    table = torch.tensor([0.5, -1.25], dtype=torch.float64)
    sm = lambda s, b, h, i, j: s + table[h]
    out = qkv.attention(q, k, v, score_mod=sm, backend=backend)
    assert out.dtype == torch.float32
    compare(backend, q, k, v, score_mod=sm, grad=True)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_score_mod_result_broadcasting_to_the_scores_is_accepted(backend):
    # an elementwise mod may ignore some indices: its result broadcasts to the tile (and is made whole)
    q, k, v = make_qkv(1, 2, 2, 20, 30, 8, seed=4)
    sm = lambda s, b, h, i, j: 0.5 * h.to(s.dtype) + 0.01 * i.to(s.dtype)    # (1, H, rows, 1): no s, no j
    compare(backend, q, k, v, score_mod=sm)
    const = lambda s, b, h, i, j: torch.zeros((), dtype=s.dtype)       # every score 0: uniform weights
    out = qkv.attention(q, k, v, score_mod=const, backend=backend)
    torch.testing.assert_close(out, v.mean(2, keepdim=True).expand_as(out), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "tiled", "auto", "sdpa"])
def test_minus_inf_scores_through_bias_give_fully_masked_rows(backend):
    # "padding as an additive mask": bias[5] = -inf was NaN on tiled/auto (also with dropout, return_lse, a
    # score_mod); reference and SDPA gave 0
    q, k, v = make_qkv(1, 1, 1, 6, 6, 8, seed=5)
    bias = torch.zeros(6, 6)
    bias[5] = float("-inf")
    kws = [dict(softcap=30.0), dict(), dict(dropout_p=0.3), dict(score_mod=lambda s, b, h, i, j: s * 1.5)]
    for kw in kws:
        if backend == "sdpa" and kw:
            continue
        ret = backend in ("reference", "tiled")
        res = qkv.attention(q, k, v, bias=bias, backend=backend, return_lse=ret, **kw)
        out, lse = res if ret else (res, None)
        assert torch.equal(out[0, 0, 5], torch.zeros(8)), (kw, out[0, 0, 5])
        assert torch.isfinite(out[0, 0, :5]).all()
        if lse is not None:
            assert lse[0, 0, 5] == float("-inf")
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    be = backend if backend != "sdpa" else "auto"
    qkv.attention(ql, kl, vl, bias=bias, softcap=30.0, backend=be).sum().backward()
    assert torch.equal(ql.grad[0, 0, 5], torch.zeros(8)) and all(torch.isfinite(t.grad).all() for t in (ql, kl, vl))


@pytest.mark.parametrize("backend", ["reference", "tiled", "auto"])
def test_a_run_of_minus_inf_scores_changes_nothing(backend):
    # N=384, a causal BlockMask of 32-blocks and a score_mod that sets keys j < 352 to -inf: rows 352-383 were
    # NaN on tiled (a run of keys all -inf turned NaN and the merge spread it)
    N = 384
    q, k, v = make_qkv(1, 1, 1, N, N, 16, seed=6)
    bm = qkv.block_mask(qkv.masks.causal(), 1, 1, N, N, block_size=32)
    sm = lambda s, b, h, i, j: torch.where(j < 352, float("-inf"), s)
    compare(backend, q, k, v, mask=bm, score_mod=sm, oracle_mask=qkv.masks.causal().bind(N, N), grad=True,
            check_lse=backend != "auto")
    out = qkv.attention(q, k, v, mask=bm, score_mod=sm, backend=backend)
    assert torch.equal(out[0, 0, :352], torch.zeros(352, 16))       # rows that see only -inf scores
