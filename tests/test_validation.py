"""Every wrong call raises ValueError/TypeError naming the argument and what it saw, before any work."""
import re

import pytest
import torch

import qkv
from qkv.testing import make_qkv


def qkv3(**over):
    q, k, v = make_qkv(2, 4, 2, 6, 7, 8)
    d = dict(q=q, k=k, v=v)
    d.update(over)
    return d["q"], d["k"], d["v"]


def word(name):
    return r"(?<![A-Za-z_])" + re.escape(name) + r"(?![A-Za-z_])"


Q, K, V = qkv3()

CASES = [
    # id, kwargs for attention (q, k, v included), exception types, regexes that must all match the message
    ("q_3d", dict(q=Q[0]), (ValueError,), [word("q"), r"4-D|4D|dim", re.escape(str(tuple(Q[0].shape)))]),
    ("k_5d", dict(k=K[None]), (ValueError,), [word("k"), re.escape(str(tuple(K[None].shape)))]),
    ("v_2d", dict(v=V[0, 0]), (ValueError,), [word("v")]),
    ("q_not_tensor", dict(q=Q.tolist()), (TypeError,), [word("q")]),
    ("int_dtype", dict(q=Q.long(), k=K.long(), v=V.long()), (TypeError,), [word("q"), "int64"]),
    ("bool_dtype", dict(v=V.bool()), (TypeError,), [word("v"), "bool"]),
    ("heads", dict(q=torch.randn(2, 3, 6, 8)), (ValueError,), [r"head", "3", "2"]),
    ("head_dim", dict(k=torch.randn(2, 2, 7, 6), v=torch.randn(2, 2, 7, 8)), (ValueError,),
     [r"\bD\b|head dim|head_dim", "8", "6"]),
    ("kv_len", dict(v=torch.randn(2, 2, 5, 8)), (ValueError,), [word("v"), "5"]),
    ("batch", dict(k=torch.randn(1, 2, 7, 8), v=torch.randn(1, 2, 7, 8)), (ValueError,), [r"batch|\bB\b"]),
    ("dtype_mismatch", dict(k=K.double()), (TypeError, ValueError), [r"dtype", "float64", "float32"]),
    ("device_mismatch", dict(k=torch.empty(2, 2, 7, 8, device="meta")), (ValueError,), [r"device", "meta", "cpu"]),
    ("window_negative", dict(window=(-1, 0)), (ValueError,), [word("window"), "-1"]),
    ("window_negative_right", dict(window=(2, -3)), (ValueError,), [word("window"), "-3"]),
    ("window_not_pair", dict(window=5), (ValueError, TypeError), [word("window")]),
    ("window_float", dict(window=(1.5, 0)), (ValueError, TypeError), [word("window")]),
    ("mask_unbroadcastable", dict(mask=torch.ones(5, 7, dtype=torch.bool)), (ValueError,), [word("mask"), r"\(5, 7\)"]),
    ("mask_float", dict(mask=torch.ones(6, 7)), (TypeError,), [word("mask"), "float32"]),
    ("mask_wrong_type", dict(mask="causal"), (TypeError,), [word("mask"), "str"]),
    ("block_mask_wrong_shape", dict(mask="BM"), (ValueError,), [r"BlockMask|mask"]),
    ("bias_unbroadcastable", dict(bias=torch.randn(3, 6, 7)), (ValueError,), [word("bias"), r"\(3, 6, 7\)"]),
    ("bias_int", dict(bias=torch.ones(6, 7, dtype=torch.long)), (TypeError,), [word("bias")]),
    ("alibi_shape", dict(alibi_slopes=torch.ones(3)), (ValueError,), [word("alibi_slopes"), r"\(3,\)"]),
    ("softcap_zero", dict(softcap=0.0), (ValueError,), [word("softcap")]),
    ("softcap_nan", dict(softcap=float("nan")), (ValueError,), [word("softcap"), "nan"]),
    ("scale_nan", dict(scale=float("nan")), (ValueError,), [word("scale"), "nan"]),
    ("scale_inf", dict(scale=float("inf")), (ValueError,), [word("scale"), "inf"]),
    ("scale_str", dict(scale="0.1"), (TypeError,), [word("scale")]),
    ("dropout_neg", dict(dropout_p=-0.1), (ValueError,), [word("dropout_p"), "-0.1"]),
    ("dropout_one", dict(dropout_p=1.0), (ValueError,), [word("dropout_p"), "1"]),
    ("dropout_big", dict(dropout_p=1.5), (ValueError,), [word("dropout_p"), "1.5"]),
    ("dropout_nan", dict(dropout_p=float("nan")), (ValueError,), [word("dropout_p")]),
    ("generator_wrong", dict(dropout_p=0.1, generator=123), (TypeError,), [word("generator")]),
    ("score_mod_not_callable", dict(score_mod=3), (TypeError,), [word("score_mod")]),
    ("backend_unknown", dict(backend="flash"), (ValueError,), [word("backend"), "flash"]),
    ("backend_sdpa_score_mod", dict(backend="sdpa", score_mod=lambda s, b, h, i, j: s), (ValueError,),
     [r"sdpa", r"score_mod"]),
    ("backend_triton_cpu", dict(backend="triton"), (ValueError,), [r"triton"]),
    # what a user's mask_mod / score_mod returns: one clear error naming it (never read as an additive bias)
    ("mask_mod_none", dict(mask=lambda b, h, i, j: None), (TypeError,), [word("mask_mod"), "None"]),
    ("mask_mod_float", dict(mask=lambda b, h, i, j: (j <= i).float()), (TypeError,), [word("mask_mod"), "float32"]),
    ("mask_mod_int", dict(mask=lambda b, h, i, j: (j <= i).long()), (TypeError,), [word("mask_mod"), "int64"]),
    ("mask_mod_shape", dict(mask=lambda b, h, i, j: torch.ones(3, 3, dtype=torch.bool)), (ValueError,),
     [word("mask_mod"), r"\(3, 3\)"]),
    ("mask_mod_list", dict(mask=lambda b, h, i, j: [True]), (TypeError,), [word("mask_mod"), "list"]),
    ("and_masks_float", dict(mask=qkv.masks.and_masks(qkv.masks.causal(), lambda b, h, i, j: (j <= i).float())),
     (TypeError,), [r"and_masks", word("mask_mod"), "float32"]),
    ("not_mask_none", dict(mask=qkv.masks.not_mask(lambda b, h, i, j: None)), (TypeError,), [r"not_mask", "None"]),
    ("score_mod_none", dict(score_mod=lambda s, b, h, i, j: None), (TypeError,), [word("score_mod"), "None"]),
    ("score_mod_int", dict(score_mod=lambda s, b, h, i, j: (s > 0).long()), (TypeError,),
     [word("score_mod"), "int64"]),
    ("score_mod_shape", dict(score_mod=lambda s, b, h, i, j: torch.zeros(2, 6, 7)), (ValueError,),
     [word("score_mod"), r"\(2, 6, 7\)", "elementwise"]),
    ("score_mod_float", dict(score_mod=lambda s, b, h, i, j: 1.0), (TypeError,), [word("score_mod"), "float"]),
    ("alibi_device", dict(alibi_slopes=torch.ones(4, device="meta")), (ValueError,),
     [word("alibi_slopes"), "meta", "cpu"]),
    ("document_ids_length", dict(mask=qkv.masks.document(torch.zeros(5, dtype=torch.long))), (ValueError,),
     [r"ids", r"\b5\b", r"Nk=7"]),
    ("document_ids_batch", dict(mask=qkv.masks.document(torch.zeros(3, 7, dtype=torch.long))), (ValueError,),
     [r"ids", r"\b3\b", r"B=2"]),
    ("padding_batch", dict(mask=qkv.masks.padding(torch.tensor([3, 4, 5]))), (ValueError,),
     [r"kv_lens", r"\b3\b", r"B=2"]),
    ("prefix_batch", dict(mask=qkv.masks.prefix_lm(torch.tensor([1, 2, 3]))), (ValueError,),
     [r"prefix_len", r"B=2"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_call_raises_naming_the_argument(case):
    _, kw, exc, patterns = case
    kw = dict(kw)
    q, k, v = qkv3(**{n: kw.pop(n) for n in ("q", "k", "v") if n in kw})
    if kw.get("mask") == "BM":
        kw["mask"] = qkv.block_mask(qkv.masks.causal(), 1, 1, 9, 9)
    calls = []

    # prepare probes a user's mods at one index (the type of their result): no work; a grid of them is
    def spy_mod(b, h, i, j):
        if i.numel() * j.numel() > 1:
            calls.append("mask")
        return i >= 0

    def spy_score(s, b, h, i, j):
        if s.numel() > 1:
            calls.append("score")
        return s

    if "mask" not in kw:
        kw["mask"] = spy_mod
    if "score_mod" not in kw and kw.get("backend") not in ("sdpa",):
        kw["score_mod"] = spy_score
    with pytest.raises(exc) as ei:
        qkv.attention(q, k, v, **kw)
    msg = str(ei.value)
    for p in patterns:
        assert re.search(p, msg), f"message {msg!r} does not match {p!r}"
    assert not calls, f"work was done before raising: {calls}"


def test_attention_weights_validates_too():
    q, k, _ = qkv3()
    with pytest.raises(ValueError, match="window"):
        qkv.attention_weights(q, k, window=(-2, 0))
    with pytest.raises(ValueError, match="q"):
        qkv.attention_weights(q[0], k)


def test_select_backend_validates_too():
    q, k, v = qkv3()
    with pytest.raises(ValueError, match="dropout_p"):
        qkv.select_backend(q, k, v, dropout_p=2.0)


def test_valid_edge_arguments_accepted():
    q, k, v = qkv3()
    for kw in (dict(window=(0, 0)), dict(window=[3, None]), dict(window=(None, None)), dict(scale=0.0),
               dict(dropout_p=0.0), dict(mask=torch.ones(1, dtype=torch.bool)), dict(bias=torch.zeros(1)),
               dict(alibi_slopes=torch.ones(2, 4)), dict(softcap=1e-3)):
        qkv.attention(q, k, v, **kw)


@pytest.mark.parametrize("backend", ["reference", "tiled", "sdpa", "auto"])
@pytest.mark.parametrize("bad", ["none", "float", "shape"])
def test_mask_mod_results_are_checked_on_every_engine(backend, bad):
    """A mask_mod returning 0/1 floats was an additive bias on sdpa/auto, a bool on tiled and a `~` TypeError
    on reference; now each engine raises the same error before computing anything."""
    q, k, v = make_qkv(1, 2, 2, 300, 300, 8)
    mm = {"none": lambda b, h, i, j: None, "float": lambda b, h, i, j: (j <= i).float(),
          "shape": lambda b, h, i, j: (j <= i)[..., :3]}[bad]
    with pytest.raises((TypeError, ValueError), match="mask_mod"):
        qkv.attention(q, k, v, mask=mm, backend=backend)
    # a mask_mod that is right at one index and wrong on a grid: caught where it is evaluated, same error
    late = lambda b, h, i, j: (j <= i) if i.numel() == 1 else (j <= i).float()
    with pytest.raises(TypeError, match="mask_mod.*float32"):
        qkv.attention(q, k, v, mask=late, backend=backend)
    with pytest.raises(TypeError, match="mask_mod.*float32"):
        qkv.block_mask(late, 1, 1, 300, 300)


def test_meta_tensors_give_shapes():
    # meta tensors hold no values: every engine returns results of the right shape and dtype (no error from
    # torch internals); causal on tiled raised "Cannot copy out of meta tensor"
    q = torch.empty(1, 4, 9, 8, device="meta")
    k = v = torch.empty(1, 2, 9, 8, device="meta")
    for backend in ("reference", "tiled", "auto"):
        out, lse = qkv.attention(q, k, v, causal=True, backend=backend, return_lse=True)
        assert out.device.type == "meta" and out.shape == (1, 4, 9, 8) and lse.shape == (1, 4, 9)
    assert qkv.attention(q, k, v, causal=True, backend="sdpa").shape == (1, 4, 9, 8)
    assert qkv.attention_weights(q, k, causal=True).shape == (1, 4, 9, 9)
