"""What this machine is and what can run on it: versions, devices, CPU features, engines.

``machine_info()`` is embedded in every ``qkv bench`` JSON file; ``format_info()`` is ``qkv info``.
Nothing here imports more than torch (and qkv itself, lazily).
"""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys

import torch

# CPU flags worth knowing for attention kernels (from /proc/cpuinfo "flags").
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def cpuinfo() -> tuple[str, set[str]]:
    """(model name, set of flags) from /proc/cpuinfo; ("", set()) where it cannot be read."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def _version(mod: str) -> str | None:
    try:
        return getattr(importlib.import_module(mod), "__version__", "?")
    except Exception:
        return None


def _mem_total() -> int | None:
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except Exception:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None


def machine_info() -> dict:
    """A JSON-ready description of this machine and its software."""
    model, flags = cpuinfo()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_bytes": int(p.total_memory), "multiprocessors": p.multi_processor_count})
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:
        cap = None
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": {"model": model, "cores": os.cpu_count(), "usable_cores": affinity,
                "torch_threads": torch.get_num_threads(), "torch_cpu_capability": cap,
                "features": [f for f in CPU_FEATURES if f in flags], "qkv_kernel": cpu_kernel(),
                "memory_bytes": _mem_total()},
        "gpus": gpus,
        "versions": {"torch": torch.__version__, "triton": _version("triton"), "numpy": _version("numpy"),
                     "qkv": _version("qkv"), "cuda": torch.version.cuda, "hip": torch.version.hip,
                     "cudnn": (torch.backends.cudnn.version() if torch.cuda.is_available() else None)},
        "cxx_compiler": shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++"),
    }


def engines(device: str | None = None) -> list[tuple[str, bool, str]]:
    """qkv's engines as ``(name, available, reason)``, from the registry (``qkv.backends()``)."""
    import qkv
    return [(b.name, b.available, b.reason) for b in qkv.backends(device)]


def cpu_kernel() -> str:
    """Which variant of qkv's CPU kernel runs here (``qkv.options(cpu_isa=...)`` / QKV_CPU_ISA force one), and
    the others built."""
    try:
        from ..core.options import get_options
        from ..engines import cpu_kernel as kernel
        ok, why = kernel.available()
        built = kernel.variants()
        forced = get_options().cpu_isa
    except Exception as e:  # never let info fail for want of the kernel
        return f"unavailable ({type(e).__name__}: {e})"
    name = kernel.isa() if ok else None
    others = ", ".join(f"{n}{'' if runs else ' (not on this CPU)'}" for n, runs in built if n != name)
    return ((f"{name}" + (f" (forced: cpu_isa={forced!r})" if forced else " (the best this CPU runs)")
             if ok else f"none: {why}") + (f"; also built: {others}" if others else ""))


def format_info() -> str:
    """The text printed by ``qkv info``."""
    m = machine_info()
    v = m["versions"]
    lines = ["qkv " + str(v["qkv"]),
             f"  python {m['python']}  torch {v['torch']}  triton {v['triton'] or '-'}  numpy {v['numpy'] or '-'}",
             f"  platform {m['platform']}",
             "",
             "devices"]
    c = m["cpu"]
    mem = f"{c['memory_bytes'] / 2**30:.1f} GiB" if c["memory_bytes"] else "? GiB"
    lines.append(f"  cpu   {c['model']}: {c['usable_cores']} usable cores ({c['cores']} online), "
                 f"torch threads {c['torch_threads']}, {mem}")
    lines.append(f"        features: {' '.join(c['features']) or '(none of ' + ', '.join(CPU_FEATURES[:3]) + '...)'}"
                 f"; torch kernels: {c['torch_cpu_capability']}")
    amx = any(f.startswith("amx") for f in c["features"])
    avx512 = "avx512f" in c["features"]
    lines.append(f"        AVX-512: {'yes' if avx512 else 'no'}   AMX: {'yes' if amx else 'no'}")
    lines.append(f"        qkv CPU kernel: {cpu_kernel()}")
    if m["gpus"]:
        for g in m["gpus"]:
            lines.append(f"  cuda:{g['index']} {g['name']} (sm {g['capability']}, {g['memory_bytes'] / 2**30:.1f} GiB, "
                         f"{g['multiprocessors']} SMs)  CUDA {v['cuda']}  cuDNN {v['cudnn']}")
    else:
        why = "torch built without CUDA" if v["cuda"] is None else "no CUDA device visible"
        lines.append(f"  cuda  none ({why})")
    lines.append(f"  C++ compiler (torch.compile on CPU): {m['cxx_compiler'] or 'not found'}")
    lines.append("")
    devices = ["cpu"] + (["cuda"] if m["gpus"] else [])
    for dev in devices:
        lines.append(f"qkv engines on {dev}")
        for name, ok, reason in engines(dev):
            lines.append(f"  {'yes' if ok else 'no ':3}  {name:10s} {reason}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(format_info())
    sys.exit(0)
