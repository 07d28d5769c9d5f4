"""backend="sdpa": delegates to torch SDPA only where the call fits DESIGN §2 exactly; raises otherwise."""
import pytest
import torch

import qkv
from qkv.testing import compare, make_qkv

SERVED = {
    "plain": dict(),
    "causal_square": dict(causal=True),
    "scale": dict(scale=0.3),
    "bool_mask": dict(mask=torch.rand(2, 1, 21, 30, generator=torch.Generator().manual_seed(0)) < 0.7),
    "window": dict(window=(4, 2)),
    "bias": dict(bias=torch.randn(21, 30, generator=torch.Generator().manual_seed(1))),
    "mask_mod": dict(mask=lambda b, h, i, j: (i + j) % 4 != 0),
}


@pytest.mark.parametrize("case", list(SERVED))
@pytest.mark.parametrize("gqa", [False, True])
def test_sdpa_matches_oracle(case, gqa):
    q, k, v = make_qkv(2, 4, 2 if gqa else 4, 21, 30, 16, seed=3)
    compare("sdpa", q, k, v, grad=True, **SERVED[case])


@pytest.mark.parametrize("Nq,Nk", [(5, 17), (17, 5), (9, 9)])
def test_sdpa_causal_is_bottom_right(Nq, Nk):
    # SDPA's is_causal is top-left: the sdpa engine must not use it when Nq != Nk
    q, k, v = make_qkv(1, 2, 2, Nq, Nk, 8, seed=4)
    compare("sdpa", q, k, v, causal=True, grad=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sdpa_dtypes(dtype):
    q, k, v = make_qkv(1, 2, 2, 33, 33, 16, dtype=dtype, seed=5)
    compare("sdpa", q, k, v, causal=True, grad=True)
    compare("sdpa", q, k, v, window=(5, 0), grad=True)


def test_sdpa_fully_masked_rows_are_zero():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 8, seed=6)
    m = torch.ones(8, 8, dtype=torch.bool)
    m[2] = False
    eng, _, _ = compare("sdpa", q, k, v, mask=m, grad=True)
    assert torch.all(eng["out"][:, :, 2] == 0)
    assert torch.isfinite(eng["dq"]).all() and torch.all(eng["dq"][:, :, 2] == 0)
    q2, k2, v2 = make_qkv(1, 2, 2, 8, 3, 8, seed=7)   # Nq > Nk causal: the first 5 rows see nothing
    eng, _, _ = compare("sdpa", q2, k2, v2, causal=True, grad=True)
    assert torch.all(eng["out"][:, :, :5] == 0)


def test_sdpa_bias_with_grad_and_empty_rows():
    q, k, v = make_qkv(1, 2, 2, 8, 10, 8, seed=8)
    bias = torch.randn(1, 2, 8, 10, generator=torch.Generator().manual_seed(0)).requires_grad_()
    m = torch.ones(8, 10, dtype=torch.bool)
    m[4] = False
    eng, _, _ = compare("sdpa", q, k, v, bias=bias, mask=m, grad=True)
    assert torch.all(eng["dbias"][:, :, 4] == 0)


UNSERVED = {
    "score_mod": (dict(score_mod=lambda s, b, h, i, j: s), "score_mod"),
    "softcap": (dict(softcap=2.0), "softcap"),
    "alibi": (dict(alibi_slopes=torch.ones(2)), "alibi"),
    "dropout": (dict(dropout_p=0.1), "dropout"),
    "return_lse": (dict(return_lse=True), "lse|logsumexp"),
}


@pytest.mark.parametrize("case", list(UNSERVED))
def test_sdpa_explicit_refuses_what_it_cannot_serve(case):
    kw, why = UNSERVED[case]
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8)
    calls = []
    if "score_mod" in kw:
        kw = dict(score_mod=lambda s, b, h, i, j: (s.numel() > 1 and calls.append(1)) or s)  # 1: a probe
    with pytest.raises(ValueError, match=r"(?is)sdpa.*(" + why + ")"):
        qkv.attention(q, k, v, backend="sdpa", **kw)
    assert not calls, "score_mod was evaluated before refusing"
    # auto serves the same call (it chooses another engine)
    out = qkv.attention(q, k, v, backend="auto", **kw)
    assert out is not None


def test_sdpa_zero_sizes():
    q, k, v = make_qkv(1, 2, 2, 0, 5, 8)
    assert qkv.attention(q, k, v, backend="sdpa").shape == (1, 2, 0, 8)
    q, k, v = make_qkv(1, 2, 2, 4, 0, 8)
    out = qkv.attention(q, k, v, backend="sdpa")
    assert out.shape == (1, 2, 4, 8) and torch.all(out == 0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_sdpa_decode_step_without_mask(with_bias):
    """One query under bottom-right causal sees every key: sdpa serves it with no mask (auto picks it)."""
    q, k, v = make_qkv(2, 4, 2, 1, 37, 16, seed=2)
    kw = {"causal": True}
    bias = torch.randn(1, 4, 1, 37, dtype=torch.float64).float() if with_bias else None
    assert qkv.select_backend(q, k, v, bias=bias, **kw).name == "sdpa"
    compare("sdpa", q, k, v, grad=True, bias=bias, **kw)


def test_dense_mask_is_built_in_bounded_chunks_and_counted():
    # auto with a dense mask_mod checked only the bool mask's N² bytes, while evaluating the mask_mod on int64
    # index grids plus SDPA's float copy cost 19x that. The mask is now built a chunk of rows at a time into
    # one additive mask of q's dtype (which SDPA reads as it is), and that is what supports() counts.
    from qkv.core.call import prepare
    from qkv.engines import sdpa
    seen = [0]

    def mm(b, h, i, j):
        seen[0] = max(seen[0], torch.broadcast_shapes(b.shape, h.shape, i.shape, j.shape).numel())
        return (i - j) % 3 != 1

    q, k, v = make_qkv(1, 2, 2, 600, 700, 8)
    old = sdpa.MASK_CHUNK_ELEMENTS
    sdpa.MASK_CHUNK_ELEMENTS = 2 * 700 * 50
    try:
        out = qkv.attention(q, k, v, mask=mm, backend="sdpa")
    finally:
        sdpa.MASK_CHUNK_ELEMENTS = old
    assert 1 < seen[0] <= 2 * 700 * 50
    torch.testing.assert_close(out, qkv.attention(q, k, v, mask=mm, backend="reference"), rtol=0, atol=1e-5)
    call = prepare(q, k, v, mask=mm)
    assert sdpa.peak_bytes(call) >= 2 * 600 * 700 * 4           # the (B, Hq, Nq, Nk) fp32 mask
    big = torch.empty(1, 16, 8192, 8, device="meta")
    reasons = sdpa.ENGINE.supports(prepare(big, big, big, mask=mm))
    assert any("attn_mask" in r for r in reasons)                # 4 GiB of fp32 mask: over the 2 GiB budget
    assert qkv.select_backend(big, big, big, mask=mm).name == "tiled"
