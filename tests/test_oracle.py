"""Self-checks of the test oracle (qkv.testing) against PyTorch's own SDPA math.

These do not import qkv: they make sure the yardstick every other test uses is right.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from qkv.testing import alibi_slopes_paper, check_fa, make_qkv, naive_attention, visibility


def sdpa64(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (7, 7), (5, 13), (13, 5)])
def test_plain_matches_sdpa(Nq, Nk):
    q, k, v = make_qkv(2, 3, 3, Nq, Nk, 11, Dv=6, dtype=torch.float64)
    out, lse = naive_attention(q, k, v)
    torch.testing.assert_close(out, sdpa64(q, k, v), rtol=1e-12, atol=1e-12)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(11)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


def test_causal_square_matches_sdpa_is_causal():
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8, dtype=torch.float64)
    out, _ = naive_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, sdpa64(q, k, v, is_causal=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("Nq,Nk", [(3, 10), (10, 10)])
def test_causal_bottom_right_is_explicit_mask(Nq, Nk):
    q, k, v = make_qkv(1, 2, 2, Nq, Nk, 8, dtype=torch.float64)
    i = torch.arange(Nq)[:, None]
    j = torch.arange(Nk)[None, :]
    m = j <= i + (Nk - Nq)
    out, _ = naive_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, sdpa64(q, k, v, attn_mask=m), rtol=1e-12, atol=1e-12)


def test_bottom_right_causal_picture():
    # FlashAttention's picture for Nq=2, Nk=5: row 0 sees keys 0..3, row 1 sees 0..4.
    vis = visibility(1, 1, 2, 5, causal=True)[0, 0]
    assert vis.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    vis = visibility(1, 1, 5, 2, causal=True)[0, 0]
    assert vis.tolist() == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]


def test_window_definition():
    vis = visibility(1, 1, 4, 6, window=(1, 0))[0, 0]
    # off = 2: query i sees keys i+1 .. i+2
    assert vis.tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]
    assert torch.equal(visibility(1, 1, 4, 6, window=(None, 0)), visibility(1, 1, 4, 6, causal=True))
    # causal forces right = 0
    assert torch.equal(visibility(1, 1, 4, 6, causal=True, window=(1, 5)), visibility(1, 1, 4, 6, window=(1, 0)))


def test_gqa_bias_softcap_alibi_score_mod_against_sdpa_with_float_mask():
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 5, 7, 8
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=torch.float64)
    bias = torch.randn(B, 1, Nq, Nk, dtype=torch.float64)
    slopes = torch.rand(B, Hq, dtype=torch.float64)
    cap = 0.7
    out, lse = naive_attention(
        q, k, v, bias=bias, alibi_slopes=slopes, softcap=cap, score_mod=lambda s, b, h, i, j: s + 0.1 * h,
    )
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(D)
    s = cap * torch.tanh(s / cap)
    i = torch.arange(Nq)[:, None]
    j = torch.arange(Nk)[None, :]
    s = s - slopes[:, :, None, None] * (i + Nk - Nq - j).abs() + bias + 0.1 * torch.arange(Hq).view(1, Hq, 1, 1)
    ref = torch.softmax(s, -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


def test_fully_masked_rows_zero_and_grad_finite():
    q, k, v = make_qkv(1, 1, 1, 4, 4, 8, dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_()
    m = torch.ones(4, 4, dtype=torch.bool)
    m[1] = False
    out, lse = naive_attention(q, k, v, mask=m)
    assert torch.all(out[0, 0, 1] == 0) and lse[0, 0, 1] == float("-inf")
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[0, 0, 1] == 0)


def test_alibi_slopes_paper_values():
    s8 = alibi_slopes_paper(8)
    torch.testing.assert_close(s8, torch.tensor([2.0 ** -(i + 1) for i in range(8)], dtype=torch.float64))
    s12 = alibi_slopes_paper(12)
    assert len(s12) == 12 and s12[0] == 2 ** -1 and s12[8] == 2 ** -0.5


def test_fa_rule_helper_can_fail():
    o = torch.zeros(3)
    assert check_fa("x", torch.tensor([0.0, 0.0, 1e-3]), o, torch.full((3,), 1e-7)) != ""
    assert check_fa("x", torch.tensor([0.0, 0.0, 1e-6]), o, torch.full((3,), 1e-7)) == ""
    assert check_fa("x", torch.tensor([float("nan"), 0, 0]), o, o) != ""


def test_fa_rule_floor_is_one_step_of_the_result_dtype():
    # the plain bf16 computation landed next to the exact value by luck: an engine one bf16 step away passes,
    # three steps away fails
    o = torch.tensor([0.1234], dtype=torch.float64)
    step = torch.finfo(torch.bfloat16).eps * 0.1234
    lucky = (o + 1e-6).to(torch.bfloat16)
    assert check_fa("x", (o + step).to(torch.bfloat16), o, lucky) == ""
    assert check_fa("x", (o + 3 * step).to(torch.bfloat16), o, lucky) != ""
