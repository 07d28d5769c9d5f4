"""Ring attention vs single-process attention at equal total work, on this machine's CPU (gloo, loopback).

    python benchmarks/ring_bench.py                      # the bar: causal N=16384, 2 ranks x 1 thread vs 1 x 1
    python benchmarks/ring_bench.py --mode fwd fwdbwd --N 8192 --world 2 --layout zigzag contiguous

W worker processes (torch.multiprocessing spawn, gloo over 127.0.0.1), each limited to ``--threads`` threads.
Per repetition, side by side and alternating which goes first: rank 0 alone runs ``qkv.attention`` on the whole
sequence (the other ranks wait in a barrier: 1 process x threads), then every rank runs ``ring_attention`` on its
shard (W processes x threads); a time is barrier to barrier as rank 0 sees it. Prints medians, p25-p75, the
speedup per repetition, the blocks/tiles the ring computed (ring_stats), the bytes each rank sends per step and
the time ranks spent waiting on the ring. ``--json FILE`` keeps every sample. Run it under
``flock /tmp/qkv-bench.lock`` on a shared machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
        return f"{name}, {'AVX-512' if 'avx512f' in text else 'no AVX-512'}, {os.cpu_count()} cores"
    except OSError:
        return platform.processor() or "?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, args, port: int, out_path: str):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world, timeout=datetime.timedelta(seconds=600))
    import qkv
    from qkv.distributed import ring_attention, ring_stats, shard_sequence

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[args.dtype]
    g = torch.Generator().manual_seed(0)
    B, H, N, D = args.batch, args.heads, args.N, args.head_dim
    Q, K, V = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
    dO = torch.randn(B, H, N, D, generator=g).to(dtype)
    kw = dict(causal=not args.full)
    results = []

    # Control: what W processes gain over one on this machine right now, with no attention and no messages
    # (a fixed matmul loop split W ways vs done by rank 0 alone). On an idle machine with W free cores, ~W.
    a, b = torch.randn(512, 512), torch.randn(512, 512)

    def loop(n):
        for _ in range(n):
            a @ b

    def control_once(alone):
        dist.barrier()
        t0 = time.perf_counter()
        if not alone or rank == 0:
            loop(args.control_n * (args.world if alone else 1))
        dist.barrier()
        return time.perf_counter() - t0

    control = [control_once(True) / control_once(False) for _ in range(3)]

    def measure(mode, layout):
        q, k, v, do = (shard_sequence(t, layout=layout).contiguous() for t in (Q, K, V, dO))
        train = mode == "fwdbwd"

        def single():
            if rank != 0:
                return
            if train:
                a, b, c = (t.detach().requires_grad_() for t in (Q, K, V))
                qkv.attention(a, b, c, **kw).backward(dO)
            else:
                with torch.no_grad():
                    qkv.attention(Q, K, V, **kw)

        def ring():
            if train:
                a, b, c = (t.detach().requires_grad_() for t in (q, k, v))
                ring_attention(a, b, c, layout=layout, **kw).backward(do)
            else:
                with torch.no_grad():
                    ring_attention(q, k, v, layout=layout, **kw)

        cpu = {"single": [], "ring": []}

        def timed(fn, key=None):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            c1 = time.process_time()
            dist.barrier()
            if key is not None:
                cpu[key].append(c1 - c0)
            return time.perf_counter() - t0

        for _ in range(args.warmup):
            timed(single), timed(ring)
        t_single, t_ring, waits = [], [], []
        for i in range(args.reps):
            if i % 2 == 0:
                t_single.append(timed(single, "single"))
            with ring_stats() as st:
                t_ring.append(timed(ring, "ring"))
            if i % 2 == 1:
                t_single.append(timed(single, "single"))
            waits.append(st.forward.wait_seconds + st.backward.wait_seconds)
        # one step's message alone (this rank's keys and values to the next rank): the link's speed
        buf = torch.cat([k.reshape(-1), v.reshape(-1)])
        inc = torch.empty_like(buf)
        ranks = dist.get_process_group_ranks(dist.group.WORLD)

        def exchange():
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, buf, ranks[(rank + 1) % args.world]),
                                           dist.P2POp(dist.irecv, inc, ranks[(rank - 1) % args.world])])
            for rq in reqs:
                rq.wait()

        t_msg = sorted(timed(exchange) for _ in range(5))[2]
        all_st = [None] * args.world
        dist.all_gather_object(all_st, (st.forward.__dict__, st.backward.__dict__, waits, cpu))
        elem = torch.empty((), dtype=dtype).element_size()
        n = N // args.world
        return dict(
            mode=mode, layout=layout, single_s=t_single, ring_s=t_ring,
            speedup=[a / b for a, b in zip(t_single, t_ring)],
            kv_bytes_per_step=B * H * n * 2 * D * elem, message_s=t_msg,
            grad_bytes_per_step=B * H * n * 2 * D * (8 if dtype == torch.float64 else 4),
            per_rank=[dict(forward=f, backward=b, wait_s=w, cpu_s=c) for f, b, w, c in all_st])

    for mode in args.mode:
        for layout in args.layout:
            results.append(measure(mode, layout))
    control += [control_once(True) / control_once(False) for _ in range(3)]
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(results=results, control=control), f)
    dist.destroy_process_group()


def _med(xs):
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return xs[len(xs) // 2] if len(xs) % 2 else statistics.median(xs), q[0], q[2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp64"])
    p.add_argument("--full", action="store_true", help="no causal mask")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per process (both sides)")
    p.add_argument("--layout", nargs="+", default=["zigzag"], choices=["zigzag", "contiguous"])
    p.add_argument("--mode", nargs="+", default=["fwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--control-n", type=int, default=150, help="matmuls per rank in the control loop")
    args = p.parse_args(argv)

    import torch
    import torch.multiprocessing as mp

    print(f"# ring_bench: {_cpu()}; torch {torch.__version__}; B={args.batch} H={args.heads} N={args.N} "
          f"D={args.head_dim} {args.dtype} {'full' if args.full else 'causal'}; {args.world} ranks x "
          f"{args.threads} thread(s) vs 1 process x {args.threads}; {args.reps} reps, alternated", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.json")
        mp.spawn(_worker, args=(args, _free_port(), out), nprocs=args.world, join=True)
        with open(out) as f:
            saved = json.load(f)
    results, control = saved["results"], saved["control"]
    c = _med(control)
    print(f"# control: {args.world} processes doing a matmul loop split {args.world} ways vs 1 process doing all "
          f"of it: {c[0]:.2f}x [{c[1]:.2f}-{c[2]:.2f}] (before and after the runs; {args.world}x = {args.world} "
          f"free cores; lower = the machine is loaded and no ring can reach {args.world}x)", flush=True)
    print(f"{'mode':7} {'layout':10} {'1 process (s)':>22} {'ring (s)':>22} {'speedup':>20} {'tiles':>7} "
          f"{'kv MB/step':>10} {'msg ms':>7} {'wait s':>7} {'cpu ratio':>9}")
    for r in results:
        s, ring, sp = _med(r["single_s"]), _med(r["ring_s"]), _med(r["speedup"])
        fwd = [x["forward"] for x in r["per_rank"]]
        frac = sum(x["tiles"] for x in fwd) / max(1, sum(x["tiles_dense"] for x in fwd))
        wait = max(statistics.median(x["wait_s"]) for x in r["per_rank"])
        # CPU seconds of the single run over the busiest rank's CPU seconds in the ring: the speedup the ring's
        # work division allows when each process has a core to itself (wall times also carry the machine's load)
        cpu_single = statistics.median(r["per_rank"][0]["cpu_s"]["single"])
        cpu_ring = statistics.median(max(xs) for xs in zip(*(x["cpu_s"]["ring"] for x in r["per_rank"])))
        print(f"{r['mode']:7} {r['layout']:10} {s[0]:8.3f} [{s[1]:.3f}-{s[2]:.3f}] {ring[0]:8.3f} "
              f"[{ring[1]:.3f}-{ring[2]:.3f}] {sp[0]:6.2f}x [{sp[1]:.2f}-{sp[2]:.2f}] {frac:7.1%} "
              f"{r['kv_bytes_per_step'] / 1e6:10.1f} {r['message_s'] * 1e3:7.1f} {wait:7.3f} "
              f"{cpu_single / cpu_ring:8.2f}x")
    for r in results:
        if r["mode"] == "fwd" and r["layout"] == "zigzag" and args.N == 16384 and not args.full:
            sp = _med(r["speedup"])[0]
            print(f"# bar (2 ranks x 1 thread >= 1.6x one process, causal N=16384): {sp:.2f}x -> "
                  f"{'met' if sp >= 1.6 else 'not met'}; control {c[0]:.2f}x"
                  + ("" if c[0] >= 1.8 else " (the machine did not have 2 free cores: re-run when it is quiet)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu=_cpu(), torch=torch.__version__, args=vars(args), control=control, results=results),
                      f, indent=1)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
