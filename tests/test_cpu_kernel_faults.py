"""No engine reads one byte past an input: every input (q, k, v, and what the CPU kernel's backward reads: the
output gradient and the lse) is placed at the very end of its allocation, followed by a page that faults on
any touch (mmap + mprotect(PROT_NONE), exposed to torch with torch.frombuffer). A read past the end kills the
process, so each case runs in a subprocess and must exit cleanly with results equal to the oracle's."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import qkv
from qkv.engines import cpu_kernel

CHILD = textwrap.dedent(r"""
    import ctypes, json, mmap, sys
    import torch
    import qkv
    from qkv.testing import naive_attention

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    PAGE = mmap.PAGESIZE
    KEEP = []

    def guarded(shape, dtype, values, row_stride=None):
        # a tensor of `shape` whose last element is the last one before a PROT_NONE page; with `row_stride`
        # its rows are that many elements apart (the tail of wider rows), else contiguous
        n_rows = 1
        for s in shape[:-1]:
            n_rows *= s
        D = shape[-1]
        rs = row_stride or D
        elems = (n_rows - 1) * rs + D if n_rows and D else 0
        size = elems * dtype.itemsize
        total = (size + PAGE - 1) // PAGE * PAGE + PAGE
        m = mmap.mmap(-1, total, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert libc.mprotect(base + total - PAGE, PAGE, 0) == 0, ctypes.get_errno()
        KEEP.append(m)
        start = total - PAGE - size
        flat = torch.frombuffer(m, dtype=dtype, count=elems, offset=start) if elems else torch.empty(0, dtype=dtype)
        t = flat.as_strided(shape, _strides(shape, rs)) if elems else flat.view(shape)
        t.copy_(values)
        return t

    def _strides(shape, rs):
        st, acc = [1] * len(shape), rs
        for i in range(len(shape) - 2, -1, -1):
            st[i] = acc
            acc *= shape[i]
        return st

    def run(case):
        B, Hq, Hkv, Nq, Nk, D, Dv = case["shape"]
        dtype = getattr(torch, case["dtype"])
        g = torch.Generator().manual_seed(0)
        vals = [torch.randn(B, Hq, Nq, D, generator=g), torch.randn(B, Hkv, Nk, D, generator=g),
                torch.randn(B, Hkv, Nk, Dv, generator=g)]
        rs = case["row_stride"]
        q, k, v = (guarded(tuple(x.shape), dtype, x.to(dtype), rs and x.shape[-1] + rs) for x in vals)
        kw = case["kw"]
        want, _ = naive_attention(q.double(), k.double(), v.double(), **kw)
        dout = guarded((B, Hq, Nq, Dv), dtype, torch.randn(B, Hq, Nq, Dv, generator=g).to(dtype))
        errs = {}
        for backend, kernel in (("tiled", True), ("tiled", False), ("reference", True), ("auto", True), ("sdpa", True)):
            name = backend + ("" if kernel or backend != "tiled" else "-ops")
            with qkv.options(cpu_kernel=kernel):
                try:
                    out = qkv.attention(q, k, v, backend=backend, **kw)
                except ValueError:
                    continue                                    # sdpa that cannot serve the call
                errs[name] = float((out.double() - want).abs().max()) if out.numel() else 0.0
                # the backward with the inputs (and the output gradient) guarded too
                qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
                o = qkv.attention(qq, kk, vv, backend=backend, **kw)
                torch.autograd.grad(o, (qq, kk, vv), dout)
        # the kernel's own entry points, with its other inputs (lse, the output gradient) guarded as well
        from qkv.core.call import prepare
        from qkv.engines import cpu_kernel
        call = prepare(q, k, v, **kw)
        if cpu_kernel.serves(call):
            out, lse = cpu_kernel.attention_fwd(call)
            lse_g = guarded(tuple(lse.shape), torch.float32, lse)
            out_g = guarded(tuple(out.shape), out.dtype, out)
            cpu_kernel.attention_bwd(call, out_g, lse_g, dout)
            errs["kernel"] = float((out.double() - want).abs().max())
        return errs

    for case in json.loads(sys.argv[1]):
        print("start", case["id"], flush=True)
        print(json.dumps({"id": case["id"], "errs": run(case)}), flush=True)
""")

CASES = [
    dict(shape=(1, 2, 2, 67, 67, 59, 59), dtype="float32", kw={"causal": True}, row_stride=0),
    dict(shape=(1, 2, 1, 33, 70, 40, 24), dtype="float32", kw={"window": [5, 3]}, row_stride=0),
    dict(shape=(2, 2, 2, 1, 45, 7, 7), dtype="float32", kw={}, row_stride=0),
    dict(shape=(1, 1, 1, 80, 80, 64, 64), dtype="float32", kw={"causal": True}, row_stride=8),
    dict(shape=(1, 2, 2, 50, 50, 17, 17), dtype="bfloat16", kw={"window": [7, 0]}, row_stride=0),
    dict(shape=(1, 1, 1, 130, 130, 1, 1), dtype="float32", kw={"causal": True}, row_stride=0),
    dict(shape=(1, 4, 1, 1, 77, 59, 33), dtype="float16", kw={"window": [10, 0]}, row_stride=0),
    dict(shape=(1, 2, 2, 40, 23, 33, 40), dtype="float32", kw={"causal": True}, row_stride=3),
]


def _env():
    src = os.path.dirname(os.path.dirname(os.path.abspath(qkv.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "2"
    return env


@pytest.mark.skipif(sys.platform != "linux", reason="mprotect guard pages: Linux")
def test_no_engine_reads_past_an_input():
    cases = [dict(c, id=f"{c['dtype']}-{'x'.join(map(str, c['shape']))}-{'+'.join(c['kw']) or 'none'}-rs"
                        f"{c['row_stride']}") for c in CASES]
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True,
                       env=_env(), timeout=600)
    started = [l.split()[1] for l in r.stdout.splitlines() if l.startswith("start ")]
    assert r.returncode == 0, f"exit {r.returncode} in case {started[-1] if started else '?'} (a negative " \
                              f"status is the signal: -11 = a read past the end)\n{r.stderr[-3000:]}"
    results = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert len(results) == len(CASES)
    for res, case in zip(results, CASES):
        errs = res["errs"]
        tol = {"bfloat16": 1e-2, "float16": 2e-3}.get(case["dtype"], 1e-4)        # rounding to the dtype
        assert errs and all(e <= tol for e in errs.values()), res
        if cpu_kernel.available()[0]:
            assert "kernel" in errs, f"the CPU kernel did not serve {res['id']}"


def test_guard_page_faults_when_touched():
    """The guard itself: reading one element past such a tensor kills the process (so the test can fail)."""
    code = CHILD.split("def run(case)")[0] + textwrap.dedent("""
        t = guarded((4, 16), torch.float32, torch.ones(4, 16))
        print(float(t.sum()))
        print(ctypes.c_float.from_address(t.data_ptr() + t.numel() * 4 - 4).value)   # the last element: fine
        print(ctypes.c_float.from_address(t.data_ptr() + t.numel() * 4).value)       # one past it: faults
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.stdout.splitlines()[:2] == ["64.0", "1.0"]
    assert r.returncode < 0, (r.returncode, r.stdout, r.stderr[-500:])
