"""qkv's CPU kernel (src/qkv/csrc via qkv._native): against the fp64 oracle by FlashAttention's rule, through
the tiled engine (which runs its forward on the kernel) and directly, for every instruction-set variant this
CPU runs (qkv.options(cpu_isa=...) forces each); the decoding path; the calls it must decline. The kernel's C tests
(tests/csrc, `make test-c` / `make test-arm`) cover the same shapes per variant, ARM64 NEON under qemu."""
import itertools
import platform

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv.core import call as _call
from qkv.engines import cpu_kernel as _native
from qkv.testing import check_fa, compare, make_qkv, naive_attention
from qkv.tools.info import cpuinfo as _cpuinfo

# What /proc/cpuinfo says (qkv info's reading), independent of the kernel's own probe: the variants it must run.
_FLAGS = _cpuinfo()[1]
EXPECTED = ([n for n, need in (("avx512", {"avx512f", "avx512dq", "avx512vl", "avx512bw", "fma", "f16c"}),
                               ("avx2", {"avx2", "fma", "f16c"})) if need <= _FLAGS]
            if platform.machine() in ("x86_64", "AMD64") else ["neon"] if platform.machine() in ("aarch64", "arm64")
            else [])
RUNNABLE = [n for n, runs in _native.variants() if runs]
needs_kernel = pytest.mark.skipif(not EXPECTED, reason="no variant of the kernel is built for this CPU")


@pytest.fixture(params=EXPECTED or [None])
def isa(request, set_options):
    """Each variant this CPU runs, forced through qkv.options(cpu_isa=...)."""
    if request.param is None:
        pytest.skip("no variant of the kernel is built for this CPU")
    set_options(cpu_isa=request.param)
    return request.param


@pytest.fixture
def spy(monkeypatch):
    """Records the kernel's forwards (call, path), so that a test knows the kernel (not the torch-ops path)
    computed it, and which path."""
    seen = []
    real = _native.attention_fwd

    def wrapped(call, path=None):
        seen.append((call, path or ("decode" if call.Nq <= _native.DECODE_ROWS else "tiles")))
        return real(call, path)
    monkeypatch.setattr(_native, "attention_fwd", wrapped)
    return seen


@needs_kernel
def test_kernel_is_built_and_runs_here():
    # A fresh install must have built the kernel, and it must run every variant /proc/cpuinfo says it can.
    ok, why = _native.available()
    assert ok, why
    assert RUNNABLE == EXPECTED, (RUNNABLE, EXPECTED)
    with qkv.options(cpu_isa=None):
        assert _native.isa() == EXPECTED[0]


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


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_oracle(isa, spy, shape, geometry):
    # out, lse and the gradients of q, k, v (the kernel's backward)
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, Dv, seed=sum(shape))
    compare("tiled", q, k, v, grad=True, **GEOMETRIES[geometry])
    assert spy, "the tiled engine did not run the kernel"


DECODE_SHAPES = [  # B, Hq, Hkv, Nq, Nk, D, Dv
    (1, 32, 8, 1, 700, 128, 128),   # GQA decoding over two key splits
    (2, 6, 2, 16, 300, 40, 24),     # the most rows the decoding path takes
    (1, 4, 4, 3, 1, 59, 59),
    (1, 3, 1, 5, 2100, 111, 16),    # MQA, five key splits
]


@pytest.mark.parametrize("geometry", ["none", "causal", "window255", "window_two_sided", "diagonal"])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decoding_matches_oracle(isa, spy, shape, geometry):
    # Few query rows: the decoding path (a kv head's query heads together, keys split, merged by lse).
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, Dv, seed=sum(shape))
    compare("tiled", q, k, v, **GEOMETRIES[geometry])
    assert [p for _, p in spy] == ["decode"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(isa, spy, dtype):
    q, k, v = make_qkv(1, 4, 2, 300, 300, 64, 40, dtype=dtype, seed=3)
    compare("tiled", q, k, v, causal=True, window=(100, 0))
    compare("tiled", q, k, v, causal=True)
    compare("tiled", q[:, :, :5], k, v, causal=True)          # decoding
    assert [p for _, p in spy] == ["tiles", "tiles", "decode"]


@pytest.mark.parametrize("path", ["tiles", "decode"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_read_exactly(isa, dtype, path):
    # Half inputs are converted as they are loaded, and computed in fp32: the very bits of fp32 inputs of the
    # same values (no rounding on the way in, the same arithmetic).
    q, k, v = make_qkv(1, 8, 2, 9 if path == "decode" else 100, 700, 40, 33, dtype=dtype, seed=13)
    kw = dict(causal=True, window=(300, 0))
    half = _native.attention_fwd(_call.prepare(q, k, v, **kw), path)
    full = _native.attention_fwd(_call.prepare(q.float(), k.float(), v.float(), **kw), path)
    assert half[0].dtype == dtype and torch.equal(half[1], full[1]) and torch.equal(half[0], full[0].to(dtype))


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
        monkeypatch.setattr(qkv.engines.tiled, name,
                            lambda *a, _real=real, _n=name: seen.append((_n, a[-1])) or _real(*a))
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


@pytest.mark.parametrize("path", ["tiles", "decode"])
def test_result_does_not_depend_on_threads(isa, path):
    # Each tile and each key split is one thread's, and the splits follow from the shape alone: the same bits
    # whatever the thread count.
    q, k, v = make_qkv(2, 6, 3, 200 if path == "tiles" else 7, 1500, 40, seed=8)
    call = _call.prepare(q, k, v, causal=True, window=(1100, 0))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = _native.attention_fwd(call, path)
        torch.set_num_threads(max(3, n))
        b = _native.attention_fwd(call, path)
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
               dict(q=q.double(), k=k.double(), v=v.double()), dict(v=v[..., :0]), dict(scale=-0.5),
               dict(scale=0.0)):
        assert not serves(causal=True, **kw), kw
    # mask=sliding_window(...) is window=(...): the same call, served alike
    assert serves(mask=qkv.masks.sliding_window(3, 0)) == base


@pytest.mark.parametrize("how", [{"cpu_kernel": False}, {"cpu_isa": "none"}], ids=["cpu_kernel", "cpu_isa"])
def test_disabled_means_torch_ops(spy, set_options, how):
    set_options(**how)
    assert _native.isa() is None and not _native.available()[0]
    q, k, v = make_qkv(1, 2, 2, 40, 40, 8, seed=10)
    compare("tiled", q, k, v, causal=True)
    assert not spy


def test_forcing_a_variant_this_machine_cannot_run_is_an_error(monkeypatch, set_options):
    # Never silently another variant: an unknown name, or one this CPU cannot run, raises ValueError on use.
    q, k, v = make_qkv(1, 2, 2, 40, 40, 8, seed=10)
    call = _call.prepare(q, k, v, causal=True)
    set_options(cpu_isa="sse9")
    if _native.variants():
        with pytest.raises(ValueError, match="cpu_isa='sse9' .* is not a variant"):
            qkv.attention(q, k, v, causal=True, backend="tiled")
    assert not _native.available()[0]
    if not _native.variants():
        return
    name = _native.variants()[0][0]
    monkeypatch.setattr(_native, "_variants", [(n, n != name and r) for n, r in _native.variants()])
    set_options(cpu_isa=name)
    with pytest.raises(ValueError, match=f"cpu_isa='{name}' .*: this CPU cannot run it"):
        _native.serves(call)
    set_options(cpu_isa=name.upper())      # case-insensitive
    with pytest.raises(ValueError, match="cannot run it"):
        _native.isa()


def test_the_environment_sets_the_default_variant():
    # QKV_CPU_ISA is the cpu_isa option's default, read when qkv is imported.
    import subprocess
    import sys
    for name in RUNNABLE + ["none"]:
        code = "from qkv.engines import cpu_kernel as k; print(k.isa())"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "QKV_CPU_ISA": name})
        assert r.returncode == 0 and r.stdout.strip() == (name if name != "none" else "None"), r.stderr


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


def test_info_names_the_variant(set_options):
    from qkv.tools import info
    set_options(cpu_isa=None)
    assert info.machine_info()["cpu"]["qkv_kernel"] == info.cpu_kernel()
    if RUNNABLE:
        assert info.cpu_kernel().startswith(f"{RUNNABLE[0]} (the best this CPU runs)")
    for name in RUNNABLE:
        with qkv.options(cpu_isa=name):
            assert info.cpu_kernel().startswith(f"{name} (forced: cpu_isa='{name}')")
            assert f"qkv's C kernel ({name})" in next(b.reason for b in qkv.backends() if b.name == "tiled")
    set_options(cpu_isa="bogus")
    assert info.cpu_kernel().startswith("none: cpu_isa='bogus' (qkv.options or QKV_CPU_ISA) is not a variant")


@needs_kernel
def test_auto_decodes_on_the_kernel(set_options):
    # Decoding (few rows, inference): the kernel's decoding path for half inputs, and for fp32 once the keys
    # times the query heads per kv head reach AUTO_DECODE_KEYS; SDPA for short fp32 caches and many rows.
    from qkv.dispatch import AUTO_DECODE_KEYS, AUTO_DECODE_ROWS
    q, k, v = make_qkv(1, 8, 2, 1, AUTO_DECODE_KEYS // 4, 16, seed=14)
    pick = lambda q=q, k=k, v=v, **kw: qkv.select_backend(q, k, v, causal=True, **kw).name
    assert pick() == "tiled" and pick(window=(100, 0)) == "tiled"
    assert pick(k=k[:, :, :-1], v=v[:, :, :-1]) == "sdpa"                            # fewer keys
    assert pick(q=q.bfloat16(), k=k[:, :, :9].bfloat16(), v=v[:, :, :9].bfloat16()) == "tiled"   # half
    rows = AUTO_DECODE_ROWS // 4 + 1                                                 # G·Nq > AUTO_DECODE_ROWS
    assert pick(q=torch.randn(1, 8, rows, 16)) == "sdpa"
    assert pick(q=q.clone().requires_grad_()) == "sdpa"                              # training
    set_options(cpu_isa="none")
    assert pick() == "sdpa"


@needs_kernel
def test_kv_cache_decoding_runs_the_decoding_path(spy):
    # SelfAttention decoding with a KVCache (bf16 cache, GQA): each step reads the cache views in place on the
    # decoding path, and one token at a time gives what one causal call gives.
    torch.manual_seed(0)
    layer = qkv.SelfAttention(64, 8, n_kv_heads=2, causal=True).to(torch.bfloat16).eval()
    x = torch.randn(1, 12, 64, dtype=torch.bfloat16)
    cache = layer.new_cache(1, 16)
    with torch.no_grad():
        full = layer(x)
        steps = torch.cat([layer(x[:, i:i + 1], kv_cache=cache) for i in range(12)], 1)
    assert [p for _, p in spy].count("decode") == 12
    torch.testing.assert_close(steps.float(), full.float(), atol=2e-2, rtol=2e-2)


@needs_kernel
def test_auto_runs_the_kernel_from_enough_rows(set_options):
    q, k, v = make_qkv(1, 2, 2, 256, 256, 16, seed=11)            # 256 rows: AUTO_KERNEL_ROWS
    pick = lambda q=q, **kw: qkv.select_backend(q, k, v, **kw).name
    assert pick(causal=True) == pick() == pick(window=(30, 0)) == "tiled"
    assert qkv.select_backend(*(t[:, :, :255] for t in (q, k, v)), causal=True).name == "sdpa"   # fewer
    assert pick(q=q.clone().requires_grad_(), causal=True) == "tiled"        # masked training: the kernel
    assert pick(q=q.clone().requires_grad_()) == "sdpa"                      # unmasked training: SDPA
    with torch.no_grad():
        assert pick(q=q.clone().requires_grad_()) == "tiled"
    set_options(cpu_kernel=False)
    assert pick(causal=True) == "sdpa"


@pytest.mark.parametrize("Nq,Nk", [(1, 50), (3, 2000), (20, 20), (300, 300)],
                         ids=["decode1", "decode3", "tile", "tiles"])
@pytest.mark.parametrize("where", ["q", "k seen", "k hidden", "k inf", "v seen"])
def test_non_finite_inputs_give_the_oracles_nan_rows(isa, spy, Nq, Nk, where):
    # The kernel's inputs are never scanned: a NaN score must make its row NaN inside the kernel (then the
    # exact path computes it), on the tiles' path and the decoding path of every variant.
    g = torch.Generator().manual_seed(Nq + Nk)
    for kw in (dict(), dict(causal=True), dict(window=(16, 0))):
        for dt in (torch.float32, torch.bfloat16):
            q = torch.randn(1, 4, Nq, 32, generator=g).to(dt)
            k, v = (torch.randn(1, 2, Nk, 32, generator=g).to(dt) for _ in range(2))
            t, at, value = {"q": (q, (0, 1, Nq // 2, 3), "nan"), "k seen": (k, (0, 0, Nk - 1, 5), "nan"),
                            "k hidden": (k, (0, 1, 0, 5), "nan"), "k inf": (k, (0, 1, Nk - 2, 5), "inf"),
                            "v seen": (v, (0, 0, Nk - 1, 2), "nan")}[where]
            t[at] = float(value)
            want = qkv.attention(q.double(), k.double(), v.double(), backend="reference", **kw)
            got = qkv.attention(q, k, v, backend="tiled", **kw).double()
            assert torch.equal(torch.isnan(got), torch.isnan(want)), (kw, dt)
            ok = ~torch.isnan(want)
            tol = 3e-2 if dt == torch.bfloat16 else 1e-4
            assert torch.allclose(got[ok], want[ok], atol=tol, rtol=0), (kw, dt)
    assert spy, "the kernel did not run"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_plausible(dtype):
    # SDPA's output check: every row finite with an entry that is not zero, any strides
    if not _native.available()[0]:
        pytest.skip("the CPU kernel library is not built")
    o = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert _native.rows_plausible(o) is True
    assert _native.rows_plausible(o.transpose(1, 2)) is True and _native.rows_plausible(o[..., ::2]) is True
    for at, value in (((1, 2, 3), 0.0), ((1, 2, 3, 4), float("nan")), ((0, 0, 0, 6), float("-inf"))):
        bad = o.clone()
        bad[at] = value
        assert _native.rows_plausible(bad) is False, (at, value)
        assert _native.rows_plausible(bad.transpose(1, 2)) is False, (at, value)
    partly = o.clone()
    partly[0, 0, 0, :6] = 0
    assert _native.rows_plausible(partly) is True
    assert _native.rows_plausible(o.double()) is None          # not a type the kernel takes: the caller checks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_plausible_vector_loop_and_python_entry(dtype):
    # the check SDPA's output gets on every call: the library's CPython entry point, whose unit-stride rows take
    # a vector loop (main part + scalar tail) and strided rows the plain one, against the rule computed in torch
    if not _native.available()[0]:
        pytest.skip("the CPU kernel library is not built")
    f, code = _native.row_check(dtype)
    lib = _native._load()
    ints, magnitude = (torch.int32, 0x7FFFFFFF) if dtype == torch.float32 else (torch.int16, 0x7FFF)
    g = torch.Generator().manual_seed(1)
    for D in (7, 8, 13, 16, 17, 33, 64, 100):
        o = torch.randn(2, 3, 5, D, generator=g).to(dtype)
        for kind, d in itertools.product(("clean", "nan", "-inf", "zeros", "-zeros", "tiny"), (0, D // 2, D - 1)):
            x = o.clone()                      # d: the vector part's first entry, the middle, the tail's last
            b, h, r = (int(torch.randint(0, n, (1,), generator=g)) for n in x.shape[:3])
            if kind in ("nan", "-inf"):
                x[b, h, r, d] = float(kind)
            elif kind != "clean":
                x[b, h, r] = -0.0 if kind == "-zeros" else 0.0
                if kind == "tiny":
                    x[b, h, r, d] = -torch.finfo(dtype).tiny                 # one non-zero entry: plausible
            want = bool(torch.isfinite(x.float()).all()) and bool(((x.view(ints) & magnitude) != 0).any(-1).all())
            assert want == (kind in ("clean", "tiny"))
            wide = torch.ones(*x.shape[:-1], 2 * D, dtype=dtype)
            wide[..., ::2] = x
            for view in (x, x.transpose(1, 2).contiguous().transpose(1, 2), x.transpose(0, 2)[..., :],
                         wide[..., ::2]):                                     # the last: strided rows
                got = f(code, view.data_ptr(), view.shape, view.stride())
                assert got is want, (D, kind, view.stride())
                assert got == bool(lib.qkv_rows_plausible(code, view.data_ptr(), *view.shape, *view.stride()))
    big = torch.randn(2, 4, 128, 160).to(dtype)                                 # read without the GIL
    assert f(code, big.data_ptr(), big.shape, big.stride()) is True
    big[1, 3, 127, 159] = float("nan")
    assert f(code, big.data_ptr(), big.shape, big.stride()) is False
    assert _native.row_check(torch.float64) is None
    with pytest.raises(TypeError, match="4 arguments"):
        f(code, o.data_ptr(), o.shape)
    with pytest.raises(TypeError, match="shape must be a tuple of 4"):
        f(code, o.data_ptr(), (1, 2, 3), o.stride())
    with pytest.raises(ValueError, match="element type"):
        f(7, o.data_ptr(), o.shape, o.stride())
