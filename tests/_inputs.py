"""Random inputs of the plastic op for the tests, with every optional argument switchable."""
from __future__ import annotations

import torch

ALPHA_SHAPES = ("scalar0d", "scalar11", "input", "output", "synapse")


def alpha_shape(kind: str, n_in: int, n_out: int) -> tuple:
    return {"scalar0d": (), "scalar11": (1, 1), "input": (n_in, 1), "output": (1, n_out),
            "synapse": (n_in, n_out)}[kind]


def make_inputs(form: str, T: int, B: int, n_in: int, n_out: int, *, alpha: str = "synapse", modulation=None,
                trace: bool = True, bias: bool = True, y0: bool = True, dtype=torch.float64, device="cpu",
                seed: int = 0, scale: float = 0.5):
    """Returns (positional args, modulation) with requires_grad on every tensor.

    modulation: None, "shared" (T, B, 1) or "per_output" (T, B, N_out).
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (s * torch.randn(tuple(shape), generator=g, dtype=torch.float64)).to(dtype=dtype, device=device) \
            .requires_grad_()

    if form == "rnn":
        n_in = n_out
    x = rnd(T, B, n_in)
    w = rnd(n_in, n_out, s=scale)
    a = rnd(*alpha_shape(alpha, n_in, n_out), s=scale)
    eta = (0.1 + 0.4 * torch.rand((), generator=g, dtype=torch.float64)).to(dtype=dtype, device=device) \
        .requires_grad_()
    h = rnd(B, n_in, n_out, s=0.2) if trace else None
    b = rnd(n_out, s=0.5) if bias else None
    mod = None
    if modulation is not None:
        last = 1 if modulation == "shared" else n_out
        mod = (torch.rand(T, B, last, generator=g, dtype=torch.float64) * 1.5).to(dtype=dtype, device=device) \
            .requires_grad_()
    if form == "rnn":
        args = [x, w, a, eta, h, rnd(B, n_out) if y0 else None, b]
    else:
        args = [x, w, a, eta, h, b]
    return args, mod


def grad_inputs(args, mod):
    return [t for t in list(args) + [mod] if isinstance(t, torch.Tensor) and t.requires_grad]


def of_tensors(fn, args, **kw):
    """fn as a function of the tensors of args followed by the modulation, as gradcheck wants it."""
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def f(*tensors):
        full = list(args)
        for pos, t in zip(positions, tensors[:len(positions)]):
            full[pos] = t
        return fn(*full, modulation=tensors[-1], **kw)

    return f


def run(fn, args, mod, **kw):
    return fn(*args, modulation=mod, **kw)


def loss_of(y, h, seed=123):
    """A loss that weighs every output and every final trace element differently."""
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    gh = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h)
    return (y * gy).sum() + (h * gh).sum()
