from __future__ import annotations

from ._plastic_base import _PlasticBase


class PlasticLinear(_PlasticBase):
    """A feedforward layer with Hebbian plastic weights, drop-in for a sequence of nn.Linear steps.

    y_t = act(x_t @ (weight + alpha * H_t) + bias), with the trace H carried across the T steps of
    each of the B episodes (see docs/op_spec.md).

    Args:
        in_features, out_features: sizes N_in and N_out.
        alpha: granularity of the plasticity coefficient: "synapse" (N_in, N_out), "input" (N_in, 1),
            "output" (1, N_out) or "scalar".
        rule: "hebb" or "oja". activation: "tanh", "sigmoid", "relu", "identity" or "softmax".
        clip: None or a positive bound on |H|.
        eta: initial plasticity rate; learn_eta: learn it (a Parameter) or keep it fixed (a buffer).
        bias: add a learned bias. batch_first: inputs and outputs are (B, T, .) instead of (T, B, .).
        init_std: weight and alpha are drawn from init_std * N(0, 1); 0.01 as in Miconi et al. (2018).
        impl: "fused" (the compiled op) or "reference" (pure PyTorch); may be changed at any time.
        checkpoint_every: passed to the op (trace checkpoint interval of the backward).
        trace_dtype: the trace's storage dtype, passed to the op: None (float32; float64 for float64
            parameters) or torch.bfloat16 (half the trace's memory traffic; docs/op_spec.md, "Dtypes").
        dtype: the parameters' dtype: float32 (default), float64, bfloat16 or float16 (also after
            .to(dtype)); 16-bit layers compute in float32 and return y in their dtype.

    forward(x, trace=None, modulation=None) -> (y, trace_T). trace is (B, N_in, N_out), zeros when None.
    Reset it (pass None) or detach it between episodes as your task needs. A T=1 call is one step.
    """

    def __init__(self, in_features: int, out_features: int, *, alpha: str = "synapse", rule: str = "hebb",
                 activation: str = "tanh", clip=None, eta: float = 0.01, learn_eta: bool = True, bias: bool = True,
                 batch_first: bool = False, init_std: float = 0.01, impl: str = "fused", checkpoint_every=None,
                 trace_dtype=None, device=None, dtype=None):
        super().__init__(in_features, out_features, alpha=alpha, rule=rule, activation=activation, clip=clip,
                         eta=eta, learn_eta=learn_eta, bias=bias, batch_first=batch_first, init_std=init_std,
                         impl=impl, checkpoint_every=checkpoint_every, trace_dtype=trace_dtype, device=device,
                         dtype=dtype)

    def forward(self, x, trace=None, modulation=None):
        y, trace = self._backend().plastic_linear(self._time_major(x), self.weight, self.alpha, self.eta, trace,
                                                  self.bias, **self._kwargs(modulation))
        return self._time_major(y), trace
