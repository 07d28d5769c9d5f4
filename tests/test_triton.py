"""The triton engine on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1), against the fp64 oracle by
FlashAttention's rule: forward, backward, split-KV decoding, every mask kind, mods, dropout bit for bit, GQA,
awkward head dims and lengths, fully masked rows. Shapes are small: the interpreter runs each program in numpy.
The kernels run with 16×16 blocks and 32×32 list tiles here, so these shapes span several blocks and tiles."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.core import hash as qhash
from qkv.core.call import prepare
from qkv.core.masks import FULL, PARTIAL
from qkv.testing import compare, make_qkv, naive_attention, run_naive

pytest.importorskip("triton")

from qkv.engines.triton import ENGINE, launch


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _check(q, k, v, grad=True, **kw):
    """compare() with the oracle reading a MaskMod at the call's alignment (bound to Nq, Nk)."""
    m = kw.get("mask")
    if isinstance(m, qkv.masks.MaskMod) and "oracle_mask" not in kw:
        kw["oracle_mask"] = m.bind(q.shape[2], k.shape[2])
    return compare("triton", q, k, v, grad=grad, **kw)


# ------------------------------------------------------------------------------------ shapes and dtypes

@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,D,Dv,dtype,causal", [
    (1, 2, 1, 37, 37, 64, 64, torch.float32, True),        # GQA, one partial block
    (2, 2, 2, 1, 1, 40, 40, torch.float32, False),         # N = 1
    (1, 4, 1, 20, 45, 59, 59, torch.float32, True),        # MQA, D 59 -> 64, Nq < Nk (bottom-right)
    (1, 2, 1, 45, 20, 40, 24, torch.float32, True),        # Nq > Nk: the first rows see nothing; Dv != D
    (1, 2, 2, 33, 50, 128, 128, torch.bfloat16, False),
    (1, 1, 1, 24, 24, 256, 256, torch.float16, True),
    (1, 2, 1, 30, 30, 8, 5, torch.float32, False),          # head dims below the 16 padding
    (1, 2, 1, 97, 97, 111, 111, torch.float32, True),     # N = 97, D = 111 -> 128
    (1, 4, 1, 1, 1023, 64, 64, torch.bfloat16, True),     # one row against 1023 keys (with grad: the fused kernels)
])
def test_forward_backward(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, causal):
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, Dv, dtype=dtype)
    _check(q, k, v, causal=causal)


def test_noncontiguous_views():
    q, k, v = make_qkv(1, 2, 1, 40, 40, 32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)            # (B, N, H, D) storage
    kt = torch.cat([k, k], -1)[..., ::2]                           # last-dim stride 2
    assert not qt.is_contiguous() and kt.stride(-1) == 2
    _check(qt, kt, v, causal=True)


# ------------------------------------------------------------------------------------ masks

def _ids(n, sizes):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[:n]


MASKS = {
    "window": dict(window=(7, 3)),
    "window_left": dict(window=(9, None)),
    "window_right": dict(window=(None, 4)),
    "causal_window": dict(causal=True, window=(5, 5)),
    "top_left": dict(mask=qkv.masks.causal(align="top_left")),
    "document": dict(mask=qkv.masks.document(_ids(48, [10, 21, 17]))),
    "document_unsorted": dict(mask=qkv.masks.document(torch.arange(48) % 3)),
    "causal_document": dict(mask=qkv.masks.and_masks(qkv.masks.causal(), qkv.masks.document(_ids(48, [30, 18])))),
    "padding": dict(mask=qkv.masks.padding(torch.tensor([40, 17]), torch.tensor([38, 12]))),
    "chunked": dict(mask=qkv.masks.chunked(12)),
    "prefix_lm": dict(mask=qkv.masks.prefix_lm(9)),
    "lambda": dict(mask=lambda b, h, i, j: (i + 2 * j + h) % 3 != 0),
    "and_causal_lambda": dict(mask=qkv.masks.and_masks(qkv.masks.causal(), lambda b, h, i, j: (j % 4) != 1)),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_kinds(name):
    q, k, v = make_qkv(2, 2, 1, 40, 48, 16)
    _check(q, k, v, **MASKS[name])


@pytest.mark.parametrize("shape", [(40, 48), (2, 1, 40, 48), (1, 2, 1, 48), (2, 2, 40, 48)])
def test_bool_tensor_mask(shape):
    q, k, v = make_qkv(2, 2, 1, 40, 48, 16)
    m = torch.rand(*shape, generator=torch.Generator().manual_seed(3)) < 0.6
    _check(q, k, v, mask=m)


@pytest.mark.parametrize("block_size", [8, (16, 4), 48, None])
def test_block_mask_any_block_size(block_size):
    """A BlockMask of any block size: its states are re-tiled at the kernels' tiles, partial tiles get bitmaps."""
    q, k, v = make_qkv(1, 2, 2, 40, 48, 16)
    mm = lambda b, h, i, j: ((i // 9) == (j // 11)) | (j < 2)
    bm = qkv.block_mask(mm, 1, 2, 40, 48, block_size=block_size)
    _check(q, k, v, mask=bm, oracle_mask=mm, causal=True)


def test_block_mask_of_a_tensor_and_of_an_index_rule():
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16)
    t = torch.rand(1, 2, 40, 40, generator=torch.Generator().manual_seed(5)) < 0.5
    _check(q, k, v, mask=qkv.block_mask(t, 1, 2, 40, 40, block_size=16), oracle_mask=t)
    doc = qkv.masks.document(_ids(40, [13, 27]))
    _check(q, k, v, mask=qkv.block_mask(doc, 1, 1, 40, 40), oracle_mask=doc.bind(40, 40))


def test_fully_masked_rows_give_zero_and_zero_gradients():
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16)
    m = torch.ones(40, 40, dtype=torch.bool)
    m[3] = False                                           # one row sees nothing
    m[20:36] = False                                       # a whole 16-row block sees nothing
    for kw in (dict(mask=m), dict(window=(None, 4), mask=qkv.masks.padding(torch.tensor([40]), torch.tensor([30]))),
               dict(causal=True, mask=qkv.masks.padding(torch.tensor([0])))):
        eng, _, _ = _check(q, k, v, **kw)
        dead = torch.isneginf(eng["lse"])
        assert dead.any()
        assert torch.all(eng["out"][dead] == 0) and torch.all(eng["dq"][dead] == 0)
        assert not any(torch.isnan(eng[x]).any() for x in ("out", "dq", "dk", "dv"))


def test_tile_masks_hold_only_partial_tiles():
    """The bitmaps of a BlockMask: one per partial tile, exact per element, built once per tile size and device."""
    Nq, Nk = 70, 90
    mm = qkv.masks.and_masks(qkv.masks.causal(), lambda b, h, i, j: (i - j) % 5 != 0)
    bm = qkv.block_mask(mm, 1, 1, Nq, Nk, block_size=16)
    tm = bm.tile_masks((32, 32))
    assert bm.tile_masks((32, 32)) is tm                       # cached
    st, slot, bits = tm
    assert bits.shape[0] == int((st == PARTIAL).sum()) < st.numel() and bits.shape[1:] == (32, 1)
    dense = torch.zeros(Nq, Nk, dtype=torch.bool)
    for ti in range(st.shape[2]):
        for tj in range(st.shape[3]):
            rows, cols = slice(ti * 32, min(ti * 32 + 32, Nq)), slice(tj * 32, min(tj * 32 + 32, Nk))
            if st[0, 0, ti, tj] == FULL:
                dense[rows, cols] = True
            elif st[0, 0, ti, tj] == PARTIAL:
                w = bits[slot[0, 0, ti, tj], :, 0].to(torch.int64) & 0xFFFFFFFF
                b = ((w[:, None] >> torch.arange(32)) & 1).bool()
                dense[rows, cols] = b[:rows.stop - rows.start, :cols.stop - cols.start]
    want = mm.bind(Nq, Nk)(0, 0, torch.arange(Nq)[:, None], torch.arange(Nk)[None, :])
    assert torch.equal(dense, want)


# ------------------------------------------------------------------------------------ score mods

@pytest.mark.parametrize("bshape", [(2, 2, 40, 48), (1, 2, 40, 48), (40, 48), (2, 1, 1, 48), (1, 1, 40, 1)])
def test_bias_and_its_gradient(bshape):
    q, k, v = make_qkv(2, 2, 1, 40, 48, 16)
    bias = torch.randn(*bshape, generator=torch.Generator().manual_seed(2)).requires_grad_()
    _check(q, k, v, bias=bias, causal=True)


@pytest.mark.parametrize("slopes", [(2,), (2, 2)])
def test_alibi_and_softcap(slopes):
    q, k, v = make_qkv(2, 2, 1, 40, 48, 32, scale_in=3.0)
    a = torch.rand(*slopes, generator=torch.Generator().manual_seed(1))
    _check(q, k, v, alibi_slopes=a, softcap=5.0, window=(20, 2), scale=0.5)


def test_lse_gradient():
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = qkv.attention(*leaves, causal=True, return_lse=True, backend="triton")
    (out.sum() + (lse * torch.linspace(0, 1, 40)).sum()).backward()
    ref = [t.clone().double().requires_grad_() for t in (q, k, v)]
    o2, l2 = naive_attention(*ref, causal=True)
    (o2.sum() + (l2 * torch.linspace(0, 1, 40).double()).sum()).backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad.float(), atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------ dropout

def test_dropout_keep_mask_is_the_hash_bit_for_bit():
    """With v = identity the output is the dropped probability matrix: its zeros are the keep-mask, which must
    equal qkv.core.hash.uniform(seed, b, h, i, j) >= p for every element (also at shifted positions)."""
    B, H, Nq, Nk, p = 2, 2, 40, 48, 0.3
    q = torch.randn(B, H, Nq, 16)
    k = torch.randn(B, 1, Nk, 16)
    v = torch.eye(Nk).expand(B, 1, Nk, Nk).contiguous()
    for seed, qb, kb in ((12345, 0, 0), (2**31 - 2, 7, 3)):
        out, _ = launch.forward(q, k, v, scale=0.1, dropout_p=p, seed=seed, q_base=qb, k_base=kb)
        b, h = torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1)
        i, j = torch.arange(Nq).view(1, 1, -1, 1) + qb, torch.arange(Nk).view(1, 1, 1, -1) + kb
        want = qhash.uniform(seed, b, h, i, j) >= p
        assert torch.equal(out != 0, want)


def test_dropout_forward_and_backward_match_the_oracle():
    q, k, v = make_qkv(1, 2, 1, 40, 48, 16)
    p, gen_seed = 0.25, 7
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(gen_seed)))
    b, h = torch.arange(1).view(-1, 1, 1, 1), torch.arange(2).view(1, -1, 1, 1)
    keep = qhash.uniform(seed, b, h, torch.arange(40).view(1, 1, -1, 1), torch.arange(48).view(1, 1, 1, -1)) >= p
    _check(q, k, v, causal=True, dropout_p=p, generator=torch.Generator().manual_seed(gen_seed),
           oracle_kw={"dropout_mask": keep, "dropout_p": p})


def test_dropout_agrees_with_tiled():
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16)
    outs = [qkv.attention(q, k, v, causal=True, dropout_p=0.4, generator=torch.Generator().manual_seed(3),
                          backend=b) for b in ("triton", "tiled")]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ decoding

@pytest.mark.parametrize("Nq,Hq,Hkv,kw", [
    (1, 8, 2, dict(causal=True)),
    (3, 4, 1, dict(causal=True)),
    (2, 4, 4, dict(window=(30, 0))),
    (1, 4, 2, dict(causal=True, softcap=4.0, alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]))),
    (1, 8, 2, dict(mask=qkv.masks.and_masks(qkv.masks.causal(), qkv.masks.padding(torch.tensor([150, 61]))))),
    (1, 4, 1, dict(causal=True, Nk=1023, D=111)),
])
def test_decode_split_kv(Nq, Hq, Hkv, kw):
    """Few query rows against a long cache, no gradient: the split-KV kernel, its splits merged by LSE."""
    kw = dict(kw)
    q, k, v = make_qkv(2, Hq, Hkv, Nq, kw.pop("Nk", 150), kw.pop("D", 64))
    call = prepare(q, k, v, **kw)
    assert ENGINE.decodes(call)
    with torch.no_grad():
        _check(q, k, v, grad=False, **kw)


def test_decode_only_for_what_its_kernel_computes():
    """Documents, query lengths, bitmaps, a bias or a gradient keep a decoding-shaped call on the fused forward."""
    q, k, v = make_qkv(1, 4, 2, 1, 150, 32)
    ids = torch.arange(150) // 40
    assert ENGINE.decodes(prepare(q, k, v, mask=qkv.masks.padding(100)))
    for kw in (dict(mask=qkv.masks.document(ids)), dict(mask=qkv.masks.padding(100, q_lens=1)),
               dict(mask=lambda b, h, i, j: j % 3 != 0), dict(mask=torch.rand(1, 150) < 0.5),
               dict(bias=torch.zeros(1, 150))):
        assert not ENGINE.decodes(prepare(q, k, v, **kw)), kw
    assert not ENGINE.decodes(prepare(q.requires_grad_(), k, v))


def test_decode_launcher_splits_and_lengths():
    q, k, v = make_qkv(2, 4, 2, 1, 150, 32)
    want = run_naive(q, k, v, compute_dtype=torch.float64, mask=qkv.masks.padding(torch.tensor([150, 61])))
    for splits in (1, 3, 10):
        out, lse = launch.decode(q, k, v, scale=32 ** -0.5, kv_lens=torch.tensor([150, 61]), hi_off=149,
                                 num_splits=splits)
        torch.testing.assert_close(out.double(), want["out"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), want["lse"], atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_steps():
    """Views of a KVCache (strided: the cache's max length) decoded step by step, as SelfAttention does."""
    cache = qkv.KVCache(1, 2, 64, 32)
    k0, v0 = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    cache.append(k0, v0)
    for _ in range(2):
        q = torch.randn(1, 4, 1, 32)
        kn, vn = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
        keys, values = cache.append(kn, vn)
        assert not keys.is_contiguous()
        with torch.no_grad():
            _check(q, keys, values, grad=False, causal=True)


# ------------------------------------------------------------------------------------ what it refuses

def test_refusals_name_the_reason(monkeypatch):
    q, k, v = make_qkv(1, 2, 1, 8, 8, 16)
    assert any("score_mod" in r for r in ENGINE.supports(prepare(q, k, v, score_mod=lambda s, b, h, i, j: s)))
    assert any("float64" in r for r in ENGINE.supports(prepare(q.double(), k.double(), v.double())))
    big = torch.zeros(1, 1, 4, 512)
    assert any("256" in r for r in ENGINE.supports(prepare(big, big, big)))
    with pytest.raises(ValueError, match="score_mod"):
        qkv.attention(q, k, v, score_mod=lambda s, b, h, i, j: s, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    why = ENGINE.supports(prepare(q, k, v))
    assert any("TRITON_INTERPRET=1" in r and "CUDA" in r for r in why)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        qkv.attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="CUDA"):
        launch.forward(q, k, v, scale=1.0)
    assert qkv.select_backend(q, k, v, causal=True).name != "triton"


# ------------------------------------------------------------------------------------ random calls

@st.composite
def _calls(draw):
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([1, 2]))
    Nq, Nk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    D = draw(st.sampled_from([3, 16, 40]))
    kw = {}
    if draw(st.booleans()):
        kw["causal"] = True
    if draw(st.booleans()):
        kw["window"] = (draw(st.one_of(st.none(), st.integers(0, 20))), draw(st.one_of(st.none(), st.integers(0, 20))))
    mk = draw(st.sampled_from(["none", "tensor", "doc", "mod"]))
    if mk == "tensor":
        kw["mask"] = torch.rand(Nq, Nk, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) < 0.7
    elif mk == "doc":
        kw["mask"] = qkv.masks.document(torch.arange(Nk) // draw(st.integers(1, 15)))
    elif mk == "mod":
        kw["mask"] = lambda b, h, i, j: (i + j) % 3 != 1
    if draw(st.booleans()):
        kw["softcap"] = 3.0
    if draw(st.booleans()):
        kw["alibi_slopes"] = torch.rand(Hq, generator=torch.Generator().manual_seed(4))
    if draw(st.booleans()):
        kw["bias"] = torch.randn(1, Hq, Nq, Nk, generator=torch.Generator().manual_seed(5)).requires_grad_()
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return (1, Hq, Hkv, Nq, Nk, D, dtype), kw


@settings(max_examples=max(5, settings.default.max_examples // 3))   # the interpreter is slow: a third
@given(_calls())
def test_random_calls(c):
    (B, Hq, Hkv, Nq, Nk, D, dtype), kw = c
    q, k, v = make_qkv(B, Hq, Hkv, Nq, Nk, D, dtype=dtype)
    _check(q, k, v, **kw)


# ------------------------------------------------------------------------------------ auto on CUDA

def test_auto_rules_on_cuda():
    """auto's CUDA policy (no GPU here: the call claims a CUDA device): SDPA keeps no-mask and plain causal calls,
    decoding steps included (measured faster on an H200); triton takes every other mask or mod, decoding steps
    with such masks on its split-KV kernel; tiled the score_mod callables."""
    import dataclasses

    from qkv import dispatch
    from qkv.core.call import Call

    class _OnCuda(Call):
        @property
        def device(self):
            return torch.device("cuda")

    def pick(q, k, v, **kw):
        c = prepare(q, k, v, **kw)
        return dispatch.auto(_OnCuda(**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)})).name

    q, k, v = make_qkv(1, 4, 2, 64, 64, 16)
    assert pick(q, k, v) == "sdpa" and pick(q, k, v, causal=True) == "sdpa"
    assert pick(q, k, v, return_lse=True) == "triton"
    assert pick(q, k, v, window=(8, 0)) == "triton"
    assert pick(q, k, v, mask=qkv.masks.document(torch.arange(64) // 16)) == "triton"
    assert pick(q, k, v, causal=True, alibi_slopes=torch.rand(4)) == "triton"
    assert pick(q, k, v, score_mod=lambda s, b, h, i, j: s) == "tiled"
    qd = q[:, :, -1:]
    assert pick(qd, k, v, causal=True) == "triton"                    # decoding: split-KV, no device-to-host wait
    assert pick(qd, k, v, causal=True, bias=torch.zeros(1, 1, 1, 64)) == "sdpa"   # a bias: not the split-KV kernel
    assert pick(qd, k, v, window=(8, 0)) == "triton"                  # a window: split-KV


def test_nonfinite_inputs_refused_for_training():
    """The backward kernels multiply zero probabilities with values, keys and queries (0·NaN): a call that needs a
    backward with NaN/inf inputs is refused with a reason naming the tensor (NonFiniteInputs, a ValueError), so
    auto reruns such a call on tiled."""
    from qkv.core.finite import NonFiniteInputs
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16)
    v[:, :, 30] = float("nan")
    with pytest.raises(NonFiniteInputs, match=r"\bv\b.*NaN"):
        qkv.attention(q.requires_grad_(), k, v, causal=True, backend="triton")


def _poisoned_oracle(q, k, v, hidden, **kw):
    """fp64 oracle; with ``hidden`` the poison must change nothing, so the oracle runs on the values with it
    zeroed."""
    if hidden:
        q, k, v = (t.nan_to_num(0.0, 0.0, 0.0) for t in (q, k, v))
    okw = dict(kw)
    if isinstance(okw.get("mask"), qkv.masks.MaskMod):
        okw["mask"] = okw["mask"].bind(q.shape[2], k.shape[2])
    return naive_attention(q, k, v, compute_dtype=torch.float64, **okw)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("case", ["causal-diagonal", "window-edge", "bitmap", "bias-inf-full-tile", "visible",
                                  "q-row-unseen", "decode-hidden", "decode-visible-v", "decode-visible-k",
                                  "decode-lengths", "decode-q"])
def test_nonfinite_inputs_inference(case, value):
    """Inference with NaN/inf inputs: the oracle's answer or NonFiniteInputs, never a third value. The split-KV
    decoding kernel needs no check (a split that ends with a NaN is computed again through a product in which
    zero probabilities contribute nothing): it always gives the oracle's answer. Compared with the fp64 oracle:
    NaN exactly where it has NaN, equal infinities, close elsewhere."""
    from qkv.core.finite import NonFiniteInputs
    decode = case.startswith("decode")
    Nq, Nk = (1, 200) if decode else (70, 70)
    q, k, v = make_qkv(1, 4, 2, Nq, Nk, 16, dtype=torch.float32)
    kw = dict(causal=True)
    hidden = True
    if case == "causal-diagonal":          # key 41 is hidden from rows 0..40, which share its diagonal block
        v[0, 0, 41, 3] = value
        k[0, 1, 41, 5] = value
        hidden = False
    elif case == "window-edge":
        kw = dict(window=(8, 0))
        v[0, :, 20, 0] = value             # seen by rows 20..28 only
        hidden = False
    elif case == "bitmap":
        kw = dict(mask=lambda b, h, i, j: (i + j) % 3 != 0)
        v[0, 1, 9, 2] = value              # hidden from the rows with (i + 9) % 3 == 0
        hidden = False
    elif case == "bias-inf-full-tile":     # a -inf score inside an unmasked tile hides that key
        kw = dict(bias=torch.zeros(1, 1, Nq, Nk))
        kw["bias"][..., 5] = float("-inf")
        v[0, :, 5, 1] = value
    elif case == "visible":
        v[0, 1, 2, 4] = value
        hidden = False
    elif case == "q-row-unseen":           # Nq > Nk bottom-right: the first rows see no key
        q, k, v = make_qkv(1, 4, 2, 70, 30, 16, dtype=torch.float32)
        q[0, 2, 5, 0] = value
    elif case == "decode-hidden":          # a window: keys before 149 are hidden
        kw = dict(window=(50, 0))
        v[0, 1, 100, 7] = value
        k[0, 0, 120, 1] = value
    elif case == "decode-visible-v":
        v[0, 1, 180, 7] = value
        hidden = False
    elif case == "decode-visible-k":
        k[0, 0, 150, 2] = value
        hidden = False
    elif case == "decode-lengths":         # key lengths: keys from 90 on are hidden in batch 0
        kw = dict(mask=qkv.masks.padding(torch.tensor([90])))
        v[0, 1, 95, 0] = value
        k[0, 0, 150, 2] = value
    elif case == "decode-q":
        q[0, 3, 0, 1] = value
        hidden = False
    assert decode == ENGINE.decodes(prepare(q, k, v, **kw), training=False)
    want, wlse = _poisoned_oracle(q, k, v, hidden, **kw)
    try:
        with torch.no_grad():
            out, lse = qkv.attention(q, k, v, backend="triton", return_lse=True, **kw)
    except NonFiniteInputs:
        assert not decode, "the decoding kernel refused a call it computes exactly"
        return
    for name, got, ref in (("out", out, want), ("lse", lse, wlse)):
        got = got.double()
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"{name}: NaN at {int(torch.isnan(got).sum())} " \
            f"places, the oracle at {int(torch.isnan(ref).sum())}"
        fin = torch.isfinite(ref)
        assert torch.equal(torch.isinf(got) & ~fin, torch.isinf(ref) & ~fin) and \
            torch.equal(got[torch.isinf(ref)], ref[torch.isinf(ref)]), f"{name}: infinities differ"
        assert torch.allclose(got[fin], ref[fin], atol=1e-4, rtol=1e-4), f"{name}: max err " \
            f"{(got[fin] - ref[fin]).abs().max():.3g}"
    if hidden:
        assert torch.isfinite(out).all()
