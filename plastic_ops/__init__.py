"""plastic_ops: fused differentiable Hebbian plasticity for PyTorch.

plastic_linear / plastic_rnn run a whole sequence of plastic steps for a batch of
independent episodes in one fused op (C++ on the CPU, CUDA on the GPU), with a
hand-written checkpointed backward. plastic_ops.reference is the same op in plain
PyTorch; plastic_ops.nn has the layers. The math: docs/op_spec.md.
"""
from . import reference
from ._extension import available as extension_available
from .ops import plastic_linear, plastic_rnn
from . import nn

__version__ = "0.1.0"
__all__ = ["plastic_linear", "plastic_rnn", "reference", "nn", "extension_available"]
