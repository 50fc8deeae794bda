"""What PlasticLinear and PlasticRNN share: parameters, initialization, eta's range, choice of implementation."""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import ops, reference
from .._validation import ACTIVATIONS, RULES, TRACE_DTYPES, check_checkpoint_every, check_clip, to_float

ALPHA_SHAPES = ("synapse", "input", "output", "scalar")
IMPLS = ("fused", "reference")
#: How the learned eta is kept in range (docs/recipes.md): None learns it raw, as Miconi et al. (2018, 2019);
#: "clamp" uses eta.clamp(0, 1) in the op; "sigmoid" stores a logit and uses sigmoid(eta_logit), in (0, 1).
ETA_CONSTRAINTS = (None, "clamp", "sigmoid")
#: Backpropamine's neuromodulation (Miconi et al., 2019; docs/op_spec.md, "Neuromodulation"): "simple" gates
#: each step's update by a modulation the layer computes from its own output; "retroactive" adds an
#: eligibility trace that the modulation writes into the plastic trace.
NEUROMODULATIONS = (None, "simple", "retroactive")


def _init_std(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _initial_eta(eta, constraint) -> float:
    """The initial plasticity rate: a number or a one-element tensor, finite, >= 0 (and < 1 for "sigmoid")."""
    if isinstance(eta, torch.Tensor):
        if eta.numel() != 1 or eta.is_complex():
            raise ValueError(f"eta must be a real number or a one-element tensor, got a {eta.dtype} tensor of shape "
                             f"{tuple(eta.shape)}")
        eta = eta.detach().reshape(()).cpu().item()
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f"eta must be a number or a one-element tensor, got {type(eta).__name__}")
    eta = to_float("eta", eta)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0 (a negative rate makes the Hebbian trace grow without "
                         f"bound), got {eta}")
    if constraint == "sigmoid" and not 0 < eta < 1:
        raise ValueError(f"eta must lie in (0, 1) with eta_constraint='sigmoid', got {eta}")
    return eta


class _PlasticBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, alpha: str, rule: str, activation: str,
                 clip, eta, learn_eta: bool, eta_constraint, bias: bool, batch_first: bool, init_std: float,
                 alpha_init_std, impl: str, checkpoint_every, trace_dtype=None, device=None, dtype=None,
                 neuromodulation=None, eligibility_eta=0.1):
        super().__init__()
        if neuromodulation not in NEUROMODULATIONS:
            raise ValueError(f"neuromodulation must be one of {NEUROMODULATIONS}, got {neuromodulation!r}")
        if neuromodulation == "retroactive" and rule == "oja":
            raise ValueError("neuromodulation='retroactive' needs rule='hebb' or 'add': Oja's rule has no "
                             "eligibility-trace form")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
                raise ValueError(f"{name} must be a positive integer below 2**31, got {value!r}")
        if alpha not in ALPHA_SHAPES:
            raise ValueError(f"alpha must be one of {ALPHA_SHAPES}, got {alpha!r}")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if eta_constraint not in ETA_CONSTRAINTS:
            raise ValueError(f"eta_constraint must be one of {ETA_CONSTRAINTS}, got {eta_constraint!r}")
        clip = check_clip(clip)
        checkpoint_every = check_checkpoint_every(checkpoint_every)
        init_std = _init_std("init_std", init_std)
        alpha_init_std = init_std if alpha_init_std is None else _init_std("alpha_init_std", alpha_init_std)
        eta = _initial_eta(eta, eta_constraint)
        # checked against the parameters' dtype at each call: .to(dtype) may change it after this
        if trace_dtype is not None and trace_dtype not in {d for ds in TRACE_DTYPES.values() for d in ds}:
            raise TypeError(f"trace_dtype must be None, torch.float32, torch.bfloat16 or torch.float64, "
                            f"got {trace_dtype!r}")
        self.trace_dtype = trace_dtype
        self.impl = impl  # validated by the property setter
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.alpha_shape, self.rule, self.activation = alpha, rule, activation
        self.clip, self.batch_first = clip, batch_first
        self.init_std, self.alpha_init_std, self.eta_constraint = init_std, alpha_init_std, eta_constraint
        self.checkpoint_every = checkpoint_every
        self.weight = nn.Parameter(torch.empty(in_features, out_features, **factory))
        a_shape = {"synapse": (in_features, out_features), "input": (in_features, 1),
                   "output": (1, out_features), "scalar": ()}[alpha]
        self.alpha = nn.Parameter(torch.empty(a_shape, **factory))
        raw = math.log(eta / (1 - eta)) if eta_constraint == "sigmoid" else eta
        eta_t = torch.tensor(raw, **factory)
        name = "eta_logit" if eta_constraint == "sigmoid" else "eta"
        if learn_eta:
            self.register_parameter(name, nn.Parameter(eta_t))
        else:
            self.register_buffer(name, eta_t)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.neuromodulation = neuromodulation
        if neuromodulation is not None:
            # Backpropamine's h2mod (Linear(N_out, 1)) and modfanout (Linear(1, N_out)), as named parameters
            self.mod_weight = nn.Parameter(torch.empty(out_features, **factory))
            self.mod_bias = nn.Parameter(torch.empty((), **factory))
            self.mod_fanout_weight = nn.Parameter(torch.empty(out_features, **factory))
            self.mod_fanout_bias = nn.Parameter(torch.empty(out_features, **factory))
        if neuromodulation == "retroactive":
            q = to_float("eligibility_eta", eligibility_eta) if isinstance(eligibility_eta, numbers.Real) else None
            if q is None or isinstance(eligibility_eta, bool) or not 0 <= q <= 1:
                raise ValueError(f"eligibility_eta must be a number in [0, 1], got {eligibility_eta!r}")
            self.eligibility_eta = nn.Parameter(torch.tensor(q, **factory))
        self.reset_parameters()

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {value!r}")
        self._impl = value

    def reset_parameters(self) -> None:
        """weight from init_std * N(0, 1) and alpha from alpha_init_std * N(0, 1) (both 0.01 by default, as in
        Miconi et al. 2018), bias zero. Override it, or set the parameters in place, for another scheme."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std)
            self.alpha.normal_(0.0, self.alpha_init_std)
            if self.bias is not None:
                self.bias.zero_()
            if getattr(self, "neuromodulation", None) is not None:
                # nn.Linear's defaults for Linear(N_out, 1) and Linear(1, N_out), as in Backpropamine's code
                bound = 1.0 / math.sqrt(self.out_features)
                self.mod_weight.uniform_(-bound, bound)
                self.mod_bias.uniform_(-bound, bound)
                self.mod_fanout_weight.uniform_(-1.0, 1.0)
                self.mod_fanout_bias.uniform_(-1.0, 1.0)

    def plasticity_rate(self) -> torch.Tensor:
        """The eta the op receives: the learned value, in range when eta_constraint asks for it."""
        if self.eta_constraint == "sigmoid":
            return torch.sigmoid(self.eta_logit)
        if self.eta_constraint == "clamp":
            return self.eta.clamp(0.0, 1.0)
        return self.eta

    def _backend(self):
        return ops if self.impl == "fused" else reference

    def _time_major(self, t):
        return t.transpose(0, 1) if (t is not None and self.batch_first) else t

    def _kwargs(self, modulation, reset, lengths, return_traces, eligibility=None):
        kw = dict(rule=self.rule, activation=self.activation, clip=self.clip,
                  modulation=self._time_major(modulation), checkpoint_every=self.checkpoint_every,
                  trace_dtype=self.trace_dtype)
        # item by item: dynamo on torch 2.4 cannot trace dict.update with keywords
        if self.neuromodulation is not None:
            for name in ("mod_weight", "mod_bias", "mod_fanout_weight", "mod_fanout_bias"):
                kw[name] = getattr(self, name)
        if self.neuromodulation == "retroactive":
            kw["eligibility"] = eligibility
            kw["eligibility_eta"] = self.eligibility_eta
        elif eligibility is not None:
            raise ValueError("the state carries an eligibility trace but this layer has none "
                             "(neuromodulation='retroactive' keeps one)")
        # passed only when used: the plain call is the op's plain call
        if reset is not None:
            kw["reset"] = self._time_major(reset)
        if lengths is not None:
            kw["lengths"] = lengths
        if return_traces:
            kw["return_traces"] = True
        return kw

    def _unpack(self, input, lengths):
        """A PackedSequence becomes (padded input, lengths); anything else passes through."""
        if not isinstance(input, PackedSequence):
            return input, lengths, False
        if lengths is not None:
            raise ValueError("lengths must be None when input is a PackedSequence (it carries its own lengths)")
        padded, lengths = pad_packed_sequence(input, batch_first=self.batch_first)
        return padded, lengths, True

    def _outputs(self, y, state, traces, packed, lengths, return_traces):
        y = self._time_major(y)
        if packed:
            y = pack_padded_sequence(y, lengths, batch_first=self.batch_first, enforce_sorted=False)
        if return_traces:
            return y, state, (traces.transpose(0, 1) if self.batch_first else traces)
        return y, state

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, alpha={self.alpha_shape}, rule={self.rule}, "
                f"activation={self.activation}, clip={self.clip}, bias={self.bias is not None}, "
                f"batch_first={self.batch_first}, impl={self.impl}"
                + (f", eta_constraint={self.eta_constraint!r}" if self.eta_constraint is not None else "")
                + (f", trace_dtype={self.trace_dtype}" if self.trace_dtype is not None else "")
                + (f", neuromodulation={self.neuromodulation!r}" if self.neuromodulation is not None else ""))
