"""Episode resets and per-row lengths (docs/op_spec.md, "Episode resets and lengths"), the linear
form's `drive` and `return_traces`: the fused op against the reference, and the reference against
the same episodes run as separate calls."""
import pytest
import torch

import plastic_ops
from plastic_ops import reference

from _inputs import ALPHA_SHAPES, grad_inputs, loss_of, make_inputs, of_tensors
from conftest import DEVICES
from test_dtypes import PAIR_IDS, PAIRS, assert_match, eps

FORMS = ("linear", "rnn")
F64 = dict(rtol=1e-9, atol=1e-10)
F32 = dict(rtol=2e-4, atol=2e-5)


def fns(form):
    return getattr(plastic_ops, f"plastic_{form}"), getattr(reference, f"plastic_{form}")


def pattern(name, T, B, device="cpu"):
    """(reset, lengths) of a named pattern: None where the pattern has none."""
    reset = torch.zeros(T, B, dtype=torch.bool)
    lengths = None
    if name == "reset_first":
        reset[0, :] = True
    elif name == "reset_middle":
        reset[T // 2, 0] = True
    elif name == "reset_last":
        reset[T - 1, B - 1] = True
    elif name == "reset_every_row":
        reset[torch.arange(B) % T, torch.arange(B)] = True
        reset[T // 2, :] = True
    elif name == "reset_none":
        pass
    elif name == "lengths_full":
        reset, lengths = None, torch.full((B,), T)
    elif name == "lengths_mixed":
        reset, lengths = None, torch.tensor([max(1, T - b) for b in range(B)])
    elif name == "lengths_one":
        reset, lengths = None, torch.ones(B, dtype=torch.int32)
    elif name == "both":
        g = torch.Generator().manual_seed(T * 31 + B)
        reset = torch.rand(T, B, generator=g) < 0.3
        reset[0, 0] = True
        reset[T - 1, B - 1] = True
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[-1] = T
    else:
        raise ValueError(name)
    return (None if reset is None else reset.to(device)), lengths


PATTERNS = ("reset_first", "reset_middle", "reset_last", "reset_every_row", "reset_none", "lengths_full",
            "lengths_mixed", "lengths_one", "both")


def assert_fused_matches_reference(form, args, mod, dtype=torch.float64, **kw):
    fused, ref = fns(form)
    tol = F64 if dtype == torch.float64 else F32
    inputs = grad_inputs(args, mod)
    yf, hf = fused(*args, modulation=mod, **kw)
    yr, hr = ref(*args, modulation=mod, **kw)
    torch.testing.assert_close(yf, yr, **tol, msg="y differs")
    torch.testing.assert_close(hf, hr, **tol, msg="trace_T differs")
    gf = torch.autograd.grad(loss_of(yf, hf), inputs)
    gr = torch.autograd.grad(loss_of(yr, hr), inputs)
    for i, (a, b) in enumerate(zip(gf, gr)):
        torch.testing.assert_close(a, b, **tol, msg=f"gradient of input {i} (shape {tuple(b.shape)}) differs")
    return yf, hf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", [None, 0.3])
@pytest.mark.parametrize("activation", ["tanh", "relu", "softmax", "sigmoid"])
@pytest.mark.parametrize("rule", ["hebb", "oja"])
@pytest.mark.parametrize("form", FORMS)
def test_rules_activations_clip(form, rule, activation, clip, device):
    args, mod = make_inputs(form, T=7, B=4, n_in=5, n_out=6, device=device, scale=0.3, seed=1,
                            modulation="per_output")
    reset, lengths = pattern("both", 7, 4, device)
    assert_fused_matches_reference(form, args, mod, rule=rule, activation=activation, clip=clip, checkpoint_every=2,
                                   reset=reset, lengths=lengths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 2, 3, 6])
@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("form", FORMS)
def test_patterns_and_checkpoint_intervals(form, name, K, device):
    T, B = 6, 3
    args, mod = make_inputs(form, T=T, B=B, n_in=4, n_out=5, device=device, seed=K, modulation="shared")
    reset, lengths = pattern(name, T, B, device)
    assert_fused_matches_reference(form, args, mod, rule="oja" if K % 2 else "hebb", clip=0.4, checkpoint_every=K,
                                   reset=reset, lengths=lengths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", ALPHA_SHAPES)
@pytest.mark.parametrize("form", FORMS)
def test_alpha_shapes(form, alpha, device):
    args, mod = make_inputs(form, T=5, B=3, n_in=4, n_out=6, alpha=alpha, modulation="per_output", device=device,
                            seed=2)
    reset, lengths = pattern("both", 5, 3, device)
    assert_fused_matches_reference(form, args, mod, clip=0.5, reset=reset, lengths=lengths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T,B", [(1, 1), (1, 3), (5, 1)])
def test_one_step_and_one_row(form, T, B, device):
    args, mod = make_inputs(form, T=T, B=B, n_in=3, n_out=4, device=device, seed=T + B)
    reset = torch.ones(T, B, dtype=torch.bool, device=device)
    for r, L in [(reset, None), (None, torch.ones(B, dtype=torch.int64)), (reset, torch.full((B,), T))]:
        assert_fused_matches_reference(form, args, mod, reset=r, lengths=L, checkpoint_every=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_float32(form, device):
    args, mod = make_inputs(form, T=8, B=3, n_in=12, n_out=12, dtype=torch.float32, device=device, scale=0.2,
                            modulation="shared")
    reset, lengths = pattern("both", 8, 3, device)
    assert_fused_matches_reference(form, args, mod, dtype=torch.float32, reset=reset, lengths=lengths,
                                   checkpoint_every=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("form", FORMS)
def test_16_bit_inputs_and_traces(form, pair, device):
    """Rounded where the kernels store, as in tests/test_dtypes.py: equal to a few units of the dtype."""
    dtype, trace_dtype = pair
    args, mod = make_inputs(form, T=7, B=3, n_in=5, n_out=6, dtype=dtype, device=device, seed=7,
                            modulation="per_output")
    args[4] = args[4].detach().to(trace_dtype).requires_grad_()
    reset, lengths = pattern("both", 7, 3, device)
    out = []
    for fn in fns(form):
        y, h = fn(*args, modulation=mod, reset=reset, lengths=lengths, rule="oja", clip=0.5, checkpoint_every=3,
                  trace_dtype=trace_dtype)
        out.append((y, h) + torch.autograd.grad(loss_of(y, h), grad_inputs(args, mod)))
    e = eps(dtype, trace_dtype)
    for i, (a, b) in enumerate(zip(*out)):
        assert_match(a, b, e, f"output {i}")


@pytest.mark.parametrize("form", FORMS)
def test_several_threads_split_the_rows(form):
    # B * N_in * N_out above 2 * 2^15: the kernels split the rows between tasks
    args, mod = make_inputs(form, T=5, B=4, n_in=130, n_out=130, device="cpu", scale=0.05, seed=4)
    reset, lengths = pattern("both", 5, 4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_fused_matches_reference(form, args, mod, clip=0.5, reset=reset, lengths=lengths, checkpoint_every=2)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_no_flag_set_gives_the_same_bits_as_no_flags(form, device):
    """An all-False reset runs the flag-aware kernels with every row on the unflagged path."""
    args, mod = make_inputs(form, T=6, B=3, n_in=5, n_out=5, device=device, seed=9)
    fused, _ = fns(form)
    inputs = grad_inputs(args, mod)
    outs = []
    for kw in (dict(), dict(reset=torch.zeros(6, 3, dtype=torch.bool, device=device), lengths=torch.full((3,), 6))):
        y, h = fused(*args, modulation=mod, checkpoint_every=2, clip=0.5, **kw)
        outs.append((y, h) + torch.autograd.grad(loss_of(y, h), inputs))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# The key property: a call with resets and lengths is the same episodes run as separate calls.

def episodes(reset, lengths, T, B):
    """For each row b, its episodes as (start, end) steps."""
    out = []
    for b in range(B):
        end = T if lengths is None else int(lengths[b])
        starts = [0] + [t for t in range(1, end) if reset is not None and bool(reset[t, b])]
        out.append(list(zip(starts, starts[1:] + [end])))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("name", ["both", "reset_first", "reset_every_row", "lengths_mixed"])
@pytest.mark.parametrize("form", FORMS)
def test_same_as_separate_calls(form, name, impl, device):
    T, B = 7, 4
    args, mod = make_inputs(form, T=T, B=B, n_in=4, n_out=5, device=device, seed=7, modulation="per_output")
    fn = fns(form)[0 if impl == "fused" else 1]
    reset, lengths = pattern(name, T, B, device)
    kw = dict(rule="oja", activation="tanh", clip=0.6, checkpoint_every=3)
    inputs = grad_inputs(args, mod)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(T, B, args[1].shape[1], generator=g, dtype=torch.float64).to(device)
    gh = torch.randn(args[4].shape, generator=g, dtype=torch.float64).to(device)

    y, h = fn(*args, modulation=mod, reset=reset, lengths=lengths, **kw)
    batched_loss = (y * gy).sum() + (h * gh).sum()
    g_batched = torch.autograd.grad(batched_loss, inputs, allow_unused=True)

    x, trace = args[0], args[4]
    y_sep = torch.zeros_like(y)
    h_sep = torch.empty_like(h)
    separate_loss = 0
    for b, row in enumerate(episodes(reset, lengths, T, B)):
        for k, (s, e) in enumerate(row):
            first = k == 0 and not (reset is not None and bool(reset[0, b]))
            piece = list(args)
            piece[0] = x[s:e, b:b + 1]
            piece[4] = trace[b:b + 1] if first else torch.zeros_like(trace[b:b + 1])
            if form == "rnn":
                piece[5] = args[5][b:b + 1] if first else torch.zeros_like(args[5][b:b + 1])
            yp, hp = fn(*piece, modulation=mod[s:e, b:b + 1], **kw)
            y_sep[s:e, b:b + 1] = yp.detach()
            separate_loss = separate_loss + (yp * gy[s:e, b:b + 1]).sum()
            if k == len(row) - 1:
                h_sep[b] = hp[0].detach()
                separate_loss = separate_loss + (hp * gh[b:b + 1]).sum()
    g_separate = torch.autograd.grad(separate_loss, inputs, allow_unused=True)
    torch.testing.assert_close(y, y_sep, **F64)
    torch.testing.assert_close(h, h_sep, **F64)
    for i, (a, c) in enumerate(zip(g_batched, g_separate)):
        if c is None:  # an input no episode reads (the trace or y0 of rows reset at step 0)
            c = torch.zeros_like(inputs[i])
        if a is None:
            a = torch.zeros_like(inputs[i])
        torch.testing.assert_close(a, c, **F64, msg=f"gradient of input {i} (shape {tuple(c.shape)}) differs")


def test_outputs_past_a_row_length_are_zeros_and_the_trace_is_its_own_last():
    args, mod = make_inputs("rnn", T=6, B=2, n_in=3, n_out=3, seed=3)
    lengths = torch.tensor([2, 6])
    y, h = plastic_ops.plastic_rnn(*args, modulation=mod, lengths=lengths)
    assert torch.equal(y[2:, 0], torch.zeros_like(y[2:, 0])) and (y[:2, 0] != 0).all()
    y2, h2 = plastic_ops.plastic_rnn(args[0][:2], *args[1:], modulation=mod[:2] if mod is not None else None)
    torch.testing.assert_close(h[0], h2[0], **F64)
    torch.testing.assert_close(y[:2, 0], y2[:, 0], **F64)


# ------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, higher order

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form,rule,activation,clip", [("linear", "hebb", "tanh", None),
                                                       ("linear", "oja", "softmax", 0.4),
                                                       ("rnn", "hebb", "sigmoid", 0.4),
                                                       ("rnn", "oja", "tanh", None)])
def test_gradcheck(form, rule, activation, clip, device):
    args, mod = make_inputs(form, T=5, B=3, n_in=3, n_out=3, device=device, modulation="per_output", seed=11)
    reset, lengths = pattern("both", 5, 3, device)
    f = of_tensors(fns(form)[0], args, rule=rule, activation=activation, clip=clip, checkpoint_every=2,
                   reset=reset, lengths=lengths)
    assert torch.autograd.gradcheck(f, tuple(grad_inputs(args, mod)), eps=1e-6, atol=1e-6, rtol=1e-5)


def canonical(form, T=5, B=3, n=4, device="cpu"):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_()  # noqa: E731
    pre = r(T, B, n) if form == "linear" else r(B, n)
    e = (0.2 * torch.rand(T, B, n, generator=g, dtype=torch.float64)).to(device).requires_grad_()
    steps = torch.tensor([[1, 0, 0], [0, 2, 0], [0, 0, 1], [3, 0, 2], [0, 1, 2]], dtype=torch.uint8, device=device)
    return (pre, r(T, B, n), r(n, n), r(n, n), e, r(B, n, n), "hebb", "tanh", 0.5, 2, steps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_opcheck(form, device):
    args = canonical(form, device=device)
    fwd = getattr(torch.ops.plastic_ops, f"plastic_{form}_forward")
    torch.library.opcheck(fwd.default, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    y, hT, ckpts = fwd(*plain)
    bwd = getattr(torch.ops.plastic_ops, f"plastic_{form}_backward").default
    pre, _, w, alpha, e = plain[:5]
    torch.library.opcheck(bwd, (torch.randn_like(y), torch.randn_like(hT), pre, w, alpha, e, y, ckpts,
                                "hebb", "tanh", 0.5, 2, plain[-1]))


def test_direct_op_checks_steps():
    args = list(canonical("linear"))
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    fwd = torch.ops.plastic_ops.plastic_linear_forward
    for bad, match in [(args[-1].to(torch.int32), "uint8"), (args[-1][:, :2], r"\(T, B\)"),
                       (args[-1].t().contiguous().t(), "contiguous")]:
        with pytest.raises(RuntimeError, match=match):
            fwd(*args[:-1], bad)
    bad_t = torch.zeros(3, 5, dtype=torch.uint8).t()
    with pytest.raises(RuntimeError, match="contiguous"):
        fwd(*args[:-1], bad_t)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    args, mod = make_inputs("rnn", T=6, B=3, n_in=4, n_out=4, seed=5)
    reset, lengths = pattern("both", 6, 3)

    def f(u, w, alpha, eta, trace, y0, bias, reset, lengths):
        y, h = plastic_ops.plastic_rnn(u, w, alpha, eta, trace, y0, bias, reset=reset, lengths=lengths, clip=0.5)
        y2, h2 = plastic_ops.plastic_linear(y, w, alpha, eta, h, reset=reset, lengths=lengths,
                                            drive=torch.tanh(u))
        return y2.square().sum() + h2.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    expected = f(*args, reset, lengths)
    g_expected = torch.autograd.grad(expected, grad_inputs(args, None))
    got = compiled(*args, reset, lengths)
    torch.testing.assert_close(got, expected)
    for a, b in zip(torch.autograd.grad(got, grad_inputs(args, None)), g_expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("form", FORMS)
def test_double_backward_and_func_grad(form):
    args, mod = make_inputs(form, T=4, B=2, n_in=3, n_out=3, seed=6)
    reset, lengths = pattern("both", 4, 2)
    fused, ref = fns(form)
    kw = dict(reset=reset, lengths=lengths, modulation=mod)

    def penalty(fn):
        y, h = fn(*args, **kw)
        g = torch.autograd.grad(loss_of(y, h), args[1], create_graph=True)[0]
        return torch.autograd.grad(g.square().sum(), args[2])[0]

    torch.testing.assert_close(penalty(fused), penalty(ref), **F64)
    w = args[1].detach()

    def loss(w_, fn):
        a = list(args)
        a[1] = w_
        y, h = fn(*a, **kw)
        return y.sum() + h.sum()

    torch.testing.assert_close(torch.func.grad(loss)(w, fused), torch.func.grad(loss)(w, ref), **F64)


# ------------------------------------------------------------------------------------------
# drive (linear form) and return_traces

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_drive(bias, device):
    args, mod = make_inputs("linear", T=5, B=3, n_in=4, n_out=6, bias=bias, device=device, seed=12)
    drive = torch.randn(5, 3, 6, dtype=torch.float64, device=device, requires_grad=True)
    fused, ref = fns("linear")
    inputs = grad_inputs(args, mod) + [drive]
    for kw in (dict(), dict(reset=pattern("both", 5, 3, device)[0], lengths=pattern("both", 5, 3)[1])):
        yf, hf = fused(*args, modulation=mod, drive=drive, **kw)
        yr, hr = ref(*args, modulation=mod, drive=drive, **kw)
        torch.testing.assert_close(yf, yr, **F64)
        torch.testing.assert_close(hf, hr, **F64)
        for a, b in zip(torch.autograd.grad(loss_of(yf, hf), inputs), torch.autograd.grad(loss_of(yr, hr), inputs)):
            torch.testing.assert_close(a, b, **F64)
    # a drive that is the bias repeated is the bias
    b = torch.randn(6, dtype=torch.float64, device=device)
    a = [t.detach() if isinstance(t, torch.Tensor) else t for t in args[:5]]
    y1, h1 = fused(*a, b)
    y2, h2 = fused(*a, drive=b.expand(5, 3, 6))
    torch.testing.assert_close(y1, y2, **F64)
    torch.testing.assert_close(h1, h2, **F64)


def test_drive_gradcheck():
    args, mod = make_inputs("linear", T=4, B=2, n_in=3, n_out=3, seed=13)
    drive = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    reset, lengths = pattern("both", 4, 2)

    def f(x, w, drive):
        return plastic_ops.plastic_linear(x, w, args[2], args[3], args[4], reset=reset, lengths=lengths,
                                          drive=drive, checkpoint_every=2)

    assert torch.autograd.gradcheck(f, (args[0], args[1], drive), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["reset_none", "both", "reset_last"])
@pytest.mark.parametrize("form", FORMS)
def test_return_traces(form, name, device):
    T, B = 6, 3
    args, mod = make_inputs(form, T=T, B=B, n_in=4, n_out=5, device=device, seed=14)
    reset, lengths = pattern(name, T, B, device)
    fused, ref = fns(form)
    kw = dict(modulation=mod, reset=reset, lengths=lengths, clip=0.5, checkpoint_every=4)
    yf, hf, tf = fused(*args, return_traces=True, **kw)
    yr, hr, tr = ref(*args, return_traces=True, **kw)
    assert tf.shape == (T,) + tuple(hf.shape) and tf.dtype == hf.dtype
    assert not tf.requires_grad and not tr.requires_grad
    torch.testing.assert_close(tf, tr, **F64)
    assert torch.equal(tf[-1], hf)
    # traces[t] is the trace after step t: a call of t + 1 steps ends with it
    for t in range(T):
        a = list(args)
        a[0] = args[0][:t + 1]
        r = None if reset is None else reset[:t + 1]
        L = None if lengths is None else lengths.clamp(max=t + 1)
        _, h = fused(*a, modulation=mod, reset=r, lengths=L, clip=0.5)
        torch.testing.assert_close(tf[t], h, **F64)
    # the same y, trace_T and gradients as without return_traces
    y, h = fused(*args, **kw)
    torch.testing.assert_close(yf, y, **F64)
    inputs = grad_inputs(args, mod)
    for a, b in zip(torch.autograd.grad(loss_of(yf, hf), inputs), torch.autograd.grad(loss_of(y, h), inputs)):
        torch.testing.assert_close(a, b, **F64)
    with torch.no_grad():
        _, _, t_no_grad = fused(*args, return_traces=True, **kw)
    torch.testing.assert_close(t_no_grad, tf, **F64)


# ------------------------------------------------------------------------------------------
# Bad arguments: a clear error naming the argument

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kw,error,match", [
    (dict(reset=torch.zeros(4, 2, dtype=torch.uint8)), TypeError, "reset must be a bool"),
    (dict(reset=torch.zeros(4, 3, dtype=torch.bool)), ValueError, r"reset must have shape \(T, B\)"),
    (dict(reset=torch.zeros(4, 2, dtype=torch.bool, device="meta")), ValueError, "reset is on meta"),
    (dict(reset=[[True, False]] * 4), TypeError, "reset must be None or"),
    (dict(lengths=torch.tensor([0, 4])), ValueError, "lengths must be between 1 and T = 4.*got 0"),
    (dict(lengths=torch.tensor([5, 4])), ValueError, "lengths must be between 1 and T = 4.*got 5"),
    (dict(lengths=torch.tensor([-3, 4])), ValueError, "lengths must be between"),
    (dict(lengths=torch.tensor([2.0, 4.0])), TypeError, "lengths must be an integer tensor"),
    (dict(lengths=torch.tensor([True, True])), TypeError, "lengths must be an integer tensor"),
    (dict(lengths=torch.tensor([2, 3, 4])), ValueError, r"lengths must have shape \(B,\)"),
    (dict(lengths=torch.tensor(3)), ValueError, r"lengths must have shape \(B,\)"),
    (dict(lengths=torch.tensor([2, 4], device="meta")), ValueError, "lengths is on meta"),
    (dict(lengths=2.5), TypeError, "lengths must be None or"),
    (dict(return_traces=1), TypeError, "return_traces must be"),
])
def test_bad_reset_and_lengths(form, kw, error, match):
    args, mod = make_inputs(form, T=4, B=2, n_in=3, n_out=3, seed=1)
    for fn in fns(form):
        with pytest.raises(error, match=match):
            fn(*args, **kw)


@pytest.mark.parametrize("kw,error,match", [
    (dict(drive=torch.zeros(4, 2, 4, dtype=torch.float64)), ValueError, r"drive must have shape \(T, B, N_out\)"),
    (dict(drive=torch.zeros(4, 2, 3)), TypeError, "drive has dtype torch.float32"),
    (dict(drive=torch.zeros(4, 2, 3, dtype=torch.float64, device="meta")), ValueError, "drive is on meta"),
    (dict(drive=1.0), TypeError, "drive must be a torch.Tensor"),
])
def test_bad_drive(kw, error, match):
    args, mod = make_inputs("linear", T=4, B=2, n_in=3, n_out=3, seed=1)
    for fn in fns("linear"):
        with pytest.raises(error, match=match):
            fn(*args, **kw)


def test_lengths_as_a_list_and_any_integer_dtype():
    args, mod = make_inputs("linear", T=4, B=2, n_in=3, n_out=3, seed=1)
    y_ref, h_ref = plastic_ops.plastic_linear(*args, lengths=torch.tensor([2, 4]))
    for lengths in ([2, 4], torch.tensor([2, 4], dtype=torch.uint8), torch.tensor([2, 4], dtype=torch.int16)):
        y, h = plastic_ops.plastic_linear(*args, lengths=lengths)
        assert torch.equal(y, y_ref) and torch.equal(h, h_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", FORMS)
def test_flags_read_no_value_back(form, device):
    """reset and a lengths on the device become the flags without a value read back to the host, so a
    call with them can be captured into a CUDA graph (a CPU lengths is range-checked on the host)."""
    from test_cuda_graphs import RecordOps
    args, mod = make_inputs(form, T=5, B=3, n_in=4, n_out=4, device=device, seed=3)
    reset, lengths = pattern("both", 5, 3, device)
    kw = dict(reset=reset)
    if device != "cpu":
        kw["lengths"] = lengths.to(device)
    with RecordOps() as rec:
        y, h = fns(form)[0](*args, modulation=mod, checkpoint_every=2, **kw)
        loss_of(y, h).backward()
    assert f"plastic_ops.plastic_{form}_backward" in rec.names
    assert rec.host_reads() == []
