"""torch.autograd.gradcheck of the fused op in float64, against finite differences."""
import pytest
import torch

import plastic_ops

from _inputs import grad_inputs, make_inputs
from conftest import DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation,clip", [("tanh", None), ("sigmoid", 0.4), ("softmax", None),
                                             ("relu", None), ("identity", 0.5)])
@pytest.mark.parametrize("rule", ["hebb", "oja"])
@pytest.mark.parametrize("form", ["linear", "rnn"])
def test_gradcheck(form, rule, activation, clip, device):
    args, mod = make_inputs(form, T=4, B=2, n_in=3, n_out=4, device=device, modulation="per_output", seed=11)
    fn = getattr(plastic_ops, f"plastic_{form}")
    inputs = grad_inputs(args, mod)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def f(*tensors):
        full = list(args)
        for pos, t in zip(positions, tensors[:len(positions)]):
            full[pos] = t
        return fn(*full, modulation=tensors[-1], rule=rule, activation=activation, clip=clip, checkpoint_every=3)

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-6, rtol=1e-5)
