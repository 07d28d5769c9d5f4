"""Context parallelism: attention over a sequence sharded across the ranks of a torch.distributed group.

``ring_attention`` computes exact attention (every qkv mask and mod, forward and backward) on sequences no single
device holds: each rank keeps N/W positions and the keys travel a ring of point-to-point messages overlapped
with the block computations. ``shard_sequence``/``gather_sequence`` cut and reassemble tensors in the
``"contiguous"`` or ``"zigzag"`` layout; ``sequence_positions`` gives a shard's global positions (RoPE);
``ring_stats`` counts the blocks computed and the bytes sent. See ``docs/distributed.md``.
"""
from .layout import LAYOUTS, gather_sequence, sequence_positions, shard_sequence
from .ring import RingCounts, RingStats, ring_attention, ring_stats

__all__ = ["ring_attention", "shard_sequence", "gather_sequence", "sequence_positions", "ring_stats", "RingStats",
           "RingCounts", "LAYOUTS"]
