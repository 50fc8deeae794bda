"""Fused op vs eager reference vs torch.compile of the reference, side by side: time and memory.

    python -m benchmarks.compare --device cpu --headline --out results/headline-cpu
    python -m benchmarks.compare --device cpu --quick --out results/quick-cpu
    python -m benchmarks.compare --device cuda --sizes 128 512 1000 --batches 1 8 32 128 --out results/sweep-cuda
    python -m benchmarks.compare --device cpu --sizes 100 --batches 32 --steps 200 --mode fwdbwd --episodes every:50 --impls fused,fused-unmasked,fused-split,eager --out results/episodes-cpu
    python -m benchmarks.compare --device cpu --sizes 1000 --batches 1 --steps 106 --mode fwdbwd --neuromodulation none,simple,retroactive --memory --out results/neuro-cpu

Every case runs in a fresh child process (benchmarks/_child.py) that holds all the requested
implementations at once and times them in interleaved rounds, so their ratio is measured under the
same machine load; the parent only schedules, one child at a time, and never runs an op itself.
Timings are medians of per-round samples (a sample of a fast call averages several back-to-back
calls). A benchmark never fails on a time: it reports.

Peak memory (--memory, and always with --headline):
  cpu   each implementation in a fresh child of its own that allocates the inputs, makes one call and
        reads its own peak resident set size (VmHWM, which is what ru_maxrss would report for a process
        that did not inherit its parent's peak at exec); minus the same figure of a baseline child
        that imports torch and plastic_ops and allocates the same inputs. For compile the child first
        compiles and runs once, then resets the peak counter, so that compilation is not counted.
  cuda  in the timing child: torch.cuda.max_memory_allocated during one call, minus the memory
        allocated before it.

Episodes (--episodes every:K or lengths): each row of the batch starts new episodes (a reset mask)
or stops early (lengths); fused passes them to the op, fused-unmasked makes the same call without
them (what the mask costs: fused/fused-unmasked), fused-split runs the op without a mask once per
run of steps between boundaries, zeroing the state of the rows that reset (fused-split/fused: what
the mask saves), eager passes them to the reference. Both ratios come with the spread of their
per-round values (the rounds are interleaved, so a round's samples are paired), and fused-split's
outputs and gradients are checked against fused's.

Neuromodulation (--neuromodulation none,simple,retroactive; Backpropamine, docs/op_spec.md): simple is
rule add with self-generated modulation (mod_weight, mod_bias, mod_fanout_weight, mod_fanout_bias,
learned), retroactive adds eligibility traces (eligibility_eta, learned, and an initial eligibility);
the other options' rules apply to none only. fused and eager run the neuromodulated op, fused-hebb the
fused op on the same inputs with rule hebb and no neuromodulation (today's hebb op), so fused/fused-hebb
is what the neuromodulation costs and eager/fused what the fused kernel saves on the same math, both
with the spread of their per-round values; with --memory, fused/fused-hebb of the peak memory too.

Outputs in --out: results.json (every figure and raw sample), results.csv (one row per case and
implementation), results.md (the table, with machine, date, torch version and command), and
time_vs_batch*.png; logs/ holds each child's output.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks import _harness as H

# Targets of the headline, forward+backward at T=106 (reported, never asserted): CPU at N=1000; CUDA at
# N=1001, the Miconi episode, where eager cannot hold B=128 and the fused op only has to run.
CPU_TARGETS = {1: {"speedup": 5.0}, 8: {"speedup": 3.0, "mem_fraction": 0.2}}
CUDA_TARGETS = {32: {"speedup": 3.0, "mem_fraction": 0.1}, 128: {"runs": True}}
TARGETS = {"cpu": CPU_TARGETS, "cuda": CUDA_TARGETS}

QUICK = dict(sizes=[128, 512], batches=[1, 8], steps=[10])
SWEEP = dict(sizes=[128, 512, 1000], batches={"cpu": [1, 8, 32], "cuda": [1, 8, 32, 128]}, steps=[10, 106])
HEADLINE = {"cpu": dict(n=1000, batches=[1, 8], steps=106), "cuda": dict(n=1001, batches=[1, 32, 128], steps=106)}


EPISODE_TARGETS = {"fused/fused-unmasked": ("<=", 1.05), "fused-split/fused": (">=", 4.0)}
# Neuromodulation (reported, never asserted): per variant and ratio, (operator, bound, batches the target
# is set for); all at plastic_rnn forward+backward, N=1000, T=106 on the CPU (NEURO_TARGET_CASE).
NEURO_TARGETS = {
    "simple": {"fused/fused-hebb": ("<=", 1.3, (1, 8)), "eager/fused": (">=", 8.0, (1,))},
    "retroactive": {"fused/fused-hebb": ("<=", 2.2, (1, 8)), "eager/fused": (">=", 8.0, (1,))},
}
NEURO_TARGET_CASE = dict(form="rnn", mode="fwdbwd", n=1000, steps=106, device="cpu")


def _episodes(text: str) -> str:
    try:
        H.parse_episodes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))
    return text


def _neuromodulations(text: str) -> List[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in H.NEUROMODULATIONS]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"neuromodulation must be among {', '.join(H.NEUROMODULATIONS)}, "
                                         f"got {text!r}")
    return items


def _csv_list(kind: str, allowed=None):
    def parse(text: str) -> List[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        bad = [s for s in items if allowed and s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {kind} {', '.join(bad)}; choose from {', '.join(allowed)}")
        return list(dict.fromkeys(items))
    return parse


def build_parser() -> argparse.ArgumentParser:
    from plastic_ops._validation import ACTIVATIONS, RULES
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare the fused plastic op with the eager PyTorch reference and torch.compile of it "
                    "(time, peak memory, bandwidth).", epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to benchmark on (default cpu)")
    p.add_argument("--out", default=None, help="output folder (default results/bench-<device>-<date>)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true",
                       help=f"small sweep (N {QUICK['sizes']}, B {QUICK['batches']}, T {QUICK['steps']}, "
                            "fused and eager unless --impls) that takes about a minute")
    which.add_argument("--headline", action="store_true",
                       help="the op's headline cases: plastic_rnn, hebb, tanh, per-synapse alpha, learned eta, "
                            "forward+backward; cpu: N=1000, T=106, B in {1, 8}; cuda: N=1001, T=106, B in {1, 32, 128} "
                            "(eager skipped where it cannot fit) plus the fused forward's trace bandwidth; peak "
                            "memory always measured")
    p.add_argument("--sizes", type=int, nargs="+", metavar="N", help=f"numbers of units N (default {SWEEP['sizes']})")
    p.add_argument("--batches", type=int, nargs="+", metavar="B",
                   help=f"batch sizes B (default cpu {SWEEP['batches']['cpu']}, cuda {SWEEP['batches']['cuda']})")
    p.add_argument("--steps", type=int, nargs="+", metavar="T", help=f"sequence lengths T (default {SWEEP['steps']})")
    p.add_argument("--impls", type=_csv_list("implementation", H.ALL_IMPLS), default=None,
                   help="comma-separated implementations among fused,eager,compile,fused-unmasked,fused-split,"
                        "fused-hebb (default fused,eager,compile; fused,eager with --quick and --headline; "
                        "fused,fused-unmasked,fused-split,eager with --episodes other than none; "
                        "fused,fused-hebb,eager with --neuromodulation other than none, fused-hebb after the "
                        "episodes' ones when both are given)")
    p.add_argument("--episodes", type=_episodes, nargs="+", default=["none"], metavar="SPEC",
                   help="episode structure of each row, crossed with the other options: none (one episode, "
                        "the default), every:K (a reset every K steps, each row at its own offset "
                        "(b * K // B) mod K), lengths (row lengths uniform in [T/2, T] from --seed)")
    p.add_argument("--neuromodulation", type=_neuromodulations, nargs="+", default=[["none"]], metavar="LIST",
                   help="Backpropamine variants, comma- or space-separated, crossed with the other options: "
                        "none (the op as before, the default), simple (rule add + self-generated modulation "
                        "mod_weight, mod_bias, mod_fanout_weight, mod_fanout_bias), retroactive (simple + "
                        "eligibility traces: eligibility_eta and an initial eligibility); simple and "
                        "retroactive use rule add whatever --rules says")
    p.add_argument("--mode", choices=("fwd", "fwdbwd", "both"), default=None,
                   help="forward only (no autograd graph), forward+backward, or both (default both; "
                        "fwdbwd with --headline)")
    p.add_argument("--memory", action="store_true",
                   help="measure peak memory (cpu: fresh child processes per case and implementation; "
                        "cuda peak memory is always measured)")
    p.add_argument("--forms", type=_csv_list("form", H.FORMS), default=["rnn"],
                   help="comma-separated op forms: rnn (plastic_rnn), linear (plastic_linear); default rnn")
    p.add_argument("--rules", type=_csv_list("rule", RULES), default=["hebb"],
                   help="comma-separated plasticity rules (default hebb); crossed with --activations")
    p.add_argument("--activations", type=_csv_list("activation", ACTIVATIONS), default=["tanh"],
                   help="comma-separated activations (default tanh)")
    p.add_argument("--alpha", choices=H.ALPHA_SHAPES, default="synapse",
                   help="shape of alpha: per synapse (N, N), row (N, 1), column (1, N) or scalar (default synapse)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the children (default torch's)")

    t = p.add_argument_group("timing")
    t.add_argument("--rounds", type=int, default=None,
                   help="fixed number of interleaved timing rounds (default: fill --budget within "
                        "[--min-rounds, --max-rounds])")
    t.add_argument("--budget", type=float, default=None,
                   help="seconds of timing rounds per case (default 8; 3 with --quick)")
    t.add_argument("--min-rounds", type=int, default=None,
                   help="least timing rounds per case (default 3: an eager forward+backward at N=1000, "
                        "T=106, B=8 takes tens of seconds on a small CPU)")
    t.add_argument("--max-rounds", type=int, default=25, help="most timing rounds per case (default 25)")
    t.add_argument("--warmup", type=int, default=1,
                   help="warm-up calls after the first call, when that took under 2 s (default 1)")
    t.add_argument("--min-sample", type=float, default=0.05,
                   help="seconds a timing sample should last; fast calls are repeated to fill it (default 0.05)")
    t.add_argument("--max-inner", type=int, default=200, help="most back-to-back calls in one sample (default 200)")

    c = p.add_argument_group("torch.compile and limits")
    c.add_argument("--compile-timeout", type=float, default=None,
                   help="seconds allowed for torch.compile's first call, recorded as a timeout when exceeded "
                        "(default 300; 120 with --quick)")
    c.add_argument("--compile-mode", default="default",
                   help="torch.compile mode: default, reduce-overhead, max-autotune, ... (default default)")
    c.add_argument("--compile-cache", action="store_true",
                   help="let torch.compile reuse graphs cached on disk by earlier runs (default: cold "
                        "compilation, so that the reported compile time is what a first run pays)")
    c.add_argument("--case-timeout", type=float, default=1800.0,
                   help="hard limit in seconds for one child process; it is killed and its missing results "
                        "are recorded as timeouts (default 1800)")
    c.add_argument("--mem-limit-gb", type=float, default=None,
                   help="skip eager/compile on cases whose estimated memory exceeds this (default: the "
                        "memory available at start, cpu; the GPU's memory, cuda)")
    c.add_argument("--bandwidth", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the fused forward's trace bandwidth against a device copy (default on for cuda)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    return p


def resolve_settings(a: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    if a.headline and (a.sizes or a.batches or a.steps or a.mode not in (None, "fwdbwd")):
        parser.error("--headline fixes N, B, T and the mode; drop --sizes/--batches/--steps/--mode")
    a.episodes = list(dict.fromkeys(a.episodes))
    episodes = a.episodes != ["none"]
    if a.headline and episodes:
        parser.error("--headline has no episodes; use --sizes 1000 --batches 8 --steps 106 --episodes ...")
    a.neuromodulation = list(dict.fromkeys(v for group in a.neuromodulation for v in group))
    neuro = a.neuromodulation != ["none"]
    if a.headline and neuro:
        parser.error("--headline has no neuromodulation; use --sizes 1000 --batches 1 8 --steps 106 "
                     "--mode fwdbwd --neuromodulation ...")
    if any(v < 1 for v in (a.sizes or []) + (a.batches or []) + (a.steps or [])):
        parser.error("--sizes, --batches and --steps must be positive integers")
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device on this machine "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    small = a.quick or a.headline
    if not a.impls and neuro:
        a.impls = ["fused"] + (["fused-unmasked", "fused-split"] if episodes else []) + ["fused-hebb", "eager"]
    a.impls = a.impls or (["fused", "fused-unmasked", "fused-split", "eager"] if episodes
                          else ["fused", "eager"] if small else list(H.IMPLS))
    a.mode = a.mode or ("fwdbwd" if a.headline else "both")
    a.budget = a.budget if a.budget is not None else (3.0 if a.quick else 8.0)
    a.min_rounds = a.min_rounds if a.min_rounds is not None else 3
    a.compile_timeout = a.compile_timeout if a.compile_timeout is not None else (120.0 if a.quick else 300.0)
    a.bandwidth = a.bandwidth if a.bandwidth is not None else a.device == "cuda"
    a.memory = a.memory or a.headline
    if a.out is None:
        a.out = f"results/bench-{a.device}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    if a.mem_limit_gb is None:
        if a.device == "cpu":
            avail = H.mem_available_bytes()
            a.mem_limit_gb = avail / 1024 ** 3 if avail else float("inf")
        else:
            import torch
            a.mem_limit_gb = torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
    if any(i.startswith("fused") for i in a.impls):
        import plastic_ops
        if not plastic_ops.extension_available():
            print("warning: the compiled extension is not built, so the fused op will be recorded as an error "
                  "in every case (build it first, see README.md)", file=sys.stderr)
    return a


def build_cases(a: argparse.Namespace) -> List[H.Case]:
    modes = ["fwd", "fwdbwd"] if a.mode == "both" else [a.mode]
    if a.headline:
        hl = HEADLINE[a.device]
        return [H.Case(form="rnn", n=hl["n"], batch=b, steps=hl["steps"], rule="hebb", activation="tanh",
                       alpha="synapse", mode="fwdbwd", device=a.device, seed=a.seed) for b in hl["batches"]]
    base = QUICK if a.quick else SWEEP
    sizes = a.sizes or base["sizes"]
    batches = a.batches or (base["batches"][a.device] if isinstance(base["batches"], dict) else base["batches"])
    steps = a.steps or base["steps"]
    # The neuromodulated variants are defined with rule add: --rules applies to neuromodulation=none.
    cases = [H.Case(form=f, n=n, batch=b, steps=t, rule=r if nm == "none" else H.NEURO_RULE, activation=act,
                    alpha=a.alpha, mode=m, device=a.device, seed=a.seed, episodes=ep, neuromodulation=nm)
             for ep in a.episodes for f in a.forms for nm in a.neuromodulation for r in a.rules
             for act in a.activations for m in modes for n in sizes for t in steps for b in batches]
    return list(dict.fromkeys(cases))  # a neuromodulated case once, whatever the number of --rules


# ---------------------------------------------------------------------------------------------
# Child processes

class ChildRunner:
    """Runs benchmarks._child one process at a time, with a hard timeout and live progress."""

    def __init__(self, out_dir: Path, threads: Optional[int], bar=None):
        self.log_dir = out_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.threads = threads
        self.bar = bar
        self.count = 0
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([H.REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])

    def run(self, task: dict, timeout: float, label: str) -> List[dict]:
        self.count += 1
        stem = f"{self.count:03d}_{task['task']}"
        out = self.log_dir / f"{stem}.jsonl"
        out.unlink(missing_ok=True)
        task = dict(task, out=str(out), threads=self.threads)
        with open(self.log_dir / f"{stem}.log", "w") as log:
            log.write(f"# {label}\n")
            log.flush()
            # Own session: on timeout the whole group this child started is killed, nothing else.
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks._child", json.dumps(task)],
                                    cwd=H.REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            t0 = time.monotonic()
            seen = 0
            killed = False
            try:
                while True:
                    try:
                        proc.wait(timeout=0.5)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    seen = self._progress(out, seen, label)
                    if time.monotonic() - t0 > timeout:
                        killed = True
                        break
            finally:
                # Timed out, or this process is being stopped (SIGTERM, Ctrl-C): the child, detached from
                # this process group, would outlive it and keep the device, so its whole group goes first.
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:  # it ended in between
                        pass
                    proc.wait()
        records = _read_jsonl(out)
        if killed:
            records.append({"event": "killed", "error": f"child killed after the case timeout of {timeout:g} s"})
        elif proc.returncode != 0 and not any(r["event"] == "crash" for r in records):
            tail = (self.log_dir / f"{stem}.log").read_text()[-1500:]
            records.append({"event": "crash", "error": f"child exited with status {proc.returncode}: {tail}"})
        return records

    def _progress(self, out: Path, seen: int, label: str) -> int:
        if self.bar is None:
            return seen
        recs = _read_jsonl(out)
        for r in recs[seen:]:
            where = f"case {r['case_index'] + 1}: " if "case_index" in r else ""
            if r["event"] == "ready":
                self.bar.set_postfix_str(f"{where}{r['impl']} ready ({r['first_call_s']:.1f} s first call)")
            elif r["event"] == "round":
                self.bar.set_postfix_str(f"{where}round {r['done']}/{r['of']}")
        return len(recs)


def _read_jsonl(path: Path) -> List[dict]:
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return recs


# Cases whose eager run stays below this share one timing child (saves the start-up of a process).
GROUP_BYTES = 1 << 30
GROUP_MAX = 8


def group_cases(cases: List[H.Case], a: argparse.Namespace) -> List[List[H.Case]]:
    groups, cur = [], []
    for c in cases:
        if c.eager_bytes_estimate() > GROUP_BYTES:
            groups.append([c])
            continue
        cur.append(c)
        if len(cur) == GROUP_MAX:
            groups.append(cur)
            cur = []
    return groups + ([cur] if cur else [])


def runnable_impls(case: H.Case, a: argparse.Namespace) -> Dict[str, dict]:
    rows = {impl: dict(case.to_dict(), impl=impl, status="pending", error="") for impl in a.impls}
    need = case.eager_bytes_estimate() / 1024 ** 3
    for impl in ("eager", "compile"):
        if impl in rows and need > a.mem_limit_gb:
            rows[impl].update(status="skipped", error=f"needs about {need:.0f} GiB > limit {a.mem_limit_gb:.0f} GiB")
    return rows


def time_group(group: List[H.Case], a: argparse.Namespace, runner: ChildRunner) -> List[List[dict]]:
    """Timing records of each case of the group, from one child process."""
    impls = sorted({i for c in group for i, r in runnable_impls(c, a).items() if r["status"] == "pending"},
                   key=a.impls.index)
    if not impls:
        return [[] for _ in group]
    # Cases of a group need the same implementations; cases with skipped ones are never grouped.
    task = dict(task="time", cases=[c.to_dict() for c in group], impls=impls, warmup=a.warmup, budget_s=a.budget,
                min_rounds=a.min_rounds, max_rounds=a.max_rounds, rounds=a.rounds, min_sample_s=a.min_sample,
                max_inner=a.max_inner, compile_timeout=a.compile_timeout, compile_mode=a.compile_mode,
                compile_cache=a.compile_cache, bandwidth=a.bandwidth)
    timeout = a.case_timeout * len(group)
    recs = runner.run(task, timeout, group[0].label + (f" (+{len(group) - 1} cases)" if len(group) > 1 else ""))
    per = [[r for r in recs if r.get("case_index") == i] for i in range(len(group))]
    tail = [r for r in recs if "case_index" not in r]  # killed / crashed child: applies to unfinished cases
    for i in range(len(group)):
        if not any(r["event"] == "done" for r in per[i]):
            per[i] += tail
    return per


def run_case(case: H.Case, recs: List[dict], a: argparse.Namespace, runner: ChildRunner) -> dict:
    """Rows of one case (one per implementation) from its timing records, plus its memory children."""
    rows = runnable_impls(case, a)
    run_impls = [i for i in a.impls if rows[i]["status"] == "pending"]
    records = {"time": recs, "mem": {}, "base": None}
    env = None
    if run_impls:
        for r in recs:
            impl = r.get("impl")
            ev = r["event"]
            if ev == "start":
                env = r["env"]
            elif ev == "ready":
                rows[impl].update(first_call_s=r["first_call_s"], warm_call_s=r["warm_call_s"])
                if "compile_s" in r:
                    rows[impl]["compile_s"] = r["compile_s"]
            elif ev == "failed":
                rows[impl].update(status=r["status"], error=r["error"])
                if r["status"] == "timeout":
                    rows[impl]["compile_s"] = None
            elif ev == "check":
                rows[impl][f"max_rel_err_vs_{r.get('against', 'eager')}"] = r["max_rel_err"]
            elif ev == "cuda_mem":
                rows[impl].update(peak_mb=r["peak_bytes"] / H.MB, peak_method="cuda max_memory_allocated")
            elif ev == "timing":
                rows[impl].update(status="ok", median_ms=r["median_s"] * 1e3, q1_ms=r["q1_s"] * 1e3,
                                  q3_ms=r["q3_s"] * 1e3, min_ms=r["min_s"] * 1e3, rounds=r["rounds"],
                                  inner=r["inner"], samples_ms=[s * 1e3 for s in r["samples_s"]])
            elif ev == "bandwidth":
                rows["fused"].update(fwd_ms=r["fwd_median_s"] * 1e3, trace_gbs=r["trace_bw"] / 1e9,
                                     copy_gbs=r["copy_bw"] / 1e9, bw_fraction=r["bw_fraction"])
        final = next((r for r in reversed(recs) if r["event"] in ("crash", "killed")), None)
        for impl in run_impls:
            if rows[impl]["status"] == "pending":
                status = "timeout" if final and final["event"] == "killed" else "error"
                rows[impl].update(status=status, error=(final or {}).get("error", "no result from the child")[:500])

    if a.memory and case.device == "cpu":
        ok = [i for i in a.impls if rows[i]["status"] == "ok"]
        if ok:
            base = runner.run(dict(task="base", case=case.to_dict()), 600, case.label + " baseline")
            base = next((r for r in base if r["event"] == "base"), None)
            records["base"] = base
            for impl in ok:
                task = dict(task="mem", case=case.to_dict(), impl=impl, compile_timeout=a.compile_timeout,
                            compile_mode=a.compile_mode, compile_cache=a.compile_cache)
                recs = runner.run(task, a.case_timeout, f"{case.label} memory {impl}")
                records["mem"][impl] = recs
                m = next((r for r in recs if r["event"] == "mem"), None)
                if m is None:
                    err = next((r.get("error") for r in recs if "error" in r), "no result")
                    rows[impl].update(peak_mb=None, peak_method=f"failed: {err}"[:300])
                    continue
                in_child = (m["peak_bytes"] - m["rss_before_bytes"]) / H.MB
                rows[impl]["peak_in_child_mb"] = in_child
                if impl == "compile" or base is None:
                    rows[impl].update(peak_mb=in_child, peak_method="VmHWM during the call (reset after compiling)"
                                      if m.get("hwm_reset") else "VmHWM of the child incl. compilation")
                else:
                    rows[impl].update(peak_mb=(m["peak_bytes"] - base["peak_bytes"]) / H.MB,
                                      peak_method="child peak RSS - baseline child peak RSS")
    # Ratios against eager and compile, measured in the same child.
    med = {i: rows[i].get("median_ms") for i in rows if rows[i]["status"] == "ok"}
    mem = {i: rows[i].get("peak_mb") for i in rows if rows[i].get("peak_mb")}
    for impl, row in rows.items():
        if impl in med:
            row["speedup_vs_eager"] = med["eager"] / med[impl] if "eager" in med else None
            row["speedup_vs_compile"] = med["compile"] / med[impl] if "compile" in med else None
        if impl in mem and "eager" in mem and mem["eager"] > 0:
            row["mem_fraction_of_eager"] = mem[impl] / mem["eager"]
    # Episodes: what the mask costs (fused/fused-unmasked) and what it saves (fused-split/fused).
    for name, (num, den) in EPISODE_RATIOS.items():
        if num in med and den in med:
            rows["fused"].update(paired_ratio(rows[num], rows[den], name))
    if case.episodes != "none":
        for row in rows.values():
            row["boundaries"] = len(H.episode_boundaries(case))
    # Neuromodulation: what it costs against today's hebb op (fused/fused-hebb) and what the fused kernel
    # saves on the same math (eager/fused), paired per round; the memory ratio where measured. On a case
    # without neuromodulation fused-hebb is fused itself: fused/fused-hebb is then the noise of the run.
    if "fused-hebb" in rows:
        for name, (num, den) in NEURO_RATIOS.items():
            if num in med and den in med:
                rows["fused"].update(paired_ratio(rows[num], rows[den], name))
        if mem.get("fused") and mem.get("fused-hebb"):
            rows["fused"]["mem_fused_over_fused_hebb"] = mem["fused"] / mem["fused-hebb"]
    return {"case": case.to_dict(), "rows": list(rows.values()), "records": records, "env": env}


EPISODE_RATIOS = {"fused/fused-unmasked": ("fused", "fused-unmasked"), "fused-split/fused": ("fused-split", "fused")}
NEURO_RATIOS = {"fused/fused-hebb": ("fused", "fused-hebb"), "eager/fused": ("eager", "fused")}


def ratio_key(name: str) -> str:
    return name.replace("-", "_").replace("/", "_over_")


def paired_ratio(num: dict, den: dict, name: str) -> dict:
    """num/den as the ratio of their medians, and the median and quartiles of the per-round ratios.

    The rounds are interleaved, so sample r of both was taken in the same round, under the same load.
    """
    key = ratio_key(name)
    per_round = [x / y for x, y in zip(num["samples_ms"], den["samples_ms"])]
    st = H.summarize(per_round)
    return {key: num["median_ms"] / den["median_ms"], f"{key}_round_median": st["median_s"],
            f"{key}_round_q1": st["q1_s"], f"{key}_round_q3": st["q3_s"], f"{key}_round_min": st["min_s"],
            f"{key}_round_max": st["max_s"]}


# ---------------------------------------------------------------------------------------------
# Reporting

def _f(v, fmt="{:.3g}", none="–"):
    return none if v is None else fmt.format(v)


def _cell(row: Optional[dict], key: str, fmt: str) -> str:
    if row is None:
        return ""
    if row["status"] != "ok" and key in ("median_ms",):
        return row["status"]
    return _f(row.get(key), fmt)


def markdown_table(results: List[dict], impls: List[str]) -> str:
    """One line per case: medians (ms), ratios eager/x and compile/x, peak memories (MB)."""
    episodes = any(res["case"].get("episodes", "none") != "none" for res in results)
    neuro = any(res["case"].get("neuromodulation", "none") != "none" for res in results)
    ratios = [n for n, (x, y) in EPISODE_RATIOS.items() if x in impls and y in impls]
    if neuro or "fused-hebb" in impls:
        ratios += [n for n, (x, y) in NEURO_RATIOS.items() if x in impls and y in impls]
    head = ["form", "mode", "N", "B", "T", "rule/act"] + (["episodes", "boundaries"] if episodes else []) \
        + (["neuromodulation"] if neuro else []) + [f"{i} ms" for i in impls]
    if "eager" in impls:
        head += [f"eager/{i}" for i in impls if i != "eager"]
    if "compile" in impls and "fused" in impls:
        head += ["compile/fused"]
    head += [f"{n} [per round: q1, median, q3]" for n in ratios]
    if "fused-split" in impls and "fused" in impls:
        head += ["fused-split vs fused err"]
    has_mem = any(r.get("peak_mb") is not None for res in results for r in res["rows"])
    if has_mem:
        head += [f"{i} MB" for i in impls]
    neuro_mem = neuro and has_mem and "fused" in impls and "fused-hebb" in impls
    if neuro_mem:
        head += ["fused/fused-hebb MB"]
    if "compile" in impls:
        head += ["compile s"]
    if any(r.get("trace_gbs") for res in results for r in res["rows"]):
        head += ["fused fwd GB/s", "copy GB/s", "of copy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        by = {r["impl"]: r for r in res["rows"]}
        c = res["case"]
        cells = [c["form"], c["mode"], str(c["n"]), str(c["batch"]), str(c["steps"]), f"{c['rule']}/{c['activation']}"]
        if episodes:
            cells += [c.get("episodes", "none"), _f(by[impls[0]].get("boundaries", 0), "{}")]
        if neuro:
            cells += [c.get("neuromodulation", "none")]
        cells += [_cell(by.get(i), "median_ms", "{:.3g}") for i in impls]
        if "eager" in impls:
            cells += [_f(by[i].get("speedup_vs_eager"), "{:.2f}x") for i in impls if i != "eager"]
        if "compile" in impls and "fused" in impls:
            cells += [_f(by["fused"].get("speedup_vs_compile"), "{:.2f}x")]
        for n in ratios:
            k, f = ratio_key(n), by["fused"]
            cells += [_f(f.get(k), "{:.3f}x") + (f" [{f[k + '_round_q1']:.3f}, {f[k + '_round_median']:.3f}, "
                                                 f"{f[k + '_round_q3']:.3f}]" if f.get(k) is not None else "")]
        if "fused-split" in impls and "fused" in impls:
            cells += [_f(by["fused-split"].get("max_rel_err_vs_fused"), "{:.1e}")]
        if has_mem:
            cells += [_f(by[i].get("peak_mb"), "{:.0f}") for i in impls]
        if neuro_mem:
            cells += [_f(by["fused"].get("mem_fused_over_fused_hebb"), "{:.2f}x")]
        if "compile" in impls:
            row = by["compile"]
            cells += [_f(row.get("compile_s"), "{:.0f}") if row["status"] != "timeout" else "timeout"]
        if "fused fwd GB/s" in head:
            f = by.get("fused", {})
            cells += [_f(f.get("trace_gbs"), "{:.0f}"), _f(f.get("copy_gbs"), "{:.0f}"),
                      _f(f.get("bw_fraction"), "{:.0%}")]
        lines.append("| " + " | ".join(cells) + " |")
    targets = episode_verdicts(results, ratios) + neuro_verdicts(results, ratios)
    notes = sorted({f"{r['impl']} at {res['case']['form']} {res['case']['mode']} N={res['case']['n']} "
                    f"B={res['case']['batch']} T={res['case']['steps']}"
                    + (f" neuromodulation={r['neuromodulation']}" if r.get("neuromodulation", "none") != "none" else "")
                    + f": {r['status']}: "
                    f"{(r['error'] or '-').splitlines()[0][:200]}"
                    for res in results for r in res["rows"] if r["status"] != "ok"})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    if targets:
        lines += [""] + targets
    return "\n".join(lines)


def episode_verdicts(results: List[dict], ratios: List[str]) -> List[str]:
    """A line per case with episodes and ratio: the ratio of medians against its target (never asserted)."""
    out = []
    for res in results:
        c = res["case"]
        if c.get("episodes", "none") == "none":
            continue
        f = next((r for r in res["rows"] if r["impl"] == "fused"), {})
        for n in ratios:
            if n not in EPISODE_TARGETS:
                continue
            k = ratio_key(n)
            if f.get(k) is None:
                continue
            op, tgt = EPISODE_TARGETS[n]
            ok = f[k] <= tgt if op == "<=" else f[k] >= tgt
            out.append(f"- {c['form']} {c['mode']} N={c['n']} B={c['batch']} T={c['steps']} episodes={c['episodes']}: "
                       f"{n} = {f[k]:.3f}x of medians (per round: median {f[k + '_round_median']:.3f}x, "
                       f"quartiles [{f[k + '_round_q1']:.3f}, {f[k + '_round_q3']:.3f}], range "
                       f"[{f[k + '_round_min']:.3f}, {f[k + '_round_max']:.3f}], {f.get('rounds')} rounds); "
                       f"target {op} {tgt:g}x: {'met' if ok else 'not met'}")
    return out


def neuro_verdicts(results: List[dict], ratios: List[str]) -> List[str]:
    """A line per neuromodulated case and ratio with a target: the ratio of medians against it (never
    asserted), and the memory ratio; a case other than the one the target is set for says so."""
    out = []
    for res in results:
        c = res["case"]
        variant = c.get("neuromodulation", "none")
        if variant == "none":
            continue
        f = next((r for r in res["rows"] if r["impl"] == "fused"), {})
        where = f"{c['form']} {c['mode']} N={c['n']} B={c['batch']} T={c['steps']} neuromodulation={variant}"
        for n in ratios:
            if n not in NEURO_TARGETS[variant]:
                continue
            k = ratio_key(n)
            if f.get(k) is None:
                continue
            op, tgt, batches = NEURO_TARGETS[variant][n]
            ok = f[k] <= tgt if op == "<=" else f[k] >= tgt
            set_for = all(c.get(key) == v for key, v in NEURO_TARGET_CASE.items()) and c["batch"] in batches
            scope = "" if set_for else (
                f" (the target is set for {NEURO_TARGET_CASE['form']} {NEURO_TARGET_CASE['mode']} "
                f"N={NEURO_TARGET_CASE['n']} T={NEURO_TARGET_CASE['steps']} B in {{{', '.join(map(str, batches))}}} "
                f"on the {NEURO_TARGET_CASE['device']})")
            out.append(f"- {where}: {n} = {f[k]:.3f}x of medians (per round: median {f[k + '_round_median']:.3f}x, "
                       f"quartiles [{f[k + '_round_q1']:.3f}, {f[k + '_round_q3']:.3f}], range "
                       f"[{f[k + '_round_min']:.3f}, {f[k + '_round_max']:.3f}], {f.get('rounds')} rounds); "
                       f"target {op} {tgt:g}x: {'met' if ok else 'not met'}{scope}")
        if f.get("mem_fused_over_fused_hebb") is not None:
            out.append(f"- {where}: peak memory fused/fused-hebb = {f['mem_fused_over_fused_hebb']:.2f}x "
                       f"({f['peak_mb']:.0f} MB against "
                       f"{next(r for r in res['rows'] if r['impl'] == 'fused-hebb')['peak_mb']:.0f} MB)")
    return out


def headline_table(results: List[dict], device: str) -> str:
    lines = ["| B | fused ms | eager ms | eager/fused | (of min times) | target | fused peak MB | eager peak MB "
             "| fused/eager memory | target |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        by = {r["impl"]: r for r in res["rows"]}
        b = res["case"]["batch"]
        f, e = by.get("fused", {}), by.get("eager", {})
        ratio, frac = f.get("speedup_vs_eager"), f.get("mem_fraction_of_eager")
        # The ratio of the fastest samples: less sensitive to a loaded machine than medians.
        ratio_min = e["min_ms"] / f["min_ms"] if f.get("min_ms") and e.get("min_ms") else None
        tgt = TARGETS.get(device, {}).get(b, {})

        def verdict(ok, text):
            return f"{text}: {'met' if ok else 'not met'}"
        t_time = verdict(ratio is not None and ratio >= tgt["speedup"], f">= {tgt['speedup']:g}x") \
            if "speedup" in tgt else "–"
        t_mem = verdict(frac is not None and frac <= tgt["mem_fraction"], f"<= {tgt['mem_fraction']:g}") \
            if "mem_fraction" in tgt else "–"
        if tgt.get("runs"):
            t_time = verdict(f.get("status") == "ok", "runs")

        def ms(r):
            if r.get("status") != "ok":
                return r.get("status", "–")
            return f"{r['median_ms']:.0f} [{r['q1_ms']:.0f}, {r['q3_ms']:.0f}]"
        lines.append(f"| {b} | {ms(f)} | {ms(e)} | {_f(ratio, '{:.2f}x')} | {_f(ratio_min, '{:.2f}x')} | {t_time} "
                     f"| {_f(f.get('peak_mb'), '{:.0f}')} | {_f(e.get('peak_mb'), '{:.0f}')} | {_f(frac, '{:.3f}')} "
                     f"| {t_mem} |")
    extra = []
    for res in results:
        by = {r["impl"]: r for r in res["rows"]}
        f = by.get("fused", {})
        if f.get("trace_gbs"):
            extra.append(f"- B={res['case']['batch']}: fused forward {f['fwd_ms']:.2f} ms, trace traffic "
                         f"{f['trace_gbs']:.0f} GB/s = {f['bw_fraction']:.0%} of a device copy "
                         f"({f['copy_gbs']:.0f} GB/s)")
        if "compile" in by:
            c = by["compile"]
            extra.append(f"- B={res['case']['batch']}: torch.compile: {c['status']}"
                         + (f", {c['median_ms']:.0f} ms per call, compiled in {c['compile_s']:.0f} s, "
                            f"fused is {f.get('speedup_vs_compile') or float('nan'):.2f}x faster" if c["status"] == "ok"
                            else f" ({c['error'][:200]})"))
    return "\n".join(lines + ([""] + extra if extra else []))


def env_header(env: dict, a: argparse.Namespace, command: str) -> str:
    dev = env.get("gpu") or f"{env.get('cpu_count')}-core {env.get('machine')} CPU ({env.get('cpu_model')}), " \
                             f"{env.get('mem_total_gib')} GiB"
    rounds = f"{a.rounds} rounds" if a.rounds else \
        f"rounds filling {a.budget:g} s per case, {a.min_rounds} to {a.max_rounds}"
    return (f"- machine: {dev}; torch threads {env.get('torch_threads')}\n"
            f"- date: {env.get('date')}; torch {env.get('torch')}; python {env.get('python')}\n"
            f"- command: `{command}`\n"
            f"- timing: median of interleaved rounds ({rounds}; a sample of a fast call averages back-to-back "
            f"calls to last >= {a.min_sample * 1e3:.0f} ms); {a.warmup} warm-up call(s) after the first call")


ROW_FIELDS = ["form", "mode", "device", "n", "batch", "steps", "rule", "activation", "alpha", "dtype", "impl",
              "status", "median_ms", "q1_ms", "q3_ms", "min_ms", "rounds", "inner", "speedup_vs_eager",
              "speedup_vs_compile", "first_call_s", "compile_s", "peak_mb", "mem_fraction_of_eager", "peak_method",
              "max_rel_err_vs_eager", "fwd_ms", "trace_gbs", "copy_gbs", "bw_fraction", "error"]
# Columns added only when some row has them (runs without episodes keep the columns above).
EPISODE_FIELDS = ["episodes", "boundaries", "max_rel_err_vs_fused"] + [
    ratio_key(n) + s for n in EPISODE_RATIOS for s in ("", "_round_median", "_round_q1", "_round_q3")]
NEURO_FIELDS = ["neuromodulation"] + [
    ratio_key(n) + s for n in NEURO_RATIOS for s in ("", "_round_median", "_round_q1", "_round_q3")] + [
    "mem_fused_over_fused_hebb"]


def write_outputs(out: Path, results: List[dict], a: argparse.Namespace, command: str, env: dict) -> str:
    rows = [r for res in results for r in res["rows"]]
    # episodes=none (the default) leaves the settings as they were before the option existed.
    settings = {k: v for k, v in vars(a).items()
                if not (k in ("episodes", "neuromodulation") and v == ["none"])}
    (out / "results.json").write_text(json.dumps(
        {"command": command, "env": env, "settings": settings, "rows": rows,
         "targets": TARGETS.get(a.device, {}) if a.headline else {},
         "cases": [{"case": res["case"], "records": res["records"]} for res in results]}, indent=1, default=str) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        fields = ROW_FIELDS + [k for k in EPISODE_FIELDS + NEURO_FIELDS if any(k in r for r in rows)]
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in fields})
    parts = [env_header(env, a, command), ""]
    if a.headline:
        parts += [headline_table(results, a.device), ""]
    parts += [markdown_table(results, a.impls), ""]
    md = "\n".join(parts)
    (out / "results.md").write_text(md)
    return md


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through ChildRunner.run, which kills the running child


def main(argv=None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = build_parser()
    a = resolve_settings(parser.parse_args(argv), parser)
    command = "python -m benchmarks.compare " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = build_cases(a)
    order = {c: i for i, c in enumerate(cases)}
    from experiments.common.progress import progress_bar
    results = []
    env = None
    with progress_bar(total=len(cases), desc="cases", unit="case") as bar:
        runner = ChildRunner(out, a.threads, bar)
        for group in group_cases(cases, a):
            bar.set_description(group[0].label + (f" (+{len(group) - 1})" if len(group) > 1 else ""))
            for case, recs in zip(group, time_group(group, a, runner)):
                if a.memory and case.device == "cpu":
                    bar.set_description(case.label + " memory")
                res = run_case(case, recs, a, runner)
                env = env or res["env"]
                results.append(res)
                results.sort(key=lambda r: order[H.Case.from_dict(r["case"])])  # sweep order, not run order
                bar.update(1)
                # Rewritten after every case: an interrupted sweep keeps what it measured.
                write_outputs(out, results, a, command, env or H.environment(a.device))
    env = env or H.environment(a.device)
    md = write_outputs(out, results, a, command, env)
    if not a.no_plot:
        from benchmarks.plot import plot_time_vs_batch
        title = env.get("gpu") or env.get("cpu_model", "")
        rows = [r for res in results for r in res["rows"]]
        # One figure per neuromodulation variant (simple and retroactive share rule add): time_vs_batch.png
        # for none, time_vs_batch-<variant>.png for the others.
        for nm in dict.fromkeys(r.get("neuromodulation", "none") for r in rows):
            sel = [r for r in rows if r.get("neuromodulation", "none") == nm]
            name = "time_vs_batch.png" if nm == "none" else f"time_vs_batch-{nm}.png"
            for path in plot_time_vs_batch(sel, out / name, title + ("" if nm == "none" else f", {nm}")):
                print(f"figure: {path}")
    print(md)
    print(f"written: {out / 'results.json'}, {out / 'results.csv'}, {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
