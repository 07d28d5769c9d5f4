"""The core every engine shares: the validated call and its semantics (:mod:`.call`), masks and the
:class:`BlockMask` (:mod:`.masks`), the dropout hash (:mod:`.hash`), the LSE merge (:mod:`.merge`) and the user
switches (:mod:`.options`). Nothing here imports an engine or a tool."""
from .call import Call, prepare
from .masks import BlockMask, MaskMod, block_mask
from .options import Options, get_options, options

__all__ = ["Call", "prepare", "BlockMask", "MaskMod", "block_mask", "Options", "get_options", "options"]
