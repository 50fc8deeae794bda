"""Pure-PyTorch reference of the plastic op: the spec of docs/op_spec.md in code.

Readable on purpose: one Python step per time step, autograd does the backward
(and therefore keeps every trace in memory). The fused op in ``plastic_ops.ops``
must match it in outputs, final trace and every gradient.
"""
from __future__ import annotations

import torch

from ._validation import PlasticArgs, check_linear, check_rnn


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


def update_trace(H, x, y, e, rule: str, clip):
    """One plasticity step. H: (B, N_in, N_out); x: (B, N_in); y, e: (B, N_out)."""
    x = x.unsqueeze(2)
    y = y.unsqueeze(1)
    e = e.unsqueeze(1)
    if rule == "hebb":
        H = (1 - e) * H + e * x * y
    elif rule == "oja":
        H = H + e * y * (x - H * y)
    else:
        raise ValueError(f"unknown rule {rule!r}")
    if clip is not None:
        H = torch.clamp(H, -clip, clip)
    return H


def _rates(p: PlasticArgs) -> torch.Tensor:
    """e_t = eta * modulation_t, broadcast to (T, B, N_out)."""
    if p.modulation is None:
        return p.eta.expand(p.T, p.B, p.n_out)
    return p.eta * p.modulation.expand(p.T, p.B, p.n_out)


def _scan(p: PlasticArgs, recurrent: bool):
    e = _rates(p)
    H = p.trace
    prev = p.y0
    ys = []
    for t in range(p.T):
        pre = prev if recurrent else p.x[t]
        # a_t = pre @ (w + alpha * H_t), per episode
        a = pre @ p.w + torch.einsum("bi,bij->bj", pre, p.alpha * H)
        if recurrent:
            a = a + p.x[t]
        if p.bias is not None:
            a = a + p.bias
        y = activate(a, p.activation)
        H = update_trace(H, pre, y, e[t], p.rule, p.clip)
        ys.append(y)
        prev = y
    return torch.stack(ys), H


def plastic_linear(x, w, alpha, eta, trace=None, bias=None, *, rule="hebb", activation="tanh", clip=None,
                   modulation=None, checkpoint_every=None):
    """Reference of :func:`plastic_ops.plastic_linear`; same arguments, same results."""
    p = check_linear(x, w, alpha, eta, trace, bias, rule=rule, activation=activation, clip=clip,
                     modulation=modulation, checkpoint_every=checkpoint_every)
    return _scan(p, recurrent=False)


def plastic_rnn(u, w, alpha, eta, trace=None, y0=None, bias=None, *, rule="hebb", activation="tanh", clip=None,
                modulation=None, checkpoint_every=None):
    """Reference of :func:`plastic_ops.plastic_rnn`; same arguments, same results."""
    p = check_rnn(u, w, alpha, eta, trace, y0, bias, rule=rule, activation=activation, clip=clip,
                  modulation=modulation, checkpoint_every=checkpoint_every)
    return _scan(p, recurrent=True)
