"""The measuring instrument: providers, mask specs, timing, FLOPs, peak memory, table, JSON, plot.

A *provider* is one way of computing attention: qkv's engines (``auto``, ``tiled``, ``reference``,
``triton``), PyTorch SDPA (``sdpa``: torch picks; ``sdpa-flash``/``sdpa-efficient``/``sdpa-cudnn``/
``sdpa-math``: forced through ``torch.nn.attention.sdpa_kernel``), ``flex`` (``torch.compile(flex_attention)``
with its own block mask; the compile time is reported separately) and ``naive`` (the materialising math a user
writes: ``softmax(q·kᵀ/√d masked) · v``). Every provider gets the mask in its own natural form:

========== ======================== ============================= ====================================
spec       qkv                      SDPA                          flex
========== ======================== ============================= ====================================
none       (nothing)                (nothing)                     ``block_mask=None``
causal     ``causal=True``          ``is_causal=True``            ``create_block_mask(causal)``
window:W   ``window=(W-1, 0)``      dense bool ``attn_mask``      ``create_block_mask(window)``
window:L,R ``window=(L, R)``        dense bool ``attn_mask``      ``create_block_mask(window)``
document:K ``qkv.block_mask(...)``  dense bool ``attn_mask``      ``create_block_mask(document)``
prefix:P   ``qkv.block_mask(...)``  dense bool ``attn_mask``      ``create_block_mask(prefix_lm)``
========== ======================== ============================= ====================================

``window:W`` is the causal sliding window of W keys (each query sees itself and the W-1 keys before it),
``document:K`` packs K equal-length documents (bidirectional inside each), ``prefix:P`` is prefix-LM (the first
P keys visible to all, causal after). Terms combine with ``+`` (``causal+document:4``); a combination is handed
to qkv as one ``BlockMask`` so that its empty blocks are skipped.

Timing: warm-up, then ``reps`` samples per provider, providers alternated (rotated each round) so that CPU noise
hits all alike; a sample of a fast call runs it several times. CUDA is timed with events. FLOPs count visible
entries only (FlashAttention's convention): ``4·B·H·visible·D`` forward, ``fwdbwd = 3.5×`` forward.
Peak memory: CUDA ``max_memory_allocated`` over the allocation before the call; CPU a fresh subprocess per point
that reports its resident-set growth (setup such as a dense mask, plus the call's high-water mark measured with
``/proc/self/clear_refs``; ``ru_maxrss`` where that is missing). A point that runs out of memory, exceeds the
time budget, or is refused is recorded with its status and the sweep goes on.
"""
from .providers import ALIASES, LINEAR_DEFAULT, PROVIDERS, Provider, default_providers, resolve_providers
from .report import format_table, plot, write_json
from .specs import DTYPE_NAMES, DTYPES, MODES, SCHEMA, SHAPE_SETS, BenchError, Case, MaskSpec, parse_mask
from .timing import Config, run

__all__ = ["ALIASES", "LINEAR_DEFAULT", "PROVIDERS", "Provider", "default_providers", "resolve_providers",
           "format_table", "plot", "write_json", "DTYPE_NAMES", "DTYPES", "MODES", "SCHEMA", "SHAPE_SETS",
           "BenchError", "Case", "MaskSpec", "parse_mask", "Config", "run"]
