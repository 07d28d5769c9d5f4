"""qkv's test oracle and FlashAttention's tolerance rule — public, so that the tests, ``qkv check`` and users
testing an attention implementation of their own share one definition.

The oracle is the semantics of ``docs/semantics.md`` written out naively in plain torch; nothing here uses
qkv's engines or core, so that expected values come from an independent implementation (a test can fail).

* ``naive_attention(..., compute_dtype=torch.float64)`` — the oracle (everything upcast to fp64).
* ``naive_attention(..., compute_dtype=None)`` — the "plain" computation: the same math done naively
  entirely in the input dtype (no fp32 upcast). Its error against the oracle sets the tolerance
  (FlashAttention's rule: an engine's error ≤ 2× the plain error, 3× for gradients, + 1e-5; ``check_fa``).
* ``compare(backend, q, k, v, ...)`` runs one of qkv's engines and asserts the rule on out, lse and gradients.

Index conventions (FlexAttention's): a mask_mod / score_mod receives broadcast int64 index tensors
``b: (B,1,1,1)``, ``h: (1,H,1,1)``, ``q_idx: (1,1,Nq,1)``, ``kv_idx: (1,1,1,Nk)``.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["naive_attention", "visibility", "eval_mask_mod", "index_grids", "alibi_slopes_paper", "leaf",
           "run_naive", "max_err", "check_fa", "assert_fa_close", "make_qkv", "run_engine", "compare",
           "FWD_FACTOR", "GRAD_FACTOR", "ATOL"]

# --------------------------------------------------------------------------------------------------
# visibility
# --------------------------------------------------------------------------------------------------


def index_grids(B, H, Nq, Nk, device="cpu"):
    b = torch.arange(B, device=device, dtype=torch.int64).view(B, 1, 1, 1)
    h = torch.arange(H, device=device, dtype=torch.int64).view(1, H, 1, 1)
    qi = torch.arange(Nq, device=device, dtype=torch.int64).view(1, 1, Nq, 1)
    kj = torch.arange(Nk, device=device, dtype=torch.int64).view(1, 1, 1, Nk)
    return b, h, qi, kj


def eval_mask_mod(mask_mod, B, H, Nq, Nk, device="cpu"):
    """Evaluate a mask_mod on the full (B, H, Nq, Nk) index grid -> bool tensor of that shape."""
    b, h, qi, kj = index_grids(B, H, Nq, Nk, device)
    m = mask_mod(b, h, qi, kj)
    m = torch.as_tensor(m, device=device)
    return torch.broadcast_to(m.to(torch.bool), (B, H, Nq, Nk)).clone()


def visibility(B, H, Nq, Nk, *, causal=False, window=None, mask=None, device="cpu"):
    """bool (B, H, Nq, Nk): True where query i may attend key j (DESIGN §2, all rules ANDed).

    ``mask`` may be a bool tensor broadcastable to (B, H, Nq, Nk) or a mask_mod callable.
    """
    b, h, qi, kj = index_grids(B, H, Nq, Nk, device)
    off = Nk - Nq
    vis = torch.ones(B, H, Nq, Nk, dtype=torch.bool, device=device)
    if causal:
        vis &= kj <= qi + off
    if window is not None:
        left, right = window
        if causal:
            right = 0
        if left is not None:
            vis &= kj >= qi + off - left
        if right is not None:
            vis &= kj <= qi + off + right
    if mask is not None:
        if callable(mask):
            vis &= eval_mask_mod(mask, B, H, Nq, Nk, device)
        else:
            vis &= torch.broadcast_to(mask.to(device=device, dtype=torch.bool), (B, H, Nq, Nk))
    return vis


# --------------------------------------------------------------------------------------------------
# reference attention
# --------------------------------------------------------------------------------------------------


def alibi_slopes_paper(n_heads: int) -> torch.Tensor:
    """ALiBi slopes as in Press et al. (and the authors' reference code), fp64 (n_heads,)."""

    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * (start**i) for i in range(n)]

    if math.log2(n_heads).is_integer():
        s = pow2(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        s = pow2(closest) + pow2(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(s, dtype=torch.float64)


def naive_attention(
    q,
    k,
    v,
    *,
    causal=False,
    window=None,
    mask=None,
    bias=None,
    score_mod: Callable | None = None,
    alibi_slopes=None,
    softcap=None,
    scale=None,
    compute_dtype=torch.float64,
    dropout_mask=None,
    dropout_p=0.0,
    return_probs=False,
):
    """Naive attention with the full DESIGN §2 semantics.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv).  Returns ``(out, lse)`` in compute_dtype
    (out: (B, Hq, Nq, Dv); lse: (B, Hq, Nq), natural log, -inf on rows with no visible key), or
    ``(out, lse, probs)`` with ``return_probs``.  ``compute_dtype=None`` computes in q's dtype.
    Differentiable w.r.t. every input (use fresh leaves cast to compute_dtype for the oracle). NaN and inf in
    the inputs count only where a row sees them: a key a row cannot see (hidden, or a -inf score) adds nothing
    to it whatever its value, and a row that sees no key is 0 (forward; gradients of NaN inputs are autograd's).
    ``dropout_mask``: optional bool keep-mask (B, Hq, Nq, Nk); kept probabilities are scaled 1/(1-p).
    """
    cd = q.dtype if compute_dtype is None else compute_dtype
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    g = Hq // Hkv
    if g > 1:
        kc = kc.repeat_interleave(g, dim=1)
        vc = vc.repeat_interleave(g, dim=1)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    b, h, qi, kj = index_grids(B, Hq, Nq, Nk, q.device)
    if alibi_slopes is not None:
        sl = alibi_slopes.to(device=q.device, dtype=cd)
        sl = sl.view(1, Hq, 1, 1) if sl.dim() == 1 else sl.view(B, Hq, 1, 1)
        dist = (qi + (Nk - Nq) - kj).abs().to(cd)
        s = s - sl * dist
    if bias is not None:
        bias_c = bias.to(cd)
        s = torch.where(bias_c == float("-inf"), bias_c, s + bias_c)   # a -inf bias hides its key, whatever the score
    if score_mod is not None:
        s = score_mod(s, b, h, qi, kj).to(cd)  # a user's mod may promote (e.g. fp32 constants)
    s = torch.broadcast_to(s, (B, Hq, Nq, Nk))
    vis = visibility(B, Hq, Nq, Nk, causal=causal, window=window, mask=mask, device=q.device)
    s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach() if Nk > 0 else torch.full((B, Hq, Nq, 1), float("-inf"), dtype=cd)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m_safe)
    l = p.sum(dim=-1, keepdim=True)
    empty = l == 0
    l_safe = torch.where(empty, torch.ones_like(l), l)
    probs = p / l_safe
    pd = probs
    if dropout_mask is not None:
        pd = torch.where(dropout_mask, probs / (1.0 - dropout_p), torch.zeros_like(probs))
    if bool(torch.isfinite(vc).all()):
        out = torch.matmul(pd, vc)
    else:
        # Keys a row cannot see never touch it: a zero probability (hidden key, -inf score, dropped) adds
        # nothing, even against a NaN or infinite value (a matmul would add 0·NaN = NaN).
        terms = pd.unsqueeze(-1) * vc.unsqueeze(-3)                   # (B, H, Nq, Nk, Dv)
        out = torch.where((pd != 0).unsqueeze(-1), terms, torch.zeros_like(terms)).sum(-2)
    lse = torch.where(empty, torch.full_like(l, float("-inf")), m_safe + torch.log(l_safe)).squeeze(-1)
    if return_probs:
        return out, lse, probs
    return out, lse


def leaf(t, dtype=None):
    """A fresh leaf copy (optionally cast) with requires_grad set like the source."""
    x = t.detach().to(dtype if dtype is not None else t.dtype).clone()
    return x.requires_grad_(t.requires_grad)


def run_naive(q, k, v, *, compute_dtype, bias=None, grad_out=None, **kw):
    """Run naive attention on fresh leaves; returns dict(out, lse, dq, dk, dv, dbias)."""
    cd = compute_dtype if compute_dtype is not None else q.dtype
    need_grad = grad_out is not None
    ql, kl, vl = (leaf(t, cd).requires_grad_(need_grad) for t in (q, k, v))
    bl = None
    if bias is not None:
        bl = leaf(bias, cd).requires_grad_(need_grad and bias.requires_grad)
    out, lse = naive_attention(ql, kl, vl, bias=bl, compute_dtype=cd, **kw)
    res = {"out": out.detach(), "lse": lse.detach()}
    if need_grad:
        out.backward(grad_out.to(cd))
        res.update(dq=ql.grad, dk=kl.grad, dv=vl.grad, dbias=None if bl is None else bl.grad)
    return res


# --------------------------------------------------------------------------------------------------
# the FlashAttention tolerance rule
# --------------------------------------------------------------------------------------------------


#: FlashAttention's factors: an engine may be this many times as far from the fp64 oracle as the plain
#: same-dtype computation (forward / gradients), plus ATOL.
FWD_FACTOR, GRAD_FACTOR, ATOL = 2.0, 3.0, 1e-5


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def check_fa(name, engine, oracle, plain, factor=FWD_FACTOR, atol=ATOL):
    """Return an error message ('' if fine) for FlashAttention's rule.

    err_engine = max|engine - oracle_fp64|, err_plain = max|plain(input dtype) - oracle_fp64|;
    require err_engine <= factor * err_plain + atol.  -inf entries (lse of empty rows) must coincide.
    If the plain computation is non-finite (overflow inputs; ``compare`` substitutes the fp32 naive
    computation before it gets here), the bound becomes ``factor`` times the error of merely rounding the
    oracle to the engine's dtype plus one ulp of its magnitude in that dtype.
    err_plain is floored at one unit of the result's dtype at the oracle's magnitude (``eps · max|oracle|``):
    on a handful of elements the plain computation can land on the grid point next to the exact value by luck
    (bf16, 3 keys: 4.7e-5 where one bf16 step is 9.8e-4), a yardstick no engine that rounds differently could
    meet; on tensors of any size the plain error is already above that floor.
    """
    if engine is None:
        return f"{name}: engine returned None (expected a tensor)"
    if tuple(engine.shape) != tuple(oracle.shape):
        return f"{name}: shape {tuple(engine.shape)} != expected {tuple(oracle.shape)}"
    if engine.numel() == 0:
        return ""
    e, o = engine.detach().double().cpu(), oracle.detach().double().cpu()
    if torch.isnan(e).any():
        return f"{name}: engine has NaN"
    o_inf = torch.isinf(o)
    if not torch.equal(torch.isinf(e), o_inf) or not torch.equal(e[o_inf], o[o_inf]):
        return f"{name}: infinities differ (engine {int(torch.isinf(e).sum())}, oracle {int(o_inf.sum())})"
    fin = ~o_inf
    if not fin.any():
        return ""
    err_engine = (e[fin] - o[fin]).abs().max().item()
    p = plain.detach().double().cpu()
    pf = p[fin]
    if torch.isfinite(pf).all():
        err_plain = (pf - o[fin]).abs().max().item()
        unit = torch.finfo(engine.dtype).eps * o[fin].abs().max().item() if engine.dtype.is_floating_point else 0.0
        bound = factor * max(err_plain, unit) + atol
    else:  # plain overflowed: measure against rounding the oracle to the engine's dtype
        rnd = (o[fin].to(engine.dtype).double() - o[fin]).abs().max().item()
        ulp = torch.finfo(engine.dtype).eps * o[fin].abs().max().item()
        err_plain = float("nan")
        bound = factor * (rnd + ulp) + atol
    if not err_engine <= bound:
        return f"{name}: err {err_engine:.3e} > bound {bound:.3e} (plain err {err_plain:.3e})"
    return ""


def assert_fa_close(engine: dict, oracle: dict, plain: dict, keys=("out", "lse"), grad_factor=GRAD_FACTOR,
                    fwd_factor=FWD_FACTOR):
    """Apply the FlashAttention rule to each named result (forward 2x, gradients 3x)."""
    msgs = []
    for key in keys:
        f = grad_factor if key.startswith("d") else fwd_factor
        if oracle.get(key) is None:
            continue
        m = check_fa(key, engine.get(key), oracle[key], plain[key], factor=f)
        if m:
            msgs.append(m)
    assert not msgs, "; ".join(msgs)


# --------------------------------------------------------------------------------------------------
# running an engine of qkv and comparing it (qkv imported lazily: the oracle above never uses it)
# --------------------------------------------------------------------------------------------------


def make_qkv(B, Hq, Hkv, Nq, Nk, D, Dv=None, dtype=torch.float32, device="cpu", seed=0, scale_in=1.0):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = (torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64) * scale_in).to(dtype).to(device)
    k = (torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64) * scale_in).to(dtype).to(device)
    v = torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=torch.float64).to(dtype).to(device)
    return q, k, v


def run_engine(backend, q, k, v, *, bias=None, grad_out=None, return_lse=True, **kw):
    """qkv.attention on fresh leaves; returns dict(out, lse, dq, dk, dv, dbias) (lse None without it)."""
    import qkv

    need_grad = grad_out is not None
    ql, kl, vl = (leaf(t).requires_grad_(need_grad) for t in (q, k, v))
    bl = None
    if bias is not None:
        bl = leaf(bias).requires_grad_(need_grad and bias.requires_grad)
    res = qkv.attention(ql, kl, vl, bias=bl, return_lse=return_lse, backend=backend, **kw)
    out, lse = res if return_lse else (res, None)
    assert isinstance(out, torch.Tensor), f"attention returned {type(out).__name__}"
    res = {"out": out.detach(), "lse": None if lse is None else lse.detach(), "out_dtype": out.dtype,
           "lse_dtype": None if lse is None else lse.dtype}
    if need_grad:
        out.backward(grad_out)
        res.update(dq=ql.grad, dk=kl.grad, dv=vl.grad, dbias=None if bl is None else bl.grad)
    return res


def compare(backend, q, k, v, *, grad=False, bias=None, seed=1, check_lse=True, oracle_mask=None,
            oracle_kw=None, **kw):
    """Run ``backend`` and the two naive computations; assert FlashAttention's rule on out/lse(/grads).

    Also checks the dtype contract: out has q's dtype, lse is fp32 (DESIGN §2).  ``oracle_mask`` replaces
    ``mask`` for the naive computations (my own definition of a qkv mask / BlockMask); ``oracle_kw``
    overrides other keywords for them.  Returns (engine, oracle, plain) dicts.
    """
    okw = dict(kw)
    okw.pop("dropout_p", None)
    okw.pop("generator", None)
    if oracle_mask is not None:
        okw["mask"] = oracle_mask
    if oracle_kw:
        okw.update(oracle_kw)
    grad_out = None
    if grad:
        g = torch.Generator().manual_seed(seed)
        B, Hq, Nq, _ = q.shape
        grad_out = torch.randn(B, Hq, Nq, v.shape[-1], generator=g, dtype=torch.float64).to(q.device, q.dtype)
    ora = run_naive(q, k, v, compute_dtype=torch.float64, bias=bias, grad_out=grad_out, **okw)
    pla = run_naive(q, k, v, compute_dtype=None, bias=bias, grad_out=grad_out, **okw)
    if q.dtype in (torch.float16, torch.bfloat16):
        # Overflow inputs: where the plain same-dtype computation is not finite (e.g. fp16 scores over
        # 65504) the rule has no yardstick; use the plain computation upcast to fp32 instead, with each
        # result rounded to the dtype the engine returns it in (lse stays fp32).
        bad = [key for key, val in pla.items()
               if val is not None and not torch.equal(torch.isfinite(val), torch.isfinite(ora[key]))]
        if bad:
            p32 = run_naive(q, k, v, compute_dtype=torch.float32, bias=bias, grad_out=grad_out, **okw)
            for key in bad:
                pla[key] = p32[key] if key == "lse" else p32[key].to(q.dtype)
    # reference/tiled: one call with return_lse=True.  auto/sdpa: return_lse changes what auto may pick
    # (SDPA returns no lse), so out and grads come from a plain call and the lse from a second one.
    plain_call = backend in ("auto", "sdpa")
    eng = run_engine(backend, q, k, v, bias=bias, grad_out=grad_out, return_lse=not plain_call, **kw)
    if plain_call and check_lse and backend == "auto":
        eng2 = run_engine(backend, q, k, v, bias=bias, return_lse=True, **kw)
        eng["lse"], eng["lse_dtype"] = eng2["lse"], eng2["lse_dtype"]
        assert_fa_close(eng2, ora, pla, keys=("out",))
    elif plain_call:
        check_lse = False
    B, Hq, Nq, _ = q.shape
    assert eng["out_dtype"] == q.dtype, f"out dtype {eng['out_dtype']} != q dtype {q.dtype}"
    assert tuple(eng["out"].shape) == (B, Hq, Nq, v.shape[-1])
    if check_lse:
        assert eng["lse_dtype"] == torch.float32, f"lse dtype {eng['lse_dtype']} (DESIGN: fp32)"
    keys = ["out"] + (["lse"] if check_lse else [])
    if grad:
        keys += ["dq", "dk", "dv"]
        if bias is not None and bias.requires_grad:
            keys.append("dbias")
    assert_fa_close(eng, ora, pla, keys=keys)
    return eng, ora, pla
