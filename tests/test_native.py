"""qkv's CPU kernel (src/qkv/csrc/attn_cpu.c via qkv._native): against the fp64 oracle by FlashAttention's rule,
through the tiled engine (which runs its forward on the kernel) and directly; the calls it must decline."""
import pytest
import torch
from hypothesis import given, strategies as st

import qkv
from qkv.testing import compare, make_qkv
from qkv.core import call as _call
from qkv.engines import cpu_kernel as _native
from qkv.tools.info import cpuinfo as _cpuinfo


# What /proc/cpuinfo says (qkv info's reading), independent of the kernel's own probe.
_AVX512 = {"avx512f", "avx512dq", "avx512vl", "avx512bw"} <= _cpuinfo()[1]
needs_kernel = pytest.mark.skipif(not _AVX512, reason="this CPU lacks AVX-512: the kernel cannot run")


@pytest.fixture
def spy(monkeypatch):
    """Counts the kernel's forwards, so that a test knows the kernel (not the torch-ops path) computed it."""
    seen = []
    real = _native.attention_fwd

    def wrapped(call):
        seen.append(call)
        return real(call)
    monkeypatch.setattr(_native, "attention_fwd", wrapped)
    return seen


@needs_kernel
def test_kernel_is_built_and_runs_here():
    # On an AVX-512 machine a fresh install must have built the kernel: a failed build is a failure here.
    ok, why = _native.available()
    assert ok, why


SHAPES = [  # B, Hq, Hkv, Nq, Nk, D, Dv
    (1, 1, 1, 1, 1, 40, 40),
    (2, 2, 2, 97, 97, 59, 59),
    (1, 8, 2, 33, 70, 40, 24),      # GQA, Nq < Nk, Dv != D
    (1, 4, 1, 70, 33, 111, 111),    # MQA, Nq > Nk (causal: the first rows see nothing)
    (2, 3, 3, 1, 97, 59, 16),       # decoding
    (1, 2, 2, 97, 1, 40, 40),
    (1, 2, 1, 1023, 1023, 64, 48),  # several key chunks (512) per row without a window
]
GEOMETRIES = {
    "none": {},
    "causal": {"causal": True},
    "window255": {"causal": True, "window": (255, 0)},
    "window_two_sided": {"window": (16, 7)},
    "window_left_only": {"window": (5, None)},
    "window_right_only": {"window": (None, 3)},
    "diagonal": {"window": (0, 0)},
    "causal_and_right": {"causal": True, "window": (40, 9)},
}


@needs_kernel
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(spy, shape, geometry):
    # out, lse and the gradients of q, k, v (the kernel's backward)
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, Dv, seed=sum(shape))
    compare("tiled", q, k, v, grad=True, **GEOMETRIES[geometry])
    assert spy, "the tiled engine did not run the kernel"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(spy, dtype):
    q, k, v = make_qkv(1, 4, 2, 300, 300, 64, 40, dtype=dtype, seed=3)
    compare("tiled", q, k, v, causal=True, window=(100, 0))
    compare("tiled", q, k, v, causal=True)
    assert len(spy) == 2


@needs_kernel
@pytest.mark.parametrize("geometry", ["causal", "window_two_sided", "none"])
def test_training_with_gqa_and_ragged_sizes(spy, geometry):
    q, k, v = make_qkv(1, 4, 2, 150, 130, 40, 24, seed=4)
    compare("tiled", q, k, v, grad=True, **GEOMETRIES[geometry])
    assert spy


@needs_kernel
def test_training_runs_both_passes_on_the_kernel(spy, monkeypatch, set_options):
    # Training: kernel forward and kernel backward (probabilities recomputed, none kept); with the kernel
    # off, the band path keeps them for its own backward.
    set_options(band_keep_ratio=10**6)
    seen = []
    for name in ("_band_bwd", "_bwd"):
        real = getattr(qkv.engines.tiled, name)
        monkeypatch.setattr(qkv.engines.tiled, name, lambda *a, _real=real, _n=name: seen.append((_n, a[-1])) or _real(*a))
    real_bwd = _native.attention_bwd
    monkeypatch.setattr(_native, "attention_bwd", lambda *a: seen.append(("kernel", None)) or real_bwd(*a))
    q, k, v = make_qkv(1, 2, 2, 600, 600, 16, seed=5)
    compare("tiled", q, k, v, grad=True, causal=True, window=(60, 0))
    assert len(spy) == 1 and seen == [("kernel", None)]
    set_options(cpu_kernel=False)
    compare("tiled", q, k, v, grad=True, causal=True, window=(60, 0))
    assert len(spy) == 1 and [n for n, _ in seen] == ["kernel", "_bwd", "_band_bwd"] and seen[2][1] is not None


@needs_kernel
@pytest.mark.parametrize("geometry", ["window255", "causal", "window_two_sided"])
def test_lse_gradient(spy, geometry):
    # A loss on out and lse: d lse / d s = p enters the kernel's backward through its row term.
    from qkv.testing import check_fa, naive_attention
    kw = GEOMETRIES[geometry]
    q, k, v = make_qkv(1, 4, 2, 300, 280, 24, 40, seed=12)
    grads = {}
    for name, dtype, fn in (("kernel", torch.float32, None), ("oracle", torch.float64, naive_attention),
                            ("plain", torch.float32, naive_attention)):
        leaves = [x.to(dtype).clone().requires_grad_() for x in (q, k, v)]
        out, lse = fn(*leaves, **kw) if fn else qkv.attention(*leaves, return_lse=True, backend="tiled", **kw)
        (3 * lse.masked_fill(torch.isinf(lse), 0).sum() + out.sum()).backward()
        grads[name] = [x.grad for x in leaves]
    assert spy
    for i, key in enumerate(("dq", "dk", "dv")):
        msg = check_fa(key, grads["kernel"][i], grads["oracle"][i], grads["plain"][i], factor=3.0)
        assert not msg, msg


@needs_kernel
def test_strided_and_broadcast_inputs(spy):
    # (B, N, H, D) storage seen as (B, H, N, D); an expanded (stride-0) batch; a non-unit last stride.
    q, k, v = make_qkv(2, 4, 2, 77, 90, 40, 40, seed=6)
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)
    ks = k[:1].expand(2, -1, -1, -1)
    vs = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert qs.stride(-1) == 1 and ks.stride(0) == 0 and vs.stride(-1) != 1
    compare("tiled", qs, ks, vs, causal=True, window=(20, 0))
    assert spy


@needs_kernel
def test_fully_masked_rows_are_zero(spy):
    q, k, v = make_qkv(1, 2, 1, 50, 20, 16, seed=7)
    out, lse = qkv.attention(q, k, v, causal=True, return_lse=True, backend="tiled")   # rows 0..29 see nothing
    assert spy
    assert (out[:, :, :30] == 0).all() and torch.isneginf(lse[:, :, :30]).all()
    assert torch.isfinite(lse[:, :, 30:]).all()


@needs_kernel
def test_result_does_not_depend_on_threads():
    # Each tile is one thread's: the same bits whatever the thread count.
    q, k, v = make_qkv(2, 3, 3, 200, 200, 40, seed=8)
    call = _call.prepare(q, k, v, causal=True, window=(64, 0))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = _native.attention_fwd(call)
        torch.set_num_threads(max(2, n))
        b = _native.attention_fwd(call)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_declines_what_it_cannot_compute_exactly():
    q, k, v = make_qkv(1, 2, 2, 10, 10, 8, seed=9)

    def serves(q=q, k=k, v=v, **kw):
        return _native.serves(_call.prepare(q, k, v, **kw))
    base = serves(causal=True)
    assert base == _native.available()[0]
    for kw in (dict(bias=torch.zeros(10, 10)), dict(softcap=5.0), dict(alibi_slopes=torch.ones(2)),
               dict(score_mod=lambda s, b, h, i, j: s), dict(dropout_p=0.1),
               dict(mask=torch.ones(10, 10, dtype=torch.bool)), dict(mask=qkv.masks.causal()),
               dict(q=q.double(), k=k.double(), v=v.double()), dict(v=v[..., :0])):
        assert not serves(causal=True, **kw), kw
    # mask=sliding_window(...) is window=(...): the same call, served alike
    assert serves(mask=qkv.masks.sliding_window(3, 0)) == base


def test_disabled_means_torch_ops(spy, set_options):
    set_options(cpu_kernel=False)
    q, k, v = make_qkv(1, 2, 2, 40, 40, 8, seed=10)
    compare("tiled", q, k, v, causal=True)
    assert not spy


@st.composite
def range_calls(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([1, 2, 3]))
    Nq = draw(st.integers(1, 140))
    Nk = draw(st.integers(1, 140))
    D = draw(st.sampled_from([1, 3, 8, 17, 40, 70]))
    Dv = draw(st.sampled_from([D, 5, 16, 33]))
    kw = {}
    if draw(st.booleans()):
        kw["causal"] = True
    if draw(st.booleans()):
        kw["window"] = (draw(st.one_of(st.none(), st.integers(0, 50))),
                        draw(st.one_of(st.none(), st.integers(0, 50))))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float16]))
    grad = draw(st.booleans())
    return (B, Hq, Hkv, Nq, Nk, D, Dv), dtype, grad, kw, draw(st.integers(0, 10**6))


@needs_kernel
@given(range_calls())
def test_hypothesis_range_calls(case):
    (B, Hq, Hkv, Nq, Nk, D, Dv), dtype, grad, kw, seed = case
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, Dv, dtype=dtype, seed=seed)
    compare("tiled", q, k, v, grad=grad, **kw)


@needs_kernel
def test_auto_runs_the_kernel_from_enough_rows(set_options):
    q, k, v = make_qkv(1, 2, 2, 256, 256, 16, seed=11)            # 256 rows: AUTO_KERNEL_ROWS
    pick = lambda q=q, **kw: qkv.select_backend(q, k, v, **kw).name   # noqa: E731
    assert pick(causal=True) == pick() == pick(window=(30, 0)) == "tiled"
    assert qkv.select_backend(*(t[:, :, :255] for t in (q, k, v)), causal=True).name == "sdpa"   # fewer
    assert pick(q=q.clone().requires_grad_(), causal=True) == "tiled"        # masked training: the kernel
    assert pick(q=q.clone().requires_grad_()) == "sdpa"                      # unmasked training: SDPA
    with torch.no_grad():
        assert pick(q=q.clone().requires_grad_()) == "tiled"
    set_options(cpu_kernel=False)
    assert pick(causal=True) == "sdpa"
