"""Worker processes for tests/test_distributed.py: real gloo process groups on 127.0.0.1.

``spawn(scenario, world, timeout_s)`` starts ``world`` processes (torch.multiprocessing, spawn), each runs the
scenario's cases and saves its results (plain Python values) to a file; the parent returns {rank: results}.
One spawn runs many cases: starting processes is the expensive part on a 2-core machine.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import tempfile
import time
import traceback

import torch

F64 = torch.float64

# (name, arguments): the bar's cases, run on the 4-rank world and on 2-rank subgroups
BAR = [
    ("causal zigzag", dict(layout="zigzag", causal=True)),
    ("causal contiguous", dict(layout="contiguous", causal=True)),
    ("full contiguous", dict(layout="contiguous")),
    ("window contiguous", dict(layout="contiguous", window=(255, 0), N=1024)),
    ("window zigzag", dict(layout="zigzag", window=(255, 0), N=1024)),
    ("gqa", dict(layout="zigzag", causal=True, Hq=4, Hkv=1)),
    ("document", dict(layout="zigzag", mask="document")),
]
# more of the semantics, on the 4-rank world
EXTRA = [
    ("full zigzag", dict(layout="zigzag")),
    ("document contiguous", dict(layout="contiguous", mask="document")),
    ("document fn", dict(layout="contiguous", causal=True, mask="document_fn")),
    ("blockmask", dict(layout="zigzag", mask="blockmask", causal=True)),
    ("blockmask tensor", dict(layout="contiguous", mask="blockmask_tensor")),
    ("bool tensor", dict(layout="zigzag", mask="tensor")),
    ("alibi softcap window", dict(layout="zigzag", window=(40, 24), alibi=True, softcap=2.0, scale=0.3)),
    ("lse grads", dict(layout="zigzag", causal=True, lse=True)),
    ("odd chunks dv", dict(layout="zigzag", causal=True, N=296, Dv=11, D=9)),
    ("reference engine", dict(layout="contiguous", causal=True, backend="reference", N=256)),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(scenario: str, world: int, timeout_s: float = 60.0, wait_s: float = 300.0) -> dict:
    """Run ``scenario`` on ``world`` ranks; {rank: results} of the ranks that wrote any."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_main, args=(world, _free_port(), out, scenario, timeout_s), nprocs=world,
                                 join=False, start_method="spawn")
        end = time.time() + wait_s
        for p in ctx.processes:
            p.join(max(0.0, end - time.time()))
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
        res = {}
        for r in range(world):
            path = os.path.join(out, f"rank{r}.pt")
            if os.path.exists(path):
                res[r] = torch.load(path)
        return res


def _main(rank, world, port, out, scenario, timeout_s):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    # the world group waits long (processes start at different times on a loaded machine); scenarios make
    # groups of their own with the timeout under test
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    res = {}
    try:
        globals()["_" + scenario](rank, world, res, timeout_s, out)
    except BaseException:
        res["crash"] = traceback.format_exc()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    if scenario == "failures":
        os._exit(0)               # the group has dead members: no orderly shutdown
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- the cases

def _inputs(c, W, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv = c.get("B", 2), c.get("Hq", 2), c.get("Hkv", c.get("Hq", 2))
    N, D, Dv = c.get("N", 512), c.get("D", 16), c.get("Dv", c.get("D", 16))
    Q = torch.randn(B, Hq, N, D, generator=g, dtype=F64).to(dtype)
    K = torch.randn(B, Hkv, N, D, generator=g, dtype=F64).to(dtype)
    V = torch.randn(B, Hkv, N, Dv, generator=g, dtype=F64).to(dtype)
    dO = torch.randn(B, Hq, N, Dv, generator=g, dtype=F64).to(dtype)
    dL = torch.randn(B, Hq, N, generator=g, dtype=F64)
    return Q, K, V, dO, dL, g


def _kwargs(c, Q, g):
    import qkv
    B, Hq, N = Q.shape[0], Q.shape[1], Q.shape[2]
    kw = {k: c[k] for k in ("causal", "window", "softcap", "scale") if k in c}
    mask = c.get("mask")
    ids = torch.sort(torch.randint(0, 6, (B, N), generator=g)).values
    if mask == "document":
        kw["mask"] = qkv.masks.document(ids)
    elif mask == "document_fn":           # a plain callable: no block formula, evaluated per element
        kw["mask"] = lambda b, h, qi, ki: ids[b, qi] == ids[b, ki]
    elif mask == "blockmask":
        kw["mask"] = qkv.block_mask(qkv.masks.document(ids), B, 1, N, N, block_size=64)
    elif mask in ("tensor", "blockmask_tensor"):
        t = torch.rand(B, 1, N, N, generator=g) < 0.3
        t[..., 7, :] = False              # a row that sees nothing
        kw["mask"] = t if mask == "tensor" else qkv.block_mask(t, B, 1, N, N)
    if c.get("alibi"):
        kw["alibi_slopes"] = qkv.scores.alibi_slopes(Hq)
    return kw


def _run_case(c, group, W, dtype=F64, count=False):
    """Ring vs single-process qkv.attention on the gathered tensors; returns errors and counts."""
    import qkv
    from qkv.distributed import gather_sequence, ring_attention, ring_stats, shard_sequence
    Q, K, V, dO, dL, g = _inputs(c, W, dtype)
    kw = _kwargs(c, Q, g)
    L, lse = c["layout"], c.get("lse", False)
    leaves = [t.clone().requires_grad_() for t in (Q, K, V)]
    ref, ref_lse = qkv.attention(*leaves, return_lse=True, **kw)
    loss = (ref * dO).sum()
    if lse:                               # a loss that reads the lse too: its gradient flows back
        loss = loss + (ref_lse.double() * dL).sum()
    loss.backward()
    q, k, v = (shard_sequence(t, layout=L, group=group).detach().requires_grad_() for t in (Q, K, V))
    with ring_stats() as st:
        out, out_lse = ring_attention(q, k, v, layout=L, group=group, return_lse=True,
                                      backend=c.get("backend", "auto"), **kw)
        loss = (out * shard_sequence(dO, layout=L, group=group)).sum()
        if lse:
            loss = loss + (out_lse.double() * shard_sequence(dL, layout=L, group=group)).sum()
        loss.backward()
    res = dict(out=(out - shard_sequence(ref, layout=L, group=group)).abs().max().item())
    fin = torch.isfinite(ref_lse)
    ref_lse_local = shard_sequence(ref_lse, layout=L, group=group)
    res["lse"] = (out_lse - ref_lse_local)[torch.isfinite(ref_lse_local)].abs().max().item()
    res["lse_inf_match"] = bool(torch.equal(torch.isinf(out_lse), torch.isinf(ref_lse_local)))
    res["rows_without_keys"] = int((~fin).sum())
    for name, t, R in (("dq", q, leaves[0]), ("dk", k, leaves[1]), ("dv", v, leaves[2])):
        res[name] = (gather_sequence(t.grad, layout=L, group=group) - R.grad).abs().max().item()
    res["dtype"] = str(out.dtype)
    res["forward"], res["backward"] = dict(st.forward.__dict__), dict(st.backward.__dict__)
    return res


def _random_cases(n: int, W: int) -> list:
    """Random calls (the same on every rank: a fixed seed): layouts, lengths down to one position per chunk,
    odd head dims, GQA, windows, masks and mods."""
    g = torch.Generator().manual_seed(1234)

    def pick(xs):
        return xs[int(torch.randint(len(xs), (1,), generator=g))]

    out = []
    for _ in range(n):
        L = pick(["contiguous", "zigzag"])
        N = 2 * W * int(torch.randint(1, 40, (1,), generator=g))
        Hq, Hkv = pick([(2, 2), (4, 2), (3, 1)])
        D = pick([3, 8, 17])
        c = dict(layout=L, N=N, B=pick([1, 2]), Hq=Hq, Hkv=Hkv, D=D, Dv=pick([D, 5]), causal=pick([True, False]))
        if pick([0, 1]):
            c["window"] = (pick([None, 0, 5, N // 3]), pick([None, 0, 7, N // 2]))
        if pick([0, 0, 1]):
            c["mask"] = pick(["document", "tensor", "document_fn"])
        if pick([0, 0, 1]):
            c["alibi"] = True
        if pick([0, 0, 1]):
            c["softcap"] = 3.0
        out.append(c)
    return out


def _fa_case(c, group, W, dtype):
    """FlashAttention's rule for a low-precision ring (gathered out, lse, grads vs the fp64 oracle)."""
    from qkv.distributed import gather_sequence, ring_attention, shard_sequence
    from qkv.testing import assert_fa_close, run_naive
    Q, K, V, dO, _, g = _inputs(c, W, dtype)
    kw = _kwargs(c, Q, g)
    oracle = run_naive(Q, K, V, compute_dtype=F64, grad_out=dO, **kw)
    plain = run_naive(Q, K, V, compute_dtype=None, grad_out=dO, **kw)
    L = c["layout"]
    q, k, v = (shard_sequence(t, layout=L, group=group).detach().requires_grad_() for t in (Q, K, V))
    out, lse = ring_attention(q, k, v, layout=L, group=group, return_lse=True, **kw)
    out.backward(shard_sequence(dO, layout=L, group=group))
    eng = dict(out=gather_sequence(out.detach(), layout=L, group=group),
               lse=gather_sequence(lse.detach(), layout=L, group=group),
               dq=gather_sequence(q.grad, layout=L, group=group), dk=gather_sequence(k.grad, layout=L, group=group),
               dv=gather_sequence(v.grad, layout=L, group=group))
    try:
        assert_fa_close(eng, oracle, plain, keys=("out", "lse", "dq", "dk", "dv"))
        return "ok"
    except AssertionError as e:
        return str(e)


def _expect_error(fn):
    try:
        fn()
    except Exception as e:
        return (type(e).__name__, str(e))
    return None


def _cases(rank, world, res, timeout_s, out):
    import torch.distributed as dist

    import qkv
    from qkv.distributed import gather_sequence, ring_attention, ring_stats, sequence_positions, shard_sequence
    W = world
    pairs = [dist.new_group([0, 1], timeout=datetime.timedelta(seconds=timeout_s)),
             dist.new_group([2, 3], timeout=datetime.timedelta(seconds=timeout_s))]
    mine = pairs[rank // 2]

    def record(key, fn):
        try:
            res[key] = fn()
        except Exception:
            res[key] = {"error": traceback.format_exc()}

    t0 = time.time()
    for name, c in BAR:
        record(("world", name), lambda: _run_case(c, None, W))
        record(("pair", name), lambda: _run_case(c, mine, 2))
    for name, c in EXTRA:
        record(("world", name), lambda: _run_case(c, None, W))
    for i, c in enumerate(_random_cases(int(os.environ.get("QKV_RING_EXAMPLES", "8")), W)):
        record(("random", i), lambda: dict(_run_case(c, None, W), case=c))
    for dtype in (torch.float32, torch.bfloat16):
        record(("fa", str(dtype)), lambda: _fa_case(dict(layout="zigzag", causal=True, N=512, D=32), None, W, dtype))
    res["cases_s"] = time.time() - t0

    # counting: big enough that a chunk is several 128-tiles
    for L in ("zigzag", "contiguous"):
        c = dict(layout=L, causal=True, N=4096, B=1, Hq=1, D=8)
        Q, K, V, dO, _, g = _inputs(c, W, torch.float32)
        q, k, v = (shard_sequence(t, layout=L).detach().requires_grad_() for t in (Q, K, V))
        with ring_stats() as st:
            ring_attention(q, k, v, causal=True, layout=L).backward(shard_sequence(dO, layout=L))
        res[("count", L)] = dict(forward=dict(st.forward.__dict__), backward=dict(st.backward.__dict__),
                                 kv_bytes=(k.numel() + v.numel()) * 4)

    # mismatched calls: every rank must raise, and the group stays usable afterwards
    Q, K, V, _, _, _ = _inputs(dict(N=512), W)
    q, k, v = (shard_sequence(t, layout="contiguous") for t in (Q, K, V))
    extra_rows = 2 if rank == 3 else 0
    res["mismatch shape"] = _expect_error(lambda: ring_attention(
        torch.cat([q, q[:, :, :extra_rows]], 2), torch.cat([k, k[:, :, :extra_rows]], 2),
        torch.cat([v, v[:, :, :extra_rows]], 2), causal=True))
    res["mismatch layout"] = _expect_error(lambda: ring_attention(
        q, k, v, causal=True, layout="zigzag" if rank == 1 else "contiguous"))
    res["bad argument"] = _expect_error(lambda: ring_attention(
        q, k, v, window=(-1, 0) if rank == 2 else (4, 0)))
    res["mismatch gather"] = _expect_error(lambda: gather_sequence(q[:, :, :8 if rank == 0 else 16]))
    res["blockmask wrong size"] = _expect_error(lambda: ring_attention(
        q, k, v, mask=qkv.block_mask(qkv.masks.causal(), 1, 1, 128, 128)))
    res["after errors"] = _run_case(dict(layout="zigzag", causal=True, N=256), None, W)

    # layouts
    x = torch.arange(2 * 3 * 16 * 5, dtype=F64).view(2, 3, 16, 5)
    lay = {}
    for L in ("contiguous", "zigzag"):
        for dim in (1, 2):
            xs = x if dim == 2 else x.transpose(1, 2).contiguous()
            s = shard_sequence(xs, layout=L, dim=dim)
            lay[(L, dim)] = (bool(torch.equal(gather_sequence(s, layout=L, dim=dim), xs)),
                             tuple(s.shape))
        pos = sequence_positions(4, layout=L)
        lay[(L, "positions")] = pos.tolist()
        lay[(L, "shard arange")] = shard_sequence(torch.arange(16), layout=L, dim=0).tolist()
    res["layouts"] = lay
    res["shard not divisible"] = _expect_error(lambda: shard_sequence(torch.zeros(1, 1, 12, 2), layout="zigzag"))

    # SelfAttention with a process group: the local shard of the single-process module's output and, summed
    # over ranks, the same parameter gradients
    for L, grp, key in (("zigzag", None, "world"), ("contiguous", mine, "pair")):
        record(("module", key), lambda: _module_case(L, grp))


def _module_case(layout, group):
    import torch.distributed as dist

    import qkv
    from qkv.distributed import shard_sequence
    torch.manual_seed(0)
    single = qkv.SelfAttention(32, 4, n_kv_heads=2, causal=True, rope=True).double()
    ring = qkv.SelfAttention(32, 4, n_kv_heads=2, causal=True, rope=True, process_group=group or dist.group.WORLD,
                             sequence_layout=layout).double()
    ring.load_state_dict(single.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 128, 32, generator=g, dtype=F64)
    dy = torch.randn(2, 128, 32, generator=g, dtype=F64)
    y = single(x)
    y.backward(dy)
    xl = shard_sequence(x, layout=layout, group=group, dim=1)
    yl = ring(xl)
    yl.backward(shard_sequence(dy, layout=layout, group=group, dim=1))
    err = (yl - shard_sequence(y, layout=layout, group=group, dim=1)).abs().max().item()
    gerr = 0.0
    for p1, p2 in zip(single.parameters(), ring.parameters()):
        gsum = p2.grad.clone()
        dist.all_reduce(gsum, group=group)
        gerr = max(gerr, (gsum - p1.grad).abs().max().item())
    no_cache = _expect_error(lambda: ring(xl, kv_cache=ring.new_cache(2, 512)))
    return dict(out=err, grads=gerr, kv_cache=no_cache)


# ------------------------------------------------------------------------------------------- failures

class _Dying:
    """An engine that kills its own process at its n-th block (a rank dying mid-ring)."""

    def __init__(self, rank, at):
        from qkv.engines.base import Engine
        from qkv.engines.tiled import ENGINE as tiled

        class Dying(Engine):
            name = "dying"

            def forward(self, call):
                _Dying.calls += 1
                if rank == at[0] and _Dying.calls >= at[1]:
                    os.kill(os.getpid(), signal.SIGKILL)
                return tiled.forward(call)

        self.engine = Dying()

    calls = 0


def _failures(rank, world, res, timeout_s, out):
    """Ranks 1 and 3 die (1 before its call, 3 in the backward, when rank 2 waits for its keys and gradients);
    rank 2 lives but never calls the ring of
    group C = {0, 2}. Ranks 0 and 2 record how long each ring call took to raise."""
    import torch.distributed as dist

    import qkv
    from qkv.distributed import ring_attention
    td = datetime.timedelta(seconds=timeout_s)
    A, B, C = dist.new_group([0, 1], timeout=td), dist.new_group([2, 3], timeout=td), dist.new_group([0, 2], timeout=td)
    qkv.dispatch.register(_Dying(rank, (3, 3)).engine)     # rank 3's third block: its first in the backward
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g).requires_grad_() for _ in range(3))
    dist.barrier()

    def timed(**kw):
        t0 = time.time()
        err = _expect_error(lambda: ring_attention(q, k, v, causal=False, **kw).sum().backward())
        return dict(error=err, seconds=time.time() - t0)

    done = os.path.join(out, "rank0.done")
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    elif rank == 0:
        res["dead before the call"] = timed(group=A)
        res["never calls"] = timed(group=C)
        open(done, "w").close()
    elif rank == 3 or rank == 2:
        res["dies mid-ring"] = timed(group=B, backend="dying")
        end = time.time() + timeout_s + 10
        while rank == 2 and not os.path.exists(done) and time.time() < end:
            time.sleep(0.1)               # alive, but never joins group C's call, until rank 0 has given up
