"""The layers as drop-ins for nn.RNN / nn.Linear: sizes, the state object, eta's range, initialization."""
import io
import math
import warnings

import pytest
import torch

from plastic_ops.nn import PlasticLinear, PlasticLinearState, PlasticRNN, PlasticRNNState

F64 = dict(dtype=torch.float64)


def rnn_pair(**kw):
    torch.manual_seed(0)
    return PlasticRNN(5, 7, init_std=0.3, **F64, **kw)


def test_input_and_hidden_sizes_like_nn_rnn():
    rnn = rnn_pair()
    assert rnn.weight_ih.shape == (7, 5) and rnn.weight.shape == (7, 7)
    assert (rnn.input_size, rnn.hidden_size) == (5, 7)
    assert {n for n, _ in rnn.named_parameters()} == {"weight_ih", "weight", "alpha", "eta", "bias"}
    x = torch.randn(4, 3, 5, **F64)
    out, state = rnn(x)
    assert out.shape == (4, 3, 7) and isinstance(state, PlasticRNNState)
    assert state.y.shape == (3, 7) and state.trace.shape == (3, 7, 7)
    # the projection is a plain linear map in front of the size-only layer
    bare = PlasticRNN(7, init_std=0.3, **F64)
    bare.load_state_dict({k: v for k, v in rnn.state_dict().items() if k != "weight_ih"})
    out2, state2 = bare(x @ rnn.weight_ih.T)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(state.trace, state2.trace)
    with pytest.raises(ValueError, match="input_size = 5"):
        rnn(torch.randn(4, 3, 7, **F64))
    with pytest.raises(ValueError, match="input_size"):
        PlasticRNN(0, 4)


@pytest.mark.parametrize("batch_first", [False, True])
def test_state_continues_the_episode(batch_first):
    rnn = rnn_pair(batch_first=batch_first)
    x = torch.randn(3, 6, 5, **F64) if batch_first else torch.randn(6, 3, 5, **F64)
    whole, s_whole = rnn(x)
    first, second = (x[:, :2], x[:, 2:]) if batch_first else (x[:2], x[2:])
    out1, s = rnn(first)
    out2, s = rnn(second, s)
    torch.testing.assert_close(torch.cat([out1, out2], dim=1 if batch_first else 0), whole)
    torch.testing.assert_close(s.y, s_whole.y)
    torch.testing.assert_close(s.trace, s_whole.trace)
    torch.testing.assert_close(s.y, whole[:, -1] if batch_first else whole[-1])
    # a plain tuple of the same fields goes back in too
    out3, _ = rnn(second, tuple(rnn(first)[1]))
    torch.testing.assert_close(out3, out2)


def test_state_detach_batch_reset_save():
    rnn = rnn_pair()
    x = torch.randn(4, 3, 5, **F64)
    _, s = rnn(x)
    assert s.trace.requires_grad and not any(t.requires_grad for t in s.detach())
    # truncated BPTT: the second segment's gradient stops at the detached state
    out, _ = rnn(x, s.detach())
    out.sum().backward()
    # picking episodes: the same as running only those rows
    idx = torch.tensor([2, 0])
    _, s_rows = rnn(x[:, idx])
    for a, b in zip(s.batch(idx), s_rows):
        torch.testing.assert_close(a, b)
    assert s.batch(1).y.shape == (1, 7) and s.batch(-1).trace.shape == (1, 7, 7)
    assert s.batch(torch.tensor([True, False, True])).y.shape == (2, 7)
    # reset: the masked rows are a new episode, as if run from no state
    r = s.reset(torch.tensor([True, False, False]))
    assert not r.y[0].any() and not r.trace[0].any() and torch.equal(r.trace[1:], s.trace[1:])
    out_r, _ = rnn(x, r)
    torch.testing.assert_close(out_r[:, 0], rnn(x[:, :1])[0][:, 0])
    with pytest.raises(ValueError, match="mask"):
        s.reset(torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match="B = 3"):
        s.reset(torch.tensor([True, False]))
    buf = io.BytesIO()
    torch.save(s.detach(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, PlasticRNNState) and torch.equal(loaded.trace, s.trace)


def test_linear_state():
    torch.manual_seed(0)
    layer = PlasticLinear(4, 3, init_std=0.3, **F64)
    x = torch.randn(5, 2, 4, **F64)
    y, s = layer(x)
    assert isinstance(s, PlasticLinearState) and s.trace.shape == (2, 4, 3)
    y1, s1 = layer(x[:2])
    y2, s2 = layer(x[2:], s1)
    torch.testing.assert_close(torch.cat([y1, y2]), y)
    torch.testing.assert_close(s2.trace, s.trace)


def test_former_call_forms_keep_working():
    rnn = rnn_pair()
    u = torch.randn(5, 2, 7, **F64)
    bare = PlasticRNN(7, init_std=0.3, **F64)
    y, s = bare(u)
    # a bare trace and y0, as before the state object
    y_b, s_b = bare(u, s.trace, s.y)
    y_s, s_s = bare(u, s)
    torch.testing.assert_close(y_b, y_s)
    torch.testing.assert_close(s_b.trace, s_s.trace)
    # the state where the trace was, with y0: y0 wins, with a warning
    with pytest.warns(FutureWarning, match="y0"):
        y_w, _ = bare(u, s, y[-1])
    torch.testing.assert_close(y_w, y_s)
    # tensor attributes on the returned state reach its trace, with a warning
    with pytest.warns(FutureWarning, match="state.trace"):
        assert s.shape == (2, 7, 7)
    with pytest.raises(AttributeError, match="no attribute 'not_a_tensor_attribute'"):
        s.not_a_tensor_attribute
    with pytest.raises(TypeError, match="state must be None, a PlasticRNNState"):
        bare(u, "trace")


def test_bias_by_default_like_torch():
    assert PlasticRNN(4).bias is not None and PlasticLinear(4, 3).bias is not None
    assert PlasticRNN(4, bias=False).bias is None and PlasticLinear(4, 3, bias=False).bias is None


def test_alpha_initialized_apart_from_weight():
    torch.manual_seed(0)
    layer = PlasticRNN(300, init_std=0.02, alpha_init_std=0.001)
    assert abs(layer.weight.std().item() - 0.02) < 2e-3
    assert abs(layer.alpha.std().item() - 0.001) < 1e-4
    same = PlasticLinear(300, 300, init_std=0.05)
    assert abs(same.alpha.std().item() - 0.05) < 5e-3
    for bad in (-0.1, math.nan, math.inf, "0.1"):
        with pytest.raises(ValueError, match="init_std must be a finite number >= 0"):
            PlasticRNN(4, init_std=bad)
        with pytest.raises(ValueError, match="alpha_init_std must be a finite number >= 0"):
            PlasticLinear(4, 2, alpha_init_std=bad)


@pytest.mark.parametrize("bad,match", [(-0.01, "eta must be a finite number >= 0"),
                                       (math.nan, "eta must be a finite number >= 0"),
                                       (math.inf, "eta must be a finite number >= 0"),
                                       (torch.tensor([0.1, 0.2]), "eta must be a real number or a one-element"),
                                       ("0.1", "eta must be a number"), (True, "eta must be a number")])
def test_bad_initial_eta_names_eta(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PlasticRNN(4, eta=bad)
    with pytest.raises((ValueError, TypeError), match=match):
        PlasticLinear(4, 2, eta=bad)


def test_eta_from_a_tensor():
    assert PlasticRNN(4, eta=torch.tensor(0.25)).eta.item() == pytest.approx(0.25)
    assert PlasticRNN(4, eta=torch.tensor([0.5])).eta.item() == pytest.approx(0.5)


@pytest.mark.parametrize("constraint", ["clamp", "sigmoid"])
def test_eta_constraint_keeps_the_rate_in_range(constraint):
    torch.manual_seed(0)
    rnn = PlasticRNN(4, eta=0.2, eta_constraint=constraint, init_std=0.3, **F64)
    assert rnn.plasticity_rate().item() == pytest.approx(0.2)
    param = rnn.eta_logit if constraint == "sigmoid" else rnn.eta
    assert param.requires_grad and (constraint == "sigmoid") == ("eta_logit" in dict(rnn.named_parameters()))
    y, s = rnn(torch.randn(5, 2, 4, **F64))
    (y.sum() + s.trace.sum()).backward()
    assert param.grad is not None and param.grad != 0
    with torch.no_grad():
        param.fill_(-50.0)
    assert 0.0 <= rnn.plasticity_rate().item() <= 1.0
    with torch.no_grad():
        param.fill_(50.0)
    assert 0.0 <= rnn.plasticity_rate().item() <= 1.0
    # the rate the op gets is the constrained one: the same as an unconstrained layer at that value
    plain = PlasticRNN(4, eta=0.2, init_std=0.3, **F64)
    with torch.no_grad():
        param.fill_(0.0 if constraint == "sigmoid" else 0.5)
        plain.load_state_dict({k: v for k, v in rnn.state_dict().items() if not k.startswith("eta")}, strict=False)
        plain.eta.fill_(0.5)
    u = torch.randn(3, 2, 4, **F64)
    torch.testing.assert_close(rnn(u)[0], plain(u)[0])
    with pytest.raises(ValueError, match=r"eta must lie in \(0, 1\)"):
        PlasticRNN(4, eta=0.0, eta_constraint="sigmoid")
    with pytest.raises(ValueError, match="eta_constraint must be one of"):
        PlasticRNN(4, eta_constraint="softplus")


def test_compiled_layer_returns_the_state():
    rnn = PlasticRNN(3, 5, clip=1.0)
    x = torch.randn(4, 2, 3)
    out, s = rnn(x)
    torch._dynamo.reset()
    c_out, c_s = torch.compile(rnn, backend="aot_eager", fullgraph=True)(x)
    assert isinstance(c_s, PlasticRNNState)
    torch.testing.assert_close(c_out, out)
    torch.testing.assert_close(c_s.trace, s.trace)
    c_out2, _ = torch.compile(rnn, backend="aot_eager", fullgraph=True)(x, c_s.detach())
    torch.testing.assert_close(c_out2, rnn(x, s.detach())[0])
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnn(x, s)  # no warning on the new call form


# ---------------------------------------------------------------------------------------------
# Episodes inside one call: reset, lengths, PackedSequence; the linear drive; the traces option

def _params_grads(module, loss):
    module.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_layer_reset_equals_separate_episodes(impl, batch_first):
    rnn = rnn_pair(batch_first=batch_first, clip=1.5, impl=impl)
    T, B = 7, 3
    x = torch.randn(T, B, 5, **F64)
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[3, 0] = reset[5, 2] = True                          # rows 0 and 2 start a new episode mid-call
    tb = (lambda t: t.transpose(0, 1)) if batch_first else (lambda t: t)
    out, state = rnn(tb(x), reset=tb(reset))
    out = tb(out)
    grads = _params_grads(rnn, (out * out).sum() + state.trace.sum())
    # the same episodes, one call each; a row's later episode starts from a zero state
    pieces = {0: [(0, 3), (3, 7)], 1: [(0, 7)], 2: [(0, 5), (5, 7)]}
    ys, last_states, loss = {}, {}, 0
    for b, spans in pieces.items():
        for a, e in spans:
            y_b, s_b = rnn(tb(x[a:e, b:b + 1]))
            ys[(b, a)] = tb(y_b)
            loss = loss + (y_b * y_b).sum()
        last_states[b] = s_b
        loss = loss + s_b.trace.sum()
    for b, spans in pieces.items():
        for a, e in spans:
            torch.testing.assert_close(out[a:e, b:b + 1], ys[(b, a)])
        torch.testing.assert_close(state.trace[b], last_states[b].trace[0])
        torch.testing.assert_close(state.y[b], last_states[b].y[0])
    for g, g_sep in zip(grads, _params_grads(rnn, loss)):
        torch.testing.assert_close(g, g_sep)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_layer_lengths_and_packed_sequences(impl):
    from torch.nn.utils.rnn import pack_sequence, pad_sequence
    rnn = rnn_pair(impl=impl)
    seqs = [torch.randn(n, 5, **F64) for n in (4, 1, 6)]
    lengths = torch.tensor([4, 1, 6])
    out, state = rnn(pad_sequence(seqs), lengths=lengths)
    packed_out, packed_state = rnn(pack_sequence(seqs, enforce_sorted=False))
    torch.testing.assert_close(packed_state.trace, state.trace)
    torch.testing.assert_close(packed_state.y, state.y)
    assert torch.equal(torch.nn.utils.rnn.pad_packed_sequence(packed_out)[0], out)
    for b, seq in enumerate(seqs):
        alone, s = rnn(seq[:, None])
        torch.testing.assert_close(out[:len(seq), b], alone[:, 0])
        torch.testing.assert_close(state.y[b], s.y[0])
        assert not out[len(seq):, b].any()
    with pytest.raises(ValueError, match="lengths must be None when input is a PackedSequence"):
        rnn(pack_sequence(seqs, enforce_sorted=False), lengths=lengths)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_linear_drive_is_added_before_the_activation(impl):
    torch.manual_seed(0)
    layer = PlasticLinear(4, 3, init_std=0.3, bias=False, impl=impl, **F64)
    x = torch.randn(5, 2, 4, **F64)
    drive = torch.randn(5, 2, 3, **F64, requires_grad=True)
    y, s = layer(x, drive=drive)
    # a drive constant over time and rows is a bias
    bias_layer = PlasticLinear(4, 3, init_std=0.3, impl=impl, **F64)
    with torch.no_grad():
        bias_layer.weight.copy_(layer.weight)
        bias_layer.alpha.copy_(layer.alpha)
        bias_layer.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    y_b, s_b = bias_layer(x)
    y_d, s_d = layer(x, drive=bias_layer.bias.detach().expand(5, 2, 3))
    torch.testing.assert_close(y_d, y_b)
    torch.testing.assert_close(s_d.trace, s_b.trace)
    (g,) = torch.autograd.grad(y.sum() + s.trace.sum(), drive)
    assert g.shape == drive.shape and g.abs().sum() > 0
    with pytest.raises(ValueError, match="drive"):
        layer(x, drive=torch.randn(5, 2, 4, **F64))


@pytest.mark.parametrize("batch_first", [False, True])
def test_return_traces(batch_first):
    rnn = rnn_pair(batch_first=batch_first)
    x = torch.randn(2, 6, 5, **F64) if batch_first else torch.randn(6, 2, 5, **F64)
    out, state, traces = rnn(x, return_traces=True)
    assert traces.shape == ((2, 6, 7, 7) if batch_first else (6, 2, 7, 7)) and not traces.requires_grad
    last = traces[:, -1] if batch_first else traces[-1]
    torch.testing.assert_close(last, state.trace.detach())
    rnn.impl = "reference"
    _, _, traces_ref = rnn(x, return_traces=True)
    torch.testing.assert_close(traces, traces_ref)
    # step t's trace is the final trace of a call of t + 1 steps
    first3 = rnn(x[:, :3] if batch_first else x[:3])[1].trace
    torch.testing.assert_close(traces[:, 2] if batch_first else traces[2], first3.detach())


def test_compiled_layer_with_reset_and_lengths():
    rnn = PlasticRNN(3, 5, clip=1.0)
    x = torch.randn(6, 2, 3)
    reset = torch.zeros(6, 2, dtype=torch.bool)
    reset[2, 1] = True
    lengths = torch.tensor([6, 4])
    out, s = rnn(x, reset=reset, lengths=lengths)
    torch._dynamo.reset()
    c_out, c_s = torch.compile(rnn, backend="aot_eager", fullgraph=True)(x, reset=reset, lengths=lengths)
    torch.testing.assert_close(c_out, out)
    torch.testing.assert_close(c_s.trace, s.trace)
    torch.testing.assert_close(c_s.y, s.y)
    torch._dynamo.reset()


@pytest.mark.parametrize("bad,match", [
    (dict(reset=torch.zeros(6, 2)), "reset"),                        # not bool
    (dict(reset=torch.zeros(5, 2, dtype=torch.bool)), "reset"),      # wrong shape
    (dict(lengths=torch.tensor([0, 3])), "lengths"),
    (dict(lengths=torch.tensor([7, 3])), "lengths"),
    (dict(lengths=torch.tensor([2.0, 3.0])), "lengths"),
    (dict(lengths=torch.tensor([3])), "lengths"),
])
def test_layer_episode_arguments_are_checked(bad, match):
    rnn = PlasticRNN(3, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        rnn(torch.randn(6, 2, 3), **bad)
