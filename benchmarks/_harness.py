"""Shared measurement code of the benchmarks: cases, inputs, implementations, timers, memory probes.

Used by the pytest-benchmark files (benchmarks/test_bench_*.py), by the command-line comparison
(``python -m benchmarks.compare``) and by its child processes (benchmarks/_child.py), so that every
number in benchmarks/RESULTS.md comes from the same definitions:

* a *case* is one problem: form (``rnn`` or ``linear``), N, B, T, rule, activation, alpha shape,
  mode (``fwd``: forward only, no autograd graph; ``fwdbwd``: forward then backward of y with a fixed
  random upstream gradient, w, alpha and eta all requiring grad) and device;
* an *implementation* is ``fused`` (plastic_ops.plastic_*), ``eager`` (plastic_ops.reference.plastic_*)
  or ``compile`` (torch.compile of that same reference function); on a case with episodes also
  ``fused-unmasked`` (the fused op on the same batch without the reset mask / lengths: what the mask
  costs) and ``fused-split`` (the fused op without the mask, called once per run of steps between
  consecutive episode boundaries, the state of the rows that reset zeroed in between); on a case with
  neuromodulation also ``fused-hebb`` (the fused op on the same inputs with rule ``hebb`` and without
  the neuromodulation arguments: today's hebb op, what the neuromodulation is measured against);
* a case's *episodes* are ``none`` (one episode per row, the op as before), ``every:K`` (each row
  starts a new episode every K steps, at an offset of its own: row b at the steps t > 0 with
  t = (b * K // B) mod K, passed as ``reset``) or ``lengths`` (row b runs lengths[b] steps, drawn
  uniformly in [ceil(T / 2), T] from the case's seed, passed as ``lengths``);
* one *step* runs one call of an implementation on a case, synchronising the GPU, so that a wall-clock
  timer around it measures the whole call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import platform
import resource
import signal
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import plastic_ops
from plastic_ops import _extension, reference

IMPLS = ("fused", "eager", "compile")  # the default set of a comparison
EPISODE_IMPLS = ("fused-unmasked", "fused-split")  # meant for cases with episodes
NEURO_IMPLS = ("fused-hebb",)  # meant for cases with neuromodulation
ALL_IMPLS = IMPLS + EPISODE_IMPLS + NEURO_IMPLS
FORMS = ("rnn", "linear")
MODES = ("fwd", "fwdbwd")
ALPHA_SHAPES = ("synapse", "row", "column", "scalar")
NEUROMODULATIONS = ("none", "simple", "retroactive")
NEURO_RULE = "add"  # the rule of the neuromodulated cases: Backpropamine's additive rule
MOD_ARGS = ("mod_weight", "mod_bias", "mod_fanout_weight", "mod_fanout_bias")
ELIG_ARGS = ("eligibility_eta", "eligibility")
NEURO_ARGS = MOD_ARGS + ELIG_ARGS
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1024.0 * 1024.0


# ---------------------------------------------------------------------------------------------
# Cases and inputs

@dataclasses.dataclass(frozen=True)
class Case:
    form: str = "rnn"
    n: int = 128
    batch: int = 8
    steps: int = 10
    rule: str = "hebb"
    activation: str = "tanh"
    alpha: str = "synapse"
    mode: str = "fwdbwd"
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    episodes: str = "none"
    neuromodulation: str = "none"

    def __post_init__(self):
        parse_episodes(self.episodes)
        if self.neuromodulation not in NEUROMODULATIONS:
            raise ValueError(f"neuromodulation must be one of {NEUROMODULATIONS}, got {self.neuromodulation!r}")
        if self.neuromodulation != "none" and self.rule != NEURO_RULE:
            raise ValueError(f"neuromodulation={self.neuromodulation} is measured with rule {NEURO_RULE!r}, "
                             f"got rule {self.rule!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.alpha not in ALPHA_SHAPES:
            raise ValueError(f"alpha must be one of {ALPHA_SHAPES}, got {self.alpha!r}")
        if min(self.n, self.batch, self.steps) < 1:
            raise ValueError(f"N, B and T must be >= 1, got N={self.n}, B={self.batch}, T={self.steps}")

    @property
    def label(self) -> str:
        return (f"{self.form} {self.mode} N={self.n} B={self.batch} T={self.steps} "
                f"{self.rule}/{self.activation} alpha={self.alpha} {self.device}"
                + ("" if self.episodes == "none" else f" episodes={self.episodes}")
                + ("" if self.neuromodulation == "none" else f" neuromodulation={self.neuromodulation}"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("episodes", "neuromodulation"):  # the records of a case without them stay as they were
            if d[k] == "none":
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    @property
    def trace_bytes(self) -> int:
        """Bytes of one trace H (B, N, N)."""
        return self.batch * self.n * self.n * torch.tensor([], dtype=getattr(torch, self.dtype)).element_size()

    def eager_bytes_estimate(self) -> int:
        """Rough peak memory of the eager reference, used only to skip cases that cannot fit.

        Forward without autograd holds a few traces at a time. With autograd the reference keeps,
        per step, the new trace and the (B, N, N) intermediates of the einsum and of the update
        (alpha * H, e * x), and the backward adds temporaries of the same size: about six traces per
        step all told (docs/op_spec.md puts N=1000, T=106, B=8 near 20 GB). Retroactive neuromodulation
        adds the eligibility trace and its update's intermediates (q * p y^T, (1 - q) E, r * E): about
        ten traces per step.
        """
        per_step = 10 if self.neuromodulation == "retroactive" else 6
        if self.mode == "fwd":
            return per_step * self.trace_bytes
        return per_step * self.steps * self.trace_bytes


def parse_episodes(spec: str):
    """("none",), ("every", K) or ("lengths",) from "none", "every:K" (K >= 1) or "lengths"."""
    if spec in ("none", "lengths"):
        return (spec,)
    kind, _, k = str(spec).partition(":")
    if kind == "every" and k.isdigit() and int(k) >= 1:
        return ("every", int(k))
    raise ValueError(f"episodes must be none, every:K (K >= 1) or lengths, got {spec!r}")


def episode_masks(case: Case) -> dict:
    """The episode arguments of a case: {} (none), {"reset": (T, B) bool} or {"lengths": (B,) int64}.

    every:K: row b starts a new episode at the steps t > 0 with t = (b * K // B) mod K, so the rows'
    offsets spread over [0, K) (all distinct when K >= B). lengths: uniform in [ceil(T / 2), T], from
    a generator of its own seeded from the case's seed (the other inputs are drawn as without episodes).
    """
    ep = parse_episodes(case.episodes)
    T, B = case.steps, case.batch
    if ep[0] == "none":
        return {}
    if ep[0] == "every":
        K = ep[1]
        t = torch.arange(T)[:, None]
        offset = torch.tensor([(b * K // B) % K for b in range(B)])[None, :]
        reset = (t > 0) & ((t - offset) % K == 0)
        return {"reset": reset.to(case.device)}
    g = torch.Generator().manual_seed(case.seed + 7919)
    lengths = torch.randint((T + 1) // 2, T + 1, (B,), generator=g, dtype=torch.int64)
    return {"lengths": lengths.to(case.device)}


def episode_boundaries(case: Case) -> List[int]:
    """Steps 0 < t < T at which at least one row starts a new episode or stops: the union over rows."""
    m = episode_masks(case)
    if "reset" in m:
        return [t for t in m["reset"].any(dim=1).nonzero().flatten().tolist() if t > 0]
    if "lengths" in m:
        return sorted({v for v in m["lengths"].tolist() if v < case.steps})
    return []


def neuro_inputs(case: Case) -> dict:
    """The neuromodulation arguments of a case: {} (none), the four mod_* (simple), and eligibility_eta and
    an initial eligibility E_0 (retroactive).

    The mod_* are drawn as the layers initialize them (nn.Linear's defaults for Backpropamine's h2mod and
    fan-out: mod_weight, mod_bias ~ U(+-1/sqrt(N)), mod_fanout_weight, mod_fanout_bias ~ U(+-1)),
    eligibility_eta = 0.1 (Backpropamine's code) and E_0 ~ 0.1 N(0, 1), from a generator of their own
    seeded from the case's seed, so the other inputs are those of the case without neuromodulation. The
    parameters (mod_*, eligibility_eta) require grad in fwdbwd; E_0 is a state, like the inputs, and
    does not.
    """
    if case.neuromodulation == "none":
        return {}
    dev = torch.device(case.device)
    dtype = getattr(torch, case.dtype)
    grad = case.mode == "fwdbwd"
    g = torch.Generator().manual_seed(case.seed + 104729)
    N = case.n

    def uniform(*shape, bound):
        t = (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * bound
        return t.to(dev).requires_grad_(grad)

    bound = 1.0 / math.sqrt(N)
    out = {"mod_weight": uniform(N, bound=bound), "mod_bias": uniform(bound=bound),
           "mod_fanout_weight": uniform(N, bound=1.0), "mod_fanout_bias": uniform(N, bound=1.0)}
    if case.neuromodulation == "retroactive":
        out["eligibility_eta"] = torch.tensor(0.1, dtype=dtype, device=dev).requires_grad_(grad)
        out["eligibility"] = (torch.randn(case.batch, N, N, generator=g, dtype=dtype) * 0.1).to(dev)
    return out


def make_inputs(case: Case) -> dict:
    """Deterministic inputs of a case: the op's arguments and, for fwdbwd, the upstream gradient of y.

    The scales keep the activity away from saturation and from zero (tanh of order-one inputs), so no
    implementation gets a fast path from denormals or all-zero traces. w, alpha and eta are leaves that
    require grad in fwdbwd (learned, as in Miconi et al. 2018); the inputs u / x do not. A case with
    neuromodulation adds its arguments (neuro_inputs), the others unchanged.
    """
    dev = torch.device(case.device)
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(case.seed)
    T, B, N = case.steps, case.batch, case.n

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).to(dev)

    alpha_shape = {"synapse": (N, N), "row": (N, 1), "column": (1, N), "scalar": ()}[case.alpha]
    grad = case.mode == "fwdbwd"
    args = {
        "x": rand(T, B, N, scale=0.5),
        "w": rand(N, N, scale=1.0 / math.sqrt(N)).requires_grad_(grad),
        "alpha": rand(*alpha_shape, scale=0.1 / math.sqrt(N)).requires_grad_(grad),
        "eta": torch.tensor(0.05, dtype=dtype, device=dev).requires_grad_(grad),
    }
    if grad:
        args["grad_y"] = rand(T, B, N)
    args.update(episode_masks(case))  # reset or lengths; nothing for episodes=none
    args.update(neuro_inputs(case))  # nothing for neuromodulation=none
    return args


def op_function(impl: str, form: str, compile_kwargs: Optional[dict] = None) -> Callable:
    """The callable of an implementation: fused op, eager reference, or torch.compile of the reference.

    Every one takes the episode arguments (reset=..., lengths=...) and the neuromodulation arguments
    (mod_*, eligibility_eta, eligibility) of a case that has them; fused-unmasked drops the episode
    arguments and fused-split implements them with separate calls; fused-hebb drops the neuromodulation
    arguments and runs rule hebb (today's hebb op on the same inputs).
    """
    if impl in ("fused", "fused-unmasked", "fused-split", "fused-hebb"):
        _extension.require()  # when not built: a RuntimeError with the reason and how to build it
        fused = plastic_ops.plastic_rnn if form == "rnn" else plastic_ops.plastic_linear
        if impl == "fused":
            return fused
        if impl == "fused-unmasked":
            def unmasked(x, w, alpha, eta, reset=None, lengths=None, **kw):
                return fused(x, w, alpha, eta, **kw)
            return unmasked
        if impl == "fused-hebb":
            def hebb(x, w, alpha, eta, rule=None, **kw):
                for k in NEURO_ARGS:
                    kw.pop(k, None)
                return fused(x, w, alpha, eta, rule="hebb", **kw)
            return hebb
        return SplitEpisodes(fused, recurrent=form == "rnn")
    ref = reference.plastic_rnn if form == "rnn" else reference.plastic_linear
    if impl == "eager":
        return ref
    if impl == "compile":
        return torch.compile(ref, **(compile_kwargs or {}))
    raise ValueError(f"unknown implementation {impl!r}; choose from {ALL_IMPLS}")


class SplitEpisodes:
    """Episode resets and lengths without the op's mask: one unmasked call per run of steps.

    The steps are cut at every boundary of any row (the union of the rows' resets and ends); each
    piece is one call of the fused op, carrying the trace (and, recurrent, the last output as y0)
    from the previous piece. Before a piece, the rows that reset get a zero state (torch.where, so no
    gradient reaches the old one); rows that have ended are left out of the call (a batch subset),
    their outputs are zeros and their trace stays the one after their last step. Everything stays
    differentiable, so forward+backward is one autograd graph over all the calls. The plan (the
    pieces, the rows to zero, the active rows) is made once per mask, outside the timed calls. With
    eligibility traces (eligibility_eta given) the eligibility E is carried, zeroed and subset as the
    trace is, and the call returns (y, trace_T, eligibility_T) as the op does.
    """

    def __init__(self, fn: Callable, recurrent: bool):
        self.fn = fn
        self.recurrent = recurrent
        self._key = None
        self._plan = None

    def plan(self, T: int, reset, lengths) -> list:
        if self._key is not None and self._key[0] is reset and self._key[1] is lengths and self._key[2] == T:
            return self._plan
        cuts = set()
        if reset is not None:
            cuts |= {t for t in reset.any(dim=1).nonzero().flatten().tolist() if 0 < t < T}
        if lengths is not None:
            cuts |= {v for v in lengths.tolist() if 0 < v < T}
        bounds = [0] + sorted(cuts) + [T]
        plan = []
        for t0, t1 in zip(bounds[:-1], bounds[1:]):
            zero = reset[t0] if reset is not None and t0 > 0 and bool(reset[t0].any()) else None
            active = None
            if lengths is not None:
                on = lengths > t0
                if not bool(on.all()):
                    active = on.nonzero().flatten()
            plan.append((t0, t1, zero, active))
        self._key, self._plan = (reset, lengths, T), plan
        return plan

    def __call__(self, x, w, alpha, eta, reset=None, lengths=None, **kw):
        if reset is None and lengths is None:
            return self.fn(x, w, alpha, eta, **kw)
        if lengths is not None:
            lengths = lengths.to(x.device)
        T = x.shape[0]
        retro = kw.get("eligibility_eta") is not None
        E = kw.pop("eligibility", None)  # the initial eligibility (zeros when None), then carried
        H = y_prev = None
        pieces = []
        for t0, t1, zero, active in self.plan(T, reset, lengths):
            if zero is not None:  # t0 > 0: H, E and y_prev exist
                H = torch.where(zero[:, None, None], H.new_zeros(()), H)
                if retro:
                    E = torch.where(zero[:, None, None], E.new_zeros(()), E)
                if self.recurrent:
                    y_prev = torch.where(zero[:, None], y_prev.new_zeros(()), y_prev)
            if active is not None and active.numel() == 0:  # every row has ended: zeros, nothing to run
                pieces.append(pieces[-1].new_zeros((t1 - t0,) + pieces[-1].shape[1:]))
                continue
            xs = x[t0:t1]
            state = {"trace": H}
            if retro:
                state["eligibility"] = E
            if self.recurrent:
                state["y0"] = y_prev
            if active is not None:  # t0 > 0 (every length is >= 1): the state exists
                xs = xs.index_select(1, active)
                state = {k: v.index_select(0, active) for k, v in state.items()}
            out = self.fn(xs, w, alpha, eta, **state, **kw)
            y, h = out[0], out[1]
            if active is None:
                pieces.append(y)
                H, y_prev = h, y[-1]
                E = out[2] if retro else None
            else:
                pieces.append(y.new_zeros((t1 - t0, x.shape[1]) + y.shape[2:]).index_copy(1, active, y))
                H = H.index_copy(0, active, h)
                y_prev = y_prev.index_copy(0, active, y[-1])
                if retro:
                    E = E.index_copy(0, active, out[2])
        return (torch.cat(pieces), H) + ((E,) if retro else ())


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_step(case: Case, fn: Callable, args: dict) -> Callable[..., Optional[dict]]:
    """One call of ``fn`` on the case, GPU-synchronised; ``step(capture=True)`` also returns outputs.

    A case with episodes passes its reset mask or lengths to ``fn`` as keywords, a case with
    neuromodulation its mod_*, eligibility_eta and eligibility.
    fwd runs under torch.no_grad (an inference call: the fused op then saves no checkpoints, the
    reference builds no graph). fwdbwd backpropagates grad_y through y (the final trace and eligibility
    are not used by the loss) and drops the parameter gradients before each call, so that nothing
    accumulates. Captured: y, trace (and eligibility when returned), and the gradients of the parameters
    that got one (an implementation that drops the neuromodulation, fused-hebb, gives none to mod_*).
    """
    kw = dict(rule=case.rule, activation=case.activation)
    kw.update({k: args[k] for k in ("reset", "lengths") if k in args})  # a case with episodes
    kw.update({k: args[k] for k in NEURO_ARGS if k in args})  # a case with neuromodulation
    names = ["w", "alpha", "eta"] + [k for k in NEURO_ARGS if k in args and args[k].requires_grad]
    params = [args[k] for k in names]

    def outputs(out) -> dict:
        res = {"y": out[0].detach(), "trace": out[1].detach()}
        if len(out) > 2:
            res["eligibility"] = out[2].detach()
        return res

    if case.mode == "fwd":
        def step(capture: bool = False):
            with torch.no_grad():
                out = fn(args["x"], args["w"], args["alpha"], args["eta"], **kw)
            synchronize(case.device)
            return outputs(out) if capture else None
    else:
        def step(capture: bool = False):
            for p in params:
                p.grad = None
            out = fn(args["x"], args["w"], args["alpha"], args["eta"], **kw)
            torch.autograd.backward(out[0], args["grad_y"])
            synchronize(case.device)
            if not capture:
                return None
            res = outputs(out)
            res.update({f"grad_{k}": p.grad.clone() for k, p in zip(names, params) if p.grad is not None})
            return res
    return step


def max_rel_error(out: dict, ref: dict) -> float:
    """Largest of max|out - ref| / max|ref| over the captured tensors (outputs and gradients)."""
    worst = 0.0
    for k, r in ref.items():
        o = out[k].double()
        r = r.double()
        scale = max(r.abs().max().item(), 1e-30)
        worst = max(worst, (o - r).abs().max().item() / scale)
    return worst


# ---------------------------------------------------------------------------------------------
# Timing

def time_once(step: Callable) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def summarize(samples: List[float]) -> dict:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median_s": statistics.median(s), "min_s": s[0], "max_s": s[-1], "q1_s": q[0], "q3_s": q[2],
            "n_samples": len(s)}


def interleaved_timing(steps: Dict[str, Callable], single_s: Dict[str, float], *, budget_s: float,
                       min_rounds: int, max_rounds: int, min_sample_s: float, max_inner: int,
                       rounds: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None
                       ) -> Dict[str, dict]:
    """Time several implementations side by side, round-robin, and return per-implementation statistics.

    Each round takes one sample of every implementation, starting with a different one each round, so
    slow drifts of a shared, noisy machine hit all of them alike and their ratio stays meaningful. A
    sample of a fast call averages ``inner`` back-to-back calls (enough for about ``min_sample_s``), so
    that timer resolution and Python overhead stay small; slow calls are sampled one by one. The number
    of rounds fills ``budget_s`` within [min_rounds, max_rounds] unless ``rounds`` fixes it.
    """
    names = list(steps)
    inner = {k: max(1, min(max_inner, math.ceil(min_sample_s / max(single_s[k], 1e-9)))) for k in names}
    if rounds is None:
        per_round = sum(inner[k] * single_s[k] for k in names)
        rounds = int(min(max_rounds, max(min_rounds, math.floor(budget_s / max(per_round, 1e-9)))))
    samples = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            step = steps[k]
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                step()
            samples[k].append((time.perf_counter() - t0) / inner[k])
        if progress is not None:
            progress(r + 1, rounds)
    return {k: dict(summarize(samples[k]), inner=inner[k], rounds=rounds, samples_s=samples[k]) for k in names}


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: Optional[float]):
    """Raise CompileTimeout in the main thread after ``seconds`` (no limit when None or <= 0).

    torch.compile's work is Python code run by the calling thread (with compile_threads = 1), so the
    exception interrupts it between bytecodes; the parent process keeps a hard timeout as a backstop.
    """
    if not seconds or seconds <= 0:
        yield
        return

    def handler(signum, frame):
        raise CompileTimeout(f"did not finish within {seconds:g} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------
# Memory

def ru_maxrss_bytes() -> int:
    """getrusage's peak resident set size of this process (Linux reports KiB).

    Beware in a child process: Linux keeps the larger of the child's own peak and the peak of the
    address space it replaced at exec, i.e. its parent's when spawned by fork/vfork + exec. A child of
    a process that imported torch therefore reports at least the parent's peak. peak_bytes() does not.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> Optional[int]:
    v = _proc_status_kib("VmRSS")
    return None if v is None else v * 1024


def hwm_bytes() -> Optional[int]:
    v = _proc_status_kib("VmHWM")
    return None if v is None else v * 1024


def peak_bytes() -> int:
    """This process's own peak resident set size: VmHWM, or ru_maxrss where /proc is missing."""
    v = hwm_bytes()
    return ru_maxrss_bytes() if v is None else v


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cuda_peak_bytes(step: Callable) -> int:
    """Peak CUDA memory allocated by one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def copy_bandwidth(device: str, nbytes: int = 512 * 1024 * 1024, reps: int = 20) -> float:
    """Achieved bandwidth of a same-device tensor copy, in bytes/s, counting read + write (2 * nbytes).

    The reference roof for the fused forward's trace sweep, measured in the same process and run.
    """
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(reps):
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            times.append(time_once(lambda: dst.copy_(src)))
    del src, dst
    return 2 * n * 4 / statistics.median(times)


def trace_traffic_bytes(case: Case) -> int:
    """Bytes the fused forward must move for the trace: each step reads and writes every element once."""
    return 2 * case.trace_bytes * case.steps


# ---------------------------------------------------------------------------------------------
# Environment

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extension_build() -> Optional[str]:
    """File name, modification time and hash prefix of the loaded extension: which kernel was timed."""
    mod = sys.modules.get("plastic_ops._C")
    path = getattr(mod, "__file__", None)
    if not path:
        return None
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))
    return f"{os.path.basename(path)} {stamp} sha256:{digest}"


def environment(device: str) -> dict:
    total = None
    try:
        with open("/proc/meminfo") as f:
            total = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_gib": None if total is None else round(total / 1024 ** 3, 1),
        "plastic_ops": plastic_ops.__version__,
        "fused_available": plastic_ops.extension_available(),
        "fused_build": extension_build(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 1024 ** 3, 1), cuda=torch.version.cuda)
    return env
