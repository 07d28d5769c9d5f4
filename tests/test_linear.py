"""qkv.linear: the chunked engines against their recurrent definitions (fp64, outputs, states and every gradient),
the recurrent definitions against closed forms written independently here, streaming, decoding steps, dtypes, and
the refusal of bad inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qkv.linear import (
    delta_rule,
    delta_rule_step,
    linear_attention,
    linear_attention_step,
    recurrent_delta_rule,
    recurrent_linear_attention,
)
from qkv.testing import check_fa

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny shapes: one thread keeps OpenMP hand-offs from dominating (and from slowing down on a shared machine)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)

TOL = 1e-9
SHAPES = [(1, 16), (37, 16), (64, 64), (130, 64), (130, 100), (7, 100)]   # (N, chunk_size)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=F64, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed), dtype=F64) * scale).to(dtype)


def _run(fn, tensors: dict, seed=99, **kw):
    """fn(**tensors, **kw, return_state=True) on fresh leaves; backward of a random projection of (o, state).
    Returns {"o", "state", "d<name>" for every tensor that requires grad}."""
    leaves = {n: (t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t)
              for n, t in tensors.items()}
    o, S = fn(**leaves, **kw, return_state=True)
    go = _randn(*o.shape, seed=seed, dtype=o.dtype)
    gs = _randn(*S.shape, seed=seed + 1, dtype=S.dtype)
    ((o * go).sum() + (S * gs).sum()).backward()
    res = {"o": o.detach(), "state": S.detach()}
    for n, t in leaves.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            res["d" + n] = t.grad
    return res


def _assert_close(a: dict, b: dict, tol=TOL, what=""):
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    a, b = dict(a), dict(b)
    for n in a:   # an input that does not reach the loss: no gradient (None) or a zero one
        if a[n] is None or b[n] is None:
            a[n], b[n] = (torch.zeros_like(b[n] if a[n] is None else a[n]) if x is None else x for x in (a[n], b[n]))
    errs = {n: (a[n].double() - b[n].double()).abs().max().item() if a[n].numel() else 0.0 for n in a}
    for n in a:
        assert a[n] is not None and b[n] is not None, n
        assert a[n].shape == b[n].shape, (n, a[n].shape, b[n].shape)
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"{what}: max errors {errs}"


def _lin_inputs(B=2, Hk=2, H=4, N=37, D=5, Dv=3, *, decay="none", normalize=False, state=True, seed=0, F_=None):
    q = _randn(B, Hk, N, D, seed=seed).requires_grad_()
    k = _randn(B, Hk, N, D, seed=seed + 1).requires_grad_()
    v = _randn(B, H, N, Dv, seed=seed + 2).requires_grad_()
    t = {"q": q, "k": k, "v": v}
    if decay == "tokens":
        t["decay"] = (-torch.rand(B, H, N, generator=_gen(seed + 3), dtype=F64) * 0.5).requires_grad_()
    elif decay == "heads":
        t["decay"] = (0.7 + 0.3 * torch.rand(H, generator=_gen(seed + 3), dtype=F64)).requires_grad_()
    elif decay == "float":
        t["decay"] = 0.93
    if state:
        s = _randn(B, H, F_ or D, Dv + normalize, seed=seed + 4)
        if normalize:   # a normaliser column as a previous call leaves it: Σφ(k) > 0 for positive features
            s[..., -1] = s[..., -1].abs() + 1.0
        t["initial_state"] = s.requires_grad_()
    return t


# ----------------------------------------------------------------------------------------------------------------
# the bar: chunked == recurrent in fp64 (outputs, final state, gradients of q, k, v, decays, beta, initial state)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,chunk", SHAPES)
@pytest.mark.parametrize("decay", ["none", "float", "heads", "tokens"])
@pytest.mark.parametrize("normalize", [False, True])
def test_linear_causal_chunked_equals_recurrent(N, chunk, decay, normalize):
    t = _lin_inputs(N=N, decay=decay, normalize=normalize, seed=N + chunk)
    kw = dict(normalize=normalize, chunk_size=chunk)
    got = _run(linear_attention, t, **kw)
    ref = _run(recurrent_linear_attention, t, **kw)
    assert "ddecay" in got or decay in ("none", "float")
    assert "dinitial_state" in got and "dq" in got
    _assert_close(got, ref, what=f"N={N} C={chunk} decay={decay} normalize={normalize}")


# (identity features with normalize make the normaliser a signed sum near 0: see test_normalize_guard)
@pytest.mark.parametrize("N,chunk", SHAPES)
@pytest.mark.parametrize("normalize,feature_map", [(False, "elu1"), (True, "elu1"), (False, "relu"), (True, "relu"),
                                                   (False, "identity")])
def test_linear_noncausal_chunked_equals_recurrent(N, chunk, normalize, feature_map):
    t = _lin_inputs(N=N, normalize=normalize, seed=3 * N + chunk)
    kw = dict(causal=False, normalize=normalize, chunk_size=chunk, feature_map=feature_map)
    _assert_close(_run(linear_attention, t, **kw), _run(recurrent_linear_attention, t, **kw))


@pytest.mark.parametrize("feature_map", ["relu", "identity", "callable"])
def test_linear_feature_maps(feature_map):
    # a callable may change the feature size: F = 2·D here (a [relu(x), relu(-x)] map)
    fm = (lambda x: torch.cat([F.relu(x), F.relu(-x)], dim=-1)) if feature_map == "callable" else feature_map
    F_ = 10 if feature_map == "callable" else 5
    t = _lin_inputs(N=70, decay="tokens", F_=F_, seed=5)
    kw = dict(chunk_size=16, feature_map=fm, scale=0.7)
    got, ref = _run(linear_attention, t, **kw), _run(recurrent_linear_attention, t, **kw)
    assert got["state"].shape == (2, 4, F_, 3)
    _assert_close(got, ref)


@pytest.mark.parametrize("N,chunk", SHAPES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("l2", [True, False])
def test_delta_chunked_equals_recurrent(N, chunk, gated, l2):
    B, Hk, H, D, Dv, s = 2, 2, 4, 6, 5, N + chunk + 7 * gated
    kscale = 1.0 if l2 else 0.3      # raw keys kept short: |k|²·β <= 2 keeps the un-normalised rule contracting
    t = {"q": _randn(B, Hk, N, D, seed=s).requires_grad_(),
         "k": _randn(B, Hk, N, D, seed=s + 1, scale=kscale).requires_grad_(),
         "v": _randn(B, H, N, Dv, seed=s + 2).requires_grad_(),
         "beta": (2 * torch.rand(B, H, N, generator=_gen(s + 3), dtype=F64)).requires_grad_(),
         "initial_state": _randn(B, H, D, Dv, seed=s + 4).requires_grad_()}
    if gated:
        t["g"] = (-torch.rand(B, H, N, generator=_gen(s + 5), dtype=F64)).requires_grad_()
    kw = dict(chunk_size=chunk, qk_l2norm=l2)
    got, ref = _run(delta_rule, t, **kw), _run(recurrent_delta_rule, t, **kw)
    assert {"dq", "dk", "dv", "dbeta", "dinitial_state"} <= got.keys() and ("dg" in got) == gated
    _assert_close(got, ref, what=f"N={N} C={chunk} gated={gated} l2={l2}")


@pytest.mark.parametrize("engine", ["linear", "linear-gated", "delta", "delta-gated"])
def test_segments_of_one_chunk(monkeypatch, engine):
    # long inputs run segment by segment (a few chunks each, boundary states carried): force one chunk per segment
    import qkv.linear.chunked as chunked
    monkeypatch.setattr(chunked, "_SEGMENT_ELEMS", 1)
    if engine.startswith("linear"):
        t = _lin_inputs(N=90, decay="tokens" if engine.endswith("gated") else "none", seed=4)
        fns = (linear_attention, recurrent_linear_attention)
    else:
        t = _delta_inputs(N=90, seed=4)
        if not engine.endswith("gated"):
            del t["g"]
        fns = (delta_rule, recurrent_delta_rule)
    kw = dict(chunk_size=16, normalize=False) if engine.startswith("linear") else dict(chunk_size=16, qk_l2norm=True)
    got = _run(fns[0], t, **kw)
    _assert_close(got, _run(fns[1], t, **kw), what=engine)
    with torch.no_grad():                       # inference writes the segments into one preallocated output
        o, S = fns[0](**t, **kw, return_state=True)
    assert (o - got["o"]).abs().max() < 1e-12 and (S - got["state"]).abs().max() < 1e-12


@pytest.mark.parametrize("N,chunk", SHAPES + [(300, 16), (250, 64)])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("blocks", ["one chunk", "default"])
def test_delta_inference_equals_recurrent(monkeypatch, N, chunk, gated, l2, blocks):
    # without autograd the delta rule runs its own forward (blocks of chunks, features applied while copying):
    # against the oracle, with GQA heads, an initial state, strided inputs, a last partial chunk, several blocks;
    # its chunk cap lifted in the one-chunk case (chunks of 64 and 100 run there)
    import qkv.linear.chunked as chunked
    if blocks == "one chunk":
        monkeypatch.setattr(chunked, "_BLOCK_ELEMS", 1)
        monkeypatch.setattr(chunked, "_INFER_CHUNK", 1000)
    B, Hk, H, D, Dv, s = 2, 2, 4, 6, 5, N + chunk + 7 * gated
    kscale = 1.0 if l2 else 0.3
    q = _randn(B, N, Hk, D, seed=s).transpose(1, 2)
    k = _randn(B, N, Hk, D, seed=s + 1, scale=kscale).transpose(1, 2)
    v = _randn(B, H, N, Dv, seed=s + 2)
    beta = 2 * torch.rand(B, H, N, generator=_gen(s + 3), dtype=F64)
    s0 = _randn(B, H, D, Dv, seed=s + 4)
    g = -torch.rand(B, H, N, generator=_gen(s + 5), dtype=F64) if gated else None
    kw = dict(g=g, chunk_size=chunk, qk_l2norm=l2, initial_state=s0, return_state=True)
    with torch.no_grad():
        o, S = delta_rule(q, k, v, beta, **kw)
    ro, rS = recurrent_delta_rule(q, k, v, beta, **kw)
    _assert_close({"o": o, "state": S}, {"o": ro, "state": rS}, what=f"N={N} C={chunk} gated={gated} l2={l2}")


def test_gradients_of_state_only_and_output_only():
    t = _lin_inputs(N=50, decay="tokens")
    for fn_c, fn_r, tt, kw in ((linear_attention, recurrent_linear_attention, t, dict(chunk_size=16)),
                               (delta_rule, recurrent_delta_rule, _delta_inputs(N=50), dict(chunk_size=16))):
        for pick in (0, 1):
            res = []
            for fn in (fn_c, fn_r):
                leaves = {n: x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) else x
                          for n, x in tt.items()}
                out = fn(**leaves, **kw, return_state=True)[pick]
                out.pow(2).sum().backward()
                res.append({n: x.grad for n, x in leaves.items() if isinstance(x, torch.Tensor)})
            _assert_close(*res, what=f"{fn_c.__name__} loss on {'state' if pick else 'output'} only")


def test_strong_decays_stay_finite():
    # log-decays of -60 per token: exp(b) of a chunk's running sum underflows to 0; nothing may turn into inf/NaN
    t = _lin_inputs(N=40, decay="tokens", seed=2)
    t["decay"] = (t["decay"] * 120).detach().requires_grad_()
    got, ref = _run(linear_attention, t, chunk_size=16), _run(recurrent_linear_attention, t, chunk_size=16)
    assert all(torch.isfinite(x).all() for x in got.values())
    _assert_close(got, ref)
    d = _delta_inputs(N=40)
    d["g"] = (d["g"] * 60).detach().requires_grad_()
    got, ref = _run(delta_rule, d, chunk_size=16), _run(recurrent_delta_rule, d, chunk_size=16)
    assert all(torch.isfinite(x).all() for x in got.values())
    _assert_close(got, ref)


def test_noncontiguous_inputs():
    # the (B, N, H, D) layout of transformers, viewed as (B, H, N, D)
    B, N, H, D = 2, 45, 4, 8
    x = _randn(B, N, H, 3 * D, seed=1)
    q, k, v = (x[..., i * D:(i + 1) * D].transpose(1, 2) for i in range(3))
    g = (-torch.rand(B, N, H, generator=_gen(2), dtype=F64)).transpose(1, 2)
    beta = torch.rand(B, N, H, generator=_gen(3), dtype=F64).transpose(1, 2)
    assert not q.is_contiguous()
    torch.testing.assert_close(linear_attention(q, k, v, decay=g, chunk_size=16),
                               linear_attention(q.contiguous(), k.contiguous(), v.contiguous(), decay=g.contiguous(),
                                                chunk_size=16), rtol=0, atol=1e-12)
    torch.testing.assert_close(delta_rule(q, k, v, beta, g=g, qk_l2norm=True, chunk_size=16),
                               recurrent_delta_rule(q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(),
                                                    g=g.contiguous(), qk_l2norm=True), rtol=0, atol=1e-12)


def _delta_inputs(B=2, Hk=1, H=2, N=37, D=6, Dv=4, seed=0, state=True):
    t = {"q": _randn(B, Hk, N, D, seed=seed).requires_grad_(),
         "k": _randn(B, Hk, N, D, seed=seed + 1).requires_grad_(),
         "v": _randn(B, H, N, Dv, seed=seed + 2).requires_grad_(),
         "beta": torch.rand(B, H, N, generator=_gen(seed + 3), dtype=F64).requires_grad_(),
         "g": (-0.5 * torch.rand(B, H, N, generator=_gen(seed + 4), dtype=F64)).requires_grad_()}
    if state:
        t["initial_state"] = _randn(B, H, D, Dv, seed=seed + 5).requires_grad_()
    return t


# ----------------------------------------------------------------------------------------------------------------
# the recurrent definitions against closed forms written here
# ----------------------------------------------------------------------------------------------------------------
def _closed_form_linear(q, k, v, *, logdecay, causal, normalize, scale, fmap, s0=None):
    """o_t = Σ_s w_ts (φq_t·φk_s) v_s [/ Σ_s w_ts (φq_t·φk_s)], w_ts = exp(Σ_{s<r<=t} g_r) (s <= t), the
    attention-like quadratic form; s0 enters as exp(Σ_{r<=t} g_r)·φq_t·s0."""
    qf, kf = fmap(q) * scale, fmap(k)
    N = q.shape[2]
    Bc = logdecay.cumsum(-1) if logdecay is not None else torch.zeros(q.shape[:3], dtype=q.dtype)
    W = torch.exp(Bc[..., :, None] - Bc[..., None, :])
    if causal:
        W = W * torch.ones(N, N, dtype=torch.bool).tril()
    else:
        W = torch.ones_like(W)
    sc = (qf @ kf.transpose(-1, -2)) * W
    num = sc @ v
    den = sc.sum(-1, keepdim=True)
    if s0 is not None:
        e = Bc.exp()[..., None] if causal else 1.0
        num = num + e * (qf @ s0[..., :-1] if normalize else qf @ s0)
        if normalize:
            den = den + e * (qf @ s0[..., -1:])
    return num / den if normalize else num


@pytest.mark.parametrize("causal,decay,normalize", [(True, "none", True), (True, "tokens", False),
                                                    (True, "tokens", True), (True, "heads", False),
                                                    (False, "none", True), (False, "none", False)])
def test_recurrent_linear_matches_closed_form(causal, decay, normalize):
    t = _lin_inputs(B=2, Hk=3, H=3, N=23, decay=decay, normalize=normalize, seed=7)
    q, k, v, s0 = t["q"].detach(), t["k"].detach(), t["v"].detach(), t["initial_state"].detach()
    d = t.get("decay")
    logd = None if d is None else (d.detach() if decay == "tokens" else torch.log(d.detach()).view(1, -1, 1)
                                   .expand(2, 3, 23))
    fm = lambda x: F.elu(x) + 1
    want = _closed_form_linear(q, k, v, logdecay=logd, causal=causal, normalize=normalize, scale=0.5, fmap=fm,
                               s0=s0)
    got = recurrent_linear_attention(q, k, v, causal=causal, decay=None if d is None else d.detach(),
                                     normalize=normalize, scale=0.5, initial_state=s0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_recurrent_delta_matches_matrix_form():
    # S_t = α_t·(I − β_t k_t k_tᵀ)·S_{t−1} + β_t k_t v_tᵀ with explicit D×D matrices; o_t = S_tᵀ q_t·scale
    t = _delta_inputs(B=1, Hk=2, H=2, N=19, D=4, Dv=3, seed=11)
    q, k, v, beta, g, s0 = (t[n].detach() for n in ("q", "k", "v", "beta", "g", "initial_state"))
    S, outs = s0.clone(), []
    eye = torch.eye(4, dtype=F64)
    for i in range(19):
        kt = k[:, :, i, :, None]
        M = torch.exp(g[:, :, i])[..., None, None] * (eye - beta[:, :, i, None, None] * kt @ kt.mT)
        S = M @ S + beta[:, :, i, None, None] * kt @ v[:, :, i, None, :]
        outs.append((S.mT @ (q[:, :, i, :, None] * 0.4))[..., 0])
    got, st = recurrent_delta_rule(q, k, v, beta, g=g, scale=0.4, initial_state=s0, return_state=True)
    torch.testing.assert_close(got, torch.stack(outs, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(st, S, rtol=0, atol=1e-12)


def test_delta_rule_overwrites():
    # orthonormal keys, beta = 1: the state stores v_t under k_t and a later write under the same key replaces it
    D = 4
    keys = torch.eye(D, dtype=F64)
    k = torch.stack([keys[0], keys[1], keys[0]]).view(1, 1, 3, D)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=F64).view(1, 1, 3, 2)
    beta = torch.ones(1, 1, 3, dtype=F64)
    q = torch.stack([keys[0], keys[1], keys[0]]).view(1, 1, 3, D)
    for fn in (delta_rule, recurrent_delta_rule):
        o = fn(q, k, v, beta, scale=1.0, chunk_size=2)
        torch.testing.assert_close(o[0, 0], torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=F64))


def test_retention_decay_factor():
    # one key at t = 0, queries afterwards read it decayed by γ^t
    N, g = 6, 0.8
    k = torch.zeros(1, 1, N, 1, dtype=F64)
    k[0, 0, 0] = 1
    v = torch.zeros(1, 1, N, 1, dtype=F64)
    v[0, 0, 0] = 1
    q = torch.ones(1, 1, N, 1, dtype=F64)
    for fn in (linear_attention, recurrent_linear_attention):
        o = fn(q, k, v, decay=g, feature_map="identity", scale=1.0, chunk_size=4)
        torch.testing.assert_close(o.flatten(), g ** torch.arange(N, dtype=F64))


def test_normalize_guard():
    # relu features of a negative key: Σφ(k) = 0, the row sees nothing: 0, not NaN
    q = torch.ones(1, 1, 3, 2, dtype=F64)
    k = -torch.ones(1, 1, 3, 2, dtype=F64)
    v = torch.ones(1, 1, 3, 2, dtype=F64)
    for fn in (linear_attention, recurrent_linear_attention):
        o = fn(q, k, v, feature_map="relu", normalize=True)
        assert torch.equal(o, torch.zeros_like(o))
    # identity features: a signed normaliser near 0 is lifted to ±eps
    k2 = torch.tensor([[1.0, 0.0], [-1.0, 1e-9], [0.0, 0.0]], dtype=F64).view(1, 1, 3, 2)
    q2 = torch.tensor([[1.0, 0.0]] * 3, dtype=F64).view(1, 1, 3, 2)
    o1 = linear_attention(q2, k2, v, feature_map="identity", normalize=True, scale=1.0, eps=1e-3)
    o2 = recurrent_linear_attention(q2, k2, v, feature_map="identity", normalize=True, scale=1.0, eps=1e-3)
    assert torch.isfinite(o1).all()
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-12)
    torch.testing.assert_close(o1[0, 0, 1], torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)  # 0/eps


# ----------------------------------------------------------------------------------------------------------------
# streaming and decoding
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [1, 17, 64, 99])
def test_linear_streaming_two_calls_equal_one(split):
    t = _lin_inputs(N=130, decay="tokens", normalize=True, seed=split)
    q, k, v, d, s0 = (t[n] for n in ("q", "k", "v", "decay", "initial_state"))
    kw = dict(normalize=True, chunk_size=64)
    o, S = linear_attention(q, k, v, decay=d, initial_state=s0, return_state=True, **kw)
    o1, S1 = linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], decay=d[..., :split],
                              initial_state=s0, return_state=True, **kw)
    o2, S2 = linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], decay=d[..., split:],
                              initial_state=S1, return_state=True, **kw)
    oc = torch.cat([o1, o2], dim=2)
    assert (oc - o).abs().max().item() < 1e-12 and (S2 - S).abs().max().item() < 1e-12
    # gradients flow through the chained state too
    ga = torch.autograd.grad((oc.sum() + S2.sum()), [q, k, v, d, s0])
    gb = torch.autograd.grad((o.sum() + S.sum()), [q, k, v, d, s0])
    assert max((a - b).abs().max().item() for a, b in zip(ga, gb)) < 1e-12


@pytest.mark.parametrize("split", [1, 17, 64, 99])
def test_delta_streaming_two_calls_equal_one(split):
    t = _delta_inputs(N=130, seed=split)
    q, k, v, beta, g, s0 = (t[n] for n in ("q", "k", "v", "beta", "g", "initial_state"))
    kw = dict(chunk_size=64, qk_l2norm=True)
    o, S = delta_rule(q, k, v, beta, g=g, initial_state=s0, return_state=True, **kw)
    sl = lambda x, a, b: x[:, :, a:b]
    o1, S1 = delta_rule(*(sl(x, 0, split) for x in (q, k, v, beta)), g=sl(g, 0, split), initial_state=s0,
                        return_state=True, **kw)
    o2, S2 = delta_rule(*(sl(x, split, None) for x in (q, k, v, beta)), g=sl(g, split, None), initial_state=S1,
                        return_state=True, **kw)
    oc = torch.cat([o1, o2], dim=2)
    assert (oc - o).abs().max().item() < 1e-12 and (S2 - S).abs().max().item() < 1e-12
    ga = torch.autograd.grad((oc.sum() + S2.sum()), [q, k, v, beta, g, s0])
    gb = torch.autograd.grad((o.sum() + S.sum()), [q, k, v, beta, g, s0])
    assert max((a - b).abs().max().item() for a, b in zip(ga, gb)) < 1e-12


def test_steps_equal_one_call():
    t = _lin_inputs(N=12, decay="tokens", normalize=True)
    q, k, v, d, s0 = (t[n].detach() for n in ("q", "k", "v", "decay", "initial_state"))
    o, S = linear_attention(q, k, v, decay=d, normalize=True, initial_state=s0, return_state=True)
    st, outs = s0, []
    for i in range(12):
        oi, st = linear_attention_step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], st,
                                       decay=d[..., i:i + 1], normalize=True)
        outs.append(oi)
    assert (torch.cat(outs, 2) - o).abs().max() < 1e-12 and (st - S).abs().max() < 1e-12

    t = _delta_inputs(N=12)
    q, k, v, beta, g, s0 = (t[n].detach() for n in ("q", "k", "v", "beta", "g", "initial_state"))
    o, S = delta_rule(q, k, v, beta, g=g, initial_state=s0, return_state=True, qk_l2norm=True)
    st, outs = None, []
    o0, _ = delta_rule(q, k, v, beta, g=g, return_state=True, qk_l2norm=True)
    for i in range(12):
        sl = slice(i, i + 1)
        oi, st = delta_rule_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], beta[..., sl], st, g=g[..., sl],
                                 qk_l2norm=True)
        outs.append(oi)
    assert (torch.cat(outs, 2) - o0).abs().max() < 1e-12


def test_empty_inputs():
    t = _lin_inputs(N=0, decay="tokens")
    o, S = linear_attention(t["q"], t["k"], t["v"], decay=t["decay"], initial_state=t["initial_state"],
                            return_state=True)
    assert o.shape == (2, 4, 0, 3) and torch.equal(S, t["initial_state"])
    o, S = delta_rule(*(torch.zeros(0, 2, 5, 4) for _ in range(3)), torch.zeros(0, 2, 5), return_state=True)
    assert o.shape == (0, 2, 5, 4) and S.shape == (0, 2, 4, 4)


# ----------------------------------------------------------------------------------------------------------------
# dtypes: fp32 and bf16 inputs compute in fp32 (FlashAttention's rule against the fp64 oracle)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    B, H, N, D = 1, 2, 200, 16
    q, k, v = (_randn(B, H, N, D, seed=i) for i in range(3))
    g = -torch.rand(B, H, N, generator=_gen(4), dtype=F64) * 0.2
    beta = torch.rand(B, H, N, generator=_gen(5), dtype=F64)
    cases = [(linear_attention, recurrent_linear_attention, (q, k, v), dict(decay=g)),
             (linear_attention, recurrent_linear_attention, (q, k, v), dict()),
             (delta_rule, recurrent_delta_rule, (q, k, v, beta), dict(g=g, qk_l2norm=True))]
    for fn, ref, args, kw in cases:
        oracle = ref(*args, **kw)
        low = [a.to(dtype) for a in args]
        kwl = {n: (x.to(dtype) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
        out, S = fn(*low, **kwl, return_state=True)
        assert out.dtype == dtype and S.dtype == torch.float32
        plain = ref(*low, **kwl)   # the same recurrence run in fp32 (bf16 inputs are rounded first)
        msg = check_fa(fn.__name__, out, oracle, plain.float() if dtype == torch.bfloat16 else plain)
        assert not msg, msg


# ----------------------------------------------------------------------------------------------------------------
# bad inputs are refused before any work, with the argument named
# ----------------------------------------------------------------------------------------------------------------
def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("kw,err,match", [
    (dict(decay=torch.full((1, 2, 8), 0.1)), ValueError, "decay holds log-decays, which must be <= 0"),
    (dict(decay=torch.full((1, 2, 8), float("nan"))), ValueError, "must be <= 0"),
    (dict(decay=1.5), ValueError, r"decay must lie in \(0, 1\]"),
    (dict(decay=0.0), ValueError, r"decay must lie in \(0, 1\]"),
    (dict(decay=torch.tensor([0.5, 0.0])), ValueError, r"decay factors must lie in \(0, 1\]"),
    (dict(decay=torch.tensor([0.5, 0.4, 0.3])), ValueError, r"shape \(H=2,\)"),
    (dict(decay=torch.zeros(2, 8)), ValueError, "decay must be a number"),
    (dict(decay="0.5"), TypeError, "decay must be None"),
    (dict(decay=0.9, causal=False), ValueError, "decay needs causal=True"),
    (dict(chunk_size=0), ValueError, "chunk_size must be an int >= 1"),
    (dict(chunk_size=2.5), ValueError, "chunk_size must be an int >= 1"),
    (dict(chunk_size=True), ValueError, "chunk_size must be an int >= 1"),
    (dict(feature_map="softmax"), ValueError, "feature_map must be one of"),
    (dict(feature_map=lambda x: x[..., 0]), ValueError, r"feature_map\(q\) must return"),
    (dict(scale="1"), TypeError, "scale must be a number"),
    (dict(normalize=1), TypeError, "normalize must be None or a bool"),
    (dict(causal=None), TypeError, "causal must be a bool"),
    (dict(eps=0.0), ValueError, "eps must be a positive number"),
    (dict(initial_state=torch.zeros(1, 2, 4, 4)), ValueError, r"initial_state must have shape \(B=1, H=2, 4, 5\)"),
    (dict(initial_state=torch.zeros(1, 2, 4, 5, dtype=torch.float64)), TypeError,
     "initial_state must be torch.float32"),
    (dict(initial_state=torch.zeros(1, 2, 4, 4), normalize=False), None, None),
])
def test_linear_attention_refuses(kw, err, match):
    q, k, v = _x(1, 2, 8, 4), _x(1, 2, 8, 4), _x(1, 2, 8, 4)
    for fn in (linear_attention, recurrent_linear_attention):
        if err is None:
            fn(q, k, v, **kw)
        else:
            with pytest.raises(err, match=match):
                fn(q, k, v, **kw)


@pytest.mark.parametrize("args,kw,err,match", [
    ((_x(1, 2, 8, 4), _x(1, 2, 8, 4), _x(1, 2, 8, 3), torch.full((1, 2, 8), 2.5)), {}, ValueError,
     r"beta must lie in \[0, 2\]"),
    ((_x(1, 2, 8, 4), _x(1, 2, 8, 4), _x(1, 2, 8, 3), torch.full((1, 2, 8), -0.1)), {}, ValueError,
     r"beta must lie in \[0, 2\]"),
    ((_x(1, 2, 8, 4), _x(1, 2, 8, 4), _x(1, 2, 8, 3), torch.full((1, 2, 8), float("nan"))), {}, ValueError,
     r"beta must lie in \[0, 2\]"),
    ((_x(1, 2, 8, 4), _x(1, 2, 8, 4), _x(1, 2, 8, 3), torch.ones(1, 2, 7)), {}, ValueError,
     r"beta must have shape \(B=1, H=2, N=8\)"),
    ((_x(1, 2, 8, 4), _x(1, 2, 8, 4), _x(1, 2, 8, 3), torch.ones(1, 2, 8)), dict(g=torch.full((1, 2, 8), 0.5)),
     ValueError, "g holds log-decays, which must be <= 0"),
    ((_x(1, 2, 8, 4), _x(1, 2, 8, 4), _x(1, 2, 8, 3), torch.ones(1, 2, 8)),
     dict(initial_state=torch.zeros(1, 2, 3, 4)), ValueError, r"initial_state must have shape \(B=1, H=2, 4, 3\)"),
    ((_x(1, 2, 8, 4), _x(1, 2, 8, 4), _x(1, 2, 8, 3), torch.ones(1, 2, 8)),
     dict(initial_state=torch.zeros(1, 2, 4, 3, dtype=torch.bfloat16)), TypeError, "initial_state must be"),
    ((_x(1, 2, 8, 4), _x(1, 2, 8, 4), _x(1, 2, 8, 3), torch.ones(1, 2, 8)), dict(chunk_size=-1), ValueError,
     "chunk_size"),
    ((_x(1, 2, 8, 4), _x(1, 2, 8, 5), _x(1, 2, 8, 3), torch.ones(1, 2, 8)), {}, ValueError,
     "q and k must have the same shape"),
    ((_x(1, 2, 8, 4), _x(1, 2, 8, 4), _x(1, 3, 8, 3), torch.ones(1, 3, 8)), {}, ValueError,
     "must be a multiple of the query/key heads"),
    ((_x(1, 2, 8, 4), _x(1, 2, 8, 4), _x(1, 2, 8, 3, dtype=torch.float64), torch.ones(1, 2, 8)), {}, TypeError,
     "same dtype"),
    ((_x(1, 2, 8, 4), _x(1, 2, 8, 4), torch.ones(1, 2, 8, 3, dtype=torch.int64), torch.ones(1, 2, 8)), {},
     TypeError, "v must be a floating tensor"),
    ((_x(2, 8, 4), _x(1, 2, 8, 4), _x(1, 2, 8, 3), torch.ones(1, 2, 8)), {}, ValueError,
     r"q must have shape \(B, Hk, N, D\)"),
    (([1.0], _x(1, 2, 8, 4), _x(1, 2, 8, 3), torch.ones(1, 2, 8)), {}, TypeError, "q must be a tensor"),
])
def test_delta_rule_refuses(args, kw, err, match):
    for fn in (delta_rule, recurrent_delta_rule):
        with pytest.raises(err, match=match):
            fn(*args, **kw)


def test_steps_refuse_more_than_one_token():
    with pytest.raises(ValueError, match="a step takes one token"):
        linear_attention_step(_x(1, 2, 2, 4), _x(1, 2, 2, 4), _x(1, 2, 2, 4))
    with pytest.raises(ValueError, match="a step takes one token"):
        delta_rule_step(_x(1, 2, 2, 4), _x(1, 2, 2, 4), _x(1, 2, 2, 4), torch.ones(1, 2, 2))


# ----------------------------------------------------------------------------------------------------------------
# property test: random shapes, chunk sizes and options
# ----------------------------------------------------------------------------------------------------------------
try:
    from hypothesis import given
    from hypothesis import strategies as st
except ImportError:   # pragma: no cover
    given = None

if given is not None:
    @given(B=st.integers(1, 2), Hk=st.integers(1, 2), rep=st.integers(1, 2), N=st.integers(1, 70),
           D=st.integers(1, 6), Dv=st.integers(1, 5), chunk=st.integers(1, 80), kind=st.sampled_from(
               ["linear", "linear-decay", "linear-norm", "linear-noncausal", "delta", "gated-delta"]),
           seed=st.integers(0, 2 ** 16))
    def test_property_chunked_equals_recurrent(B, Hk, rep, N, D, Dv, chunk, kind, seed):
        H = Hk * rep
        if kind.startswith("linear"):
            t = _lin_inputs(B, Hk, H, N, D, Dv, decay="tokens" if kind == "linear-decay" else "none",
                            normalize=kind == "linear-norm", seed=seed)
            kw = dict(chunk_size=chunk, normalize=kind == "linear-norm", causal=kind != "linear-noncausal")
            fns = (linear_attention, recurrent_linear_attention)
        else:
            t = _delta_inputs(B, Hk, H, N, D, Dv, seed=seed)
            if kind == "delta":
                del t["g"]
            kw = dict(chunk_size=chunk, qk_l2norm=True)
            fns = (delta_rule, recurrent_delta_rule)
        _assert_close(_run(fns[0], t, **kw), _run(fns[1], t, **kw), what=f"{kind} N={N} C={chunk}")
