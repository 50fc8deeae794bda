"""The fused plastic op: public functions, fake kernels and autograd.

The C++/CUDA kernels (csrc/) register four ops in the ``plastic_ops`` namespace:
``plastic_linear_forward``/``_backward`` and ``plastic_rnn_forward``/``_backward``.
They take canonical shapes only (alpha as (N_in, N_out), the per-step rates
e = eta * modulation as (T, B, N_out), bias folded into a drive (T, B, N_out));
the functions here check the user's arguments and build those tensors with
ordinary autograd-aware ops, so the gradients of alpha, eta, modulation and bias
are reduced back to their own shapes by autograd. Math: docs/op_spec.md.

A backward with create_graph=True (double backward) and calls under torch.func transforms or
forward-mode AD go through the reference's operations instead (docs/op_spec.md, "Higher-order
and forward-mode AD").
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch.autograd import forward_ad

from . import _autocast, _extension, reference
from ._validation import PlasticArgs, check_linear, check_rnn

_OPS_LOADED = _extension.load()


#: Default byte limits of the memory policy (checkpoint_every=None), by device type: every trace
#: is kept while the T traces take at most this many bytes. 0 on the CPU, where writing T traces
#: into freshly allocated memory (page faults, no caching allocator) measured slower than
#: recomputing segments (benchmarks/RESULTS.md, "Fused backward"). The environment variable
#: PLASTIC_OPS_KEEP_TRACES_BYTES, read at each call, overrides it for every device.
KEEP_ALL_TRACES_BYTES = {"cpu": 0, "cuda": 2 * 2**30}


def default_checkpoint_every(T: int) -> int:
    """K about sqrt(T): memory of C = ceil(T/K) saved traces plus K recomputed ones is minimal."""
    return max(1, int(round(math.sqrt(T))))


def keep_all_traces_bytes(device_type: str = "cuda") -> int:
    """The policy's byte limit: PLASTIC_OPS_KEEP_TRACES_BYTES when set, else KEEP_ALL_TRACES_BYTES."""
    value = os.environ.get("PLASTIC_OPS_KEEP_TRACES_BYTES")
    if value is None:
        return KEEP_ALL_TRACES_BYTES.get(device_type, KEEP_ALL_TRACES_BYTES["cuda"])
    try:
        limit = int(value)
    except ValueError:
        limit = -1
    if limit < 0:
        raise ValueError(f"PLASTIC_OPS_KEEP_TRACES_BYTES must be a number of bytes >= 0, got {value!r}")
    return limit


def choose_checkpoint_every(T: int, trace_bytes: int, limit: Optional[int] = None, device_type: str = "cuda") -> int:
    """The memory policy of checkpoint_every=None (docs/op_spec.md, "Checkpointing").

    K = 1 (every trace kept: no recompute in the backward) when the T traces of trace_bytes
    each fit in `limit` bytes (default: keep_all_traces_bytes(device_type)), else K = about sqrt(T).
    """
    limit = keep_all_traces_bytes(device_type) if limit is None else limit
    return 1 if T * trace_bytes <= limit else default_checkpoint_every(T)


def num_checkpoints(T: int, K: int) -> int:
    return 0 if K == 0 else -(-T // K)


def _canonical(p: PlasticArgs, recurrent: bool, needs_grad: bool):
    alpha = p.alpha.expand(p.n_in, p.n_out).contiguous()
    if p.modulation is None:
        e = p.eta.expand(p.T, p.B, p.n_out).contiguous()
    else:
        e = (p.eta * p.modulation.expand(p.T, p.B, p.n_out)).contiguous()
    if recurrent:
        drive = p.x if p.bias is None else p.x + p.bias
    else:
        drive = p.bias.expand(p.T, p.B, p.n_out) if p.bias is not None else p.x.new_zeros(p.T, p.B, p.n_out)
    drive = drive.contiguous()
    # K > T saves the same single checkpoint as K = T; clamping keeps every count small
    if p.checkpoint_every is not None:
        K = min(p.checkpoint_every, p.T)
    else:
        K = choose_checkpoint_every(p.T, p.B * p.n_in * p.n_out * p.trace.element_size(),
                                    device_type=p.x.device.type)
    return alpha, e, drive, (K if needs_grad else 0)


def _any_requires_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return is_compiling() if is_compiling is not None else torch._dynamo.is_compiling()


def _needs_reference(*tensors) -> bool:
    """True under torch.func transforms (grad, vmap, jvp, ...) or with forward-mode dual tensors.

    The compiled ops have a reverse-mode autograd formula only, so these calls run the
    reference, which gives the same results (docs/op_spec.md, "Higher-order and forward-mode AD").
    """
    if _is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False


def _op(name: str):
    _extension.require()
    return getattr(torch.ops.plastic_ops, name)


def plastic_linear(x, w, alpha, eta, trace=None, bias=None, *, rule="hebb", activation="tanh", clip=None,
                   modulation=None, checkpoint_every=None, trace_dtype=None):
    """Run T plastic steps of a feedforward layer for B independent episodes.

    a_t = x_t @ (w + alpha * H_t) + bias,  y_t = act(a_t),  H_{t+1} = rule(H_t, x_t, y_t, eta * modulation_t).

    Args:
        x: (T, B, N_in) inputs.
        w: (N_in, N_out) fixed weights.
        alpha: plasticity coefficients: 0-dim or (1, 1), (N_in, 1), (1, N_out) or (N_in, N_out).
        eta: 0-dim tensor (or Python number), the plasticity rate.
        trace: (B, N_in, N_out) initial Hebbian trace; zeros when None.
        bias: (N_out,) or None.
        rule: "hebb" or "oja".
        activation: "tanh", "sigmoid", "relu", "identity" or "softmax" (over N_out).
        clip: None or a positive number: the trace is clamped to [-clip, clip] after each update.
        modulation: None, (T, B, 1) or (T, B, N_out): multiplies eta at each step.
        checkpoint_every: K, the trace is saved every K steps for the backward; steps in between are
            recomputed. None (default): K = 1, every trace kept, when the T traces (T * B * N_in * N_out
            elements) take at most keep_all_traces_bytes(device) bytes (CUDA: 2 GiB; CPU: 0, i.e. always
            checkpoint; PLASTIC_OPS_KEEP_TRACES_BYTES overrides both), else K = round(sqrt(T)). Only used
            when a gradient is needed.
        trace_dtype: the dtype the trace (and its checkpoints) is stored in. None: the dtype of `trace`
            when one is given, else float32 (float64 for float64 inputs). torch.bfloat16 halves the
            trace's memory traffic for float32 and 16-bit inputs, at the cost of rounding H after each
            step (docs/op_spec.md, "Dtypes": when it is safe).

    Dtypes: x, w, alpha, eta, bias, modulation share one dtype, float64, float32, bfloat16 or float16;
    16-bit inputs are computed in float32 and y is returned in their dtype. Under torch.autocast the
    inputs are cast to the autocast dtype, as for a matmul; the trace keeps its dtype.

    Returns:
        (y, trace_T): y is (T, B, N_out) in the inputs' dtype; trace_T is (B, N_in, N_out) in the trace's
        dtype, to continue the episode later.
    """
    dtype = _autocast.region_dtype(x)
    if dtype is not None:
        x, w, alpha, eta, bias, modulation = _autocast.cast(dtype, x, w, alpha, eta, bias, modulation)
        with _autocast.disabled(x):
            return plastic_linear(x, w, alpha, eta, trace, bias, rule=rule, activation=activation, clip=clip,
                                  modulation=modulation, checkpoint_every=checkpoint_every, trace_dtype=trace_dtype)
    p = check_linear(x, w, alpha, eta, trace, bias, rule=rule, activation=activation, clip=clip,
                     modulation=modulation, checkpoint_every=checkpoint_every, trace_dtype=trace_dtype)
    if _needs_reference(p.x, p.w, p.alpha, p.eta, p.trace, p.bias, p.modulation):
        return reference._scan(p, recurrent=False)
    needs_grad = _any_requires_grad(p.x, p.w, p.alpha, p.eta, p.trace, p.bias, p.modulation)
    alpha_c, e, drive, K = _canonical(p, False, needs_grad)
    y, hT, _ = _op("plastic_linear_forward")(p.x.contiguous(), drive, p.w.contiguous(), alpha_c, e,
                                            p.trace.contiguous(), p.rule, p.activation, p.clip, K)
    return y, hT


def plastic_rnn(u, w, alpha, eta, trace=None, y0=None, bias=None, *, rule="hebb", activation="tanh", clip=None,
                modulation=None, checkpoint_every=None, trace_dtype=None):
    """Run T steps of a plastic recurrent layer of N units for B independent episodes.

    a_t = y_{t-1} @ (w + alpha * H_t) + u_t + bias,  y_t = act(a_t),
    H_{t+1} = rule(H_t, y_{t-1}, y_t, eta * modulation_t),  y_{-1} = y0 (zeros when None).

    Args are those of :func:`plastic_linear` with u: (T, B, N) the external drive, w: (N, N)
    and y0: (B, N) the output before the first step. Returns (y, trace_T); pass y[-1] as y0
    and trace_T as trace to continue an episode. Dtypes and autocast: as for :func:`plastic_linear`
    (y0 has the inputs' dtype).
    """
    dtype = _autocast.region_dtype(u)
    if dtype is not None:
        u, w, alpha, eta, y0, bias, modulation = _autocast.cast(dtype, u, w, alpha, eta, y0, bias, modulation)
        with _autocast.disabled(u):
            return plastic_rnn(u, w, alpha, eta, trace, y0, bias, rule=rule, activation=activation, clip=clip,
                               modulation=modulation, checkpoint_every=checkpoint_every, trace_dtype=trace_dtype)
    p = check_rnn(u, w, alpha, eta, trace, y0, bias, rule=rule, activation=activation, clip=clip,
                  modulation=modulation, checkpoint_every=checkpoint_every, trace_dtype=trace_dtype)
    if _needs_reference(p.x, p.w, p.alpha, p.eta, p.trace, p.bias, p.modulation, p.y0):
        return reference._scan(p, recurrent=True)
    needs_grad = _any_requires_grad(p.x, p.w, p.alpha, p.eta, p.trace, p.bias, p.modulation, p.y0)
    alpha_c, e, drive, K = _canonical(p, True, needs_grad)
    y, hT, _ = _op("plastic_rnn_forward")(p.y0.contiguous(), drive, p.w.contiguous(), alpha_c, e,
                                         p.trace.contiguous(), p.rule, p.activation, p.clip, K)
    return y, hT


# ---------------------------------------------------------------------------------------------
# Registration: fake (meta) kernels for torch.compile, and autograd through the backward ops.

def _differentiable_backward(recurrent, inputs, needs_input_grad, grad_y, grad_hT, meta):
    """The backward as differentiable PyTorch ops, for create_graph=True (double backward).

    Reruns the forward with the reference on the op's own inputs (which carry their graph) and
    differentiates it with create_graph=True: exact second derivatives, at the reference's
    time and memory (every trace is kept).
    """
    rule, activation, clip, _ = meta
    wanted = [i for i, needed in enumerate(needs_input_grad) if needed]
    grads = [None] * 10
    if not wanted:
        return tuple(grads)
    y, hT = reference.scan(*inputs, rule, activation, clip, recurrent)
    found = torch.autograd.grad((y, hT), [inputs[i] for i in wanted], (grad_y, grad_hT), create_graph=True,
                                allow_unused=True)
    for i, g in zip(wanted, found):
        grads[i] = g
    return tuple(grads)


def _register():
    def fake_forward(pre, drive, w, alpha, e, h0, rule, activation, clip, K):
        T, B, n_out = drive.shape
        C = num_checkpoints(T, K)
        return (drive.new_empty(T, B, n_out), h0.new_empty(h0.shape),
                h0.new_empty((C,) + tuple(h0.shape)))

    def fake_backward(grad_y, grad_hT, pre, w, alpha, e, y, ckpts, rule, activation, clip, K):
        # grad_hT may be the empty stand-in for zeros: the trace's shape comes from y and w, its dtype
        # from the checkpoints
        return (pre.new_empty(pre.shape), y.new_empty(y.shape), w.new_empty(w.shape),
                alpha.new_empty(alpha.shape), e.new_empty(e.shape), ckpts.new_empty((y.shape[1],) + tuple(w.shape)))

    for form in ("plastic_linear", "plastic_rnn"):
        torch.library.register_fake(f"plastic_ops::{form}_forward")(fake_forward)
        torch.library.register_fake(f"plastic_ops::{form}_backward")(fake_backward)

        def setup_context(ctx, inputs, output, form=form):
            pre, drive, w, alpha, e, h0, rule, activation, clip, K = inputs
            y, hT, ckpts = output
            ctx.no_checkpoints = K == 0  # the forward saved nothing for a backward
            # An output that gets no gradient stays None: no zeros the size of the checkpoints
            # (never differentiated) or of the final trace are built for the backward
            ctx.set_materialize_grads(False)
            # drive and h0 only serve a double backward; h0 equals ckpts[0] unless it has a graph
            ctx.save_for_backward(pre, w, alpha, e, y, ckpts, drive, h0 if h0.requires_grad else None)
            ctx.meta = (rule, activation, clip, K)

        def backward(ctx, grad_y, grad_hT, grad_ckpts, form=form):
            if ctx.no_checkpoints:
                raise RuntimeError("plastic_ops: the forward ran without checkpoints (checkpoint_every=0), "
                                   "so it cannot be differentiated; call the public function instead")
            pre, w, alpha, e, y, ckpts, drive, h0 = ctx.saved_tensors
            rule, activation, clip, K = ctx.meta
            if grad_y is None:
                grad_y = torch.zeros_like(y)
            if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
                if grad_hT is None:
                    grad_hT = ckpts.new_zeros(ckpts.shape[1:])
                h0 = ckpts[0] if h0 is None else h0
                return _differentiable_backward(form == "plastic_rnn", (pre, drive, w, alpha, e, h0),
                                                ctx.needs_input_grad[:6], grad_y, grad_hT, ctx.meta)
            if grad_hT is None:  # an empty tensor stands for dL/dH_T = 0: no trace of zeros is built here
                grad_hT = ckpts.new_empty(0)
            grads = getattr(torch.ops.plastic_ops, f"{form}_backward")(
                grad_y.contiguous(), grad_hT.contiguous(), pre, w, alpha, e, y, ckpts, rule, activation, clip, K)
            g_pre, g_drive, g_w, g_alpha, g_e, g_h0 = grads
            return g_pre, g_drive, g_w, g_alpha, g_e, g_h0, None, None, None, None

        torch.library.register_autograd(f"plastic_ops::{form}_forward", backward, setup_context=setup_context)


if _OPS_LOADED:
    _register()
