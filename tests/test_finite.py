"""NaN and inf in the inputs: keys a row cannot see never touch it, on every engine and path
(qkv.core.finite and the engines' exact paths). tests/test_properties.py draws such calls at random; these are
the reproducers, each a case a fix had to close."""
import pytest
import torch

import qkv
from qkv.core.finite import all_finite, finite_result, matmul_skip_zeros
from qkv.testing import naive_attention

NAN, INF = float("nan"), float("inf")
ENGINES = [("reference", True), ("tiled", True), ("tiled", False), ("auto", True)]


def run(backend, kernel, *args, **kw):
    with qkv.options(cpu_kernel=kernel):
        return qkv.attention(*args, backend=backend, **kw)


# ------------------------------------------------------------------------------------ the primitives

def test_matmul_skip_zeros():
    a = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 1.0], [1.0, -1.0, 0.0], [0.0, 2.0, 0.0]])
    b = torch.tensor([[NAN, INF], [1.0, -INF], [3.0, 4.0]])
    got = matmul_skip_zeros(a, b)
    # row 0: 0·NaN skipped, 1·1 + 2·3 = 7 ; 0·inf skipped, 1·(-inf) + 2·4 = -inf
    # row 1: only b[2]; row 2: 1·NaN = NaN ; 1·inf + (-1)·(-inf) = +inf ; row 3: 2·1 = 2, 2·(-inf) = -inf
    want = torch.tensor([[7.0, -INF], [3.0, 4.0], [NAN, INF], [2.0, -INF]])
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    assert torch.isnan((a @ b)[1, 0])                      # what a plain matmul does: 0·NaN = NaN
    x = torch.randn(2, 3, 5, 7)
    y = torch.randn(3, 7, 4)
    assert torch.equal(matmul_skip_zeros(x, y), x @ y)    # finite: the plain matmul, batch dims broadcast


def test_all_finite_and_finite_result():
    assert all_finite(torch.ones(3), None, torch.empty(0))
    assert not all_finite(torch.tensor([1.0, NAN]))
    assert not all_finite(torch.tensor([1.0, -INF]))
    assert all_finite(torch.empty(2, device="meta"))       # no values to check
    assert finite_result(torch.ones(2, 3), torch.tensor([0.5, -INF]))   # -inf: a row that sees nothing
    assert not finite_result(torch.ones(2, 3), torch.tensor([0.5, INF]))
    assert not finite_result(torch.ones(2, 3), torch.tensor([0.5, NAN]))
    assert not finite_result(torch.tensor([[1.0, INF]]))


# ------------------------------------------------------------------- a NaN no query can see (issue 8)

@pytest.mark.parametrize("backend,kernel", ENGINES)
@pytest.mark.parametrize("value", [NAN, INF])
def test_nan_in_a_key_no_row_sees_leaks_nowhere(backend, kernel, value):
    # N=300 causal: the last key is seen by the last row only
    N = 300
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, N, 16, generator=g) for _ in range(3))
    v[0, 0, -1] = value
    out = run(backend, kernel, q, k, v, causal=True)
    bad = ~torch.isfinite(out).all(-1)
    assert bad[0, 0, :-1].sum() == 0 and bad[0, 0, -1], f"{int(bad.sum())} rows not finite"


@pytest.mark.parametrize("backend,kernel", ENGINES)
def test_nan_in_hidden_keys_and_rows_changes_nothing_forward_and_backward(backend, kernel):
    # padding: keys 40.. are hidden from every row (a bool mask, and a -inf bias); row 3 sees nothing
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 50, 8, generator=g) for _ in range(3))
    mask = torch.ones(50, 50, dtype=torch.bool)
    mask[:, 40:] = False
    mask[3] = False
    for kw in (dict(mask=mask), dict(bias=torch.zeros(50, 50).masked_fill(~mask, -INF)), dict(mask=mask, causal=True)):
        clean = [t.clone().requires_grad_() for t in (q, k, v)]
        want = qkv.attention(*clean, backend="reference", **kw)
        (gw := torch.randn(want.shape, generator=g))
        want_grads = torch.autograd.grad(want, clean, gw)
        dirty = [t.clone() for t in (q, k, v)]
        dirty[0][:, :, 3] = NAN                            # the row that sees nothing
        dirty[1][:, :, 45:] = NAN                          # hidden keys
        dirty[2][:, :, 41] = INF
        dirty[2][:, :, 47] = NAN
        dirty = [t.requires_grad_() for t in dirty]
        out = run(backend, kernel, *dirty, **kw)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
        grads = torch.autograd.grad(out, dirty, gw)
        for name, got, exp in zip("qkv", grads, want_grads):
            assert torch.isfinite(got).all(), f"d{name} is not finite"
            torch.testing.assert_close(got, exp, rtol=0, atol=1e-5)


def test_sdpa_refuses_non_finite_inputs_auto_reroutes():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 20, 8, generator=g) for _ in range(3))
    q[0, 1, 4] = NAN           # SDPA's CPU kernels turn this row into zeros (no mask needed)
    with pytest.raises(ValueError, match=r"sdpa.*\bq\b.*NaN or inf"):
        qkv.attention(q, k, v, backend="sdpa")
    out = qkv.attention(q, k, v)                       # auto: reruns on tiled
    assert torch.isnan(out[0, 1, 4]).all() and torch.isfinite(out[0, 0]).all()
    assert torch.isfinite(out[0, 1, :4]).all() and torch.isfinite(out[0, 1, 5:]).all()
    # the cached fast path of the common call does not bypass it
    for _ in range(2):
        clean = qkv.attention(q.nan_to_num(0.0), k, v, causal=True)
        out = qkv.attention(q, k, v, causal=True)
        assert torch.isnan(out[0, 1, 4]).all() and torch.isfinite(clean).all()
    # ... where SDPA's own answer is wrong: a NaN value that causal rows before it cannot see leaks into them
    # through 0·NaN in SDPA's kernel; only the check of the output sends the call to the exact path
    q, k, v = (torch.randn(1, 2, 20, 8, generator=g) for _ in range(3))
    v[0, 1, 15] = NAN
    for _ in range(2):
        assert torch.isfinite(qkv.attention(q, k, v.nan_to_num(0.0), causal=True)).all()
        out = qkv.attention(q, k, v, causal=True)
        assert torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, 1, :15]).all(), "a hidden NaN leaked"
        assert torch.isnan(out[0, 1, 15:]).all()


@pytest.mark.parametrize("backend,kernel", ENGINES)
def test_the_fused_kernels_nan_row_is_not_taken_for_an_empty_one(backend, kernel):
    # PyTorch's fused CPU kernel returns 0 (lse 0) for a row of NaN scores, as for a row that sees nothing
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 40, 8, generator=g) for _ in range(3))
    q[0, 0, 7, 2] = NAN
    out, lse = qkv.attention(q, k, v, mask=torch.rand(40, 40, generator=g) > 0.3, return_lse=True,
                             backend=backend if backend != "auto" else "tiled")
    assert torch.isnan(out[0, 0, 7]).all() and torch.isnan(lse[0, 0, 7])
    assert torch.isfinite(out[0, 0, :7]).all() and torch.isfinite(out[0, 0, 8:]).all()


def test_inf_scores():
    # +inf score: lse +inf, out NaN (the oracle's); -inf scores everywhere: a row that sees nothing
    q = torch.tensor([[[[1.0], [1.0]]]])
    k = torch.tensor([[[[INF], [1.0]]]])
    v = torch.tensor([[[[2.0], [3.0]]]])
    want_out, want_lse = naive_attention(q.double(), k.double(), v.double())
    for backend, kernel in ENGINES[:3]:
        out, lse = run(backend, kernel, q, k, v, return_lse=True)
        assert torch.isnan(out).all() and torch.equal(lse, want_lse.float()), (backend, kernel, out, lse)
    k2 = torch.tensor([[[[-INF], [-INF]]]])
    for backend, kernel in ENGINES[:3]:
        out, lse = run(backend, kernel, q, k2, v, return_lse=True)
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(lse, torch.full_like(lse, -INF))


def test_oracle_keeps_hidden_keys_out():
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    v[0, 0, 2] = NAN
    out, _ = naive_attention(q, k, v, causal=True)
    assert torch.isfinite(out[0, 0, :2]).all() and torch.isnan(out[0, 0, 2]).all()
