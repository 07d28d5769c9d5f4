"""Running a sweep: the validated configuration, warm-up and alternated timing, peak memory (a subprocess per
point on CPU), and the failures that are results (oom, timeout, unsupported, error)."""
from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .providers import PROVIDERS, Provider, resolve_providers
from .specs import DTYPE_NAMES, DTYPES, MODES, SCHEMA, BenchError, Case, parse_mask

__all__ = ["Config", "run", "memory_worker"]

# --------------------------------------------------------------------------------------------- config
@dataclass
class Config:
    device: str = "cpu"
    dtypes: list = field(default_factory=lambda: ["fp32"])
    seqlens: list = field(default_factory=lambda: [512, 1024, 2048])
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    masks: list = field(default_factory=lambda: ["causal"])
    modes: list = field(default_factory=lambda: ["fwd"])
    providers: list = field(default_factory=list)
    reps: int = 5
    warmup: int = 2
    budget_s: float = 60.0         # one call longer than this (measured or predicted) is recorded as timeout
    memory: bool = True
    seed: int = 0
    min_sample_s: float = 0.05     # a sample repeats a fast call until it lasts about this long
    progress: bool = True

    def validate(self) -> Config:
        dev = str(self.device).lower()
        if dev.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BenchError(f"--device {self.device}: CUDA is not available here "
                                 f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'}"
                                 f" CUDA)")
            dev = "cuda"
        elif dev != "cpu":
            raise BenchError(f"--device must be cpu or cuda, got {self.device!r}")
        self.device = dev
        dts = []
        for d in self.dtypes:
            if str(d).lower() not in DTYPES:
                raise BenchError(f"unknown dtype {d!r}; choose from fp32, bf16, fp16, fp64")
            dts.append(DTYPE_NAMES[DTYPES[str(d).lower()]])
        self.dtypes = list(dict.fromkeys(dts))
        for name, v in (("--batch", self.batch), ("--heads", self.heads), ("--head-dim", self.head_dim),
                        ("--reps", self.reps)):
            if not isinstance(v, int) or v < 1:
                raise BenchError(f"{name} must be a positive integer, got {v!r}")
        if not self.seqlens:
            raise BenchError("--seqlens needs at least one length")
        for n in self.seqlens:
            if not isinstance(n, int) or n < 1:
                raise BenchError(f"--seqlens: lengths must be positive integers, got {n!r}")
        self.seqlens = sorted(dict.fromkeys(self.seqlens))
        if self.warmup < 0:
            raise BenchError(f"--warmup must be >= 0, got {self.warmup}")
        if not self.budget_s > 0:
            raise BenchError(f"--budget must be > 0 seconds, got {self.budget_s}")
        self.masks = [parse_mask(m).text for m in self.masks]
        for m in self.modes:
            if m not in MODES:
                raise BenchError(f"--mode must be fwd or fwdbwd, got {m!r}")
        self.providers = resolve_providers(self.providers, self.device)
        if not self.providers:
            raise BenchError("no provider to run")
        return self


# --------------------------------------------------------------------------------------------- memory
def _proc_status() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "failed to allocate" in msg \
        or "defaultcpuallocator" in msg


def _classify(e: BaseException) -> tuple[str, str]:
    """(status, one-line message) of an exception raised by a provider."""
    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    if _is_oom(e):
        return "oom", msg
    if isinstance(e, (NotImplementedError, ValueError, TypeError)) or "no available kernel" in str(e).lower():
        return "unsupported", msg
    return "error", msg


def _step(fn: Callable, q, k, v, do):
    if do is None:
        with torch.no_grad():
            return fn(q, k, v)
    q.grad = k.grad = v.grad = None
    out = fn(q, k, v)
    out.backward(do)
    return out


def memory_worker() -> None:
    """Entry of the CPU memory subprocess: reads a JSON job on stdin, prints one JSON line."""
    job = json.loads(sys.stdin.read())
    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    case = Case(**job["case"])
    p = PROVIDERS[job["provider"]]
    res: dict = {}
    try:
        _prime(p, case)
        q, k, v, do = case.inputs(job.get("seed", 0))
        gc.collect()
        base = _proc_status().get("VmRSS", _maxrss())
        fn, info = p.build(case)
        gc.collect()
        after_setup = _proc_status().get("VmRSS", base)
        if job.get("warm", True) or p.compiles:  # a first call (compile, caches) outside the measurement
            t0 = time.perf_counter()
            out = _step(fn, q, k, v, do)
            res["first_call_s"] = time.perf_counter() - t0
            del out
            if do is not None:
                q.grad = k.grad = v.grad = None
            gc.collect()
        can_reset = _reset_peak_rss()
        before = _proc_status().get("VmRSS", after_setup)
        t0 = time.perf_counter()
        out = _step(fn, q, k, v, do)
        res["call_s"] = time.perf_counter() - t0
        st = _proc_status()
        if can_reset and "VmHWM" in st:
            call_peak = max(0, st["VmHWM"] - before)
            res["method"] = "VmHWM after clear_refs (call) + VmRSS growth (setup)"
        else:
            call_peak = max(0, _maxrss() - before)
            res["method"] = "ru_maxrss"
        res.update(status="ok", setup_bytes=max(0, after_setup - base), call_peak_bytes=call_peak,
                   peak_bytes=max(0, after_setup - base) + call_peak, baseline_rss_bytes=base,
                   maxrss_growth_bytes=max(0, _maxrss() - base), setup_s=info.get("setup_s"))
    except BaseException as e:
        res["status"], res["message"] = _classify(e)
    sys.stdout.write("\n" + json.dumps(res) + "\n")
    sys.stdout.flush()


def _prime(p: Provider, case: Case) -> None:
    """Load what a provider imports (and its thread pools) before the baseline, so that library code is not
    counted as the provider's memory: a tiny call for most, the compile stack's imports for compiled ones."""
    if p.compiles:
        import importlib
        importlib.import_module("torch._dynamo")
        importlib.import_module("torch._inductor.compile_fx")
        from torch.nn.attention.flex_attention import create_block_mask
        create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 128, 128, device=case.device)
        return
    from dataclasses import replace
    tiny = replace(case, B=1, H=1, N=min(case.N, 64))
    try:
        fn, _ = p.build(tiny)
        _step(fn, *tiny.inputs())
    except Exception:  # the real call reports the failure
        pass


def _run_memory_subprocess(case: Case, provider: str, seed: int, timeout: float, warm: bool = True) -> dict:
    import qkv as _pkg  # the package dir must be importable in the child
    root = os.path.dirname(os.path.dirname(os.path.abspath(_pkg.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # glibc: a fixed mmap threshold returns every large freed block to the OS at once, so RSS follows the live
    # tensors instead of malloc's retained heap (which would hide a second call's growth)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    job = {"case": asdict(case), "provider": provider, "seed": seed, "threads": torch.get_num_threads(),
           "warm": warm}
    try:
        r = subprocess.run([sys.executable, "-c", "from qkv.tools.bench.timing import memory_worker; memory_worker()"],
                           input=json.dumps(job), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "message": f"memory subprocess exceeded {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
    if r.returncode == 0 and lines:
        return json.loads(lines[-1])
    if r.returncode in (-9, 137):
        return {"status": "oom", "message": "memory subprocess killed (SIGKILL: out of memory)"}
    tail = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
    return {"status": "error", "message": f"memory subprocess exit {r.returncode}: {tail}"}


def _predicted_bytes(provider: Provider, case: Case) -> int:
    """A rough lower bound of what a materialising provider needs; 0 for O(N) ones."""
    el = case.torch_dtype.itemsize
    n2 = case.B * case.H * case.N * case.N
    if provider.name in ("naive", "sdpa-math", "reference") or (provider.name.startswith("sdpa")
                                                              and not case.spec.is_none
                                                              and not case.spec.only_causal):
        mats = 3 if case.mode == "fwd" else 5
        el = 8 if provider.name == "reference" else el
        return mats * n2 * el + case.N * case.N
    return 0


def _available_bytes(device: str) -> int | None:
    if device == "cuda":
        try:
            return int(torch.cuda.mem_get_info()[0])
        except Exception:
            return None
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------- timing
def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _time_sample(fn, args, inner: int, device: str) -> float:
    """Seconds per call, averaged over ``inner`` back-to-back calls."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            _step(fn, *args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        _step(fn, *args)
    return (time.perf_counter() - t0) / inner


def _summary(times: list[float]) -> dict:
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    med = statistics.median(ts)
    return {"median_ms": med * 1e3, "min_ms": ts[0] * 1e3, "max_ms": ts[-1] * 1e3, "p25_ms": q[0] * 1e3,
            "p75_ms": q[2] * 1e3, "spread_pct": 100.0 * (q[2] - q[0]) / med if med > 0 else 0.0}


def _cases(cfg: Config) -> list[list[Case]]:
    """Cases grouped by (dtype, mask, mode), each group ordered by N."""
    groups = []
    for dt in cfg.dtypes:
        for m in cfg.masks:
            for mode in cfg.modes:
                groups.append([Case(cfg.device, dt, m, mode, cfg.batch, cfg.heads, n, cfg.head_dim)
                               for n in cfg.seqlens])
    return groups


def _base_row(p: Provider, c: Case) -> dict:
    return {"provider": p.name, "label": p.label, "family": p.family, **asdict(c),
            "flops": c.flops(), "visible_fraction": c.visible_fraction(), "status": "ok", "message": ""}


def run(cfg: Config) -> dict:
    """Run the sweep described by ``cfg`` (validated here); returns the JSON-ready result dict."""
    from ..info import machine_info
    cfg.validate()
    provs = [PROVIDERS[n] for n in cfg.providers]
    groups = _cases(cfg)
    total = sum(len(g) for g in groups) * len(provs)
    bar = None
    if cfg.progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, desc="qkv bench", unit="pt", file=sys.stderr,
                       dynamic_ncols=True, leave=False)
        except Exception:
            bar = None
    t_start = time.perf_counter()
    results: list[dict] = []
    prov_info = {}
    for p in provs:
        ok, reason = p.available(cfg.device)
        prov_info[p.name] = {"label": p.label, "family": p.family, "doc": p.doc, "available": ok,
                             "reason": reason}
    for group in groups:
        last: dict[str, tuple] = {}          # provider -> (flops, seconds per call, status, N)
        for case in group:
            rows = {p.name: _base_row(p, case) for p in provs}
            live: list[Provider] = []
            for p in provs:
                row = rows[p.name]
                if not prov_info[p.name]["available"]:
                    row.update(status="unavailable", message=prov_info[p.name]["reason"])
                    continue
                prev = last.get(p.name)
                if prev and prev[2] in ("oom", "timeout"):
                    row.update(status=prev[2], message=f"skipped: {prev[2]} at a shorter length")
                    continue
                if prev and prev[1]:
                    # the linear family grows with N, the others with the visible (query, key) pairs
                    est = prev[1] * (case.N / max(prev[3], 1) if p.family == "linear"
                                     else case.flops() / max(prev[0], 1.0))
                    row["predicted_call_s"] = est
                    if est > cfg.budget_s:
                        row.update(status="timeout", message=f"skipped: predicted {est:.1f} s per call "
                                                             f"> budget {cfg.budget_s:g} s")
                        continue
                need, avail = _predicted_bytes(p, case), _available_bytes(cfg.device)
                if need and avail and need > 0.9 * avail:
                    row.update(status="oom", message=f"skipped: needs ~{need / 2**30:.1f} GiB, "
                                                     f"{avail / 2**30:.1f} GiB available")
                    continue
                live.append(p)
            # memory pass first on CPU (a fresh subprocess per point): it also finds OOM/timeouts safely
            if cfg.memory and cfg.device == "cpu":
                for p in list(live):
                    if bar:
                        bar.set_postfix_str(f"memory {p.name} N={case.N} {case.mask} {case.mode}", refresh=True)
                    mem = _run_memory_subprocess(case, p.name, cfg.seed, timeout=4 * cfg.budget_s + 120,
                                                 warm=cfg.warmup > 0)
                    rows[p.name]["memory"] = mem
                    if mem.get("status") == "ok":
                        rows[p.name]["peak_bytes"] = mem["peak_bytes"]
                        if mem.get("call_s", 0) > cfg.budget_s:
                            rows[p.name].update(status="timeout", message=f"one call took {mem['call_s']:.1f} s"
                                                f" > budget {cfg.budget_s:g} s", one_call_s=mem["call_s"])
                            live.remove(p)
                    elif mem.get("status") in ("oom", "timeout", "unsupported"):
                        rows[p.name].update(status=mem["status"], message=mem.get("message", ""))
                        live.remove(p)
            _time_group(cfg, case, live, rows, bar)
            for p in provs:
                r = rows[p.name]
                last[p.name] = (case.flops(), (r.get("median_ms") or 0) / 1e3 or r.get("one_call_s"),
                                r["status"], case.N)
            if bar:
                bar.update(len(provs))
            _finish_rows(rows)
            results.extend(rows.values())
    if bar:
        bar.close()
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
            "elapsed_s": time.perf_counter() - t_start, "machine": machine_info(),
            "config": asdict(cfg), "providers": prov_info, "results": results}


def _time_group(cfg: Config, case: Case, live: list[Provider], rows: dict, bar) -> None:
    """Warm up and time the live providers of one case, alternating between them."""
    args = case.inputs(cfg.seed)
    fns: dict[str, Callable] = {}
    inner: dict[str, int] = {}
    outs: dict[str, torch.Tensor] = {}
    for p in live:
        row = rows[p.name]
        if bar:
            bar.set_postfix_str(f"warm-up {p.name} N={case.N} {case.mask} {case.mode}", refresh=True)
        try:
            fn, info = p.build(case)
            row.update(setup_s=info["setup_s"], mask_form=info.get("mask_form"))
            _sync(case.device)
            t0 = time.perf_counter()
            out = _step(fn, *args)
            _sync(case.device)
            first = time.perf_counter() - t0
            row["first_call_ms"] = first * 1e3
            outs[p.name] = out.detach()
            del out
            if first > cfg.budget_s and not p.compiles:  # a compiled provider's first call is its compile
                row.update(status="timeout", message=f"first call took {first:.1f} s > budget {cfg.budget_s:g} s",
                           one_call_s=first)
                continue
            # warm-up: a few more calls, fewer when calls are slow
            est = first
            n_warm = cfg.warmup if first * cfg.warmup < cfg.budget_s / 4 else 0
            if p.compiles:
                n_warm = max(1, cfg.warmup)  # the first call compiled: time at least one compiled call
            for _ in range(n_warm):
                t0 = time.perf_counter()
                _step(fn, *args)
                _sync(case.device)
                est = time.perf_counter() - t0
            if p.compiles:
                row["compile_s"] = max(0.0, first - est)
                if est > cfg.budget_s:
                    row.update(status="timeout", message=f"a compiled call took {est:.1f} s > budget "
                                                         f"{cfg.budget_s:g} s", one_call_s=est)
                    continue
            fns[p.name] = fn
            inner[p.name] = max(1, min(100, int(cfg.min_sample_s / max(est, 1e-6))))
            row["_est"] = est
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            row["status"], row["message"] = _classify(e)
        finally:
            if case.mode == "fwdbwd":
                for t in args[:3]:
                    t.grad = None
            if case.device == "cuda" and rows[p.name]["status"] == "oom":
                torch.cuda.empty_cache()
    if not fns:
        return
    # how many rounds fit in the budget (at least 1)
    slowest = max(rows[n]["_est"] * inner[n] for n in fns)
    reps = max(1, min(cfg.reps, int(cfg.budget_s * len(fns) / max(slowest * len(fns), 1e-9))))
    if bar:
        bar.set_postfix_str(f"timing {len(fns)} providers x {reps} reps N={case.N} {case.mask} {case.mode}",
                            refresh=True)
    times: dict[str, list[float]] = {n: [] for n in fns}
    order = list(fns)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            rot = order[r % len(order):] + order[:r % len(order)]
            for name in rot:
                if name not in fns:
                    continue
                try:
                    times[name].append(_time_sample(fns[name], args, inner[name], case.device))
                except BaseException as e:
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    rows[name]["status"], rows[name]["message"] = _classify(e)
                    del fns[name]
    finally:
        if gc_was:
            gc.enable()
    for name, ts in times.items():
        if not ts or rows[name]["status"] != "ok":
            continue
        row = rows[name]
        row.update(_summary(ts))
        row.update(times_ms=[t * 1e3 for t in ts], reps=len(ts), inner=inner[name])
        row["tflops"] = row["flops"] / (row["median_ms"] / 1e3) / 1e12
    # CUDA memory in-process, one provider at a time
    if cfg.memory and case.device == "cuda":
        for name, fn in fns.items():
            rows[name]["memory"] = _cuda_memory(fn, args)
            if rows[name]["memory"].get("status") == "ok":
                rows[name]["peak_bytes"] = rows[name]["memory"]["peak_bytes"]
    # agreement with a baseline output (sdpa, else naive, else the first one)
    base = next((n for n in ("sdpa", "naive", "sdpa-math", "reference") if n in outs), next(iter(outs), None))
    for name, o in outs.items():
        if base is not None and rows[name]["status"] == "ok" and rows[name]["family"] != "linear":
            rows[name]["max_abs_diff"] = float((o.float() - outs[base].float()).abs().max()) if o.numel() else 0.0
            rows[name]["diff_vs"] = base


def _cuda_memory(fn, args) -> dict:
    try:
        q, k, v, do = args
        if do is not None:
            q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = _step(fn, *args)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        if do is not None:
            q.grad = k.grad = v.grad = None
        return {"status": "ok", "peak_bytes": int(peak), "method": "torch.cuda.max_memory_allocated"}
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        s, m = _classify(e)
        torch.cuda.empty_cache()
        return {"status": s, "message": m}


def _finish_rows(rows: dict) -> None:
    sd = next((rows[n] for n in ("sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math")
               if n in rows and rows[n].get("median_ms")), None)
    for r in rows.values():
        r.pop("_est", None)
        if sd is not None and r.get("median_ms"):
            r["speedup_vs_sdpa"] = sd["median_ms"] / r["median_ms"]
            r["sdpa_ref"] = sd["provider"]

