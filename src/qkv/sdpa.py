"""The sdpa engine: delegate to ``torch.nn.functional.scaled_dot_product_attention`` when the call fits its
semantics exactly, and say why not when it does not."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._call import Call, _as4
from .reference import SCORE_BUDGET_BYTES

__all__ = ["sdpa_attention", "sdpa_supports"]


def sdpa_supports(call: Call) -> tuple[bool, str]:
    """(True, how) when SDPA computes exactly this call, else (False, why not)."""
    if call.score_mod is not None:
        return False, "SDPA has no score_mod"
    if call.alibi is not None:
        return False, "SDPA has no ALiBi (qkv does not materialise it as a bias)"
    if call.softcap is not None:
        return False, "SDPA has no softcap"
    if call.dropout_p > 0:
        return False, ("SDPA draws its own dropout mask; qkv's dropout is the counter-based mask every qkv "
                       "engine shares")
    if call.return_lse:
        return False, "SDPA does not return the logsumexp"
    if _plain_causal(call):
        return True, "is_causal (Nq == Nk, no other mask)"
    if _decode_step(call):
        return True, "one query under bottom-right causal sees every key: no mask"
    if not call.has_mask and call.bias is None:
        return True, "no mask"
    need = call.B * call.Hq * call.Nq * call.Nk * (call.q.element_size() if call.bias is not None else 1)
    if need > SCORE_BUDGET_BYTES:
        return False, f"SDPA would need a dense {need / 2**30:.1f} GiB attn_mask for this mask"
    return True, "dense attn_mask"


def _plain_causal(call: Call) -> bool:
    return call.causal and call.Nq == call.Nk and len(call._rules) == 1


def _decode_step(call: Call) -> bool:
    """A single query (KV-cache decoding) under plain bottom-right causal: every key is visible."""
    return call.causal and call.Nq == 1 and len(call._rules) == 1


def sdpa_attention(call: Call) -> torch.Tensor:
    """out (B, Hq, Nq, Dv) from SDPA. Bottom-right causal with Nq == Nk is SDPA's ``is_causal``; any other
    visibility rule becomes a dense bool ``attn_mask`` (or -inf in the additive bias)."""
    kw = dict(scale=call.scale, enable_gqa=call.G > 1)
    if _plain_causal(call) and call.bias is None:
        return F.scaled_dot_product_attention(call.q, call.k, call.v, is_causal=True, **kw)
    if _decode_step(call):
        bias = None if call.bias is None else call.bias.to(call.q.dtype)
        return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=bias, **kw)
    vis = call.visible(0, call.Nq, 0, call.Nk)
    mask = vis
    if call.bias is not None:
        mask = call.bias.to(call.q.dtype)
        if vis is not None:
            mask = mask.masked_fill(~vis, float("-inf"))
    elif mask is not None:
        mask = _as4(mask)
    return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=mask, **kw)
