"""Two builds of the fused op side by side: forward+backward time and peak memory on the CPU.

    python -m benchmarks.compare_builds --baseline DIR [--batches 1 8] [--rounds 3] [--threads N] --out DIR

DIR is a source tree of another version of plastic_ops with its extension built in place (for
example `git archive <commit> | tar -x -C DIR`, then `setup.py build_ext --inplace` there). Each
measurement runs in a fresh child process that imports plastic_ops from one tree only; children of
every variant alternate round by round, so the ratios are taken under the same machine load. The
variants: the baseline with its default checkpoint interval, and this tree with its default memory
policy and with every trace kept (checkpoint_every=1).

Time: per child one warm-up call, then --calls timed calls; the figure is the median over all
rounds. Peak memory: one call in a child of its own, the process's peak resident set (VmHWM, reset
just before the call) minus its resident set before the call. Workload as benchmarks/_harness.py:
plastic_rnn, tanh, hebb, per-synapse alpha, learned w, alpha and eta, a random upstream gradient of y.
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


def _child(tree: str, batch: int, n: int, steps: int, K, task: str, calls: int, threads: int) -> dict:
    sys.path.insert(0, tree)
    import gc
    import time

    import torch

    import plastic_ops
    assert Path(plastic_ops.__file__).resolve().is_relative_to(Path(tree).resolve()), plastic_ops.__file__
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    rand = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    x = rand(steps, batch, n, scale=0.5)
    w = rand(n, n, scale=1.0 / math.sqrt(n)).requires_grad_()
    alpha = rand(n, n, scale=0.1 / math.sqrt(n)).requires_grad_()
    eta = torch.tensor(0.05).requires_grad_()
    grad_y = rand(steps, batch, n)

    def step():
        for p in (w, alpha, eta):
            p.grad = None
        y, _ = plastic_ops.plastic_rnn(x, w, alpha, eta, checkpoint_every=K)
        torch.autograd.backward(y, grad_y)

    if task == "mem":
        # a tiny call first: the one-time set-up of autograd and the thread pool is not the op's memory
        small = [t.detach()[..., :8, :8].clone().requires_grad_() for t in (w, alpha)]
        y, _ = plastic_ops.plastic_rnn(x[:2, :, :8].contiguous(), small[0], small[1], eta)
        y.sum().backward()
        del y, small
        gc.collect()
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
    return {"times": times, "grad_w_norm": float(w.grad.norm())}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.compare_builds", "--child", json.dumps(spec)],
                         cwd=HERE, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", help="source tree of the other build (extension built in place)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=106)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=2, help="timed calls per child")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(**json.loads(a.child))))
        return
    if not a.baseline or not a.out:
        ap.error("--baseline and --out are required")
    variants = [("baseline, default K", a.baseline, None), ("this tree, default policy", str(HERE), None),
                ("this tree, K = 1 (every trace kept)", str(HERE), 1)]
    common = dict(n=a.n, steps=a.steps, calls=a.calls, threads=a.threads)
    results = {}
    for batch in a.batches:
        rows = results[batch] = {name: {"times": []} for name, _, _ in variants}
        for r in range(a.rounds):
            for name, tree, K in variants:
                got = _run_child(dict(tree=tree, batch=batch, K=K, task="time", **common))
                rows[name]["times"] += got["times"]
                rows[name]["grad_w_norm"] = got["grad_w_norm"]
                print(f"B={batch} round {r} {name}: {['%.3f' % t for t in got['times']]}", flush=True)
        for name, tree, K in variants:
            rows[name]["peak_bytes"] = _run_child(dict(tree=tree, batch=batch, K=K, task="mem", **common))["peak_bytes"]
            rows[name]["median_s"] = statistics.median(rows[name]["times"])
    a.out.mkdir(parents=True, exist_ok=True)
    base = variants[0][0]
    lines = [f"# Two builds, plastic_rnn forward+backward, N = {a.n}, T = {a.steps}", "",
             f"- command: `python -m benchmarks.compare_builds {shlex.join(sys.argv[1:])}`",
             f"- baseline: {a.baseline}; this tree: {HERE}",
             f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, threads {a.threads or 'default'}; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"load average at the end {os.getloadavg()[0]:.1f}",
             f"- medians of {a.rounds} rounds x {a.calls} calls, each round one fresh process per variant", "",
             "| B | variant | time | baseline / this | peak memory | |grad w| |", "|---|---|---|---|---|---|"]
    for batch, rows in results.items():
        for name, _, _ in variants:
            v = rows[name]
            lines.append(f"| {batch} | {name} | {v['median_s'] * 1e3:.0f} ms | "
                         f"{rows[base]['median_s'] / v['median_s']:.2f}x | {v['peak_bytes'] / 1e6:.0f} MB | "
                         f"{v['grad_w_norm']:.6g} |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    (a.out / "results.json").write_text(json.dumps({str(b): r for b, r in results.items()}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
