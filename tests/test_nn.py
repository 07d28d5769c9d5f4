"""qkv.SelfAttention, qkv.RotaryEmbedding, qkv.KVCache.

The layer is checked against a plain, independent multi-head attention written here with torch ops (fp64), the KV
cache against one causal call on the whole sequence (fp64, < 1e-10), and real Hugging Face attention layers
(Llama with GQA + RoPE, GPT-2 with its fused Conv1D) loaded into ``SelfAttention``.
"""
import math

import pytest
import torch

import qkv
from qkv.nn import KVCache, RotaryEmbedding, SelfAttention

F64 = torch.float64


# ------------------------------------------------------------------------------------------------ helpers
def plain_mha(layer: SelfAttention, x, *, mask=None, positions=None):
    """Independent reference: explicit projections, per-head softmax(QKᵀ/√d)·V with repeat_interleave for GQA,
    rotate_half RoPE, causal top-left (Nq == Nk here). Returns (out (B, N, d), probs (B, H, N, N))."""
    B, N, _ = x.shape
    H, Hkv, D = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = (x @ layer.q_proj.weight.T + (0 if layer.q_proj.bias is None else layer.q_proj.bias)).view(B, N, H, D)
    k = (x @ layer.k_proj.weight.T + (0 if layer.k_proj.bias is None else layer.k_proj.bias)).view(B, N, Hkv, D)
    v = (x @ layer.v_proj.weight.T + (0 if layer.v_proj.bias is None else layer.v_proj.bias)).view(B, N, Hkv, D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if layer.q_norm is not None:
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.q_norm.weight
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.k_norm.weight
    if layer.rope is not None:
        pos = torch.arange(N, dtype=F64) if positions is None else positions.to(F64)
        inv = 1.0 / (layer.rope.base ** (torch.arange(0, D, 2, dtype=F64) / D))
        ang = pos[:, None] * inv[None]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

        def rot(t):
            return t * cos + torch.cat([-t[..., D // 2:], t[..., : D // 2]], -1) * sin

        q, k = rot(q), rot(k)
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    vis = torch.ones(N, N, dtype=torch.bool)
    if layer.causal:
        vis = torch.ones(N, N, dtype=torch.bool).tril()
    if layer.window is not None:
        left, right = layer.window
        i, j = torch.arange(N)[:, None], torch.arange(N)[None]
        vis = vis & (j >= i - left) & (j <= i + (0 if layer.causal else right))
    vis = vis.expand(B, H, N, N)
    if mask is not None:
        vis = vis & mask
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    o = (p @ v).transpose(1, 2).reshape(B, N, H * D)
    return o @ layer.o_proj.weight.T + (0 if layer.o_proj.bias is None else layer.o_proj.bias), p


def maxdiff(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------ the layer
@pytest.mark.parametrize("cfg", [
    dict(n_heads=4),
    dict(n_heads=4, causal=True),
    dict(n_heads=8, n_kv_heads=2, causal=True, rope=True),
    dict(n_heads=4, n_kv_heads=1, head_dim=12, bias=False, rope=True, qk_norm=True),
    dict(n_heads=4, causal=True, window=3),
    dict(n_heads=4, window=2),
], ids=["mha", "causal", "gqa-rope", "mqa-hd12-nobias-qknorm", "causal-window", "window"])
def test_selfattention_matches_plain_multihead_attention(cfg):
    layer = SelfAttention(32, **cfg).to(F64)
    if layer.q_norm is not None:  # non-trivial norm weights
        with torch.no_grad():
            layer.q_norm.weight.uniform_(0.5, 1.5)
            layer.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 9, 32, dtype=F64)
    out, w = layer(x, need_weights=True)
    ref, p = plain_mha(layer, x)
    assert out.shape == (2, 9, 32) and w.shape == (2, layer.n_heads, 9, 9) and w.dtype == F64
    assert maxdiff(out, ref) < 1e-10
    assert maxdiff(w, p) < 1e-12
    assert torch.equal(layer(x), out)


def test_selfattention_padding_mask_and_fully_masked_rows():
    layer = SelfAttention(16, 2).to(F64)
    x = torch.randn(2, 5, 16, dtype=F64)
    keep = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, N)
    out = layer(x, mask=keep)
    ref, _ = plain_mha(layer, x, mask=keep)
    assert maxdiff(out, ref) < 1e-10
    # a query row that sees nothing gives 0 attention output (so out = o_proj bias), never NaN
    none = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    out = layer(x, mask=none)
    assert torch.isfinite(out).all()
    assert maxdiff(out, layer.o_proj.bias.expand_as(out)) < 1e-12


def test_selfattention_backward_reaches_every_parameter():
    layer = SelfAttention(16, 4, n_kv_heads=2, causal=True, rope=True, qk_norm=True)
    x = torch.randn(2, 6, 16, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_selfattention_dropout_only_in_training():
    layer = SelfAttention(16, 2, dropout=0.5)
    x = torch.randn(1, 8, 16)
    layer.eval()
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)
    layer.train()
    c = layer(x)
    assert torch.isfinite(c).all() and not torch.allclose(a, c)


def test_selfattention_empty_sequence():
    layer = SelfAttention(16, 2, causal=True)
    assert layer(torch.randn(2, 0, 16)).shape == (2, 0, 16)


# ------------------------------------------------------------------------------------------------ KV cache
@pytest.mark.parametrize("cfg", [
    dict(n_heads=4),
    dict(n_heads=8, n_kv_heads=2, rope=True),
    dict(n_heads=4, n_kv_heads=1, rope=True, qk_norm=True, bias=False),
    dict(n_heads=4, n_kv_heads=2, rope=True, window=4),
], ids=["mha", "gqa-rope", "mqa-rope-qknorm", "gqa-rope-window"])
def test_kv_cache_token_by_token_equals_one_causal_call(cfg):
    layer = SelfAttention(32, causal=True, **cfg).to(F64).eval()
    B, N = 2, 13
    x = torch.randn(B, N, 32, dtype=F64)
    full = layer(x)
    # one token at a time
    cache = layer.new_cache(B, N)
    assert (cache.batch, cache.n_kv_heads, cache.max_len, cache.head_dim) == (B, layer.n_kv_heads, N, layer.head_dim)
    steps = torch.cat([layer(x[:, t: t + 1], kv_cache=cache) for t in range(N)], dim=1)
    assert cache.length == N
    assert maxdiff(steps, full) < 1e-10
    # chunked prefill (5 tokens), then a chunk of 3, then single steps
    cache = KVCache(B, layer.n_kv_heads, 16, layer.head_dim, dtype=F64)
    parts = [layer(x[:, :5], kv_cache=cache), layer(x[:, 5:8], kv_cache=cache)]
    parts += [layer(x[:, t: t + 1], kv_cache=cache) for t in range(8, N)]
    assert cache.length == N
    assert maxdiff(torch.cat(parts, 1), full) < 1e-10


def test_kv_cache_need_weights_sees_whole_cache():
    layer = SelfAttention(16, 4, n_kv_heads=2, causal=True, rope=True).to(F64)
    x = torch.randn(1, 6, 16, dtype=F64)
    _, w_full = layer(x, need_weights=True)
    cache = layer.new_cache(1, 6)
    layer(x[:, :5], kv_cache=cache)
    out, w = layer(x[:, 5:], kv_cache=cache, need_weights=True)
    assert w.shape == (1, 4, 1, 6)
    assert maxdiff(w, w_full[:, :, 5:]) < 1e-6


def test_kv_cache_api_and_errors():
    c = KVCache(2, 2, 4, 8, dtype=torch.float32)
    assert c.length == 0 and len(c) == 0 and c.keys.shape == (2, 2, 0, 8)
    k, v = c.append(torch.ones(2, 2, 3, 8), torch.full((2, 2, 3, 8), 2.0))
    assert c.length == 3 and k.shape == (2, 2, 3, 8) and float(v.mean()) == 2.0
    with pytest.raises(ValueError, match="overflow"):
        c.append(torch.ones(2, 2, 2, 8), torch.ones(2, 2, 2, 8))
    with pytest.raises(ValueError, match="k must have shape"):
        c.append(torch.ones(2, 4, 1, 8), torch.ones(2, 4, 1, 8))
    assert c.truncate(1).length == 1 and c.reset().length == 0
    with pytest.raises(ValueError, match="max_len"):
        KVCache(1, 1, -1, 8)
    with pytest.raises(TypeError, match="dtype"):
        KVCache(1, 1, 4, 8, dtype=torch.int64)
    layer = SelfAttention(16, 4, n_kv_heads=2, causal=True)
    with pytest.raises(ValueError, match="kv_cache"):
        layer(torch.randn(1, 1, 16), kv_cache=KVCache(1, 4, 4, 4))
    cache = layer.new_cache(1, 2)
    with pytest.raises(ValueError, match="overflow"):
        layer(torch.randn(1, 3, 16), kv_cache=cache)
    assert cache.length == 0  # nothing happened


# ------------------------------------------------------------------------------------------------ RoPE
def test_rope_matches_hf_llama_rotary():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64)
    hf = LlamaRotaryEmbedding(cfg)
    rope = RotaryEmbedding(16, base=cfg.rope_parameters["rope_theta"])
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 16)
    pos = torch.arange(3, 10)[None].expand(2, -1)
    cos, sin = hf(q, pos)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    assert maxdiff(rope(q, offset=3), q_hf) < 1e-5 and maxdiff(rope(k, positions=pos), k_hf) < 1e-5


def test_rope_properties():
    rope = RotaryEmbedding(8, base=100.0).to(F64)
    q, k = torch.randn(1, 1, 1, 8, dtype=F64), torch.randn(1, 1, 1, 8, dtype=F64)
    # scores depend only on the relative position m - n
    s = [(rope(q, offset=m) * rope(k, offset=n)).sum().item() for m, n in [(5, 2), (13, 10), (3, 0)]]
    assert max(s) - min(s) < 1e-12
    # norm preserved; position 0 is the identity
    assert abs(rope(q, offset=9).norm() - q.norm()) < 1e-12 and torch.equal(rope(q), q)
    # interleaved pairing = complex multiplication by e^{i·pos·θ}
    ri = RotaryEmbedding(8, base=100.0, interleaved=True).to(F64)
    theta = 100.0 ** (-torch.arange(0, 8, 2, dtype=F64) / 8)
    z = torch.view_as_complex(q.reshape(1, 1, 1, 4, 2).contiguous()) * torch.polar(torch.ones(4, dtype=F64), 7 * theta)
    assert maxdiff(ri(q, offset=7), torch.view_as_real(z).reshape(1, 1, 1, 8)) < 1e-12
    # per-sequence offsets (B,) = explicit positions (B, N)
    x = torch.randn(2, 1, 3, 8, dtype=F64)
    pos = torch.tensor([[4, 5, 6], [0, 1, 2]])
    assert torch.equal(rope(x, offset=torch.tensor([4, 0])), rope(x, positions=pos))
    assert torch.equal(rope(x[:1], offset=4), rope(x, positions=pos)[:1])
    # partial rotary leaves the tail alone
    rp = RotaryEmbedding(8, rotary_dim=4)
    x = torch.randn(1, 2, 3, 8)
    assert torch.equal(rp(x, offset=4)[..., 4:], x[..., 4:])


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs, err, match", [
    (dict(d_model=30, n_heads=4), ValueError, "d_model"),
    (dict(d_model=32, n_heads=4, n_kv_heads=3), ValueError, "n_kv_heads"),
    (dict(d_model=32, n_heads=0), ValueError, "n_heads"),
    (dict(d_model=32, n_heads=4, dropout=1.5), ValueError, "dropout"),
    (dict(d_model=32, n_heads=4, window=(-1, 2)), ValueError, "window"),
    (dict(d_model=32, n_heads=4, rope="yes"), TypeError, "rope"),
    (dict(d_model=32, n_heads=4, rope=RotaryEmbedding(4)), ValueError, "rope.head_dim"),
])
def test_constructor_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        SelfAttention(**kwargs)


def test_forward_errors():
    layer = SelfAttention(16, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(TypeError, match="x must be a floating"):
        layer(torch.ones(2, 3, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="mask"):
        layer(torch.randn(1, 3, 16), mask=torch.zeros(1, 1, 3, 3))
    with pytest.raises(TypeError, match="kv_cache"):
        layer(torch.randn(1, 3, 16), kv_cache="cache")
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding(0)
    with pytest.raises(ValueError, match="positions"):
        RotaryEmbedding(4)(torch.randn(1, 1, 3, 4), positions=torch.arange(4))


def test_public_names():
    assert qkv.SelfAttention is SelfAttention and qkv.KVCache is KVCache and qkv.RotaryEmbedding is RotaryEmbedding
    assert set(qkv.nn.__all__) == {"SelfAttention", "RotaryEmbedding", "KVCache"}


# ------------------------------------------------------------------------------------------------ real HF layers
def test_hf_llama_attention_layer_loaded_into_selfattention():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                   attention_bias=False, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    hf = LlamaAttention(cfg, layer_idx=0).double().eval()
    layer = SelfAttention(64, 8, n_kv_heads=2, head_dim=16, causal=True, bias=False,
                          rope=RotaryEmbedding(16, base=cfg.rope_parameters["rope_theta"])).double()
    layer.load_state_dict(hf.state_dict())  # same names: q_proj, k_proj, v_proj, o_proj
    B, N = 2, 11
    x = torch.randn(B, N, 64, dtype=F64)
    pos = torch.arange(N)[None].expand(B, -1)
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos)  # HF computes the angles in fp32 ...
    assert maxdiff(layer.rope.cos_sin(pos, F64)[0], cos) < 1e-5
    cos, sin = layer.rope.cos_sin(pos, F64)       # ... so feed it ours (fp64, same layout)
    causal = torch.full((N, N), float("-inf"), dtype=F64).triu(1)[None, None]
    with torch.no_grad():
        ref, ref_w = hf(x, position_embeddings=(cos, sin), attention_mask=causal)
        out, w = layer(x, need_weights=True)
    # Llama's eager attention takes its softmax in fp32 even for fp64 inputs: fp32-level agreement is the bar here
    assert maxdiff(out, ref) < 1e-6
    assert maxdiff(w.double(), ref_w) < 1e-6


def test_hf_gpt2_attention_layer_loaded_into_selfattention():
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    cfg = transformers.GPT2Config(n_embd=48, n_head=4, n_positions=32)
    cfg._attn_implementation = "eager"
    hf = GPT2Attention(cfg, layer_idx=0).double().eval()
    layer = SelfAttention(48, 4, causal=True).double()
    # GPT-2's Conv1D stores (in, out): transpose, and split the fused c_attn into q, k, v
    wq, wk, wv = hf.c_attn.weight.T.chunk(3, dim=0)
    bq, bk, bv = hf.c_attn.bias.chunk(3)
    with torch.no_grad():
        for proj, wt, b in ((layer.q_proj, wq, bq), (layer.k_proj, wk, bk), (layer.v_proj, wv, bv),
                            (layer.o_proj, hf.c_proj.weight.T, hf.c_proj.bias)):
            proj.weight.copy_(wt)
            proj.bias.copy_(b)
    x = torch.randn(2, 10, 48, dtype=F64)
    causal = torch.full((10, 10), float("-inf"), dtype=F64).triu(1)[None, None]
    with torch.no_grad():
        ref = hf(x, attention_mask=causal)[0]
        out = layer(x)
    assert maxdiff(out, ref) < 1e-10


def test_a_failed_call_leaves_the_kv_cache_as_it_was():
    # the mask was checked after the append: the next step attended to keys of a call that raised
    torch.manual_seed(0)
    m = qkv.SelfAttention(16, 2, causal=True)
    cache = m.new_cache(1, 32)
    x = torch.randn(1, 4, 16)
    m(x, kv_cache=cache)
    keys, values = cache.keys.clone(), cache.values.clone()
    for bad in (torch.ones(1, 1, 3, 6, dtype=torch.bool),                 # wrong Nk (the cache holds 4 + 3)
                lambda b, h, i, j: (j <= i).float()):                     # a mask_mod of floats
        with pytest.raises((ValueError, TypeError)):
            m(torch.randn(1, 3, 16), kv_cache=cache, mask=bad)
        assert cache.length == 4
        assert torch.equal(cache.keys, keys) and torch.equal(cache.values, values)
    with pytest.raises(ValueError, match="budget"):                      # need_weights over its budget: after
        big = qkv.SelfAttention(16, 2)                                    # attention ran, still no change
        c2 = big.new_cache(1, 2)
        from qkv.engines import reference
        old = reference.SCORE_BUDGET_BYTES
        reference.SCORE_BUDGET_BYTES = 1
        try:
            big(torch.randn(1, 2, 16), kv_cache=c2, need_weights=True)
        finally:
            reference.SCORE_BUDGET_BYTES = old
    assert c2.length == 0
    # the step after the failures sees exactly the keys of the calls that succeeded
    x2 = torch.randn(1, 1, 16)
    out = m(x2, kv_cache=cache)
    ref = m(torch.cat([x, x2], 1))[:, -1:]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
