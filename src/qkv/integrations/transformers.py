"""qkv as a Hugging Face ``transformers`` attention implementation (``attn_implementation="qkv"``).

Importing this module registers ``"qkv"``::

    import qkv.integrations.transformers  # noqa: F401  (registers on import)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="qkv")
    model.generate(...)                    # KV cache, padding, GQA, sliding windows: all through qkv.attention

Three hooks, installed by :func:`register`:

1. ``qkv_attention_forward`` in ``transformers.AttentionInterface``: the attention itself.
2. ``qkv_mask`` in ``transformers.masking_utils.AttentionMaskInterface``: instead of a dense ``(B, 1, Nq, Nk)``
   mask, transformers' mask creators get back a *structured* mask: a ``meta``-device bool tensor of that shape
   (it costs nothing and any arithmetic on it fails loudly) that carries what was asked for — causal or not,
   sliding window, chunks, packed documents, the 2-D padding mask, the cache offsets. The mask creators run
   once per forward (per layer type), so everything derived from it (key ranges, ``qkv.BlockMask``) is built
   once per forward and shared by the layers.
3. A gate on ``PreTrainedModel.get_correct_attn_implementation``: ``"qkv"`` is accepted only by model classes
   whose attention goes through ``AttentionInterface`` and takes nothing qkv does not implement (see
   :func:`supports`); any other model (Bloom, MPT, XGLM, MPNet, Falcon, GPT-Neo, ...) raises ``ValueError`` at
   load, naming the class and the implementations it supports. Such models would otherwise never call qkv,
   or misread the mask.

Mapping of a call (transformers -> ``qkv.attention``), structured mask:

- ``query (B, Hq, Nq, D)``, ``key``/``value (B, Hkv, Nk, D|Dv)`` as they are (GQA is native in qkv).
- Key ``j`` of the call sits at absolute position ``kv_offset + j``, query ``i`` at ``q_offset + i``. Causal and
  sliding-window rules become ``causal=`` / ``window=`` after dropping the keys no query can see (an unfilled
  static cache); qkv's bottom-right causal then lines up with transformers' absolute positions.
- Padding: when every row of the padding mask is one contiguous run of real tokens (left or right padding) and
  there are at least ``SPLIT_MIN_ROWS`` queries, each sequence is its own ``qkv.attention`` call over its run of
  keys, with plain ``causal=``/``window=`` (so the block-sparse / CPU-kernel paths apply, and padding costs
  nothing). Otherwise the padding is a ``qkv.BlockMask`` built once per forward. Either way, a query row that
  sees no key (a left-padding token under a causal mask) is 0, qkv's rule (eager averages over every key
  there, SDPA may give NaN; transformers treats those rows as don't-care).
- Packed sequences: ``cu_seq_lens_q/k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``) or
  restarting ``position_ids`` -> ``qkv.masks.document``, as a ``qkv.BlockMask`` built once per forward.
- Chunked attention (Llama-4): a ``qkv.BlockMask`` of transformers' chunk rule, built once per forward.
- Anything unrecognised (``or``-combined masks, block-wise overlays, custom mask functions): the exact dense
  bool mask, built once per forward with transformers' own ``sdpa_mask``.
- ``scaling`` -> ``scale``, ``dropout`` -> ``dropout_p``, ``softcap`` -> ``softcap``, ``position_bias`` ->
  ``bias``, ``s_aux`` (attention sinks, gpt-oss) -> ``out · sigmoid(lse − sink)`` from ``return_lse=True``.
- ``output_attentions=True``: the probabilities from ``qkv.attention_weights`` on the dense mask.

A plain tensor mask (a model that builds its own, or a user-given 4-D mask) is used as given: a bool keep-mask
goes to ``mask=``; an additive float mask becomes ``mask = attention_mask > finfo.min / 2`` plus ``bias=``
holding its other finite non-zero values. With no mask, ``is_causal`` (from the call, else
``module.is_causal``) applies when ``Nq > 1`` with SDPA's top-left alignment, as transformers' sdpa path does.

Under ``torch.compile`` tracing the mask function returns transformers' dense ``sdpa_mask`` (the structure is
read with Python-side control flow that a traced graph cannot hold).

Returns ``(attn_output (B, Nq, Hq, Dv), attn_weights or None)``, the layout transformers' sdpa path returns.
"""
from __future__ import annotations

import functools
import inspect
import re
import sys
from dataclasses import dataclass

import torch

import qkv

__all__ = ["NAME", "SPLIT_MIN_ROWS", "qkv_attention_forward", "qkv_mask", "register", "supports"]

NAME = "qkv"

#: A padded batch with at least this many query rows runs as one qkv call per sequence over its run of real
#: keys (no mask at all); below it, one call with a padding BlockMask (fewer calls for short inputs and decoding).
SPLIT_MIN_ROWS = 64

# Model classes (by name prefix) that pass the source checks of `supports` but rework the mask themselves before
# their attention, found by the architecture sweep (tests/_hf_arch.py): they need the eager/SDPA dense mask.
_REFUSED: dict[str, str] = {
    prefix: "it reworks the attention mask itself before its attention (dense masks only)"
    for prefix in ("Doge", "T5Gemma2", "DeepseekV4", "Gemma4Audio", "Lasr")
}

# The arguments an attention function receives that qkv reads (or that carry nothing beyond the mask). A model
# whose own eager attention takes any other argument gives it a meaning qkv does not implement.
_EAGER_ARGS = {"module", "query", "key", "value", "query_states", "key_states", "value_states", "attention_mask",
               "scaling", "dropout", "softcap", "s_aux", "position_bias", "sliding_window", "is_causal", "kwargs"}


# ================================================================================================ the gate

def _implementations(cls) -> list[str]:
    impls = ["eager"]
    if getattr(cls, "_supports_sdpa", False):
        impls.append("sdpa")
    if getattr(cls, "_supports_flash_attn", False):
        impls.append("flash_attention_2")
    if getattr(cls, "_supports_flex_attn", False):
        impls.append("flex_attention")
    return impls


def supports(model_cls) -> tuple[bool, str]:
    """Whether ``attn_implementation="qkv"`` is allowed on this ``PreTrainedModel`` subclass, and why (not).

    Allowed when the class's modeling code runs its attention through ``transformers.AttentionInterface``
    (transformers' own test: its ``*Attention*(nn.Module)`` classes call ``ALL_ATTENTION_FUNCTIONS.get_interface``;
    a module with no attention class of its own — a composite of sub-models, which are checked when they are
    built, or a model without attention — passes). Refused otherwise: such a model would compute its own eager
    attention and read the mask qkv's mask function returns as an SDPA/eager mask.
    """
    name = model_cls.__name__
    for prefix, why in _REFUSED.items():
        if name.startswith(prefix):
            return False, why
    try:
        routed = bool(model_cls._can_set_attn_implementation())
    except Exception as e:
        return False, f"its modeling code could not be inspected ({type(e).__name__}: {e})"
    if not routed:
        return False, ("its attention does not go through transformers' AttentionInterface (it computes its own, "
                       "so it would never call qkv)")
    if _ATTENTION_TABLE.search(_source(model_cls)):
        return False, ("it picks some attention layers from a table of its own keyed by the implementation name, "
                       "which has no qkv entry")
    extra = _eager_extras(model_cls)
    if extra:
        return False, (f"its eager attention takes {', '.join(map(repr, extra))}, which qkv's attention function "
                       f"does not implement")
    return True, "its attention goes through transformers' AttentionInterface"


def _eager_extras(model_cls) -> list[str]:
    """Arguments of the model module's own eager attention function(s) that qkv does not read."""
    mod = sys.modules.get(model_cls.__module__)
    extra = set()
    for name, fn in vars(mod).items() if mod is not None else ():
        if "eager_attention_forward" in name and inspect.isfunction(fn) and fn.__module__ == mod.__name__:
            extra |= set(inspect.signature(fn).parameters) - _EAGER_ARGS
    return sorted(extra)


_ATTENTION_TABLE = re.compile(r"ATTENTION_CLASSES\[")


@functools.cache
def _source(model_cls) -> str:
    try:
        return inspect.getsource(sys.modules[model_cls.__module__])
    except (KeyError, OSError, TypeError):
        return ""


def _refusal(model_cls, why: str) -> ValueError:
    impls = ", ".join(repr(i) for i in _implementations(model_cls))
    return ValueError(f'{model_cls.__name__} does not support attn_implementation="{NAME}": {why}. '
                      f"Implementations it supports: {impls}.")


def _install_gate() -> None:
    from transformers import PreTrainedModel

    orig = PreTrainedModel.get_correct_attn_implementation
    if getattr(orig, "_qkv_gate", False):
        return

    @functools.wraps(orig)
    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        if requested_attention == NAME:
            ok, why = supports(type(self))
            if not ok:
                raise _refusal(type(self), why)
        return orig(self, requested_attention, is_init_check)

    get_correct_attn_implementation._qkv_gate = True
    PreTrainedModel.get_correct_attn_implementation = get_correct_attn_implementation


# ====================================================================================== structured masks

@dataclass
class _Spec:
    """An AND of rules on absolute positions (qpos, kpos), read from transformers' mask function."""
    causal: bool = False              # kpos <= qpos
    left: int | None = None           # kpos >= qpos - left
    right: int | None = None          # kpos <= qpos + right
    chunk: tuple | None = None        # (size, left_padding (B,)): same chunk of (pos - left_padding) // size
    docs: torch.Tensor | None = None  # (B, N) packed-sequence ids over positions (q and kv share positions)
    remapped: bool = False            # rules were evaluated on per-document positions (needs docs)
    pads: tuple = ()                  # extra (B, >=kv) key keep-masks, indexed by kpos


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in (fn.__closure__ or ()))))


@functools.cache
def _codes() -> dict:
    """Code objects of transformers' mask-function factories, to recognise the closures they return."""
    from transformers import masking_utils as mu

    z = torch.zeros(1, 1, dtype=torch.long)
    makers = {
        "and": lambda: mu.and_masks(mu.causal_mask_function),
        "sliding": lambda: mu.sliding_window_overlay(1),
        "sliding_bidirectional": lambda: mu.sliding_window_bidirectional_overlay(1),
        "chunked": lambda: mu.chunked_overlay(1, z[0]),
        "padding": lambda: mu.padding_mask_function(z.bool()),
        "packed": lambda: mu.packed_sequence_mask_function(z),
        "remap": lambda: mu.remap_positions_for_packed_sequence(mu.causal_mask_function, z),
    }
    codes = {}
    for name, make in makers.items():
        try:
            codes[make().__code__] = name
        except Exception:
            pass
    plain = {}
    for name in ("causal_mask_function", "bidirectional_mask_function"):
        if hasattr(mu, name):
            plain[getattr(mu, name)] = name
    return {"codes": codes, "plain": plain}


def _meet(a, b):
    return b if a is None else a if b is None else min(a, b)


def _parse(fn, spec: _Spec, invariant_only: bool = False) -> bool:
    """AND the rules of mask function ``fn`` into ``spec``; False when ``fn`` is not recognised.
    ``invariant_only``: inside a position remap only translation-invariant rules keep their meaning."""
    known = _codes()
    plain = known["plain"].get(fn)
    if plain == "causal_mask_function":
        spec.causal = True
        return True
    if plain == "bidirectional_mask_function":
        return True
    code = getattr(fn, "__code__", None)
    kind = known["codes"].get(code)
    if kind is None:
        return False
    env = _closure(fn)
    if kind == "and":
        return all(_parse(f, spec, invariant_only) for f in env["mask_functions"])
    if kind == "sliding":
        spec.left = _meet(spec.left, int(env["sliding_window"]) - 1)
        return True
    if kind == "sliding_bidirectional":
        sw = int(env["sliding_window"])
        spec.left, spec.right = _meet(spec.left, sw), _meet(spec.right, sw)
        return True
    if invariant_only:
        return False
    if kind == "chunked":
        if spec.chunk is not None:
            return False
        spec.chunk = (int(env["chunk_size"]), env["left_padding"])
        return True
    if kind == "padding":
        spec.pads += (env["padding_mask"],)
        return True
    if kind == "packed":
        spec.docs = env["packed_sequence_mask"]
        return True
    if kind == "remap":
        spec.remapped = True
        return _parse(env["mask_function"], spec, invariant_only=True)
    return False


def _as_int(x) -> int:
    return int(x.item()) if isinstance(x, torch.Tensor) else int(x)


@dataclass
class _Plan:
    """How one (Nq, Nk) call runs. ``nk``: keys kept (the rest are invisible to every query). ``runs``: calls
    on one sequence each, (b, q0, q1, k0, k1, causal, window, mask); or None: one call over the batch."""
    nk: int
    causal: bool
    window: tuple | None
    mask: object = None
    runs: list | None = None


class _Mask:
    """What a transformers mask creator asked for (one per forward and layer type), and the plans derived
    from it, cached by call size: the first layer builds them, the others reuse them."""

    def __init__(self, args: dict):
        self.args = args
        self.plans: dict = {}
        self._dense = None

    # -- the exact dense mask, for what has no structured form (and output_attentions)
    def dense(self) -> torch.Tensor | None:
        if self._dense is not None:
            return self._dense
        from transformers.masking_utils import sdpa_mask

        a = dict(self.args)
        a.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        m = sdpa_mask(**a)
        if not torch.compiler.is_compiling():       # a traced graph rebuilds it in the graph, every call
            self._dense = m
        return m

    def plan(self, nq: int, nk: int, cu, device) -> _Plan:
        key = (nq, nk, None if cu is None else cu.data_ptr())
        p = self.plans.get(key)
        if p is None:
            p = self.plans[key] = self._make_plan(nq, nk, cu, device)
        return p

    def _dense_plan(self, nk) -> _Plan:
        m = self.dense()
        if m is not None and m.shape[-1] > nk:
            m = m[..., :nk]
        return _Plan(nk, False, None, mask=m)

    def _make_plan(self, nq: int, nk: int, cu, device) -> _Plan:
        a = self.args
        B = a["batch_size"]
        spec = _Spec()
        if nq != a["q_length"] or nk != a["kv_length"] or not _parse(a["mask_function"], spec):
            if cu is not None:
                raise ValueError("attn_implementation='qkv' cannot combine packed sequences (cu_seq_lens_q/k) "
                                 "with this model's mask")
            return self._dense_plan(nk)
        q_off, kv_off = _as_int(a.get("q_offset", 0)), _as_int(a.get("kv_offset", 0))
        d = q_off - kv_off                                  # key j is at the query's position when j = i + d
        if cu is not None:                                  # packed documents given as cu_seq_lens
            if B != 1 or nq != nk or d != 0:
                raise ValueError(f"attn_implementation='qkv' takes cu_seq_lens_q/k for one packed row without a "
                                 f"cache (batch 1, Nq == Nk), got batch {B}, Nq={nq}, Nk={nk}")
            ids = torch.zeros(nk, dtype=torch.long, device=cu.device)
            starts = cu[1:-1].long()
            ids.index_add_(0, starts[starts < nk], torch.ones_like(starts[starts < nk]))
            spec.docs = ids.cumsum(0)[None]
        if spec.remapped and spec.docs is None:
            return self._dense_plan(nk)
        if spec.docs is not None and (nq != nk or d != 0):
            return self._dense_plan(nk)

        # Keys past the last one any query can see (an unfilled static cache) are dropped.
        hi = None                                           # kpos <= qpos + hi
        if spec.causal:
            hi = 0
        if spec.right is not None:
            hi = _meet(hi, spec.right)
        keep = nk if hi is None else max(0, min(nk, nq + d + hi))
        if keep == 0:
            return self._dense_plan(nk)
        off = keep - nq                                     # qkv's bottom-right offset for the kept keys
        right = None if hi is None else d + hi - off
        left = None if spec.left is None else off - d + spec.left
        if (right is not None and right < 0) or (left is not None and left < 0):
            return self._dense_plan(nk)
        causal = right == 0 and spec.causal
        window = None
        if left is not None or (right is not None and not causal):
            window = (left, None if causal else right)

        # Key padding at absolute positions kv_off .. kv_off + keep.
        pad = None
        masks = [m for m in (a.get("attention_mask"), *spec.pads) if m is not None]
        for m in masks:
            m = m.to(torch.bool)
            if m.shape[-1] < kv_off + keep:
                m = torch.nn.functional.pad(m, (0, kv_off + keep - m.shape[-1]))
            m = m[:, kv_off:kv_off + keep]
            pad = m if pad is None else pad & m
        if pad is not None and bool(pad.all()):
            pad = None

        rules = []
        if spec.docs is not None:
            rules.append(qkv.masks.document(spec.docs.to(device=device, dtype=torch.long)))
        if spec.chunk is not None:
            size, lp = spec.chunk
            lp = torch.as_tensor(lp).to(torch.long).reshape(-1)
            rules.append(_chunk_rule(size, lp.to(device), q_off, kv_off))
        if pad is not None and not rules and nq >= SPLIT_MIN_ROWS and (causal or window is None):
            runs = _runs(pad, nq, off, causal, window)
            if runs is not None:
                return _Plan(keep, causal, window, runs=runs)
        if pad is not None:
            rules.append(_pad_rule(pad.to(device)))
        if not rules:
            return _Plan(keep, causal, window)
        rule = rules[0] if len(rules) == 1 else qkv.masks.and_masks(*rules)
        per_b = pad is not None or spec.chunk is not None or spec.docs.shape[0] > 1
        bm = qkv.block_mask(rule, B if per_b else 1, 1, nq, keep, device=device)
        return _Plan(keep, causal, window, mask=bm)


def _pad_rule(pad: torch.Tensor):
    """Keys j with pad[b, j] (B, Nk) True are visible."""
    def rule(b, h, q, kv):
        return pad[b, kv]
    return rule


def _chunk_rule(size: int, lp: torch.Tensor, q_off: int, kv_off: int):
    """transformers' chunked attention: same chunk of (position - left_padding[b]) // size."""
    def rule(b, h, q, kv):
        s = lp[b] if lp.numel() > 1 else lp[0]
        return torch.div(kv + kv_off - s, size, rounding_mode="floor") == torch.div(q + q_off - s, size,
                                                                                   rounding_mode="floor")
    return rule


def _runs(pad: torch.Tensor, nq: int, off: int, causal: bool, window):
    """One call per sequence when the real keys of each row b of pad (B, Nk) are one contiguous run [k0, k1);
    else None. Each call: (b, q0, q1, k0, k1, causal, window, mask). Causal: query i's own key is i + off, so
    the rows of real tokens are [k0 - off, k1 - off); rows before see no key (left padding: 0); rows after
    (right padding) see every real key up to the window's left edge: one more call, without causality."""
    nk = pad.shape[1]
    idx = torch.arange(nk, device=pad.device)
    n = pad.sum(1)
    first = torch.where(pad, idx, nk).amin(1)
    last = torch.where(pad, idx, -1).amax(1)
    if not bool(((last - first + 1 == n) | (n == 0)).all()):
        return None
    left = None if window is None else window[0]
    runs = []
    for b, (k0, k1, cnt) in enumerate(zip(first.tolist(), (last + 1).tolist(), n.tolist())):
        if cnt == 0:
            continue
        if not causal:
            runs.append((b, 0, nq, k0, k1, False, window, None))
            continue
        q0, q1 = max(0, k0 - off), min(nq, k1 - off)
        if q1 > q0:
            runs.append((b, q0, q1, k0, k1, True, window, None))
        if q1 < nq:
            tail = None
            if left is not None:   # key j visible to row i iff j >= i + off - left
                i = torch.arange(q1, nq, device=pad.device).view(-1, 1)
                j = torch.arange(k0, k1, device=pad.device).view(1, -1)
                tail = (j >= i + off - left).view(1, 1, nq - q1, k1 - k0)
            runs.append((b, q1, nq, k0, k1, False, None, tail))
    return runs


def qkv_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
             attention_mask: torch.Tensor | None = None, **kwargs):
    """The ``"qkv"`` entry of ``transformers.masking_utils.AttentionMaskInterface`` (same arguments as
    ``sdpa_mask``).

    Returns a ``meta``-device bool tensor of shape ``(batch_size, 1, q_length, kv_length)`` carrying the
    request (read by :func:`qkv_attention_forward`); no dense mask is built. Under ``torch.compile`` tracing,
    transformers' own ``sdpa_mask``.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs)
    if torch.compiler.is_compiling():
        return sdpa_mask(**args)
    # Read now: a static cache's offset is a tensor that its layers advance in place before attention runs.
    q_length, kv_length = _as_int(q_length), _as_int(kv_length)
    args.update(q_length=q_length, kv_length=kv_length, q_offset=_as_int(q_offset), kv_offset=_as_int(kv_offset))
    t = torch.empty(batch_size, 1, q_length, kv_length, dtype=torch.bool, device="meta")
    t._qkv_mask = _Mask(args)
    return t


def _structured(mask: torch.Tensor) -> _Mask | None:
    """The request behind a mask from :func:`qkv_mask` (or a view of one), else None."""
    m = getattr(mask, "_qkv_mask", None)
    if m is None and mask._base is not None:
        m = getattr(mask._base, "_qkv_mask", None)
    return m


# ============================================================================================ attention

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


def _attend(q, k, v, *, sinks, **kw):
    """qkv.attention, then the attention sinks (gpt-oss): out · sigmoid(lse − sink) per head."""
    if sinks is None:
        return qkv.attention(q, k, v, **kw)
    out, lse = qkv.attention(q, k, v, return_lse=True, **kw)      # out (B, Hq, Nq, Dv), lse (B, Hq, Nq)
    s = sinks.reshape(1, -1, 1).to(lse.dtype)
    return out * torch.sigmoid(lse - s)[..., None].to(out.dtype)


def _cu_docs(kwargs):
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None or not torch.equal(cu_q, cu_k):
        raise ValueError("attn_implementation='qkv' takes packed sequences with cu_seq_lens_q == cu_seq_lens_k "
                         f"(self-attention), got {cu_q!r} and {cu_k!r}")
    return cu_q


_READ = {"s_aux", "position_bias", "softcap"}


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

    ``query (B, Hq, Nq, D)``, ``key (B, Hkv, Nk, D)``, ``value (B, Hkv, Nk, Dv)``; ``attention_mask``: a mask
    from :func:`qkv_mask`, a ``(B|1, 1|Hq, Nq, >=Nk)`` bool keep-mask or additive float mask, or ``None``.
    Returns ``(out (B, Nq, Hq, Dv), weights (B, Hq, Nq, Nk) or None)``.
    """
    for name, x in kwargs.items():
        if name not in _READ and isinstance(x, torch.Tensor) and x.is_floating_point():
            raise ValueError(f"attn_implementation='qkv': {type(module).__name__} passes the attention function a "
                             f"float tensor {name!r} {tuple(x.shape)} that qkv does not implement")
    nq, nk = query.shape[2], key.shape[2]
    sinks = kwargs.get("s_aux")
    softcap = kwargs.get("softcap")
    bias = kwargs.get("position_bias")
    want_weights = bool(kwargs.get("output_attentions", False))
    cu = _cu_docs(kwargs)
    common = dict(softcap=softcap, scale=scaling, dropout_p=float(dropout or 0.0))

    req = None
    if attention_mask is not None and attention_mask.device.type == "meta":
        req = _structured(attention_mask)
        if req is None:
            raise ValueError("attention_mask is a meta tensor that qkv's mask function did not make; pass a real "
                             "mask or let the model build it with attn_implementation='qkv'")
    if cu is not None and req is None:
        raise ValueError("attn_implementation='qkv' got packed sequences (cu_seq_lens_q/k) with "
                         f"{'no mask' if attention_mask is None else 'a mask it did not build'}; it reads them "
                         "together with the mask transformers builds for attn_implementation='qkv'")

    if req is not None and (want_weights or torch.compiler.is_compiling()):
        attention_mask, req = req.dense(), None            # the exact dense mask (see the module docstring)
    if req is not None:
        plan = req.plan(nq, nk, cu, query.device)
        k, v = key[:, :, :plan.nk], value[:, :, :plan.nk]
        b_ = None if bias is None else bias[..., :plan.nk]
        if plan.runs is None:
            out = _attend(query, k, v, sinks=sinks, causal=plan.causal, window=plan.window, mask=plan.mask,
                          bias=b_, **common)
            return out.transpose(1, 2).contiguous(), None
        B, Hq, Dv = query.shape[0], query.shape[1], value.shape[-1]
        out = query.new_zeros(B, nq, Hq, Dv)
        for b, q0, q1, k0, k1, causal, window, mask in plan.runs:
            bb = None
            if b_ is not None:
                bb = b_[(b if b_.shape[0] > 1 else 0):][:1]
                bb = bb[..., (slice(q0, q1) if bb.shape[-2] > 1 else slice(None)), k0:k1]
            o = _attend(query[b:b + 1, :, q0:q1], k[b:b + 1, :, k0:k1], v[b:b + 1, :, k0:k1], sinks=sinks,
                        causal=causal, window=window, mask=mask, bias=bb, **common)
            out[b, q0:q1] = o[0].transpose(0, 1)
        return out, None

    mask = None
    causal = False
    if attention_mask is not None:
        mask, extra = _mask_to_qkv(attention_mask, nk)
        if extra is not None:
            bias = extra if bias is None else bias + extra
    else:
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(is_causal) and nq > 1
        if causal and nk > nq:
            # transformers' mask skipping assumed SDPA's top-left causal rule: the keys past Nq are invisible.
            key, value = key[:, :, :nq], value[:, :, :nq]
            nk = nq
    if bias is not None:
        bias = bias[..., :nk]

    out = _attend(query, key, value, sinks=sinks, causal=causal, mask=mask, bias=bias, **common)
    weights = None
    if want_weights:
        weights = qkv.attention_weights(query, key, causal=causal, mask=mask, bias=bias, softcap=softcap,
                                        scale=scaling)
        if sinks is not None:
            _, lse = qkv.attention(query, key, value, causal=causal, mask=mask, bias=bias, softcap=softcap,
                                   scale=scaling, return_lse=True)
            weights = weights * torch.sigmoid(lse - sinks.reshape(1, -1, 1).to(lse.dtype))[..., None]
        weights = weights.to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


def register() -> None:
    """Register ``"qkv"`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` and install the
    model gate (idempotent; done on import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, qkv_attention_forward)
    AttentionMaskInterface.register(NAME, qkv_mask)
    _install_gate()


register()
