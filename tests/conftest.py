import pytest
import torch

import plastic_ops
from plastic_ops import ops

from _global_state import restore_global_state, snapshot_global_state

# Every op test runs on the CPU and, when a GPU is present, on CUDA too (skipped otherwise).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(autouse=True, scope="session")
def _extension_built():
    # The fused op is the product: a missing build is a failure, not a skip.
    assert plastic_ops.extension_available(), "plastic_ops._C is not built (python setup.py build_ext --inplace)"


@pytest.fixture(autouse=True)
def _no_global_state_left_behind():
    """Fails a test that leaves torch's process-wide state changed, then restores it for the next test.

    A changed default dtype, thread count or flush-to-zero mode (which loading some compiled code sets)
    changes the results of every later test: clip = 5e-324 then arrives in the op as 0.0.
    """
    before = snapshot_global_state()
    yield
    after = snapshot_global_state()
    if after != before:
        restore_global_state(before)
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        pytest.fail(f"the test left global state changed (name: (before, after)): {changed}", pytrace=False)


@pytest.fixture
def keep_traces_bytes():
    """ops.set_keep_traces_bytes for one test: the policy's byte limit is restored afterwards."""
    saved = (ops._LIMIT_OVERRIDE, ops._LIMIT_ERROR)
    yield ops.set_keep_traces_bytes
    ops._LIMIT_OVERRIDE, ops._LIMIT_ERROR = saved


@pytest.fixture
def inductor():
    """For a test that runs code compiled by inductor: torch 2.4 and 2.5 switch flush-to-zero on for the
    whole process when they load it. Restored here, so that no later test inherits it."""
    from _global_state import _flushes_denormals
    before = _flushes_denormals()
    yield
    torch.set_flush_denormal(before)
