"""plastic_ops: fused differentiable Hebbian plasticity for PyTorch.

plastic_linear / plastic_rnn run a whole sequence of plastic steps for a batch of
independent episodes in one fused op (C++ on the CPU, CUDA on the GPU), with a
hand-written checkpointed backward. plastic_ops.reference is the same op in plain
PyTorch; plastic_ops.nn has the layers. The math: docs/op_spec.md. What was built:
`python -m plastic_ops.info`.
"""
__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

from . import reference  # noqa: E402
from ._extension import available as extension_available  # noqa: E402
from .ops import plastic_linear, plastic_rnn  # noqa: E402
from . import nn  # noqa: E402

__all__ = ["plastic_linear", "plastic_rnn", "reference", "nn", "extension_available"]
