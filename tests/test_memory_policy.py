"""The backward's memory policy (checkpoint_every=None) and a final trace that gets no gradient."""
import pytest
import torch

import plastic_ops
from plastic_ops import ops, reference

from _inputs import grad_inputs, make_inputs, run

FORMS = ("linear", "rnn")
TOL = dict(rtol=1e-9, atol=1e-10)


def test_policy_keeps_every_trace_under_the_limit():
    assert ops.choose_checkpoint_every(106, 1000, limit=106 * 1000) == 1
    assert ops.choose_checkpoint_every(106, 1000, limit=106 * 1000 - 1) == 10
    assert ops.choose_checkpoint_every(1, 8, limit=0) == 1  # K = round(sqrt(1))


def test_policy_limit_from_the_environment(monkeypatch):
    monkeypatch.delenv("PLASTIC_OPS_KEEP_TRACES_BYTES", raising=False)
    assert ops.keep_all_traces_bytes("cpu") == ops.KEEP_ALL_TRACES_BYTES["cpu"] == 0
    assert ops.keep_all_traces_bytes("cuda") == ops.KEEP_ALL_TRACES_BYTES["cuda"] == 2 * 2**30
    assert ops.choose_checkpoint_every(106, 4 * 10**6, device_type="cpu") == 10
    assert ops.choose_checkpoint_every(106, 4 * 10**6, device_type="cuda") == 1
    monkeypatch.setenv("PLASTIC_OPS_KEEP_TRACES_BYTES", "0")
    assert ops.choose_checkpoint_every(16, 4) == 4
    for bad in ("-1", "2GB", ""):
        monkeypatch.setenv("PLASTIC_OPS_KEEP_TRACES_BYTES", bad)
        with pytest.raises(ValueError, match="PLASTIC_OPS_KEEP_TRACES_BYTES"):
            ops.keep_all_traces_bytes()


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
def test_default_follows_the_limit_and_matches_reference(form, monkeypatch):
    T, B, n = 9, 2, 5
    args, mod = make_inputs(form, T=T, B=B, n_in=n, n_out=n, modulation="shared", seed=3)
    trace_bytes = B * n * n * 8
    yr, hr = run(reference.plastic_rnn if form == "rnn" else reference.plastic_linear, args, mod)
    gr = torch.autograd.grad((yr.sum() + hr.sum()), grad_inputs(args, mod))
    for limit, K in ((T * trace_bytes, 1), (T * trace_bytes - 1, 3)):
        monkeypatch.setenv("PLASTIC_OPS_KEEP_TRACES_BYTES", str(limit))
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
