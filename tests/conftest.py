"""Shared pytest setup for qkv's tests.

* Makes ``src/`` importable when the package is not installed (a fresh checkout running pytest directly).
* Keeps torch to the machine's cores and deterministic seeds per test.
* Registers a small hypothesis profile (few examples, no deadline: CPU timings vary).
"""
import os
import sys

import pytest
import torch

_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
try:  # pragma: no cover - depends on how the tests are run
    import qkv  # noqa: F401
except ImportError:
    if _SRC not in sys.path:
        sys.path.insert(0, _SRC)

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "qkv",
        max_examples=int(os.environ.get("QKV_HYPOTHESIS_EXAMPLES", "25")),
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile("qkv")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def set_options():
    """``set_options(cpu_kernel=False, ...)``: qkv.options for the rest of the test (undone at teardown)."""
    import contextlib

    import qkv

    with contextlib.ExitStack() as stack:
        yield lambda **kw: stack.enter_context(qkv.options(**kw))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
