"""Bad input raises a clear Python exception that names the argument, in the fused op and the reference."""
import pytest
import torch

import plastic_ops
from plastic_ops import reference

T, B, NI, NO = 3, 2, 4, 5


def lin_args(**over):
    a = dict(x=torch.randn(T, B, NI), w=torch.randn(NI, NO), alpha=torch.randn(NI, NO), eta=torch.tensor(0.1),
             trace=None, bias=None)
    a.update(over)
    return a


def rnn_args(**over):
    a = dict(u=torch.randn(T, B, NO), w=torch.randn(NO, NO), alpha=torch.randn(NO, NO), eta=torch.tensor(0.1),
             trace=None, y0=None, bias=None)
    a.update(over)
    return a


LINEAR_CASES = [
    (dict(x=torch.randn(B, NI)), {}, ValueError, r"x must be 3-D"),
    (dict(x=torch.randn(0, B, NI)), {}, ValueError, r"T = 0"),
    (dict(x=torch.randn(T, B, NI + 1)), {}, ValueError, r"x has N_in = 5.*w has 4 rows"),
    (dict(w=torch.randn(NI)), {}, ValueError, r"w must be 2-D"),
    (dict(alpha=torch.randn(NI)), {}, ValueError, r"alpha must be"),
    (dict(alpha=torch.randn(NO, NI)), {}, ValueError, r"alpha must be"),
    (dict(eta=torch.tensor([0.1, 0.2])), {}, ValueError, r"eta must be a 0-dim"),
    (dict(eta=torch.tensor([0.1])), {}, ValueError, r"eta must be a 0-dim"),
    (dict(trace=torch.zeros(B + 1, NI, NO)), {}, ValueError, r"trace has batch size 3 but the input has B = 2"),
    (dict(trace=torch.zeros(B, NO, NI)), {}, ValueError, r"trace must have shape"),
    (dict(trace=torch.zeros(NI, NO)), {}, ValueError, r"trace must be 3-D"),
    (dict(bias=torch.zeros(NO + 1)), {}, ValueError, r"bias must have shape"),
    (dict(bias=torch.zeros(1)), {}, ValueError, r"bias must have shape"),
    (dict(), dict(rule="stdp"), ValueError, r"rule must be one of"),
    (dict(), dict(activation="gelu"), ValueError, r"activation must be one of"),
    (dict(), dict(clip=-1.0), ValueError, r"clip must be a positive"),
    (dict(), dict(clip=0.0), ValueError, r"clip must be a positive"),
    (dict(), dict(clip="1"), TypeError, r"clip must be None or a positive number"),
    (dict(), dict(checkpoint_every=0), ValueError, r"checkpoint_every"),
    (dict(), dict(modulation=torch.ones(T, B, 2)), ValueError, r"modulation must have shape"),
    (dict(), dict(modulation=torch.ones(T, 1, 1)), ValueError, r"modulation must have shape"),
    (dict(w=torch.randn(NI, NO, dtype=torch.float64)), {}, TypeError, r"w has dtype torch.float64"),
    (dict(x=torch.ones(T, B, NI, dtype=torch.int32), w=torch.ones(NI, NO, dtype=torch.int32)), {}, TypeError,
     r"x must be float32, float64, bfloat16 or float16"),
    (dict(x=[[1.0]]), {}, TypeError, r"x must be a torch.Tensor"),
    (dict(w=torch.randn(NI, NO, device="meta")), {}, ValueError, r"w is on meta"),
]


@pytest.mark.parametrize("impl", [plastic_ops, reference], ids=["fused", "reference"])
@pytest.mark.parametrize("over,kw,exc,pattern", LINEAR_CASES)
def test_linear_bad_input(impl, over, kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        impl.plastic_linear(**lin_args(**over), **kw)


RNN_CASES = [
    (dict(w=torch.randn(NO, NO + 1)), ValueError, r"w must be square"),
    (dict(u=torch.randn(T, B, NO + 1)), ValueError, r"u has 6 features"),
    (dict(y0=torch.zeros(B + 1, NO)), ValueError, r"y0 must have shape"),
    (dict(y0=torch.zeros(NO)), ValueError, r"y0 must have shape"),
    (dict(u=torch.randn(0, B, NO)), ValueError, r"T = 0"),
    (dict(trace=torch.zeros(B + 2, NO, NO)), ValueError, r"trace has batch size"),
]


@pytest.mark.parametrize("impl", [plastic_ops, reference], ids=["fused", "reference"])
@pytest.mark.parametrize("over,exc,pattern", RNN_CASES)
def test_rnn_bad_input(impl, over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        impl.plastic_rnn(**rnn_args(**over))


def test_python_number_eta_is_accepted():
    args = lin_args()
    y1, _ = plastic_ops.plastic_linear(**dict(args, eta=0.1))
    y2, _ = plastic_ops.plastic_linear(**dict(args, eta=torch.tensor(0.1)))
    torch.testing.assert_close(y1, y2)


def test_direct_op_call_with_bad_shapes_raises_not_crashes():
    # Users calling the registered op directly get a RuntimeError from the C++ checks.
    x = torch.randn(T, B, NI)
    with pytest.raises(RuntimeError, match="alpha must be expanded"):
        torch.ops.plastic_ops.plastic_linear_forward(x, torch.zeros(T, B, NO), torch.randn(NI, NO),
                                                     torch.randn(NI, 1), torch.zeros(T, B, NO),
                                                     torch.zeros(B, NI, NO), "hebb", "tanh", None, 1)
    with pytest.raises(RuntimeError, match="unknown rule"):
        torch.ops.plastic_ops.plastic_linear_forward(x, torch.zeros(T, B, NO), torch.randn(NI, NO),
                                                     torch.randn(NI, NO), torch.zeros(T, B, NO),
                                                     torch.zeros(B, NI, NO), "stdp", "tanh", None, 1)
