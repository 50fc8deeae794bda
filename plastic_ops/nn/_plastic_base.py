"""What PlasticLinear and PlasticRNN share: parameters, initialization, choice of implementation."""
from __future__ import annotations


import torch
from torch import nn

from .. import ops, reference
from .._validation import ACTIVATIONS, RULES, TRACE_DTYPES, check_checkpoint_every, check_clip, to_float

ALPHA_SHAPES = ("synapse", "input", "output", "scalar")
IMPLS = ("fused", "reference")


class _PlasticBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, alpha: str, rule: str, activation: str,
                 clip, eta: float, learn_eta: bool, bias: bool, batch_first: bool, init_std: float, impl: str,
                 checkpoint_every, trace_dtype=None, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
                raise ValueError(f"{name} must be a positive integer below 2**31, got {value!r}")
        if alpha not in ALPHA_SHAPES:
            raise ValueError(f"alpha must be one of {ALPHA_SHAPES}, got {alpha!r}")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        clip = check_clip(clip)
        checkpoint_every = check_checkpoint_every(checkpoint_every)
        # checked against the parameters' dtype at each call: .to(dtype) may change it after this
        if trace_dtype is not None and trace_dtype not in {d for ds in TRACE_DTYPES.values() for d in ds}:
            raise TypeError(f"trace_dtype must be None, torch.float32, torch.bfloat16 or torch.float64, "
                            f"got {trace_dtype!r}")
        self.trace_dtype = trace_dtype
        self.impl = impl  # validated by the property setter
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.alpha_shape, self.rule, self.activation = alpha, rule, activation
        self.clip, self.batch_first, self.init_std = clip, batch_first, init_std
        self.checkpoint_every = checkpoint_every
        self.weight = nn.Parameter(torch.empty(in_features, out_features, **factory))
        a_shape = {"synapse": (in_features, out_features), "input": (in_features, 1),
                   "output": (1, out_features), "scalar": ()}[alpha]
        self.alpha = nn.Parameter(torch.empty(a_shape, **factory))
        eta_t = torch.tensor(to_float("eta", eta), **factory)
        if learn_eta:
            self.eta = nn.Parameter(eta_t)
        else:
            self.register_buffer("eta", eta_t)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
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
        """Miconi et al. (2018): w and alpha drawn from init_std * N(0, 1) (init_std = 0.01), bias zero."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std)
            self.alpha.normal_(0.0, self.init_std)
            if self.bias is not None:
                self.bias.zero_()

    def _backend(self):
        return ops if self.impl == "fused" else reference

    def _time_major(self, t):
        return t.transpose(0, 1) if (t is not None and self.batch_first) else t

    def _kwargs(self, modulation):
        return dict(rule=self.rule, activation=self.activation, clip=self.clip,
                    modulation=self._time_major(modulation), checkpoint_every=self.checkpoint_every,
                    trace_dtype=self.trace_dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, alpha={self.alpha_shape}, rule={self.rule}, "
                f"activation={self.activation}, clip={self.clip}, bias={self.bias is not None}, "
                f"batch_first={self.batch_first}, impl={self.impl}"
                + (f", trace_dtype={self.trace_dtype}" if self.trace_dtype is not None else ""))


