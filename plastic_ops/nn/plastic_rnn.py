from __future__ import annotations

from ._plastic_base import _PlasticBase


class PlasticRNN(_PlasticBase):
    """A recurrent layer of `size` units with Hebbian plastic recurrent weights (Miconi et al., 2018).

    y_t = act(y_{t-1} @ (weight + alpha * H_t) + u_t + bias), the trace updated from (y_{t-1}, y_t).
    With the defaults (tanh, hebb, per-synapse alpha, learned eta) this is Miconi's
    pattern-memorization network. Keyword arguments are those of PlasticLinear.

    forward(u, trace=None, y0=None, modulation=None) -> (y, trace_T), u and y of shape (T, B, N)
    ((B, T, N) with batch_first). To continue an episode pass y[-1] (y[:, -1] with batch_first)
    as y0 and trace_T as trace. A T=1 call is one step of a cell.
    """

    def __init__(self, size: int, *, alpha: str = "synapse", rule: str = "hebb", activation: str = "tanh",
                 clip=None, eta: float = 0.01, learn_eta: bool = True, bias: bool = False,
                 batch_first: bool = False, init_std: float = 0.01, impl: str = "fused", checkpoint_every=None,
                 trace_dtype=None, device=None, dtype=None):
        super().__init__(size, size, alpha=alpha, rule=rule, activation=activation, clip=clip, eta=eta,
                         learn_eta=learn_eta, bias=bias, batch_first=batch_first, init_std=init_std, impl=impl,
                         checkpoint_every=checkpoint_every, trace_dtype=trace_dtype, device=device, dtype=dtype)
        self.size = size

    def forward(self, u, trace=None, y0=None, modulation=None):
        y, trace = self._backend().plastic_rnn(self._time_major(u), self.weight, self.alpha, self.eta, trace, y0,
                                               self.bias, **self._kwargs(modulation))
        return self._time_major(y), trace
