"""The state a plastic layer returns and takes back: one object, as (h, c) is for nn.LSTM.

Each field is a tensor whose first dimension is the batch (B), or None. ``out, state = layer(x, state)``
continues the same episodes; ``state.detach()`` cuts the graph for truncated BPTT;
``state.batch(index)`` picks episodes (an int, a slice, a bool mask or an index tensor);
``state.reset(mask)`` starts some episodes afresh. The state is a named tuple, so it unpacks, pickles and
goes through torch.save like one.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch

_FORWARDED = "the plastic layers now return a state object ({cls}); use state.trace for the Hebbian trace. " \
             "Tensor attributes on the state ({name}) are forwarded to state.trace for now; this will be removed."


# The methods both states share, written once and assigned in each class body: a state must stay a plain
# named tuple (tuple its first base), the form torch.compile's dynamo (torch 2.4 included) can build.

def _detach(self):
    """The same state without a graph: the episodes go on, the gradient stops here (truncated BPTT)."""
    return self._map(lambda t: t.detach())


def _batch(self, index):
    """The episodes `index` selects, as nn.RNN users index h[:, index]: an int keeps the batch dimension."""
    if isinstance(index, int):
        index = slice(index, index + 1) if index != -1 else slice(-1, None)
    return self._map(lambda t: t[index])


def _reset(self, mask):
    """Episodes where the (B,) bool `mask` is True start afresh: their fields become zeros, the rest is kept."""
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError(f"mask must be a 1-D bool tensor (B,), got {mask.dtype} of shape {tuple(mask.shape)}")

    def zero(t):
        if mask.shape[0] != t.shape[0]:
            raise ValueError(f"mask has {mask.shape[0]} episodes but the state has B = {t.shape[0]}")
        gone = mask.to(t.device).reshape((-1,) + (1,) * (t.dim() - 1))
        return torch.where(gone, torch.zeros((), dtype=t.dtype, device=t.device), t)  # NaN rows too
    return self._map(zero)


def _to(self, *args, **kwargs):
    """Every field through Tensor.to (device, dtype)."""
    return self._map(lambda t: t.to(*args, **kwargs))


def _map_fields(self, fn):
    return type(self)(*(None if t is None else fn(t) for t in self))


def _forward_to_trace(self, name):
    # Before the state object, the layers returned the trace itself: keep such code running, with a warning.
    if not name.startswith("_") and hasattr(torch.Tensor, name):
        warnings.warn(_FORWARDED.format(cls=type(self).__name__, name=name), FutureWarning, stacklevel=2)
        return getattr(self.trace, name)
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _no_eligibility(self):
    """None: only the layers with neuromodulation="retroactive" keep an eligibility trace (their states have
    it as a field), so that code reading state.eligibility works with every layer."""
    return None


class PlasticRNNState(NamedTuple):
    """State of a PlasticRNN: y (B, N) the last output of each episode (its recurrent input at the next step),
    trace (B, N, N) its Hebbian trace."""

    y: torch.Tensor
    trace: torch.Tensor

    detach, batch, reset, to, _map, __getattr__ = _detach, _batch, _reset, _to, _map_fields, _forward_to_trace
    eligibility = property(_no_eligibility)


class PlasticLinearState(NamedTuple):
    """State of a PlasticLinear: trace (B, N_in, N_out), the Hebbian trace of each episode."""

    trace: torch.Tensor

    detach, batch, reset, to, _map, __getattr__ = _detach, _batch, _reset, _to, _map_fields, _forward_to_trace
    eligibility = property(_no_eligibility)


# The states of the layers with neuromodulation="retroactive": the eligibility trace of each episode as a
# field beside the trace (docs/op_spec.md, "Neuromodulation"). Separate classes, so that the states above keep
# unpacking as they always did (y, trace = state).

class RetroactivePlasticRNNState(NamedTuple):
    """State of a PlasticRNN with neuromodulation="retroactive": y (B, N), trace (B, N, N) and eligibility
    (B, N, N), the eligibility trace of each episode (None: zeros)."""

    y: torch.Tensor
    trace: torch.Tensor
    eligibility: Optional[torch.Tensor]

    detach, batch, reset, to, _map, __getattr__ = _detach, _batch, _reset, _to, _map_fields, _forward_to_trace


class RetroactivePlasticLinearState(NamedTuple):
    """State of a PlasticLinear with neuromodulation="retroactive": trace (B, N_in, N_out) and eligibility
    (B, N_in, N_out), the eligibility trace of each episode (None: zeros)."""

    trace: torch.Tensor
    eligibility: Optional[torch.Tensor]

    detach, batch, reset, to, _map, __getattr__ = _detach, _batch, _reset, _to, _map_fields, _forward_to_trace


#: the plain state class of each retroactive one: a plain state (no eligibility yet) is accepted by a
#: retroactive layer, its eligibility trace starting from zeros
_PLAIN = {RetroactivePlasticRNNState: PlasticRNNState, RetroactivePlasticLinearState: PlasticLinearState}


def _as_state(cls, state, name: str = "state") -> Optional[tuple]:
    """None, the layer's state, or (compatibility) a bare trace tensor."""
    if state is None or isinstance(state, cls):
        return state
    if isinstance(state, torch.Tensor):
        return None  # handled by the caller as a bare trace
    if cls in _PLAIN and isinstance(state, _PLAIN[cls]):
        return cls(*state, None)
    if "eligibility" in getattr(type(state), "_fields", ()) and cls not in _PLAIN:
        raise ValueError(f"{name} carries an eligibility trace ({type(state).__name__}) but this layer keeps none: "
                         "only layers with neuromodulation='retroactive' do")
    if isinstance(state, tuple) and len(state) == len(cls._fields):
        return cls(*state)
    raise TypeError(f"{name} must be None, a {cls.__name__} (as the layer returned it) or a trace tensor, "
                    f"got {type(state).__name__}")
