"""torch.autograd.gradcheck of the fused op in float64, against finite differences."""
import pytest
import torch

import plastic_ops

from _inputs import grad_inputs, make_inputs, of_tensors
from conftest import DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation,clip", [("tanh", None), ("sigmoid", 0.4), ("softmax", None),
                                             ("relu", None), ("identity", 0.5)])
@pytest.mark.parametrize("rule", ["hebb", "oja"])
@pytest.mark.parametrize("form", ["linear", "rnn"])
def test_gradcheck(form, rule, activation, clip, device):
    args, mod = make_inputs(form, T=4, B=2, n_in=3, n_out=4, device=device, modulation="per_output", seed=11)
    fn = getattr(plastic_ops, f"plastic_{form}")
    f = of_tensors(fn, args, rule=rule, activation=activation, clip=clip, checkpoint_every=3)
    assert torch.autograd.gradcheck(f, tuple(grad_inputs(args, mod)), eps=1e-6, atol=1e-6, rtol=1e-5)
