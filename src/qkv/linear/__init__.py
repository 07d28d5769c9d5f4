"""The linear-attention family: O(N) attention with a fixed-size state.

* :func:`linear_attention`: ``φ(Q)·(φ(K)ᵀ·V)`` (feature maps, causal or not, normalised or not), with a decay per
  head (RetNet retention) or per token (Mamba-2 SSD, gated linear attention with scalar gates, lightning attention);
* :func:`delta_rule`: DeltaNet and Gated DeltaNet (the linear layers of Qwen3-Next);
* their recurrent definitions :func:`recurrent_linear_attention`, :func:`recurrent_delta_rule` (the oracles), and
  one-token steps :func:`linear_attention_step`, :func:`delta_rule_step` for decoding;
* modules :class:`LinearSelfAttention`, :class:`GatedDeltaNet`.

Layout ``(B, H, N, D)`` like ``qkv.attention``; the state is ``(B, H, D, Dv)``. Streaming: ``return_state=True``
gives the state after the last token, ``initial_state=`` continues from it (two chained calls equal one call on the
concatenation). See ``docs/linear.md``.
"""
from .chunked import delta_rule, linear_attention
from .modules import GatedDeltaNet, LinearSelfAttention
from .recurrent import delta_rule_step, linear_attention_step, recurrent_delta_rule, recurrent_linear_attention

__all__ = [
    "linear_attention", "delta_rule",
    "recurrent_linear_attention", "recurrent_delta_rule",
    "linear_attention_step", "delta_rule_step",
    "LinearSelfAttention", "GatedDeltaNet",
]
