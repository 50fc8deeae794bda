import pytest
import torch

import plastic_ops

# Every op test runs on the CPU and, when a GPU is present, on CUDA too (skipped otherwise).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(autouse=True, scope="session")
def _extension_built():
    # The fused op is the product: a missing build is a failure, not a skip.
    assert plastic_ops.extension_available(), "plastic_ops._C is not built (python setup.py build_ext --inplace)"
