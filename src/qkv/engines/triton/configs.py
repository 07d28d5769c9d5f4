"""Launch configurations per GPU architecture: tile sizes, warps and pipeline stages of every kernel.

Keyed by (arch, kernel, padded head dim, element bytes). The tables follow what the public Triton/FlashAttention
kernels use on these GPUs, trimmed until ``qkv kernels`` reports no register spills and shared memory within the
target's limit, then timed on a GPU where one was at hand (benchmarks/gpu_tune.py). ``TILE`` is the tile of the
block lists (every BLOCK size divides it). Under Triton's interpreter small tiles keep the tests' shapes multi-tile.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["Config", "SMEM_LIMIT", "TILE", "INTERPRET_TILE", "DECODE_MAX_ROWS", "arch_of", "config",
           "decode_config", "feature_class", "CLASSES", "MAX_HEAD_DIM"]


class Config(NamedTuple):
    block_m: int       # query rows per program (fwd, dq) / per step (dkdv)
    block_n: int       # keys per step (fwd, dq) / per program (dkdv)
    num_warps: int
    num_stages: int


#: Shared memory per block (bytes, opt-in maximum) of each target.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

#: Tile of the block lists (query tile, key tile); 128 matches BlockMask's default blocks.
TILE = (128, 128)
INTERPRET_TILE = (32, 32)

_KERNELS = ("fwd", "bwd_dq", "bwd_dkdv")
CLASSES = ("plain", "masked", "all")


def _table(rows):
    """{(kernel, block_d, class): Config} from rows (kernel, block_d, (plain, masked, all) configs)."""
    return {(k, d, c): cfg for k, d, cfgs in rows for c, cfg in zip(CLASSES, cfgs)}


C = Config
# 16-bit inputs: (kernel, padded head dim, class) -> Config. Found by `qkv kernels`' compiler, largest tiles first,
# the first with no register spill and within shared memory (benchmarks/NOTES.md). The sm_90 "plain" entries at
# head dims 64 and 128 are the fastest of the spill-free candidates timed on an H200 (benchmarks/gpu_tune.py:
# geometric mean over no mask/causal at N = 2k and 16k); the other entries' speed is unmeasured.
_HALF = {
    90: _table([
        ("fwd", 64, (C(64, 64, 4, 3), C(128, 64, 8, 3), C(128, 64, 8, 3))),
        ("fwd", 128, (C(128, 128, 8, 3), C(128, 64, 8, 3), C(128, 32, 8, 2))),
        ("fwd", 256, (C(128, 64, 8, 2), C(64, 32, 8, 2), C(128, 32, 8, 2))),
        ("bwd_dq", 64, (C(64, 64, 4, 3), C(128, 32, 8, 2), C(128, 32, 8, 2))),
        ("bwd_dq", 128, (C(128, 64, 8, 3), C(128, 32, 8, 2), C(128, 32, 8, 2))),
        ("bwd_dq", 256, (C(128, 32, 8, 2), C(32, 32, 4, 2), C(32, 32, 4, 2))),
        ("bwd_dkdv", 64, (C(32, 64, 4, 2), C(32, 128, 8, 2), C(16, 128, 8, 2))),
        ("bwd_dkdv", 128, (C(16, 128, 8, 2), C(16, 64, 8, 2), C(16, 32, 8, 2))),
        ("bwd_dkdv", 256, (C(16, 32, 8, 2), C(16, 32, 8, 2), C(16, 16, 4, 1))),
    ]),
    80: _table([
        ("fwd", 64, (C(128, 64, 8, 3), C(128, 64, 8, 3), C(128, 64, 8, 3))),
        ("fwd", 128, (C(128, 64, 8, 3), C(128, 64, 8, 3), C(128, 64, 8, 3))),
        ("fwd", 256, (C(128, 32, 8, 2), C(64, 64, 8, 2), C(64, 64, 8, 2))),
        ("bwd_dq", 64, (C(128, 64, 8, 2), C(128, 32, 8, 2), C(128, 32, 8, 2))),
        ("bwd_dq", 128, (C(128, 32, 8, 2), C(64, 64, 8, 2), C(64, 64, 8, 2))),
        ("bwd_dq", 256, (C(64, 64, 8, 2), C(32, 32, 4, 2), C(32, 32, 4, 2))),
        ("bwd_dkdv", 64, (C(16, 128, 8, 2), C(16, 128, 8, 2), C(16, 64, 8, 2))),
        ("bwd_dkdv", 128, (C(16, 128, 8, 2), C(16, 64, 8, 2), C(16, 32, 8, 2))),
        ("bwd_dkdv", 256, (C(16, 32, 8, 2), C(16, 32, 8, 2), C(16, 32, 8, 2))),
    ]),
}
# fp32 inputs: exact fp32 products ("ieee": FMA, no tensor cores), so small tiles
_SINGLE = {
    90: _table([
        ("fwd", 64, (C(32, 32, 4, 2), C(32, 32, 4, 2), C(32, 32, 4, 2))),
        ("fwd", 128, (C(16, 32, 4, 1), C(32, 32, 4, 2), C(32, 32, 4, 2))),
        ("fwd", 256, (C(16, 16, 4, 1), C(16, 16, 4, 1), C(16, 32, 4, 1))),
        ("bwd_dq", 64, (C(32, 32, 4, 2), C(32, 32, 4, 2), C(32, 32, 4, 1))),
        ("bwd_dq", 128, (C(16, 16, 4, 1), C(16, 16, 4, 1), C(16, 16, 4, 1))),
        ("bwd_dq", 256, (C(16, 32, 4, 1), C(16, 32, 4, 1), C(16, 32, 4, 1))),
        ("bwd_dkdv", 64, (C(32, 32, 4, 1), C(32, 32, 8, 1), C(16, 16, 4, 1))),
        ("bwd_dkdv", 128, (C(16, 16, 4, 1), C(16, 16, 8, 1), C(16, 16, 8, 1))),
        ("bwd_dkdv", 256, (C(16, 16, 4, 1), C(16, 16, 4, 1), C(16, 16, 4, 1))),
    ]),
    80: _table([
        ("fwd", 64, (C(32, 32, 4, 2), C(32, 32, 4, 2), C(32, 32, 4, 2))),
        ("fwd", 128, (C(32, 32, 4, 2), C(32, 32, 4, 2), C(16, 32, 4, 1))),
        ("fwd", 256, (C(16, 32, 4, 1), C(16, 16, 4, 1), C(16, 32, 4, 1))),
        ("bwd_dq", 64, (C(32, 32, 4, 2), C(32, 32, 4, 1), C(16, 32, 4, 1))),
        ("bwd_dq", 128, (C(32, 32, 4, 2), C(32, 32, 4, 2), C(16, 16, 4, 1))),
        ("bwd_dq", 256, (C(16, 32, 4, 1), C(16, 32, 4, 1), C(16, 16, 4, 1))),
        ("bwd_dkdv", 64, (C(32, 32, 4, 2), C(32, 32, 4, 1), C(16, 16, 8, 1))),
        ("bwd_dkdv", 128, (C(16, 16, 8, 1), C(32, 32, 8, 1), C(16, 16, 4, 1))),
        ("bwd_dkdv", 256, (C(16, 16, 4, 1), C(16, 16, 4, 1), C(16, 16, 4, 1))),
    ]),
}

# fp32 with head dims <= 32: ptxas caps some of the D = 64 configurations at 128 registers there and spills a
# few bytes (the full compile report); these replace them (the first of the compile search with no spill at
# both D = 16 and D = 32)
_SINGLE_SMALL = {
    (90, "fwd", "masked"): C(32, 32, 8, 2),
    (90, "bwd_dkdv", "plain"): C(32, 32, 8, 1),
    (80, "bwd_dq", "all"): C(32, 16, 4, 1),
    (80, "bwd_dkdv", "plain"): C(32, 32, 4, 1),
    (80, "bwd_dkdv", "masked"): C(16, 16, 4, 1),
}

_INTERPRET = Config(16, 16, 4, 1)

#: Decoding: keys per step, and the most G·Nq rows (query heads of a group × queries) one program takes.
DECODE_BLOCK_N = {64: 64, 128: 64, 256: 32}
DECODE_MAX_ROWS = 64


def feature_class(*, lists: bool, bias: bool, dropout: bool, softcap: bool, alibi: bool) -> str:
    """The config class of a call: "all" with a bias tile or dropout (the most registers), "masked" with block
    lists or score mods, else "plain"."""
    if bias or dropout:
        return "all"
    if lists or softcap or alibi:
        return "masked"
    return "plain"


def arch_of(capability: tuple[int, int]) -> int:
    """The target of a device of this compute capability: 90 from Hopper on, 86 for the 100 KB-shared-memory
    Ampere/Ada parts (sm_86, sm_89), else 80."""
    if capability[0] >= 9:
        return 90
    return 86 if capability[0] == 8 and capability[1] in (6, 7, 9) else 80


def head_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


def config(kernel: str, block_d: int, elem_bytes: int, arch: int | None, cls: str = "plain") -> Config:
    """The launch configuration of ``kernel`` for a padded head dim, input element size, arch (None = the
    interpreter) and feature class (:func:`feature_class`)."""
    if arch is None:
        return _INTERPRET
    key = (kernel, head_bucket(block_d), cls)
    table = 80 if arch == 86 else arch
    cfg = (_SINGLE if elem_bytes == 4 else _HALF)[table][key]
    if elem_bytes == 4 and block_d <= 32:
        cfg = _SINGLE_SMALL.get((table, kernel, cls), cfg)
    if arch == 86:      # sm_86/sm_89: 100 KB of shared memory against sm_80's 163 KB: fewer pipeline stages
        cfg = cfg._replace(num_stages=min(cfg.num_stages, 2))
    return cfg


#: The largest head dim each target's tables serve (100 KB shared-memory parts: none past 128 fits).
MAX_HEAD_DIM = {80: 256, 86: 128, 90: 256}


def decode_config(block_d: int, rows: int, elem_bytes: int, arch: int | None) -> Config:
    """(rows per program, keys per step, warps, stages) of the split-KV decoding kernel."""
    bm = max(16, 1 << max(0, (rows - 1).bit_length()))
    if arch is None:
        return Config(bm, 16, 4, 1)
    bn = 16 if elem_bytes == 4 else DECODE_BLOCK_N[head_bucket(block_d)]
    return Config(bm, bn, 4, 2)        # 2 stages: the best of the H200 sweep at 64 keys per step (3: 2% slower)
