"""Argument checking shared by the fused op and the reference.

Every public entry point goes through ``check_linear`` or ``check_rnn`` so that
bad input raises a ``ValueError``/``TypeError`` naming the argument, instead of
a crash inside C++ or a silent broadcast. See docs/op_spec.md for the contract.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

RULES = ("hebb", "oja")
ACTIVATIONS = ("tanh", "sigmoid", "relu", "identity", "softmax")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: The trace's storage dtypes allowed for each input dtype; the first is the default
#: (docs/op_spec.md, "Dtypes"). A 16-bit trace is bfloat16: float16's range is too narrow.
TRACE_DTYPES = {
    torch.float64: (torch.float64,),
    torch.float32: (torch.float32, torch.bfloat16),
    torch.bfloat16: (torch.float32, torch.bfloat16),
    torch.float16: (torch.float32, torch.bfloat16),
}


@dataclass
class PlasticArgs:
    """Checked, normalized arguments of one call (trace filled with zeros when None)."""

    x: torch.Tensor  # (T, B, N_in): input (linear) or drive u (rnn)
    w: torch.Tensor
    alpha: torch.Tensor
    eta: torch.Tensor  # 0-dim
    trace: torch.Tensor  # (B, N_in, N_out)
    bias: Optional[torch.Tensor]
    modulation: Optional[torch.Tensor]
    y0: Optional[torch.Tensor]
    rule: str
    activation: str
    clip: Optional[float]
    checkpoint_every: Optional[int]

    @property
    def T(self) -> int:
        return self.x.shape[0]

    @property
    def B(self) -> int:
        return self.x.shape[1]

    @property
    def n_in(self) -> int:
        return self.w.shape[0]

    @property
    def n_out(self) -> int:
        return self.w.shape[1]


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _shape(name: str, t: torch.Tensor, expected: tuple, meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def to_float(name: str, value) -> float:
    try:
        return float(value)
    except OverflowError:  # a Python int beyond the float range
        raise ValueError(f"{name} is too large for a float: {value!r}") from None


def check_clip(clip):
    """None, or a positive finite number; a value traced by torch.compile (SymFloat) stays traced."""
    if clip is None:
        return None
    symbolic = isinstance(clip, (torch.SymFloat, torch.SymInt))
    if isinstance(clip, bool) or not (symbolic or isinstance(clip, numbers.Real)):
        raise TypeError(f"clip must be None or a positive number, got {clip!r}")
    if not symbolic:
        clip = to_float("clip", clip)
    # comparisons rather than math.isinf, which a traced value does not support; NaN fails both
    if not (clip > 0) or clip == math.inf:
        raise ValueError(f"clip must be a positive finite number (the trace is clamped to [-clip, clip]), got {clip}")
    return clip


def check_checkpoint_every(checkpoint_every):
    """None, or an integer K >= 1 (any size: the op uses min(K, T), see docs/op_spec.md)."""
    if checkpoint_every is None:
        return None
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"checkpoint_every must be None or an integer >= 1, got {checkpoint_every!r} "
                        f"({type(checkpoint_every).__name__})")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be None or an integer >= 1, got {checkpoint_every!r}")
    return checkpoint_every if isinstance(checkpoint_every, torch.SymInt) else int(checkpoint_every)


def check_trace_dtype(trace_dtype, x_dtype: torch.dtype, x_name: str = "x", trace=None) -> torch.dtype:
    """The trace's storage dtype for inputs of x_dtype (docs/op_spec.md, "Dtypes").

    trace_dtype when given; else the dtype of the trace passed in, if any; else the default.
    """
    allowed = TRACE_DTYPES[x_dtype]
    names = " or ".join(str(d) for d in allowed)
    if trace_dtype is not None:
        if not isinstance(trace_dtype, torch.dtype):
            raise TypeError(f"trace_dtype must be None or a torch.dtype, got {trace_dtype!r}")
        if trace_dtype not in allowed:
            raise TypeError(f"trace_dtype {trace_dtype} is not supported for {x_dtype} {x_name}: use {names}")
        if trace is not None and trace.dtype != trace_dtype:
            raise TypeError(f"trace has dtype {trace.dtype} but trace_dtype is {trace_dtype}: they must agree")
        return trace_dtype
    if trace is not None:
        if trace.dtype not in allowed:
            raise TypeError(f"trace has dtype {trace.dtype}, which is not supported for {x_dtype} {x_name}: "
                            f"the trace must be {names}")
        return trace.dtype
    return allowed[0]


def _check_common(x, w, alpha, eta, trace, bias, modulation, rule, activation, clip, checkpoint_every,
                  x_name: str, y0=None, trace_dtype=None):
    x = _tensor(x_name, x)
    if x.dim() != 3:
        raise ValueError(f"{x_name} must be 3-D (T, B, N_in), got {x.dim()}-D shape {tuple(x.shape)}")
    T, B, n_x = x.shape
    if T == 0:
        raise ValueError(f"{x_name} has T = 0 time steps: the sequence must not be empty")
    if B == 0:
        raise ValueError(f"{x_name} has batch size B = 0")
    if x.dtype not in DTYPES:
        raise TypeError(f"{x_name} must be float32, float64, bfloat16 or float16, got {x.dtype}")

    w = _tensor("w", w)
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (N_in, N_out), got {w.dim()}-D shape {tuple(w.shape)}")
    n_in, n_out = w.shape
    if n_in == 0 or n_out == 0:
        raise ValueError(f"w must have non-zero sizes, got {tuple(w.shape)}")

    alpha = _tensor("alpha", alpha)
    allowed = {(), (1, 1), (n_in, 1), (1, n_out), (n_in, n_out)}
    if tuple(alpha.shape) not in allowed:
        raise ValueError(
            "alpha must be a 0-dim or (1, 1) scalar, per input (N_in, 1), per output (1, N_out) "
            f"or per synapse (N_in, N_out) with N_in={n_in}, N_out={n_out}; got shape {tuple(alpha.shape)}")

    if isinstance(eta, numbers.Real) and not isinstance(eta, bool):
        eta = torch.tensor(to_float("eta", eta), dtype=x.dtype, device=x.device)
    eta = _tensor("eta", eta)
    if eta.dim() != 0:
        raise ValueError(f"eta must be a 0-dim (scalar) tensor, got shape {tuple(eta.shape)}")

    if trace is not None:
        trace = _tensor("trace", trace)
    trace_dtype = check_trace_dtype(trace_dtype, x.dtype, x_name, trace)
    if trace is None:
        trace = x.new_zeros(B, n_in, n_out, dtype=trace_dtype)
    if trace.dim() != 3:
        raise ValueError(f"trace must be 3-D (B, N_in, N_out), got shape {tuple(trace.shape)}")
    if trace.shape[0] != B:
        raise ValueError(f"trace has batch size {trace.shape[0]} but the input has B = {B}")
    _shape("trace", trace, (B, n_in, n_out), "(B, N_in, N_out)")

    if bias is not None:
        bias = _tensor("bias", bias)
        _shape("bias", bias, (n_out,), "(N_out,)")

    if modulation is not None:
        modulation = _tensor("modulation", modulation)
        if tuple(modulation.shape) not in {(T, B, 1), (T, B, n_out)}:
            raise ValueError(f"modulation must have shape (T, B, 1) = {(T, B, 1)} or (T, B, N_out) = "
                             f"{(T, B, n_out)}, got {tuple(modulation.shape)}")

    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    clip = check_clip(clip)
    checkpoint_every = check_checkpoint_every(checkpoint_every)

    named = [(x_name, x), ("w", w), ("alpha", alpha), ("eta", eta), ("trace", trace), ("bias", bias),
             ("modulation", modulation), ("y0", y0)]
    for name, t in named[1:]:
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}: all tensors must share a device")
        # the trace keeps its own storage dtype, checked above
        if name != "trace" and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {x_name} has {x.dtype}: all tensors but the trace must "
                            "share a dtype")
    return x, w, alpha, eta, trace, bias, modulation, rule, activation, clip, checkpoint_every


def check_linear(x, w, alpha, eta, trace=None, bias=None, *, rule="hebb", activation="tanh", clip=None,
                 modulation=None, checkpoint_every=None, trace_dtype=None) -> PlasticArgs:
    x = _tensor("x", x)
    w = _tensor("w", w)
    if x.dim() == 3 and w.dim() == 2 and x.shape[2] != w.shape[0]:
        raise ValueError(f"x has N_in = {x.shape[2]} features but w has {w.shape[0]} rows (w is (N_in, N_out))")
    out = _check_common(x, w, alpha, eta, trace, bias, modulation, rule, activation, clip, checkpoint_every, "x",
                        trace_dtype=trace_dtype)
    return PlasticArgs(*out[:7], None, *out[7:])


def check_rnn(u, w, alpha, eta, trace=None, y0=None, bias=None, *, rule="hebb", activation="tanh", clip=None,
              modulation=None, checkpoint_every=None, trace_dtype=None) -> PlasticArgs:
    u = _tensor("u", u)
    w = _tensor("w", w)
    if w.dim() == 2 and w.shape[0] != w.shape[1]:
        raise ValueError(f"w must be square (N, N) for the recurrent form, got {tuple(w.shape)}")
    if u.dim() == 3 and w.dim() == 2 and u.shape[2] != w.shape[1]:
        raise ValueError(f"u has {u.shape[2]} features but the network has N = {w.shape[1]} units")
    if y0 is not None:
        y0 = _tensor("y0", y0)
        if u.dim() == 3:
            _shape("y0", y0, (u.shape[1], u.shape[2]), "(B, N)")
    out = _check_common(u, w, alpha, eta, trace, bias, modulation, rule, activation, clip, checkpoint_every, "u",
                        y0=y0, trace_dtype=trace_dtype)
    x = out[0]
    if y0 is None:
        y0 = x.new_zeros(x.shape[1], x.shape[2])
    return PlasticArgs(*out[:7], y0, *out[7:])
