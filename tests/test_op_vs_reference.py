"""The fused op against the pure-PyTorch reference: outputs, final trace and every gradient."""
import pytest
import torch

import plastic_ops
from plastic_ops import reference

from _inputs import ALPHA_SHAPES, grad_inputs, loss_of, make_inputs, run
from conftest import DEVICES

FORMS = ("linear", "rnn")
RULES = ("hebb", "oja")
ACTS = ("tanh", "sigmoid", "relu", "identity", "softmax")


def fused_and_ref(form):
    return getattr(plastic_ops, f"plastic_{form}"), getattr(reference, f"plastic_{form}")


def assert_same(form, args, mod, dtype=torch.float64, **kw):
    fused, ref = fused_and_ref(form)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    yf, hf = run(fused, args, mod, **kw)
    yr, hr = run(ref, args, mod, **kw)
    torch.testing.assert_close(yf, yr, **tol, msg="y differs")
    torch.testing.assert_close(hf, hr, **tol, msg="trace_T differs")
    inputs = grad_inputs(args, mod)
    gf = torch.autograd.grad(loss_of(yf, hf), inputs)
    gr = torch.autograd.grad(loss_of(yr, hr), inputs)
    for i, (a, b) in enumerate(zip(gf, gr)):
        assert a.shape == inputs[i].shape
        torch.testing.assert_close(a, b, **tol, msg=f"gradient of input {i} (shape {tuple(b.shape)}) differs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [None, 0.3])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("form", FORMS)
def test_rules_activations_clip(form, rule, activation, clip, device):
    # identity without clip can blow up in the recurrent form: small weights keep it finite.
    args, mod = make_inputs(form, T=6, B=3, n_in=5, n_out=7, device=device, scale=0.3, seed=1)
    assert_same(form, args, mod, rule=rule, activation=activation, clip=clip, checkpoint_every=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("modulation", [None, "shared", "per_output"])
@pytest.mark.parametrize("alpha", ALPHA_SHAPES)
@pytest.mark.parametrize("form", FORMS)
def test_alpha_shapes_and_modulation(form, alpha, modulation, device):
    args, mod = make_inputs(form, T=5, B=2, n_in=4, n_out=6, alpha=alpha, modulation=modulation, device=device,
                            seed=2)
    assert_same(form, args, mod, rule="hebb", activation="tanh", clip=0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T,B,n_in,n_out", [(1, 1, 1, 1), (1, 4, 3, 9), (9, 1, 17, 3), (13, 5, 33, 41),
                                            (4, 3, 70, 300)])
def test_shapes(form, T, B, n_in, n_out, device):
    args, mod = make_inputs(form, T, B, n_in, n_out, device=device, seed=T * 100 + n_in, scale=0.2,
                            modulation="per_output")
    assert_same(form, args, mod, rule="oja", activation="sigmoid", clip=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_optional_arguments_absent(form, device):
    args, mod = make_inputs(form, T=4, B=2, n_in=3, n_out=5, trace=False, bias=False, y0=False, device=device)
    assert_same(form, args, mod)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_float32(form, device):
    args, mod = make_inputs(form, T=8, B=3, n_in=20, n_out=20, dtype=torch.float32, device=device, scale=0.2,
                            modulation="shared")
    assert_same(form, args, mod, dtype=torch.float32, rule="hebb", activation="tanh")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 2, 3, 7, 8, 50])
def test_checkpoint_interval_does_not_change_results(K, device):
    args, mod = make_inputs("rnn", T=7, B=2, n_in=6, n_out=6, device=device, seed=5)
    assert_same("rnn", args, mod, rule="hebb", activation="tanh", clip=0.4, checkpoint_every=K)


def test_miconi_configuration_float32():
    """The pattern-memorization setting at a reduced size: N=64, T=26, tanh, hebb, per-synapse alpha."""
    torch.manual_seed(0)
    N, T, B = 64, 26, 2
    u = (20 * torch.sign(torch.randn(T, B, N))).requires_grad_()
    w = (0.01 * torch.randn(N, N)).requires_grad_()
    alpha = (0.01 * torch.randn(N, N)).requires_grad_()
    eta = torch.tensor(0.01, requires_grad=True)
    args = [u, w, alpha, eta, None, None, None]
    assert_same("rnn", args, None, dtype=torch.float32)
