"""``qkv check``: every engine available here against the fp64 reference, forward and backward.

The rule is FlashAttention's: an engine passes a case when its error against the fp64 reference is at most
``2 ×`` the error of the same computation done plainly in the input dtype (materialised scores, softmax in that
dtype) ``+ 1e-5`` for the output, and ``3 × ... + 1e-5`` for each gradient (q, k, v and, where present, bias).
Inputs are rounded to the dtype first and the oracle sees exactly those values, upcast.

The plain computation is :func:`qkv.testing.naive_attention` (the semantics written out independently of
the core), and the fp64 reference is also checked against it in fp64 (row ``reference/fp64``): that catches a
wrong oracle, not only a wrong engine.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import torch

from ..testing import ATOL, FWD_FACTOR, GRAD_FACTOR, naive_attention
from .bench.specs import DTYPES, BenchError

__all__ = ["SHAPES", "MASKS", "run_checks", "format_results", "main"]

# (B, Hq, Hkv, Nq, Nk, D, Dv): square, GQA with odd N, MQA with Nq < Nk and odd D, Nq > Nk (empty causal rows)
# with Dv != D, and one spanning several 128-blocks.
SHAPES = [
    (1, 2, 2, 64, 64, 32, 32),
    (2, 4, 2, 37, 37, 40, 40),
    (1, 2, 1, 17, 45, 59, 59),
    (1, 2, 2, 48, 20, 16, 24),
    (1, 2, 2, 200, 200, 64, 64),
]
MASKS = ["none", "causal", "window(6,2)", "causal+window(7)", "document", "prefix(blockmask)",
         "bool tensor", "mask_mod", "mods"]


@dataclass
class Setup:
    kwargs: dict           # for qkv.attention
    visible: torch.Tensor  # (B|1, Hq|1, Nq, Nk) bool, by DESIGN §2
    mods: dict             # score mods for the plain computation


def _setup(mask: str, shape, device, gen) -> Setup:
    import qkv
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    off = Nk - Nq
    i = torch.arange(Nq, device=device)[:, None]
    j = torch.arange(Nk, device=device)[None, :]
    pos = i + off
    full = torch.ones(Nq, Nk, dtype=torch.bool, device=device)
    if mask == "none":
        return Setup({}, full[None, None], {})
    if mask == "causal":
        return Setup({"causal": True}, (j <= pos)[None, None], {})
    if mask == "window(6,2)":
        return Setup({"window": (6, 2)}, ((j >= pos - 6) & (j <= pos + 2))[None, None], {})
    if mask == "causal+window(7)":
        return Setup({"causal": True, "window": (7, 0)}, ((j >= pos - 7) & (j <= pos))[None, None], {})
    if mask == "document":
        ids = torch.arange(Nk, device=device) * 3 // Nk           # 3 packed documents over the keys
        qid = torch.where((pos >= 0) & (pos < Nk), ids[pos.clamp(0, Nk - 1)], torch.full_like(pos, -1))
        return Setup({"mask": qkv.masks.document(ids)}, (qid == ids[None, :])[None, None], {})
    if mask == "prefix(blockmask)":
        P = 5
        bm = qkv.block_mask(qkv.masks.prefix_lm(P), 1, 1, Nq, Nk, block_size=16, device=device)
        return Setup({"mask": bm}, ((j < P) | (j <= pos))[None, None], {})
    if mask == "bool tensor":
        m = torch.rand(B, 1, Nq, Nk, generator=gen).to(device) < 0.7
        m[:, :, Nq // 2] = False                                   # one fully masked row: out 0, grads 0
        return Setup({"mask": m}, m, {})
    if mask == "mask_mod":
        def mm(b, h, q_idx, kv_idx):                               # a plain callable, FlexAttention-style
            return ((q_idx + kv_idx) % 3 != 0) | (kv_idx == 0)
        return Setup({"mask": mm}, mm(0, 0, i, j)[None, None], {})
    if mask == "mods":                                             # softcap -> alibi -> bias -> score_mod
        slopes = torch.linspace(0.1, 0.5, Hq, device=device, dtype=torch.float32)
        bias = torch.randn(1, Hq, Nq, Nk, generator=gen).to(device)

        def sm(s, b, h, q_idx, kv_idx):
            return s - 0.01 * (q_idx - kv_idx).abs()
        return Setup({"causal": True, "softcap": 5.0, "alibi_slopes": slopes, "bias": bias, "score_mod": sm},
                     (j <= pos)[None, None], {"softcap": 5.0, "alibi": slopes, "bias": bias, "score_mod": sm})
    raise ValueError(f"unknown check mask {mask!r}")


def plain_attention(q, k, v, visible, mods: dict | None = None):
    """The semantics done plainly in q's dtype (materialised scores, softmax in that dtype; empty rows -> 0)."""
    mods = dict(mods or {})
    if "alibi" in mods:
        mods["alibi_slopes"] = mods.pop("alibi")
    return naive_attention(q, k, v, mask=visible, compute_dtype=None, **mods)[0]


def _max_err(a, b) -> float:
    if a is None or b is None or a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())


def _run(fn, q, k, v, extra, do):
    """Output and gradients (q, k, v, and bias when it requires grad)."""
    ts = [q, k, v] + ([extra] if extra is not None else [])
    for t in ts:
        t.grad = None
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), [t.grad for t in ts]


def _leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_(True)


def run_checks(device: str = "cpu", dtypes=None, engines=None, shapes=None, masks=None, progress=None):
    """Every (engine, dtype, mask, shape) case (default grid: ``SHAPES`` × ``MASKS``); returns result dicts."""
    import qkv
    shapes = SHAPES if shapes is None else shapes
    masks = MASKS if masks is None else masks
    dtypes = dtypes or (["fp16", "bf16", "fp32"] if device == "cuda" else ["fp32", "bf16"])
    avail = {b.name: (b.available, b.reason) for b in qkv.backends(device)}
    names = engines or (["auto"] + [n for n, (ok, _) in avail.items() if ok])
    results = []
    for shape in shapes:
        B, Hq, Hkv, Nq, Nk, D, Dv = shape
        gen = torch.Generator().manual_seed(hash(shape) % 2**31)
        base = [torch.randn(B, Hq, Nq, D, generator=gen), torch.randn(B, Hkv, Nk, D, generator=gen),
                torch.randn(B, Hkv, Nk, Dv, generator=gen), torch.randn(B, Hq, Nq, Dv, generator=gen)]
        for mask in masks:
            st = _setup(mask, shape, device, gen)
            for dt in dtypes:
                dtype = DTYPES[dt]
                q0, k0, v0, do0 = (t.to(device=device, dtype=dtype) for t in base)
                bias0 = st.kwargs.get("bias")
                bias0 = bias0.to(dtype) if bias0 is not None else None

                def with_bias(kw, b):
                    return {**kw, "bias": b} if b is not None else kw

                # the oracle: qkv's reference in fp64 on the dtype-rounded inputs
                q64, k64, v64 = (_leaf(t, torch.float64) for t in (q0, k0, v0))
                b64 = _leaf(bias0, torch.float64) if bias0 is not None else None
                ref_out, ref_g = _run(lambda q, k, v: qkv.attention(q, k, v, backend="reference",
                                                                    **with_bias(st.kwargs, b64)),
                                      q64, k64, v64, b64, do0.double())
                # the same computation done plainly in the dtype
                qp, kp, vp = (_leaf(t, dtype) for t in (q0, k0, v0))
                bp = _leaf(bias0, dtype) if bias0 is not None else None
                pl_out, pl_g = _run(lambda q, k, v: plain_attention(q, k, v, st.visible,
                                                                    {**st.mods, **({"bias": bp} if bp is not None
                                                                                   else {})}),
                                    qp, kp, vp, bp, do0)
                if dt == dtypes[0]:
                    # the oracle against DESIGN §2 written independently (fp64 plain)
                    qd, kd, vd = (_leaf(t, torch.float64) for t in (q0, k0, v0))
                    bd = _leaf(bias0, torch.float64) if bias0 is not None else None
                    pd_out, pd_g = _run(lambda q, k, v: plain_attention(
                        q, k, v, st.visible, {**st.mods, **({"bias": bd} if bd is not None else {})}),
                        qd, kd, vd, bd, do0.double())
                    e_f = _max_err(ref_out, pd_out)
                    e_g = max(_max_err(a, b) for a, b in zip(ref_g, pd_g))
                    ok = e_f <= 1e-9 and e_g <= 1e-8 and bool(torch.isfinite(ref_out).all())
                    results.append(dict(engine="reference", dtype="fp64", mask=mask, shape=shape,
                                        status="pass" if ok else "FAIL", fwd_err=e_f, fwd_tol=1e-9,
                                        grad_err=e_g, grad_tol=1e-8,
                                        message="" if ok else "fp64 reference disagrees with DESIGN §2"))
                    if progress:
                        progress()
                for name in names:
                    r = dict(engine=name, dtype=dt, mask=mask, shape=shape)
                    qe, ke, ve = (_leaf(t, dtype) for t in (q0, k0, v0))
                    be = _leaf(bias0, dtype) if bias0 is not None else None
                    try:
                        out, g = _run(lambda q, k, v: qkv.attention(q, k, v, backend=name,
                                                                    **with_bias(st.kwargs, be)),
                                      qe, ke, ve, be, do0)
                    except ValueError as e:
                        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                        if name != "auto" and "cannot serve" in msg:
                            r.update(status="n/a", message=msg[:160])
                        else:
                            r.update(status="FAIL", message=f"ValueError: {msg}"[:200])
                        results.append(r)
                        if progress:
                            progress()
                        continue
                    except Exception as e:
                        first = str(e).splitlines()[0] if str(e) else ""
                        r.update(status="FAIL", message=f"{type(e).__name__}: {first}"[:200])
                        results.append(r)
                        if progress:
                            progress()
                        continue
                    fe, ft = _max_err(out, ref_out), FWD_FACTOR * _max_err(pl_out, ref_out) + ATOL
                    ge, gt, worst, wname = 0.0, 1.0, 0.0, ""
                    for gname, a, p, rr in zip(("dq", "dk", "dv", "dbias"), g, pl_g, ref_g):
                        if a is None:
                            r.update(status="FAIL", message=f"{gname} is missing")
                            break
                        e, t = _max_err(a, rr), GRAD_FACTOR * _max_err(p, rr) + ATOL
                        if e / t >= worst:
                            ge, gt, worst, wname = e, t, e / t, gname
                    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(x).all()) for x in g
                                                                     if x is not None)
                    if "status" not in r:
                        ok = finite and fe <= ft and ge <= gt
                        msg = "" if ok else ("non-finite output or gradient" if not finite else
                                             f"over tolerance: out {fe:.2e}/{ft:.2e}, {wname} {ge:.2e}/{gt:.2e}")
                        r.update(status="pass" if ok else "FAIL", fwd_err=fe, fwd_tol=ft, grad_err=ge, grad_tol=gt,
                                 worst_grad=wname, message=msg)
                    results.append(r)
                    if progress:
                        progress()
    return results


def format_results(results, verbose=False) -> str:
    """One row per (engine, dtype, mask) with the worst case over shapes (or one per case with verbose)."""
    groups: dict = {}
    for r in results:
        key = (r["engine"], r["dtype"], r["mask"]) + ((tuple(r["shape"]),) if verbose else ())
        groups.setdefault(key, []).append(r)
    cols = ["engine", "dtype", "mask"] + (["shape (B,Hq,Hkv,Nq,Nk,D,Dv)"] if verbose else []) + \
           ["cases", "fwd err/tol", "grad err/tol", "result", "note"]
    rows = []
    for key, rs in groups.items():
        ran = [r for r in rs if "fwd_err" in r]
        fails = [r for r in rs if r["status"] == "FAIL"]
        na = [r for r in rs if r["status"] == "n/a"]
        fr = max((r["fwd_err"] / r["fwd_tol"] for r in ran), default=None)
        gr = max((r["grad_err"] / r["grad_tol"] for r in ran), default=None)
        status = "FAIL" if fails else ("n/a" if len(na) == len(rs) else "pass")
        note = ""
        if fails:
            f = fails[0]
            note = f"{tuple(f['shape'])}: {f.get('message') or 'over tolerance'}"
        elif na:
            note = f"{len(na)} n/a: {na[0].get('message', '')}"
        rows.append([*map(str, key[:3]), *([str(tuple(key[3]))] if verbose else []),
                     f"{len(ran)}/{len(rs)}", "-" if fr is None else f"{fr:.3f}", "-" if gr is None else f"{gr:.3f}",
                     status, note[:110]])
    widths = [max(len(c), *(len(x[i]) for x in rows)) if rows else len(c) for i, c in enumerate(cols)]

    def fmt(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def main(device=None, dtypes=None, engines=None, json_path=None, verbose=False) -> int:
    """``qkv check``: print the table; 0 if every case passes, 1 otherwise (2 for a bad request)."""
    dev = (device or ("cuda" if torch.cuda.is_available() else "cpu")).lower()
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BenchError(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
        dev = "cuda"
    elif dev != "cpu":
        raise BenchError(f"--device must be cpu or cuda, got {device!r}")
    for d in dtypes or []:
        if d.lower() not in DTYPES:
            raise BenchError(f"unknown dtype {d!r}; choose from fp32, bf16, fp16, fp64")
    import qkv
    known = {b.name for b in qkv.backends(dev)} | {"auto"}
    for e in engines or []:
        if e not in known:
            raise BenchError(f"unknown engine {e!r}; choose from {', '.join(sorted(known))}")
    dts = [d.lower() for d in dtypes] if dtypes else None
    t0 = time.perf_counter()
    bar = None
    try:
        from tqdm import tqdm
        n_eng = len(engines) if engines else 1 + sum(b.available for b in qkv.backends(dev))
        n_dt = len(dts) if dts else (3 if dev == "cuda" else 2)
        bar = tqdm(total=len(SHAPES) * len(MASKS) * (n_dt * n_eng + 1), desc="qkv check", unit="case",
                   file=sys.stderr, leave=False, dynamic_ncols=True)
    except Exception:
        pass
    try:
        results = run_checks(dev, dts, engines, progress=(lambda: bar.update(1)) if bar else None)
    finally:
        if bar:
            bar.close()
    print(f"qkv check on {dev} (torch {torch.__version__}): each engine vs the fp64 reference; pass iff "
          f"err <= {FWD_FACTOR:g}x plain-dtype err + {ATOL:g} (output), {GRAD_FACTOR:g}x (gradients)")
    print(format_results(results, verbose))
    n_fail = sum(r["status"] == "FAIL" for r in results)
    n_pass = sum(r["status"] == "pass" for r in results)
    n_na = sum(r["status"] == "n/a" for r in results)
    print(f"{n_pass} passed, {n_fail} failed, {n_na} not applicable ({time.perf_counter() - t0:.1f} s)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": dev, "results": results}, f, indent=1, default=str)
    return 1 if n_fail else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
