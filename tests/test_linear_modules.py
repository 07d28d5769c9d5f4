"""qkv.linear's modules: LinearSelfAttention and GatedDeltaNet (decode path = full pass, options, errors)."""
from __future__ import annotations

import pytest
import torch

import qkv
from qkv.linear import GatedDeltaNet, LinearSelfAttention, linear_attention


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _x(B=2, N=40, d=24, seed=0, dtype=torch.float64):
    return torch.randn(B, N, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_exported_from_qkv():
    assert qkv.LinearSelfAttention is LinearSelfAttention and qkv.GatedDeltaNet is GatedDeltaNet
    assert qkv.linear_attention is linear_attention and qkv.linear.delta_rule is not None


@pytest.mark.parametrize("decay", [None, 0.9, [0.8, 0.9, 0.95], "retention", "gated"])
def test_linear_self_attention_decode_equals_full(decay):
    torch.manual_seed(0)
    m = LinearSelfAttention(24, 3, decay=decay, chunk_size=8).double()
    x = _x()
    full, S = m(x, return_state=True)
    assert full.shape == x.shape
    o1, st = m(x[:, :13], return_state=True)              # chunked prefill
    outs = [o1]
    for i in range(13, 40):                                # one-token steps carrying the state
        oi, st = m(x[:, i:i + 1], state=st, return_state=True)
        outs.append(oi)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(st, S, rtol=0, atol=1e-12)


def test_linear_self_attention_matches_functional_and_trains():
    torch.manual_seed(0)
    m = LinearSelfAttention(24, 4, causal=False, feature_map="relu", bias=False).double()
    x = _x().requires_grad_()
    out = m(x)
    h = lambda t: t.view(2, 40, 4, 6).transpose(1, 2)
    o = linear_attention(h(m.q_proj(x)), h(m.k_proj(x)), h(m.v_proj(x)), causal=False, feature_map="relu")
    torch.testing.assert_close(out, m.o_proj(o.transpose(1, 2).reshape(2, 40, 24)), rtol=0, atol=1e-12)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())


def test_gated_linear_self_attention_learns_decay_parameters():
    torch.manual_seed(0)
    m = LinearSelfAttention(24, 3, decay="gated")
    m(_x(dtype=torch.float32)).square().sum().backward()
    assert m.A_log.grad is not None and m.dt_bias.grad is not None and m.a_proj.weight.grad.abs().sum() > 0


def test_gated_deltanet_decode_equals_full_and_gradients():
    torch.manual_seed(0)
    m = GatedDeltaNet(24, 2, n_v_heads=4, head_dim=8, v_head_dim=6, chunk_size=16).double()
    x = _x(N=50).requires_grad_()
    full, (conv, rec) = m(x, return_state=True)
    assert full.shape == x.shape and conv.shape == (2, m.conv_dim, 3) and rec.shape == (2, 4, 8, 6)
    o1, st = m(x[:, :21], return_state=True)
    o2, st = m(x[:, 21:30], state=st, return_state=True)   # chunked continuation
    outs = [o1, o2]
    for i in range(30, 50):
        oi, st = m(x[:, i:i + 1], state=st, return_state=True)
        outs.append(oi)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(st[1], rec, rtol=0, atol=1e-12)
    full.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_gated_deltanet_bf16_runs_with_fp32_state():
    torch.manual_seed(0)
    m = GatedDeltaNet(32, 2).to(torch.bfloat16)
    out, (conv, rec) = m(_x(N=20, d=32, dtype=torch.bfloat16), return_state=True)
    assert out.dtype == torch.bfloat16 and conv.dtype == torch.bfloat16 and rec.dtype == torch.float32
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("make,match,err", [
    (lambda: LinearSelfAttention(24, 5), "not divisible by n_heads", ValueError),
    (lambda: LinearSelfAttention(24, 3, decay=1.5), r"decay factors must be 3 numbers in \(0, 1\]", ValueError),
    (lambda: LinearSelfAttention(24, 3, decay=[0.5, 0.5]), "decay factors must be 3 numbers", ValueError),
    (lambda: LinearSelfAttention(24, 3, decay="alibi"), "decay must be None", ValueError),
    (lambda: LinearSelfAttention(24, 3, decay=0.9, causal=False), "decay needs causal=True", ValueError),
    (lambda: LinearSelfAttention(24, 3, feature_map="tanh"), "feature_map must be one of", ValueError),
    (lambda: LinearSelfAttention(24, 3, chunk_size=0), "chunk_size must be a positive int", ValueError),
    (lambda: GatedDeltaNet(24, 2, n_v_heads=3), "must be a multiple of n_heads", ValueError),
    (lambda: GatedDeltaNet(24, 0), "n_heads must be a positive int", ValueError),
    (lambda: GatedDeltaNet(24, 2, norm_eps=0), "norm_eps must be a positive number", ValueError),
])
def test_constructors_refuse(make, match, err):
    with pytest.raises(err, match=match):
        make()


def test_forward_refuses():
    m = LinearSelfAttention(24, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, d_model=24\)"):
        m(torch.zeros(2, 5, 23))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        m(torch.zeros(2, 5, 24, dtype=torch.long))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        m(torch.zeros(2, 5, 24), state=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="need causal=True"):
        LinearSelfAttention(24, 3, causal=False)(torch.zeros(2, 5, 24), return_state=True)
    g = GatedDeltaNet(24, 2)
    with pytest.raises(TypeError, match=r"state must be a \(conv_state, recurrent_state\) pair"):
        g(torch.zeros(2, 5, 24), state=torch.zeros(2, 2, 12, 12))
    with pytest.raises(ValueError, match="conv_state must have shape"):
        g(torch.zeros(2, 5, 24), state=(torch.zeros(2, 5, 3), torch.zeros(2, 2, 12, 12)))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        g(torch.zeros(2, 5, 24), state=(torch.zeros(2, g.conv_dim, 3), torch.zeros(2, 2, 12, 11)))
