"""Child process of ``python -m benchmarks.compare``: one case per process.

    python -m benchmarks._child '<json task>'

A task is ``{"task": "time" | "mem" | "base", "case": {...}, "out": path, ...}``. Results are appended to
``out`` as JSON lines, flushed as soon as they exist, so the parent keeps what was measured even if it
has to kill this process (a compile that hangs, a case that runs out of time).

* time: all requested implementations of the case side by side in this process: first calls (and
  compilation), a correctness check against the eager reference (and of fused-split against fused),
  CUDA peak memory, then interleaved
  timing rounds; on CUDA also the fused forward's trace bandwidth and a copy bandwidth.
* mem:  one implementation, one call, in a process of its own, then this process's peak RSS (CPU).
* base: the same process up to the inputs, without the call: the baseline that mem is compared with.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import json
import os
import sys
import time
import traceback


class Emitter:
    def __init__(self, path: str):
        self.f = open(path, "a")

    def __call__(self, **record):
        record.setdefault("t", time.time())
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


def _trim_heap() -> None:
    """Give freed heap memory back to the OS, so the RSS before a measured call is not inflated."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # after an out-of-memory error, too: the next implementation gets the GPU back


def _is_timeout(exc: BaseException, H) -> bool:
    """True when the compile timeout fired, even if torch.compile re-raised it wrapped in its own error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, H.CompileTimeout) or "CompileTimeout" in str(exc):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _setup(task: dict):
    import torch
    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    if "compile" in task.get("impls", [task.get("impl")]):
        # Compile in this thread: no pool of compile workers competing with the timed calls, and the
        # compile timeout (SIGALRM) can interrupt it.
        import torch._dynamo  # noqa: F401
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1
        if not task.get("compile_cache"):
            # Cold compilation, what a first run pays: no reuse of graphs compiled by earlier runs.
            if hasattr(inductor_config, "force_disable_caches"):
                inductor_config.force_disable_caches = True
            else:
                inductor_config.fx_graph_cache = False
    from benchmarks import _harness as H
    return torch, H


def _compile_kwargs(task: dict) -> dict:
    mode = task.get("compile_mode")
    return {} if not mode or mode == "default" else {"mode": mode}


def run_time(task: dict, emit: Emitter) -> None:
    """Time the task's cases one after the other (small cases share a process to save start-ups)."""
    torch, H = _setup(task)
    for i, case in enumerate(task["cases"]):
        case_emit = functools.partial(emit, case_index=i)
        try:
            _time_case(task, H.Case.from_dict(case), case_emit)
        except Exception as exc:
            case_emit(event="crash", error=f"{type(exc).__name__}: {exc}"[:500],
                      traceback=traceback.format_exc()[-3000:])
        _trim_heap()


def _time_case(task: dict, case, emit) -> None:
    import torch
    from benchmarks import _harness as H
    if "compile" in task["impls"]:
        torch._dynamo.reset()  # a fresh compile per case: no recompilation limit, no dynamic-shape reuse
    impls = list(task["impls"])
    cuda = case.device.startswith("cuda")
    args = H.make_inputs(case)
    emit(event="start", env=H.environment(case.device), threads=torch.get_num_threads())

    steps, single, captured = {}, {}, {}
    for impl in impls:
        try:
            fn = H.op_function(impl, case.form, _compile_kwargs(task))
            step = H.make_step(case, fn, args)
            t0 = time.perf_counter()
            if impl == "compile":
                # The first call traces and compiles; it alone runs under the compile timeout.
                with H.alarm(task.get("compile_timeout")):
                    captured[impl] = step(capture=True)
            else:
                captured[impl] = step(capture=True)
            first = time.perf_counter() - t0
            # Warm-up: allocator, thread pools, caches. A first call of several seconds is warm
            # enough, except for compile, whose first call is dominated by compilation.
            warm = [H.time_once(step) for _ in range(task.get("warmup", 1))
                    if impl == "compile" or first < 2.0] or [first]
            single[impl] = min(warm)
            steps[impl] = step
            rec = dict(event="ready", impl=impl, first_call_s=first, warm_call_s=single[impl])
            if impl == "compile":
                rec["compile_s"] = max(first - single[impl], 0.0)
            emit(**rec)
        except Exception as exc:  # recorded in the table instead of stopping the sweep
            if _is_timeout(exc, H):
                emit(event="failed", impl=impl, status="timeout",
                     error=f"compile did not finish within {task.get('compile_timeout'):g} s",
                     elapsed_s=time.perf_counter() - t0)
            else:
                emit(event="failed", impl=impl, status="error", error=f"{type(exc).__name__}: {exc}"[:500],
                     traceback=traceback.format_exc()[-2000:])
        _trim_heap()

    # fused-unmasked computes another function than the others on a case with episodes, fused-hebb on a
    # case with neuromodulation: not checked then.
    episodes = case.episodes != "none"
    neuro = case.neuromodulation != "none"
    if "eager" in captured:
        for impl, out in captured.items():
            if impl != "eager" and not (episodes and impl == "fused-unmasked") and not (neuro and impl == "fused-hebb"):
                emit(event="check", impl=impl, max_rel_err=H.max_rel_error(out, captured["eager"]))
    if "fused-split" in captured and "fused" in captured:
        # The separate calls against the one masked call: outputs, final trace and gradients.
        emit(event="check", impl="fused-split", against="fused",
             max_rel_err=H.max_rel_error(captured["fused-split"], captured["fused"]))
    captured.clear()

    if cuda:
        for impl, step in steps.items():
            emit(event="cuda_mem", impl=impl, peak_bytes=H.cuda_peak_bytes(step))
        torch.cuda.empty_cache()

    if steps:
        def progress(r, n):
            emit(event="round", done=r, of=n)
        stats = H.interleaved_timing(steps, single, budget_s=task["budget_s"], min_rounds=task["min_rounds"],
                                     max_rounds=task["max_rounds"], min_sample_s=task["min_sample_s"],
                                     max_inner=task["max_inner"], rounds=task.get("rounds"), progress=progress)
        for impl, st in stats.items():
            emit(event="timing", impl=impl, **st)

    if task.get("bandwidth") and "fused" in steps:
        # Trace bandwidth of the fused forward alone (inference call), next to a device copy.
        fwd_case = dataclasses.replace(case, mode="fwd")
        if case.mode == "fwd":
            fwd_s = stats["fused"]["median_s"]
        else:
            fwd_step = H.make_step(fwd_case, H.op_function("fused", case.form), args)
            fwd_single = min(H.time_once(fwd_step) for _ in range(3))
            fwd_s = H.interleaved_timing({"fused": fwd_step}, {"fused": fwd_single}, budget_s=2.0, min_rounds=5,
                                         max_rounds=50, min_sample_s=task["min_sample_s"],
                                         max_inner=task["max_inner"])["fused"]["median_s"]
        traffic = H.trace_traffic_bytes(fwd_case)
        copy_bw = H.copy_bandwidth(case.device)
        emit(event="bandwidth", impl="fused", fwd_median_s=fwd_s, trace_traffic_bytes=traffic,
             trace_bw=traffic / fwd_s, copy_bw=copy_bw, bw_fraction=traffic / fwd_s / copy_bw)
    emit(event="done")


def run_mem(task: dict, emit: Emitter) -> None:
    torch, H = _setup(task)
    case = H.Case.from_dict(task["case"])
    impl = task["impl"]
    args = H.make_inputs(case)
    fn = H.op_function(impl, case.form, _compile_kwargs(task))
    step = H.make_step(case, fn, args)
    record = dict(event="mem", impl=impl)
    if impl == "compile":
        # Compilation is not the op: compile and run once, then restart the peak counter.
        t0 = time.perf_counter()
        try:
            with H.alarm(task.get("compile_timeout")):
                step()
        except Exception as exc:
            if not _is_timeout(exc, H):
                raise
            emit(event="failed", impl=impl, status="timeout",
                 error=f"compile did not finish within {task.get('compile_timeout'):g} s",
                 elapsed_s=time.perf_counter() - t0)
            return
        record["compile_peak_bytes"] = H.peak_bytes()
        _trim_heap()
        record["hwm_reset"] = H.reset_hwm()
    _trim_heap()
    record["rss_before_bytes"] = H.rss_bytes()
    record["peak_before_bytes"] = H.peak_bytes()
    t0 = time.perf_counter()
    step()
    record["call_s"] = time.perf_counter() - t0
    record["peak_bytes"] = H.peak_bytes()
    record["ru_maxrss_bytes"] = H.ru_maxrss_bytes()
    emit(**record)


def run_base(task: dict, emit: Emitter) -> None:
    torch, H = _setup(task)
    case = H.Case.from_dict(task["case"])
    import plastic_ops  # noqa: F401  (same imports as a mem child: torch, plastic_ops and its extension)
    args = H.make_inputs(case)  # noqa: F841  (allocated, like the measured child's inputs)
    _trim_heap()
    emit(event="base", peak_bytes=H.peak_bytes(), rss_bytes=H.rss_bytes(), ru_maxrss_bytes=H.ru_maxrss_bytes())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    task = json.loads(argv[0])
    emit = Emitter(task["out"])
    try:
        {"time": run_time, "mem": run_mem, "base": run_base}[task["task"]](task, emit)
    except Exception as exc:
        emit(event="crash", error=f"{type(exc).__name__}: {exc}"[:500], traceback=traceback.format_exc()[-3000:])
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
