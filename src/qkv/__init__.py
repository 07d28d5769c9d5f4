"""qkv: exact self-attention for PyTorch, one semantics on every engine.

See ``shared/DESIGN.md`` (the contract) and the README for the tour.
"""
__version__ = "0.1.0"
