"""Hooks that let other libraries run their attention on qkv.

- ``qkv.integrations.transformers``: importing it registers ``attn_implementation="qkv"`` in Hugging Face
  ``transformers`` (``AttentionInterface`` + ``AttentionMaskInterface``).

Submodules are imported on demand so that ``import qkv`` never imports ``transformers``.
"""
__all__ = ["transformers"]


def __getattr__(name):
    if name == "transformers":
        import importlib

        return importlib.import_module(".transformers", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
