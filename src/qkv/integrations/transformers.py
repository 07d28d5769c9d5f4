"""qkv as a Hugging Face ``transformers`` attention implementation.

Importing this module registers ``"qkv"``::

    import qkv.integrations.transformers  # noqa: F401  (registers on import)
    model = AutoModel.from_pretrained(path, attn_implementation="qkv")
    model.generate(...)                    # KV cache, padding, GQA: all through qkv.attention

Two registrations: ``qkv_attention_forward`` in ``transformers.AttentionInterface`` (the attention itself) and
transformers' own ``sdpa_mask`` in ``AttentionMaskInterface`` (so models build the same boolean keep-masks for
``"qkv"`` as for ``"sdpa"``, or ``None`` when causality alone or nothing needs masking).

Mapping of the call (transformers -> ``qkv.attention``):

- ``query`` ``(B, Hq, Nq, D)``, ``key``/``value`` ``(B, Hkv, Nk, D|Dv)``: passed as is; GQA is native in qkv
  (query head ``h`` reads kv head ``h // (Hq // Hkv)``, exactly ``repeat_kv``), so keys are never repeated.
- ``attention_mask``: a bool keep-mask ``(B|1, 1|H, Nq, Nk)`` goes to ``mask=``; an additive float mask
  (0 / ``finfo.min`` / ``-inf``, as ``"eager"`` masks are) becomes ``mask = attention_mask > finfo.min / 2`` plus
  ``bias=`` holding any finite non-zero values. Query rows with no visible key (left-padding under a causal mask)
  give 0, never NaN. A mask longer than the keys is cut to ``Nk``.
- No mask: ``is_causal`` (from the call, else ``module.is_causal``) applies when ``Nq > 1``, with SDPA's top-left
  alignment as transformers expects (equal to qkv's bottom-right when ``Nq == Nk``; when ``Nk > Nq`` with no mask —
  prefill into an empty static cache — the keys past ``Nq`` are dropped, as transformers' sdpa path does).
  ``Nq == 1`` (decoding) sees every key.
- ``scaling`` -> ``scale``, ``dropout`` -> ``dropout_p``, ``softcap`` -> ``softcap``, ``position_bias`` -> ``bias``,
  ``sliding_window`` -> ``window`` (only when no mask carries it already), ``s_aux`` (attention sinks, gpt-oss) ->
  ``out · sigmoid(lse − sink)`` from ``return_lse=True``.
- ``output_attentions=True`` in the kwargs: the probabilities come from ``qkv.attention_weights``.

Returns ``(attn_output (B, Nq, Hq, Dv), attn_weights or None)``, the layout transformers' sdpa path returns.
"""
from __future__ import annotations

import torch

import qkv

__all__ = ["qkv_attention_forward", "register", "NAME"]

NAME = "qkv"


def _mask_to_qkv(attention_mask: torch.Tensor, nk: int):
    """transformers 4-D mask -> (bool keep-mask or None, additive float bias or None)."""
    if attention_mask.ndim != 4:
        raise ValueError(f"attention_mask must be 4-D (B, 1|H, Nq, Nk), got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[-1] > nk:
        attention_mask = attention_mask[..., :nk]
    if attention_mask.dtype == torch.bool:
        return attention_mask, None
    if not attention_mask.dtype.is_floating_point:  # 0/1 integer keep-mask
        return attention_mask != 0, None
    keep = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    rest = torch.where(keep, attention_mask, torch.zeros((), dtype=attention_mask.dtype,
                                                          device=attention_mask.device))
    bias = rest if bool((rest != 0).any()) else None
    return keep, bias


def qkv_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"qkv"`` entry of ``transformers.AttentionInterface`` (same signature as ``sdpa_attention_forward``).

    ``query`` ``(B, Hq, Nq, D)``, ``key`` ``(B, Hkv, Nk, D)``, ``value`` ``(B, Hkv, Nk, Dv)``, ``attention_mask``
    ``(B|1, 1|Hq, Nq, ≥Nk)`` bool keep-mask or additive float, or ``None``. Returns
    ``(out (B, Nq, Hq, Dv), weights (B, Hq, Nq, Nk) or None)``.
    """
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        raise ValueError("attn_implementation='qkv' does not take packed varlen inputs (cu_seq_lens_q/k); pass a "
                         "4-D attention_mask instead")
    nq, nk = query.shape[2], key.shape[2]
    mask = bias = None
    causal = False
    window = None
    if attention_mask is not None:
        mask, bias = _mask_to_qkv(attention_mask, nk)
    else:
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(is_causal) and nq > 1
        if causal and nk > nq:
            # transformers' mask skipping assumed SDPA's top-left causal rule: the keys past Nq are invisible.
            key, value = key[:, :, :nq], value[:, :, :nq]
            nk = nq
        sw = kwargs.get("sliding_window")
        if causal and sw is not None and nk > sw:
            window = (int(sw) - 1, 0)  # transformers' rule: kv_idx > q_idx - sliding_window

    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        position_bias = position_bias[..., :nk]
        bias = position_bias if bias is None else bias + position_bias

    sinks = kwargs.get("s_aux")
    out = qkv.attention(
        query, key, value,
        causal=causal, window=window, mask=mask, bias=bias,
        softcap=kwargs.get("softcap"), scale=scaling,
        dropout_p=float(dropout or 0.0),
        return_lse=sinks is not None,
    )
    if sinks is not None:
        out, lse = out  # out (B, Hq, Nq, Dv), lse (B, Hq, Nq) fp32
        s = sinks.reshape(1, -1, 1).to(lse.dtype)
        out = out * torch.sigmoid(lse - s)[..., None].to(out.dtype)

    weights = None
    if kwargs.get("output_attentions", False):
        weights = qkv.attention_weights(query, key, causal=causal, window=window, mask=mask, bias=bias,
                                        softcap=kwargs.get("softcap"), scale=scaling)
        if sinks is not None:
            weights = weights * torch.sigmoid(lse - s)[..., None]
        weights = weights.to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


def register() -> None:
    """Register ``"qkv"`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent;
    done on import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, qkv_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()
