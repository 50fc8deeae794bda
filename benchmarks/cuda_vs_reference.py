"""The fused op on a device against plastic_ops.reference, over every option of the op.

    python -m benchmarks.cuda_vs_reference --device cuda --json DIR/cuda_vs_reference.json
    python -m benchmarks.cuda_vs_reference --device cuda --only sanitizer   # two small cases, for compute-sanitizer
    python -m benchmarks.cuda_vs_reference --device cpu --quick             # a smaller matrix on the CPU kernels
    python -m benchmarks.cuda_vs_reference --device cuda --paths v1,v2      # both CUDA kernel paths, one reference
    python -m benchmarks.cuda_vs_reference --device cuda --only timing --json DIR/paths.json   # both paths timed
    python -m benchmarks.cuda_vs_reference --device cuda --only timing --graphs   # and each replayed from a graph

Every case runs the fused op (forward and backward) on --device in its dtype, and the reference in float64
on the CPU on the same inputs (rounded to the case's dtype first), then compares y, the final trace and
the gradient of every input, with the same random upstream gradients for both. The error of a tensor is
max|fused - reference| / max(max|reference|, 1): relative to the tensor's scale, absolute below 1. A case
mismatches when its worst error exceeds the dtype's tolerance, when something is not finite, when the
results are not on the device, or when it raises.

The matrix: both forms x both rules x every activation x clip on/off; every alpha shape x every
modulation; odd shapes, including T = 1, B = 1, N_out across a 128-thread block, N_in large enough to be
split; checkpoint intervals K = 1 .. T and the default; optional arguments absent; each in float64 and
float32. Prints one line per mismatch and a total; exit status 1 when a case mismatches.

--paths v1,v2 runs the fused op once per CUDA kernel path (PLASTIC_OPS_CUDA_KERNELS, docs/cuda.md) against
the same reference; each path's results are counted apart ("v1: ...", "v2: ..."). --only timing times
forward+backward of plastic_rnn (N = 1000, T = 106, tanh, hebb, per-synapse alpha, float32, the default
memory policy) at B = 1, 8, 32, 128 for each path, interleaved, median of --rounds calls after a warm-up,
with the peak memory of one call and the largest difference between the paths' results. --graphs adds each
path captured once into a CUDA graph and replayed ("v2+graph"), which shows what the kernel launches cost.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import time
from typing import List, Optional, Sequence

import torch

import plastic_ops
from benchmarks.gpu_check_report import paths_table
from plastic_ops import reference

# Scale-relative base tolerances: float64 agrees to rounding; float32 accumulates rounding over T steps and N terms.
TOLERANCE = {"float64": 1e-9, "float32": 2e-4}
ACTIVATIONS = ("tanh", "sigmoid", "relu", "identity", "softmax")
ALPHA_SHAPES = ("scalar", "scalar11", "input", "output", "synapse")
MODULATIONS = (None, "shared", "per_output")
DTYPES = ("float64", "float32")
PATH_VAR = "PLASTIC_OPS_CUDA_KERNELS"  # picks the CUDA kernels at each call (docs/cuda.md, "Two paths")
PATHS = ("v1", "v2")


@dataclasses.dataclass(frozen=True)
class Case:
    group: str
    form: str
    dtype: str
    T: int = 6
    B: int = 3
    n_in: int = 37
    n_out: int = 45
    rule: str = "hebb"
    activation: str = "tanh"
    clip: Optional[float] = None
    alpha: str = "synapse"
    modulation: Optional[str] = None
    K: Optional[int] = 2
    trace: bool = True
    bias: bool = True
    y0: bool = True
    scale: float = 1.0
    seed: int = 0

    @property
    def name(self) -> str:
        n_in = self.n_out if self.form == "rnn" else self.n_in
        return (f"{self.group}: {self.form} {self.rule}/{self.activation} clip={self.clip} alpha={self.alpha} "
                f"mod={self.modulation} T={self.T} B={self.B} {n_in}x{self.n_out} K={self.K}"
                f"{'' if self.trace else ' no-trace'}{'' if self.bias else ' no-bias'}"
                f"{'' if self.y0 or self.form != 'rnn' else ' no-y0'} {self.dtype}")


def build_cases(quick: bool = False) -> List[Case]:
    dtypes = ("float64",) if quick else DTYPES
    forms = ("linear", "rnn")
    cases = []
    acts = ("tanh", "softmax") if quick else ACTIVATIONS
    for form, rule, act, clip, dt in itertools.product(forms, ("hebb", "oja"), acts, (None, 0.3), dtypes):
        cases.append(Case("options", form, dt, rule=rule, activation=act, clip=clip, seed=1))
    alphas = ("scalar", "synapse") if quick else ALPHA_SHAPES
    for form, alpha, mod, dt in itertools.product(forms, alphas, MODULATIONS, dtypes):
        # N_out = 140 leaves a partly filled second block of 128 threads along j.
        cases.append(Case("alpha/modulation", form, dt, T=5, B=2, n_in=9, n_out=140, alpha=alpha, modulation=mod,
                          clip=0.5, seed=2))
    shapes = [(1, 1, 1, 1), (1, 4, 3, 9), (9, 1, 17, 3), (13, 5, 33, 41)]
    if not quick:
        # 600 input rows are split over blocks; B = 33 with N = 129 gives a wide grid of partial blocks.
        shapes += [(4, 3, 70, 300), (3, 2, 600, 257), (3, 33, 129, 129)]
    for form, (T, B, n_in, n_out), dt in itertools.product(forms, shapes, dtypes):
        cases.append(Case("shapes", form, dt, T=T, B=B, n_in=n_in, n_out=n_out, rule="oja", activation="sigmoid",
                          clip=1.0, modulation="per_output", K=None, seed=T * 100 + n_in))
    intervals = (1, 3, None) if quick else (1, 2, 3, 5, 7, None)
    for form, K, dt in itertools.product(forms, intervals, dtypes):
        cases.append(Case("checkpoints", form, dt, T=7, B=2, n_in=11, n_out=13, activation="relu", K=K,
                          modulation="shared", seed=3))
    for form, dt in itertools.product(forms, dtypes):
        cases.append(Case("absent", form, dt, T=4, B=2, n_in=3, n_out=5, trace=False, bias=False, y0=False, K=None,
                          seed=4))
    return cases


def sanitizer_cases() -> List[Case]:
    """Two small cases that between them touch every kernel, for compute-sanitizer (slow per launch)."""
    return [Case("sanitizer", "linear", "float32", T=4, B=2, n_in=37, n_out=130, rule="oja", activation="softmax",
                 clip=0.3, modulation="per_output", K=2, seed=5),
            Case("sanitizer", "rnn", "float64", T=5, B=3, n_in=70, n_out=70, rule="hebb", activation="tanh",
                 alpha="input", modulation="shared", K=2, seed=6)]


def make_inputs(case: Case) -> tuple:
    """float64 CPU tensors: (positional args, modulation, upstream gradient of y, of the final trace)."""
    g = torch.Generator().manual_seed(case.seed)
    n_out = case.n_out
    n_in = n_out if case.form == "rnn" else case.n_in

    def rnd(*shape, s=1.0):
        return s * torch.randn(shape, generator=g, dtype=torch.float64)

    alpha_shape = {"scalar": (), "scalar11": (1, 1), "input": (n_in, 1), "output": (1, n_out),
                   "synapse": (n_in, n_out)}[case.alpha]
    # Weights of order 1/sqrt(N_in) keep every activation (identity and relu too) and the trace bounded.
    x = rnd(case.T, case.B, n_out if case.form == "rnn" else n_in)
    w = rnd(n_in, n_out, s=case.scale / math.sqrt(n_in))
    alpha = rnd(*alpha_shape, s=case.scale / math.sqrt(n_in))
    eta = 0.1 + 0.4 * torch.rand((), generator=g, dtype=torch.float64)
    trace = rnd(case.B, n_in, n_out, s=0.2) if case.trace else None
    bias = rnd(n_out, s=0.5) if case.bias else None
    mod = None
    if case.modulation:
        mod = 1.5 * torch.rand(case.T, case.B, 1 if case.modulation == "shared" else n_out, generator=g,
                               dtype=torch.float64)
    if case.form == "rnn":
        args = [x, w, alpha, eta, trace, rnd(case.B, n_out) if case.y0 else None, bias]
    else:
        args = [x, w, alpha, eta, trace, bias]
    gy = rnd(case.T, case.B, n_out)
    gh = rnd(case.B, n_in, n_out)
    return args, mod, gy, gh


def run_once(fn, case: Case, args, mod, gy, gh, device: str, dtype: torch.dtype) -> List[torch.Tensor]:
    """y, the final trace and the gradient of every tensor input, as float64 CPU tensors."""
    leaves = [None if a is None else a.to(dtype).to(device).requires_grad_() for a in args]
    mod_l = None if mod is None else mod.to(dtype).to(device).requires_grad_()
    y, h = fn(*leaves, rule=case.rule, activation=case.activation, clip=case.clip, modulation=mod_l,
              checkpoint_every=case.K)
    if y.device.type != torch.device(device).type or h.device.type != torch.device(device).type:
        raise RuntimeError(f"results on {y.device}/{h.device}, expected {device}")
    inputs = [t for t in leaves + [mod_l] if t is not None]
    loss = (y * gy.to(y)).sum() + (h * gh.to(h)).sum()
    grads = torch.autograd.grad(loss, inputs)
    return [t.detach().to("cpu", torch.float64) for t in (y, h, *grads)]


def tensor_names(case: Case, args, mod) -> List[str]:
    names = ["u", "w", "alpha", "eta", "trace", "y0", "bias"] if case.form == "rnn" else \
        ["x", "w", "alpha", "eta", "trace", "bias"]
    return ["y", "trace_T"] + ["d" + n for n, a in zip(names, args) if a is not None] + \
        (["dmodulation"] if mod is not None else [])


def scaled_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape:
        return math.inf
    if got.numel() == 0:
        return 0.0
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


@contextlib.contextmanager
def kernel_path(path: Optional[str]):
    """PLASTIC_OPS_CUDA_KERNELS=path inside the block (None: left as it is)."""
    if path is None:
        yield
        return
    old = os.environ.get(PATH_VAR)
    os.environ[PATH_VAR] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PATH_VAR, None)
        else:
            os.environ[PATH_VAR] = old


def check_case(case: Case, device: str) -> dict:
    """The case on the kernel path the environment picks."""
    return check_case_paths(case, device, [None])[0]


def check_case_paths(case: Case, device: str, paths: Sequence[Optional[str]]) -> List[dict]:
    """The case once per kernel path (None: the environment's), against one reference; one result each."""
    args, mod = None, None
    dtype = getattr(torch, case.dtype)
    fused = getattr(plastic_ops, f"plastic_{case.form}")
    ref_fn = getattr(reference, f"plastic_{case.form}")
    results = []
    ref = tol = names = None
    for path in paths:
        res = {"case": case.name if path is None else f"{path} {case.name}", "dtype": case.dtype,
               "group": case.group, "path": path}
        try:
            if args is None:
                args, mod, gy, gh = make_inputs(case)
            with kernel_path(path):
                got = run_once(fused, case, args, mod, gy, gh, device, dtype)
            if ref is None:
                # The reference sees the same values as the op: inputs rounded to the case's dtype, then float64.
                rounded = [None if a is None else a.to(dtype).double() for a in args]
                mod_r = None if mod is None else mod.to(dtype).double()
                ref = run_once(ref_fn, case, rounded, mod_r, gy, gh, "cpu", torch.float64)
                names = tensor_names(case, args, mod)
                tol = {n: TOLERANCE[case.dtype] for n in names}
                if dtype != torch.float64:
                    # Below float64, a tensor may also be off by up to 10x the reference's own rounding error in
                    # that dtype (sums with cancellation, long recurrences), measured on the CPU.
                    own = run_once(ref_fn, case, rounded, mod_r, gy, gh, "cpu", dtype)
                    tol = {n: max(tol[n], 10 * scaled_error(a, b)) for n, a, b in zip(names, own, ref)}
            errors = {n: scaled_error(a, b) for n, a, b in zip(names, got, ref)}
            worst_name = max(errors, key=lambda n: errors[n] / tol[n])
            res.update(errors=errors, tolerances=tol, worst=max(errors.values()), worst_tensor=worst_name,
                       worst_of_tolerance=errors[worst_name] / tol[worst_name],
                       ok=all(errors[n] <= tol[n] for n in names))
        except Exception as exc:  # a crash of one case is a mismatch, reported, and the matrix goes on
            res.update(errors={}, worst=math.inf, worst_tensor=None, worst_of_tolerance=math.inf, ok=False,
                       error=f"{type(exc).__name__}: {exc}"[:800])
        results.append(res)
    return results


def capture(call, dev: torch.device):
    """call() captured into a CUDA graph after one warm-up on a side stream; returns (graph, its outputs)."""
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    return graph, out


GRAPH = "+graph"  # suffix of a path whose forward+backward is replayed from a CUDA graph


def time_paths(device: str, paths: Sequence[str], batches: Sequence[int], n: int = 1000, steps: int = 106,
               rounds: int = 5, graphs: bool = False) -> dict:
    """Forward+backward of plastic_rnn on each kernel path: median ms, peak MB, and the paths' largest difference.

    The paths run interleaved (one call of each per round) after one warm-up call each, on the same inputs.
    graphs=True (CUDA only) adds, for each path, the same forward+backward captured once into a CUDA graph
    and replayed ("v2+graph"): the kernels without the host's launch cost (docs/cuda.md, "Small batches").
    """
    dev = torch.device(device)
    on_cuda = dev.type == "cuda"
    if graphs and not on_cuda:
        raise ValueError("graphs=True needs a CUDA device")
    variants = list(paths) + ([p + GRAPH for p in paths] if graphs else [])

    def sync():
        if on_cuda:
            torch.cuda.synchronize(dev)

    rows = []
    for B in batches:
        g = torch.Generator().manual_seed(B)
        u = torch.randn(steps, B, n, generator=g).to(dev)
        w = (0.01 * torch.randn(n, n, generator=g)).to(dev).requires_grad_()
        alpha = (0.01 * torch.randn(n, n, generator=g)).to(dev).requires_grad_()
        eta = torch.tensor(0.01, device=dev, requires_grad=True)
        gy = torch.randn(steps, B, n, generator=g).to(dev)

        def call():
            y, _ = plastic_ops.plastic_rnn(u, w, alpha, eta)
            grads = torch.autograd.grad((y * gy).sum(), (w, alpha, eta))
            return [y.detach(), *grads]

        times = {v: [] for v in variants}
        peak = {}
        out = {}
        run = {}  # variant -> what one timed call runs
        try:
            for v in variants:  # warm-up (or capture), the results kept for the comparison, the peak memory
                with kernel_path(v.removesuffix(GRAPH)):
                    if on_cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev) if on_cuda else 0
                    if v.endswith(GRAPH):  # the path is read at capture: the graph holds that path's kernels
                        graph, outputs = capture(call, dev)
                        graph.replay()
                        out[v], run[v] = outputs, graph.replay
                    else:
                        out[v], run[v] = call(), call
                    sync()
                    peak[v] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if on_cuda else None
            for _ in range(rounds):
                for v in variants:
                    with kernel_path(v.removesuffix(GRAPH)):
                        sync()
                        t0 = time.perf_counter()
                        run[v]()
                        sync()
                        times[v].append(1e3 * (time.perf_counter() - t0))
            first = out[variants[0]]
            diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                       for v in variants[1:] for a, b in zip(out[v], first)) if len(variants) > 1 else 0.0
            status, error = "ok", None
        except Exception as exc:  # one batch size failing (out of memory, say) leaves the others measured
            diff, status, error = None, "error", f"{type(exc).__name__}: {exc}"[:400]
        for v in variants:
            med = statistics.median(times[v]) if times[v] else None
            rows.append({"B": B, "path": v, "status": status if times[v] else "error", "error": error,
                         "median_ms": med, "min_ms": min(times[v]) if times[v] else None, "peak_mb": peak.get(v),
                         "rounds": len(times[v]), "max_rel_diff_between_paths": diff})
        del u, w, alpha, eta, gy, out, run
        if on_cuda:
            torch.cuda.empty_cache()
    speedup, graph_speedup = {}, {}
    for B in batches:
        by = {r["path"]: r["median_ms"] for r in rows if r["B"] == B}
        if by.get("v1") and by.get("v2"):
            speedup[str(B)] = by["v1"] / by["v2"]
        if by.get("v2") and by.get("v2" + GRAPH):
            graph_speedup[str(B)] = by["v2"] / by["v2" + GRAPH]
    data = {"what": f"plastic_rnn forward+backward, N={n}, T={steps}, tanh/hebb, alpha per synapse, float32, "
                    f"default memory policy, median of {rounds} interleaved calls"
                    + (f"; {GRAPH}: replayed from a CUDA graph" if graphs else ""),
            "device": device, "gpu": torch.cuda.get_device_name(dev) if on_cuda else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "paths": variants, "rows": rows,
            "speedup_v2_over_v1": speedup}
    if graphs:
        data["speedup_graph_over_launches"] = graph_speedup
    return data


def cuda_kernels_registered() -> Optional[bool]:
    """Whether the extension registered CUDA kernels for its four ops (None when torch cannot be asked)."""
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"plastic_ops::{form}_{part}", "CUDA")
                   for form in ("plastic_linear", "plastic_rnn") for part in ("forward", "backward"))
    except Exception:
        return None


def summarize(results: List[dict]) -> dict:
    bad = [r for r in results if not r["ok"]]
    per_dtype = {}
    for dt in sorted({r["dtype"] for r in results}):
        rs = [r for r in results if r["dtype"] == dt]
        w = max(rs, key=lambda r: r["worst"])
        m = max(rs, key=lambda r: r["worst_of_tolerance"])
        per_dtype[dt] = {"cases": len(rs), "mismatches": sum(not r["ok"] for r in rs), "worst": w["worst"],
                         "worst_case": w["case"], "worst_tensor": w["worst_tensor"], "tolerance": TOLERANCE[dt],
                         "worst_of_tolerance": m["worst_of_tolerance"], "closest_case": m["case"]}
    worst = max(results, key=lambda r: r["worst"]) if results else None
    return {"cases": len(results), "mismatches": len(bad), "errors": sum("error" in r for r in results),
            "worst": worst["worst"] if worst else None, "worst_case": worst["case"] if worst else None,
            "per_dtype": per_dtype}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cuda_vs_reference", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cuda", help="device of the fused op: cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="a smaller matrix (float64, fewer activations and shapes)")
    p.add_argument("--only", choices=("matrix", "sanitizer", "timing"), default="matrix",
                   help="matrix: every option (default); sanitizer: two small cases; timing: the paths timed")
    p.add_argument("--paths", default=None,
                   help=f"comma-separated CUDA kernel paths ({', '.join(PATHS)}) to run each case on; default: the "
                        f"one {PATH_VAR} picks (timing: v1,v2)")
    p.add_argument("--json", default=None, help="write every case's errors and the totals to this file")
    p.add_argument("--verbose", action="store_true", help="one line per case, not only per mismatch")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128], help="timing: batch sizes")
    p.add_argument("--n", type=int, default=1000, help="timing: N")
    p.add_argument("--steps", type=int, default=106, help="timing: T")
    p.add_argument("--rounds", type=int, default=5, help="timing: calls per path and batch size")
    p.add_argument("--graphs", action="store_true",
                   help="timing: also each path's forward+backward captured into a CUDA graph and replayed (CUDA)")
    a = p.parse_args(argv)
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: torch {torch.__version__} sees no CUDA device")
    paths = [x for x in (a.paths or "").split(",") if x]
    if any(x not in PATHS for x in paths):
        p.error(f"--paths: each of {', '.join(PATHS)}, got {a.paths!r}")
    if not plastic_ops.extension_available():
        print("the compiled extension is not built: every case will fail", file=sys.stderr)
    if a.only == "timing":
        if a.graphs and torch.device(a.device).type != "cuda":
            p.error("--graphs: CUDA graphs need --device cuda")
        data = time_paths(a.device, paths or list(PATHS), a.batches, a.n, a.steps, a.rounds, a.graphs)
        print(data["what"])
        print(paths_table(data))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(data, f, indent=1)
        return 0 if all(r["status"] == "ok" for r in data["rows"]) else 1
    cases = sanitizer_cases() if a.only == "sanitizer" else build_cases(a.quick)
    registered = cuda_kernels_registered()
    print(f"fused op on {a.device} vs reference (float64, cpu): {len(cases)} cases"
          f"{' x paths ' + ','.join(paths) if paths else ''}; CUDA kernels registered: {registered}", flush=True)
    t0 = time.perf_counter()
    results = []
    for case in cases:
        for r in check_case_paths(case, a.device, paths or [None]):
            results.append(r)
            if not r["ok"] or a.verbose:
                what = r.get("error") or (f"{r['worst_tensor']} off by {r['errors'][r['worst_tensor']]:.2e} "
                                          f"(tolerance {r['tolerances'][r['worst_tensor']]:.1e})")
                print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']}: {what}", flush=True)
    s = summarize(results)
    s.update(device=a.device, only=a.only, quick=a.quick, cuda_kernels_registered=registered,
             seconds=round(time.perf_counter() - t0, 2), paths=paths or None,
             gpu=torch.cuda.get_device_name(0) if torch.device(a.device).type == "cuda" else None)
    if paths:
        s["per_path"] = {pa: summarize([r for r in results if r["path"] == pa]) for pa in paths}
        for pa, d in s["per_path"].items():
            print(f"{pa}: {d['cases']} cases, {d['mismatches']} mismatches, worst error {d['worst']:.2e}")
    for dt, d in s["per_dtype"].items():
        print(f"{dt}: {d['cases']} cases, {d['mismatches']} mismatches, worst error {d['worst']:.2e} "
              f"(base tolerance {d['tolerance']:g}) in {d['worst_tensor']} of {d['worst_case']}; "
              f"closest to its tolerance: {d['worst_of_tolerance']:.2g} of it")
    print(f"cuda_vs_reference: {s['cases']} cases, {s['mismatches']} mismatches ({s['errors']} raised), "
          f"worst error {s['worst']:.2e}, {s['seconds']:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": s, "results": results}, f, indent=1, default=str)
    return 1 if s["mismatches"] or not results else 0


if __name__ == "__main__":
    sys.exit(main())
