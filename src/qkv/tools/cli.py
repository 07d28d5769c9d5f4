"""The ``qkv`` command: ``bench``, ``check``, ``info``, ``show``, ``demo``, ``kernels``. Thin: parsing and dispatch
only.

Bad arguments give one line on stderr and exit status 2 (no traceback), before any work: output paths are
checked for writing first; ``check`` exits 1 on a failure.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

DEFAULT_OUT = "qkv-out"


class UsageError(Exception):
    """Raised by the parser instead of printing usage and exiting (turned into one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(f"{self.prog}: error: {message}")


def _checked(cast, ok, what):
    """An argparse type: ``cast`` the text, then require ``ok``; the error names what was expected."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v
    return parse


def _writable_file(path: str, flag: str, cmd: str) -> None:
    """Raise UsageError unless ``path`` can be written as a file (tried now: a run is not wasted on a file it
    cannot write at the end). Leaves no file behind that was not there."""
    existed = os.path.lexists(path)
    try:
        if os.path.isdir(path):
            raise IsADirectoryError("it is a directory")
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"qkv {cmd}: error: {flag} {path!r} cannot be written: {e.strerror or e}") from None
    if not existed:
        os.remove(path)


def _writable_dir(path: str, flag: str, cmd: str) -> None:
    """Raise UsageError unless ``path`` is (or can be made) a directory we may write into."""
    try:
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError("it exists and is not a directory")
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError("permission denied")
    except OSError as e:
        raise UsageError(f"qkv {cmd}: error: {flag} {path!r} is not a writable directory: {e.strerror or e}") from None


def _model_sizes() -> tuple[int, int] | None:
    """(layers, heads) of the bundled encoder from its config.json (no weights loaded); None if not installed."""
    try:
        import json

        from ..models.bert import minilm_path
        c = json.loads((minilm_path() / "config.json").read_text())
        return int(c["num_hidden_layers"]), int(c["num_attention_heads"])
    except Exception:
        return None


_pos_int = _checked(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_pos_float = _checked(float, lambda v: v > 0, "a positive number")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qkv", description="qkv: exact self-attention for PyTorch. Measure, check, inspect.")
    sub = p.add_subparsers(dest="cmd", metavar="{bench,check,info,show,demo,kernels}", parser_class=_Parser)

    b = sub.add_parser("bench", help="time and peak memory of qkv's engines vs SDPA, flex and the naive math",
                       description="Time and peak memory of attention providers over sequence lengths. "
                                   "Masks: none | causal | window:W (causal, W keys) | window:L,R | document:K | "
                                   "prefix:P, joined by '+'. Providers: auto tiled triton reference sdpa "
                                   "sdpa-flash sdpa-efficient sdpa-cudnn sdpa-math flex naive (groups: qkv, "
                                   "sdpa-all). On CPU flex is opt-in (its first compile takes ~30 s).")
    b.add_argument("--kind", choices=["attention", "linear"], default="attention",
                   help="linear: qkv's exact engines against the O(N) linear-attention family (default providers "
                        "auto linear linear-decay deltanet, causal, N from 512 to 16384): where the quadratic cost "
                        "overtakes the linear one on this machine")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    b.add_argument("--dtype", nargs="+", default=None, metavar="DT", help="fp32 bf16 fp16 fp64 (default fp32 on "
                   "CPU, bf16 on CUDA)")
    b.add_argument("--shapes", default=None, help="named shape set for defaults: tiny, cpu, long, gpu, llama")
    b.add_argument("--seqlens", nargs="+", type=_pos_int, default=None, metavar="N")
    b.add_argument("--batch", type=_pos_int, default=None)
    b.add_argument("--heads", type=_pos_int, default=None)
    b.add_argument("--head-dim", type=_pos_int, default=None)
    b.add_argument("--mask", nargs="+", default=["causal"], metavar="SPEC")
    b.add_argument("--mode", nargs="+", default=["fwd"], choices=["fwd", "fwdbwd"])
    b.add_argument("--providers", nargs="+", default=None, metavar="P")
    b.add_argument("--reps", type=_pos_int, default=5, help="timed samples per provider and point (default 5)")
    b.add_argument("--warmup", type=_nonneg_int, default=2, help="warm-up calls after the first (default 2)")
    b.add_argument("--budget", type=_pos_float, default=60.0, metavar="S",
                   help="a call longer than S seconds (measured or predicted) is recorded as timeout (default 60)")
    b.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory (CPU: one fresh subprocess per point)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", metavar="FILE", help="write every raw figure and the machine here")
    b.add_argument("--plot", metavar="FILE", help="PNG: time and peak memory vs N, log-log")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    c = sub.add_parser("check", help="every engine here vs the fp64 reference; non-zero exit on failure")
    c.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    c.add_argument("--dtype", nargs="+", default=None, metavar="DT",
                   help="dtypes to test (default fp32 bf16 on CPU, fp16 bf16 fp32 on CUDA)")
    c.add_argument("--engines", nargs="+", default=None, metavar="E", help="default: every engine available")
    c.add_argument("--json", metavar="FILE")
    c.add_argument("-v", "--verbose", action="store_true", help="one row per case instead of per group")

    i = sub.add_parser("info", help="versions, devices, CPU features, which engines can run here")
    i.add_argument("--json", action="store_true", help="machine info as JSON")

    s = sub.add_parser("show", help="attention maps of the bundled encoder for TEXT (PNG + HTML)")
    s.add_argument("text")
    s.add_argument("--layer", type=_nonneg_int, default=None)
    s.add_argument("--head", type=_nonneg_int, default=None)
    s.add_argument("--out", default=DEFAULT_OUT)

    d = sub.add_parser("demo", help="the tour: a real encoder's attention, then the quadratic cost")
    d.add_argument("--out", default=DEFAULT_OUT)

    k = sub.add_parser("kernels", help="compile the triton engine's kernels for GPU targets (no GPU needed)",
                       description="Compile every configuration the triton engine launches for the given GPU "
                                   "targets and print registers, spill bytes, shared memory and tensor-core use "
                                   "(wgmma: Hopper, mma: Ampere). Exit status 1 on a spill or too much shared "
                                   "memory. Variants: plain (no mask), causal (decode), masked (document ids, "
                                   "bitmaps, lengths), all (every feature at once: the most registers).")
    k.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], choices=["sm_80", "sm_86", "sm_90"],
                   help="targets: sm_80 (A100), sm_86 (100 KB shared memory: A10, RTX 30/40, L4), sm_90 (H100/H200)")
    k.add_argument("--head-dim", nargs="+", type=int, default=None, metavar="D",
                   choices=[16, 32, 64, 128, 256], help="padded head dims (default 16 32 64 128 256)")
    k.add_argument("--dtype", nargs="+", default=None, choices=["bf16", "fp16", "fp32"],
                   help="input dtypes (default bf16 fp32; fp16 compiles like bf16)")
    k.add_argument("--kernel", nargs="+", default=None,
                   choices=["fwd", "bwd_dq", "bwd_dkdv", "bwd_delta", "decode", "merge", "lin_wy", "lin_state",
                            "lin_out"],
                   help="kernels (default all); lin_*: the linear-attention family's (qkv.linear), compiled in "
                        "their own variants (delta, linear) whatever --variant says")
    k.add_argument("--variant", nargs="+", default=None, choices=["plain", "masked", "all"])
    k.add_argument("--jobs", type=_pos_int, default=None, help="compile processes (default: CPU count)")
    k.add_argument("--json", metavar="FILE")
    k.add_argument("--cache-dir", default=None, help="Triton compile cache (default: a temporary directory)")
    return p


def _bench(a) -> int:
    import torch

    from . import bench
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = {}
    if a.shapes is not None:
        if a.shapes not in bench.SHAPE_SETS:
            raise bench.BenchError(f"unknown shape set {a.shapes!r}; choose from {', '.join(bench.SHAPE_SETS)}")
        shapes = bench.SHAPE_SETS[a.shapes]
    pick = (lambda v, k, d: v if v is not None else shapes.get(k, d))
    linear = a.kind == "linear"
    cfg = bench.Config(device=device,
                       dtypes=a.dtype or (["bf16"] if str(device).startswith("cuda") else ["fp32"]),
                       seqlens=pick(a.seqlens, "seqlens", [512 << i for i in range(6)] if linear
                                    else [512, 1024, 2048]),
                       batch=pick(a.batch, "batch", 1), heads=pick(a.heads, "heads", 8),
                       head_dim=pick(a.head_dim, "head_dim", 64), masks=a.mask, modes=a.mode,
                       providers=a.providers or (bench.LINEAR_DEFAULT if linear else None), reps=a.reps,
                       warmup=a.warmup, budget_s=a.budget,
                       memory=a.memory, seed=a.seed, progress=not a.quiet)
    cfg.validate()  # bad requests fail here, before any output file is touched
    for flag, path in (("--json", a.json), ("--plot", a.plot)):
        if path:
            _writable_file(path, flag, "bench")
    result = bench.run(cfg)
    result["command"] = shlex.join(["qkv", *a.argv])
    print(bench.format_table(result))
    if a.json:
        bench.write_json(result, a.json)
        print(f"wrote {a.json}")
    if a.plot:
        bench.plot(result, a.plot)
        print(f"wrote {a.plot}")
    return 0


def _check(a) -> int:
    from . import check
    if a.json:
        _writable_file(a.json, "--json", "check")
    return check.main(device=a.device, dtypes=a.dtype, engines=a.engines, json_path=a.json, verbose=a.verbose)


def _info(a) -> int:
    from . import info
    if a.json:
        import json
        print(json.dumps(info.machine_info(), indent=1))
    else:
        print(info.format_info())
        print(_providers_text(info.machine_info()))
    return 0


def _providers_text(machine: dict) -> str:
    """The ``qkv bench`` providers and whether each can run on this machine's devices."""
    from . import bench
    lines = ["", "bench providers (qkv bench --providers ...)"]
    for dev in ["cpu"] + (["cuda"] if machine["gpus"] else []):
        for p in bench.PROVIDERS.values():
            ok, reason = p.available(dev)
            lines.append(f"  {dev:4s} {'yes' if ok else 'no ':3}  {p.name:15s} {reason}")
    return "\n".join(lines)


def _show(a) -> int:
    if not a.text.strip():
        raise UsageError(f"qkv show: error: TEXT must hold a word, got {a.text!r}")
    sizes = _model_sizes() if a.layer is not None or a.head is not None else None
    if sizes is not None:
        for name, x, n in (("--layer", a.layer, sizes[0]), ("--head", a.head, sizes[1])):
            if x is not None and x >= n:
                raise UsageError(f"qkv show: error: {name} {x} is out of range: the model has {n}, numbered "
                                 f"0..{n - 1}")
    _writable_dir(a.out, "--out", "show")
    from . import viz
    viz.show(a.text, layer=a.layer, head=a.head, out=a.out)
    return 0


def _demo(a) -> int:
    _writable_dir(a.out, "--out", "demo")
    from . import demo
    demo.run(out=a.out)
    return 0


def _kernels(a) -> int:
    from . import kernels
    return kernels.main(a.arch, head_dims=a.head_dim, dtypes=a.dtype, kernels=a.kernel, variants=a.variant,
                        jobs=a.jobs, json_path=a.json, cache_dir=a.cache_dir)


COMMANDS = {"bench": _bench, "check": _check, "info": _info, "show": _show, "demo": _demo, "kernels": _kernels}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``qkv`` and ``python -m qkv``; returns the exit status."""
    parser = build_parser()
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        a = parser.parse_args(argv)
        a.argv = argv
        if not a.cmd:
            parser.print_help()
            return 0
        return int(COMMANDS[a.cmd](a) or 0)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkv: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from .bench import BenchError
        if isinstance(e, BenchError):
            print(f"qkv {getattr(a, 'cmd', '')}: error: {e}".replace("  ", " "), file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
