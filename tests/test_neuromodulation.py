"""Neuromodulation (docs/op_spec.md, "Neuromodulation"): the additive rule, self-generated modulation and
eligibility traces. The reference against Backpropamine's update written out by hand; the fused op against
the reference for every option crossed with the existing ones; gradcheck, opcheck, compile; the layers."""
import pytest
import torch

import plastic_ops
from plastic_ops import reference
from plastic_ops.nn import PlasticLinear, PlasticRNN, PlasticRNNState, RetroactivePlasticRNNState

from _inputs import ALPHA_SHAPES, make_inputs
from conftest import DEVICES
from test_reset_lengths import PATTERNS, pattern

FORMS = ("linear", "rnn")
F64 = dict(rtol=1e-9, atol=1e-10)
F32 = dict(rtol=3e-4, atol=3e-5)
#: the neuromodulation variants: self-generated modulation (mod) and eligibility traces (elig)
NEURO = {"mod": (True, False), "elig": (False, True), "mod+elig": (True, True)}


def fns(form):
    return getattr(plastic_ops, f"plastic_{form}"), getattr(reference, f"plastic_{form}")


def make_neuro(n_out, B, n_in, *, mod: bool, elig: bool, dtype=torch.float64, device="cpu", seed=0,
               trace_dtype=None, initial=True):
    """The neuromodulation keyword arguments, every tensor requiring a gradient."""
    g = torch.Generator().manual_seed(1000 + seed)

    def rnd(*shape, s=1.0, dt=dtype):
        return (s * torch.randn(shape, generator=g, dtype=torch.float64)).to(dt).to(device).requires_grad_()

    kw = {}
    if mod:
        kw.update(mod_weight=rnd(n_out, s=0.8), mod_bias=rnd(s=0.3), mod_fanout_weight=rnd(n_out),
                  mod_fanout_bias=rnd(n_out, s=0.5))
    if elig:
        kw["eligibility_eta"] = (0.05 + 0.3 * torch.rand((), generator=g, dtype=torch.float64)).to(dtype).to(
            device).requires_grad_()
        if initial:
            kw["eligibility"] = rnd(B, n_in, n_out, s=0.2, dt=trace_dtype or dtype)
    return kw


def tensors_of(args, mod, neuro):
    return [t for t in list(args) + [mod] + list(neuro.values()) if isinstance(t, torch.Tensor) and t.requires_grad]


def loss_of(out, seed=123):
    """A loss weighing every output (y, trace_T, eligibility_T) element differently."""
    g = torch.Generator().manual_seed(seed)
    total = 0
    for t in out:
        total = total + (t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t)).sum()
    return total


def assert_fused_matches_reference(form, args, mod, neuro, tol=F64, **kw):
    fused, ref = fns(form)
    of = fused(*args, modulation=mod, **neuro, **kw)
    orf = ref(*args, modulation=mod, **neuro, **kw)
    assert len(of) == len(orf) == (3 if "eligibility_eta" in neuro else 2)
    for name, a, b in zip(("y", "trace_T", "eligibility_T"), of, orf):
        torch.testing.assert_close(a, b, **tol, msg=f"{name} differs")
    inputs = tensors_of(args, mod, neuro)
    gf = torch.autograd.grad(loss_of(of), inputs, allow_unused=True)
    gr = torch.autograd.grad(loss_of(orf), inputs, allow_unused=True)
    for i, (a, b) in enumerate(zip(gf, gr)):
        if b is None:
            assert a is None or not a.any(), f"gradient of input {i}: the reference has none"
            continue
        torch.testing.assert_close(a, b, **tol, msg=f"gradient of input {i} (shape {tuple(b.shape)}) differs")
    return of


# ---------------------------------------------------------------------------------------------
# The reference against Backpropamine's update written out by hand


def backpropamine_rnn(u, w, alpha, trace, y0, *, mod_weight, mod_bias, fan_w, fan_b, clip, q=None, E=None):
    """Backpropamine's recurrent step (simple, or retroactive with q), one loop, eta = 1, no bias."""
    y, H, ys = y0, trace, []
    for t in range(u.shape[0]):
        y_new = torch.tanh(u[t] + torch.bmm(y.unsqueeze(1), w + alpha * H).squeeze(1))
        M = fan_w * torch.tanh(y_new @ mod_weight + mod_bias).unsqueeze(1) + fan_b
        delta = torch.bmm(y.unsqueeze(2), y_new.unsqueeze(1))
        if q is None:
            H = torch.clamp(H + M.unsqueeze(1) * delta, -clip, clip)
        else:
            H = torch.clamp(H + M.unsqueeze(1) * E, -clip, clip)
            E = (1 - q) * E + q * delta
        y = y_new
        ys.append(y)
    return torch.stack(ys), H, E


@pytest.mark.parametrize("retroactive", [False, True])
def test_reference_is_backpropamine(retroactive):
    T, B, N = 9, 3, 6
    g = torch.Generator().manual_seed(0)
    r = lambda *s, k=1.0: k * torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    u, w, alpha, h0, y0 = r(T, B, N), r(N, N, k=0.4), r(N, N, k=0.4), r(B, N, N, k=0.3), r(B, N)
    mw, mb, fw, fb = r(N), r(), r(N), r(N, k=0.3)
    E0, q = r(B, N, N, k=0.3), torch.tensor(0.1, dtype=torch.float64)
    clip = 1.0 if retroactive else 2.0
    extra = dict(eligibility=E0, eligibility_eta=q) if retroactive else {}
    out = reference.plastic_rnn(u, w, alpha, 1.0, h0, y0, rule="add", clip=clip, mod_weight=mw, mod_bias=mb,
                                mod_fanout_weight=fw, mod_fanout_bias=fb, **extra)
    y, H, E = backpropamine_rnn(u, w, alpha, h0, y0, mod_weight=mw, mod_bias=mb, fan_w=fw, fan_b=fb, clip=clip,
                                q=q if retroactive else None, E=E0 if retroactive else None)
    torch.testing.assert_close(out[0], y, **F64)
    torch.testing.assert_close(out[1], H, **F64)
    if retroactive:
        torch.testing.assert_close(out[2], E, **F64)


def test_reference_constant_modulation_is_the_modulation_argument():
    """M_t = 1 * tanh(.) * 0 + m is the plain op with modulation m: self-modulation only rescales the rates."""
    args, _ = make_inputs("rnn", T=5, B=2, n_in=4, n_out=4, seed=3)
    m = torch.rand(4, dtype=torch.float64) + 0.5
    zeros = torch.zeros(4, dtype=torch.float64)
    for rule in ("hebb", "add", "oja"):
        a = reference.plastic_rnn(*args, rule=rule, clip=0.7, mod_weight=torch.ones(4, dtype=torch.float64),
                                  mod_fanout_weight=zeros, mod_fanout_bias=m)
        b = reference.plastic_rnn(*args, rule=rule, clip=0.7, modulation=m.expand(5, 2, 4))
        torch.testing.assert_close(a, b, **F64)


def test_eligibility_with_q_zero_keeps_its_initial_value():
    args, _ = make_inputs("linear", T=4, B=2, n_in=3, n_out=5, seed=4)
    E0 = torch.randn(2, 3, 5, dtype=torch.float64)
    y, H, E = reference.plastic_linear(*args, rule="add", eligibility=E0, eligibility_eta=0.0)
    torch.testing.assert_close(E, E0, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The fused op against the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [None, 0.6])
@pytest.mark.parametrize("activation", ["tanh", "relu", "softmax", "sigmoid", "identity"])
# every rule with every variant it has (Oja's rule has no eligibility form, a refused call:
# test_bad_arguments_name_the_argument); hebb and oja without either: tests/test_op_vs_reference.py
@pytest.mark.parametrize("variant,rule", [("none", "add")] + [(v, r) for v in NEURO for r in ("hebb", "add", "oja")
                                                               if not (r == "oja" and "elig" in v)])
@pytest.mark.parametrize("form", FORMS)
def test_rules_activations_clip(form, variant, rule, activation, clip, device):
    T, B, n_in, n_out = 6, 3, 4, 5
    args, mod = make_inputs(form, T=T, B=B, n_in=n_in, n_out=n_out, device=device, scale=0.4, seed=1,
                            modulation="per_output")
    n_in = n_out if form == "rnn" else n_in
    kw = {} if variant == "none" else dict(zip(("mod", "elig"), NEURO[variant]))
    neuro = make_neuro(n_out, B, n_in, device=device, seed=2, **kw) if kw else {}
    assert_fused_matches_reference(form, args, mod, neuro, rule=rule, activation=activation, clip=clip,
                                   checkpoint_every=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 2, 7])
@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("variant", list(NEURO))
@pytest.mark.parametrize("form", FORMS)
def test_resets_lengths_and_checkpoint_intervals(form, variant, name, K, device):
    T, B = 7, 3
    args, mod = make_inputs(form, T=T, B=B, n_in=4, n_out=5, device=device, seed=K, modulation="shared")
    n_in = 5 if form == "rnn" else 4
    neuro = make_neuro(5, B, n_in, device=device, seed=K, **dict(zip(("mod", "elig"), NEURO[variant])))
    reset, lengths = pattern(name, T, B, device)
    assert_fused_matches_reference(form, args, mod, neuro, rule="add" if K % 2 else "hebb", clip=0.5,
                                   checkpoint_every=K, reset=reset, lengths=lengths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", ALPHA_SHAPES)
@pytest.mark.parametrize("form", FORMS)
def test_alpha_shapes(form, alpha, device):
    args, mod = make_inputs(form, T=5, B=2, n_in=3, n_out=6, alpha=alpha, device=device, seed=5)
    n_in = 6 if form == "rnn" else 3
    neuro = make_neuro(6, 2, n_in, mod=True, elig=True, device=device, seed=5)
    assert_fused_matches_reference(form, args, mod, neuro, rule="add", clip=1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(NEURO))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T,B,n_in,n_out", [(1, 1, 1, 1), (1, 3, 2, 5), (4, 1, 7, 3), (3, 2, 33, 65)])
def test_odd_shapes(form, variant, T, B, n_in, n_out, device):
    args, mod = make_inputs(form, T=T, B=B, n_in=n_in, n_out=n_out, device=device, seed=T + B)
    n_in = n_out if form == "rnn" else n_in
    neuro = make_neuro(n_out, B, n_in, device=device, seed=T, **dict(zip(("mod", "elig"), NEURO[variant])))
    assert_fused_matches_reference(form, args, mod, neuro, rule="add", clip=2.0, checkpoint_every=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_without_optional_biases_and_initial_traces(form, device):
    """mod_bias and mod_fanout_bias default to 0, eligibility to zeros, trace and y0 to zeros."""
    args, mod = make_inputs(form, T=5, B=2, n_in=4, n_out=4, trace=False, y0=False, device=device, seed=6)
    neuro = make_neuro(4, 2, 4, mod=True, elig=True, device=device, initial=False)
    del neuro["mod_bias"], neuro["mod_fanout_bias"]
    assert_fused_matches_reference(form, args, mod, neuro, rule="hebb")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(NEURO))
@pytest.mark.parametrize("form", FORMS)
def test_float32(form, variant, device):
    args, mod = make_inputs(form, T=12, B=4, n_in=24, n_out=20, dtype=torch.float32, device=device, seed=7,
                            scale=0.2)
    n_in = 20 if form == "rnn" else 24
    neuro = make_neuro(20, 4, n_in, dtype=torch.float32, device=device, seed=7,
                       **dict(zip(("mod", "elig"), NEURO[variant])))
    assert_fused_matches_reference(form, args, mod, neuro, tol=F32, rule="add", clip=2.0, checkpoint_every=4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,trace_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("form", FORMS)
def test_16bit(form, dtype, trace_dtype, device):
    """16-bit inputs or a bfloat16 trace: the fused op and the reference on the same inputs agree to a few units
    of the coarsest stored dtype (docs/op_spec.md, "Dtypes")."""
    T, B, n = 8, 3, 12
    args, mod = make_inputs(form, T=T, B=B, n_in=n, n_out=n, dtype=dtype, device=device, seed=8, scale=0.3)
    args = [a.detach().to(trace_dtype).requires_grad_() if (a is not None and a.dim() == 3 and
                                                             a.shape == (B, n, n)) else a for a in args]
    neuro = make_neuro(n, B, n, mod=True, elig=True, dtype=dtype, device=device, seed=8, trace_dtype=trace_dtype)
    eps = max(torch.finfo(dtype).eps, torch.finfo(trace_dtype).eps)
    fused, ref = fns(form)
    kw = dict(rule="add", clip=1.0, trace_dtype=trace_dtype, checkpoint_every=3)
    of = fused(*args, **neuro, **kw)
    orf = ref(*args, **neuro, **kw)
    for a, b in zip(of, orf):
        assert a.dtype == b.dtype
        scale = b.detach().abs().max().float().clamp_min(1e-3)
        assert ((a.float() - b.float()).abs().max() / scale) <= 8 * eps
    inputs = tensors_of(args, None, neuro)
    gf = torch.autograd.grad(loss_of(of), inputs)
    gr = torch.autograd.grad(loss_of(orf), inputs)
    for i, (a, b) in enumerate(zip(gf, gr)):
        assert a.dtype == b.dtype, f"gradient {i}"
        scale = b.abs().max().float().clamp_min(1e-3)
        err = ((a.float() - b.float()).abs().max() / scale).item()
        assert err <= 16 * eps, f"gradient of input {i}: relative error {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(NEURO))
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck(form, variant, device):
    T, B, n_in, n_out = 4, 2, 3, 3
    args, mod = make_inputs(form, T=T, B=B, n_in=n_in, n_out=n_out, device=device, seed=9, modulation="shared")
    neuro = make_neuro(n_out, B, n_in, device=device, seed=9, **dict(zip(("mod", "elig"), NEURO[variant])))
    names = list(neuro)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    fused = fns(form)[0]
    reset, lengths = pattern("both", T, B, device)

    def f(*tensors):
        full = list(args)
        for pos, t in zip(positions, tensors):
            full[pos] = t
        rest = tensors[len(positions):]
        return fused(*full, modulation=rest[0], **dict(zip(names, rest[1:])), rule="add", clip=0.8,
                     checkpoint_every=2, reset=reset, lengths=lengths)

    inputs = [args[i] for i in positions] + [mod] + [neuro[k] for k in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_one_call_equals_chained_calls():
    """An episode run in one call equals its steps run as T = 1 calls passing (trace, eligibility, y) on: the
    rollout-then-replay loop of agents relies on it."""
    args, _ = make_inputs("rnn", T=6, B=3, n_in=5, n_out=5, seed=10)
    u, w, alpha, eta, h, y0, b = [a.detach() for a in args]
    neuro = {k: v.detach() for k, v in make_neuro(5, 3, 5, mod=True, elig=True, seed=10).items()}
    E0 = neuro.pop("eligibility")
    y, H, E = plastic_ops.plastic_rnn(u, w, alpha, eta, h, y0, b, rule="add", clip=1.0, eligibility=E0, **neuro)
    trace, elig, prev, ys = h, E0, y0, []
    for t in range(6):
        yt, trace, elig = plastic_ops.plastic_rnn(u[t:t + 1], w, alpha, eta, trace, prev, b, rule="add", clip=1.0,
                                                  eligibility=elig, **neuro)
        prev = yt[0]
        ys.append(yt[0])
    torch.testing.assert_close(torch.stack(ys), y, rtol=0, atol=0)
    torch.testing.assert_close(trace, H, rtol=0, atol=0)
    torch.testing.assert_close(elig, E, rtol=0, atol=0)


def test_nan_in_modulation_parameters_flows_as_in_the_reference():
    for name in ("mod_weight", "mod_bias", "mod_fanout_weight", "mod_fanout_bias", "eligibility_eta"):
        for value in (float("nan"), float("inf")):
            args, mod = make_inputs("rnn", T=4, B=2, n_in=3, n_out=3, seed=11)
            neuro = make_neuro(3, 2, 3, mod=True, elig=True, seed=11)
            with torch.no_grad():
                neuro[name].view(-1)[0] = value
            fused, ref = fns("rnn")
            of = fused(*args, **neuro, rule="add", clip=1.0)
            orf = ref(*args, **neuro, rule="add", clip=1.0)
            for a, b in zip(of, orf):
                torch.testing.assert_close(a, b, equal_nan=True, **F64)
            inputs = tensors_of(args, None, neuro)
            gf = torch.autograd.grad(loss_of(of), inputs)
            gr = torch.autograd.grad(loss_of(orf), inputs)
            for a, b in zip(gf, gr):
                torch.testing.assert_close(a, b, equal_nan=True, **F64)


# ---------------------------------------------------------------------------------------------
# The compiled ops: opcheck, compile


def canonical(form, mod: bool, elig: bool, T=4, B=2, n=3, K=2):
    g = torch.Generator().manual_seed(12)
    r = lambda *s, k=0.5: (k * torch.randn(s, generator=g, dtype=torch.float64)).requires_grad_()  # noqa: E731
    pre = r(T, B, n) if form == "linear" else r(B, n)
    h0 = r(2, B, n, n, k=0.2) if elig else r(B, n, n, k=0.2)
    e = (0.3 * torch.rand(T, B, n, generator=g, dtype=torch.float64)).requires_grad_()
    args = [pre, r(T, B, n), r(n, n), r(n, n), e, h0, "add", "tanh", 1.0, K, None,
            r(4, n) if mod else None, (0.2 * torch.rand((), generator=g, dtype=torch.float64)).requires_grad_()
            if elig else None]
    return args


@pytest.mark.parametrize("variant", list(NEURO))
@pytest.mark.parametrize("form", FORMS)
def test_opcheck(form, variant):
    mod, elig = NEURO[variant]
    args = canonical(form, mod, elig)
    fwd = getattr(torch.ops.plastic_ops, f"plastic_{form}_forward")
    torch.library.opcheck(fwd.default, args)
    y, hT, ckpts = fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    assert hT.shape == args[5].shape and ckpts.shape == (2,) + tuple(args[5].shape)
    bwd = getattr(torch.ops.plastic_ops, f"plastic_{form}_backward")
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    bargs = [torch.randn_like(y), torch.randn_like(hT), plain[0], *plain[2:5], y, ckpts, "add", "tanh", 1.0, 2, None,
             plain[11], plain[12]]
    torch.library.opcheck(bwd.default, bargs)
    grads = bwd(*bargs)
    assert len(grads) == 8
    assert grads[5].shape == hT.shape
    assert grads[6].shape == ((4, 3) if mod else (0,))
    assert grads[7].shape == (() if elig else (0,))


def test_raw_ops_refuse_bad_neuromodulation_arguments():
    fwd = torch.ops.plastic_ops.plastic_rnn_forward
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in canonical("rnn", True, True)]
    bad = list(args)
    bad[11] = args[11][:3]
    with pytest.raises(RuntimeError, match="mod must be"):
        fwd(*bad)
    bad = list(args)
    bad[5] = args[5][0]
    with pytest.raises(RuntimeError, match="h0 must be"):
        fwd(*bad)
    bad = list(args)
    bad[6] = "oja"
    with pytest.raises(RuntimeError, match="Oja"):
        fwd(*bad)
    bad = list(args)
    bad[12] = args[12].reshape(1)
    with pytest.raises(RuntimeError, match="elig_rate must be 0-dim"):
        fwd(*bad)


@pytest.mark.usefixtures("inductor")
@pytest.mark.parametrize("neuromodulation", ["simple", "retroactive"])
def test_layer_compiles_fullgraph(neuromodulation):
    torch._dynamo.reset()
    torch.manual_seed(0)
    rnn = PlasticRNN(4, 6, rule="add", clip=1.0, neuromodulation=neuromodulation)
    x = torch.randn(5, 3, 4)

    def step(x, state):
        out, state = rnn(x, state)
        return out.sum(), state

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, state = compiled(x, None)
    loss2, state2 = compiled(x, state)
    ref_loss, ref_state = step(x, None)
    ref_loss2, ref_state2 = step(x, ref_state)
    torch.testing.assert_close(loss2, ref_loss2)
    assert (state2.eligibility is None) == (neuromodulation == "simple")
    loss2.backward()
    assert rnn.mod_weight.grad is not None and rnn.mod_fanout_bias.grad is not None


# ---------------------------------------------------------------------------------------------
# Arguments


def test_bad_arguments_name_the_argument():
    args, _ = make_inputs("rnn", T=3, B=2, n_in=4, n_out=4, seed=13)
    f = plastic_ops.plastic_rnn
    n = torch.randn(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="mod_fanout_weight"):
        f(*args, mod_weight=n)
    with pytest.raises(ValueError, match="mod_weight"):
        f(*args, mod_fanout_weight=n)
    with pytest.raises(ValueError, match=r"mod_weight must have shape"):
        f(*args, mod_weight=n[:3], mod_fanout_weight=n)
    with pytest.raises(ValueError, match=r"mod_bias must have shape"):
        f(*args, mod_weight=n, mod_fanout_weight=n, mod_bias=n)
    with pytest.raises(TypeError, match="mod_fanout_bias has dtype"):
        f(*args, mod_weight=n, mod_fanout_weight=n, mod_fanout_bias=n.float())
    with pytest.raises(ValueError, match="oja"):
        f(*args, rule="oja", eligibility_eta=0.1)
    with pytest.raises(ValueError, match="eligibility_eta is None"):
        f(*args, eligibility=torch.zeros(2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="eligibility must have shape"):
        f(*args, eligibility=torch.zeros(2, 4, 3, dtype=torch.float64), eligibility_eta=0.1)
    with pytest.raises(ValueError, match="eligibility_eta must be a 0-dim"):
        f(*args, eligibility_eta=torch.ones(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="rule must be one of"):
        f(*args, rule="additive")


def test_layer_arguments():
    with pytest.raises(ValueError, match="neuromodulation must be one of"):
        PlasticRNN(4, neuromodulation="retro")
    with pytest.raises(ValueError, match="Oja"):
        PlasticRNN(4, rule="oja", neuromodulation="retroactive")
    with pytest.raises(ValueError, match="eligibility_eta"):
        PlasticLinear(3, 4, neuromodulation="retroactive", eligibility_eta=1.5)
    rnn = PlasticRNN(4, rule="add", neuromodulation="simple")
    state = RetroactivePlasticRNNState(torch.zeros(2, 4), torch.zeros(2, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="eligibility"):
        rnn(torch.randn(3, 2, 4), state)


def test_states_keep_unpacking_as_before():
    """Layers without an eligibility trace return the states they always did (y, trace = state)."""
    y, trace = PlasticRNN(3, neuromodulation="simple", rule="add", impl="reference")(torch.randn(2, 1, 3))[1]
    assert y.shape == (1, 3) and trace.shape == (1, 3, 3)
    state = PlasticRNN(3, impl="reference")(torch.randn(2, 1, 3))[1]
    assert state.eligibility is None and type(state) is PlasticRNNState
    retro = PlasticRNN(3, neuromodulation="retroactive", rule="add", impl="reference")
    out, state2 = retro(torch.randn(2, 1, 3), state)  # a plain state: the eligibility starts from zeros
    assert type(state2) is RetroactivePlasticRNNState and state2.eligibility.shape == (1, 3, 3)


# ---------------------------------------------------------------------------------------------
# The layers


@pytest.mark.parametrize("neuromodulation", [None, "simple", "retroactive"])
@pytest.mark.parametrize("layer", ["rnn", "linear"])
def test_layer_matches_functional_reference_and_continues(layer, neuromodulation):
    torch.manual_seed(1)
    kw = dict(rule="add", clip=2.0, neuromodulation=neuromodulation, dtype=torch.float64)
    mod = PlasticRNN(5, 6, **kw) if layer == "rnn" else PlasticLinear(5, 6, **kw)
    x = torch.randn(8, 3, 5, dtype=torch.float64)
    out, state = mod(x)
    mod.impl = "reference"
    out_r, state_r = mod(x)
    torch.testing.assert_close(out, out_r, **F64)
    for a, b in zip(state, state_r):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **F64)
    assert (state.eligibility is not None) == (neuromodulation == "retroactive")
    mod.impl = "fused"
    first, s1 = mod(x[:5])
    second, s2 = mod(x[5:], s1)
    torch.testing.assert_close(torch.cat([first, second]), out, **F64)
    for a, b in zip(s2, state):
        if a is not None:
            torch.testing.assert_close(a, b, **F64)
    if neuromodulation is not None:
        names = {n for n, _ in mod.named_parameters()}
        assert {"mod_weight", "mod_bias", "mod_fanout_weight", "mod_fanout_bias"} <= names
        assert ("eligibility_eta" in names) == (neuromodulation == "retroactive")
        out.sum().backward()
        assert all(p.grad is not None for p in mod.parameters())


def test_layer_state_reset_zeroes_the_eligibility():
    rnn = PlasticRNN(3, 4, rule="add", neuromodulation="retroactive", impl="reference")
    _, state = rnn(torch.randn(4, 2, 3))
    cleared = state.reset(torch.tensor([True, False]))
    assert not cleared.eligibility[0].any() and torch.equal(cleared.eligibility[1], state.eligibility[1])
    assert cleared.detach().eligibility is not None and cleared.batch(1).eligibility.shape == (1, 4, 4)
