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

RULES = ("hebb", "oja", "add")
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
    # (T, B) torch.uint8 flags of every step (RESET = 1, SKIP = 2), or None: docs/op_spec.md,
    # "Episode resets and lengths"
    steps: Optional[torch.Tensor] = None
    # docs/op_spec.md, "Neuromodulation": the (4, N_out) self-modulation parameters or None; the 0-dim
    # eligibility rate q or None; and, with q, E_0 (B, N_in, N_out) in the trace's dtype
    mod: Optional[torch.Tensor] = None
    elig_rate: Optional[torch.Tensor] = None
    eligibility: Optional[torch.Tensor] = None

    @property
    def state(self) -> torch.Tensor:
        """h0 of the compiled ops: the trace, or (2, B, N_in, N_out) H_0 and E_0 with eligibility."""
        return self.trace if self.elig_rate is None else torch.stack([self.trace, self.eligibility])

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


#: The bits of the per-step flags (docs/op_spec.md, "Episode resets and lengths").
RESET, SKIP = 1, 2


def check_reset(reset, T: int, B: int, x_name: str, device) -> Optional[torch.Tensor]:
    """None, or a (T, B) bool tensor on x's device."""
    if reset is None:
        return None
    if not isinstance(reset, torch.Tensor):
        raise TypeError(f"reset must be None or a (T, B) bool tensor, got {type(reset).__name__}")
    if reset.dtype != torch.bool:
        raise TypeError(f"reset must be a bool tensor (True where a row starts a new episode), got {reset.dtype}")
    _shape("reset", reset, (T, B), "(T, B)")
    if reset.device != device:
        raise ValueError(f"reset is on {reset.device} but {x_name} is on {device}: it must be on {x_name}'s device")
    return reset


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return is_compiling() if is_compiling is not None else torch._dynamo.is_compiling()


def check_lengths(lengths, T: int, B: int, x_name: str, device):
    """None, or a (B,) integer tensor on the CPU or on x's device, 1 <= lengths[b] <= T.

    The range is checked on a CPU tensor outside torch.compile only: reading a device tensor back to
    the host would stall the stream and break CUDA graph capture, and a compiled graph cannot read
    a value while it is traced.
    """
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                  for v in lengths):
        lengths = torch.tensor(lengths, dtype=torch.int64)
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be None or a (B,) integer tensor, got {type(lengths).__name__}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor (the number of steps of each row), got {lengths.dtype}")
    _shape("lengths", lengths, (B,), "(B,)")
    if lengths.device != device and lengths.device.type != "cpu":
        raise ValueError(f"lengths is on {lengths.device} but {x_name} is on {device}: it must be on the CPU or "
                         f"on {x_name}'s device")
    if lengths.device.type == "cpu" and not _compiling():
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > T:
            bad = low if low < 1 else high
            raise ValueError(f"lengths must be between 1 and T = {T} (the number of steps of {x_name}), got {bad}")
    return lengths


def steps_of(reset, lengths, T: int, B: int, device) -> Optional[torch.Tensor]:
    """The (T, B) uint8 flags of checked reset and lengths, or None when both are None.

    Built on the device with tensor operations only (no value is read back to the host).
    """
    if reset is None and lengths is None:
        return None
    steps = torch.zeros((T, B), dtype=torch.uint8, device=device)
    if reset is not None:
        steps = steps | reset.to(torch.uint8)
    if lengths is not None:
        lengths = lengths.to(device)
        past_end = torch.arange(T, device=device).unsqueeze(1) >= lengths.unsqueeze(0)
        steps = steps | (past_end.to(torch.uint8) * SKIP)
    return steps.contiguous()


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


def _steps(p: PlasticArgs, reset, lengths, x_name: str) -> PlasticArgs:
    reset = check_reset(reset, p.T, p.B, x_name, p.x.device)
    lengths = check_lengths(lengths, p.T, p.B, x_name, p.x.device)
    p.steps = steps_of(reset, lengths, p.T, p.B, p.x.device)
    return p


def _same(name: str, t: torch.Tensor, p: PlasticArgs, x_name: str, dtype=None) -> None:
    if t.device != p.x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} is on {p.x.device}: all tensors must share a device")
    dtype = p.x.dtype if dtype is None else dtype
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {x_name} has {p.x.dtype}: all tensors but the trace "
                        "must share a dtype" if dtype == p.x.dtype else
                        f"{name} has dtype {t.dtype} but the trace has {dtype}: they must agree")


def check_neuromodulation(p: PlasticArgs, x_name: str, mod_weight=None, mod_bias=None, mod_fanout_weight=None,
                          mod_fanout_bias=None, eligibility=None, eligibility_eta=None) -> PlasticArgs:
    """Self-generated modulation and eligibility traces (docs/op_spec.md, "Neuromodulation").

    Sets p.mod to the (4, N_out) canonical parameters (rows mod_weight, mod_fanout_weight, mod_fanout_bias,
    and mod_bias at [3, 0]; built with differentiable ops), p.elig_rate and p.eligibility.
    """
    n = p.n_out
    given = {"mod_weight": mod_weight, "mod_bias": mod_bias, "mod_fanout_weight": mod_fanout_weight,
             "mod_fanout_bias": mod_fanout_bias}
    if any(v is not None for v in given.values()):
        if mod_weight is None or mod_fanout_weight is None:
            missing = "mod_weight" if mod_weight is None else "mod_fanout_weight"
            raise ValueError(f"self-generated modulation needs both mod_weight and mod_fanout_weight; {missing} "
                             "is None (mod_bias and mod_fanout_bias default to 0)")
        shapes = {"mod_weight": (n,), "mod_bias": (), "mod_fanout_weight": (n,), "mod_fanout_bias": (n,)}
        for name, v in given.items():
            if v is None:
                continue
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and name == "mod_bias":
                v = given[name] = torch.tensor(to_float(name, v), dtype=p.x.dtype, device=p.x.device)
            _tensor(name, v)
            _shape(name, v, shapes[name], "(N_out,)" if shapes[name] else "()")
            _same(name, v, p, x_name)
        zero = p.x.new_zeros(())
        bias = given["mod_bias"] if given["mod_bias"] is not None else zero
        fanout_bias = given["mod_fanout_bias"] if given["mod_fanout_bias"] is not None else zero.expand(n)
        p.mod = torch.stack([mod_weight, mod_fanout_weight, fanout_bias, bias.expand(n)]).contiguous()
    if eligibility_eta is None:
        if eligibility is not None:
            raise ValueError("eligibility (the initial eligibility trace) is given but eligibility_eta is None: "
                             "eligibility traces are on when eligibility_eta is given")
        return p
    if p.rule == "oja":
        raise ValueError("rule='oja' has no eligibility-trace form: use rule='hebb' or 'add' with eligibility_eta")
    if isinstance(eligibility_eta, numbers.Real) and not isinstance(eligibility_eta, bool):
        eligibility_eta = torch.tensor(to_float("eligibility_eta", eligibility_eta), dtype=p.x.dtype,
                                       device=p.x.device)
    _tensor("eligibility_eta", eligibility_eta)
    if eligibility_eta.dim() != 0:
        raise ValueError(f"eligibility_eta must be a 0-dim (scalar) tensor, got shape {tuple(eligibility_eta.shape)}")
    _same("eligibility_eta", eligibility_eta, p, x_name)
    if eligibility is None:
        eligibility = torch.zeros_like(p.trace)
    else:
        _tensor("eligibility", eligibility)
        _shape("eligibility", eligibility, tuple(p.trace.shape), "(B, N_in, N_out)")
        _same("eligibility", eligibility, p, x_name, dtype=p.trace.dtype)
    p.elig_rate, p.eligibility = eligibility_eta, eligibility
    return p


def check_return_traces(return_traces) -> bool:
    if not isinstance(return_traces, bool):
        raise TypeError(f"return_traces must be True or False, got {return_traces!r}")
    return return_traces


def check_drive(drive, p: PlasticArgs) -> Optional[torch.Tensor]:
    """None, or the linear form's additive per-step input: (T, B, N_out), x's dtype and device."""
    if drive is None:
        return None
    drive = _tensor("drive", drive)
    _shape("drive", drive, (p.T, p.B, p.n_out), "(T, B, N_out)")
    if drive.device != p.x.device:
        raise ValueError(f"drive is on {drive.device} but x is on {p.x.device}: all tensors must share a device")
    if drive.dtype != p.x.dtype:
        raise TypeError(f"drive has dtype {drive.dtype} but x has {p.x.dtype}: all tensors but the trace must "
                        "share a dtype")
    return drive


def check_linear(x, w, alpha, eta, trace=None, bias=None, *, rule="hebb", activation="tanh", clip=None,
                 modulation=None, checkpoint_every=None, trace_dtype=None, reset=None, lengths=None) -> PlasticArgs:
    x = _tensor("x", x)
    w = _tensor("w", w)
    if x.dim() == 3 and w.dim() == 2 and x.shape[2] != w.shape[0]:
        raise ValueError(f"x has N_in = {x.shape[2]} features but w has {w.shape[0]} rows (w is (N_in, N_out))")
    out = _check_common(x, w, alpha, eta, trace, bias, modulation, rule, activation, clip, checkpoint_every, "x",
                        trace_dtype=trace_dtype)
    return _steps(PlasticArgs(*out[:7], None, *out[7:]), reset, lengths, "x")


def check_rnn(u, w, alpha, eta, trace=None, y0=None, bias=None, *, rule="hebb", activation="tanh", clip=None,
              modulation=None, checkpoint_every=None, trace_dtype=None, reset=None, lengths=None) -> PlasticArgs:
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
    return _steps(PlasticArgs(*out[:7], y0, *out[7:]), reset, lengths, "u")
