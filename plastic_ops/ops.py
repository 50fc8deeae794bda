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

import os
from typing import Optional

import torch
from torch.autograd import forward_ad

from . import _autocast, _extension, reference
from ._validation import (PlasticArgs, check_drive, check_linear, check_neuromodulation, check_return_traces,
                          check_rnn)

_OPS_LOADED = _extension.load()


# ---------------------------------------------------------------------------------------------
# The memory policy of checkpoint_every=None (docs/op_spec.md, "Checkpointing and the memory
# policy"). Everything here runs while torch.compile traces a call, on every supported torch:
# integer arithmetic only (no math.sqrt of a symbolic T), no environment read per call, and no
# device query while tracing.

#: Byte limits by device type under which every trace is kept (K = 1), where the device's memory
#: is not queried. 0 on the CPU, where writing T traces into freshly allocated memory (page
#: faults, no caching allocator) measured slower than recomputing segments (benchmarks/RESULTS.md,
#: "Fused backward").
#: On CUDA under torch.compile, which does not query the device, every trace is kept up to 2 GiB.
KEEP_ALL_TRACES_BYTES = {"cpu": 0, "cuda": 2 * 2**30}

#: On CUDA every trace is kept while the T traces take at most this fraction of the memory the
#: device can still give (its free memory plus what torch's caching allocator holds unused).
CUDA_KEEP_FRACTION = 0.5

_ENV_VAR = "PLASTIC_OPS_KEEP_TRACES_BYTES"


def _parse_limit(value: Optional[str]):
    """(limit, error) from the environment variable's text: one of the two is None."""
    if value is None:
        return None, None
    try:
        limit = int(value)
    except ValueError:
        limit = -1
    if limit < 0:
        return None, f"{_ENV_VAR} must be a number of bytes >= 0, got {value!r}"
    return limit, None


# Read once, when plastic_ops is imported: dynamo cannot fold an environment read inside traced
# code on torch 2.4. set_keep_traces_bytes changes it afterwards.
_LIMIT_OVERRIDE, _LIMIT_ERROR = _parse_limit(os.environ.get(_ENV_VAR))


def set_keep_traces_bytes(limit: Optional[int]) -> Optional[int]:
    """Sets the policy's byte limit for every device (None: the device's default); returns the old one.

    The environment variable PLASTIC_OPS_KEEP_TRACES_BYTES sets its initial value when plastic_ops is
    imported. A compiled graph depends on the value it was traced with and is retraced when it changes.
    """
    global _LIMIT_OVERRIDE, _LIMIT_ERROR
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a number of bytes >= 0, got {limit!r}")
    old = _LIMIT_OVERRIDE
    _LIMIT_OVERRIDE, _LIMIT_ERROR = limit, None
    return old


#: The last answer of the device query, by device index: what a call under CUDA graph capture uses,
#: since a capture must not ask the driver (the recipe's warm-up calls have filled it).
_LAST_AVAILABLE: dict = {}


def cuda_available_bytes(index: int) -> int:
    """Bytes that CUDA device `index` can still give to new tensors: its free memory plus what torch's
    caching allocator holds unused. Tests replace it (monkeypatch) to exercise the CUDA policy anywhere."""
    if torch.cuda.is_current_stream_capturing():
        if index in _LAST_AVAILABLE:
            return _LAST_AVAILABLE[index]
        return torch.cuda.get_device_properties(index).total_memory - torch.cuda.memory_allocated(index)
    free, _ = torch.cuda.mem_get_info(index)
    available = free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    _LAST_AVAILABLE[index] = available
    return available


def _queries_device(device) -> bool:
    # torch.compile cannot run the query on every supported torch (dynamo 2.4 and 2.5 have no working
    # way to call it once at trace time): a compiled call uses KEEP_ALL_TRACES_BYTES["cuda"] instead
    return device.type == "cuda" and not _is_compiling()


def keep_all_traces_bytes(device="cpu") -> int:
    """The policy's byte limit: every trace is kept while the T traces take at most this many bytes.

    set_keep_traces_bytes (or PLASTIC_OPS_KEEP_TRACES_BYTES) when set, for every device; else on CUDA
    CUDA_KEEP_FRACTION of cuda_available_bytes (under torch.compile KEEP_ALL_TRACES_BYTES["cuda"]),
    elsewhere KEEP_ALL_TRACES_BYTES of the device type.
    """
    if _LIMIT_ERROR is not None:
        raise ValueError(_LIMIT_ERROR)
    if _LIMIT_OVERRIDE is not None:
        return _LIMIT_OVERRIDE
    device = torch.device(device) if isinstance(device, str) else device
    if _queries_device(device):
        return int(CUDA_KEEP_FRACTION * cuda_available_bytes(_index(device)))
    return KEEP_ALL_TRACES_BYTES.get(device.type, 0)


def _index(device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def isqrt(n):
    """floor(sqrt(n)) for an integer n >= 0, by bisection on integers.

    Exact at any size, and traceable when n is symbolic (torch.compile's dynamic shapes): every step
    is an integer comparison, a guard that each torch's dynamo can evaluate.
    """
    lo, hi = 0, 1
    while hi * hi <= n:
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid * mid <= n:
            lo = mid
        else:
            hi = mid
    return lo


def default_checkpoint_every(T) -> int:
    """K = round(sqrt(T)), at least 1: memory of C = ceil(T/K) saved traces plus K recomputed ones is about minimal.

    round(sqrt(T)) = k exactly when k^2 - k < T <= k^2 + k, so no float is needed.
    """
    k = isqrt(T)
    if T > k * k + k:
        k += 1
    return max(1, k)


def num_checkpoints(T, K):
    return 0 if K == 0 else -(-T // K)


def traces_held(T, K):
    """Traces the backward holds at once at interval K: the C checkpoints, K - 1 recomputed, 2 working."""
    return num_checkpoints(T, K) + (K - 1) + 2


def fewest_traces_every(T) -> int:
    """The largest K for which traces_held(T, K) is smallest (the largest: the forward writes fewest checkpoints).

    The fewest of ceil(T/K) + K over integers K is m = ceil(2 sqrt(T)), reached exactly when
    K (m - K) >= T: integer arithmetic again.
    """
    m = isqrt(4 * T - 1) + 1
    K = (m + isqrt(m * m - 4 * T) + 1) // 2
    while K * (m - K) < T:
        K -= 1
    return max(1, min(K, T))


def _format_bytes(n) -> str:
    return f"{n / 2**30:.2f} GiB ({n} bytes)"


def choose_checkpoint_every(T, trace_bytes, limit=None, device="cpu", available=None, batch=None,
                            trace_dtype=None):
    """The memory policy of checkpoint_every=None (docs/op_spec.md, "Checkpointing").

    trace_bytes is the size of one trace (B * N_in * N_out elements). K = 1 (every trace kept: no
    recompute in the backward) when the T traces fit in `limit` bytes (default:
    keep_all_traces_bytes(device)). Else, on the CPU (or any device whose memory is not queried)
    K = round(sqrt(T)); on CUDA the K whose backward holds the fewest traces, and when even those
    exceed what the device can give (not checked under torch.compile), a torch.cuda.OutOfMemoryError
    that says what would fit.
    `available` replaces the CUDA query (cuda_available_bytes); `batch` (B) and `trace_dtype` only
    make that error more precise.
    """
    device = torch.device(device) if isinstance(device, str) else device
    if limit is None:
        limit = keep_all_traces_bytes(device)
    if T * trace_bytes <= limit:
        return 1
    if device.type != "cuda":
        return default_checkpoint_every(T)
    K = fewest_traces_every(T)
    if available is None and _queries_device(device):
        available = cuda_available_bytes(_index(device))
    needed = traces_held(T, K) * trace_bytes
    if available is not None and needed > available:
        raise torch.cuda.OutOfMemoryError(_does_not_fit(T, K, trace_bytes, needed, available, batch, trace_dtype))
    return K


def _does_not_fit(T, K, trace_bytes, needed, available, batch, trace_dtype) -> str:
    held = traces_held(T, K)
    what = [f"the backward of T = {T} steps holds at least {held} traces"
            + ("" if trace_dtype is None else f" ({trace_dtype})")
            + f" of {_format_bytes(trace_bytes)} each, at checkpoint_every = {K} (the interval that holds "
            f"the fewest): {_format_bytes(needed)}, but the device can give {_format_bytes(available)}"]
    fits = []
    if batch is not None:
        fits.append(f"a batch of at most {available // (held * (trace_bytes // batch))} episodes (B = {batch} now)")
    if trace_dtype == torch.float32:
        fits.append("trace_dtype=torch.bfloat16 (half the bytes)")
    fits.append("shorter sequences (calls of fewer steps, the trace passed on)")
    return (f"plastic_ops: {what[0]}. What would fit: {'; or '.join(fits)}. An explicit checkpoint_every=K "
            f"holds ceil(T/K) + K + 1 traces.")


def _canonical(p: PlasticArgs, recurrent: bool, needs_grad: bool, drive=None, every_trace: bool = False):
    """(alpha, e, d, K) of the compiled ops; drive: the linear form's user drive or None. every_trace:
    K = 1 whatever is asked, since its checkpoints are the carried traces (return_traces)."""
    alpha = p.alpha.expand(p.n_in, p.n_out).contiguous()
    if p.modulation is None:
        e = p.eta.expand(p.T, p.B, p.n_out).contiguous()
    else:
        e = (p.eta * p.modulation.expand(p.T, p.B, p.n_out)).contiguous()
    drive = reference._drive(p, recurrent, drive)
    if drive is None:
        drive = p.x.new_zeros(p.T, p.B, p.n_out)
    drive = drive.contiguous()
    if every_trace:
        return alpha, e, drive, 1
    # K > T saves the same single checkpoint as K = T; clamping keeps every count small
    if p.checkpoint_every is not None:
        K = min(p.checkpoint_every, p.T)
    else:
        planes = 1 if p.elig_rate is None else 2  # H, and E with eligibility traces
        K = choose_checkpoint_every(p.T, planes * p.B * p.n_in * p.n_out * p.trace.element_size(), device=p.x.device,
                                    batch=p.B, trace_dtype=p.trace.dtype)
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
                   modulation=None, checkpoint_every=None, trace_dtype=None, reset=None, lengths=None, drive=None,
                   return_traces=False, mod_weight=None, mod_bias=None, mod_fanout_weight=None, mod_fanout_bias=None,
                   eligibility=None, eligibility_eta=None):
    """Run T plastic steps of a feedforward layer for B independent episodes.

    a_t = x_t @ (w + alpha * H_t) + bias + drive_t,  y_t = act(a_t),  H_{t+1} = rule(H_t, x_t, y_t, eta * modulation_t).

    Args:
        x: (T, B, N_in) inputs.
        w: (N_in, N_out) fixed weights.
        alpha: plasticity coefficients: 0-dim or (1, 1), (N_in, 1), (1, N_out) or (N_in, N_out).
        eta: 0-dim tensor (or Python number), the plasticity rate.
        trace: (B, N_in, N_out) initial Hebbian trace; zeros when None.
        bias: (N_out,) or None.
        rule: "hebb", "oja" or "add" (H_{t+1} = H_t + r_t * inc_t, no decay: Backpropamine's rule).
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
        reset: None or a (T, B) bool tensor on x's device: where reset[t, b], row b starts a new episode at
            step t (its trace becomes zeros first).
        lengths: None or a (B,) integer tensor (on the CPU or x's device), 1 <= lengths[b] <= T: row b runs
            steps 0 .. lengths[b] - 1 only; y is zero after them and trace_T[b] is the trace after them.
            Gradients never cross a reset or a row's end (docs/op_spec.md, "Episode resets and lengths").
        drive: None or (T, B, N_out): an input added to the pre-activation at each step, differentiable.
        return_traces: also return `traces` (T, B, N_in, N_out), traces[t] the trace after step t (T times
            the memory of one trace; detached: no gradient flows through it). The fused op then keeps
            every trace (checkpoint_every is ignored).
        mod_weight, mod_bias, mod_fanout_weight, mod_fanout_bias: self-generated modulation (Backpropamine):
            (N_out,), (), (N_out,), (N_out,); the first and third together, the biases default to 0. Each step
            then multiplies its rates by M_t = mod_fanout_weight * tanh(y_t . mod_weight + mod_bias) +
            mod_fanout_bias, computed from that step's output inside the op.
        eligibility_eta: None, or the 0-dim rate q of an eligibility trace E (rules "hebb" and "add"): the
            update writes E_t into the trace instead of x_t y_t^T, and E_{t+1} = (1 - q) E_t + q x_t y_t^T.
        eligibility: E_0, (B, N_in, N_out) in the trace's dtype; zeros when None (needs eligibility_eta).
            docs/op_spec.md, "Neuromodulation".

    Dtypes: x, w, alpha, eta, bias, modulation and drive share one dtype, float64, float32, bfloat16 or float16;
    16-bit inputs are computed in float32 and y is returned in their dtype. Under torch.autocast the
    inputs are cast to the autocast dtype, as for a matmul; the trace keeps its dtype.

    Returns:
        (y, trace_T): y is (T, B, N_out) in the inputs' dtype; trace_T is (B, N_in, N_out) in the trace's
        dtype, to continue the episode later. (y, trace_T, eligibility_T) with eligibility_eta; `traces`
        last with return_traces=True.
    """
    neuro = dict(mod_weight=mod_weight, mod_bias=mod_bias, mod_fanout_weight=mod_fanout_weight,
                 mod_fanout_bias=mod_fanout_bias, eligibility=eligibility, eligibility_eta=eligibility_eta)
    dtype = _autocast.region_dtype(x)
    if dtype is not None:
        x, w, alpha, eta, bias, modulation, drive = _autocast.cast(dtype, x, w, alpha, eta, bias, modulation, drive)
        with _autocast.disabled(x):
            return plastic_linear(x, w, alpha, eta, trace, bias, rule=rule, activation=activation, clip=clip,
                                  modulation=modulation, checkpoint_every=checkpoint_every, trace_dtype=trace_dtype,
                                  reset=reset, lengths=lengths, drive=drive, return_traces=return_traces,
                                  **reference.cast_neuro(dtype, neuro))
    p = check_linear(x, w, alpha, eta, trace, bias, rule=rule, activation=activation, clip=clip,
                     modulation=modulation, checkpoint_every=checkpoint_every, trace_dtype=trace_dtype,
                     reset=reset, lengths=lengths)
    p = check_neuromodulation(p, "x", **neuro)
    drive = check_drive(drive, p)
    return_traces = check_return_traces(return_traces)
    inputs = (p.x, p.w, p.alpha, p.eta, p.trace, p.bias, p.modulation, drive, p.mod, p.elig_rate, p.eligibility)
    if _needs_reference(*inputs):
        return reference._scan(p, recurrent=False, drive=drive, return_traces=return_traces)
    needs_grad = _any_requires_grad(*inputs)
    alpha_c, e, d, K = _canonical(p, False, needs_grad, drive, every_trace=return_traces)
    out = _op("plastic_linear_forward")(p.x.contiguous(), d, p.w.contiguous(), alpha_c, e,
                                       p.state.contiguous(), p.rule, p.activation, p.clip, K, *_extra(p))
    return _outputs(out, return_traces, p)


def _extra(p: PlasticArgs):
    """The trailing optional arguments of the compiled ops (steps, mod, elig_rate): those that are None at
    the end are left out (the schema's defaults), so a call without resets, lengths or neuromodulation is
    the call the ops had before them."""
    return _trailing(p.steps, p.mod, p.elig_rate)


def _outputs(out, return_traces: bool, p: PlasticArgs):
    """(y, trace_T[, eligibility_T]), and with return_traces the carried traces: the K = 1 checkpoints
    H_0 .. H_{T-1} are H_1 .. H_{T-1} after their first, then H_T (docs/op_spec.md, "Episode resets and
    lengths"); with eligibility traces, their H planes."""
    y, hT, ckpts = out
    traces = None
    if return_traces:
        planes = ckpts if p.elig_rate is None else ckpts[:, 0]
        last = hT if p.elig_rate is None else hT[0]
        traces = torch.cat([planes[1:].detach(), last.detach().unsqueeze(0)])
    return reference.unpack(y, hT, traces, p)


def plastic_rnn(u, w, alpha, eta, trace=None, y0=None, bias=None, *, rule="hebb", activation="tanh", clip=None,
                modulation=None, checkpoint_every=None, trace_dtype=None, reset=None, lengths=None,
                return_traces=False, mod_weight=None, mod_bias=None, mod_fanout_weight=None, mod_fanout_bias=None,
                eligibility=None, eligibility_eta=None):
    """Run T steps of a plastic recurrent layer of N units for B independent episodes.

    a_t = y_{t-1} @ (w + alpha * H_t) + u_t + bias,  y_t = act(a_t),
    H_{t+1} = rule(H_t, y_{t-1}, y_t, eta * modulation_t),  y_{-1} = y0 (zeros when None).

    Args are those of :func:`plastic_linear` with u: (T, B, N) the external drive, w: (N, N)
    and y0: (B, N) the output before the first step. Returns (y, trace_T); pass y[-1] as y0
    and trace_T as trace to continue an episode. Dtypes and autocast: as for :func:`plastic_linear`
    (y0 has the inputs' dtype). reset, lengths and return_traces: as for :func:`plastic_linear`; a reset
    also sets the row's recurrent input y_{t-1} to zeros. Neuromodulation (mod_*, eligibility,
    eligibility_eta): as for :func:`plastic_linear`, with p_t = y_{t-1} the presynaptic vector.
    """
    neuro = dict(mod_weight=mod_weight, mod_bias=mod_bias, mod_fanout_weight=mod_fanout_weight,
                 mod_fanout_bias=mod_fanout_bias, eligibility=eligibility, eligibility_eta=eligibility_eta)
    dtype = _autocast.region_dtype(u)
    if dtype is not None:
        u, w, alpha, eta, y0, bias, modulation = _autocast.cast(dtype, u, w, alpha, eta, y0, bias, modulation)
        with _autocast.disabled(u):
            return plastic_rnn(u, w, alpha, eta, trace, y0, bias, rule=rule, activation=activation, clip=clip,
                               modulation=modulation, checkpoint_every=checkpoint_every, trace_dtype=trace_dtype,
                               reset=reset, lengths=lengths, return_traces=return_traces,
                               **reference.cast_neuro(dtype, neuro))
    p = check_rnn(u, w, alpha, eta, trace, y0, bias, rule=rule, activation=activation, clip=clip,
                  modulation=modulation, checkpoint_every=checkpoint_every, trace_dtype=trace_dtype,
                  reset=reset, lengths=lengths)
    p = check_neuromodulation(p, "u", **neuro)
    return_traces = check_return_traces(return_traces)
    inputs = (p.x, p.w, p.alpha, p.eta, p.trace, p.bias, p.modulation, p.y0, p.mod, p.elig_rate, p.eligibility)
    if _needs_reference(*inputs):
        return reference._scan(p, recurrent=True, return_traces=return_traces)
    needs_grad = _any_requires_grad(*inputs)
    alpha_c, e, drive, K = _canonical(p, True, needs_grad, every_trace=return_traces)
    out = _op("plastic_rnn_forward")(p.y0.contiguous(), drive, p.w.contiguous(), alpha_c, e,
                                    p.state.contiguous(), p.rule, p.activation, p.clip, K, *_extra(p))
    return _outputs(out, return_traces, p)


# ---------------------------------------------------------------------------------------------
# Registration: fake (meta) kernels for torch.compile, and autograd through the backward ops.

def _differentiable_backward(recurrent, inputs, needs_input_grad, grad_y, grad_hT, meta, num_inputs):
    """The backward as differentiable PyTorch ops, for create_graph=True (double backward).

    Reruns the forward with the reference on the op's own inputs (which carry their graph) and
    differentiates it with create_graph=True: exact second derivatives, at the reference's
    time and memory (every trace is kept).
    """
    rule, activation, clip, _, steps, mod, elig_rate = meta
    wanted = [i for i, needed in enumerate(needs_input_grad) if needed]
    grads = [None] * num_inputs
    if not wanted:
        return tuple(grads)
    y, hT = reference.scan(*inputs[:6], rule, activation, clip, recurrent, steps, mod=inputs[6],
                           elig_rate=inputs[7])
    found = torch.autograd.grad((y, hT), [inputs[i] for i in wanted], (grad_y, grad_hT), create_graph=True,
                                allow_unused=True)
    for i, g in zip(wanted, found):
        grads[i] = g
    return tuple(grads)


def _register():
    def fake_forward(pre, drive, w, alpha, e, h0, rule, activation, clip, K, steps=None, mod=None, elig_rate=None):
        T, B, n_out = drive.shape
        C = num_checkpoints(T, K)
        return (drive.new_empty(T, B, n_out), h0.new_empty(h0.shape),
                h0.new_empty((C,) + tuple(h0.shape)))

    def fake_backward(grad_y, grad_hT, pre, w, alpha, e, y, ckpts, rule, activation, clip, K, steps=None, mod=None,
                      elig_rate=None):
        # grad_hT may be the empty stand-in for zeros: the trace's shape and dtype come from the checkpoints
        return (pre.new_empty(pre.shape), y.new_empty(y.shape), w.new_empty(w.shape),
                alpha.new_empty(alpha.shape), e.new_empty(e.shape), ckpts.new_empty(ckpts.shape[1:]),
                y.new_empty(0) if mod is None else mod.new_empty(mod.shape),
                y.new_empty(0) if elig_rate is None else elig_rate.new_empty(()))

    for form in ("plastic_linear", "plastic_rnn"):
        torch.library.register_fake(f"plastic_ops::{form}_forward")(fake_forward)
        torch.library.register_fake(f"plastic_ops::{form}_backward")(fake_backward)

        def setup_context(ctx, inputs, output, form=form):
            pre, drive, w, alpha, e, h0, rule, activation, clip, K = inputs[:10]
            # whether the defaults are filled in depends on torch
            steps, mod, elig_rate = (tuple(inputs[10:13]) + (None, None, None))[:3]
            ctx.num_inputs = len(inputs)
            y, hT, ckpts = output
            ctx.no_checkpoints = K == 0  # the forward saved nothing for a backward
            # An output that gets no gradient stays None: no zeros the size of the checkpoints
            # (never differentiated) or of the final trace are built for the backward
            ctx.set_materialize_grads(False)
            # drive and h0 only serve a double backward; h0 equals ckpts[0] unless it has a graph
            ctx.save_for_backward(pre, w, alpha, e, y, ckpts, drive, h0 if h0.requires_grad else None, steps, mod,
                                  elig_rate)
            ctx.meta = (rule, activation, clip, K)

        def backward(ctx, grad_y, grad_hT, grad_ckpts, form=form):
            if ctx.no_checkpoints:
                raise RuntimeError("plastic_ops: the forward ran without checkpoints (checkpoint_every=0), "
                                   "so it cannot be differentiated; call the public function instead")
            pre, w, alpha, e, y, ckpts, drive, h0, steps, mod, elig_rate = ctx.saved_tensors
            rule, activation, clip, K = ctx.meta
            if grad_y is None:
                grad_y = torch.zeros_like(y)
            if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
                if grad_hT is None:
                    grad_hT = ckpts.new_zeros(ckpts.shape[1:])
                h0 = ckpts[0] if h0 is None else h0
                grads = _differentiable_backward(form == "plastic_rnn", (pre, drive, w, alpha, e, h0, mod, elig_rate),
                                                 ctx.needs_input_grad[:6] + _needs(ctx, 11, 12), grad_y, grad_hT,
                                                 ctx.meta + (steps, mod, elig_rate), 8)
                return _input_grads(grads, ctx.num_inputs)
            if grad_hT is None:  # an empty tensor stands for dL/dH_T = 0: no trace of zeros is built here
                grad_hT = ckpts.new_empty(0)
            grads = getattr(torch.ops.plastic_ops, f"{form}_backward")(
                grad_y.contiguous(), grad_hT.contiguous(), pre, w, alpha, e, y, ckpts, rule, activation, clip, K,
                *_trailing(steps, mod, elig_rate))
            grads = list(grads)
            grads[6] = grads[6] if mod is not None else None
            grads[7] = grads[7] if elig_rate is not None else None
            return _input_grads(grads, ctx.num_inputs)

        _register_autograd(f"plastic_ops::{form}_forward", backward, setup_context)


def _needs(ctx, *indices):
    return tuple(i < len(ctx.needs_input_grad) and ctx.needs_input_grad[i] for i in indices)


def _input_grads(grads, num_inputs):
    """The gradients of (pre, drive, w, alpha, e, h0, mod, elig_rate) placed at the forward's input indices:
    h0 is input 5, then rule, activation, clip, K and steps get none, mod is input 11, elig_rate 12."""
    out = tuple(grads[:6]) + (None,) * 5 + (grads[6], grads[7])
    return out[:num_inputs]


def _trailing(*args):
    """Optional trailing arguments with the Nones at the end left out (the schema's defaults)."""
    args = list(args)
    while args and args[-1] is None:
        args.pop()
    return tuple(args)


_FORWARD_AD_REFUSED = ("plastic_ops: forward-mode AD is not supported by torch.ops.plastic_ops.*; call "
                       "plastic_ops.plastic_linear / plastic_rnn, which run the reference for dual tensors")
_LIBRARIES = []  # an implementation lives as long as its Library object


def _has_tangent(t) -> bool:
    return (isinstance(t, torch.Tensor) and getattr(forward_ad, "_current_level", -1) >= 0
            and forward_ad.unpack_dual(t).tangent is not None)


def _register_autograd(qualname: str, backward, setup_context) -> None:
    # torch 2.5 and newer call the kernels directly when no input requires a gradient, where the compiled
    # kernels refuse a dual tensor with the package's message. torch 2.4 always goes through the
    # autograd.Function that register_autograd makes, which fails with torch's own "You must implement
    # the jvp function": there the same kernel is registered with the package's check in front.
    if torch.torch_version.TorchVersion(torch.__version__) >= (2, 5):
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        return
    from torch._library import autograd as library_autograd, utils as library_utils
    op = library_utils.lookup_op(qualname)
    kernel = library_autograd.make_autograd_impl(op, library_autograd.Info(backward, setup_context))

    def checked(keyset, *args, **kwargs):
        if any(_has_tangent(a) for a in args):
            raise RuntimeError(_FORWARD_AD_REFUSED)
        return kernel(keyset, *args, **kwargs)

    namespace, name = qualname.split("::")
    library = torch.library.Library(namespace, "FRAGMENT")
    _LIBRARIES.append(library)
    library.impl(name, checked, "Autograd", with_keyset=True)


if _OPS_LOADED:
    _register()
