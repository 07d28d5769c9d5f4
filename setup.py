"""Build of qkv's CPU attention kernel (src/qkv/csrc/attn_cpu.c): plain C, no Python or torch headers, loaded
with ctypes (src/qkv/_native.py). Optional: without a C compiler the package installs without it, and the tiled
engine computes those calls in torch ops instead (``qkv info`` says which)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "qkv._attn_cpu", ["src/qkv/csrc/attn_cpu.c"],
    extra_compile_args=["-O3", "-std=gnu11", "-fno-math-errno", "-fopenmp"],
    extra_link_args=["-fopenmp"],
    libraries=["m"],
    optional=True,
)])
