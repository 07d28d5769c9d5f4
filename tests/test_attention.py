"""qkv.attention: the DESIGN §2 semantics on every engine, against the independent fp64 oracle.

Tolerances follow FlashAttention's rule (qkv.testing: check_fa): an engine's error against the fp64
oracle may be at most 2x (3x for gradients) the error of the same math done plainly in the input dtype,
plus 1e-5.
"""
import pytest
import torch

import qkv
from qkv.testing import compare, make_qkv, naive_attention

# "tiled" runs its forward on the CPU kernel where that serves the call; the case "tiled-ops" runs the same
# engine with the kernel off (its torch-ops paths): see _kernel_off.
ENGINES = ["reference", "tiled", pytest.param("tiled", id="tiled-ops"), "auto"]


@pytest.fixture(autouse=True)
def _kernel_off(request, set_options):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "tiled-ops" in callspec.id:
        set_options(cpu_kernel=False)


# ------------------------------------------------------------------------------------------ shapes

SHAPES = [  # B, Hq, Hkv, Nq, Nk, D, Dv
    (1, 1, 1, 1, 1, 40, 40),
    (2, 2, 2, 97, 97, 59, 59),
    (1, 8, 2, 33, 70, 40, 24),     # GQA 8/2, Nq < Nk, Dv != D
    (1, 4, 1, 70, 33, 111, 111),   # MQA, Nq > Nk (causal: first rows see nothing)
    (2, 3, 3, 1, 97, 59, 16),      # decoding
    (1, 2, 2, 97, 1, 40, 40),
    (1, 2, 2, 130, 129, 16, 16),   # crosses the 128 default tile by one
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_shapes_fwd_bwd(engine, shape, causal):
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, Dv, seed=sum(shape))
    compare(engine, q, k, v, causal=causal, grad=True)


@pytest.mark.parametrize("engine", ["tiled", "auto"])
def test_n1023_causal(engine):
    q, k, v = make_qkv(1, 2, 1, 1023, 1023, 40, seed=5)
    compare(engine, q, k, v, causal=True, grad=(engine == "tiled"))


def test_n1023_window_fwd():
    q, k, v = make_qkv(1, 1, 1, 1023, 1023, 59, seed=6)
    compare("tiled", q, k, v, window=(100, 3))


# ------------------------------------------------------------------------------------------ dtypes

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_dtypes(engine, dtype, causal):
    q, k, v = make_qkv(2, 4, 2, 65, 80, 40, dtype=dtype, seed=3)
    eng, _, _ = compare(engine, q, k, v, causal=causal, grad=True)
    assert eng["dq"].dtype == dtype and eng["dk"].dtype == dtype and eng["dv"].dtype == dtype


def test_fp64_is_accumulated_in_fp64():
    q, k, v = make_qkv(1, 2, 2, 33, 33, 16, dtype=torch.float64, seed=4)
    o, _ = naive_attention(q, k, v, causal=True)
    for engine in ("reference", "tiled"):
        got = qkv.attention(q, k, v, causal=True, backend=engine)
        assert (got - o).abs().max().item() < 1e-12, engine


# ------------------------------------------------------------------------------------------ layouts

@pytest.mark.parametrize("engine", ENGINES)
def test_non_contiguous_inputs(engine):
    B, H, N, D = 2, 4, 37, 24
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, N, H, D, generator=g).transpose(1, 2)              # (B, H, N, D) view of BNHD
    kv = torch.randn(B, N, 2, H, D, generator=g)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)       # interleaved packed kv
    assert not q.is_contiguous() and not k.is_contiguous()
    bias = torch.randn(N, N, generator=g).t().expand(B, H, N, N)          # transposed, zero strides
    compare(engine, q, k, v, causal=True, bias=bias.requires_grad_(False), grad=True)


# ------------------------------------------------------------------------------------------ masks

WINDOWS = [(3, 0), (None, 0), (3, None), (0, 0), (0, 2), (2, 5), (None, None), (0, None), (40, 40)]


@pytest.mark.parametrize("engine", ["reference", "tiled"])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("Nq,Nk", [(13, 29), (29, 13), (20, 20)])
@pytest.mark.parametrize("causal", [False, True])
def test_windows(engine, window, Nq, Nk, causal):
    q, k, v = make_qkv(1, 2, 2, Nq, Nk, 16, seed=Nq * Nk)
    compare(engine, q, k, v, window=window, causal=causal, grad=(Nq == 13))


@pytest.mark.parametrize("engine", ENGINES)
def test_window_small_tiles_skip_correctly(engine):
    # long enough that the tiled engine skips whole tiles on both sides of the band
    q, k, v = make_qkv(1, 1, 1, 300, 400, 16, seed=9)
    compare(engine, q, k, v, window=(20, 7), grad=True)


MASK_SHAPES = [(13, 21), (1, 1, 13, 21), (2, 1, 13, 21), (1, 3, 13, 21), (2, 3, 13, 21), (2, 3, 1, 21),
               (21,), (1, 1, 1, 1), (2, 1, 13, 1)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mshape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bool_mask_broadcast(engine, mshape):
    q, k, v = make_qkv(2, 3, 3, 13, 21, 16, seed=2)
    g = torch.Generator().manual_seed(len(mshape) * 31 + sum(mshape))
    m = torch.rand(*mshape, generator=g) < 0.6
    compare(engine, q, k, v, mask=m, grad=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_bool_mask_and_causal_and_window(engine):
    q, k, v = make_qkv(2, 2, 2, 30, 41, 16, seed=8)
    m = torch.rand(2, 1, 30, 41, generator=torch.Generator().manual_seed(3)) < 0.8
    compare(engine, q, k, v, mask=m, causal=True, window=(9, None), grad=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_mask_mod_depending_on_b_and_h(engine):
    def mm(b, h, q_idx, kv_idx):
        return ((q_idx + kv_idx * (h + 1) + b) % 5 != 0) & (kv_idx <= q_idx + 7)

    q, k, v = make_qkv(2, 4, 2, 19, 26, 16, seed=10)
    compare(engine, q, k, v, mask=mm, grad=True)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("block_size", [8, (16, 4), None])
def test_block_mask_of_plain_mask_mod(engine, block_size):
    def mm(b, h, q_idx, kv_idx):
        return (q_idx // 10 == kv_idx // 10) | (kv_idx < 3)  # block-diagonal documents + a sink

    B, H, N = 2, 2, 150
    q, k, v = make_qkv(B, H, H, N, N, 16, seed=11)
    bm = qkv.block_mask(mm, B, H, N, N, block_size=block_size)
    compare(engine, q, k, v, mask=bm, oracle_mask=mm, grad=True)
    # the BlockMask AND causal
    compare(engine, q, k, v, mask=bm, causal=True, oracle_mask=mm, grad=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_block_mask_from_bool_tensor(engine):
    N = 70
    q, k, v = make_qkv(1, 2, 2, N, N, 16, seed=12)
    m = torch.rand(1, 2, N, N, generator=torch.Generator().manual_seed(1)) < 0.3
    bm = qkv.block_mask(m, 1, 2, N, N, block_size=16)
    compare(engine, q, k, v, mask=bm, oracle_mask=m, grad=True)


def test_block_mask_reused_across_calls():
    N = 64
    bm = qkv.block_mask(qkv.masks.causal(), 1, 1, N, N, block_size=16)
    for seed in range(3):
        q, k, v = make_qkv(1, 1, 1, N, N, 8, seed=seed)
        compare("tiled", q, k, v, mask=bm, oracle_kw={"causal": True, "mask": None})


# ------------------------------------------------------------------------------------------ mods

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bshape", [(2, 3, 11, 17), (1, 3, 11, 17), (2, 1, 1, 17), (11, 17), (17,), (2, 3, 11, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_bias_with_grad(engine, bshape):
    q, k, v = make_qkv(2, 3, 3, 11, 17, 16, seed=13)
    bias = torch.randn(*bshape, generator=torch.Generator().manual_seed(2)).requires_grad_()
    eng, _, _ = compare(engine, q, k, v, bias=bias, causal=True, grad=True)
    assert eng["dbias"].shape == bias.shape


@pytest.mark.parametrize("engine", ENGINES)
def test_bias_grad_fp16(engine):
    q, k, v = make_qkv(1, 2, 2, 20, 24, 16, dtype=torch.float16, seed=14)
    bias = torch.randn(1, 2, 20, 24, generator=torch.Generator().manual_seed(2)).half().requires_grad_()
    compare(engine, q, k, v, bias=bias, grad=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_bias_without_grad_and_bias_inf(engine):
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8, seed=15)
    bias = torch.zeros(9, 9)
    bias[:, 4] = float("-inf")  # -inf bias behaves like a mask
    compare(engine, q, k, v, bias=bias, grad=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_softcap(engine):
    q, k, v = make_qkv(2, 2, 2, 17, 23, 16, seed=16, scale_in=3.0)
    compare(engine, q, k, v, softcap=5.0, causal=True, grad=True)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("slopes_shape", ["H", "BH"])
def test_alibi(engine, slopes_shape):
    B, H = 2, 4
    q, k, v = make_qkv(B, H, 2, 12, 31, 16, seed=17)
    slopes = torch.rand(H) if slopes_shape == "H" else torch.rand(B, H)
    compare(engine, q, k, v, alibi_slopes=slopes, grad=True)
    compare(engine, q, k, v, alibi_slopes=slopes, causal=True, window=(5, None), grad=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_score_mod_with_grad(engine):
    def sm(s, b, h, q_idx, kv_idx):
        return s * (1.0 + 0.1 * h) + torch.sin(s) - 0.05 * (q_idx - kv_idx).abs() + 0.2 * b

    q, k, v = make_qkv(2, 3, 3, 14, 19, 16, seed=18)
    compare(engine, q, k, v, score_mod=sm, grad=True)


@pytest.mark.parametrize("engine", ["reference", "tiled"])
def test_score_mod_captured_tensor_grad(engine):
    # a score_mod closing over a learnable tensor (FlexAttention's bias-by-closure): its gradient arrives
    B, H, Nq, Nk = 1, 2, 10, 12
    q, k, v = make_qkv(B, H, H, Nq, Nk, 8, seed=19)
    g = torch.randn(B, H, Nq, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = {}
    for who in ("qkv", "oracle"):
        dt = torch.float32 if who == "qkv" else torch.float64
        w = torch.linspace(-1, 1, H * Nk, dtype=dt).view(H, Nk).clone().requires_grad_()
        ql, kl, vl = (x.to(dt).clone().requires_grad_() for x in (q, k, v))

        def sm(s, b, h, q_idx, kv_idx, w=w):
            return s + w[h, kv_idx] * q_idx

        if who == "qkv":
            out = qkv.attention(ql, kl, vl, score_mod=sm, causal=True, backend=engine)
        else:
            out, _ = naive_attention(ql, kl, vl, score_mod=sm, causal=True)
        out.backward(g.to(dt))
        assert w.grad is not None, "captured tensor got no gradient"
        grads[who] = (out.detach().double(), w.grad.double(), ql.grad.double())
    for a, b in zip(grads["qkv"], grads["oracle"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("engine", ["reference", "tiled"])
def test_score_mod_captured_tensor_grad_only(engine):
    # only the captured tensor requires grad: it must still receive one
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8, seed=20)
    w = torch.zeros(2, 6, requires_grad=True)
    out = qkv.attention(q, k, v, score_mod=lambda s, b, h, i, j: s + w[h, j], backend=engine)
    assert out.requires_grad, "output does not depend on the captured tensor"
    out.sum().backward()
    w64 = torch.zeros(2, 6, dtype=torch.float64, requires_grad=True)
    o64, _ = naive_attention(q.double(), k.double(), v.double(), score_mod=lambda s, b, h, i, j: s + w64[h, j])
    o64.sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_all_mods_in_order(engine):
    # softcap -> alibi -> bias -> score_mod; a large bias and a score_mod that is not additive make
    # every other order give a different answer
    B, H, Nq, Nk = 2, 2, 9, 15
    q, k, v = make_qkv(B, H, 1, Nq, Nk, 16, seed=21, scale_in=2.0)
    bias = (3.0 * torch.randn(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(5))).requires_grad_()

    def sm(s, b, h, i, j):
        return torch.where(s > 0, s * 1.5, s * 0.5)

    compare(engine, q, k, v, softcap=2.0, alibi_slopes=torch.tensor([0.3, 0.1]), bias=bias, score_mod=sm,
            causal=True, window=(6, None), grad=True)


def test_order_matters_sanity():
    # the oracle's order is distinguishable from the other obvious order (cap after bias)
    q, k, v = make_qkv(1, 1, 1, 5, 5, 8, dtype=torch.float64, seed=22, scale_in=3.0)
    bias = 4.0 * torch.randn(5, 5, dtype=torch.float64)
    a = qkv.attention(q, k, v, softcap=1.0, bias=bias, backend="reference")
    b, _ = naive_attention(q, k, v, score_mod=lambda s, *_: 1.0 * torch.tanh((s + bias) / 1.0))
    assert (a - b).abs().max() > 1e-3
    o, _ = naive_attention(q, k, v, softcap=1.0, bias=bias)
    assert (a - o).abs().max() < 1e-10


@pytest.mark.parametrize("engine", ENGINES)
def test_scale(engine):
    q, k, v = make_qkv(1, 2, 2, 10, 10, 16, seed=23)
    compare(engine, q, k, v, scale=0.7, grad=True)
    compare(engine, q, k, v, scale=0.0)


# ------------------------------------------------------------------------------------------ empty rows

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows(engine, dtype):
    B, H, Nq, Nk = 2, 2, 9, 12
    q, k, v = make_qkv(B, H, H, Nq, Nk, 8, dtype=dtype, seed=24)
    m = torch.rand(B, H, Nq, Nk, generator=torch.Generator().manual_seed(6)) < 0.5
    m[0, 1, 3] = False
    m[1, :, 0] = False
    m[:, :, 8] = False
    bias = torch.randn(B, H, Nq, Nk, generator=torch.Generator().manual_seed(7)).to(dtype).requires_grad_()
    eng, _, _ = compare(engine, q, k, v, mask=m, bias=bias, grad=True)
    empty = ~m.any(-1)
    assert torch.all(eng["out"][empty] == 0)
    assert torch.all(eng["lse"][empty] == float("-inf"))
    for key in ("dq", "dk", "dv", "dbias"):
        assert torch.isfinite(eng[key]).all(), key
    assert torch.all(eng["dq"][empty] == 0)
    assert torch.all(eng["dbias"][empty] == 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_rows_from_causal_nq_gt_nk(engine):
    q, k, v = make_qkv(1, 2, 2, 10, 4, 8, seed=25)
    eng, _, _ = compare(engine, q, k, v, causal=True, grad=True)
    assert torch.all(eng["out"][:, :, :6] == 0) and torch.all(eng["lse"][:, :, :6] == float("-inf"))
    assert torch.all(eng["dq"][:, :, :6] == 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_everything_masked(engine):
    q, k, v = make_qkv(1, 2, 2, 140, 140, 8, seed=26)
    eng, _, _ = compare(engine, q, k, v, mask=lambda b, h, i, j: i < 0, grad=True)
    assert torch.all(eng["out"] == 0) and torch.all(eng["lse"] == float("-inf"))
    for key in ("dq", "dk", "dv"):
        assert torch.all(eng[key] == 0), key


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_row_with_score_mod_and_softcap(engine):
    q, k, v = make_qkv(1, 1, 1, 6, 6, 8, seed=27)
    m = torch.ones(6, 6, dtype=torch.bool)
    m[2] = False
    eng, _, _ = compare(engine, q, k, v, mask=m, softcap=3.0, score_mod=lambda s, b, h, i, j: s * 2, grad=True)
    assert torch.all(eng["dq"][0, 0, 2] == 0)


# ------------------------------------------------------------------------------------------ zero sizes

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 5), (1, 2, 2, 0, 5), (1, 2, 2, 5, 0), (1, 2, 2, 0, 0),
                                   (2, 4, 2, 0, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_zero_sizes(engine, shape, causal):
    B, Hq, Hkv, Nq, Nk = shape
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, 8, 6)
    ql, kl, vl = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = qkv.attention(ql, kl, vl, causal=causal, return_lse=True, backend=engine)
    assert out.shape == (B, Hq, Nq, 6) and lse.shape == (B, Hq, Nq)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert torch.all(out == 0)
    assert torch.all(lse == float("-inf"))  # (empty if Nq == 0; -inf rows if Nk == 0)
    out.sum().backward()
    for t in (ql, kl, vl):
        assert t.grad is not None and t.grad.shape == t.shape and torch.all(t.grad == 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_head_dim_v(engine):
    q, k, v = make_qkv(1, 2, 2, 5, 7, 8, 0)
    out = qkv.attention(q, k, v, backend=engine)
    assert out.shape == (1, 2, 5, 0)


# ------------------------------------------------------------------------------------------ overflow

def _constant(value, dtype, shape, signs, seed):
    """q, k, v filled with ±value (random signs when ``signs``), rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(3):
        x = torch.full(shape, value)
        if signs:
            x = x * (torch.randint(0, 2, shape, generator=g) * 2 - 1)
        xs.append(x.to(dtype))
    return xs


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("signs", [False, True])
def test_overflow_fp16_256(engine, signs):
    q, k, v = _constant(256.0, torch.half, (1, 32, 23, 80), signs, seed=0)
    eng, ora, _ = compare(engine, q, k, v, grad=False)
    assert torch.isfinite(eng["out"]).all() and torch.isfinite(eng["lse"]).all()
    eng, _, _ = compare(engine, q, k, v, causal=True)
    assert torch.isfinite(eng["out"]).all()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("signs", [False, True])
def test_overflow_bf16_133120(engine, signs):
    q, k, v = _constant(133120.0, torch.bfloat16, (1, 4, 37, 64), signs, seed=1)
    assert q.float().abs().max().item() == 133120.0  # representable exactly in bf16
    eng, _, _ = compare(engine, q, k, v, causal=True)
    assert torch.isfinite(eng["out"]).all() and torch.isfinite(eng["lse"]).all()


@pytest.mark.parametrize("engine", ENGINES)
def test_overflow_grads_finite(engine):
    q, k, v = (torch.full((1, 2, 9, 80), 256.0).half() for _ in range(3))
    ql, kl, vl = (x.clone().requires_grad_() for x in (q, k, v))
    qkv.attention(ql, kl, vl, causal=True, backend=engine).float().sum().backward()
    for t in (ql, kl, vl):
        assert torch.isfinite(t.grad).all()


# ------------------------------------------------------------------------------------------ return_lse

@pytest.mark.parametrize("engine", ENGINES)
def test_return_lse_flag(engine):
    q, k, v = make_qkv(1, 2, 2, 7, 9, 8)
    out = qkv.attention(q, k, v, backend=engine)
    assert isinstance(out, torch.Tensor)
    res = qkv.attention(q, k, v, backend=engine, return_lse=True)
    assert isinstance(res, tuple) and len(res) == 2
    # auto may pick another engine when lse is wanted (SDPA returns none): equal within fp32 rounding
    tol = 0 if engine != "auto" else 1e-6
    torch.testing.assert_close(res[0], out, rtol=tol, atol=tol)


@pytest.mark.parametrize("engine", ["reference", "tiled"])
def test_lse_gradient(engine):
    # lse is differentiable: d lse_i / d s_ij = p_ij
    q, k, v = make_qkv(1, 2, 2, 11, 13, 8, dtype=torch.float64, seed=28)
    ql = q.clone().requires_grad_()
    kl = k.clone().requires_grad_()
    out, lse = qkv.attention(ql, kl, v, causal=True, return_lse=True, backend=engine)
    (lse.masked_fill(torch.isinf(lse), 0).sum() + out.sum()).backward()
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    o2, l2 = naive_attention(q2, k2, v, causal=True)
    (l2.sum() + o2.sum()).backward()
    torch.testing.assert_close(ql.grad, q2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl.grad, k2.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ dropout

def _drop(engine, q, k, v, p, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    return qkv.attention(q, k, v, dropout_p=p, generator=g, backend=engine, **kw)


@pytest.mark.parametrize("engine", ["reference", "tiled"])
def test_dropout_reproducible_and_zero(engine):
    q, k, v = make_qkv(2, 2, 2, 20, 25, 8, seed=29)
    a = _drop(engine, q, k, v, 0.3, 123)
    b = _drop(engine, q, k, v, 0.3, 123)
    c = _drop(engine, q, k, v, 0.3, 124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    plain = qkv.attention(q, k, v, backend=engine)
    assert torch.equal(qkv.attention(q, k, v, dropout_p=0.0, backend=engine), plain)
    assert torch.equal(_drop(engine, q, k, v, 0.0, 5), plain)


def test_dropout_engines_agree_for_one_generator_seed():
    q, k, v = make_qkv(2, 4, 2, 150, 140, 16, seed=30)
    a = _drop("reference", q, k, v, 0.2, 7, causal=True)
    b = _drop("tiled", q, k, v, 0.2, 7, causal=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", ["reference", "tiled"])
def test_dropout_mask_semantics_and_backward(engine):
    # with v = I the output *is* the dropped probability matrix: each entry is 0 or P/(1-p)
    B, H, Nq, Nk, p = 1, 2, 24, 24, 0.25
    q, k, _ = make_qkv(B, H, H, Nq, Nk, 8, dtype=torch.float64, seed=31)
    v = torch.eye(Nk, dtype=torch.float64).expand(B, H, Nk, Nk).contiguous()
    _, _, P = naive_attention(q, k, v, causal=True, return_probs=True)
    out = _drop(engine, q, k, v, p, 11, causal=True)
    keep = out != 0
    vis = P > 0
    assert torch.all(keep <= vis)
    torch.testing.assert_close(out[keep], (P / (1 - p))[keep], rtol=1e-10, atol=1e-12)
    frac = 1 - keep[vis].double().mean().item()
    assert abs(frac - p) < 0.08, f"dropped fraction {frac:.3f}, expected {p}"
    # backward must reuse the same keep-mask: compare to the oracle given that mask
    g = torch.randn(B, H, Nq, Nk, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ql, kl, vl = (x.clone().requires_grad_() for x in (q, k, v))
    o = _drop(engine, ql, kl, vl, p, 11, causal=True)
    o.backward(g)
    q2, k2, v2 = (x.clone().requires_grad_() for x in (q, k, v))
    o2, _ = naive_attention(q2, k2, v2, causal=True, dropout_mask=keep, dropout_p=p)
    o2.backward(g)
    torch.testing.assert_close(o.detach(), o2.detach(), rtol=1e-10, atol=1e-12)
    for a, b in ((ql, q2), (kl, k2), (vl, v2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("engine", ["reference", "tiled"])
def test_dropout_is_unbiased(engine):
    q, k, v = make_qkv(1, 1, 1, 6, 8, 4, seed=32)
    ref = qkv.attention(q, k, v, backend=engine)
    n = 400
    acc = torch.zeros_like(ref)
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        acc += qkv.attention(q, k, v, dropout_p=0.5, generator=g, backend=engine)
    mean = acc / n
    assert (mean - ref).abs().max().item() < 0.15, (mean - ref).abs().max().item()


def test_dropout_uses_global_rng_without_generator():
    q, k, v = make_qkv(1, 1, 1, 8, 8, 4, seed=33)
    torch.manual_seed(1)
    a = qkv.attention(q, k, v, dropout_p=0.4, backend="tiled")
    torch.manual_seed(1)
    b = qkv.attention(q, k, v, dropout_p=0.4, backend="tiled")
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ auto

AUTO_CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(7, 0)),
    "window_causal": dict(window=(7, 3), causal=True),
    "bool_mask": dict(mask=torch.rand(1, 1, 40, 52, generator=torch.Generator().manual_seed(0)) < 0.7),
    "mask_mod": dict(mask=lambda b, h, i, j: (i + j) % 3 != 0),
    "softcap": dict(softcap=3.0),
    "alibi": dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
    "bias": dict(bias=torch.randn(40, 52, generator=torch.Generator().manual_seed(1))),
    "score_mod": dict(score_mod=lambda s, b, h, i, j: s - 0.1 * (i - j).abs()),
    "scale": dict(scale=0.3, causal=True),
}


@pytest.mark.parametrize("case", list(AUTO_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_matches_reference(case, dtype):
    q, k, v = make_qkv(2, 4, 2, 40, 52, 32, dtype=dtype, seed=34)
    kw = AUTO_CASES[case]
    compare("auto", q, k, v, grad=(dtype == torch.float32), **kw)
    a = qkv.attention(q, k, v, backend="auto", **kw)
    r = qkv.attention(q, k, v, backend="reference", **kw)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(a.float(), r.float(), rtol=tol, atol=tol)


def test_default_backend_is_auto():
    q, k, v = make_qkv(1, 2, 2, 9, 9, 8)
    torch.testing.assert_close(qkv.attention(q, k, v, causal=True), qkv.attention(q, k, v, causal=True, backend="auto"))


# ------------------------------------------------------------------------------------------ attention_weights

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_attention_weights(dtype):
    B, H, Nq, Nk = 2, 4, 9, 14
    q, k, _ = make_qkv(B, H, 2, Nq, Nk, 16, dtype=dtype, seed=35)
    m = torch.ones(Nq, Nk, dtype=torch.bool)
    m[3] = False
    bias = torch.randn(B, 1, Nq, Nk, generator=torch.Generator().manual_seed(0))
    kw = dict(causal=True, window=(6, None), mask=m, bias=bias, score_mod=lambda s, b, h, i, j: s * 1.1,
              alibi_slopes=torch.rand(H), softcap=4.0, scale=0.4)
    w = qkv.attention_weights(q, k, **kw)
    assert w.shape == (B, H, Nq, Nk)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    v = torch.zeros(B, 2, Nk, 1, dtype=dtype)
    _, _, P = naive_attention(q, k, v, **kw, return_probs=True)
    tol = 1e-12 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 0.0)
    if dtype == torch.bfloat16:  # inputs are bf16 but the math is fp32: compare to the fp64 oracle loosely
        tol = 1e-5
    assert (w.double() - P).abs().max().item() < max(tol, 1e-12) * 10
    assert torch.all(w[:, :, 3] == 0)
    rows = w.sum(-1)
    nonempty = torch.ones_like(rows, dtype=torch.bool)
    nonempty[:, :, 3] = False
    torch.testing.assert_close(rows[nonempty].double(), torch.ones_like(rows[nonempty]).double(), rtol=1e-5, atol=1e-5)


def test_attention_weights_mask_mod_and_block_mask():
    N = 40
    q, k, _ = make_qkv(1, 2, 2, N, N, 8, dtype=torch.float64, seed=36)
    mm = lambda b, h, i, j: (i // 8) == (j // 8)
    bm = qkv.block_mask(mm, 1, 2, N, N, block_size=8)
    v = torch.zeros(1, 2, N, 1, dtype=torch.float64)
    _, _, P = naive_attention(q, k, v, mask=mm, return_probs=True)
    for m in (mm, bm):
        torch.testing.assert_close(qkv.attention_weights(q, k, mask=m), P, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ backends

def test_backends_listing():
    rows = qkv.backends()
    names = [r[0] for r in rows]
    for n in ("reference", "tiled", "sdpa"):
        assert n in names
    for name, avail, reason in rows:
        assert isinstance(name, str) and isinstance(avail, bool) and isinstance(reason, str)
    d = {r[0]: r[1] for r in rows}
    assert d["reference"] and d["tiled"] and d["sdpa"]


@pytest.mark.parametrize("kw,allowed", [
    (dict(), None),
    (dict(causal=True), None),
    (dict(score_mod=lambda s, b, h, i, j: s), {"reference", "tiled", "triton"}),
    (dict(softcap=2.0), {"reference", "tiled", "triton"}),
    (dict(window=(3, 0)), None),
])
def test_select_backend(kw, allowed):
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8)
    name, reason = qkv.select_backend(q, k, v, **kw)
    assert isinstance(name, str) and name != "auto" and isinstance(reason, str) and reason
    assert name in {r[0] for r in qkv.backends() if r[1]}
    if allowed is not None:
        assert name in allowed, (name, reason)
    # and auto actually runs what it says, with the right answer
    compare("auto", q, k, v, **kw)


@pytest.mark.parametrize("engine", ["reference", "tiled", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lse_only_backward(engine, dtype):
    # a loss on lse alone (out unused): d lse_i / d q_i = scale * sum_j p_ij k_j
    q, k, v = make_qkv(1, 4, 2, 150, 140, 8, dtype=dtype, seed=37)
    ql, kl, vl = (x.clone().requires_grad_() for x in (q, k, v))
    _, lse = qkv.attention(ql, kl, vl, causal=True, window=(40, None), return_lse=True, backend=engine)
    lse.masked_fill(torch.isinf(lse), 0).sum().backward()
    q2, k2, v2 = (x.double().clone().requires_grad_() for x in (q, k, v))
    _, l2 = naive_attention(q2, k2, v2, causal=True, window=(40, None))
    l2.masked_fill(torch.isinf(l2), 0).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(ql.grad.double(), q2.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(kl.grad.double(), k2.grad, rtol=tol, atol=tol)
    assert vl.grad is None or torch.all(vl.grad == 0)


@pytest.mark.parametrize("engine", ["reference", "tiled"])
def test_dropout_does_not_change_lse(engine):
    q, k, v = make_qkv(1, 2, 2, 30, 30, 8, seed=38)
    _, a = qkv.attention(q, k, v, causal=True, return_lse=True, backend=engine)
    _, b = qkv.attention(q, k, v, causal=True, return_lse=True, backend=engine, dropout_p=0.5,
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # engines may take another kernel path
