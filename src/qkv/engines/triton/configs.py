"""Launch configurations per GPU architecture: tile sizes, warps and pipeline stages of every kernel.

Keyed by (arch, kernel, padded head dim, element bytes). The tables follow what the public Triton/FlashAttention
kernels use on these GPUs, trimmed until ``qkv kernels`` reports no register spills and shared memory within the
target's limit; their speed is unmeasured until a GPU run (benchmarks/gpu_bar.py). ``TILE`` is the tile of the
block lists (every BLOCK size divides it). Under Triton's interpreter small tiles keep the tests' shapes multi-tile.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["Config", "SMEM_LIMIT", "TILE", "INTERPRET_TILE", "DECODE_MAX_ROWS", "arch_of", "config",
           "decode_config", "default_configs"]


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

# (kernel, block_d, class) -> Config, for 16-bit inputs; filled in below from the searches' results
_HALF: dict = {90: {}, 80: {}}
# fp32 inputs: exact fp32 products ("ieee", no tensor cores), so smaller tiles
_SINGLE: dict = {}

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
    """The table a device of this compute capability uses: 90 from Hopper on, else 80."""
    return 90 if capability[0] >= 9 else 80


def head_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


def config(kernel: str, block_d: int, elem_bytes: int, arch: int | None, cls: str = "plain") -> Config:
    """The launch configuration of ``kernel`` for a padded head dim, input element size, arch (None = the
    interpreter) and feature class (:func:`feature_class`)."""
    if arch is None:
        return _INTERPRET
    key = (kernel, head_bucket(block_d), cls)
    return _SINGLE[key] if elem_bytes == 4 else _HALF[arch][key]


def decode_config(block_d: int, rows: int, elem_bytes: int, arch: int | None) -> Config:
    """(rows per program, keys per step, warps, stages) of the split-KV decoding kernel."""
    bm = max(16, 1 << max(0, (rows - 1).bit_length()))
    if arch is None:
        return Config(bm, 16, 4, 1)
    bn = DECODE_BLOCK_N[head_bucket(block_d)] // (2 if elem_bytes == 4 else 1)
    return Config(bm, bn, 4, 3 if arch >= 90 else 2)


def default_configs(arch: int):
    """Every (kernel, block_d, elem_bytes) -> Config the engine can launch on ``arch`` (for ``qkv kernels``)."""
    out = {}
    for elem in (2, 4):
        for bd in (16, 32, 64, 128, 256):
            for k in _KERNELS:
                out[(k, bd, elem)] = config(k, bd, elem, arch)
            for rows in (1, 16, DECODE_MAX_ROWS):
                out[("decode", bd, elem, rows)] = decode_config(bd, rows, elem, arch)
    return out
