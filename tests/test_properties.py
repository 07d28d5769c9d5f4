"""Never a silent wrong answer: hypothesis draws calls — layouts (any strides incl. 0, transposes, slices,
storage offsets, channels-last, permutations) for every input, mask and bias; sizes incl. 0 and 1; dtypes;
masks as bool tensors, mask_mods, BlockMasks and additive -inf biases; score mods; NaN/inf placed where no
row can see them or where some row does — and compares every engine (reference, tiled with and without the
CPU kernel, sdpa where it serves the call, auto) with the fp64 oracle: NaN exactly where the oracle has NaN,
FlashAttention's rule elsewhere; gradients too, whenever the non-finite values are hidden (then they must
change nothing: the expected values are the oracle's on the inputs with them zeroed).

``QKV_HYPOTHESIS_EXAMPLES=500`` runs 500 drawn calls (each through every engine); CI's profile runs a few.
"""

import pytest
import torch
from hypothesis import event, given, note
from hypothesis import strategies as st

import qkv
from qkv.testing import check_fa, naive_attention

DTYPES = [torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "transposed", "sliced", "offset", "channels_last", "permuted", "expanded"]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------- layouts

def laid_out(x: torch.Tensor, layout: str, dim: int):
    """A tensor holding x's values (or, for "expanded", x's values made constant along ``dim``) in the given
    memory layout, and those logical values (contiguous). Non-4-D tensors keep the layouts that apply."""
    if x.dim() < 2 or x.numel() == 0 or layout == "contiguous":
        return x.clone(), x.clone()
    if layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2), x.clone()
    if layout == "sliced":
        base = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        base[..., ::2] = x
        return base[..., ::2], x.clone()
    if layout == "offset":
        flat = torch.full((x.numel() + 13,), 7.0, dtype=x.dtype)
        flat[13:] = x.flatten()
        return flat[13:].view(x.shape), x.clone()
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last), x.clone()
    if layout == "permuted" and x.dim() == 4:
        return x.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2), x.clone()
    if layout == "expanded":
        d = dim % x.dim()
        if x.shape[d] > 1:
            one = x.narrow(d, 0, 1).clone()
            return one.expand(x.shape), one.expand(x.shape).clone()
    return x.clone(), x.clone()


def poke(t: torch.Tensor, pos, value):
    """Write ``value`` at logical position ``pos`` of a laid-out tensor, in its storage (through an expanded
    view this changes every position that shares the element, as it would for a user)."""
    at = t.storage_offset() + sum(p * st for p, st in zip(pos, t.stride()))
    t.as_strided((1,), (1,), at).fill_(value)


# --------------------------------------------------------------------------------------------- masks

def mm_stripes(b, h, i, j):
    return (i + 2 * j) % 5 != 1


def mm_docs(b, h, i, j):
    return (i // 7) == (j // 7)


def mm_heads(b, h, i, j):
    return (j <= i + h) | (j % 9 == 0)


def mm_none_for_odd_rows(b, h, i, j):                 # rows that see nothing
    return (i % 2 == 0) & (j >= 0)


MASK_MODS = {"stripes": mm_stripes, "docs": mm_docs, "heads": mm_heads, "odd_rows_empty": mm_none_for_odd_rows}


def sm_rel(s, b, h, i, j):
    return s + 0.05 * (i - j).to(s.dtype)


def sm_cut(s, b, h, i, j):                            # a run of -inf scores inside rows, and whole rows
    return torch.where((j < 5) | (i % 7 == 3), -INF, s)


SCORE_MODS = {"rel": sm_rel, "cut": sm_cut}


@st.composite
def calls(draw):
    dtype = draw(st.sampled_from(DTYPES))
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([1, 2]))
    big = draw(st.integers(0, 5)) == 0                # now and then long enough for tiles, runs, the band
    size = st.integers(1, 300) if big else st.sampled_from([1, 2, 3, 5, 8, 13, 31, 64, 65])
    zero = st.integers(0, 11).map(lambda x: x == 0)    # each size is 0 one time in 12
    Nq, Nk = (0 if draw(zero) else draw(size) for _ in range(2))
    D = 0 if draw(zero) else draw(st.sampled_from([1, 3, 8, 16, 40]))
    Dv = 0 if draw(zero) else draw(st.sampled_from([D or 1, D or 1, 1, 5]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    vals = {"q": randn(B, Hq, Nq, D), "k": randn(B, Hkv, Nk, D), "v": randn(B, Hkv, Nk, Dv)}
    kw, okw = {}, {}
    mkind = draw(st.sampled_from(["none", "causal", "window", "tensor", "mod", "block", "neg_bias"]))
    if mkind == "causal" or (mkind in ("tensor", "mod") and draw(st.booleans())):
        kw["causal"] = okw["causal"] = True
    if mkind == "window":
        w = (draw(st.one_of(st.none(), st.integers(0, 20))), draw(st.one_of(st.none(), st.integers(0, 20))))
        kw["window"] = okw["window"] = w
        if draw(st.booleans()):
            kw["causal"] = okw["causal"] = True
    mshape = draw(st.sampled_from([(Nq, Nk), (B, 1, Nq, Nk), (1, Hq, Nq, Nk), (B, Hq, Nq, Nk), (1, Nk)]))
    dense = torch.rand(*mshape, generator=g) < draw(st.sampled_from([0.1, 0.5, 0.9]))
    if mkind == "tensor":
        vals["mask"] = dense
    elif mkind == "mod":
        kw["mask"] = okw["mask"] = MASK_MODS[draw(st.sampled_from(sorted(MASK_MODS)))]
    elif mkind == "block":
        bs = draw(st.sampled_from([8, 16, (8, 32), 128]))
        src = dense if draw(st.booleans()) else MASK_MODS[draw(st.sampled_from(sorted(MASK_MODS)))]
        kw["mask"] = qkv.block_mask(src, B if src is not dense or mshape[0] == B else 1, Hq, Nq, Nk, block_size=bs)
        okw["mask"] = src
    elif mkind == "neg_bias":
        vals["bias"] = torch.where(dense, randn(*mshape) * 0.5, torch.full(mshape, -INF, dtype=torch.float64))
    if "bias" not in vals and draw(st.integers(0, 3)) == 0:
        vals["bias"] = randn(*draw(st.sampled_from([(Nq, Nk), (B, Hq, Nq, Nk), (1, Hq, 1, Nk)])))
    if draw(st.integers(0, 3)) == 0:
        kw["softcap"] = okw["softcap"] = draw(st.sampled_from([2.0, 20.0]))
    if draw(st.integers(0, 4)) == 0:
        kw["alibi_slopes"] = okw["alibi_slopes"] = torch.rand(Hq, generator=g).to(torch.float32) * 0.1
    if draw(st.integers(0, 3)) == 0:
        kw["score_mod"] = okw["score_mod"] = SCORE_MODS[draw(st.sampled_from(sorted(SCORE_MODS)))]
    layouts = {n: (draw(st.sampled_from(LAYOUTS)), draw(st.integers(0, 3))) for n in vals}
    poison = draw(st.sampled_from(["none", "hidden", "hidden", "visible"]))
    pvalue = draw(st.sampled_from([NAN, INF, -INF]))
    grad = draw(st.booleans())
    return dict(dtype=dtype, vals=vals, kw=kw, okw=okw, layouts=layouts, poison=poison, pvalue=pvalue, grad=grad,
                seed=seed, desc=f"B={B} Hq={Hq} Hkv={Hkv} Nq={Nq} Nk={Nk} D={D} Dv={Dv} {dtype} mask={mkind}")


# ------------------------------------------------------------------------------------------ the check

def oracle(vals, okw, compute_dtype, grad_out=None):
    """out, lse (and grads of q, k, v, bias with grad_out) of the naive computation on these values."""
    leaves = {n: t.detach().to(compute_dtype or vals["q"].dtype).requires_grad_(grad_out is not None)
              for n, t in vals.items() if n != "mask"}
    kw = dict(okw)
    if "mask" in vals:
        kw["mask"] = vals["mask"]
    out, lse = naive_attention(leaves["q"], leaves["k"], leaves["v"], bias=leaves.get("bias"),
                               compute_dtype=compute_dtype, **kw)
    res = {"out": out.detach(), "lse": lse.detach()}
    if grad_out is not None:
        names = [n for n in ("q", "k", "v", "bias") if n in leaves]
        grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out.to(out.dtype), allow_unused=True)
        res.update({"d" + n: torch.zeros_like(leaves[n]) if gr is None else gr for n, gr in zip(names, grads)})
    return res


def probs_of(vals, okw):
    """fp64 probabilities (B, Hq, Nq, Nk) of the call on finite values: where they are 0, nothing is seen."""
    kw = dict(okw)
    if "mask" in vals:
        kw["mask"] = vals["mask"]
    q, k, v = (vals[n].nan_to_num(0.0, 0.0, 0.0) for n in ("q", "k", "v"))
    bias = vals.get("bias")
    if bias is not None:
        bias = torch.where(torch.isnan(bias), 0.0, bias)
    return naive_attention(q, k, v, bias=bias, compute_dtype=torch.float64, return_probs=True, **kw)[2]


def place_poison(c, logical, views):
    """Put c["pvalue"] into the values, where the drawn placement says; returns the placement that results
    ("hidden" only if every poisoned logical position is seen by no row)."""
    if c["poison"] == "none":
        return "none"
    p = probs_of(logical, c["okw"])                      # (B, Hq, Nq, Nk)
    B, Hq, Nq, Nk = p.shape
    Hkv = logical["k"].shape[1]
    seen_key = (p > 0).reshape(B, Hkv, Hq // Hkv, Nq, Nk).any(2).any(2) if p.numel() else \
        torch.zeros(B, Hkv, Nk, dtype=torch.bool)        # (B, Hkv, Nk)
    row_sees = (p > 0).any(-1)                            # (B, Hq, Nq)
    g = torch.Generator().manual_seed(c["seed"] + 1)
    targets = []
    if c["poison"] == "hidden":
        for name, hidden in (("k", ~seen_key), ("v", ~seen_key), ("q", ~row_sees)):
            idx = hidden.nonzero()
            if len(idx) and logical[name].shape[-1]:
                j = idx[torch.randint(len(idx), (1,), generator=g)].squeeze(0).tolist()
                targets.append((name, (*j, int(torch.randint(logical[name].shape[-1], (1,), generator=g)))))
        if "bias" in logical and p.numel():
            b4 = logical["bias"]
            vis = torch.broadcast_to(p > 0, p.shape)
            # bias entries whose every broadcast position is unseen (and not a -inf that is the mask itself)
            bshape = b4.shape if b4.dim() == 4 else (1, 1, *b4.shape)
            red = vis.reshape(*[1] * (4 - len(bshape)), *vis.shape)
            dims = [d for d in range(4) if bshape[d] == 1 and p.shape[d] > 1]
            unseen = ~(red.any(dims, keepdim=True) if dims else red)
            unseen = unseen.reshape(b4.shape) & torch.isfinite(b4)
            idx = unseen.nonzero()
            if len(idx):
                targets.append(("bias", tuple(idx[torch.randint(len(idx), (1,), generator=g)].squeeze(0).tolist())))
    else:
        for name in ("q", "k", "v", "bias"):
            t = logical.get(name)
            if t is not None and t.numel() and torch.rand((), generator=g) < 0.5:
                targets.append((name, tuple(int(torch.randint(n, (1,), generator=g)) for n in t.shape)))
    if not targets:
        return "none"
    for name, pos in targets:
        poke(views[name], pos, c["pvalue"])
        logical[name] = views[name].contiguous()
    if c["poison"] == "hidden":
        bad = {n: ~torch.isfinite(logical[n]) for n in ("q", "k", "v")}
        hidden_ok = not (bad["k"].any(-1) & seen_key).any() and not (bad["v"].any(-1) & seen_key).any() \
            and not (bad["q"].any(-1) & row_sees).any()
        return "hidden" if hidden_ok else "visible"
    return "visible"


def compare(name, got, want, plain, factor):
    """NaN exactly where the oracle has NaN; FlashAttention's rule (and equal infinities) elsewhere."""
    if got is None:
        return f"{name}: missing"
    got, want, plain = got.detach().double(), want.detach().double(), plain.detach().double()
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    gn, wn = torch.isnan(got), torch.isnan(want)
    if not torch.equal(gn, wn):
        return f"{name}: NaN at {int(gn.sum())} places, the oracle at {int(wn.sum())} ({int((gn & ~wn).sum())} extra)"
    keep = ~wn
    plain = torch.where(torch.isnan(plain) & keep, want, plain)  # a plain NaN the oracle has not: no yardstick
    return check_fa(name, torch.where(keep, got, 0.0).to(got.dtype), torch.where(keep, want, 0.0),
                    torch.where(keep, plain, 0.0), factor=factor)


ENGINES = [("reference", "reference", True), ("tiled", "tiled", True), ("tiled-ops", "tiled", False),
           ("sdpa", "sdpa", True), ("auto", "auto", True)]


@given(calls())
def test_every_engine_matches_the_oracle(c):
    note(c["desc"] + f" layouts={c['layouts']} poison={c['poison']} {c['pvalue']} kw={sorted(c['kw'])}")
    dt = c["dtype"]
    logical, views = {}, {}
    for n, x in c["vals"].items():
        x = x if n == "mask" else x.to(dt)
        layout, dim = c["layouts"][n]
        views[n], logical[n] = laid_out(x, layout, dim)
    before = {n: t.clone() for n, t in logical.items()}
    placement = place_poison(c, logical, views)
    note(f"placement={placement}")
    for label in (f"dtype {dt}", f"poison {placement} {c['pvalue'] if placement != 'none' else ''}",
                  f"mask {c['desc'].split('mask=')[1]}", *(f"layout {l}" for l, _ in c["layouts"].values()),
                  *(f"mod {m}" for m in ("softcap", "alibi_slopes", "score_mod") if m in c["kw"]),
                  "bias" if "bias" in logical else "no bias", "grad" if c["grad"] else "no grad",
                  "a zero size" if 0 in logical["q"].shape or 0 in logical["v"].shape or 0 in logical["k"].shape
                  else "no zero size", "long (> 100)" if max(logical["q"].shape[2], logical["k"].shape[2]) > 100
                  else "short"):
        event(label)
    grad = c["grad"] and placement in ("none", "hidden")
    g = torch.Generator().manual_seed(c["seed"] + 2)
    grad_out = torch.randn(*logical["q"].shape[:3], logical["v"].shape[-1], generator=g, dtype=torch.float64)
    # Expected: for hidden poison, the oracle on the values with the poison zeroed (it must change nothing)
    clean = {n: (torch.where((t != before[n]) | torch.isnan(t), torch.zeros_like(t), t)
                 if n != "mask" and placement == "hidden" else t) for n, t in logical.items()}
    want = oracle(clean, c["okw"], torch.float64, grad_out if grad else None)
    plain = oracle(clean, c["okw"], None, grad_out if grad else None)
    if dt in (torch.float16, torch.bfloat16):    # where half precision overflows, the fp32 naive is the yardstick
        p32 = oracle(clean, c["okw"], torch.float32, grad_out if grad else None)
        for key, val in plain.items():
            if not torch.equal(torch.isfinite(val), torch.isfinite(want[key])):
                plain[key] = p32[key] if key == "lse" else p32[key].to(dt)
    errors = []
    for label, backend, kernel in ENGINES:
        kw = dict(c["kw"])
        if "mask" in views:
            kw["mask"] = views["mask"]
        # the laid-out tensors themselves (detach keeps their strides), as leaves when gradients are checked
        ins = {n: views[n].detach().requires_grad_(grad) for n in ("q", "k", "v", "bias") if n in views}
        try:
            with qkv.options(cpu_kernel=kernel):
                res = qkv.attention(ins["q"], ins["k"], ins["v"], bias=ins.get("bias"), backend=backend,
                                    return_lse=backend in ("reference", "tiled"), **kw)
        except ValueError as e:
            if backend == "sdpa" and "cannot serve" in str(e):
                continue
            raise
        event(f"engine {label} ran")
        out, lse = res if isinstance(res, tuple) else (res, None)
        assert out.dtype == dt, f"{label}: out dtype {out.dtype}"
        msgs = [compare(f"{label} out", out, want["out"], plain["out"], 2.0)]
        if lse is not None:
            msgs.append(compare(f"{label} lse", lse, want["lse"], plain["lse"], 2.0))
        if grad and out.numel():
            names = [n for n in ("q", "k", "v", "bias") if n in ins]
            got = torch.autograd.grad(out, [ins[n] for n in names], grad_out.to(out.dtype), allow_unused=True)
            for n, gr in zip(names, got):
                gr = torch.zeros_like(ins[n]) if gr is None else gr
                # FlashAttention's rule is a statistic: the max error over a tensor. A half-precision gradient of
                # fewer than 16 elements lets the plain computation be lucky on every one of them (a 2-key bf16
                # dq: plain 2.4e-4 where every engine, SDPA's included, is 1.7e-3, the rounding of the output in
                # the backward's rowsum(dO·O)); such gradients are not judged by it.
                if dt in (torch.float16, torch.bfloat16) and gr.numel() < 16:
                    event("half-precision gradient too small for the rule")
                    continue
                msgs.append(compare(f"{label} d{n}", gr, want["d" + n], plain["d" + n], 3.0))
        errors += [m for m in msgs if m]
    assert not errors, "; ".join(errors)


