"""Build of qkv's CPU attention kernel (src/qkv/csrc): plain C, no torch headers, loaded with ctypes
(src/qkv/engines/cpu_kernel.py); one small file (attn_py.c) makes the same library a Python module too, for the
one function called on every call (the output check), where a ctypes call costs more than the work. One
kernel source (attn_kernel.h) compiled once per instruction set (attn_avx512.c, attn_avx2.c on x86-64;
attn_neon.c on ARM64; each sets its own target), and attn_cpu.c, compiled for the baseline CPU, with the entry
points that run the variant chosen at run time. Optional: without a C compiler the package installs without it,
and the tiled engine computes those calls in torch ops instead (``qkv info`` says which)."""
from glob import glob

from setuptools import Extension, setup

CSRC = "src/qkv/csrc"
setup(ext_modules=[Extension(
    "qkv._attn_cpu",
    [f"{CSRC}/attn_cpu.c", f"{CSRC}/attn_avx512.c", f"{CSRC}/attn_avx2.c", f"{CSRC}/attn_neon.c",
     f"{CSRC}/attn_py.c"],
    depends=sorted(glob(f"{CSRC}/*.h")),
    extra_compile_args=["-O3", "-std=gnu11", "-fno-math-errno", "-fopenmp"],
    extra_link_args=["-fopenmp"],
    libraries=["m"],
    optional=True,
)])
