"""qkv.masks (mask_mods) and qkv.block_mask / BlockMask, each against an independent definition.

Every expected mask here is written out by hand from the documented rule (DESIGN §2 and the docstrings of
qkv.masks); none is computed with qkv.
"""
import math

import pytest
import torch

import qkv
from qkv.testing import compare, eval_mask_mod, index_grids, make_qkv

SIZES = [(7, 7), (5, 12), (12, 5), (1, 9)]


def grid(B, H, Nq, Nk):
    b, h, i, j = index_grids(B, H, Nq, Nk)
    return b, h, i, j, Nk - Nq


def evaluate(m, B, H, Nq, Nk):
    """Evaluate a qkv mask bound to (Nq, Nk) on the full index grid."""
    bound = m.bind(Nq, Nk) if hasattr(m, "bind") else m
    return eval_mask_mod(bound, B, H, Nq, Nk)


def full(x, B, H, Nq, Nk):
    return torch.broadcast_to(torch.as_tensor(x), (B, H, Nq, Nk))


# ------------------------------------------------------------------------------------------- definitions

def def_causal(B, H, Nq, Nk, align="bottom_right"):
    b, h, i, j, off = grid(B, H, Nq, Nk)
    return full(j <= i + (off if align == "bottom_right" else 0), B, H, Nq, Nk)


def def_window(B, H, Nq, Nk, left, right):
    b, h, i, j, off = grid(B, H, Nq, Nk)
    ok = torch.ones(B, H, Nq, Nk, dtype=torch.bool)
    if left is not None:
        ok = ok & (j >= i + off - left)
    if right is not None:
        ok = ok & (j <= i + off + right)
    return ok


@pytest.mark.parametrize("Nq,Nk", SIZES)
@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
def test_causal(Nq, Nk, align):
    got = evaluate(qkv.masks.causal(align=align), 1, 1, Nq, Nk)
    assert torch.equal(got, def_causal(1, 1, Nq, Nk, align))


def test_causal_default_is_bottom_right_and_bad_align():
    assert torch.equal(evaluate(qkv.masks.causal(), 1, 1, 3, 8), def_causal(1, 1, 3, 8))
    with pytest.raises(ValueError, match="align"):
        qkv.masks.causal(align="middle")


@pytest.mark.parametrize("Nq,Nk", SIZES)
@pytest.mark.parametrize("lr", [(2, 0), (0, 0), (None, 0), (3, None), (1, 2), (0, 3), (None, None)])
def test_sliding_window(Nq, Nk, lr):
    got = evaluate(qkv.masks.sliding_window(*lr), 1, 1, Nq, Nk)
    assert torch.equal(got, def_window(1, 1, Nq, Nk, *lr))


@pytest.mark.parametrize("bad", [(-1, 0), (0, -2)])
def test_sliding_window_negative_raises(bad):
    with pytest.raises(ValueError, match="window|left|right"):
        qkv.masks.sliding_window(*bad)


def test_document_1d_and_2d():
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    N = len(ids)
    got = evaluate(qkv.masks.document(ids), 2, 1, N, N)
    want = full(ids[:, None] == ids[None, :], 2, 1, N, N)
    assert torch.equal(got, want)
    ids2 = torch.stack([ids, torch.tensor([0, 1, 1, 1, 1, 1, 3, 3, 4])])
    got = evaluate(qkv.masks.document(ids2), 2, 3, N, N)
    want = torch.stack([ids2[b][:, None] == ids2[b][None, :] for b in range(2)])[:, None].expand(2, 3, N, N)
    assert torch.equal(got, want)


def test_document_unsorted_ids():
    ids = torch.tensor([2, 0, 2, 1, 0, 1, 2])
    got = evaluate(qkv.masks.document(ids), 1, 1, 7, 7)
    assert torch.equal(got[0, 0], ids[:, None] == ids[None, :])


def test_document_fewer_queries_are_last_positions():
    # queries are the last Nq positions (bottom-right): query i carries the id of key i + Nk - Nq
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    Nq, Nk = 3, 7
    got = evaluate(qkv.masks.document(ids), 1, 1, Nq, Nk)
    want = ids[4:][:, None] == ids[None, :]
    assert torch.equal(got[0, 0], want)


def test_document_with_separate_query_ids():
    kv_ids = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    q_ids = torch.tensor([2, 0, 1])
    got = evaluate(qkv.masks.document(kv_ids, q_ids=q_ids), 1, 1, 3, 7)
    assert torch.equal(got[0, 0], q_ids[:, None] == kv_ids[None, :])


def test_padding_with_query_lengths():
    KL, QL = torch.tensor([3, 6]), torch.tensor([2, 5])
    b, h, i, j, off = grid(2, 1, 5, 6)
    want = full((j < KL.view(2, 1, 1, 1)) & (i < QL.view(2, 1, 1, 1)), 2, 1, 5, 6)
    assert torch.equal(evaluate(qkv.masks.padding(KL, q_lens=QL), 2, 1, 5, 6), want)
    bm = qkv.block_mask(qkv.masks.padding(KL, q_lens=QL), 2, 1, 5, 6, block_size=2)
    check_block_mask(bm, want.contiguous(), 2, 2, exact=True)


def test_document_rejects_float_ids():
    with pytest.raises(TypeError, match="ids"):
        qkv.masks.document(torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("Nq,Nk", SIZES)
@pytest.mark.parametrize("P", [0, 3, 20])
def test_prefix_lm(Nq, Nk, P):
    b, h, i, j, off = grid(1, 1, Nq, Nk)
    want = full((j <= i + off) | (j < P), 1, 1, Nq, Nk)
    assert torch.equal(evaluate(qkv.masks.prefix_lm(P), 1, 1, Nq, Nk), want)


def test_prefix_lm_per_batch():
    P = torch.tensor([0, 2, 5])
    b, h, i, j, off = grid(3, 2, 6, 6)
    want = full((j <= i) | (j < P.view(3, 1, 1, 1)), 3, 2, 6, 6)
    assert torch.equal(evaluate(qkv.masks.prefix_lm(P), 3, 2, 6, 6), want)


def test_padding():
    L = torch.tensor([3, 0, 8, 5])
    b, h, i, j, off = grid(4, 2, 5, 8)
    want = full(j < L.view(4, 1, 1, 1), 4, 2, 5, 8)
    assert torch.equal(evaluate(qkv.masks.padding(L), 4, 2, 5, 8), want)


def test_padding_at_a_single_batch_index():
    # a mask_mod must work on any broadcast index tensors: engines may evaluate one batch (b of shape
    # (1,1,1,1) holding 1) or a scalar index at a time.
    L = torch.tensor([2, 5])
    m = qkv.masks.padding(L).bind(3, 6)
    _, h, i, j = index_grids(1, 1, 3, 6)
    out = torch.as_tensor(m(torch.tensor(1).view(1, 1, 1, 1), h, i, j))
    assert torch.equal(torch.broadcast_to(out, (1, 1, 3, 6))[0, 0], (torch.arange(6) < 5).expand(3, 6))
    out = torch.as_tensor(m(torch.tensor(0), torch.tensor(0), torch.tensor(2), torch.tensor(1)))
    assert out.shape == () and bool(out) is True
    out = torch.as_tensor(m(torch.tensor(0), torch.tensor(0), torch.tensor(2), torch.tensor(3)))
    assert bool(out) is False


@pytest.mark.parametrize("Nq,Nk", SIZES)
@pytest.mark.parametrize("c", [1, 3, 4])
def test_chunked(Nq, Nk, c):
    b, h, i, j, off = grid(1, 1, Nq, Nk)
    want = full(torch.div(i + off, c, rounding_mode="floor") == torch.div(j, c, rounding_mode="floor"), 1, 1, Nq, Nk)
    assert torch.equal(evaluate(qkv.masks.chunked(c), 1, 1, Nq, Nk), want)


@pytest.mark.parametrize("Nq,Nk", [(16, 16), (6, 16)])
@pytest.mark.parametrize("w,d", [(2, 1), (2, 3), (0, 2), (4, 2)])
def test_dilated_causal(Nq, Nk, w, d):
    b, h, i, j, off = grid(1, 1, Nq, Nk)
    dist = i + off - j
    want = full((dist >= 0) & (dist <= w * d) & (dist % d == 0), 1, 1, Nq, Nk)
    assert torch.equal(evaluate(qkv.masks.dilated(w, d), 1, 1, Nq, Nk), want)


def test_dilated_noncausal():
    b, h, i, j, off = grid(1, 1, 12, 12)
    dist = i - j
    want = full((dist.abs() <= 6) & (dist % 3 == 0), 1, 1, 12, 12)
    assert torch.equal(evaluate(qkv.masks.dilated(2, 3, causal=False), 1, 1, 12, 12), want)


@pytest.mark.parametrize("g", [2, [0, 5]])
def test_longformer(g):
    N = 14
    b, h, i, j, off = grid(1, 1, N, N)
    gl = torch.zeros(N, dtype=torch.bool)
    gl[torch.arange(g) if isinstance(g, int) else torch.tensor(g)] = True
    want = ((i - j).abs() <= 2) | gl.view(1, 1, 1, N) | gl.view(1, 1, N, 1)
    assert torch.equal(evaluate(qkv.masks.longformer(2, g), 1, 1, N, N), full(want, 1, 1, N, N))


def test_bigbird_structure():
    N, bs, w, g, r = 64, 8, 2, 1, 2
    m = qkv.masks.bigbird(w, g, r, block_size=bs, seed=3)
    got = evaluate(m, 1, 1, N, N)[0, 0]
    lf = evaluate(qkv.masks.longformer(w, g), 1, 1, N, N)[0, 0]
    assert torch.all(got >= lf), "bigbird must contain its window + global pattern"
    extra = got & ~lf
    assert extra.any(), "bigbird with random blocks adds something"
    nb = N // bs
    for qb in range(nb):
        rows = got[qb * bs:(qb + 1) * bs]
        # the random part is whole key blocks, shared by every query of a query block
        blocks = rows.view(bs, nb, bs).all(-1).all(0)  # key blocks fully visible to the whole q-block
        extra_rows = extra[qb * bs:(qb + 1) * bs].view(bs, nb, bs).any(-1).any(0)
        assert torch.all(blocks[extra_rows]), f"q-block {qb}: random keys are not whole key blocks"
        # and at most r random blocks per query block
        lf_full = lf[qb * bs:(qb + 1) * bs].view(bs, nb, bs).all(-1).all(0)
        assert int((blocks & ~lf_full).sum()) <= r
    # deterministic in the seed, and the seed matters
    again = evaluate(qkv.masks.bigbird(w, g, r, block_size=bs, seed=3), 1, 1, N, N)[0, 0]
    assert torch.equal(got, again)
    others = [evaluate(qkv.masks.bigbird(w, g, r, block_size=bs, seed=s), 1, 1, N, N)[0, 0] for s in (4, 5, 6)]
    assert any(not torch.equal(got, o) for o in others)


def test_bigbird_bound_copies_are_independent():
    m = qkv.masks.bigbird(2, 1, 2, block_size=8, seed=3)
    b1 = m.bind(64, 64)
    before = eval_mask_mod(b1, 1, 1, 64, 64)
    m.bind(16, 256)
    assert torch.equal(eval_mask_mod(b1, 1, 1, 64, 64), before)


def test_combinators():
    Nq, Nk = 6, 9
    c = qkv.masks.causal()
    wnd = qkv.masks.sliding_window(2, 1)
    C, W = def_causal(1, 1, Nq, Nk), def_window(1, 1, Nq, Nk, 2, 1)
    assert torch.equal(evaluate(qkv.masks.and_masks(c, wnd), 1, 1, Nq, Nk), C & W)
    assert torch.equal(evaluate(qkv.masks.or_masks(c, wnd), 1, 1, Nq, Nk), C | W)
    assert torch.equal(evaluate(qkv.masks.not_mask(c), 1, 1, Nq, Nk), ~C)
    # plain callables mix in (they see raw indices)
    even = lambda b, h, q, kv: kv % 2 == 0
    _, _, _, j, _ = grid(1, 1, Nq, Nk)
    assert torch.equal(evaluate(qkv.masks.and_masks(c, even), 1, 1, Nq, Nk), C & full(j % 2 == 0, 1, 1, Nq, Nk))
    assert torch.equal(evaluate(qkv.masks.not_mask(qkv.masks.or_masks(c, even)), 1, 1, Nq, Nk),
                       ~(C | full(j % 2 == 0, 1, 1, Nq, Nk)))


def test_combinator_of_bottom_right_masks_is_bound_once():
    # and_masks(causal(), chunked(4)) for Nq < Nk: each child aligned bottom-right in the same frame
    Nq, Nk = 5, 13
    m = qkv.masks.and_masks(qkv.masks.causal(), qkv.masks.chunked(4))
    b, h, i, j, off = grid(1, 1, Nq, Nk)
    want = (j <= i + off) & ((i + off) // 4 == j // 4)
    assert torch.equal(evaluate(m, 1, 1, Nq, Nk), full(want, 1, 1, Nq, Nk))


# ------------------------------------------------------------------------------------------- BlockMask

def block_states(dense, bq, bk):
    """Exact block classification of a dense bool (B, H, Nq, Nk): 0 none, 1 some, 2 all (in-range) visible."""
    B, H, Nq, Nk = dense.shape
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    st = torch.zeros(B, H, nqb, nkb, dtype=torch.int8)
    for a in range(nqb):
        for c in range(nkb):
            t = dense[:, :, a * bq:(a + 1) * bq, c * bk:(c + 1) * bk]
            flat = t.flatten(2)
            st[:, :, a, c] = torch.where(flat.all(-1), 2, torch.where(flat.any(-1), 1, 0)).to(torch.int8)
    return st


def check_block_mask(bm, dense, bq, bk, exact=True):
    B, H, Nq, Nk = dense.shape
    got = bm.to_dense()
    assert got.dtype == torch.int8
    assert got.dim() == 4 and got.shape[0] in (1, B) and got.shape[1] in (1, H)
    assert tuple(got.shape[2:]) == (-(-Nq // bq), -(-Nk // bk))
    assert tuple(bm.block_size) == (bq, bk)
    assert tuple(bm.shape) == (B, H, Nq, Nk)
    got = got.expand(B, H, *got.shape[2:])
    want = block_states(dense, bq, bk)
    # soundness: a skipped block has nothing visible, a full block has everything visible
    assert torch.all(want[got == 0] == 0), "a skipped block has visible elements"
    assert torch.all(want[got == 2] == 2), "a block marked full has masked elements"
    if exact:
        assert torch.equal(got, want), f"block states differ:\n{got}\nvs\n{want}"
    visited = (got > 0).double().mean().item()
    assert math.isclose(bm.density, visited, rel_tol=1e-6, abs_tol=1e-9)


ANALYTIC = [
    ("causal", lambda: qkv.masks.causal(), lambda B, H, Nq, Nk: def_causal(B, H, Nq, Nk)),
    ("causal_tl", lambda: qkv.masks.causal("top_left"), lambda B, H, Nq, Nk: def_causal(B, H, Nq, Nk, "top_left")),
    ("window", lambda: qkv.masks.sliding_window(5, 0), lambda B, H, Nq, Nk: def_window(B, H, Nq, Nk, 5, 0)),
    ("window2", lambda: qkv.masks.sliding_window(3, 9), lambda B, H, Nq, Nk: def_window(B, H, Nq, Nk, 3, 9)),
    ("chunked", lambda: qkv.masks.chunked(6), None),
    ("padding", lambda: qkv.masks.padding(torch.tensor([17, 3])), None),
    ("prefix", lambda: qkv.masks.prefix_lm(9), None),
    ("document", lambda: qkv.masks.document(torch.tensor([0] * 7 + [1] * 12 + [2] * 14)[:33]), None),
]


BM_SIZES = [(33, 33, 8, 8), (19, 33, 4, 8), (33, 20, 8, 4), (33, 33, 16, 5)]


@pytest.mark.parametrize("name,make,_d,Nq,Nk,bq,bk",
                         [(*a, *sz) for a in ANALYTIC for sz in BM_SIZES
                          if a[0] != "document" or sz[0] <= sz[1]],  # document ids cover the keys: Nq <= Nk
                         ids=lambda x: x if isinstance(x, str) else None)
def test_block_mask_matches_elementwise(name, make, _d, Nq, Nk, bq, bk):
    m = make()
    B = 2
    dense = evaluate(m, B, 1, Nq, Nk)
    if _d is not None:  # the analytic definitions agree with ours too
        assert torch.equal(dense, _d(B, 1, Nq, Nk))
    bm = qkv.block_mask(m, B, 1, Nq, Nk, block_size=(bq, bk))
    check_block_mask(bm, dense, bq, bk, exact=True)


def test_block_mask_generic_mask_mod_depends_on_b_and_h():
    def mm(b, h, q, kv):
        return ((q * 3 + kv * (h + 1) + b) % 7 < 2) | (kv == q)

    B, H, N = 2, 3, 37
    bm = qkv.block_mask(mm, B, H, N, N, block_size=8)
    check_block_mask(bm, eval_mask_mod(mm, B, H, N, N), 8, 8, exact=True)
    assert bm.to_dense().shape[:2] == (B, H)


def test_block_mask_from_bool_tensor_broadcast():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(1, 3, 20, 30, generator=g) < 0.05
    t[:, :, :8, :8] = True
    bm = qkv.block_mask(t, 2, 3, 20, 30, block_size=(8, 8))
    check_block_mask(bm, t.expand(2, 3, 20, 30), 8, 8, exact=True)


@pytest.mark.parametrize("name,make,_d", [("longformer", lambda: qkv.masks.longformer(3, 2), None),
                                          ("dilated", lambda: qkv.masks.dilated(3, 2), None),
                                          ("bigbird", lambda: qkv.masks.bigbird(3, 1, 1, block_size=8, seed=1), None),
                                          ("not_causal", lambda: qkv.masks.not_mask(qkv.masks.causal()), None),
                                          ("or", lambda: qkv.masks.or_masks(qkv.masks.causal(),
                                                                            qkv.masks.chunked(5)), None)])
def test_block_mask_sound_for_composites(name, make, _d):
    m = make()
    dense = evaluate(m, 1, 1, 40, 40)
    bm = qkv.block_mask(m, 1, 1, 40, 40, block_size=8)
    check_block_mask(bm, dense, 8, 8, exact=False)


def test_causal_density():
    bm = qkv.block_mask(qkv.masks.causal(), 1, 1, 1024, 1024, block_size=128)
    nb = 8
    assert math.isclose(bm.density, (nb * (nb + 1) / 2) / nb**2, rel_tol=1e-9)
    assert 0.5 < bm.density <= 0.5 + 1.0 / nb + 1e-9
    d = bm.to_dense()[0, 0]
    below = torch.tril(torch.ones(8, 8, dtype=torch.bool), -1)
    assert torch.all(torch.diagonal(d) == 1) and torch.all(torch.tril(d, -1)[below] == 2)
    assert bm.to_dense().shape == (1, 1, 8, 8)


def test_window_density_small():
    bm = qkv.block_mask(qkv.masks.sliding_window(255, 0), 1, 1, 8192, 8192, block_size=128)
    # 256 keys out of 8192: at most 3 blocks per block-row are visited
    assert bm.density <= 3 / 64 + 1e-9


def test_default_block_size_and_repr():
    bm = qkv.block_mask(qkv.masks.causal(), 1, 1, 300, 300)
    bq, bk = bm.block_size
    assert bm.to_dense().shape[-2:] == (-(-300 // bq), -(-300 // bk))
    repr(bm)


def test_block_mask_huge_causal_is_analytic():
    # N = 2**18: one dense N×N bool mask would be 64 GiB; the analytic build is O(number of blocks).
    N = 1 << 18
    bm = qkv.block_mask(qkv.masks.causal(), 1, 1, N, N, block_size=1024)
    assert bm.to_dense().shape == (1, 1, 256, 256)
    assert 0.5 < bm.density < 0.51


def test_block_mask_generic_evaluates_one_block_row_at_a_time():
    N, bq = 2048, 64
    seen = []

    def mm(b, h, q, kv):
        out = (kv <= q) & ((q - kv) % 3 != 1)
        seen.append(torch.broadcast_shapes(b.shape, h.shape, q.shape, kv.shape, out.shape))
        return out

    bm = qkv.block_mask(mm, 1, 2, N, N, block_size=bq)
    biggest = max(math.prod(s) for s in seen)
    assert biggest <= 2 * bq * N, f"mask_mod evaluated on {max(seen, key=math.prod)}: O(N^2) memory"
    d = bm.to_dense()
    assert d.shape[-2:] == (N // bq, N // bq)
    assert torch.all(torch.triu(d[0, 0], 1) == 0) and torch.all(torch.diagonal(d[0, 0]) == 1)


def test_block_mask_zero_sizes():
    bm = qkv.block_mask(qkv.masks.causal(), 1, 1, 0, 0)
    assert bm.density == 0.0
    bm = qkv.block_mask(qkv.masks.causal(), 1, 1, 0, 16, block_size=8)
    assert bm.to_dense().numel() == 0


def test_block_mask_rejects_bad_inputs():
    with pytest.raises(ValueError, match="mask"):
        qkv.block_mask(torch.ones(3, 5, dtype=torch.bool), 1, 1, 4, 4)
    with pytest.raises(TypeError, match="mask"):
        qkv.block_mask(torch.ones(4, 4), 1, 1, 4, 4)
    with pytest.raises(ValueError, match="block_size"):
        qkv.block_mask(qkv.masks.causal(), 1, 1, 4, 4, block_size=0)
    with pytest.raises(ValueError, match="Nq"):
        qkv.block_mask(qkv.masks.causal(), 1, 1, -1, 4)


# --------------------------------------------------------------- masks through attention (vs the oracle)

MASK_CASE_NAMES = ["causal_tl", "causal_br", "window", "document", "prefix", "padding", "chunked", "dilated",
                   "longformer", "and_not"]


def mask_case(name):
    """(qkv mask, my definition) for Nq = 20, Nk = 24 (bottom-right offset 4)."""
    ids = torch.tensor([0] * 5 + [1] * 9 + [2] * 10)
    L = torch.tensor([24, 7])
    M = qkv.masks
    return {
        "causal_tl": (M.causal("top_left"), lambda b, h, q, kv: kv <= q),
        "causal_br": (M.causal(), lambda b, h, q, kv: kv <= q + 4),
        "window": (M.sliding_window(3, 2), lambda b, h, q, kv: (kv >= q + 4 - 3) & (kv <= q + 4 + 2)),
        "document": (M.document(ids), lambda b, h, q, kv: ids[q + 4] == ids[kv]),
        "prefix": (M.prefix_lm(6), lambda b, h, q, kv: (kv <= q + 4) | (kv < 6)),
        "padding": (M.padding(L), lambda b, h, q, kv: kv < L[b]),
        "chunked": (M.chunked(5), lambda b, h, q, kv: (q + 4) // 5 == kv // 5),
        "dilated": (M.dilated(3, 2),
                    lambda b, h, q, kv: ((q + 4 - kv) >= 0) & ((q + 4 - kv) <= 6) & ((q + 4 - kv) % 2 == 0)),
        "longformer": (M.longformer(2, 1), lambda b, h, q, kv: ((q + 4 - kv).abs() <= 2) | (kv < 1) | (q + 4 < 1)),
        "and_not": (M.and_masks(M.causal(), M.not_mask(M.chunked(8))),
                    lambda b, h, q, kv: (kv <= q + 4) & ((q + 4) // 8 != kv // 8)),
    }[name]


@pytest.mark.parametrize("name", MASK_CASE_NAMES)
@pytest.mark.parametrize("as_block_mask", [False, True])
def test_mask_through_tiled_attention(name, as_block_mask):
    m, mine = mask_case(name)
    q, k, v = make_qkv(2, 2, 2, 20, 24, 16, dtype=torch.float32, seed=7)
    mask = qkv.block_mask(m, 2, 2, 20, 24, block_size=8) if as_block_mask else m
    compare("tiled", q, k, v, mask=mask, oracle_mask=mine, grad=True)


# -------------------------------------------------------------------------- arguments and immutability

def test_block_mask_from_a_tensor_is_immutable():
    # a BlockMask kept a reference to the tensor it was built from: editing it afterwards made tiled/auto
    # differ from reference by ~1
    N = 256
    m = torch.ones(N, N, dtype=torch.bool).tril()
    bm = qkv.block_mask(m, 1, 1, N, N)
    m.fill_(True)
    q, k, v = make_qkv(1, 1, 1, N, N, 16, seed=1)
    want = qkv.attention(q, k, v, causal=True, backend="reference")
    for backend in ("reference", "tiled", "auto", "sdpa"):
        torch.testing.assert_close(qkv.attention(q, k, v, mask=bm, backend=backend), want, rtol=0, atol=1e-5)
    # the copy keeps broadcast dimensions at size 1 (an expanded mask is not materialised)
    big = torch.ones(1, 1, N, N, dtype=torch.bool).tril().expand(4, 8, N, N)
    assert qkv.block_mask(big, 4, 8, N, N).tensor.shape == (1, 1, N, N)


def test_mask_arguments_are_copied():
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    lens = torch.tensor([2, 6])
    doc, pad = qkv.masks.document(ids), qkv.masks.padding(lens)
    ids.fill_(0)
    lens.fill_(6)
    i, j = torch.arange(6).view(-1, 1), torch.arange(6).view(1, -1)
    got = doc.bind(6, 6)(torch.zeros(1, 1, 1, 1, dtype=torch.long), 0, i, j)
    assert not bool(got[..., 0, 3])
    assert not bool(pad.bind(6, 6)(torch.tensor(0).view(1, 1, 1, 1), 0, i, j)[..., 0, 4])


@pytest.mark.parametrize("make,match", [
    (lambda: qkv.masks.prefix_lm(-1), "prefix_len.*>= 0.*-1"),
    (lambda: qkv.masks.prefix_lm(torch.tensor([2, -3])), "prefix_len.*>= 0"),
    (lambda: qkv.masks.prefix_lm(torch.zeros(2, 2, dtype=torch.long)), r"prefix_len.*\(B,\)"),
    (lambda: qkv.masks.padding(torch.tensor([3, -1])), "kv_lens.*>= 0.*-1"),
    (lambda: qkv.masks.padding(torch.tensor([3, 1]), q_lens=torch.tensor([-2, 1])), "q_lens.*>= 0"),
    (lambda: qkv.masks.padding(torch.ones(2, 2, dtype=torch.long)), r"kv_lens.*\(B,\)"),
    (lambda: qkv.masks.longformer(2, -1), "global_tokens.*>= 0"),
    (lambda: qkv.masks.document(torch.zeros(2, 2, 2, dtype=torch.long)), r"ids.*\(N,\) or \(B, N\)"),
])
def test_bad_mask_arguments_raise_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("mask,match", [
    (lambda: qkv.masks.document(torch.zeros(5, dtype=torch.long)), r"ids has 5 entries.*Nk=8"),
    (lambda: qkv.masks.document(torch.zeros(8, dtype=torch.long), q_ids=torch.zeros(3, dtype=torch.long)),
     r"q_ids has 3 entries.*Nq=8"),
    (lambda: qkv.masks.document(torch.zeros(3, 8, dtype=torch.long)), r"ids has 3 rows.*B=2"),
    (lambda: qkv.masks.padding(torch.tensor([3, 4, 5])), r"kv_lens has 3 entries.*B=2"),
    (lambda: qkv.masks.padding(torch.tensor([3, 4]), q_lens=torch.tensor([1])), r"q_lens has 1 entries.*B=2"),
    (lambda: qkv.masks.prefix_lm(torch.tensor([1, 2, 3])), r"prefix_len has 3 entries.*B=2"),
    (lambda: qkv.masks.or_masks(qkv.masks.causal(), qkv.masks.document(torch.zeros(5, dtype=torch.long))),
     r"ids has 5 entries"),
])
def test_mask_arguments_are_checked_against_the_call(mask, match):
    # document(ids) with len(ids) != Nk quietly made rows 0; a padding of the wrong batch length passed
    q, k, v = make_qkv(2, 1, 1, 8, 8, 4)
    for backend in ("reference", "tiled", "auto"):
        with pytest.raises(ValueError, match=match):
            qkv.attention(q, k, v, mask=mask(), backend=backend)
    with pytest.raises(ValueError, match=match):
        qkv.block_mask(mask(), 2, 1, 8, 8)


def test_document_ids_of_one_batch_row_broadcast():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    got = evaluate(qkv.masks.document(ids), 3, 1, 6, 6)
    assert torch.equal(got, full(ids[0][:, None] == ids[0][None, :], 3, 1, 6, 6))


def test_mod_state_evaluates_in_bounded_chunks():
    # a plain mask_mod's block states (auto's density, the tiled engine's schedule) were evaluated one
    # block-row against all keys: O(bq·Nk) int64 temporaries per step, unbounded in N
    from qkv.core import masks
    seen = [0]

    def mm(b, h, i, j):
        seen[0] = max(seen[0], torch.broadcast_shapes(b.shape, h.shape, i.shape, j.shape).numel())
        return (i // 200 + j // 900) % 3 != 0              # empty, full and partial blocks

    old = masks.EVAL_ELEMENTS
    masks.EVAL_ELEMENTS = 128 * 512
    try:
        bm = qkv.block_mask(mm, 1, 2, 1000, 5000)
    finally:
        masks.EVAL_ELEMENTS = old
    assert seen[0] <= 128 * 512
    i, j = torch.arange(1000).view(-1, 1), torch.arange(5000).view(1, -1)
    dense = ((i // 200 + j // 900) % 3 != 0)[None, None]
    want = qkv.block_mask(dense, 1, 1, 1000, 5000)               # states from the whole mask at once
    assert torch.equal(bm.to_dense(), want.to_dense()) and set(bm.to_dense().unique().tolist()) == {0, 1, 2}
