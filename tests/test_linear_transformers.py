"""Real clients of qkv.linear: transformers' own torch paths for Qwen3-Next (gated delta rule), Mamba-2 (SSD) and
MiniMax (lightning attention), replaced by qkv's chunked functions in tiny random models; the models' outputs and
gradients must not change (fp32, < 1e-5; gradients relative to their largest entry), in training and in cached
decoding."""
from __future__ import annotations

import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.mamba2 import modeling_mamba2 as mm2  # noqa: E402
from transformers.models.minimax import modeling_minimax as mmx  # noqa: E402
from transformers.models.qwen3_next import modeling_qwen3_next as mq  # noqa: E402

from qkv.linear import delta_rule, delta_rule_step, linear_attention, recurrent_delta_rule  # noqa: E402

TOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet_and_one_thread():
    # tiny shapes: one thread avoids OpenMP hand-offs dominating on a shared machine
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    yield
    torch.set_num_threads(prev)


def _t(x):
    return x.transpose(1, 2)


# ---- adapters: transformers' signatures and (B, N, H, D) layout onto qkv's (B, H, N, D) functions ---------------
def qkv_chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None,
                               output_final_state=False, use_qk_l2norm_in_kernel=False, **kwargs):
    o, S = delta_rule(_t(query), _t(key), _t(value), _t(beta), g=_t(g), chunk_size=chunk_size,
                      initial_state=None if initial_state is None else initial_state.float(), return_state=True,
                      qk_l2norm=use_qk_l2norm_in_kernel)
    return _t(o), (S if output_final_state else None)


def qkv_recurrent_gated_delta_rule(query, key, value, g, beta, initial_state=None, output_final_state=False,
                                   use_qk_l2norm_in_kernel=False, **kwargs):
    o, S = delta_rule_step(_t(query), _t(key), _t(value), _t(beta), initial_state.float(), g=_t(g),
                           qk_l2norm=use_qk_l2norm_in_kernel)
    return _t(o), (S if output_final_state else None)


def qkv_mamba2_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                          dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
    """Mamba-2's SSD: h_t = exp(A·dt_t)·h_{t-1} + (dt_t·x_t)·B_tᵀ, y_t = h_t·C_t + D·x_t, i.e. linear attention with
    q = C, k = B, v = dt·x, per-token log-decays A·dt, identity features, scale 1, no normaliser."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = torch.nn.functional.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1]).float()
    x = hidden_states.float()
    o, S = linear_attention(_t(C.float()), _t(B.float()), _t(x * dt[..., None]), decay=_t(A.float() * dt),
                            feature_map="identity", scale=1.0, normalize=False, chunk_size=chunk_size,
                            initial_state=None if initial_states is None else
                            initial_states.float().transpose(-1, -2).contiguous(), return_state=True)
    y = _t(o)
    if D is not None:
        y = y + D[..., None] * x
    return (y, S.transpose(-1, -2)) if return_final_states else y


def qkv_lightning_forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
    """MiniMaxLightningAttention.forward with its block loop and its per-token loop replaced by one call: causal
    linear attention with identity features, scale 1, no normaliser and a fixed decay exp(−slope_h) per head."""
    B, N, _ = hidden_states.shape
    qkv_states = self.act_fn(self.qkv_proj(hidden_states))
    qkv_states = mmx.apply_mask_to_padding_states(qkv_states, attention_mask)
    qkv_states = qkv_states.reshape(B, N, self.num_attention_heads, 3 * self.head_dim)
    q, k, v = (_t(x) for x in torch.split(qkv_states, self.head_dim, dim=3))
    state = cache.get_linear_cache(self.layer_idx) if cache is not None else None
    o, state = linear_attention(q, k, v, decay=torch.exp(-self.slope_rate.flatten()), feature_map="identity",
                                scale=1.0, normalize=False, chunk_size=self.block_size, initial_state=state,
                                return_state=True)
    o = _t(o).reshape(B, N, self.num_attention_heads * self.head_dim)
    o = self.norm(o)
    o = torch.sigmoid(self.output_gate(hidden_states)) * o
    o = self.out_proj(o)
    if cache is not None:
        cache.set_linear_cache(self.layer_idx, state)
    return o, state


@contextlib.contextmanager
def _patched(obj, **attrs):
    old = {n: getattr(obj, n) for n in attrs}
    for n, f in attrs.items():
        setattr(obj, n, f)
    try:
        yield
    finally:
        for n, f in old.items():
            setattr(obj, n, f)


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))
    (logits * w).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_training(model, ids, patch):
    model.train()
    ref_logits, ref_grads = _loss_and_grads(model, ids)
    with patch():
        logits, grads = _loss_and_grads(model, ids)
    assert ref_grads.keys() == grads.keys()
    err = (logits - ref_logits).abs().max().item()
    # gradients of the embeddings and heads sum over every token and reach ~100 here: fp32 resolves them to ~1e-5
    # absolutely, in transformers' own path as much as in qkv's, so each is compared relative to its largest entry
    gerr = max((grads[n] - ref_grads[n]).abs().max().item() / max(1.0, ref_grads[n].abs().max().item())
               for n in grads)
    assert err < TOL and gerr < TOL, f"logits err {err:.2e}, worst relative gradient err {gerr:.2e}"
    return err, gerr


def _compare_decoding(model, ids, patch, steps=4):
    model.eval()

    def run():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=steps, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, torch.stack(out.logits)

    ref_seq, ref_logits = run()
    with patch():
        seq, logits = run()
    assert torch.equal(seq, ref_seq)
    err = (logits - ref_logits).abs().max().item()
    assert err < TOL, f"decoding logits err {err:.2e}"


# ---- Qwen3-Next ------------------------------------------------------------------------------------------------
def _qwen3_next():
    torch.manual_seed(0)
    cfg = mq.Qwen3NextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_key_heads=2,
                             linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                             shared_expert_intermediate_size=16, mlp_only_layers=[0, 1],
                             layer_types=["linear_attention", "full_attention"])
    return mq.Qwen3NextForCausalLM(cfg).float()


def test_qwen3_next_gated_delta_rule_training():
    model = _qwen3_next()
    ids = torch.randint(0, 64, (2, 150), generator=torch.Generator().manual_seed(1))
    _compare_training(model, ids, lambda: _patched(mq, torch_chunk_gated_delta_rule=qkv_chunk_gated_delta_rule))


def test_qwen3_next_decoding():
    model = _qwen3_next()
    ids = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(2))
    _compare_decoding(model, ids, lambda: _patched(mq, torch_chunk_gated_delta_rule=qkv_chunk_gated_delta_rule,
                                                   torch_recurrent_gated_delta_rule=qkv_recurrent_gated_delta_rule))


def test_qwen3_next_fallbacks_match_qkv_oracle_fp64():
    # the function level, fp64: transformers' chunked and recurrent fallbacks against qkv's recurrent oracle
    g = torch.Generator().manual_seed(3)
    B, N, Hk, H, D, Dv = 2, 77, 2, 4, 8, 6
    q, k = torch.randn(B, N, Hk, D, generator=g, dtype=torch.float64), torch.randn(B, N, Hk, D, generator=g,
                                                                                   dtype=torch.float64)
    v = torch.randn(B, N, H, Dv, generator=g, dtype=torch.float64)
    gg = -torch.rand(B, N, H, generator=g, dtype=torch.float64)
    beta = torch.rand(B, N, H, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, D, Dv, generator=g, dtype=torch.float64)
    ours, S = recurrent_delta_rule(_t(q), _t(k), _t(v), _t(beta), g=_t(gg), initial_state=s0, return_state=True,
                                   qk_l2norm=True)
    # transformers' fallbacks compute in fp32 whatever the input: compare at fp32 precision
    for fn in (mq.torch_recurrent_gated_delta_rule, mq.torch_chunk_gated_delta_rule):
        o, S2 = fn(q, k, v, gg, beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        assert (_t(o) - ours).abs().max().item() < 1e-5 and (S2 - S).abs().max().item() < 1e-5


def _qwen_layer_to_qkv(layer: mq.Qwen3NextGatedDeltaNet):
    """A qkv GatedDeltaNet holding the weights of a Qwen3-Next linear-attention layer (its fused, per-key-head
    interleaved in_proj_qkvz / in_proj_ba split into qkv's separate projections)."""
    from qkv.linear import GatedDeltaNet

    Hk, Hv, D, Dv = layer.num_k_heads, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim
    r = Hv // Hk
    m = GatedDeltaNet(layer.hidden_size, Hk, n_v_heads=Hv, head_dim=D, v_head_dim=Dv,
                      conv_size=layer.conv_kernel_size, norm_eps=layer.layer_norm_epsilon)
    W = layer.in_proj_qkvz.weight.detach().view(Hk, 2 * D + 2 * r * Dv, -1)
    wq, wk, wv, wz = torch.split(W, [D, D, r * Dv, r * Dv], dim=1)
    Wba = layer.in_proj_ba.weight.detach().view(Hk, 2 * r, -1)
    wb, wa = torch.split(Wba, [r, r], dim=1)
    with torch.no_grad():
        for lin, w in ((m.q_proj, wq), (m.k_proj, wk), (m.v_proj, wv), (m.z_proj, wz), (m.b_proj, wb),
                       (m.a_proj, wa)):
            lin.weight.copy_(w.reshape(-1, w.shape[-1]))
        m.conv1d.weight.copy_(layer.conv1d.weight)
        m.A_log.copy_(layer.A_log)
        m.dt_bias.copy_(layer.dt_bias)
        m.norm.weight.copy_(layer.norm.weight)
        m.o_proj.weight.copy_(layer.out_proj.weight)
    return m


def test_gated_deltanet_module_matches_qwen3_next_layer():
    model = _qwen3_next()
    layer = model.model.layers[0].linear_attn
    m = _qwen_layer_to_qkv(layer)
    x = torch.randn(2, 100, 32, generator=torch.Generator().manual_seed(4))
    ref = layer(x)
    out = m(x)
    assert (out - ref).abs().max().item() < TOL
    # chunked prefill then token-by-token decoding with the carried state equals the whole sequence
    o1, st = m(x[:, :60], return_state=True)
    outs = [o1]
    for i in range(60, 100):
        oi, st = m(x[:, i:i + 1], state=st, return_state=True)
        outs.append(oi)
    assert (torch.cat(outs, 1) - out).abs().max().item() < TOL


# ---- Mamba-2 ---------------------------------------------------------------------------------------------------
def _mamba2():
    torch.manual_seed(0)
    cfg = mm2.Mamba2Config(vocab_size=64, hidden_size=32, num_heads=4, head_dim=16, state_size=8, n_groups=2,
                           expand=2, num_hidden_layers=2, chunk_size=16, conv_kernel=4)
    return mm2.Mamba2ForCausalLM(cfg).float()


def test_mamba2_ssd_training():
    model = _mamba2()
    ids = torch.randint(0, 64, (2, 45), generator=torch.Generator().manual_seed(1))
    _compare_training(model, ids, lambda: _patched(mm2, mamba2_chunk_scan=qkv_mamba2_chunk_scan))


def test_mamba2_ssd_decoding():
    # prefill goes through the chunk scan with a returned state; the decode steps then read that state
    model = _mamba2()
    ids = torch.randint(0, 64, (1, 37), generator=torch.Generator().manual_seed(2))
    _compare_decoding(model, ids, lambda: _patched(mm2, mamba2_chunk_scan=qkv_mamba2_chunk_scan))


# ---- MiniMax (lightning attention) -----------------------------------------------------------------------------
def _minimax():
    torch.manual_seed(0)
    cfg = mmx.MiniMaxConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                            num_experts_per_tok=1, block_size=16,
                            layer_types=["linear_attention", "full_attention"])
    return mmx.MiniMaxForCausalLM(cfg).float()


def test_minimax_lightning_training():
    model = _minimax()
    ids = torch.randint(0, 64, (2, 45), generator=torch.Generator().manual_seed(1))
    _compare_training(model, ids,
                      lambda: _patched(mmx.MiniMaxLightningAttention, forward=qkv_lightning_forward))


def test_minimax_lightning_decoding():
    model = _minimax()
    ids = torch.randint(0, 64, (1, 37), generator=torch.Generator().manual_seed(2))
    _compare_decoding(model, ids, lambda: _patched(mmx.MiniMaxLightningAttention, forward=qkv_lightning_forward))
