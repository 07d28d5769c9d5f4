"""qkv.linear's Triton kernels (``backend="triton"``) on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1),
against the fp64 recurrent definitions by FlashAttention's rule: outputs, final states and gradients (the backward
recomputes with the torch engine), decays of every kind, feature maps, GQA, N = 1 and N not a multiple of the chunk,
D and Dv below the 16 padding, initial states and streaming; then the backend choice and its refusals.
Shapes are tiny: the interpreter runs each program in numpy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qkv.linear import delta_rule, linear_attention, recurrent_delta_rule, recurrent_linear_attention
from qkv.testing import check_fa

pytest.importorskip("triton")

F64 = torch.float64


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=_gen(seed), dtype=F64) * scale


def _run(fn, tensors: dict, dtype, seed=99, round_to=None, **kw):
    """fn on leaves of ``tensors`` cast to dtype (states stay fp32/fp64), return_state=True; backward of a fixed
    random projection of (o, state), rounded to ``round_to`` first. Returns {"o", "state", "d<name>"}."""
    leaves = {}
    for n, t in tensors.items():
        if isinstance(t, torch.Tensor):
            cast = t.to(dtype if n != "initial_state" else (F64 if dtype == F64 else torch.float32))
            leaves[n] = cast.detach().clone().requires_grad_(t.requires_grad)
        else:
            leaves[n] = t
    o, S = fn(**leaves, **kw, return_state=True)
    go = torch.randn(o.shape, generator=_gen(seed), dtype=F64).to(round_to or o.dtype).to(o.dtype)
    gs = torch.randn(S.shape, generator=_gen(seed + 1), dtype=F64).to(S.dtype)
    ((o * go).float().sum() + (S * gs).float().sum()).backward()
    res = {"o": o.detach(), "state": S.detach()}
    res.update({"d" + n: t.grad for n, t in leaves.items() if isinstance(t, torch.Tensor) and t.requires_grad})
    return res


def _check(fn, ref, tensors, dtype=torch.float32, like_torch=(), **kw):
    """The triton engine against the fp64 oracle, with the oracle's recurrence run in the input dtype (fp32 for bf16)
    as FlashAttention's yardstick: 2× its error for outputs and states, 3× for gradients. 16-bit inputs are rounded
    first, so that all three read the same inputs. ``like_torch``: results held to the torch engine's instead (the
    backward is the torch engine's)."""
    if dtype != torch.float32:
        tensors = {n: (t.detach().to(dtype).to(F64).requires_grad_(t.requires_grad)
                       if isinstance(t, torch.Tensor) and n != "initial_state" else t) for n, t in tensors.items()}
    got = _run(fn, tensors, dtype, backend="triton", **kw)
    oracle = _run(ref, tensors, F64, round_to=dtype, **kw)
    plain = _run(ref, tensors, torch.float32 if dtype == torch.bfloat16 else dtype, round_to=dtype, **kw)
    assert got["o"].dtype == dtype and got["state"].dtype == torch.float32
    assert got.keys() == oracle.keys()
    msgs = []
    if like_torch:
        ref_torch = _run(fn, tensors, dtype, backend="torch", **kw)
    for n in got:
        if got[n] is None and oracle[n] is None:
            continue
        if n in like_torch:
            torch.testing.assert_close(got[n], ref_torch[n], rtol=1e-5, atol=1e-6)
            continue
        e = got[n]                     # in its own dtype: bf16 results are measured in bf16 units
        msgs.append(check_fa(n, e, oracle[n], plain[n].to(e.dtype), factor=2.0 if n in ("o", "state") else 3.0))
    bad = [m for m in msgs if m]
    assert not bad, bad


# ----------------------------------------------------------------------------------------------------------------
# delta rule
# ----------------------------------------------------------------------------------------------------------------
def _delta_inputs(B, Hk, H, N, D, Dv, *, gated, state, seed=0):
    t = {"q": _randn(B, Hk, N, D, seed=seed).requires_grad_(),
         "k": _randn(B, Hk, N, D, seed=seed + 1).requires_grad_(),
         "v": _randn(B, H, N, Dv, seed=seed + 2).requires_grad_(),
         "beta": torch.rand(B, H, N, generator=_gen(seed + 3), dtype=F64).requires_grad_()}
    if gated:
        t["g"] = (-0.3 * torch.rand(B, H, N, generator=_gen(seed + 4), dtype=F64)).requires_grad_()
    if state:
        t["initial_state"] = _randn(B, H, D, Dv, seed=seed + 5, scale=0.3).requires_grad_()
    return t


@pytest.mark.parametrize("B,Hk,H,N,D,Dv,gated,l2,state,dtype,chunk", [
    (1, 1, 2, 37, 16, 16, True, True, True, torch.float32, 16),     # GQA; 3 chunks, the last partial
    (2, 1, 1, 40, 24, 20, True, False, False, torch.float32, 16),   # D, Dv padded to 32; no l2norm (small keys)
    (1, 2, 2, 1, 8, 5, False, True, True, torch.float32, 16),       # N = 1, head dims below the padding
    (1, 1, 1, 70, 16, 16, False, True, False, torch.float32, 32),   # DeltaNet, 32-token chunks
    (1, 1, 2, 20, 16, 16, True, True, True, torch.bfloat16, 16),
])
def test_delta_rule(B, Hk, H, N, D, Dv, gated, l2, state, dtype, chunk):
    t = _delta_inputs(B, Hk, H, N, D, Dv, gated=gated, state=state)
    if not l2:                  # keys of norm ~0.5: the update I − β·k·kᵀ stays a contraction
        t["k"] = (t["k"].detach() * (0.5 / D ** 0.5)).requires_grad_()
    _check(delta_rule, recurrent_delta_rule, t, dtype, qk_l2norm=l2, chunk_size=chunk, scale=0.7 if l2 else None)


# ----------------------------------------------------------------------------------------------------------------
# linear attention
# ----------------------------------------------------------------------------------------------------------------
def _lin_inputs(B, Hk, H, N, D, Dv, *, decay, state, normalize, seed=0):
    t = {"q": _randn(B, Hk, N, D, seed=seed).requires_grad_(),
         "k": _randn(B, Hk, N, D, seed=seed + 1).requires_grad_(),
         "v": _randn(B, H, N, Dv, seed=seed + 2).requires_grad_()}
    if decay == "tokens":
        t["decay"] = (-0.5 * torch.rand(B, H, N, generator=_gen(seed + 3), dtype=F64)).requires_grad_()
    elif decay == "heads":
        t["decay"] = (0.7 + 0.3 * torch.rand(H, generator=_gen(seed + 3), dtype=F64)).requires_grad_()
    elif decay == "float":
        t["decay"] = 0.9
    if state:
        t["initial_state"] = _randn(B, H, D, Dv + normalize, seed=seed + 4, scale=0.3).abs().requires_grad_()
    return t


def _square(x):
    return torch.cat([x, x * x], dim=-1)


@pytest.mark.parametrize("N,Hk,H,decay,fmap,normalize,state,dtype", [
    (37, 1, 2, "tokens", "identity", False, True, torch.float32),   # Mamba-2 SSD / GLA; GQA; partial chunk
    (40, 2, 2, "heads", "elu1", False, False, torch.float32),       # retention with a (H,) decay tensor
    (33, 1, 1, "float", "relu", False, True, torch.float32),        # retention with a number
    (35, 1, 2, None, "elu1", True, True, torch.float32),            # normalised (the ones column), with a state
    (1, 2, 2, None, "elu1", None, False, torch.float32),            # N = 1, normalize by default
    (21, 1, 1, "tokens", _square, False, False, torch.float32),     # a callable feature map (F = 2·D)
    (20, 1, 2, "tokens", "elu1", False, True, torch.bfloat16),
])
def test_linear_attention(N, Hk, H, decay, fmap, normalize, state, dtype):
    D, Dv = 8, 12
    t = _lin_inputs(1, Hk, H, N, D, Dv, decay=decay, state=state and not callable(fmap),
                    normalize=bool(normalize))
    # a (H,) decay's gradient sums over every token: the torch engine's backward (which this path runs) misses
    # FlashAttention's rule there by ~20× (relative error 2e-6 of the largest entry), so it is held to that engine
    like = ("ddecay",) if decay == "heads" else ()
    _check(linear_attention, recurrent_linear_attention, t, dtype, like_torch=like, feature_map=fmap,
           normalize=normalize, chunk_size=16)


def test_streaming_two_calls_equal_one():
    """Chained by the state, two triton calls equal one triton call on the concatenation (and the torch engine)."""
    t = _delta_inputs(1, 1, 2, 45, 16, 16, gated=True, state=False, seed=7)
    q, k, v, beta, g = (t[n].detach().float() for n in ("q", "k", "v", "beta", "g"))
    kw = dict(qk_l2norm=True, chunk_size=16, return_state=True)
    o, S = delta_rule(q, k, v, beta, g=g, backend="triton", **kw)
    m = 21
    o1, S1 = delta_rule(q[:, :, :m], k[:, :, :m], v[:, :, :m], beta[:, :, :m], g=g[:, :, :m], backend="triton", **kw)
    o2, S2 = delta_rule(q[:, :, m:], k[:, :, m:], v[:, :, m:], beta[:, :, m:], g=g[:, :, m:], initial_state=S1,
                        backend="triton", **kw)
    torch.testing.assert_close(torch.cat([o1, o2], 2), o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S2, S, rtol=1e-5, atol=1e-5)
    ot, St = delta_rule(q, k, v, beta, g=g, backend="torch", **kw)
    torch.testing.assert_close(o, ot, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S, St, rtol=1e-5, atol=1e-5)


def test_no_grad_and_grad_paths_agree():
    """Without autograd the kernels run bare; with it, through the Function: the same outputs."""
    t = _lin_inputs(1, 1, 1, 19, 8, 8, decay="tokens", state=False, normalize=False)
    q, k, v, d = (t[n].detach().float() for n in ("q", "k", "v", "decay"))
    with torch.no_grad():
        o0 = linear_attention(q, k, v, decay=d, backend="triton", chunk_size=16)
    o1 = linear_attention(q.requires_grad_(), k, v, decay=d, backend="triton", chunk_size=16)
    assert o1.requires_grad and o1.grad_fn is not None
    torch.testing.assert_close(o0, o1.detach(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# the backend argument
# ----------------------------------------------------------------------------------------------------------------
def _small(dtype=torch.float32):
    q, k, v = (torch.randn(1, 1, 4, 8, dtype=dtype) for _ in range(3))
    return q, k, v, torch.rand(1, 1, 4, dtype=dtype)


def test_explicit_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, beta = _small()
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: the Triton kernels run on CUDA"):
        delta_rule(q, k, v, beta, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        linear_attention(q, k, v, backend="triton")


def test_explicit_triton_names_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, beta = _small(F64)
    with pytest.raises(ValueError) as e:
        linear_attention(q, k, v, causal=False, backend="triton")
    msg = str(e.value)
    assert "CUDA tensors" in msg and "float64" in msg and "causal=False" in msg
    big = torch.randn(1, 1, 2, 300)
    with pytest.raises(ValueError, match="head dim D=300 > 256.*value head dim Dv=300"):
        delta_rule(big, big, big, torch.rand(1, 1, 2), backend="triton")


def test_auto_runs_torch_on_cpu(monkeypatch):
    """auto picks the kernels only for CUDA tensors: on CPU (even under the interpreter) the torch engine runs."""
    from qkv.linear import _triton
    called = []
    monkeypatch.setattr(_triton, "_run_delta_kernels", lambda *a, **kw: called.append(1))
    q, k, v, beta = _small()
    o = delta_rule(q, k, v, beta)
    assert not called and o.shape == v.shape
    with pytest.raises(TypeError):                        # the patched launcher returns None: it was reached
        delta_rule(q, k, v, beta, backend="triton")
    assert called


@pytest.mark.parametrize("bad", ["cuda", "Triton", None, 1])
def test_unknown_backend_is_refused(bad):
    q, k, v, beta = _small()
    with pytest.raises(ValueError, match="backend must be one of"):
        delta_rule(q, k, v, beta, backend=bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_attention(q, k, v, backend=bad)


def test_chunk_of():
    from qkv.linear._triton import chunk_of
    assert [chunk_of(c) for c in (1, 16, 17, 32, 63, 64, 100, 1000)] == [16, 16, 16, 32, 32, 64, 64, 64]


def test_empty_sequence():
    q, k, v = (torch.randn(1, 1, 0, 8) for _ in range(3))
    o, S = delta_rule(q, k, v, torch.rand(1, 1, 0), backend="triton", return_state=True)
    assert o.shape == (1, 1, 0, 8) and S.shape == (1, 1, 8, 8) and not S.any()
    o = linear_attention(q, k, v, backend="triton", decay=F.logsigmoid(torch.zeros(1, 1, 0)))
    assert o.shape == (1, 1, 0, 8)


# ----------------------------------------------------------------------------------------------------------------
# qkv kernels: the kernels compile for GPU targets without spills (no GPU needed)
# ----------------------------------------------------------------------------------------------------------------
def test_kernels_compile_for_sm90_without_spills(tmp_path, capsys):
    """D = 128, bf16, Hopper, the WY and state kernels (the most registers), on tensor cores (the full report —
    sm_80 and sm_90, every head dim, bf16 and fp32 — is benchmarks/results/linear_triton_kernels.txt)."""
    import json

    from qkv.tools import cli
    out = tmp_path / "kernels.json"
    rc = cli.main(["kernels", "--arch", "sm_90", "--head-dim", "128", "--dtype", "bf16", "--kernel",
                   "lin_wy", "lin_state", "--jobs", "2", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert rc == 0 and len(rows) == 3 and all(r["ok"] for r in rows), capsys.readouterr().out
    for r in rows:
        assert r["spill_bytes"] == 0 and r["mma"] == ("wgmma" if r["arch"] == 90 else "mma"), r
