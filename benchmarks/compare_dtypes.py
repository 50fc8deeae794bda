"""The fused op in float32, with bfloat16 inputs and with a bfloat16 trace: time and peak memory.

    python -m benchmarks.compare_dtypes [--device cpu|cuda] [--batch 8] [--rounds 3] [--threads N] --out DIR

Variants (docs/op_spec.md, "Dtypes"): float32 inputs and trace; bfloat16 inputs (and parameters) with
the default float32 trace; float32 inputs with trace_dtype=torch.bfloat16; bfloat16 inputs with a
bfloat16 trace. Each measurement runs in a fresh child process and the variants alternate, each
round starting with the next one, so that they share the machine's load. Time: one warm-up call, then --calls timed calls per
child; the figure is the median over all rounds. Peak memory: one call in a child of its own; on the
CPU the process's peak resident set (VmHWM, reset just before the call) minus its resident set before
the call, on CUDA torch.cuda.max_memory_allocated minus the memory allocated before the call.
Workload as benchmarks/_harness.py: plastic_rnn forward+backward, tanh, hebb, per-synapse alpha,
learned w, alpha and eta, a random upstream gradient of y, the default checkpoint policy.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
# name: (dtype of the inputs and parameters, trace_dtype)
VARIANTS = {
    "float32": ("float32", None),
    "bfloat16 inputs, float32 trace": ("bfloat16", None),
    "float32 inputs, bfloat16 trace": ("float32", "bfloat16"),
    "bfloat16 inputs, bfloat16 trace": ("bfloat16", "bfloat16"),
}


def _child(variant: str, device: str, batch: int, n: int, steps: int, task: str, calls: int, threads: int) -> dict:
    import gc
    import time

    import torch

    import plastic_ops
    if threads:
        torch.set_num_threads(threads)
    dtype, trace_dtype = (getattr(torch, d) if d else None for d in VARIANTS[variant])
    g = torch.Generator().manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)  # noqa: E731
    x = rand(steps, batch, n, scale=0.5)
    w = rand(n, n, scale=1.0 / math.sqrt(n)).requires_grad_()
    alpha = rand(n, n, scale=0.1 / math.sqrt(n)).requires_grad_()
    eta = torch.tensor(0.05, dtype=dtype, device=device).requires_grad_()
    grad_y = rand(steps, batch, n)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        for p in (w, alpha, eta):
            p.grad = None
        y, _ = plastic_ops.plastic_rnn(x, w, alpha, eta, trace_dtype=trace_dtype)
        torch.autograd.backward(y, grad_y)
        sync()

    if task == "mem":
        # a tiny call first: the one-time set-up of autograd and the thread pool is not the op's memory
        small = [t.detach()[..., :8, :8].clone().requires_grad_() for t in (w, alpha)]
        y, _ = plastic_ops.plastic_rnn(x[:2, :, :8].contiguous(), small[0], small[1], eta, trace_dtype=trace_dtype)
        y.float().sum().backward()
        del y, small
        gc.collect()
        if device == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            return {"peak_bytes": torch.cuda.max_memory_allocated() - before}
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = _status_kib("VmRSS")
        step()
        return {"peak_bytes": (_status_kib("VmHWM") - before) * 1024}
    step()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"times": times, "grad_w_norm": float(w.grad.float().norm())}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.compare_dtypes", "--child", json.dumps(spec)],
                         cwd=HERE, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=106)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=2, help="timed calls per child")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(**json.loads(a.child))))
        return
    if not a.out:
        ap.error("--out is required")
    common = dict(device=a.device, batch=a.batch, n=a.n, steps=a.steps, calls=a.calls, threads=a.threads)
    rows = {name: {"times": []} for name in a.variants}
    for r in range(a.rounds):
        k = r % len(a.variants)  # each round starts with another variant: a drift of the load hits all alike
        for name in a.variants[k:] + a.variants[:k]:
            got = _run_child(dict(variant=name, task="time", **common))
            rows[name]["times"] += got["times"]
            rows[name]["grad_w_norm"] = got["grad_w_norm"]
            print(f"round {r} {name}: {['%.3f' % t for t in got['times']]}", flush=True)
    for name in a.variants:
        rows[name]["peak_bytes"] = _run_child(dict(variant=name, task="mem", **common))["peak_bytes"]
        rows[name]["median_s"] = statistics.median(rows[name]["times"])
    a.out.mkdir(parents=True, exist_ok=True)
    base = rows[a.variants[0]]
    lines = [f"# plastic_rnn forward+backward by dtype, N = {a.n}, T = {a.steps}, B = {a.batch}, {a.device}", "",
             f"- command: `python -m benchmarks.compare_dtypes {shlex.join(sys.argv[1:])}`",
             f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, threads {a.threads or 'default'}; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"load average at the end {os.getloadavg()[0]:.1f}",
             f"- medians of {a.rounds} rounds x {a.calls} calls, each round one fresh process per variant", "",
             f"| variant | time | {a.variants[0]} / variant | peak memory | |grad w| |", "|---|---|---|---|---|"]
    for name in a.variants:
        v = rows[name]
        lines.append(f"| {name} | {v['median_s'] * 1e3:.0f} ms | {base['median_s'] / v['median_s']:.2f}x | "
                     f"{v['peak_bytes'] / 1e6:.0f} MB | {v['grad_w_norm']:.6g} |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    (a.out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
