"""The op under hostile use: every input either gives the reference's result or a clear error.

NaN/inf in each input, extreme values, odd strides, meta tensors, partial requires_grad,
no_grad/inference_mode, torch.func transforms, forward-mode AD, double backward, huge or odd
integer arguments, torch.compile with traced options. Cases that could crash the interpreter
run in a child process (run_child), so a crash fails the test instead of the whole run.
"""
import math
import sys

import pytest
import torch
from torch.autograd import forward_ad

import plastic_ops
from plastic_ops import reference
from plastic_ops.nn import PlasticLinear, PlasticRNN

from _child import run_child
from _inputs import grad_inputs, loss_of, make_inputs, of_tensors
from conftest import DEVICES

FORMS = ("linear", "rnn")
ACTS = ("tanh", "sigmoid", "relu", "identity", "softmax")
F64 = dict(rtol=1e-9, atol=1e-10)


def fns(form):
    return getattr(plastic_ops, f"plastic_{form}"), getattr(reference, f"plastic_{form}")


def small(form, device="cpu", **kw):
    return make_inputs(form, T=4, B=2, n_in=3, n_out=3, device=device, modulation="per_output", seed=5, **kw)


def detached(args, mod):
    d = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
    return [d(a) for a in args], d(mod)


def requiring_grad(args, mod):
    r = lambda t: t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t  # noqa: E731
    return [r(a) for a in args], r(mod)


def assert_same_with_grads(form, args, mod, **kw):
    """Fused vs reference: y, trace_T and every gradient, NaN exactly where the reference has NaN."""
    fused, ref = fns(form)
    results = []
    for fn in (fused, ref):
        a, m = requiring_grad(args, mod)
        y, h = fn(*a, modulation=m, **kw)
        inputs = grad_inputs(a, m)
        grads = torch.autograd.grad(loss_of(y, h), inputs, allow_unused=True)
        results.append((y, h, grads))
    (yf, hf, gf), (yr, hr, gr) = results
    torch.testing.assert_close(yf, yr, **F64, equal_nan=True, msg="y differs")
    torch.testing.assert_close(hf, hr, **F64, equal_nan=True, msg="trace_T differs")
    for i, (a, b) in enumerate(zip(gf, gr)):
        torch.testing.assert_close(a, b, **F64, equal_nan=True, msg=f"gradient of input {i} differs")


# ---------------------------------------------------------------------------------------------
# NaN and inf in every input, every activation, rule and clip

# positions of the tensors in the positional args of make_inputs, per form
TENSOR_ARGS = {"linear": {"x": 0, "w": 1, "alpha": 2, "eta": 3, "trace": 4, "bias": 5},
               "rnn": {"u": 0, "w": 1, "alpha": 2, "eta": 3, "trace": 4, "y0": 5, "bias": 6}}


def poisoned(form, name, value, device):
    args, mod = detached(*small(form, device=device))
    t = mod if name == "modulation" else args[TENSOR_ARGS[form][name]]
    flat = t.view(-1)
    flat[flat.numel() // 2] = value  # one element, inside the tensor
    return args, mod


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [None, 0.4])
@pytest.mark.parametrize("rule", ["hebb", "oja"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("form", FORMS)
def test_nan_and_inf_in_each_input(form, activation, rule, clip, device):
    names = list(TENSOR_ARGS[form]) + ["modulation"]
    failures = []
    for value in (math.nan, math.inf, -math.inf):
        for name in names:
            args, mod = poisoned(form, name, value, device)
            try:
                assert_same_with_grads(form, args, mod, rule=rule, activation=activation, clip=clip)
            except AssertionError as exc:
                failures.append(f"{value} in {name}: {str(exc).splitlines()[0]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTS)
def test_relu_and_all_activations_keep_nan(activation, device):
    # the case: relu used to turn a NaN pre-activation into 0, and the trace hid it
    x = torch.zeros(2, 1, 3, dtype=torch.float64, device=device)
    x[0, 0, 1] = math.nan
    w = torch.eye(3, dtype=torch.float64, device=device)
    alpha = torch.zeros(3, 3, dtype=torch.float64, device=device)
    y, h = plastic_ops.plastic_linear(x, w, alpha, 0.5, activation=activation)
    yr, hr = reference.plastic_linear(x, w, alpha, 0.5, activation=activation)
    assert torch.isnan(y[0]).any() and torch.isnan(h).any()
    torch.testing.assert_close(y, yr, equal_nan=True)
    torch.testing.assert_close(h, hr, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("scale", [1e30, 1e200])
def test_huge_inputs(activation, scale, device):
    # overflow to inf (float32) or huge finite values (float64) flow as in the reference
    for dtype in (torch.float32, torch.float64):
        args, mod = detached(*small("linear", device=device, dtype=dtype))
        args[0] = args[0] * scale
        fused, ref = fns("linear")
        y, h = fused(*args, modulation=mod, activation=activation, clip=1.0)
        yr, hr = ref(*args, modulation=mod, activation=activation, clip=1.0)
        tol = F64 if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
        torch.testing.assert_close(y, yr, **tol, equal_nan=True)
        torch.testing.assert_close(h, hr, **tol, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Layout: strided, expanded, transposed, non-contiguous; meta tensors

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_strided_expanded_transposed_inputs(form, device):
    args, mod = detached(*small(form, device=device))
    T, B, n = args[0].shape
    odd = list(args)
    odd[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)  # (T, B, N) with batch-major strides
    odd[1] = args[1].t().contiguous().t()  # transposed storage
    odd[2] = args[2][:, :1].expand(n, n)  # expanded alpha (stride 0)
    odd[3] = torch.stack([args[3], args[3] + 1])[0]  # a 0-dim view into a larger tensor
    odd[4] = args[4][:1].expand(B, n, n)  # one trace shared by the batch (stride 0)
    odd[-1] = torch.cat([args[-1], args[-1]])[::2]  # bias with stride 2
    mod = mod[..., :1].expand(T, B, n)
    assert_same_with_grads(form, odd, mod, rule="oja", activation="sigmoid", clip=0.5)


@pytest.mark.parametrize("form", FORMS)
def test_meta_tensors(form):
    args, mod = detached(*small(form))
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    fused, ref = fns(form)
    y, h = fused(*meta, modulation=mod.to("meta"), checkpoint_every=2)
    yr, hr = ref(*meta, modulation=mod.to("meta"))
    assert y.device.type == "meta" and y.shape == yr.shape and h.shape == hr.shape


# ---------------------------------------------------------------------------------------------
# Autograd modes: partial requires_grad, no_grad, inference_mode

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_partial_requires_grad(form, device):
    fused, ref = fns(form)
    for k in range(len(TENSOR_ARGS[form]) + 1):  # each input alone, then modulation alone
        grads = []
        for fn in (fused, ref):
            args, mod = detached(*small(form, device=device))
            target = mod if k == len(TENSOR_ARGS[form]) else args[k]
            target.requires_grad_()
            y, h = fn(*args, modulation=mod, clip=0.5)
            grads.append(torch.autograd.grad(loss_of(y, h), target)[0])
        torch.testing.assert_close(grads[0], grads[1], **F64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_no_grad_and_inference_mode(form, device):
    fused, ref = fns(form)
    args, mod = small(form, device=device)
    yr, hr = ref(*args, modulation=mod)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y, h = fused(*args, modulation=mod)
        assert y.grad_fn is None and h.grad_fn is None
        torch.testing.assert_close(y, yr.detach(), **F64)
        torch.testing.assert_close(h, hr.detach(), **F64)


# ---------------------------------------------------------------------------------------------
# Double backward: gradient penalties, Hessian-vector products

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule,activation,clip", [("hebb", "tanh", None), ("oja", "sigmoid", 0.4),
                                                  ("hebb", "softmax", 0.3), ("oja", "relu", None)])
@pytest.mark.parametrize("form", FORMS)
def test_double_backward_matches_reference(form, rule, activation, clip, device):
    fused, ref = fns(form)
    results = []
    for fn in (fused, ref):
        args, mod = requiring_grad(*detached(*small(form, device=device)))
        inputs = grad_inputs(args, mod)
        y, h = fn(*args, modulation=mod, rule=rule, activation=activation, clip=clip, checkpoint_every=3)
        first = torch.autograd.grad(loss_of(y, h), inputs, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in first)
        results.append(torch.autograd.grad(penalty, inputs))
    for i, (a, b) in enumerate(zip(*results)):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, **F64, msg=f"second derivative of input {i} differs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_gradgradcheck(form, device):
    args, mod = make_inputs(form, T=3, B=2, n_in=2, n_out=2, device=device, modulation="shared", seed=7)
    fn = fns(form)[0]
    f = of_tensors(fn, args, rule="oja", activation="tanh", clip=0.6, checkpoint_every=2)
    assert torch.autograd.gradgradcheck(f, tuple(grad_inputs(args, mod)), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_hvp_matches_reference(device):
    args, mod = detached(*small("rnn", device=device))
    w = args[1]
    v = torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(3)).to(device)
    out = []
    for fn in fns("rnn"):
        def loss(w_):
            full = list(args)
            full[1] = w_
            return loss_of(*fn(*full, modulation=mod, activation="tanh"))
        out.append(torch.autograd.functional.hvp(loss, w, v)[1])
    assert out[1].abs().sum() > 0
    torch.testing.assert_close(out[0], out[1], **F64)


def test_first_order_backward_stays_fused(monkeypatch):
    # a plain backward must not pay for the reference: count calls of its scan
    calls = []
    scan = reference.scan
    monkeypatch.setattr(reference, "scan", lambda *a, **k: calls.append(1) or scan(*a, **k))
    args, mod = small("linear")
    y, h = plastic_ops.plastic_linear(*args, modulation=mod)
    loss_of(y, h).backward()
    assert calls == []


# ---------------------------------------------------------------------------------------------
# torch.func transforms and forward-mode AD

def _w_only(form, fn, args, mod):
    def f(w):
        full = list(args)
        full[1] = w
        y, h = fn(*full, modulation=mod, rule="oja", activation="tanh", clip=0.5)
        return y, h
    return f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_func_jvp_and_forward_ad(form, device):
    args, mod = detached(*small(form, device=device))
    w = args[1]
    t = torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(4)).to(device)
    fused, ref = (_w_only(form, fn, args, mod) for fn in fns(form))
    _, (ty, th) = torch.func.jvp(fused, (w,), (t,))
    _, (ry, rh) = torch.func.jvp(ref, (w,), (t,))
    assert ry.abs().sum() > 0
    torch.testing.assert_close(ty, ry, **F64)
    torch.testing.assert_close(th, rh, **F64)
    with forward_ad.dual_level():
        y, h = fused(forward_ad.make_dual(w, t))
        tangent = forward_ad.unpack_dual(y).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, ry, **F64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_func_grad_and_vmap(form, device):
    args, mod = detached(*small(form, device=device))
    fused, ref = (_w_only(form, fn, args, mod) for fn in fns(form))
    w = args[1]
    g = torch.func.grad(lambda w_: loss_of(*fused(w_)))(w)
    gr = torch.func.grad(lambda w_: loss_of(*ref(w_)))(w)
    torch.testing.assert_close(g, gr, **F64)
    ws = torch.stack([w, 2 * w, -w])
    ys = torch.func.vmap(lambda w_: fused(w_)[0])(ws)
    for k in range(3):
        torch.testing.assert_close(ys[k], ref(ws[k])[0], **F64)


def test_raw_op_refuses_dual_tensors():
    T, B, n = 3, 2, 3
    args = [torch.randn(*s, dtype=torch.float64) for s in ((T, B, n), (T, B, n), (n, n), (n, n), (T, B, n),
                                                          (B, n, n))]
    with forward_ad.dual_level():
        args[2] = forward_ad.make_dual(args[2], torch.ones(n, n, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            torch.ops.plastic_ops.plastic_linear_forward(*args, "hebb", "tanh", None, 1)


def test_layer_under_func_grad():
    layer = PlasticRNN(3, clip=0.5, dtype=torch.float64)
    u = torch.randn(4, 2, 3, dtype=torch.float64)
    params = dict(layer.named_parameters())

    def loss(p, impl):
        layer.impl = impl
        y, state = torch.func.functional_call(layer, p, (u,))
        return loss_of(y, state.trace)

    g = torch.func.grad(loss)(params, "fused")
    gr = torch.func.grad(loss)(params, "reference")
    for name in params:
        torch.testing.assert_close(g[name], gr[name], **F64)


# ---------------------------------------------------------------------------------------------
# Integer and float options: ranges, types, values that once overflowed

@pytest.mark.parametrize("form", FORMS)
def test_huge_checkpoint_every_matches_reference(form):
    # K > T means one checkpoint; the count once overflowed int64 in csrc (a crash): in a child
    run_child(f"""
import torch, plastic_ops
from plastic_ops import reference
from _inputs import make_inputs, grad_inputs, loss_of
args, mod = make_inputs("{form}", T=5, B=2, n_in=3, n_out=3, modulation="shared", seed=1)
y, h = reference.plastic_{form}(*args, modulation=mod)
want = torch.autograd.grad(loss_of(y, h), grad_inputs(args, mod))
for K in (5, 6, 2**31, 2**62, 2**63 - 1, 2**63, 2**64, 10**40):
    yf, hf = plastic_ops.plastic_{form}(*args, modulation=mod, checkpoint_every=K)
    got = torch.autograd.grad(loss_of(yf, hf), grad_inputs(args, mod))
    torch.testing.assert_close(yf, y, rtol=1e-9, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
""")


@pytest.mark.parametrize("value,error", [(0, ValueError), (-1, ValueError), (-2**70, ValueError),
                                         (2.0, TypeError), (2.0**63, TypeError), (2.0**64, TypeError),
                                         (math.nan, TypeError), (math.inf, TypeError), (True, TypeError),
                                         ("4", TypeError), (torch.tensor(4), TypeError)])
@pytest.mark.parametrize("form", FORMS)
def test_bad_checkpoint_every(form, value, error):
    args, mod = small(form)
    for fn in fns(form):
        with pytest.raises(error, match="checkpoint_every"):
            fn(*args, modulation=mod, checkpoint_every=value)


@pytest.mark.parametrize("value,error", [(0, ValueError), (-1.0, ValueError), (math.nan, ValueError),
                                         (math.inf, ValueError), (True, TypeError), ("1", TypeError),
                                         (torch.tensor(1.0), TypeError), (1j, TypeError), (10**400, ValueError)])
def test_bad_clip(value, error):
    args, mod = small("linear")
    for fn in fns("linear"):
        with pytest.raises(error, match="clip"):
            fn(*args, modulation=mod, clip=value)


def test_eta_beyond_float_range():
    args, mod = small("linear")
    args[3] = 10**400
    for fn in fns("linear"):
        with pytest.raises(ValueError, match="eta"):
            fn(*args, modulation=mod)


@pytest.mark.parametrize("form", FORMS)
def test_tiny_and_huge_clip(form):
    args, mod = small(form)
    for clip in (1e-300, 5e-324, 1e300, sys.float_info.max):
        assert_same_with_grads(form, args, mod, clip=clip)


def test_direct_op_calls_with_extreme_checkpoint_every():
    # torch.ops.plastic_ops.* is public too: the kernel and the fake kernel must agree for any int64 K
    run_child("""
import sys, torch, plastic_ops
from plastic_ops.ops import num_checkpoints
T, B, n = 5, 2, 3
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
args = (r(T, B, n), r(T, B, n), r(n, n), r(n, n), 0.1 * r(T, B, n).abs(), r(B, n, n))
for form in ("linear", "rnn"):
    pre = args[0] if form == "linear" else args[0][0]
    fwd = getattr(torch.ops.plastic_ops, f"plastic_{form}_forward")
    bwd = getattr(torch.ops.plastic_ops, f"plastic_{form}_backward")
    for K in (1, 4, 5, 6, 2**62, sys.maxsize):
        y, hT, ck = fwd(pre, *args[1:], "hebb", "tanh", None, K)
        assert ck.shape[0] == num_checkpoints(T, K) == -(-T // K), (K, ck.shape)
        meta = fwd(*(t.to("meta") for t in (pre,) + args[1:]), "hebb", "tanh", None, K)
        assert meta[2].shape == ck.shape
        grads = bwd(torch.ones_like(y), torch.ones_like(hT), pre, args[2], args[3], args[4], y, ck,
                    "hebb", "tanh", None, K)
        ref = bwd(torch.ones_like(y), torch.ones_like(hT), pre, args[2], args[3], args[4], y,
                  fwd(pre, *args[1:], "hebb", "tanh", None, T)[2], "hebb", "tanh", None, T)
        for a, b in zip(grads, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for K in (-1, -sys.maxsize - 1):
        try:
            fwd(pre, *args[1:], "hebb", "tanh", None, K)
        except RuntimeError as exc:
            assert "checkpoint_every" in str(exc), exc
        else:
            raise AssertionError(f"K={K} accepted")
    for K in (2**64, 2.0**63):
        try:
            fwd(pre, *args[1:], "hebb", "tanh", None, K)
        except (RuntimeError, TypeError):
            pass
        else:
            raise AssertionError(f"K={K} accepted")
""")


def test_direct_op_calls_with_bad_canonical_arguments():
    # shape, dtype, contiguity and option checks of the C++ ops: Python exceptions, not crashes
    run_child("""
import torch, plastic_ops
T, B, n = 3, 2, 3
r = lambda *s: torch.randn(*s, dtype=torch.float64)
ok = [r(T, B, n), r(T, B, n), r(n, n), r(n, n), r(T, B, n), r(B, n, n)]
fwd = torch.ops.plastic_ops.plastic_linear_forward
cases = {
    "drive shape": lambda a: a.__setitem__(1, r(T, B, n + 1)),
    "alpha shape": lambda a: a.__setitem__(3, r(n, 1)),
    "e shape": lambda a: a.__setitem__(4, r(T, 1, n)),
    "h0 shape": lambda a: a.__setitem__(5, r(1, n, n)),
    "dtype": lambda a: a.__setitem__(2, r(n, n).float()),
    "contiguity": lambda a: a.__setitem__(2, r(n, n).t()),
    "empty T": lambda a: (a.__setitem__(0, r(0, B, n)), a.__setitem__(1, r(0, B, n)), a.__setitem__(4, r(0, B, n))),
}
for name, spoil in cases.items():
    a = list(ok)
    spoil(a)
    try:
        fwd(*a, "hebb", "tanh", None, 1)
    except RuntimeError as exc:
        assert "plastic_ops" in str(exc), (name, exc)
    else:
        raise AssertionError(f"{name}: accepted")
for opts in (("hebbb", "tanh", None), ("hebb", "gelu", None), ("hebb", "tanh", -1.0), ("hebb", "tanh", float("nan"))):
    try:
        fwd(*ok, *opts, 1)
    except RuntimeError as exc:
        assert "plastic_ops" in str(exc), (opts, exc)
    else:
        raise AssertionError(f"{opts}: accepted")
# the per-step flags: (T, B) uint8, contiguous, on the op's device, forward and backward
bwd = torch.ops.plastic_ops.plastic_linear_backward
y, hT, ck = fwd(*ok, "hebb", "tanh", None, 1)
bad_steps = {"steps shape": torch.zeros(T, B + 1, dtype=torch.uint8), "steps 1-D": torch.zeros(T * B, dtype=torch.uint8),
             "steps dtype": torch.zeros(T, B, dtype=torch.bool), "steps int64": torch.zeros(T, B, dtype=torch.int64),
             "steps strided": torch.zeros(B, T, dtype=torch.uint8).t()}
for name, steps in bad_steps.items():
    for call in (lambda: fwd(*ok, "hebb", "tanh", None, 1, steps),
                 lambda: bwd(y, hT, ok[0], ok[2], ok[3], ok[4], y, ck, "hebb", "tanh", None, 1, steps)):
        try:
            call()
        except RuntimeError as exc:
            assert "plastic_ops: steps" in str(exc), (name, exc)
        else:
            raise AssertionError(f"{name}: accepted")
""")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("padding", [math.nan, math.inf, -1e300])
def test_padding_past_lengths_is_never_read(form, padding):
    """Inputs of the steps past a row's length may hold anything: the result is that of zero padding,
    and the padding gets zero gradients."""
    T, B = 5, 3
    lengths = torch.tensor([2, 5, 4])
    past = torch.arange(T).unsqueeze(1) >= lengths
    for fn in fns(form):
        results = []
        for value in (0.0, padding):
            args, mod = requiring_grad(*make_inputs(form, T=T, B=B, n_in=3, n_out=3, modulation="per_output", seed=5))
            with torch.no_grad():
                args[0][past] = value
            drive = None
            kw = dict(modulation=mod, lengths=lengths, clip=0.5, checkpoint_every=2)
            if form == "linear":
                drive = torch.zeros(T, B, 3, dtype=torch.float64)
                drive[past] = value
                kw["drive"] = drive.requires_grad_()
            y, h = fn(*args, **kw)
            inputs = grad_inputs(args, mod) + ([drive] if drive is not None else [])
            results.append((y, h) + torch.autograd.grad(loss_of(y, h), inputs))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, **F64)
        assert torch.equal(results[1][2][past], torch.zeros_like(results[1][2][past]))


@pytest.mark.parametrize("form", FORMS)
def test_resets_and_lengths_on_meta_and_without_grad(form):
    args, mod = detached(*small(form))
    reset = torch.zeros(4, 2, dtype=torch.bool)
    reset[2, 1] = True
    lengths = torch.tensor([3, 4])
    fused, ref = fns(form)
    yr, hr = ref(*args, modulation=mod, reset=reset, lengths=lengths)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y, h = fused(*args, modulation=mod, reset=reset, lengths=lengths)
        torch.testing.assert_close(y, yr, **F64)
        torch.testing.assert_close(h, hr, **F64)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    # a CPU lengths is accepted with tensors on any device, as torch.nn.utils.rnn takes it
    y, h = fused(*meta, modulation=mod.to("meta"), reset=reset.to("meta"), lengths=lengths, checkpoint_every=2)
    assert y.device.type == "meta" and y.shape == yr.shape and h.shape == hr.shape


@pytest.mark.parametrize("bad", [dict(in_features=0), dict(in_features=2**70), dict(in_features=True),
                                 dict(clip=math.nan), dict(clip=-1), dict(clip=math.inf), dict(clip="x"),
                                 dict(checkpoint_every=0), dict(checkpoint_every=1.5), dict(eta=10**400)])
def test_layer_rejects_bad_options(bad):
    kw = dict(in_features=3, out_features=4)
    kw.update(bad)
    name = next(iter(bad))
    with pytest.raises((ValueError, TypeError), match=name):
        layer = PlasticLinear(**kw)
        layer(torch.randn(2, 1, 3))


# ---------------------------------------------------------------------------------------------
# torch.compile: every option traced, dynamic shapes, no graph break

def test_compile_with_traced_options_fullgraph():
    def f(x, w, alpha, eta, clip, K):
        y, h = plastic_ops.plastic_linear(x, w, alpha, eta, clip=clip, checkpoint_every=K, rule="oja",
                                          activation="relu")
        return y, h

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(0)
    for T, B, clip, K in ((5, 2, 0.5, 2), (7, 3, 0.25, 3)):
        x = torch.randn(T, B, 3, generator=g, requires_grad=True)
        w, alpha = (torch.randn(3, 4, generator=g).requires_grad_() for _ in range(2))
        eta = torch.tensor(0.2, requires_grad=True)
        y, h = compiled(x, w, alpha, eta, clip, K)
        yr, hr = reference.plastic_linear(x, w, alpha, eta, clip=clip, rule="oja", activation="relu")
        torch.testing.assert_close(y, yr)
        torch.testing.assert_close(h, hr)
        got = torch.autograd.grad(loss_of(y, h), (x, w, alpha, eta))
        want = torch.autograd.grad(loss_of(yr, hr), (x, w, alpha, eta))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", [PlasticLinear(3, 4, clip=0.5, rule="oja", alpha="input"),
                                   PlasticRNN(4, clip=0.5, activation="softmax", checkpoint_every=2)],
                         ids=["linear", "rnn"])
def test_compile_layers_without_graph_breaks(layer):
    x = torch.randn(5, 2, layer.in_features)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    y, h = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)(x)
    layer.impl = "reference"
    yr, hr = layer(x)
    layer.impl = "fused"
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(h, hr)
