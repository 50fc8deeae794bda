"""The drop-in layers: shapes, options, episode continuation, step-by-step use, fused vs reference."""
import pytest
import torch

from plastic_ops.nn import PlasticLinear, PlasticRNN


def test_linear_shapes_and_parameters():
    layer = PlasticLinear(7, 4, alpha="input", learn_eta=False)
    y, (h,) = layer(torch.randn(5, 3, 7))
    assert y.shape == (5, 3, 4) and h.shape == (3, 7, 4)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"weight", "alpha", "bias"}
    assert layer.alpha.shape == (7, 1)
    assert "eta" in dict(layer.named_buffers())


@pytest.mark.parametrize("alpha,shape", [("synapse", (6, 6)), ("input", (6, 1)), ("output", (1, 6)),
                                         ("scalar", ())])
def test_rnn_alpha_granularity(alpha, shape):
    layer = PlasticRNN(6, alpha=alpha)
    assert layer.alpha.shape == shape
    y, h = layer(torch.randn(3, 2, 6))
    y.sum().backward()
    assert layer.alpha.grad.shape == shape and layer.eta.grad is not None


def test_initialization_follows_miconi():
    torch.manual_seed(0)
    layer = PlasticRNN(300)
    assert abs(layer.weight.std().item() - 0.01) < 1e-3
    assert abs(layer.alpha.std().item() - 0.01) < 1e-3
    assert layer.eta.item() == pytest.approx(0.01)


def test_batch_first_matches_time_major():
    torch.manual_seed(0)
    a = PlasticLinear(5, 3, batch_first=True, dtype=torch.float64)
    b = PlasticLinear(5, 3, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 5, dtype=torch.float64)  # (B, T, N)
    ya, (ha,) = a(x)
    yb, (hb,) = b(x.transpose(0, 1))
    torch.testing.assert_close(ya, yb.transpose(0, 1))
    torch.testing.assert_close(ha, hb)


def test_rnn_step_by_step_equals_whole_sequence():
    torch.manual_seed(0)
    layer = PlasticRNN(8, dtype=torch.float64, init_std=0.3)
    u = torch.randn(6, 2, 8, dtype=torch.float64)
    y_all, s_all = layer(u)
    state, ys = None, []
    for t in range(6):
        y, state = layer(u[t:t + 1], state)  # a T = 1 call is one step of a cell
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys), y_all)
    torch.testing.assert_close(state, s_all)


def test_linear_continuation_with_modulation():
    torch.manual_seed(0)
    layer = PlasticLinear(4, 5, dtype=torch.float64, init_std=0.3, clip=0.5)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    m = torch.rand(6, 3, 1, dtype=torch.float64)
    y_all, h_all = layer(x, modulation=m)
    y1, h1 = layer(x[:2], modulation=m[:2])
    y2, h2 = layer(x[2:], h1, modulation=m[2:])
    torch.testing.assert_close(torch.cat([y1, y2]), y_all)
    torch.testing.assert_close(h2, h_all)


@pytest.mark.parametrize("cls,args", [(PlasticLinear, (6, 4)), (PlasticRNN, (5,))])
def test_fused_and_reference_impl_agree(cls, args):
    torch.manual_seed(0)
    layer = cls(*args, dtype=torch.float64, init_std=0.2, rule="oja", clip=2.0)
    x = torch.randn(5, 3, layer.in_features, dtype=torch.float64)
    outs = {}
    for impl in ("fused", "reference"):
        layer.impl = impl
        layer.zero_grad()
        y, state = layer(x)
        h = state.trace
        (y.pow(2).sum() + h.sum()).backward()
        outs[impl] = [y.detach(), h.detach()] + [p.grad.clone() for p in layer.parameters()]
    for a, b in zip(outs["fused"], outs["reference"]):
        torch.testing.assert_close(a, b)


def test_bad_layer_options():
    with pytest.raises(ValueError, match="impl must be one of"):
        PlasticLinear(3, 2, impl="triton")
    with pytest.raises(ValueError, match="alpha must be one of"):
        PlasticRNN(3, alpha="row")
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        PlasticLinear(0, 2)
    with pytest.raises(ValueError, match="rule must be one of"):
        PlasticRNN(3, rule="bcm")


def test_trace_of_wrong_batch_is_rejected():
    layer = PlasticRNN(4)
    with pytest.raises(ValueError, match="trace has batch size"):
        layer(torch.randn(3, 2, 4), torch.zeros(5, 4, 4))
