"""bfloat16 and float16 inputs, the bfloat16 trace, autocast (docs/op_spec.md, "Dtypes").

Every case is compared with the reference run on the same (rounded) inputs: it computes in float32
and rounds where the kernels store (y to the inputs' dtype, H to the trace's), so the two differ
by float32 summation order only, which may move a stored value by one unit of its dtype. The
float64 gradchecks of tests/test_gradcheck.py are unchanged.
"""
import pytest
import torch

import plastic_ops
from plastic_ops import ops, reference
from plastic_ops.nn import PlasticLinear, PlasticRNN

from _inputs import grad_inputs, loss_of, make_inputs, run
from conftest import DEVICES

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
# (input dtype, trace dtype): every allowed pair but the float32/float64 ones of the other op tests
PAIRS = [(F32, BF16), (BF16, F32), (BF16, BF16), (F16, F32), (F16, BF16)]
PAIR_IDS = [f"{str(d)[6:]}-trace_{str(t)[6:]}" for d, t in PAIRS]
# a few option sets that between them reach both rules, clip, modulation and every activation kind
CASES = {
    "hebb-tanh": dict(rule="hebb", activation="tanh"),
    "oja-sigmoid-clip-mod": dict(rule="oja", activation="sigmoid", clip=0.3, modulation="per_output"),
    "hebb-softmax-clip-shared": dict(rule="hebb", activation="softmax", clip=0.5, modulation="shared"),
    "oja-relu-clip": dict(rule="oja", activation="relu", clip=0.5),
}


def eps(*dtypes) -> float:
    return max(torch.finfo(d).eps for d in dtypes)


def assert_match(actual, expected, e: float, what: str):
    """Equal up to a few units of the coarsest stored dtype, relative to the tensor's scale."""
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    a, b = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(1.0, b.abs().max().item())
    torch.testing.assert_close(a, b, rtol=4 * e, atol=4 * e * scale, msg=lambda m: f"{what}: {m}")


def both(form, dtype, trace_dtype, opts, device="cpu", T=6, B=3, n_in=5, n_out=7, K=2):
    """(y, H_T, gradients) of the fused op and of the reference on the same inputs."""
    opts = dict(opts)
    args, mod = make_inputs(form, T, B, n_in, n_out, modulation=opts.pop("modulation", None), dtype=dtype,
                            device=device, seed=7)
    # the initial trace in its storage dtype, rounded from the same values
    args[4] = args[4].detach().to(trace_dtype).requires_grad_()
    out = []
    for impl in (plastic_ops, reference):
        fn = getattr(impl, f"plastic_{form}")
        y, h = run(fn, args, mod, checkpoint_every=K, trace_dtype=trace_dtype, **opts)
        grads = torch.autograd.grad(loss_of(y, h), grad_inputs(args, mod))
        out.append((y, h, grads))
    return args, mod, out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("form", ["linear", "rnn"])
def test_matches_reference_in_every_dtype(form, pair, case, device):
    dtype, trace_dtype = pair
    args, mod, ((y, h, grads), (y_ref, h_ref, grads_ref)) = both(form, dtype, trace_dtype, CASES[case], device)
    e = eps(dtype, trace_dtype)
    assert y.dtype == dtype and h.dtype == trace_dtype
    assert_match(y, y_ref, e, "y")
    assert_match(h, h_ref, e, "H_T")
    for t, g, g_ref in zip(grad_inputs(args, mod), grads, grads_ref):
        assert g.dtype == t.dtype  # each gradient in its input's dtype (the trace's: the trace's)
        assert_match(g, g_ref, e, f"grad of a {tuple(t.shape)} input")


@pytest.mark.parametrize("K", [1, 3, None])
def test_checkpoint_intervals_with_a_bfloat16_trace(K):
    # recomputed traces must be rounded exactly as the forward rounded them
    _, _, ((y, h, grads), (y_ref, h_ref, grads_ref)) = both("rnn", F32, BF16, CASES["oja-sigmoid-clip-mod"], K=K, T=7)
    e = eps(BF16)
    for a, b in zip((y, h) + tuple(grads), (y_ref, h_ref) + tuple(grads_ref)):
        assert_match(a, b, e, "output or gradient")


def test_bfloat16_trace_is_rounded_and_close_to_float32():
    args, mod = make_inputs("rnn", 8, 2, 6, 6, dtype=F32, seed=3)
    y32, h32 = run(plastic_ops.plastic_rnn, args, mod)
    args[4] = args[4].detach().to(BF16)
    y16, h16 = run(plastic_ops.plastic_rnn, args, mod, trace_dtype=BF16)
    assert h16.dtype == BF16 and h32.dtype == F32 and y16.dtype == F32
    # the option does round (results differ) but by about bfloat16's precision only
    assert not torch.equal(y16, y32)
    torch.testing.assert_close(y16, y32, rtol=0, atol=16 * eps(BF16))
    torch.testing.assert_close(h16.float(), h32, rtol=8 * eps(BF16), atol=8 * eps(BF16) * h32.abs().max().item())


def test_bfloat16_trace_loses_a_decay_below_its_precision():
    # the limit documented in docs/op_spec.md: (1 - e) H rounds back to H in bfloat16 when e is
    # below about 2^-9, so such a trace never decays; at e = 0.01 it decays as in float32
    x = torch.zeros(20, 1, 4)
    w, alpha, h0 = torch.zeros(4, 4), torch.zeros(4, 4), torch.full((1, 4, 4), 0.75)
    for eta, decays in ((0.001, False), (0.01, True)):
        _, h32 = plastic_ops.plastic_linear(x, w, alpha, eta, h0)
        _, h16 = plastic_ops.plastic_linear(x, w, alpha, eta, h0.to(BF16))
        assert h32.max() < 0.75
        assert (h16.float().max() < 0.75) == decays
        if decays:
            torch.testing.assert_close(h16.float(), h32, rtol=8 * eps(BF16), atol=0)


def test_16bit_inputs_are_computed_in_float32():
    # bfloat16 inputs give the float32 result on the same values, rounded once (not a bfloat16 computation)
    args, mod = make_inputs("linear", 5, 2, 6, 4, dtype=BF16, trace=False, seed=5)
    y16, h16 = run(plastic_ops.plastic_linear, [a.detach() if a is not None else None for a in args], mod)
    args32 = [a.detach().float() if a is not None else None for a in args]
    y32, h32 = run(plastic_ops.plastic_linear, args32, mod)
    assert h16.dtype == F32
    torch.testing.assert_close(y16.float(), y32.to(BF16).float(), rtol=0, atol=eps(BF16))
    assert (y16.float() == y32.to(BF16).float()).float().mean() > 0.9


def test_episode_continues_with_its_bfloat16_trace():
    args, _ = make_inputs("rnn", 4, 2, 5, 5, dtype=F32, trace=False, seed=1)
    u, w, alpha, eta = (a.detach() for a in args[:4])
    y, h = plastic_ops.plastic_rnn(u, w, alpha, eta, trace_dtype=BF16)
    # the trace's own dtype is kept when trace_dtype is not repeated
    y2, h2 = plastic_ops.plastic_rnn(u, w, alpha, eta, h, y0=y[-1])
    assert h2.dtype == BF16
    y_all, h_all = plastic_ops.plastic_rnn(torch.cat([u, u]), w, alpha, eta, trace_dtype=BF16)
    torch.testing.assert_close(y_all[4:], y2, rtol=0, atol=0)
    torch.testing.assert_close(h_all, h2, rtol=0, atol=0)


def test_memory_policy_counts_the_trace_bytes(keep_traces_bytes):
    # a bfloat16 trace takes half the bytes: with a limit between the two, every trace is kept for it only
    T, B, N = 10, 2, 8
    p32 = ops.check_rnn(torch.zeros(T, B, N), torch.zeros(N, N), torch.zeros(()), 0.1)
    p16 = ops.check_rnn(torch.zeros(T, B, N), torch.zeros(N, N), torch.zeros(()), 0.1, trace_dtype=BF16)
    keep_traces_bytes(T * B * N * N * 3)
    assert ops._canonical(p16, True, True)[3] == 1
    assert ops._canonical(p32, True, True)[3] == ops.default_checkpoint_every(T)


# ---------------------------------------------------------------------------------------------
# Registration: opcheck (fake kernels, autograd, AOT dispatch) on the new dtypes

def canonical_args(form, dtype, trace_dtype, T=4, B=2, n=5, K=2):
    g = torch.Generator().manual_seed(0)
    r = lambda *s, k=1.0: (k * torch.randn(*s, generator=g)).to(dtype).requires_grad_()  # noqa: E731
    pre = r(T, B, n) if form == "linear" else r(B, n)
    h0 = (0.1 * torch.randn(B, n, n, generator=g)).to(trace_dtype).requires_grad_()
    e = (0.2 * torch.rand(T, B, n, generator=g)).to(dtype).requires_grad_()
    return (pre, r(T, B, n), r(n, n, k=0.3), r(n, n, k=0.3), e, h0, "oja", "tanh", 0.5, K)


@pytest.mark.parametrize("pair", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("form", ["linear", "rnn"])
def test_opcheck_new_dtypes(form, pair):
    args = canonical_args(form, *pair)
    fwd = getattr(torch.ops.plastic_ops, f"plastic_{form}_forward")
    torch.library.opcheck(fwd.default, args)
    y, hT, ckpts = fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    assert (y.dtype, hT.dtype, ckpts.dtype) == (pair[0], pair[1], pair[1])
    pre, _, w, alpha, e = (a.detach() for a in args[:5])
    bwd = getattr(torch.ops.plastic_ops, f"plastic_{form}_backward")
    torch.library.opcheck(bwd.default, (torch.randn_like(y), torch.randn_like(hT), pre, w, alpha, e, y, ckpts,
                                        "oja", "tanh", 0.5, 2))
    grads = bwd(torch.randn_like(y), hT.new_empty(0), pre, w, alpha, e, y, ckpts, "oja", "tanh", 0.5, 2)
    assert [g.dtype for g in grads[:6]] == [pair[0]] * 5 + [pair[1]]
    assert [g.numel() for g in grads[6:]] == [0, 0]  # mod and elig_rate were not given


# ---------------------------------------------------------------------------------------------
# torch.autocast: the op's inputs are cast like a matmul's, the trace keeps its dtype

AUTOCAST = [
    pytest.param("cpu", BF16, id="cpu-bfloat16"),
    pytest.param("cuda", F16, id="cuda-float16",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
    pytest.param("cuda", BF16, id="cuda-bfloat16",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_casts_like_a_matmul(device, dtype, impl):
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5).to(device)
    plastic = PlasticLinear(5, 4, init_std=0.3, impl=impl).to(device)
    x = torch.randn(3, 2, 6, device=device)
    with torch.autocast(device, dtype=dtype):
        h = lin(x)  # an autocast layer before: its output has the autocast dtype
        assert h.dtype == dtype
        y, state = plastic(h)
        trace = state.trace
        loss = y.float().square().sum()
    assert y.dtype == dtype and trace.dtype == F32
    loss.backward()
    assert plastic.weight.grad.dtype == F32 and lin.weight.grad.dtype == F32
    # the same as casting the parameters by hand outside autocast
    params = [p.detach().to(dtype) for p in (plastic.weight, plastic.alpha, plastic.eta, plastic.bias)]
    y_hand, trace_hand = plastic_ops.plastic_linear(h.detach(), *params[:3], None, params[3])
    torch.testing.assert_close(y.detach(), y_hand, rtol=0, atol=0)
    torch.testing.assert_close(trace.detach(), trace_hand, rtol=0, atol=0)


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_backward_inside_autocast_equals_backward_outside(device, dtype):
    torch.manual_seed(1)
    rnn = PlasticRNN(6, init_std=0.3, trace_dtype=BF16).to(device)
    u = torch.randn(5, 2, 6, device=device)
    grads = []
    for inside in (False, True):
        rnn.zero_grad()
        with torch.autocast(device, dtype=dtype):
            y, (_, trace) = rnn(u)
            loss = y.float().square().sum() + trace.float().sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        assert trace.dtype == BF16 and y.dtype == dtype
        grads.append([p.grad.clone() for p in rnn.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_traces_the_autocast_cast(inductor):
    w = (0.3 * torch.randn(4, 4)).requires_grad_()
    alpha, x = 0.3 * torch.randn(4, 4), torch.randn(3, 2, 4)

    def fn(x, w, alpha):
        with torch.autocast("cpu", dtype=BF16):
            return plastic_ops.plastic_linear(x, w, alpha, 0.1)

    y, h = torch.compile(fn, fullgraph=True)(x, w, alpha)
    y_eager, h_eager = fn(x, w, alpha)
    assert y.dtype == BF16 and h.dtype == F32
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    torch.testing.assert_close(h, h_eager, rtol=0, atol=0)
    y.float().sum().backward()
    assert w.grad.dtype == F32


def test_float64_is_not_cast_by_autocast():
    args, mod = make_inputs("linear", 3, 2, 4, 3, dtype=F64, seed=2)
    y0, _ = run(plastic_ops.plastic_linear, args, mod)
    with torch.autocast("cpu", dtype=BF16):
        y1, h1 = run(plastic_ops.plastic_linear, args, mod)
    assert y1.dtype == F64 and h1.dtype == F64
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Layers in 16 bits

@pytest.mark.parametrize("dtype,trace_dtype", [(BF16, None), (F16, None), (BF16, BF16), (F32, BF16)])
@pytest.mark.parametrize("cls", [PlasticLinear, PlasticRNN])
def test_layer_in_16_bits_matches_its_reference(cls, dtype, trace_dtype):
    torch.manual_seed(2)
    layer = (PlasticLinear(5, 5, init_std=0.3, clip=0.8) if cls is PlasticLinear else PlasticRNN(5, init_std=0.3))
    layer.trace_dtype = trace_dtype
    layer = layer.to(dtype)  # as model.to(torch.bfloat16) does
    x = torch.randn(4, 3, 5).to(dtype)
    outs = []
    for impl in ("fused", "reference"):
        layer.impl = impl
        layer.zero_grad()
        y, state = layer(x)
        trace = state.trace
        (y.float().sum() + trace.float().sum()).backward()
        outs.append((y, trace, [p.grad for p in layer.parameters()]))
    (y, trace, grads), (y_ref, trace_ref, grads_ref) = outs
    e = eps(dtype, trace_dtype or F32)
    assert y.dtype == dtype and trace.dtype == (trace_dtype or F32)
    assert_match(y, y_ref, e, "y")
    assert_match(trace, trace_ref, e, "trace")
    for p, g, g_ref in zip(layer.parameters(), grads, grads_ref):
        assert g.dtype == dtype
        assert_match(g, g_ref, e, "parameter gradient")


# ---------------------------------------------------------------------------------------------
# Validation: clear errors naming the argument

def small(dtype=F32, **over):
    kw = dict(x=torch.randn(3, 2, 4, dtype=dtype), w=torch.randn(4, 3, dtype=dtype),
              alpha=torch.randn(4, 3, dtype=dtype), eta=0.1)
    kw.update(over)
    return kw


@pytest.mark.parametrize("impl", [plastic_ops, reference], ids=["fused", "reference"])
@pytest.mark.parametrize("over,kw,pattern", [
    (dict(), dict(trace_dtype=F16), r"trace_dtype torch.float16 is not supported for torch.float32 x"),
    (dict(), dict(trace_dtype=F64), r"trace_dtype torch.float64 is not supported"),
    (dict(), dict(trace_dtype="bfloat16"), r"trace_dtype must be None or a torch.dtype"),
    (dict(dtype=F64), dict(trace_dtype=BF16), r"trace_dtype torch.bfloat16 is not supported for torch.float64 x"),
    (dict(dtype=BF16), dict(trace_dtype=BF16, trace=torch.zeros(2, 4, 3)), r"trace has dtype torch.float32 but "
                                                                           r"trace_dtype is torch.bfloat16"),
    (dict(dtype=F16), dict(trace=torch.zeros(2, 4, 3, dtype=F16)), r"trace has dtype torch.float16, which is not "
                                                                    r"supported for torch.float16 x"),
    (dict(), dict(trace=torch.zeros(2, 4, 3, dtype=F64)), r"trace has dtype torch.float64"),
    (dict(w=torch.randn(4, 3, dtype=BF16)), dict(), r"w has dtype torch.bfloat16 but x has torch.float32"),
])
def test_bad_dtypes_are_refused_clearly(impl, over, kw, pattern):
    over = dict(over)  # shared by the parametrizations
    dtype = over.pop("dtype", F32)
    with pytest.raises(TypeError, match=pattern):
        impl.plastic_linear(**small(dtype, **over), **kw)


def test_layer_rejects_a_bad_trace_dtype():
    with pytest.raises(TypeError, match="trace_dtype"):
        PlasticRNN(3, trace_dtype=torch.int32)
    layer = PlasticRNN(3, trace_dtype=BF16).double()
    with pytest.raises(TypeError, match="trace_dtype torch.bfloat16 is not supported for torch.float64"):
        layer(torch.randn(2, 1, 3, dtype=F64))


def test_direct_op_call_with_a_float16_trace_is_refused():
    args = list(canonical_args("linear", BF16, F32))
    args[5] = args[5].detach().half()
    with pytest.raises(RuntimeError, match="plastic_ops: a trace of dtype Half is not supported"):
        torch.ops.plastic_ops.plastic_linear_forward(*(a.detach() if isinstance(a, torch.Tensor) else a
                                                       for a in args))
