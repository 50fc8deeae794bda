"""Neuromodulation under hostile use, as tests/test_hostile.py does for the plain op: NaN and inf in every
input, odd strides, meta tensors, partial requires_grad, no_grad, double backward, torch.func, padding past a
row's length, compile with dynamic shapes. Every case gives the reference's result or a clear error."""
import math

import pytest
import torch

import plastic_ops
from plastic_ops import reference

from _inputs import make_inputs
from conftest import DEVICES
from test_neuromodulation import F64, FORMS, fns, loss_of, make_neuro, tensors_of

NEURO_NAMES = ("mod_weight", "mod_bias", "mod_fanout_weight", "mod_fanout_bias", "eligibility", "eligibility_eta")


def inputs(form, device="cpu", seed=5, T=4, B=2, n=3):
    args, mod = make_inputs(form, T=T, B=B, n_in=n, n_out=n, device=device, modulation="per_output", seed=seed)
    neuro = make_neuro(n, B, n, mod=True, elig=True, device=device, seed=seed)
    return args, mod, neuro


def fresh(args, mod, neuro, grad=True):
    r = lambda t: (t.detach().clone().requires_grad_(grad) if isinstance(t, torch.Tensor) else t)  # noqa: E731
    return [r(a) for a in args], r(mod), {k: r(v) for k, v in neuro.items()}


def assert_same(form, args, mod, neuro, **kw):
    """Fused vs reference on fresh copies: outputs and every gradient, NaN where the reference has NaN."""
    results = []
    for fn in fns(form):
        a, m, n = fresh(args, mod, neuro)
        out = fn(*a, modulation=m, **n, **kw)
        grads = torch.autograd.grad(loss_of(out), tensors_of(a, m, n), allow_unused=True)
        results.append((out, grads))
    (of, gf), (orf, gr) = results
    for name, x, y in zip(("y", "trace_T", "eligibility_T"), of, orf):
        torch.testing.assert_close(x, y, **F64, equal_nan=True, msg=f"{name} differs")
    for i, (x, y) in enumerate(zip(gf, gr)):
        if y is None:
            continue
        torch.testing.assert_close(x, y, **F64, equal_nan=True, msg=f"gradient of input {i} differs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [None, 0.4])
@pytest.mark.parametrize("rule", ["hebb", "add"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "softmax"])
@pytest.mark.parametrize("form", FORMS)
def test_nan_and_inf_in_each_input(form, activation, rule, clip, device):
    args, mod, neuro = inputs(form, device)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    failures = []
    for value in (math.nan, math.inf, -math.inf):
        for where in positions + ["modulation"] + list(NEURO_NAMES):
            a, m, n = fresh(args, mod, neuro, grad=False)
            target = m if where == "modulation" else (n[where] if where in n else a[where])
            target.view(-1)[target.numel() // 2] = value
            try:
                assert_same(form, a, m, n, rule=rule, activation=activation, clip=clip, checkpoint_every=2)
            except AssertionError as exc:
                failures.append(f"{value} in {where}: {str(exc).splitlines()[0]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_strided_and_expanded_neuromodulation_arguments(form, device):
    args, mod, neuro = inputs(form, device)
    a, m, n = fresh(args, mod, neuro, grad=False)
    B, n_in, n_out = n["eligibility"].shape
    n["mod_weight"] = torch.cat([n["mod_weight"], n["mod_weight"]])[::2]
    n["mod_fanout_weight"] = n["mod_fanout_weight"][:1].expand(n_out)
    n["mod_bias"] = torch.stack([n["mod_bias"], n["mod_bias"] + 1])[1]
    n["eligibility"] = n["eligibility"][:1].expand(B, n_in, n_out)
    n["eligibility_eta"] = torch.stack([n["eligibility_eta"]] * 2)[0]
    assert_same(form, a, m, n, rule="add", clip=0.5)


@pytest.mark.parametrize("form", FORMS)
def test_meta_tensors(form):
    args, mod, neuro = inputs(form)
    a, m, n = fresh(args, mod, neuro, grad=False)
    meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
    fused, ref = fns(form)
    out = fused(*map(meta, a), modulation=meta(m), **{k: meta(v) for k, v in n.items()}, rule="add",
                checkpoint_every=2)
    outr = ref(*a, modulation=m, **n, rule="add")
    assert [t.device.type for t in out] == ["meta"] * 3
    assert [t.shape for t in out] == [t.shape for t in outr]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_partial_requires_grad(form, device):
    args, mod, neuro = inputs(form, device)
    for name in NEURO_NAMES:
        grads = []
        for fn in fns(form):
            a, m, n = fresh(args, mod, neuro, grad=False)
            n[name].requires_grad_()
            out = fn(*a, modulation=m, **n, rule="add", clip=0.5)
            grads.append(torch.autograd.grad(loss_of(out), n[name])[0])
        torch.testing.assert_close(grads[0], grads[1], **F64, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_no_grad_and_inference_mode(form, device):
    args, mod, neuro = inputs(form, device)
    fused, ref = fns(form)
    outr = ref(*args, modulation=mod, **neuro, rule="hebb")
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out = fused(*args, modulation=mod, **neuro, rule="hebb")
        for x, y in zip(out, outr):
            assert x.grad_fn is None
            torch.testing.assert_close(x, y.detach(), **F64)


@pytest.mark.parametrize("form", FORMS)
def test_double_backward_matches_reference(form):
    """A gradient penalty through the neuromodulation parameters: create_graph=True runs the reference's
    operations on the op's inputs (docs/op_spec.md, "Higher-order and forward-mode AD")."""
    args, mod, neuro = inputs(form)
    results = []
    for fn in fns(form):
        a, m, n = fresh(args, mod, neuro)
        out = fn(*a, modulation=m, **n, rule="add", clip=1.0)
        first = torch.autograd.grad(loss_of(out), [n["mod_weight"], n["eligibility_eta"]], create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        results.append(torch.autograd.grad(penalty, tensors_of(a, m, n), allow_unused=True))
    for x, y in zip(*results):
        if y is not None:
            torch.testing.assert_close(x, y, **F64)


@pytest.mark.parametrize("form", FORMS)
def test_torch_func_grad_runs_the_reference(form):
    args, mod, neuro = inputs(form)
    a, m, n = fresh(args, mod, neuro, grad=False)
    fused, ref = fns(form)

    def loss(fn, mw):
        return loss_of(fn(*a, modulation=m, **{**n, "mod_weight": mw}, rule="add"))

    g = torch.func.grad(lambda mw: loss(fused, mw))(n["mod_weight"])
    g_ref = torch.func.grad(lambda mw: loss(ref, mw))(n["mod_weight"])
    torch.testing.assert_close(g, g_ref, **F64)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("padding", [math.nan, math.inf])
def test_padding_past_lengths_is_never_read(form, padding):
    T, B = 5, 3
    lengths = torch.tensor([2, 5, 4])
    past = torch.arange(T).unsqueeze(1) >= lengths
    for fn in fns(form):
        results = []
        for value in (0.0, padding):
            args, mod, neuro = inputs(form, T=T, B=B)
            a, m, n = fresh(args, mod, neuro, grad=False)
            a[0][past] = value
            a, m, n = fresh(a, m, n)
            out = fn(*a, modulation=m, **n, rule="add", lengths=lengths, clip=0.5, checkpoint_every=2)
            results.append(tuple(out) + torch.autograd.grad(loss_of(out), tensors_of(a, m, n)))
        for x, y in zip(*results):
            torch.testing.assert_close(x, y, **F64)


@pytest.mark.usefixtures("inductor")
def test_compile_dynamic_shapes_fullgraph():
    torch._dynamo.reset()
    fused = plastic_ops.plastic_rnn

    def f(u, w, alpha, mw, fw, q):
        y, h, e = fused(u, w, alpha, 1.0, rule="add", clip=1.0, mod_weight=mw, mod_fanout_weight=fw,
                        eligibility_eta=q)
        return y.sum() + h.sum() + e.sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for T, B in ((3, 2), (5, 4)):
        g = torch.Generator().manual_seed(T)
        u, w, alpha = (torch.randn(T, B, 4, generator=g), torch.randn(4, 4, generator=g) * 0.3,
                       torch.randn(4, 4, generator=g) * 0.3)
        mw, fw, q = torch.randn(4, generator=g), torch.randn(4, generator=g), torch.tensor(0.2)
        params = [t.requires_grad_() for t in (w, alpha, mw, fw, q)]
        got = compiled(u, *params)
        want = f(u, *params)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, params), torch.autograd.grad(want, params))
