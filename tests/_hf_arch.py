"""The architecture matrix of attn_implementation="qkv": every model type transformers ships a config for, built
tiny with random weights (no hub access), either refused at load or equal to "eager".

Used by tests/test_integrations_transformers_matrix.py and by ``python tests/_hf_arch.py`` (the full sweep,
which prints the table that the test caches).

Per architecture, ``check(model_type)`` returns ``(outcome, detail)``:

- ``"refused"``: building it with "qkv" raises the gate's ValueError (naming the class and its implementations).
- ``"equal"``: same weights, "eager" vs "qkv": outputs on real tokens of a batch with left- and right-padded rows
  within ``TOL`` (both through the BlockMask path and, with ``SPLIT_MIN_ROWS = 1``, the per-sequence path);
  gradients of every parameter within ``GRAD_RTOL`` (relative, norm-wise); greedy generation identical for
  generative models; and qkv.attention was called.
- ``"no-attention"``: accepted, never calls attention (state-space / convolutional models): equal to eager.
- ``"skip"``: not buildable tiny from its config by the generic shrinker, or needs inputs it cannot make
  (images of a special size, audio, ...); the detail says why.
- ``"FAIL"``: anything else (a mismatch, or an error after loading): never expected.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

TOL = 1e-5
GRAD_RTOL = 1e-4
MAX_PARAMS = 40_000_000

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, VOCAB, POS = 32, 4, 2, 8, 64, 2, 256, 128

_SET = {
    # name: value (only set when the config already has the attribute)
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "embed_dim": HIDDEN, "dim": HIDDEN,
    "model_dim": HIDDEN, "word_embed_proj_dim": HIDDEN, "embedding_size": HIDDEN, "projection_dim": HIDDEN,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "encoder_layers": LAYERS, "decoder_layers": LAYERS, "num_decoder_layers": LAYERS,
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "num_heads": HEADS,
    "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "n_kv_heads": KV_HEADS, "num_kv_heads": KV_HEADS,
    "multi_query_group_num": KV_HEADS,
    "intermediate_size": FFN, "ffn_dim": FFN, "d_ff": FFN, "n_inner": FFN, "encoder_ffn_dim": FFN,
    "decoder_ffn_dim": FFN, "moe_intermediate_size": FFN, "shared_expert_intermediate_size": FFN,
    "ffn_hidden_size": FFN, "d_kv": HEAD_DIM, "kv_channels": HEAD_DIM,
    "vocab_size": VOCAB, "max_position_embeddings": POS, "n_positions": POS, "n_ctx": POS,
    "max_source_positions": POS, "max_target_positions": POS,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_num_experts": 4, "n_shared_experts": 1, "num_shared_experts": 1,
    "image_size": 32, "patch_size": 8, "num_channels": 3,
    "sliding_window": 6, "attention_chunk_size": 6,
    "rotary_dim": 4, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8, "kv_lora_rank": 16,
    "q_lora_rank": 16, "qk_head_dim": 8,
}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
              "cls_token_id", "unk_token_id", "mask_token_id", "image_token_id", "image_token_index",
              "video_token_id", "audio_token_id", "boi_token_id", "eoi_token_id")


def _shrink(cfg, depth=0):
    from transformers import PreTrainedConfig

    for name, value in _SET.items():
        if name in ("sliding_window", "attention_chunk_size", "q_lora_rank") and getattr(cfg, name, None) is None:
            continue
        if hasattr(cfg, name) and not isinstance(getattr(cfg, name), (dict, list, PreTrainedConfig)):
            try:
                setattr(cfg, name, value)
            except Exception:
                pass
    if getattr(cfg, "head_dim", None) is not None:
        with contextlib.suppress(Exception):    # multi-head latent attention: head_dim is the rotary part
            cfg.head_dim = _SET["qk_rope_head_dim"] if hasattr(cfg, "qk_rope_head_dim") else HEAD_DIM
    for name in ("rope_parameters", "rope_scaling"):
        rp = getattr(cfg, name, None)
        if isinstance(rp, dict) and isinstance(rp.get("mrope_section"), list) and rp["mrope_section"]:
            n = len(rp["mrope_section"])      # sections of the rotary half of a head: sum to HEAD_DIM // 2
            rp["mrope_section"] = [HEAD_DIM // 2 - (n - 1)] + [1] * (n - 1)
    for name in ("layer_types", "mlp_layer_types"):
        lt = getattr(cfg, name, None)
        if isinstance(lt, list) and lt:
            n = getattr(cfg, "num_hidden_layers", LAYERS) or LAYERS
            # keep both kinds of layers when the model alternates them
            kinds = list(dict.fromkeys(lt))
            with contextlib.suppress(Exception):
                setattr(cfg, name, [kinds[i % len(kinds)] for i in range(n)])
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int):
        for t in _TOKEN_IDS:
            v = getattr(cfg, t, None)
            if isinstance(v, int) and v >= vocab:
                with contextlib.suppress(Exception):
                    setattr(cfg, t, vocab - 1 - _TOKEN_IDS.index(t))
            elif isinstance(v, list):
                with contextlib.suppress(Exception):
                    setattr(cfg, t, [min(x, vocab - 1) for x in v])
    for attr in ("attention_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob", "dropout",
                 "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "activation_dropout"):
        if isinstance(getattr(cfg, attr, None), float):
            with contextlib.suppress(Exception):
                setattr(cfg, attr, 0.0)
    if depth < 3:
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if isinstance(sub, PreTrainedConfig):
                _shrink(sub, depth + 1)
    return cfg


def model_class(model_type: str):
    """The class the matrix builds for a model type: its causal LM head when it has one, else its base model."""
    import transformers
    from transformers.models.auto import modeling_auto as ma

    for table in (ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, ma.MODEL_MAPPING_NAMES):
        name = table.get(model_type)
        if isinstance(name, (tuple, list)):
            name = name[0]
        if name is not None:
            return getattr(transformers, name, None)
    return None


def model_types() -> list[str]:
    from transformers.models.auto import modeling_auto as ma
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(mt for mt in CONFIG_MAPPING_NAMES
                  if mt in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or mt in ma.MODEL_MAPPING_NAMES)


def tiny(model_type: str):
    from transformers import AutoConfig

    return _shrink(AutoConfig.for_model(model_type))


KWARGS_SEEN: dict = {}


class _Spy:
    """Counts qkv.attention calls and records the keyword arguments models pass to the attention function."""

    def __init__(self, model_type=None):
        self.calls, self.model_type = 0, model_type

    def __enter__(self):
        from transformers import AttentionInterface

        import qkv
        import qkv.integrations.transformers as qkv_hf

        self._real, self._fwd = qkv.attention, qkv_hf.qkv_attention_forward

        def counting(*a, **kw):
            self.calls += 1
            return self._real(*a, **kw)

        def forward(*a, **kw):
            KWARGS_SEEN.setdefault(self.model_type, set()).update(n for n, x in kw.items() if x is not None)
            return self._fwd(*a, **kw)

        qkv.attention = counting
        AttentionInterface.register("qkv", forward)
        return self

    def __exit__(self, *exc):
        from transformers import AttentionInterface

        import qkv

        qkv.attention = self._real
        AttentionInterface.register("qkv", self._fwd)


def _inputs(model, cfg, B=3, N=12):
    """Inputs for the model's main input, with rows unpadded / left-padded / right-padded."""
    name = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(1)
    am = torch.ones(B, N, dtype=torch.long)
    am[1, :4] = 0
    am[2, -3:] = 0
    tcfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if name == "input_ids":
        vocab = getattr(tcfg, "vocab_size", None) or VOCAB
        lo = 4 if vocab > 64 else 0
        ids = torch.randint(lo, min(vocab, VOCAB), (B, N), generator=g)
        pad = getattr(tcfg, "pad_token_id", None)
        if isinstance(pad, int):
            ids = ids.masked_fill(~am.bool(), pad)
        kw = {"input_ids": ids, "attention_mask": am}
        if getattr(cfg, "is_encoder_decoder", False):
            kw["decoder_input_ids"] = ids[:, :7].clone()
            kw["decoder_attention_mask"] = am[:, :7].clone()
            kw["decoder_attention_mask"][:, :] = 1
        return kw, am, name
    if name == "pixel_values":
        vcfg = getattr(cfg, "vision_config", None) or cfg
        size = getattr(vcfg, "image_size", None) or getattr(cfg, "image_size", None)
        ch = getattr(vcfg, "num_channels", 3) or 3
        if isinstance(size, (list, tuple)) and len(size) == 2:
            h, w = size
        elif isinstance(size, int):
            h = w = size
        else:
            h = w = 32
        return {"pixel_values": torch.randn(B, ch, h, w, generator=g)}, None, name
    if name == "input_features":      # log-mel features, (B, mel bins, frames): Whisper-style encoders
        bins = getattr(cfg, "num_mel_bins", None) or getattr(cfg, "feature_size", None) or 80
        frames = 2 * (getattr(cfg, "max_source_positions", None) or 64)
        return {"input_features": torch.randn(B, bins, frames, generator=g)}, None, name
    if name == "input_values":        # raw audio (B, samples): wav2vec2-style encoders
        return {"input_values": torch.randn(B, 4000, generator=g)}, None, name
    return None, None, f"main input {name!r}"


def _outputs(out):
    """The float tensors of a model output, in order (logits / hidden states), for comparison."""
    if isinstance(out, torch.Tensor):
        return [out]
    vals = []
    items = out.items() if hasattr(out, "items") else enumerate(out)
    for k, v in items:
        if k in ("past_key_values", "cache", "attentions", "hidden_states") or isinstance(k, str) and "loss" in k:
            continue
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            vals.append(v)
    return vals


def _real(t, am):
    """Values at real (non-padding) tokens when t is (B, N, ...) over the padded inputs, else t."""
    if am is not None and t.dim() >= 2 and t.shape[:2] == am.shape:
        return t[am.bool()]
    return t


def check(model_type: str, generate: bool = True, grads: bool = True) -> tuple[str, str]:
    import qkv.integrations.transformers as qkv_hf

    cls = model_class(model_type)
    if cls is None:
        return "skip", "no model class"
    try:
        cfg = tiny(model_type)
    except Exception as e:
        return "skip", f"config: {type(e).__name__}: {str(e)[:120]}"
    # 1. the gate
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m_q = cls._from_config(copy.deepcopy(cfg), attn_implementation="qkv")
    except ValueError as e:
        msg = str(e)
        if 'does not support attn_implementation="qkv"' in msg:
            if cls.__name__ not in msg and "Implementations it supports" not in msg:
                return "FAIL", f"refusal message lacks the class or the implementations: {msg}"
            return "refused", msg
        return "skip", f"build: ValueError: {msg[:160]}"
    except Exception as e:
        return "skip", f"build: {type(e).__name__}: {str(e)[:160]}"
    n_params = sum(p.numel() for p in m_q.parameters())
    if n_params > MAX_PARAMS:
        return "skip", f"not tiny: {n_params / 1e6:.1f}M parameters after shrinking"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m_e = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager")
        m_e.load_state_dict(m_q.state_dict())
    except Exception as e:
        return "skip", f"eager build: {type(e).__name__}: {str(e)[:160]}"
    m_q.eval(), m_e.eval()
    kw, am, why = _inputs(m_q, cfg)
    if kw is None:
        return "skip", f"input: {why}"
    try:
        with torch.no_grad():
            torch.manual_seed(2)                       # models that draw noise in forward (ViT-MAE) draw the same
            ref = _outputs(m_e(**kw))
    except Exception as e:
        return "skip", f"eager forward: {type(e).__name__}: {str(e)[:160]}"
    if not ref:
        return "skip", "no float outputs"
    # 2. forward: the padded batch on both qkv paths (padding BlockMask / one call per sequence), sequence
    # outputs at real tokens (a left-padding query row sees no key: 0 in qkv, an average of every key in eager);
    # the same batch unpadded, every output
    runs = [(kw, am, 10**9), (kw, am, 1)]
    if am is not None:
        kw1 = dict(kw, attention_mask=torch.ones_like(am))
        with torch.no_grad():
            torch.manual_seed(2)
            runs.append((kw1, None, 10**9, _outputs(m_e(**kw1))))
    worst = 0.0
    try:
        with _Spy(model_type) as spy:
            for run in runs:
                kw_, am_, split = run[:3]
                ref_ = run[3] if len(run) > 3 else ref
                old, qkv_hf.SPLIT_MIN_ROWS = qkv_hf.SPLIT_MIN_ROWS, split
                try:
                    with torch.no_grad():
                        torch.manual_seed(2)
                        got = _outputs(m_q(**kw_))
                finally:
                    qkv_hf.SPLIT_MIN_ROWS = old
                if len(got) != len(ref_):
                    return "FAIL", f"{len(got)} outputs vs eager's {len(ref_)}"
                for a, b in zip(got, ref_):
                    if a.shape != b.shape:
                        return "FAIL", f"output shape {tuple(a.shape)} vs eager {tuple(b.shape)}"
                    if am_ is not None and not (a.dim() >= 2 and a.shape[:2] == am_.shape):
                        continue
                    a, b = _real(a, am_), _real(b, am_)
                    if not torch.isfinite(a).all() and torch.isfinite(b).all():
                        return "FAIL", "non-finite outputs"
                    scale = max(1.0, b.abs().max().item())
                    worst = max(worst, (a - b).abs().max().item() / scale)
    except Exception as e:
        return "FAIL", f"qkv forward: {type(e).__name__}: {str(e)[:200]}"
    if spy.calls == 0:
        if worst == 0.0:
            return "no-attention", "accepted; never calls attention; outputs identical to eager"
        return "FAIL", f"accepted but never called qkv, and differs from eager by {worst:.1e}"
    if worst > TOL:
        return "FAIL", f"forward differs from eager by {worst:.2e} (relative to max(1, |out|))"
    detail = f"fwd {worst:.1e}"
    # 3. gradients
    if grads:
        try:
            gq, ge = _grads(m_q, kw, am), _grads(m_e, kw, am)
            rel = _grad_rel(gq, ge)
        except Exception as e:
            return "FAIL", f"backward: {type(e).__name__}: {str(e)[:200]}"
        if rel > GRAD_RTOL:
            return "FAIL", f"gradients differ from eager by {rel:.2e} (relative)"
        detail += f", grad {rel:.1e}"
    # 4. greedy generation
    if generate and m_q.can_generate() and "input_ids" in kw and not getattr(cfg, "is_encoder_decoder", False):
        try:
            gkw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
            ids, gam = kw["input_ids"][:2], kw["attention_mask"][:2]   # unpadded + left-padded rows
            pad = getattr(cfg.get_text_config(), "pad_token_id", None)
            gkw["pad_token_id"] = pad if isinstance(pad, int) else 0
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = m_e.generate(ids, attention_mask=gam, **gkw)
        except Exception as e:
            return "equal", detail + f"; generate n/a ({type(e).__name__} with eager)"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b = m_q.generate(ids, attention_mask=gam, **gkw)
        except Exception as e:
            return "FAIL", f"generate: {type(e).__name__}: {str(e)[:200]}"
        if not torch.equal(a, b):
            return "FAIL", "greedy generation differs from eager"
        detail += ", generate equal"
    return "equal", detail


def _grad_rel(gq: dict, ge: dict) -> float:
    """Largest per-parameter relative error ||gq - ge|| / ||ge||; a norm below 1e-3 of the largest parameter
    gradient counts as that floor (gradients that are 0 in exact arithmetic, e.g. of a key bias, are noise)."""
    if set(gq) != set(ge):
        return float("inf")
    top = max(g.norm().item() for g in ge.values())
    return max((gq[n] - ge[n]).norm().item() / max(ge[n].norm().item(), 1e-3 * top, 1e-30) for n in ge)


def _grads(model, kw, am):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    outs = _outputs(model(**kw))
    loss = sum((_real(o, am) * torch.randn_like(_real(o, am))).sum() for o in outs[:1])
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main(argv):
    import qkv.integrations.transformers  # noqa: F401

    table = "--table" in argv
    argv = [a for a in argv if a != "--table"]
    types = argv or model_types()
    outcomes = {}
    counts = {}
    t0 = time.time()
    for mt in types:
        t = time.time()
        try:
            outcome, detail = check(mt)
        except Exception as e:
            outcome, detail = "FAIL", f"{type(e).__name__}: {e}"
        counts[outcome] = counts.get(outcome, 0) + 1
        outcomes[mt] = (outcome, detail.splitlines()[0][:150] if detail else "")
        print(f"{mt}\t{outcome}\t{time.time() - t:.1f}s\t{detail.splitlines()[0][:220]}", flush=True)
    print(f"# {counts} in {time.time() - t0:.0f}s", flush=True)
    names = {}
    for mt, ks in KWARGS_SEEN.items():
        for k in ks:
            names.setdefault(k, []).append(mt)
    for k, mts in sorted(names.items()):
        print(f"# kwarg {k}: {len(mts)} archs, e.g. {', '.join(sorted(mts)[:6])}", flush=True)
    if table:
        print("MATRIX = {")
        for mt, (o, d) in outcomes.items():
            print(f"    {mt!r}: {o!r},  # {d[:90]}" if o in ("skip", "FAIL") else f"    {mt!r}: {o!r},")
        print("}")


if __name__ == "__main__":
    main(sys.argv[1:])
