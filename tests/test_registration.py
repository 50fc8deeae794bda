"""The registered ops: opcheck (schema, fake kernels, autograd registration), torch.compile, no-grad path."""
import pytest
import torch

import plastic_ops
from plastic_ops import ops
from plastic_ops.nn import PlasticLinear, PlasticRNN

from conftest import DEVICES


def canonical(form, T=5, B=2, n_in=4, n_out=6, K=2, requires_grad=True, device="cpu", dtype=torch.float64):
    if form == "rnn":
        n_in = n_out
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)  # noqa: E731
    pre = r(T, B, n_in) if form == "linear" else r(B, n_out)
    return (pre, r(T, B, n_out), r(n_in, n_out) * 0.3, r(n_in, n_out) * 0.3,
            (0.2 * torch.rand(T, B, n_out, generator=g, dtype=dtype)).to(device).requires_grad_(requires_grad),
            r(B, n_in, n_out) * 0.1, "hebb", "tanh", 0.5, K)


def leafify(args):
    return tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["linear", "rnn"])
def test_opcheck_forward(form, device):
    op = getattr(torch.ops.plastic_ops, f"plastic_{form}_forward").default
    torch.library.opcheck(op, leafify(canonical(form, device=device)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["linear", "rnn"])
def test_opcheck_backward(form, device):
    fwd = getattr(torch.ops.plastic_ops, f"plastic_{form}_forward")
    args = leafify(canonical(form, requires_grad=False, device=device))
    y, hT, ckpts = fwd(*args)
    pre, _, w, alpha, e = args[:5]
    bwd = getattr(torch.ops.plastic_ops, f"plastic_{form}_backward").default
    torch.library.opcheck(bwd, (torch.randn_like(y), torch.randn_like(hT), pre, w, alpha, e, y, ckpts,
                                "hebb", "tanh", 0.5, 2))


@pytest.mark.parametrize("T,K", [(1, 1), (5, 2), (106, 10), (7, 100)])
def test_checkpoint_count(T, K):
    args = list(canonical("rnn", T=T, K=K, requires_grad=False))
    _, _, ckpts = torch.ops.plastic_ops.plastic_rnn_forward(*args)
    assert ckpts.shape[0] == ops.num_checkpoints(T, K) == -(-T // K)
    # checkpoint 0 is the initial trace
    torch.testing.assert_close(ckpts[0], args[5])


def test_default_checkpoint_interval_is_about_sqrt_T():
    assert ops.default_checkpoint_every(106) == 10
    assert ops.default_checkpoint_every(1) == 1


def test_no_grad_forward_saves_no_checkpoint_and_matches():
    args = list(canonical("linear", requires_grad=False))
    args[-1] = 0
    y0, h0, ck0 = torch.ops.plastic_ops.plastic_linear_forward(*args)
    args[-1] = 3
    y3, h3, ck3 = torch.ops.plastic_ops.plastic_linear_forward(*args)
    assert ck0.shape[0] == 0 and ck3.shape[0] == 2
    torch.testing.assert_close(y0, y3)
    torch.testing.assert_close(h0, h3)


def test_forward_under_no_grad_equals_forward_with_grad():
    torch.manual_seed(0)
    layer = PlasticRNN(8, dtype=torch.float64)
    u = torch.randn(6, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        y1, h1 = layer(u)
    y2, h2 = layer(u)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(h1, h2)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(5, 8)
        self.rnn = PlasticRNN(8, clip=1.0)
        self.out = PlasticLinear(8, 3, activation="softmax", alpha="output")

    def forward(self, x):
        h, _ = self.rnn(self.inp(x))
        y, _ = self.out(h)
        return y


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile(backend, inductor):
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(6, 2, 5)
    expected = net(x)
    g_expected = torch.autograd.grad(expected.log().sum(), list(net.parameters()))
    torch._dynamo.reset()
    compiled = torch.compile(net, backend=backend, fullgraph=True)
    got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    g_got = torch.autograd.grad(got.log().sum(), list(net.parameters()))
    for a, b in zip(g_got, g_expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_missing_extension_message(monkeypatch):
    from plastic_ops import _extension
    monkeypatch.setattr(_extension, "_error", ImportError("simulated"))
    with pytest.raises(RuntimeError, match="not available.*build_ext"):
        plastic_ops.plastic_linear(torch.randn(2, 1, 3), torch.randn(3, 2), torch.tensor(0.1), 0.1)


@pytest.mark.parametrize("name", ["plastic_linear_forward", "plastic_rnn_forward", "plastic_linear_backward",
                                  "plastic_rnn_backward"])
def test_optional_arguments_come_last_with_defaults(name):
    # direct calls written before the per-step flags and neuromodulation existed keep working
    schema = getattr(torch.ops.plastic_ops, name).default._schema
    last = schema.arguments[-3:]
    assert [a.name for a in last] == ["steps", "mod", "elig_rate"]
    assert all(str(a.type) == "Optional[Tensor]" and a.default_value is None for a in last)


@pytest.mark.parametrize("form", ["linear", "rnn"])
def test_opcheck_with_steps(form):
    args = list(leafify(canonical(form)))
    steps = torch.zeros(5, 2, dtype=torch.uint8)
    steps[0, 0], steps[2, 1], steps[3, 0], steps[4, 1] = 1, 2, 3, 2
    op = getattr(torch.ops.plastic_ops, f"plastic_{form}_forward").default
    torch.library.opcheck(op, tuple(args) + (steps,))


def test_torch_compile_with_reset_and_lengths():
    torch.manual_seed(0)
    net = PlasticRNN(8, clip=1.0)
    u = torch.randn(6, 3, 8)
    reset = torch.zeros(6, 3, dtype=torch.bool)
    reset[3, 1] = True

    def f(u, reset, lengths):
        y, h = plastic_ops.plastic_rnn(u, net.weight, net.alpha, net.eta, reset=reset, lengths=lengths)
        return y.square().sum() + h.sum()

    lengths = torch.tensor([6, 4, 2])
    expected = f(u, reset, lengths)
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(u, reset, lengths)
    torch.testing.assert_close(got, expected)
