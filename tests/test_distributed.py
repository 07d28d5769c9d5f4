"""qkv.distributed on real gloo process groups (127.0.0.1): ring attention against single-process
``qkv.attention`` on the gathered tensors, the blocks it skips, layouts, SelfAttention with a process group, and
what happens when calls mismatch or a rank dies.

Two spawns of 4 processes serve every test (tests/_ring_worker.py runs the cases; the tests read the results):
one for the cases (4-rank world and two 2-rank subgroups at once), one for the failures.
"""
import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

EXACT = 1e-9            # the bar: fp64 ring vs fp64 single process
FAIL_TIMEOUT = 4.0      # the failure spawn's group timeout (seconds)


@pytest.fixture(scope="module")
def runs():
    from _ring_worker import spawn
    res = spawn("cases", 4, timeout_s=120.0, wait_s=900.0)
    assert sorted(res) == [0, 1, 2, 3], f"ranks that reported: {sorted(res)}"
    for r, x in res.items():
        assert "crash" not in x, f"rank {r} crashed:\n{x['crash']}"
    return res


@pytest.fixture(scope="module")
def failures():
    from _ring_worker import spawn
    return spawn("failures", 4, timeout_s=FAIL_TIMEOUT, wait_s=120.0)


def _case(runs, key):
    out = []
    for r in range(4):
        x = runs[r][key]
        assert "error" not in x, f"rank {r}, {key}:\n{x['error']}"
        out.append(x)
    return out


def _assert_exact(rs, tol=EXACT):
    for r, x in enumerate(rs):
        for name in ("out", "dq", "dk", "dv"):
            assert x[name] <= tol, f"rank {r}: {name} differs from single-process attention by {x[name]:.3e}"
        assert x["lse"] <= 1e-5, f"rank {r}: lse differs by {x['lse']:.3e}"   # lse is returned in fp32
        assert x["lse_inf_match"], f"rank {r}: rows without visible keys differ"
        assert x["dtype"] == "torch.float64"


# ------------------------------------------------------------------------------------------------- the bar

BAR = ["causal zigzag", "causal contiguous", "full contiguous", "window contiguous", "window zigzag", "gqa",
       "document"]


@pytest.mark.parametrize("name", BAR)
def test_bar_four_ranks(runs, name):
    """Every rank's output and the gathered dq, dk, dv equal single-process qkv.attention in fp64 (1e-9)."""
    _assert_exact(_case(runs, ("world", name)))


@pytest.mark.parametrize("name", BAR)
def test_bar_two_ranks_subgroups(runs, name):
    """The same on two 2-rank subgroups at once ({0, 1} and {2, 3}: group ranks differ from global ranks)."""
    _assert_exact(_case(runs, ("pair", name)))


@pytest.mark.parametrize("name", ["full zigzag", "document contiguous", "document fn", "blockmask",
                                  "blockmask tensor", "bool tensor", "alibi softcap window", "lse grads",
                                  "odd chunks dv", "reference engine"])
def test_semantics_four_ranks(runs, name):
    rs = _case(runs, ("world", name))
    _assert_exact(rs)
    if name == "bool tensor":
        assert rs[0]["rows_without_keys"] > 0       # the case holds rows that see nothing (0 out, lse -inf)


def test_random_calls_four_ranks(runs):
    """Random layouts, lengths (down to 1 position per chunk), head dims, GQA, windows, masks and mods
    (``QKV_RING_EXAMPLES`` of them, default 8)."""
    keys = [k for k in runs[0] if isinstance(k, tuple) and k[0] == "random"]
    assert keys
    for key in keys:
        rs = _case(runs, key)
        try:
            _assert_exact(rs)
        except AssertionError as e:
            raise AssertionError(f"{rs[0]['case']}: {e}") from None


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_low_precision_flash_attention_rule(runs, dtype):
    """fp32 (the CPU kernel per block) and bf16: within FlashAttention's rule of the fp64 oracle."""
    for r in range(4):
        assert runs[r][("fa", dtype)] == "ok", f"rank {r}: {runs[r][('fa', dtype)]}"


# ------------------------------------------------------------------------------------------- skipped work

def test_causal_zigzag_computes_at_most_55_percent(runs):
    """Causal zigzag: ≤ 55% of the score tiles of a ring that skips nothing, in forward and backward, spread
    evenly over the ranks; contiguous does the same total work, unevenly."""
    for phase in ("forward", "backward"):
        zz = [runs[r][("count", "zigzag")][phase] for r in range(4)]
        frac = sum(x["tiles"] for x in zz) / sum(x["tiles_dense"] for x in zz)
        assert frac <= 0.55, f"{phase}: zigzag computed {frac:.1%} of the dense ring's tiles"
        assert frac >= 0.5                                  # the causal triangle itself: nothing was dropped
        per_rank = [x["tiles"] for x in zz]
        assert max(per_rank) <= 1.05 * min(per_rank), f"zigzag tiles per rank {per_rank}"
        ct = [runs[r][("count", "contiguous")][phase]["tiles"] for r in range(4)]
        assert max(ct) >= 3 * min(ct), f"contiguous tiles per rank {ct}"
        assert sum(ct) == sum(per_rank)
        # one engine call per step: the own keys causally in local order, then the visible half of each block
        assert all(x["engine_calls"] == 4 and x["blocks"] == 9 for x in zz), zz


def test_window_runs_only_the_steps_in_reach(runs):
    """window (255, 0) with 256 positions per rank: each rank needs its own keys and its left neighbour's, so
    the ring stops after 2 of 4 steps, sending the keys once in the forward."""
    for r in range(4):
        f = runs[r][("world", "window contiguous")]["forward"]
        assert f["steps"] == 2
        assert f["blocks"] == (1 if r == 0 else 2)
        # 128-tiles: the own block's lower triangle (3 of 4) and 3 of the left neighbour's 4 (the band's edge)
        assert f["tiles"] == (3 if r == 0 else 6) and f["tiles_dense"] == 16


def test_communication_volume(runs):
    """Forward: W−1 hops of this rank's keys and values; backward: W−1 of them plus W of their fp32 grads."""
    for r in range(4):
        c = runs[r][("count", "zigzag")]
        assert c["forward"]["bytes_sent"] == 3 * c["kv_bytes"]
        assert c["backward"]["bytes_sent"] == 3 * c["kv_bytes"] + 4 * c["kv_bytes"]


# ---------------------------------------------------------------------------------------- mismatched calls

@pytest.mark.parametrize("key, words", [("mismatch shape", "'q'"), ("mismatch layout", "'layout'"),
                                        ("mismatch gather", "'shape'")])
def test_mismatched_calls_raise_on_every_rank(runs, key, words):
    for r in range(4):
        err = runs[r][key]
        assert err is not None and err[0] == "ValueError", f"rank {r}: {err}"
        assert "disagree" in err[1] and words in err[1], err[1]


def test_invalid_argument_on_one_rank_raises_everywhere(runs):
    errs = [runs[r]["bad argument"] for r in range(4)]
    assert errs[2][0] == "ValueError" and "window" in errs[2][1]
    for r in (0, 1, 3):
        assert errs[r][0] == "ValueError" and "rank(s) [2]" in errs[r][1], errs[r]


def test_blockmask_for_the_wrong_size_is_refused(runs):
    for r in range(4):
        err = runs[r]["blockmask wrong size"]
        assert err[0] == "ValueError" and "whole sequence" in err[1]


def test_group_still_works_after_errors(runs):
    _assert_exact(_case(runs, "after errors"))


# ------------------------------------------------------------------------------------------------- layouts

def test_shard_and_gather(runs):
    for r in range(4):
        lay = runs[r]["layouts"]
        for L in ("contiguous", "zigzag"):
            for dim in (1, 2):
                same, shape = lay[(L, dim)]
                assert same and shape[dim] == 4
            assert lay[(L, "positions")] == lay[(L, "shard arange")]
        assert lay[("contiguous", "positions")] == list(range(4 * r, 4 * r + 4))
        assert lay[("zigzag", "positions")] == [2 * r, 2 * r + 1, 14 - 2 * r, 15 - 2 * r]
        err = runs[r]["shard not divisible"]
        assert err[0] == "ValueError" and "8 equal parts" in err[1]


# ------------------------------------------------------------------------------------------------- module

@pytest.mark.parametrize("key", ["world", "pair"])
def test_self_attention_with_a_process_group(runs, key):
    """SelfAttention(process_group=...) on shards (RoPE at global positions, GQA, causal) gives the shard of
    the single-process module's output, and its parameter gradients summed over ranks are the module's."""
    for x in _case(runs, ("module", key)):
        assert x["out"] <= EXACT and x["grads"] <= EXACT, x
        assert x["kv_cache"][0] == "ValueError"


# ------------------------------------------------------------------------------------------------ failures

def test_a_dead_rank_makes_the_others_raise(failures):
    """Rank 1 is killed before its call (rank 0 waits in the argument check), rank 3 in the middle of a ring
    backward (rank 2 waits for its keys and gradients): both survivors raise within the group's timeout."""
    assert 0 in failures and 2 in failures, f"surviving ranks that reported: {sorted(failures)}"
    for r, key in ((0, "dead before the call"), (2, "dies mid-ring")):
        x = failures[r][key]
        assert x["error"] is not None, f"rank {r}: no error"
        assert x["seconds"] <= FAIL_TIMEOUT + 2.0, f"rank {r} raised after {x['seconds']:.1f} s"


def test_a_rank_that_never_calls_makes_the_others_raise_at_the_timeout(failures):
    x = failures[0]["never calls"]
    assert x["error"] is not None
    assert FAIL_TIMEOUT - 0.5 <= x["seconds"] <= FAIL_TIMEOUT + 3.0, x


# ------------------------------------------------------------------------------------- without a process group

def test_without_an_initialised_group_the_calls_say_so():
    from qkv.distributed import gather_sequence, ring_attention, sequence_positions, shard_sequence
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    x = torch.zeros(1, 1, 8, 4)
    for fn in (lambda: ring_attention(x, x, x), lambda: shard_sequence(x), lambda: gather_sequence(x),
               lambda: sequence_positions(8)):
        with pytest.raises(ValueError, match="init_process_group"):
            fn()


def test_self_attention_checks_its_layout():
    import qkv
    with pytest.raises(ValueError, match="sequence_layout"):
        qkv.SelfAttention(16, 2, sequence_layout="striped")
