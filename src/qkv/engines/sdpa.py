"""The sdpa engine: delegate to ``torch.nn.functional.scaled_dot_product_attention`` when the call fits its
semantics exactly, and say every reason why not when it does not."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.call import Call, as4
from .base import Engine
from .reference import SCORE_BUDGET_BYTES

__all__ = ["ENGINE", "SdpaEngine", "sdpa_attention"]


class SdpaEngine(Engine):
    """PyTorch's SDPA: fused kernels for no mask and plain causal, a dense ``attn_mask`` otherwise."""

    name = "sdpa"
    summary = f"torch {torch.__version__} scaled_dot_product_attention, when a call fits its semantics"

    def supports(self, call: Call) -> list[str]:
        why = []
        if call.score_mod is not None:
            why.append("SDPA has no score_mod")
        if call.alibi is not None:
            why.append("SDPA has no ALiBi (qkv does not materialise it as a bias)")
        if call.softcap is not None:
            why.append("SDPA has no softcap")
        if call.dropout_p > 0:
            why.append("SDPA draws its own dropout mask; qkv's dropout is the counter-based mask every qkv "
                       "engine shares")
        if call.return_lse:
            why.append("SDPA does not return the logsumexp")
        if not (call.plain_causal or call.every_key_visible) or call.bias is not None:
            need = call.B * call.Hq * call.Nq * call.Nk * (call.q.element_size() if call.bias is not None else 1)
            if need > SCORE_BUDGET_BYTES:
                why.append(f"SDPA would need a dense {need / 2**30:.1f} GiB attn_mask for this mask")
        return why

    def forward(self, call: Call):
        return sdpa_attention(call), None


def sdpa_attention(call: Call) -> torch.Tensor:
    """out (B, Hq, Nq, Dv) from SDPA. Causal with Nq == Nk is SDPA's ``is_causal``; rows that see every key
    need no mask; any other visibility rule becomes a dense bool ``attn_mask`` (or -inf in the additive bias)."""
    kw = dict(scale=call.scale, enable_gqa=call.G > 1)
    bias = None if call.bias is None else call.bias.to(call.q.dtype)
    if call.plain_causal and bias is None:
        return F.scaled_dot_product_attention(call.q, call.k, call.v, is_causal=True, **kw)
    if call.every_key_visible:
        return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=bias, **kw)
    vis = as4(call.visible(0, call.Nq, 0, call.Nk))
    mask = vis if bias is None else bias.masked_fill(~vis, float("-inf"))
    return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=mask, **kw)


ENGINE = SdpaEngine()
