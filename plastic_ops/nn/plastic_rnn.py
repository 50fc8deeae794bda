from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ._plastic_base import _PlasticBase
from .state import PlasticRNNState, RetroactivePlasticRNNState, _as_state


class PlasticRNN(_PlasticBase):
    """A recurrent layer with Hebbian plastic recurrent weights (Miconi et al., 2018), used like nn.RNN.

    u_t = x_t @ weight_ih^T (an input projection, when input_size and hidden_size are both given),
    y_t = act(y_{t-1} @ (weight + alpha * H_t) + u_t + bias), the trace H updated from (y_{t-1}, y_t)
    (docs/op_spec.md). ``PlasticRNN(size)`` has no projection: the input is the drive u itself.

    Args:
        input_size, hidden_size: as nn.RNN. ``PlasticRNN(N)`` (hidden_size None) takes (T, B, N) drives.
        alpha, rule, activation, clip, learn_eta, batch_first, impl, checkpoint_every, trace_dtype, device,
            dtype: as PlasticLinear.
        eta: initial plasticity rate, finite and >= 0. eta_constraint: None (learned raw, as in the papers),
            "clamp" (the op gets eta.clamp(0, 1)) or "sigmoid" (a parameter eta_logit, the op gets its sigmoid).
        bias: a learned bias added to the pre-activation, True by default as in nn.RNN (pass bias=False for
            Miconi's pattern-memorization network, which has none).
        init_std: weight from init_std * N(0, 1); alpha_init_std (default: init_std) for alpha. 0.01 as in
            Miconi et al. (2018); Backpropamine (Miconi et al., 2019) uses other scales: set both, or override
            reset_parameters. weight_ih is initialized as nn.Linear's weight.
        neuromodulation: None, "simple" or "retroactive" (Backpropamine; docs/op_spec.md, "Neuromodulation").
            The layer then computes its own modulation at each step, M_t = mod_fanout_weight *
            tanh(y_t . mod_weight + mod_bias) + mod_fanout_bias, which multiplies eta in that step's update
            (parameters mod_weight, mod_bias, mod_fanout_weight, mod_fanout_bias, initialized as the
            nn.Linear(N, 1) and nn.Linear(1, N) of Backpropamine's code). "retroactive" also keeps an
            eligibility trace E (in the state) with the learned rate eligibility_eta (initial value
            `eligibility_eta`, 0.1 as in Backpropamine's code): the modulation writes E into the trace.
            Backpropamine's own settings are rule="add", eta=1 with learn_eta=False, and clip=2 ("simple") or
            clip=1 ("retroactive"); they are not forced (docs/recipes.md).

    forward(input, state=None, *, reset=None, lengths=None, modulation=None, return_traces=False)
        -> (output, state) [, traces]
        input: (T, B, input_size) ((B, T, .) with batch_first), or a PackedSequence (then output is one too).
        state: None (zeros: a new episode for every row) or the PlasticRNNState a previous call returned:
            y (B, N) the last output of each row and trace (B, N, N); with neuromodulation="retroactive" a
            RetroactivePlasticRNNState, which adds eligibility (B, N, N). state.detach() for truncated BPTT,
            state.batch(index) to pick rows.
        reset: (T, B) bool ((B, T) with batch_first): reset[t, b] starts a new episode for row b at step t
            (its trace and recurrent output become zeros before the step; no gradient crosses the boundary).
        lengths: (B,) integers in [1, T]: row b stops after lengths[b] steps; its outputs past that are zeros
            and the state returned is the one after its own last step.
        modulation: (T, B, 1) or (T, B, N), multiplies eta at each step.
        return_traces: also return the trace after every step, (T, B, N, N) ((B, T, N, N) with batch_first):
            T * B * N * N elements of the trace dtype; not differentiable (for looking inside).
    The former call forms keep working: forward(u, trace, y0) with a bare trace tensor and the recurrent
    output y0, and modulation as the fourth positional argument.
    """

    def __init__(self, input_size: int, hidden_size: int | None = None, *, alpha: str = "synapse",
                 rule: str = "hebb", activation: str = "tanh", clip=None, eta=0.01, learn_eta: bool = True,
                 eta_constraint=None, bias: bool = True, batch_first: bool = False, init_std: float = 0.01,
                 alpha_init_std=None, impl: str = "fused", checkpoint_every=None, trace_dtype=None, device=None,
                 dtype=None, neuromodulation=None, eligibility_eta=0.1):
        size = input_size if hidden_size is None else hidden_size
        super().__init__(size, size, alpha=alpha, rule=rule, activation=activation, clip=clip, eta=eta,
                         learn_eta=learn_eta, eta_constraint=eta_constraint, bias=bias, batch_first=batch_first,
                         init_std=init_std, alpha_init_std=alpha_init_std, impl=impl,
                         checkpoint_every=checkpoint_every, trace_dtype=trace_dtype, device=device, dtype=dtype,
                         neuromodulation=neuromodulation, eligibility_eta=eligibility_eta)
        self.size = self.hidden_size = size
        self.input_size = input_size
        if hidden_size is not None:
            if isinstance(input_size, bool) or not isinstance(input_size, int) or not 1 <= input_size < 2**31:
                raise ValueError(f"input_size must be a positive integer below 2**31, got {input_size!r}")
            self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size, device=device, dtype=dtype))
            self._reset_input_weight()
        else:
            self.register_parameter("weight_ih", None)

    def _reset_input_weight(self):
        with torch.no_grad():  # nn.Linear's default
            bound = 1.0 / math.sqrt(self.input_size)
            self.weight_ih.uniform_(-bound, bound)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "weight_ih", None) is not None:
            self._reset_input_weight()

    def forward(self, input, state=None, y0=None, modulation=None, *, reset=None, lengths=None,
                return_traces: bool = False):
        x, lengths, packed = self._unpack(input, lengths)
        trace, y0, eligibility = self._initial_state(state, y0)
        u = self._time_major(x)
        if self.weight_ih is not None:
            if not isinstance(u, torch.Tensor) or u.dim() != 3 or u.shape[-1] != self.input_size:
                raise ValueError(f"input must be (T, B, input_size = {self.input_size})"
                                 + (" ((B, T, input_size) with batch_first)" if self.batch_first else "")
                                 + f", got {tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
            u = torch.nn.functional.linear(u, self.weight_ih)
        out = self._backend().plastic_rnn(u, self.weight, self.alpha, self.plasticity_rate(), trace, y0, self.bias,
                                          **self._kwargs(modulation, reset, lengths, return_traces, eligibility))
        y, trace_T = out[0], out[1]
        last = _last_output(y, lengths)
        state = (RetroactivePlasticRNNState(last, trace_T, out[2]) if self.neuromodulation == "retroactive"
                 else PlasticRNNState(last, trace_T))
        return self._outputs(y, state, out[-1] if return_traces else None, packed, lengths, return_traces)

    def _initial_state(self, state, y0):
        if isinstance(state, torch.Tensor) or state is None:
            return state, y0, None  # a bare trace (the former call form) or nothing
        retroactive = self.neuromodulation == "retroactive"
        state = _as_state(RetroactivePlasticRNNState if retroactive else PlasticRNNState, state)
        # the field, not the plain state's property (which dynamo on torch 2.4 cannot trace)
        eligibility = state.eligibility if retroactive else None
        if y0 is not None:  # the former form forward(u, trace, y0) with the state in place of the trace
            warnings.warn("y0 given with a state: y0 replaces state.y. Pass the state alone (it carries the "
                          "recurrent output); y0 will be removed.", FutureWarning, stacklevel=3)
            return state.trace, y0, eligibility
        return state.trace, state.y, eligibility


def _last_output(y, lengths):
    """Each row's output at its own last step: y[-1], or y[lengths[b] - 1, b]."""
    if lengths is None:
        return y[-1]
    index = (torch.as_tensor(lengths).to(y.device, torch.long) - 1).clamp(0, y.shape[0] - 1)
    return y[index, torch.arange(y.shape[1], device=y.device)]
