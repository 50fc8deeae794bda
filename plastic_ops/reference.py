"""Pure-PyTorch reference of the plastic op: the spec of docs/op_spec.md in code.

Readable on purpose: one Python step per time step, autograd does the backward
(and therefore keeps every trace in memory). The fused op in ``plastic_ops.ops``
must match it in outputs, final trace and every gradient.

Dtypes (docs/op_spec.md, "Dtypes"): 16-bit inputs are computed in float32, and values are rounded
to their storage dtype exactly where the kernels store them: y_t to the inputs' dtype as soon as it
is computed, H_t to the trace's dtype after each update. The rounding passes gradients through
unchanged, as the kernels do (they accumulate every gradient in float32).
"""
from __future__ import annotations

import torch

from . import _autocast
from ._validation import (RESET, SKIP, PlasticArgs, check_drive, check_linear, check_neuromodulation,
                          check_return_traces, check_rnn)


class _Round(torch.autograd.Function):
    """t rounded to `dtype` and read back in t's dtype; the gradient passes unchanged (straight through)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t, dtype):
        return t.to(dtype).to(t.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None

    @staticmethod
    def jvp(ctx, tangent, _):
        return tangent


def round_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as stored in `dtype` (a no-op when t already has it); see _Round."""
    return t if dtype == t.dtype else _Round.apply(t, dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of inputs of `dtype`: float32 for the 16-bit types, else dtype itself."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def activate(a: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "tanh":
        return torch.tanh(a)
    if activation == "sigmoid":
        return torch.sigmoid(a)
    if activation == "relu":
        return torch.relu(a)
    if activation == "identity":
        return a
    if activation == "softmax":
        return torch.softmax(a, dim=-1)
    raise ValueError(f"unknown activation {activation!r}")


def update_trace(H, x, y, e, rule: str, clip, E=None):
    """One plasticity step. H: (B, N_in, N_out); x: (B, N_in); y, e: (B, N_out) (e: the rates r_t).

    E: the eligibility trace carried into the step, which then replaces the Hebbian product
    x y^T as the increment (docs/op_spec.md, "Neuromodulation")."""
    x = x.unsqueeze(2)
    y = y.unsqueeze(1)
    e = e.unsqueeze(1)
    inc = x * y if E is None else E
    if rule == "hebb":
        H = (1 - e) * H + e * inc
    elif rule == "add":
        H = H + e * inc
    elif rule == "oja":
        H = H + e * y * (x - H * y)
    else:
        raise ValueError(f"unknown rule {rule!r}")
    if clip is not None:
        # torch.clamp's values, with the spec's gradient mask [-c <= Hpre <= c] (NaN: 0) written
        # out: torch.clamp's own mask at the bounds differs between torch versions
        inside = (H >= -clip) & (H <= clip)
        H = torch.where(inside, H, torch.clamp(H.detach(), -clip, clip))
    return H


def update_eligibility(E, x, y, q):
    """E_{t+1} = (1 - q) E_t + q x y^T (docs/op_spec.md, "Neuromodulation")."""
    return (1 - q) * E + q * (x.unsqueeze(2) * y.unsqueeze(1))


def self_modulation(y, mod):
    """M_t (B, N_out) from y_t (B, N_out) and the (4, N_out) canonical mod: rows mod_weight,
    mod_fanout_weight, mod_fanout_bias, and mod_bias at [3, 0]."""
    s = torch.tanh(y @ mod[0] + mod[3, 0])
    return mod[1] * s.unsqueeze(1) + mod[2]


def _rates(p: PlasticArgs) -> torch.Tensor:
    """e_t = eta * modulation_t, broadcast to (T, B, N_out)."""
    if p.modulation is None:
        return p.eta.expand(p.T, p.B, p.n_out)
    return p.eta * p.modulation.expand(p.T, p.B, p.n_out)


def scan(pre, drive, w, alpha, e, h0, rule: str, activation: str, clip, recurrent: bool, steps=None,
         return_traces: bool = False, mod=None, elig_rate=None):
    """The T steps on the op's canonical arguments (docs/op_spec.md, "How the fused op is split").

    pre: x (T, B, N_in) for the linear form, y0 (B, N) for the recurrent one; drive: d_t as
    (T, B, N_out) (an expanded view is fine) or None for no drive; alpha broadcastable to
    (N_in, N_out); e: the rates (T, B, N_out); h0: H_0, in the trace's storage dtype; steps: None or
    the (T, B) uint8 flags RESET = 1, SKIP = 2 (docs/op_spec.md, "Episode resets and lengths");
    mod: None or the (4, N_out) self-modulation parameters; elig_rate: None or the 0-dim eligibility
    rate q, and then h0 is (2, B, N_in, N_out), H_0 and E_0 (docs/op_spec.md, "Neuromodulation").
    Returns (y, H_T) in the inputs' dtype and the trace's (H_T: (2, B, N_in, N_out) with eligibility),
    and with return_traces the carried traces H_1 .. H_T stacked (T, B, N_in, N_out), detached.
    """
    dtype, trace_dtype = e.dtype, h0.dtype
    acc = compute_dtype(dtype)
    if acc != dtype:
        pre, w, alpha, e = pre.to(acc), w.to(acc), alpha.to(acc), e.to(acc)
        drive = None if drive is None else drive.to(acc)
        mod = None if mod is None else mod.to(acc)
        elig_rate = None if elig_rate is None else elig_rate.to(acc)
    eligible = elig_rate is not None
    H = (h0[0] if eligible else h0).to(acc)
    E = h0[1].to(acc) if eligible else None
    prev = pre if recurrent else None
    ys, traces = [], []
    for t in range(e.shape[0]):
        if steps is not None:
            # RESET: this row's traces (and, recurrent, its presynaptic vector) become zeros
            reset = (steps[t] & RESET).bool()
            H = torch.where(reset[:, None, None], H.new_zeros(()), H)
            if eligible:
                E = torch.where(reset[:, None, None], E.new_zeros(()), E)
            if recurrent:
                prev = torch.where(reset[:, None], prev.new_zeros(()), prev)
        p_t = prev if recurrent else pre[t]
        d_t = None if drive is None else drive[t]
        e_t = e[t]
        if steps is not None:
            # SKIP: the step reads none of its inputs (padding may hold anything, NaN included)
            skip = (steps[t] & SKIP).bool()
            p_t, e_t = torch.where(skip[:, None], p_t.new_zeros(()), p_t), torch.where(skip[:, None], e_t.new_zeros(()), e_t)
            d_t = None if d_t is None else torch.where(skip[:, None], d_t.new_zeros(()), d_t)
        # a_t = p_t @ (w + alpha * H_t) + d_t, per episode
        a = p_t @ w + torch.einsum("bi,bij->bj", p_t, alpha * H)
        if d_t is not None:
            a = a + d_t
        y = round_to(activate(a, activation), dtype)
        r_t = e_t if mod is None else e_t * self_modulation(y, mod)
        H_next = round_to(update_trace(H, p_t, y, r_t, rule, clip, E), trace_dtype)
        E_next = round_to(update_eligibility(E, p_t, y, elig_rate), trace_dtype) if eligible else None
        if steps is not None:
            # and does nothing: y_t = 0 (a constant), the traces pass through
            y = torch.where(skip[:, None], y.new_zeros(()), y)
            H_next = torch.where(skip[:, None, None], H, H_next)
            if eligible:
                E_next = torch.where(skip[:, None, None], E, E_next)
        H, E = H_next, E_next
        ys.append(y)
        if return_traces:
            traces.append(H.detach().to(trace_dtype))
        prev = y
    hT = torch.stack([H, E]) if eligible else H
    out = (torch.stack(ys).to(dtype), hT.to(trace_dtype))
    return out + (torch.stack(traces),) if return_traces else out


def _drive(p: PlasticArgs, recurrent: bool, drive=None):
    """d_t: u_t + bias (recurrent), bias + drive_t (linear), or None for the linear form without either."""
    if recurrent:
        return p.x if p.bias is None else p.x + p.bias
    if p.bias is None:
        return drive
    bias = p.bias.expand(p.T, p.B, p.n_out)
    return bias if drive is None else bias + drive


NEURO_ARGS = ("mod_weight", "mod_bias", "mod_fanout_weight", "mod_fanout_bias", "eligibility", "eligibility_eta")
#: the neuromodulation arguments that autocast casts with the inputs (the eligibility trace is state: it
#: keeps the trace's dtype)
_NEURO_CAST = ("mod_weight", "mod_bias", "mod_fanout_weight", "mod_fanout_bias", "eligibility_eta")


def cast_neuro(dtype, neuro: dict) -> dict:
    """The neuromodulation arguments as autocast casts them."""
    names = [k for k in _NEURO_CAST if neuro.get(k) is not None]
    return {**neuro, **dict(zip(names, _autocast.cast(dtype, *(neuro[k] for k in names))))}


def unpack(y, hT, traces, p: PlasticArgs):
    """The public functions' outputs: (y, trace_T[, eligibility_T][, traces])."""
    out = (y, hT) if p.elig_rate is None else (y, hT[0], hT[1])
    return out if traces is None else out + (traces,)


def _scan(p: PlasticArgs, recurrent: bool, drive=None, return_traces: bool = False):
    out = scan(p.y0 if recurrent else p.x, _drive(p, recurrent, drive), p.w, p.alpha, _rates(p), p.state, p.rule,
               p.activation, p.clip, recurrent, p.steps, return_traces, p.mod, p.elig_rate)
    return unpack(out[0], out[1], out[2] if return_traces else None, p)


def plastic_linear(x, w, alpha, eta, trace=None, bias=None, *, rule="hebb", activation="tanh", clip=None,
                   modulation=None, checkpoint_every=None, trace_dtype=None, reset=None, lengths=None, drive=None,
                   return_traces=False, **neuro):
    """Reference of :func:`plastic_ops.plastic_linear`; same arguments, same results."""
    dtype = _autocast.region_dtype(x)
    if dtype is not None:  # the op's autocast policy, then every step in the cast dtypes
        x, w, alpha, eta, bias, modulation, drive = _autocast.cast(dtype, x, w, alpha, eta, bias, modulation, drive)
        with _autocast.disabled(x):
            return plastic_linear(x, w, alpha, eta, trace, bias, rule=rule, activation=activation, clip=clip,
                                  modulation=modulation, checkpoint_every=checkpoint_every, trace_dtype=trace_dtype,
                                  reset=reset, lengths=lengths, drive=drive, return_traces=return_traces,
                                  **cast_neuro(dtype, neuro))
    p = check_linear(x, w, alpha, eta, trace, bias, rule=rule, activation=activation, clip=clip,
                     modulation=modulation, checkpoint_every=checkpoint_every, trace_dtype=trace_dtype,
                     reset=reset, lengths=lengths)
    p = check_neuromodulation(p, "x", **neuro)
    return _scan(p, recurrent=False, drive=check_drive(drive, p), return_traces=check_return_traces(return_traces))


def plastic_rnn(u, w, alpha, eta, trace=None, y0=None, bias=None, *, rule="hebb", activation="tanh", clip=None,
                modulation=None, checkpoint_every=None, trace_dtype=None, reset=None, lengths=None,
                return_traces=False, **neuro):
    """Reference of :func:`plastic_ops.plastic_rnn`; same arguments, same results."""
    dtype = _autocast.region_dtype(u)
    if dtype is not None:
        u, w, alpha, eta, y0, bias, modulation = _autocast.cast(dtype, u, w, alpha, eta, y0, bias, modulation)
        with _autocast.disabled(u):
            return plastic_rnn(u, w, alpha, eta, trace, y0, bias, rule=rule, activation=activation, clip=clip,
                               modulation=modulation, checkpoint_every=checkpoint_every, trace_dtype=trace_dtype,
                               reset=reset, lengths=lengths, return_traces=return_traces, **cast_neuro(dtype, neuro))
    p = check_rnn(u, w, alpha, eta, trace, y0, bias, rule=rule, activation=activation, clip=clip,
                  modulation=modulation, checkpoint_every=checkpoint_every, trace_dtype=trace_dtype,
                  reset=reset, lengths=lengths)
    p = check_neuromodulation(p, "u", **neuro)
    return _scan(p, recurrent=True, return_traces=check_return_traces(return_traces))
