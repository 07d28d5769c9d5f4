"""The engine contract: the registry, every reason an engine refuses, autograd by the book (in-place changes,
captured tensors, double backward, torch.func), and torch.compile without graph breaks."""
import pytest
import torch

import qkv
from qkv import dispatch
from qkv.engines.base import Engine
from qkv.testing import make_qkv

ENGINES = ["reference", "tiled", "tiled-ops", "sdpa", "auto"]


def _run(engine, *args, **kw):
    if engine == "tiled-ops":
        with qkv.options(cpu_kernel=False):
            return qkv.attention(*args, backend="tiled", **kw)
    return qkv.attention(*args, backend=engine, **kw)


# ------------------------------------------------------------------------------------------ the registry

def test_registry_is_what_every_reader_sees():
    names = [e.name for e in dispatch.ENGINES]
    assert names[:3] == ["reference", "tiled", "sdpa"]
    assert [b.name for b in qkv.backends()] == names
    from qkv.tools import bench
    assert {"auto", "tiled", "reference"} <= set(bench.PROVIDERS)


def test_a_new_engine_drops_in(monkeypatch):
    """One registry entry: backends(), select_backend's universe, backend=..., and its reasons."""
    class Doubler(Engine):
        name = "doubler"
        summary = "test engine"

        def supports(self, call):
            return [] if call.mask is None and not call.has_mods else ["only plain calls", "no mods"]

        def forward(self, call):
            out, lse = dispatch.engine("reference").forward(call)
            return out, lse

    monkeypatch.setattr(dispatch, "ENGINES", list(dispatch.ENGINES))
    dispatch.register(Doubler())
    assert "doubler" in [b.name for b in qkv.backends()]
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4)
    torch.testing.assert_close(qkv.attention(q, k, v, backend="doubler"), qkv.attention(q, k, v))
    with pytest.raises(ValueError, match="only plain calls; no mods"):
        qkv.attention(q, k, v, softcap=3.0, mask=lambda b, h, i, j: i >= j, backend="doubler")
    with pytest.raises(ValueError, match="already registered"):
        dispatch.register(Doubler())


def test_explicit_backend_lists_every_reason():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4)
    with pytest.raises(ValueError) as e:
        qkv.attention(q, k, v, softcap=2.0, alibi_slopes=torch.ones(2), return_lse=True, backend="sdpa")
    msg = str(e.value)
    assert "softcap" in msg and "ALiBi" in msg and "logsumexp" in msg
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        qkv.attention(q, k, v, backend="nope")


# ------------------------------------------------------------------------------------------ in-place changes

def _inplace_case(engine, what, dtype=torch.float64):
    """Forward, change one input in place, backward: autograd's error or the forward's gradient."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g, dtype=dtype) for _ in range(3))
    bias = torch.randn(70, 70, generator=g, dtype=dtype)
    slopes = torch.tensor([0.3, 0.7], dtype=dtype)
    table = torch.randn(2, 70, generator=g, dtype=dtype)

    def run(q, k, v, bias, slopes, table):
        kw = dict(softcap=5.0, window=(20, 0))
        if what in ("bias",):
            kw["bias"] = bias
        if what == "alibi":
            kw["alibi_slopes"] = slopes
        if what == "capture":
            kw["score_mod"] = lambda s, b, h, i, j: s + table[h, j]
        return _run(engine, q, k, v, **kw)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias, slopes, table)]
    expected = None
    if engine != "sdpa":
        ref = [t.clone().requires_grad_() for t in (q, k, v, bias, slopes, table)]
        run(*ref).sum().backward()
        expected = [t.grad for t in ref[:3]]
    out = run(*leaves)
    target = {"q": 0, "k": 1, "v": 2, "bias": 3, "alibi": 4, "capture": 5}[what]
    with torch.no_grad():
        leaves[target].add_(1.0)
    try:
        out.sum().backward()
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
        return
    got = [t.grad for t in leaves[:3]]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("engine", ["reference", "tiled", "tiled-ops", "auto"])
@pytest.mark.parametrize("what", ["q", "k", "v", "bias", "alibi", "capture"])
def test_inplace_change_between_forward_and_backward(engine, what):
    _inplace_case(engine, what)


def test_inplace_bias_softcap_reproducer():
    """The reported case: softcap, a bias with grad, tiled, bias.add_ between forward and backward."""
    q, k, v = (torch.randn(1, 2, 64, 32, requires_grad=True) for _ in range(3))
    bias = torch.randn(64, 64, requires_grad=True)
    out = qkv.attention(q, k, v, softcap=5.0, bias=bias, backend="tiled")
    with torch.no_grad():
        bias.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.fixture
def interpret(monkeypatch):
    """The triton engine on CPU tensors: Triton's interpreter (fp32; it refuses fp64)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("what", ["q", "k", "v", "bias", "alibi"])
def test_triton_inplace_change_between_forward_and_backward(interpret, what):
    _inplace_case("triton", what, dtype=torch.float32)


def test_triton_refuses_what_it_cannot_fuse_with_every_reason(interpret):
    """A score_mod (a captured tensor's gradient included) stays on tiled: triton names it, and fp64, together."""
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, dtype=torch.float64)
    table = torch.randn(2, 8, requires_grad=True)
    with pytest.raises(ValueError) as e:
        qkv.attention(q, k, v, score_mod=lambda s, b, h, i, j: s + table[h, j], backend="triton")
    assert "score_mod" in str(e.value) and "float64" in str(e.value)


# ------------------------------------------------------------------------------------------ captured tensors

@pytest.mark.parametrize("engine", ["reference", "tiled"])
def test_captured_tensor_gradients_flow_through_autograd(engine):
    B, H, N, D = 1, 2, 300, 16                      # > one 128-row query tile
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, N, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(2))
    rel = torch.randn(N, generator=g, requires_grad=True)

    def mod(s, b, h, i, j):
        return s + rel[(i - j).abs()]

    out = qkv.attention(q, k, v, score_mod=mod, causal=True, backend=engine)
    dq, drel = torch.autograd.grad(out.sum(), (q, rel))            # both in the graph
    assert drel.abs().sum() > 0
    out = qkv.attention(q, k, v, score_mod=mod, causal=True, backend=engine)
    (dq_only,) = torch.autograd.grad(out.sum(), (q,))
    assert rel.grad is None                                          # no side effect on the capture
    torch.testing.assert_close(dq_only, dq)
    # a capture computed from a parameter, over several query tiles: differentiated once
    param = torch.randn(N, generator=g, requires_grad=True)
    twice = 2 * param
    out = qkv.attention(q, k, v, score_mod=lambda s, b, h, i, j: s + twice[(i - j).abs()], causal=True,
                        backend=engine)
    out.sum().backward()
    leaf = twice.detach().requires_grad_()
    out = qkv.attention(q, k, v, score_mod=lambda s, b, h, i, j: s + leaf[(i - j).abs()], causal=True,
                        backend=engine)
    (dleaf,) = torch.autograd.grad(out.sum(), (leaf,))
    torch.testing.assert_close(param.grad, 2 * dleaf)        # d/dparam of (2·param) = 2 · d/dleaf


def test_captured_gradient_matches_reference():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 200, 8, generator=g, dtype=torch.float64) for _ in range(3))
    param = torch.randn(2, 200, generator=g, dtype=torch.float64)
    grads = {}
    for engine in ("reference", "tiled"):
        p = param.clone().requires_grad_()
        cap = 2 * p
        out = qkv.attention(q, k, v, score_mod=lambda s, b, h, i, j: s + cap[h, j], window=(50, 5),
                            backend=engine)
        (out * out).sum().backward()
        grads[engine] = p.grad
    torch.testing.assert_close(grads["tiled"], grads["reference"], rtol=1e-10, atol=1e-12)


def test_invisible_grad_requiring_tensor_is_refused():
    class Holder:
        pass
    h = Holder()
    h.t = torch.randn(8, requires_grad=True)
    q, k, v = (torch.randn(1, 1, 8, 4, requires_grad=True) for _ in range(3))
    with pytest.raises(ValueError, match="cannot see"):
        qkv.attention(q, k, v, score_mod=lambda s, b, hh, i, j: s + h.t[j], backend="tiled")


# ------------------------------------------------------------------------------------------ higher order

@pytest.mark.parametrize("engine", ["tiled", "tiled-ops", "triton"])
def test_double_backward_raises(engine, monkeypatch):
    if engine == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    n = 40 if engine == "triton" else 300
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
    out = _run(engine, q, k, v, causal=True)
    (dq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|once_differentiable|does not require grad"):
        dq.sum().backward()


def test_torch_func_grad():
    q, k, v = (torch.randn(1, 2, 300, 16, dtype=torch.float64) for _ in range(3))

    def loss(q):
        return qkv.attention(q, k, v, causal=True, backend="tiled").square().sum()

    g = torch.func.grad(loss)(q)
    ql = q.clone().requires_grad_()
    qkv.attention(ql, k, v, causal=True, backend="reference").square().sum().backward()
    torch.testing.assert_close(g, ql.grad)


# ------------------------------------------------------------------------------------------ torch.compile

def _compile_cases():
    N, H = 384, 2
    doc = torch.arange(N) * 4 // N
    return {
        "causal": dict(causal=True),
        "window": dict(window=(255, 0)),
        "bias": dict(bias="B"),
        "alibi+softcap": dict(alibi_slopes=qkv.scores.alibi_slopes(H), softcap=30.0),
        "document-blockmask": dict(mask=qkv.block_mask(qkv.masks.document(doc), 1, 1, N, N)),
    }


def _assert_compiled_equals_eager(f, base):
    """f(q, k, v, b) compiled with fullgraph=True (any graph break is an error) gives eager's output and
    gradients (of q, k, v and b where f reads b) within 1e-6."""
    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        ts = [t.clone().requires_grad_() for t in base]
        out = fn(*ts)
        out.square().sum().backward()
        results.append([out.detach()] + [t.grad for t in ts if t.grad is not None])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", list(_compile_cases()))
def test_compile_no_graph_breaks_and_equal_to_eager(case):
    torch._dynamo.reset()
    kw = _compile_cases()[case]
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, 2, 384, 64, generator=g) for _ in range(3)] + [torch.randn(2, 384, 384, generator=g)]

    def f(q, k, v, b):
        return qkv.attention(q, k, v, **{n: (b if x == "B" else x) for n, x in kw.items()})

    _assert_compiled_equals_eager(f, base)


@pytest.mark.parametrize("case", list(_compile_cases()))
def test_triton_compiles_without_graph_breaks(interpret, case):
    """The triton engine goes through the same custom ops (here on CPU tensors in Triton's interpreter)."""
    torch._dynamo.reset()
    N = 40
    kw = dict(_compile_cases()[case])
    if "mask" in kw:
        kw["mask"] = qkv.block_mask(qkv.masks.document(torch.arange(N) * 4 // N), 1, 1, N, N)
    if "window" in kw:
        kw["window"] = (7, 0)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(1, 2, N, 16, generator=g) for _ in range(3)] + [torch.randn(2, N, N, generator=g)]

    def f(q, k, v, b):
        return qkv.attention(q, k, v, backend="triton", **{n: (b if x == "B" else x) for n, x in kw.items()})

    _assert_compiled_equals_eager(f, base)


def test_compile_with_callables_still_right():
    """A score_mod or mask_mod may break the graph (documented), never the result."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))

    def f(q, k, v):
        return qkv.attention(q, k, v, score_mod=lambda s, b, h, i, j: s - 0.1 * (i - j).abs(),
                             mask=lambda b, h, i, j: (i - j) % 3 != 1, backend="tiled")

    torch.testing.assert_close(torch.compile(f)(q, k, v), f(q, k, v), rtol=0, atol=1e-6)


def test_compile_sliding_window_does_not_crash():
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 512, 32) for _ in range(3))
    for backend in ("auto", "tiled"):
        f = torch.compile(lambda q, k, v, b=backend: qkv.attention(q, k, v, window=(16, 0), backend=b))
        torch.testing.assert_close(f(q, k, v), qkv.attention(q, k, v, window=(16, 0)), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ per-call caching

def test_cached_fast_path_follows_the_signature():
    """The cached direct call is keyed on everything dispatch read: grad mode, options, shapes, dtypes."""
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8)
    a = qkv.attention(q, k, v, causal=True)
    b = qkv.attention(q, k, v, causal=True)                      # served from the cache
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ql = q.clone().requires_grad_()
    out = qkv.attention(ql, k, v, causal=True)
    out.sum().backward()
    assert ql.grad is not None
    with pytest.raises(TypeError, match="causal must be a bool"):
        qkv.attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="batch sizes differ"):
        qkv.attention(q, k[:0], v[:0], causal=True)
    for kk, vv in ((k.half(), v), (k, v.double()), (k.bfloat16(), v.bfloat16())):   # same shapes, other dtypes
        with pytest.raises(TypeError, match="must share a dtype"):
            qkv.attention(q, kk, vv, causal=True)
    qkv.attention(q, k, v, causal=True)
    q[0, 0, 3] = float("nan")                                   # the cached call still checks its output
    v[0, 1, 9] = float("nan")                                   # ... (a NaN value SDPA leaks to earlier rows)
    out = qkv.attention(q, k, v, causal=True)
    assert torch.isnan(out[0, 0, 3]).all() and torch.isfinite(out[0, 1, :9]).all()


def test_cached_fast_path_reads_grad_mode_where_auto_does(monkeypatch):
    """A signature whose auto pick depends on autograd (unmasked, >= 256 query rows: the CPU kernel in inference,
    SDPA in training) keeps the grad flag in its cache entry; one whose pick does not serves both modes."""
    from qkv.engines.cpu_kernel import serves
    ran = []
    tiled = dispatch.engine("tiled")
    forward = tiled.forward
    monkeypatch.setattr(tiled, "forward", lambda call: ran.append("tiled") or forward(call))
    if not serves(qkv.core.prepare(*make_qkv(1, 2, 2, 256, 256, 16))):
        pytest.skip("the CPU kernel does not run here")
    for n, order in ((256, (True, False, True, False)), (272, (False, True, False, True))):   # the cache filled
        q, k, v = make_qkv(1, 2, 2, n, n, 16, seed=3)                                          # either way first
        for training in order:
            ql = q.clone().requires_grad_(training)
            ran.clear()
            out = qkv.attention(ql, k, v)
            assert ran == ([] if training else ["tiled"]), (order, training)
            if training:
                out.sum().backward()
                assert ql.grad is not None
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8, seed=4)                  # SDPA either way: served in both modes
    for training in (False, True, False):
        ql = q.clone().requires_grad_(training)
        ran.clear()
        torch.testing.assert_close(qkv.attention(ql, k, v, causal=True),
                                   qkv.attention(q, k, v, causal=True, backend="reference"), rtol=0, atol=1e-5)
        assert ran == []


def test_transformers_llama_compiles_as_one_graph():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    import qkv.integrations.transformers  # noqa: F401  (registers "qkv")
    torch._dynamo.reset()
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=100, attn_implementation="qkv")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():                   # fullgraph=True: any graph break is an error
        torch.testing.assert_close(torch.compile(lambda x: model(x).logits, fullgraph=True)(ids), model(ids).logits,
                                   rtol=0, atol=1e-5)
