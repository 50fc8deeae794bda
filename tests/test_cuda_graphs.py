"""Small batches through CUDA graphs (docs/cuda.md, "Small batches: CUDA graphs").

A captured graph replays the op's kernels without the host: nothing in a call may wait on the device
(a value read back to the host) or change with the data. The first tests check that on every device: the
public functions, the layers and their backward run under a dispatch mode that records every aten op,
and none of them may be one that reads a tensor's value on the host. The others capture forward and
backward into a CUDA graph, replay it on new inputs and compare it with eager calls (skipped without a
GPU).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import plastic_ops
from plastic_ops import info
from plastic_ops.nn import PlasticLinear, PlasticRNN

from conftest import DEVICES

# aten ops that bring a tensor's value to the host: each one blocks on the device, and is refused
# while a CUDA stream is being captured
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "allclose", "masked_select",
              "unique", "_unique2", "tolist"}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


class RecordOps(TorchDispatchMode):
    """Records the name of every op dispatched (aten ops as 'aten.name', the extension's as 'plastic_ops.name')."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(f"{func.namespace}.{func._schema.name.split('::')[-1]}")
        return func(*args, **(kwargs or {}))

    def host_reads(self):
        return sorted({n for n in self.names if n.split(".", 1)[1] in HOST_READS})


def _run_op(form, device, alpha_shape, modulation, clip):
    g = torch.Generator().manual_seed(0)
    T, B, n_in, n_out = 4, 3, 5, 6
    if form == "rnn":
        n_in = n_out
    r = lambda *s: torch.randn(s, generator=g).to(device)  # noqa: E731
    x = r(T, B, n_in).requires_grad_()
    w = (0.3 * r(n_in, n_out)).requires_grad_()
    a_shape = {"synapse": (n_in, n_out), "output": (1, n_out), "scalar": ()}[alpha_shape]
    alpha = (0.3 * r(*a_shape)).requires_grad_()
    eta = torch.tensor(0.2, device=device, requires_grad=True)
    bias = r(n_out).requires_grad_()
    mod = r(T, B, 1).requires_grad_() if modulation else None
    trace = (0.1 * r(B, n_in, n_out)).requires_grad_()
    if form == "rnn":
        y, hT = plastic_ops.plastic_rnn(x, w, alpha, eta, trace, r(B, n_out), bias, modulation=mod, clip=clip,
                                        checkpoint_every=2)
    else:
        y, hT = plastic_ops.plastic_linear(x, w, alpha, eta, trace, bias, modulation=mod, clip=clip,
                                           checkpoint_every=2)
    (y.square().sum() + hT.sum()).backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["linear", "rnn"])
@pytest.mark.parametrize("alpha_shape, modulation, clip", [("synapse", False, None), ("output", True, 0.5),
                                                           ("scalar", True, None)])
def test_op_reads_no_value_back(device, form, alpha_shape, modulation, clip):
    with RecordOps() as rec:
        _run_op(form, device, alpha_shape, modulation, clip)
    # the fused kernels and their backward ran under the mode: the check saw the whole call
    assert f"plastic_ops.plastic_{form}_forward" in rec.names
    assert f"plastic_ops.plastic_{form}_backward" in rec.names
    assert rec.host_reads() == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_cls", [PlasticLinear, PlasticRNN])
def test_layers_read_no_value_back(device, layer_cls):
    torch.manual_seed(0)
    layer = (layer_cls(5, 5, alpha="input", learn_eta=True, clip=1.0) if layer_cls is PlasticLinear
             else layer_cls(5, alpha="input", learn_eta=True, clip=1.0)).to(device)
    x = torch.randn(4, 2, 5, device=device)
    with RecordOps() as rec:
        y, state = layer(x)
        (y.sum() + state.trace.sum()).backward()
    assert any(n.endswith("_backward") and n.startswith("plastic_ops.") for n in rec.names)
    assert rec.host_reads() == []


def test_the_check_sees_a_host_read():
    """The recorder is not blind: .item() and a tensor's truth value are reported."""
    t = torch.tensor([1.5, 2.0])
    for read in (lambda: t.sum().item(), lambda: bool(t[0] > 1), lambda: float(t[1])):
        with RecordOps() as rec:
            read()
        assert rec.host_reads() == ["aten._local_scalar_dense"]


# ------------------------------------------------------------------------------ on a GPU: capture and replay

def _static_inputs(form, B, T=6, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(s, generator=g).cuda()  # noqa: E731
    x = r(T, B, n)
    w = (0.1 * r(n, n)).requires_grad_()
    alpha = (0.1 * r(n, n)).requires_grad_()
    eta = torch.tensor(0.1, device="cuda", requires_grad=True)
    gy = r(T, B, n)
    return x, w, alpha, eta, gy


def _step(form, x, w, alpha, eta, gy):
    fn = plastic_ops.plastic_rnn if form == "rnn" else plastic_ops.plastic_linear
    y, hT = fn(x, w, alpha, eta, clip=2.0)
    grads = torch.autograd.grad((y * gy).sum() + hT.square().sum(), (w, alpha, eta))
    return (y.detach(), hT.detach(), *grads)


@needs_cuda
@pytest.mark.parametrize("path", ["v1", "v2"])
@pytest.mark.parametrize("form", ["linear", "rnn"])
@pytest.mark.parametrize("B", [1, 5])
def test_graph_replay_matches_eager(monkeypatch, path, form, B):
    monkeypatch.setenv(info.CUDA_KERNELS_VAR, path)  # read at dispatch: the captured kernels are this path's
    static = _static_inputs(form, B)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        for _ in range(2):
            _step(form, *static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _step(form, *static)
    for seed in (1, 2):  # new values in the same buffers, then one replay
        fresh = _static_inputs(form, B, seed=seed)
        with torch.no_grad():
            for s, f in zip(static, fresh):
                s.copy_(f)
        graph.replay()
        expected = _step(form, *fresh)
        for name, got, want in zip(("y", "trace_T", "dw", "dalpha", "deta"), out, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name}, seed {seed}")


@needs_cuda
def test_graphed_layer_trains_like_the_eager_one():
    """torch.cuda.make_graphed_callables over a PlasticRNN: same outputs and parameter gradients as eager."""
    torch.manual_seed(0)
    eager = PlasticRNN(32, alpha="synapse", learn_eta=True, clip=2.0).cuda()
    twin = PlasticRNN(32, alpha="synapse", learn_eta=True, clip=2.0).cuda()
    twin.load_state_dict(eager.state_dict())
    sample = torch.randn(8, 2, 32, device="cuda", requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(twin, (sample,))  # the module, its forward now replayed
    for seed in (3, 4):
        u = torch.randn(8, 2, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        outs = []
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            x = u.clone().requires_grad_()
            y, hT = model(x)
            (y.square().mean() + hT.mean()).backward()
            outs.append([y.detach().clone(), hT.detach().clone(), x.grad.clone()])
        grads = [[p.grad.clone() for p in m.parameters()] for m in (eager, graphed)]
        for got, want in zip(outs[1] + grads[1], outs[0] + grads[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_captured_training_step_matches_eager():
    """The training step of docs/cuda.md (op, loss, backward, Adam with capturable=True) captured once and
    replayed on 3 batches: the same parameters as 3 eager steps on the same batches."""
    T, B, N = 8, 2, 48

    def make():
        g = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter((0.1 * torch.randn(N, N, generator=g)).cuda())
        alpha = torch.nn.Parameter((0.1 * torch.randn(N, N, generator=g)).cuda())
        eta = torch.nn.Parameter(torch.tensor(0.05, device="cuda"))
        return [w, alpha, eta], torch.optim.Adam([w, alpha, eta], lr=1e-2, capturable=True)

    batches = [torch.randn(T, B, N, generator=torch.Generator().manual_seed(s)).cuda() for s in (1, 2, 3)]
    warm = torch.randn(T, B, N, device="cuda")

    def step(u, params, opt):
        y, _ = plastic_ops.plastic_rnn(u, *params)
        y.square().mean().backward()
        opt.step()

    eager, eager_opt = make()
    for u in [warm] * 3 + batches:
        eager_opt.zero_grad(set_to_none=True)
        step(u, eager, eager_opt)

    params, opt = make()
    u = warm.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step(u, params, opt)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step(u, params, opt)
    for batch in batches:
        u.copy_(batch)
        graph.replay()
    for got, want in zip(params, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
