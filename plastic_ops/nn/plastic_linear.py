from __future__ import annotations

import torch

from ._plastic_base import _PlasticBase
from .state import PlasticLinearState, RetroactivePlasticLinearState, _as_state


class PlasticLinear(_PlasticBase):
    """A feedforward layer with Hebbian plastic weights, drop-in for a sequence of nn.Linear steps.

    y_t = act(x_t @ (weight + alpha * H_t) + bias + drive_t), with the trace H carried across the T steps of
    each of the B episodes (see docs/op_spec.md).

    Args:
        in_features, out_features: sizes N_in and N_out.
        alpha: granularity of the plasticity coefficient: "synapse" (N_in, N_out), "input" (N_in, 1),
            "output" (1, N_out) or "scalar".
        rule: "hebb", "oja" or "add" (no decay; Backpropamine's). activation: "tanh", "sigmoid", "relu", "identity" or "softmax".
        clip: None or a positive bound on |H|.
        eta: initial plasticity rate, finite and >= 0; learn_eta: learn it (a Parameter) or keep it fixed (a
            buffer). eta_constraint: None (learned raw, as in the papers), "clamp" (the op gets
            eta.clamp(0, 1)) or "sigmoid" (a parameter eta_logit; the op gets its sigmoid, always in (0, 1)).
        bias: add a learned bias; True by default, as nn.Linear.
        batch_first: inputs and outputs are (B, T, .) instead of (T, B, .).
        init_std: weight from init_std * N(0, 1); alpha_init_std (default: init_std) for alpha. 0.01 as in
            Miconi et al. (2018). Override reset_parameters for another scheme.
        impl: "fused" (the compiled op) or "reference" (pure PyTorch); may be changed at any time.
        checkpoint_every: passed to the op (trace checkpoint interval of the backward).
        trace_dtype: the trace's storage dtype, passed to the op: None (float32; float64 for float64
            parameters) or torch.bfloat16 (half the trace's memory traffic; docs/op_spec.md, "Dtypes").
        dtype: the parameters' dtype: float32 (default), float64, bfloat16 or float16 (also after
            .to(dtype)); 16-bit layers compute in float32 and return y in their dtype.
        neuromodulation, eligibility_eta: as PlasticRNN (the modulation is computed from the layer's output y_t;
            the eligibility trace is carried in the state).

    forward(input, state=None, modulation=None, *, drive=None, reset=None, lengths=None, return_traces=False)
        -> (output, state) [, traces]
        input: (T, B, N_in) ((B, T, N_in) with batch_first), or a PackedSequence (then output is one too).
        state: None (a zero trace: a new episode for every row) or the PlasticLinearState a previous call
            returned (field trace, (B, N_in, N_out); with neuromodulation="retroactive" a
            RetroactivePlasticLinearState, which adds eligibility); a bare trace tensor is accepted too.
        drive: (T, B, N_out) added to the pre-activation at each step (e.g. a label written into the output
            during the shots of a few-shot episode; docs/recipes.md).
        reset, lengths, modulation, return_traces: as PlasticRNN (a reset zeroes the trace only: the input of
            the step is still read).
    """

    def __init__(self, in_features: int, out_features: int, *, alpha: str = "synapse", rule: str = "hebb",
                 activation: str = "tanh", clip=None, eta=0.01, learn_eta: bool = True, eta_constraint=None,
                 bias: bool = True, batch_first: bool = False, init_std: float = 0.01, alpha_init_std=None,
                 impl: str = "fused", checkpoint_every=None, trace_dtype=None, device=None, dtype=None,
                 neuromodulation=None, eligibility_eta=0.1):
        super().__init__(in_features, out_features, alpha=alpha, rule=rule, activation=activation, clip=clip,
                         eta=eta, learn_eta=learn_eta, eta_constraint=eta_constraint, bias=bias,
                         batch_first=batch_first, init_std=init_std, alpha_init_std=alpha_init_std, impl=impl,
                         checkpoint_every=checkpoint_every, trace_dtype=trace_dtype, device=device, dtype=dtype,
                         neuromodulation=neuromodulation, eligibility_eta=eligibility_eta)

    def forward(self, input, state=None, modulation=None, *, drive=None, reset=None, lengths=None,
                return_traces: bool = False):
        x, lengths, packed = self._unpack(input, lengths)
        retroactive = self.neuromodulation == "retroactive"
        trace, eligibility = state, None
        if not (state is None or isinstance(state, torch.Tensor)):
            state = _as_state(RetroactivePlasticLinearState if retroactive else PlasticLinearState, state)
            trace = state.trace
            eligibility = state.eligibility if retroactive else None  # the field (see PlasticRNN)
        kw = self._kwargs(modulation, reset, lengths, return_traces, eligibility)
        if drive is not None:
            kw["drive"] = self._time_major(drive)
        out = self._backend().plastic_linear(self._time_major(x), self.weight, self.alpha, self.plasticity_rate(),
                                             trace, self.bias, **kw)
        state = RetroactivePlasticLinearState(out[1], out[2]) if retroactive else PlasticLinearState(out[1])
        return self._outputs(out[0], state, out[-1] if return_traces else None, packed, lengths, return_traces)
