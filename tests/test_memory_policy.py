"""The backward's memory policy (checkpoint_every=None) and a final trace that gets no gradient."""
import math

import pytest
import torch

import plastic_ops
from plastic_ops import ops, reference

from _child import run_child
from _inputs import grad_inputs, make_inputs, run

FORMS = ("linear", "rnn")
TOL = dict(rtol=1e-9, atol=1e-10)


def test_policy_keeps_every_trace_under_the_limit():
    assert ops.choose_checkpoint_every(106, 1000, limit=106 * 1000) == 1
    assert ops.choose_checkpoint_every(106, 1000, limit=106 * 1000 - 1) == 10
    assert ops.choose_checkpoint_every(1, 8, limit=0) == 1  # K = round(sqrt(1))


def test_integer_square_root_is_exact():
    # the policy's K is integer arithmetic (traceable with a symbolic T): it must equal the float formula
    for n in list(range(0, 5000)) + [10**6 - 1, 10**6, 10**6 + 1, 2**31 - 1, 2**62 + 12345]:
        assert ops.isqrt(n) == math.isqrt(n), n
    for T in range(1, 5000):
        assert ops.default_checkpoint_every(T) == max(1, round(math.sqrt(T))), T
    assert ops.default_checkpoint_every(10**12) == 10**6
    for T in range(1, 3000):
        K = ops.fewest_traces_every(T)
        assert ops.traces_held(T, K) == min(ops.traces_held(T, k) for k in range(1, T + 1)), T
        assert all(ops.traces_held(T, k) > ops.traces_held(T, K) for k in range(K + 1, T + 1)), T


def test_policy_limit_read_once_from_the_environment():
    # read when plastic_ops is imported (a read inside traced code breaks torch.compile on torch 2.4)
    out = run_child("""
        import os, torch
        os.environ["PLASTIC_OPS_KEEP_TRACES_BYTES"] = "1234"
        from plastic_ops import ops
        print(ops.keep_all_traces_bytes("cpu"), ops.keep_all_traces_bytes("cuda"))
        os.environ["PLASTIC_OPS_KEEP_TRACES_BYTES"] = "99"
        print(ops.keep_all_traces_bytes("cpu"))
        print(ops.set_keep_traces_bytes(7), ops.keep_all_traces_bytes("cpu"))
        print(ops.set_keep_traces_bytes(None), ops.keep_all_traces_bytes("cpu"))
    """)
    assert out.split("\n")[:4] == ["1234 1234", "1234", "1234 7", "7 0"]
    for bad in ("-1", "2GB", ""):
        out = run_child(f"""
            import os
            os.environ["PLASTIC_OPS_KEEP_TRACES_BYTES"] = {bad!r}
            import torch, plastic_ops
            from plastic_ops import ops
            try:
                plastic_ops.plastic_rnn(torch.zeros(2, 1, 3, requires_grad=True), torch.zeros(3, 3),
                                        torch.zeros(()), 0.1)
            except ValueError as e:
                print(e)
            ops.set_keep_traces_bytes(0)  # a valid setting replaces the bad one
            print(ops.keep_all_traces_bytes("cpu"))
        """)
        assert "PLASTIC_OPS_KEEP_TRACES_BYTES must be a number of bytes >= 0" in out and out.endswith("0\n"), out


def test_set_keep_traces_bytes_checks_its_argument(keep_traces_bytes):
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="limit must be None or a number of bytes"):
            keep_traces_bytes(bad)
    assert keep_traces_bytes(10) is None and keep_traces_bytes(None) == 10


def test_cpu_default_always_checkpoints(keep_traces_bytes):
    keep_traces_bytes(None)
    assert ops.keep_all_traces_bytes("cpu") == ops.KEEP_ALL_TRACES_BYTES["cpu"] == 0
    assert ops.choose_checkpoint_every(106, 4 * 10**6, device="cpu") == 10


# The CUDA policy, with the device's free-memory query replaced: it runs on any machine.
GiB = 2**30
ROW = 1000 * 1000 * 4  # an fp32 trace of N = 1000 is 4 MB per episode


def _cuda_with(monkeypatch, available):
    monkeypatch.setattr(ops, "cuda_available_bytes", lambda index: available)
    return torch.device("cuda", 0)


def test_cuda_keeps_every_trace_that_fits_in_the_available_fraction(monkeypatch, keep_traces_bytes):
    keep_traces_bytes(None)
    dev = _cuda_with(monkeypatch, 79 * GiB)
    assert ops.keep_all_traces_bytes(dev) == int(ops.CUDA_KEEP_FRACTION * 79 * GiB)
    # B = 32 at T = 106: 13.6 GB of traces fit into half of an 80 GB card
    assert ops.choose_checkpoint_every(106, 32 * ROW, device=dev) == 1
    # B = 128: 54 GB do not, and the interval holding the fewest traces is taken (22 traces, 11 GB)
    assert ops.choose_checkpoint_every(106, 128 * ROW, device=dev) == 12
    # the limit follows what the device can give
    dev = _cuda_with(monkeypatch, 8 * GiB)
    assert ops.choose_checkpoint_every(106, 32 * ROW, device=dev) == 12
    assert ops.choose_checkpoint_every(106, ROW, device=dev) == 1
    # an explicit limit applies to CUDA too, the fewest-traces interval beyond it
    keep_traces_bytes(0)
    assert ops.choose_checkpoint_every(106, ROW, device=dev) == 12
    assert ops.choose_checkpoint_every(30, ROW, device=dev) == 6  # ceil(30/6) + 6 = 11 = fewest, as K = 5


def test_cuda_says_what_would_fit_when_nothing_does(monkeypatch, keep_traces_bytes):
    keep_traces_bytes(None)
    dev = _cuda_with(monkeypatch, 79 * GiB)
    # B = 1024: every interval needs 22 traces of 4.1 GB or more
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        ops.choose_checkpoint_every(106, 1024 * ROW, device=dev, batch=1024, trace_dtype=torch.float32)
    msg = str(info.value)
    assert "checkpoint_every = 12" in msg and "22 traces (torch.float32)" in msg
    assert f"{22 * 1024 * ROW} bytes" in msg and f"{79 * GiB} bytes" in msg
    assert "at most 963 episodes" in msg and "trace_dtype=torch.bfloat16" in msg
    assert 22 * 963 * ROW <= 79 * GiB < 22 * 964 * ROW


@pytest.mark.parametrize("form", FORMS)
def test_public_call_gives_the_policy_its_sizes(form, monkeypatch):
    seen = {}
    real = ops.choose_checkpoint_every

    def spy(T, trace_bytes, **kw):
        seen.update(T=T, trace_bytes=trace_bytes, **kw)
        return real(T, trace_bytes, **kw)

    monkeypatch.setattr(ops, "choose_checkpoint_every", spy)
    x = torch.zeros(9, 3, 5, requires_grad=True)
    fn = plastic_ops.plastic_rnn if form == "rnn" else plastic_ops.plastic_linear
    n_out = 5 if form == "rnn" else 4
    fn(x, torch.zeros(5, n_out), torch.zeros(()), 0.1, trace_dtype=torch.bfloat16)
    assert seen == dict(T=9, trace_bytes=3 * 5 * n_out * 2, device=torch.device("cpu"), batch=3,
                        trace_dtype=torch.bfloat16)


@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_policy_compiles_without_graph_breaks(dynamic, monkeypatch, keep_traces_bytes):
    # under torch.compile the device is not queried: KEEP_ALL_TRACES_BYTES["cuda"], then the fewest traces
    keep_traces_bytes(None)
    calls = []
    monkeypatch.setattr(ops, "cuda_available_bytes", lambda index: calls.append(index) or 79 * GiB)
    dev = torch.device("cuda", 0)

    def f(x):
        return x * ops.choose_checkpoint_every(x.shape[0], x.shape[1] * ROW, device=dev)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    limit = ops.KEEP_ALL_TRACES_BYTES["cuda"]
    for T, B in ((106, 32), (106, 1), (30, 64), (107, 32), (4, 5)):
        x = torch.ones(T, B)
        expected = 1 if T * B * ROW <= limit else ops.fewest_traces_every(T)
        assert torch.equal(compiled(x), x * expected), (T, B)
    assert calls == []
    assert torch.equal(f(torch.ones(106, 32)), torch.full((106, 32), 1.0))  # eager: queried, 79 GiB
    assert calls == [0]
    torch._dynamo.reset()


def _used_K(monkeypatch, form, args, mod):
    """Runs the public function and returns the checkpoint interval it passed to the compiled op."""
    seen = []
    real = ops._op

    def spy(name):
        op = real(name)

        def call(*a):
            seen.append(a[-1])
            return op(*a)
        return call

    monkeypatch.setattr(ops, "_op", spy)
    y, h = run(getattr(plastic_ops, f"plastic_{form}"), args, mod)
    monkeypatch.setattr(ops, "_op", real)
    return seen[0], y, h


@pytest.mark.parametrize("form", FORMS)
def test_default_follows_the_limit_and_matches_reference(form, monkeypatch, keep_traces_bytes):
    T, B, n = 9, 2, 5
    args, mod = make_inputs(form, T=T, B=B, n_in=n, n_out=n, modulation="shared", seed=3)
    trace_bytes = B * n * n * 8
    yr, hr = run(reference.plastic_rnn if form == "rnn" else reference.plastic_linear, args, mod)
    gr = torch.autograd.grad((yr.sum() + hr.sum()), grad_inputs(args, mod))
    for limit, K in ((T * trace_bytes, 1), (T * trace_bytes - 1, 3)):
        keep_traces_bytes(limit)
        used, y, h = _used_K(monkeypatch, form, args, mod)
        assert used == K
        torch.testing.assert_close(y, yr, **TOL)
        gf = torch.autograd.grad((y.sum() + h.sum()), grad_inputs(args, mod))
        for a, b in zip(gf, gr):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("form", FORMS)
def test_no_gradient_needed_saves_no_checkpoint(form, monkeypatch):
    args, mod = make_inputs(form, T=4, B=2, n_in=3, n_out=3, seed=4)
    with torch.no_grad():
        used, _, _ = _used_K(monkeypatch, form, args, mod)
    assert used == 0


@pytest.mark.parametrize("clip", [None, 0.15])
@pytest.mark.parametrize("rule", ["hebb", "oja"])
@pytest.mark.parametrize("form", FORMS)
def test_gradients_bit_identical_for_every_interval(form, rule, clip):
    # The backward recomputes a trace with the forward's own update, so where H_t comes from (its
    # checkpoint or a recomputed segment) changes no bit of any gradient, clamp masks included.
    args, mod = make_inputs(form, T=11, B=3, n_in=6, n_out=6, modulation="per_output", seed=5)
    fn = getattr(plastic_ops, f"plastic_{form}")
    first = None
    for K in (1, 2, 3, 4, 11):
        y, h = run(fn, args, mod, rule=rule, clip=clip, checkpoint_every=K)
        grads = torch.autograd.grad((y * y).sum() + (h * h).sum(), grad_inputs(args, mod))
        if first is None:
            first = (y, h, grads)
            continue
        torch.testing.assert_close(y, first[0], rtol=0, atol=0)
        torch.testing.assert_close(h, first[1], rtol=0, atol=0)
        for a, b in zip(grads, first[2]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"K={K}")


@pytest.mark.parametrize("T", [1, 2, 7])
@pytest.mark.parametrize("use", ["y only", "trace only"])
@pytest.mark.parametrize("form", FORMS)
def test_unused_output_matches_reference(form, use, T):
    # A loss of y alone sends no gradient to trace_T (and one of trace_T alone none to y).
    args, mod = make_inputs(form, T=T, B=2, n_in=4, n_out=4, modulation="shared", seed=6)
    outs = []
    for fn in (getattr(plastic_ops, f"plastic_{form}"), getattr(reference, f"plastic_{form}")):
        y, h = run(fn, args, mod, rule="oja", clip=0.3, checkpoint_every=2)
        loss = (y * y).sum() if use == "y only" else (h * h).sum()
        outs.append(torch.autograd.grad(loss, grad_inputs(args, mod), allow_unused=True))
    for a, b in zip(*outs):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("form", FORMS)
def test_empty_grad_hT_is_zeros(form):
    # The compiled backward reads a 1-D empty grad_hT as zeros, bit for bit, and its fake kernel agrees.
    T, B, n = 5, 2, 4
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, drive, w, alpha, e, h0 = r(T, B, n), r(T, B, n), r(n, n), r(n, n), 0.1 * r(T, B, n).abs(), r(B, n, n)
    pre = x if form == "linear" else x[0].contiguous()
    fwd = getattr(torch.ops.plastic_ops, f"plastic_{form}_forward")
    bwd = getattr(torch.ops.plastic_ops, f"plastic_{form}_backward")
    for K in (1, 2):
        y, hT, ck = fwd(pre, drive, w, alpha, e, h0, "hebb", "tanh", 0.5, K)
        gy = r(T, B, n)
        zeros = bwd(gy, torch.zeros_like(hT), pre, w, alpha, e, y, ck, "hebb", "tanh", 0.5, K)
        empty = bwd(gy, hT.new_empty(0), pre, w, alpha, e, y, ck, "hebb", "tanh", 0.5, K)
        for a, b in zip(empty, zeros):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        meta = [t.to("meta") for t in (gy, hT.new_empty(0), pre, w, alpha, e, y, ck)]
        fake = bwd(*meta, "hebb", "tanh", 0.5, K)
        assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in zeros]


def test_every_trace_kept_is_the_forward_trace():
    # K = 1: checkpoint t is H_t, the same bits as the checkpoints of a longer interval.
    T, B, n = 6, 2, 3
    g = torch.Generator().manual_seed(8)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    args = (r(B, n), r(T, B, n), r(n, n), r(n, n), 0.2 * r(T, B, n).abs(), r(B, n, n))
    _, h1, ck1 = torch.ops.plastic_ops.plastic_rnn_forward(*args, "oja", "tanh", 0.4, 1)
    _, h2, ck2 = torch.ops.plastic_ops.plastic_rnn_forward(*args, "oja", "tanh", 0.4, 2)
    assert ck1.shape[0] == T
    torch.testing.assert_close(ck1[::2], ck2, rtol=0, atol=0)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)
    torch.testing.assert_close(ck1[0], args[5], rtol=0, atol=0)
