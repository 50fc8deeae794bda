"""Error of each input and trace dtype against float64: outputs, final trace and every gradient.

    python -m benchmarks.dtype_accuracy [--n 1000] [--steps 106] [--batch 2] [--seeds 0 1 2] [--threads N]

One plastic_rnn forward+backward (tanh, hebb, per-synapse alpha, learned eta, a random upstream
gradient of y and of the final trace) from the same float64 values, rounded to each variant's
dtype, against the fused op in float64 (which matches the float64 reference to about 1e-12, see
tests/). Two settings: the benchmarks' scales (alpha a tenth of w), and alpha as large as w, where
the trace weighs as much as the fixed weights. The figure is max|v - v64| / max|v64| per tensor,
the worst over the seeds. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import sys

import torch

import plastic_ops

# name: (dtype of the inputs and parameters, trace_dtype)
VARIANTS = {
    "float32": (torch.float32, None),
    "float32, bfloat16 trace": (torch.float32, torch.bfloat16),
    "bfloat16, float32 trace": (torch.bfloat16, None),
    "bfloat16, bfloat16 trace": (torch.bfloat16, torch.bfloat16),
    "float16, float32 trace": (torch.float16, None),
}
SETTINGS = {"alpha = w / 10": 0.1, "alpha = w": 1.0}
TENSORS = ("y", "H_T", "grad u", "grad w", "grad alpha", "grad eta")


def run(values: dict, dtype, trace_dtype) -> dict:
    leaves = {k: v.to(dtype).requires_grad_(k in ("u", "w", "alpha", "eta")) for k, v in values.items()}
    y, h = plastic_ops.plastic_rnn(leaves["u"], leaves["w"], leaves["alpha"], leaves["eta"], trace_dtype=trace_dtype)
    grads = torch.autograd.grad((y, h), [leaves[k] for k in ("u", "w", "alpha", "eta")],
                                (leaves["grad_y"].to(y.dtype), leaves["grad_h"].to(h.dtype)))
    return {name: t.detach().double() for name, t in zip(TENSORS, (y, h) + grads)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=106)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    N, T, B = a.n, a.steps, a.batch
    worst = {(s, v): dict.fromkeys(TENSORS, 0.0) for s in SETTINGS for v in VARIANTS}
    for setting, alpha_scale in SETTINGS.items():
        for seed in a.seeds:
            g = torch.Generator().manual_seed(seed)
            r = lambda *s, k=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * k  # noqa: E731
            values = dict(u=r(T, B, N, k=0.5), w=r(N, N, k=1 / math.sqrt(N)),
                          alpha=r(N, N, k=alpha_scale / math.sqrt(N)), eta=torch.tensor(0.05, dtype=torch.float64),
                          grad_y=r(T, B, N), grad_h=r(B, N, N))
            ref = run(values, torch.float64, None)
            for name, (dtype, trace_dtype) in VARIANTS.items():
                got = run(values, dtype, trace_dtype)
                for k in TENSORS:
                    err = (got[k] - ref[k]).abs().max().item() / ref[k].abs().max().item()
                    worst[setting, name][k] = max(worst[setting, name][k], err)
                print(f"{setting} seed {seed} {name}: " + ", ".join(f"{k} {worst[setting, name][k]:.2e}"
                                                                   for k in TENSORS), file=sys.stderr, flush=True)
    lines = [f"plastic_rnn N = {N}, T = {T}, B = {B}, seeds {a.seeds}: max|v - v64| / max|v64|, worst over the seeds",
             "",
             f"- command: `python -m benchmarks.dtype_accuracy {shlex.join(sys.argv[1:])}`",
             f"- machine: {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             "| setting | inputs, trace | " + " | ".join(TENSORS) + " |", "|---|---|" + "---|" * len(TENSORS)]
    for (setting, name), errs in worst.items():
        lines.append(f"| {setting} | {name} | " + " | ".join(f"{errs[k]:.1e}" for k in TENSORS) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
