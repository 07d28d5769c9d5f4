"""Visibility rules: FlexAttention-style mask_mods (with bottom-right alignment and block analytics) and the
reusable :class:`BlockMask`. See :mod:`qkv.core.masks` for the details; this is the public name."""
from .core.masks import *  # noqa: F403
from .core.masks import __all__  # noqa: F401
