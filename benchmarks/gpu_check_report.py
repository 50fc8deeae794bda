"""Verdicts, summary and packing of benchmarks/gpu_check.sh (no torch import except in `env`).

    python benchmarks/gpu_check_report.py env WORK/env.json          # machine, versions (imports torch)
    python benchmarks/gpu_check_report.py pack --work WORK --out OUT [--print]

gpu_check.sh runs each step with its output in a scratch folder WORK and appends one line per step to
WORK/steps.tsv (name, kind, state, exit status, seconds, time cap, artifact, note). `pack` judges every step
from its exit status and its artifact, and writes into OUT at most these files, whatever ran:

    summary.txt     what the console shows last: verdict per step, mismatches, test counts, the kernel paths'
                    timings side by side, headline table
    summary.json    the same, machine-readable
    headline.json   the headline benchmark (benchmarks.compare's results.json), or why it is missing
    headline.csv    one row per case and implementation
    headline.md     the table with machine, date and command
    logs.tar.gz     everything else: every log, the JUnit XML, the per-case errors, experiment outputs

A step passes only on its own evidence: pytest with zero passed tests, or any failure, is a failure; the
reference check needs cases and no mismatch; a sanitizer needs "ERROR SUMMARY: 0 errors".
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Tuple

OUT_FILES = ("summary.txt", "summary.json", "headline.json", "headline.csv", "headline.md", "logs.tar.gz")
MAX_OUT_FILES = 8
MAX_FILE_BYTES = 16 * 1024 * 1024
ARCHIVE_BUDGET = 15 * 1024 * 1024  # under the 16 MiB a file may have, with room for tar's overhead
SKIP_SUFFIXES = (".pt", ".pth", ".ckpt")  # model checkpoints of the experiments: large, and not evidence
STEP_FIELDS = ("name", "kind", "state", "rc", "seconds", "cap", "artifact", "note")


# ---------------------------------------------------------------------------------------------
# Verdicts of single steps: (status, one-line note, details dict). status is pass, FAIL or skip.

def pytest_counts(junit: Path) -> Optional[dict]:
    """Counts of a pytest --junitxml file, and the names of failed tests (None when there is no file)."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed = []
    for s in suites:
        c["tests"] += int(s.get("tests", 0))
        c["failed"] += int(s.get("failures", 0))
        c["errors"] += int(s.get("errors", 0))
        c["skipped"] += int(s.get("skipped", 0))
        for tc in s.iter("testcase"):
            if tc.find("failure") is not None or tc.find("error") is not None:
                failed.append(f"{tc.get('classname', '')}::{tc.get('name', '')}")
    c["passed"] = c["tests"] - c["failed"] - c["errors"] - c["skipped"]
    c["failed_names"] = failed
    return c


def pytest_verdict(rc: int, counts: Optional[dict]) -> Tuple[str, str]:
    if counts is None:
        return "FAIL", f"no test report (pytest exit status {rc})"
    note = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped")
    if counts["passed"] == 0:
        return "FAIL", note + ": zero tests passed"
    if counts["failed"] or counts["errors"] or rc != 0:
        return "FAIL", note + ("" if counts["failed"] or counts["errors"] else f" (pytest exit status {rc})")
    return "pass", note


def sanitizer_verdict(rc: int, log_text: str) -> Tuple[str, str]:
    if re.search(r"device not supported|unable to find a supported device", log_text, re.I):
        return "skip", "compute-sanitizer cannot attach to this GPU here (device not supported)"
    m = re.findall(r"ERROR SUMMARY:\s*(\d+) error", log_text)
    if not m:
        return "FAIL", f"no ERROR SUMMARY line (exit status {rc})"
    n = int(m[-1])
    if n or rc != 0:
        first = next((ln.strip() for ln in log_text.splitlines() if ln.startswith("=========") and
                      ("Invalid" in ln or "Race" in ln or "Error" in ln or "hazard" in ln.lower())), "")
        return "FAIL", f"{n} errors (exit status {rc}){': ' + first[10:200] if first else ''}"
    return "pass", "ERROR SUMMARY: 0 errors"


def reference_verdict(rc: int, data: Optional[dict]) -> Tuple[str, str]:
    if not data:
        return "FAIL", f"no result file (exit status {rc})"
    s = data["summary"]
    per = ", ".join(f"{dt} {d['worst']:.1e} ({d['worst_of_tolerance']:.2g} of tolerance)"
                    for dt, d in s["per_dtype"].items())
    note = f"{s['cases']} cases, {s['mismatches']} mismatches ({s['errors']} raised); worst error {per}"
    if s["cases"] == 0 or s["mismatches"] or rc != 0:
        return "FAIL", note
    return "pass", note


def bench_verdict(rc: int, data: Optional[dict]) -> Tuple[str, str]:
    if not data:
        return "FAIL", f"no results.json (exit status {rc})"
    rows = data.get("rows", [])
    fused = [r for r in rows if r["impl"] == "fused"]
    bad = [r for r in fused if r["status"] != "ok"]
    other = [f"{r['impl']} B={r['batch']}: {r['status']} ({((r.get('error') or '-').splitlines() or ['-'])[0][:80]})"
             for r in rows if r["impl"] != "fused" and r["status"] != "ok"]
    note = f"{len(fused) - len(bad)}/{len(fused)} fused cases measured" + (f"; {'; '.join(other)}" if other else "")
    if not fused or bad or rc != 0:
        errs = "; ".join(f"B={r['batch']}: {r['status']}: {(r.get('error') or '')[:120]}" for r in bad)
        return "FAIL", note + (f"; {errs}" if errs else f" (exit status {rc})")
    return "pass", note


def timing_verdict(rc: int, data: Optional[dict]) -> Tuple[str, str]:
    """The kernel paths timed side by side: every (batch, path) measured, or a failure."""
    if not data:
        return "FAIL", f"no result file (exit status {rc})"
    rows = data.get("rows", [])
    bad = [f"B={r['B']} {r['path']}: {r.get('error') or r['status']}"[:160] for r in rows if r["status"] != "ok"]
    parts = []
    for b in sorted({r["B"] for r in rows}):
        by = {r["path"]: r for r in rows if r["B"] == b}
        ms = ", ".join(f"{p} {by[p]['median_ms']:.2f} ms" for p in data.get("paths", [])
                       if by.get(p, {}).get("median_ms"))
        sp = (data.get("speedup_v2_over_v1") or {}).get(str(b))
        gr = (data.get("speedup_graph_over_launches") or {}).get(str(b))
        parts.append(f"B={b}: {ms or 'not measured'}" + (f" ({sp:.2f}x)" if sp else "")
                     + (f" (graph {gr:.2f}x)" if gr else ""))
    note = "; ".join(parts) or "nothing measured"
    if not rows or bad or rc != 0:
        return "FAIL", note + (f"; {'; '.join(bad)}" if bad else f" (exit status {rc})")
    return "pass", note


def paths_table(data: dict) -> str:
    """Markdown: one row per batch size, the paths side by side, v1 / v2, and v2 / v2+graph when timed."""
    paths = data["paths"]
    graphs = "speedup_graph_over_launches" in data
    head = ("| B | " + " | ".join(f"{p} ms | {p} MB" for p in paths) + " | v1 / v2 |"
            + (" v2 / v2+graph |" if graphs else "") + " paths differ by |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for B in sorted({r["B"] for r in data["rows"]}):
        by = {r["path"]: r for r in data["rows"] if r["B"] == B}
        cells = []
        for p in paths:
            r = by.get(p, {})
            ms = f"{r['median_ms']:.2f}" if r.get("median_ms") is not None else (r.get("status") or "–")
            mb = f"{r['peak_mb']:.0f}" if r.get("peak_mb") is not None else "–"
            cells.append(f"{ms} | {mb}")
        ratios = [data["speedup_v2_over_v1"].get(str(B))]
        if graphs:
            ratios.append(data["speedup_graph_over_launches"].get(str(B)))
        diff = next(iter(by.values())).get("max_rel_diff_between_paths")
        lines.append(f"| {B} | " + " | ".join(cells) + " | " + " | ".join(f"{x:.2f}x" if x else "–" for x in ratios)
                     + f" | {f'{diff:.1e}' if diff is not None else '–'} |")
    return "\n".join(lines)


def plain_verdict(rc: int) -> Tuple[str, str]:
    return ("pass", "exit status 0") if rc == 0 else ("FAIL", f"exit status {rc}")


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, n: int = 4) -> str:
    try:  # progress bars rewrite their line with \r: keep what was last shown
        lines = [ln.split("\r")[-1] for ln in path.read_text(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln.strip()]
    except OSError:
        return ""
    return " | ".join(ln.strip()[:160] for ln in lines[-n:])


def judge(step: dict, work: Path) -> dict:
    """The step's line of the summary: status, note and what it measured."""
    out = dict(step)
    if step["state"] == "skip":
        out.update(status="skip", verdict_note=step["note"])
        return out
    rc = int(step["rc"])
    art = work / step["artifact"] if step["artifact"] not in ("", "-") else None
    log = work / "logs" / f"{step['name']}.log"
    kind = step["kind"]
    if kind == "pytest":
        counts = pytest_counts(art) if art else None
        status, note = pytest_verdict(rc, counts)
        out["counts"] = counts
    elif kind == "sanitizer":
        status, note = sanitizer_verdict(rc, log.read_text(errors="replace") if log.exists() else "")
    elif kind == "reference":
        data = _read_json(art) if art else None
        status, note = reference_verdict(rc, data)
        if data:
            out["reference"] = data["summary"]
            out["mismatched_cases"] = [f"{r['case']}: {r.get('error') or r['worst_tensor']}"
                                       for r in data["results"] if not r["ok"]]
    elif kind == "bench":
        status, note = bench_verdict(rc, _read_json(art) if art else None)
    elif kind == "timing":
        data = _read_json(art) if art else None
        status, note = timing_verdict(rc, data)
        if data:
            out["paths"] = data
    else:
        status, note = plain_verdict(rc)
    if rc in (124, 137):
        status, note = "FAIL", f"timed out after {step['seconds']} s (cap {step['cap']} s); " + note
    if step["note"]:
        note = f"{note}; {step['note']}"
    # A failure with no counts or per-case errors to show: the end of its log says why.
    if status == "FAIL" and not (out.get("counts") or out.get("reference")):
        out["log_tail"] = _tail(log)
    out.update(status=status, verdict_note=note)
    return out


def read_steps(work: Path) -> List[dict]:
    path = work / "steps.tsv"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == len(STEP_FIELDS):
            steps.append(dict(zip(STEP_FIELDS, parts)))
    return steps


# ---------------------------------------------------------------------------------------------
# The headline

def headline_rows(data: Optional[dict]) -> List[dict]:
    """One row per batch size: fused and eager time and memory, ratios, bandwidth, target verdicts."""
    if not data:
        return []
    by_b: Dict[int, Dict[str, dict]] = {}
    for r in data.get("rows", []):
        by_b.setdefault(int(r["batch"]), {})[r["impl"]] = r
    rows = []
    for b in sorted(by_b):
        f, e = by_b[b].get("fused", {}), by_b[b].get("eager", {})
        row = {"B": b, "N": f.get("n") or e.get("n"), "T": f.get("steps") or e.get("steps"),
               "fused_ms": f.get("median_ms") if f.get("status") == "ok" else None, "fused_status": f.get("status"),
               "eager_ms": e.get("median_ms") if e.get("status") == "ok" else None, "eager_status": e.get("status"),
               "speedup": f.get("speedup_vs_eager"), "fused_mb": f.get("peak_mb"), "eager_mb": e.get("peak_mb"),
               "mem_fraction": f.get("mem_fraction_of_eager"), "trace_gbs": f.get("trace_gbs"),
               "copy_gbs": f.get("copy_gbs"), "bw_fraction": f.get("bw_fraction"),
               "max_rel_err_vs_eager": f.get("max_rel_err_vs_eager")}
        # The targets travel in results.json (benchmarks.compare); met / not met, never a failure.
        tgt = (data.get("targets") or {}).get(str(b), {})
        verdicts = []
        if "speedup" in tgt:
            ok = row["speedup"] is not None and row["speedup"] >= tgt["speedup"]
            verdicts.append(f">= {tgt['speedup']:g}x {'met' if ok else 'not met'}")
        if "mem_fraction" in tgt:
            ok = row["mem_fraction"] is not None and row["mem_fraction"] <= tgt["mem_fraction"]
            verdicts.append(f"memory <= {tgt['mem_fraction']:g} {'met' if ok else 'not met'}")
        if tgt.get("runs"):
            verdicts.append("runs " + ("met" if row["fused_ms"] is not None else "not met"))
        row["targets"] = "; ".join(verdicts) or "–"
        rows.append(row)
    return rows


def _fmt(v, spec, none="–"):
    return none if v is None else format(v, spec)


def headline_table(rows: List[dict]) -> str:
    head = ("| B | fused ms | eager ms | eager/fused | fused MB | eager MB | fused/eager mem | fwd trace GB/s "
            "| copy GB/s | of copy | target |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        eager = _fmt(r["eager_ms"], ".1f") if r["eager_ms"] is not None else (r["eager_status"] or "–")
        fused = _fmt(r["fused_ms"], ".1f") if r["fused_ms"] is not None else (r["fused_status"] or "–")
        lines.append(f"| {r['B']} | {fused} | {eager} | {_fmt(r['speedup'], '.2f')}{'x' if r['speedup'] else ''} "
                     f"| {_fmt(r['fused_mb'], '.0f')} "
                     f"| {_fmt(r['eager_mb'], '.0f')} | {_fmt(r['mem_fraction'], '.3f')} "
                     f"| {_fmt(r['trace_gbs'], '.0f')} "
                     f"| {_fmt(r['copy_gbs'], '.0f')} | {_fmt(r['bw_fraction'], '.0%')} | {r['targets']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Summary and packing

def render(summary: dict) -> str:
    steps = summary["steps"]
    lines = ["", "=" * 100,
             f"plastic_ops GPU check: {summary['verdict']}"
             + (f"   [{summary['mode_note']}]" if summary["mode_note"] else "")]
    env = summary.get("env") or {}
    if env:
        lines.append(f"machine: {env.get('device', '?')}; torch {env.get('torch', '?')} (CUDA {env.get('cuda')}); "
                     f"nvcc {env.get('nvcc') or '–'}; compute-sanitizer {env.get('sanitizer') or 'absent'}")
        lines.append(f"git {env.get('git', '?')}; {env.get('date', '?')}; {env.get('nproc', '?')} cores")
        if env.get("memory_policy"):
            lines.append(f"memory policy (checkpoint_every=None): {env['memory_policy']}")
    lines.append(f"total {summary['seconds']} s of a {summary['budget_s']} s budget")
    lines.append("")
    lines.append(f"{'step':<22} {'status':<6} {'sec':>5} {'cap':>5}  result")
    for s in steps:
        sec = s["seconds"] if s["state"] != "skip" else "-"
        cap = s["cap"] if s["state"] != "skip" else "-"
        lines.append(f"{s['name']:<22} {s['status']:<6} {sec:>5} {cap:>5}  {s['verdict_note']}")
    for s in steps:
        if s.get("mismatched_cases"):
            lines.append(f"{s['name']}: mismatches (first 8 of {len(s['mismatched_cases'])}):")
            lines += [f"  {c[:220]}" for c in s["mismatched_cases"][:8]]
        names = (s.get("counts") or {}).get("failed_names") or []
        if names:
            lines.append(f"{s['name']}: failed tests (first 12 of {len(names)}):")
            lines += [f"  {n}" for n in names[:12]]
        if s.get("log_tail"):
            lines.append(f"{s['name']}: log tail: {s['log_tail'][:600]}")
    for s in steps:
        if s.get("paths") and s["paths"].get("rows"):
            lines.append("")
            where = s["paths"].get("gpu") or s["paths"]["device"]
            lines.append(f"kernel paths ({s['name']}): {s['paths']['what']}; {where}, {s['paths'].get('date', '')}")
            lines.append(paths_table(s["paths"]))
    lines.append("")
    hl = summary["headline"]
    if hl["rows"]:
        lines.append(f"headline: {hl['what']}")
        lines.append(headline_table(hl["rows"]))
    else:
        lines.append(f"headline: not measured ({hl['why']})")
    lines.append("")
    lines.append(f"files in OUT: {', '.join(summary['out_files'])} ({len(summary['out_files'])} of at most "
                 f"{MAX_OUT_FILES}); every log is in logs.tar.gz")
    lines.append("=" * 100)
    return "\n".join(lines) + "\n"


def _write(out: Path, name: str, data: bytes) -> None:
    tmp = out / f".{name}.part"
    tmp.write_bytes(data)
    os.replace(tmp, out / name)


def archive(work: Path) -> Tuple[bytes, List[str]]:
    """A tar.gz of WORK under the size budget: checkpoints left out, then the largest files until it fits."""
    files = sorted(p for p in work.rglob("*") if p.is_file() and not p.is_symlink())
    left_out = [f"{p.relative_to(work)} (model checkpoint)" for p in files if p.suffix in SKIP_SUFFIXES]
    keep = [p for p in files if p.suffix not in SKIP_SUFFIXES]
    while True:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for p in keep:
                tar.add(p, arcname=f"gpu_check/{p.relative_to(work)}")
            if left_out:
                info = tarfile.TarInfo("gpu_check/LEFT_OUT.txt")
                text = ("\n".join(left_out) + "\n").encode()
                info.size, info.mtime = len(text), int(time.time())
                tar.addfile(info, io.BytesIO(text))
        data = buf.getvalue()
        if len(data) <= ARCHIVE_BUDGET or not keep:
            return data, left_out
        biggest = max(keep, key=lambda p: p.stat().st_size)
        keep.remove(biggest)
        left_out.append(f"{biggest.relative_to(work)} ({biggest.stat().st_size} bytes, over the archive's budget)")


def pack(work: Path, out: Path, budget_s: int, started: float, dry_run: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    steps = [judge(s, work) for s in read_steps(work)]
    failed = [s["name"] for s in steps if s["status"] == "FAIL"]
    skipped = [s["name"] for s in steps if s["status"] == "skip"]
    if not steps:
        verdict = "FAIL (no step ran)"
    elif failed:
        verdict = f"FAIL ({len(failed)} of {len(steps)} steps failed: {', '.join(failed)})"
    else:
        verdict = "PASS" + (f" ({len(skipped)} skipped: {', '.join(skipped)})" if skipped else "")
    bench_step = next((s for s in steps if s["kind"] == "bench"), None)
    bench = _read_json(work / bench_step["artifact"]) if bench_step and bench_step["state"] != "skip" else None
    rows = headline_rows(bench)
    what = ""
    if bench and bench.get("rows"):
        r0 = bench["rows"][0]
        env = bench.get("env") or {}
        what = (f"plastic_{r0['form']} {r0['mode']}, N={r0['n']}, T={r0['steps']}, {r0['rule']}/{r0['activation']}, "
                f"alpha {r0['alpha']}, {r0['dtype']}, on {env.get('gpu') or env.get('cpu_model') or r0['device']}, "
                f"{env.get('date', '')}")
    why = "the step did not run" if not bench_step else (
        bench_step["note"] if bench_step["state"] == "skip" else "no results.json")
    summary = {"verdict": verdict, "dry_run": dry_run,
               "mode_note": "DRY RUN on the CPU: nothing here exercised the CUDA kernels" if dry_run else "",
               "env": _read_json(work / "env.json"), "budget_s": budget_s,
               "seconds": int(time.time() - started) if started else None, "steps": steps,
               "headline": {"what": what, "rows": rows, "why": why, "command": (bench or {}).get("command")},
               "out_files": list(OUT_FILES)}
    # The headline files: compare's own outputs when it ran, a statement of why not otherwise.
    has_dir = bench_step and bench_step["artifact"] not in ("", "-")
    bench_dir = (work / bench_step["artifact"]).parent if has_dir else None
    for name, src in (("headline.json", "results.json"), ("headline.csv", "results.csv"),
                      ("headline.md", "results.md")):
        path = bench_dir / src if bench_dir else None
        if path is not None and path.exists() and rows:
            data = path.read_bytes()
            if name == "headline.md":
                data = (f"# Headline: {what}\n\n{headline_table(rows)}\n\n".encode() + data)
        elif name == "headline.json":
            data = json.dumps({"measured": False, "why": why}).encode()
        elif name == "headline.csv":
            data = b"measured,why\nfalse," + why.replace(",", ";").encode() + b"\n"
        else:
            data = f"# Headline\n\nNot measured: {why}.\n".encode()
        _write(out, name, data)
    text = render(summary)
    _write(out, "summary.txt", text.encode())
    _write(out, "summary.json", json.dumps(summary, indent=1, default=str).encode())
    data, left_out = archive(work)
    _write(out, "logs.tar.gz", data)
    summary["archive_left_out"] = left_out
    return summary


def check_out_layout(out: Path) -> List[str]:
    """What in OUT would not come back: over 8 files, deeper than OUT/a/b/file, over 16 MiB, odd names."""
    problems = []
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > MAX_OUT_FILES:
        problems.append(f"{len(files)} files > {MAX_OUT_FILES}")
    for p in files:
        rel = p.relative_to(out)
        if len(rel.parts) > 3:
            problems.append(f"{rel}: deeper than OUT/a/b/file")
        if p.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {p.stat().st_size} bytes > 16 MiB")
        if not all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts):
            problems.append(f"{rel}: a name with other characters than letters, digits, '.', '_', '-'")
    return problems


# ---------------------------------------------------------------------------------------------
# The machine and the versions (the only part that imports torch)

def environment(path: Path) -> None:
    import platform
    import shutil
    import subprocess

    def cmd(*args):
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nproc": os.cpu_count(), "python": platform.python_version()}
    git = cmd("git", "rev-parse", "--short", "HEAD")
    changed = len(cmd("git", "status", "--porcelain").splitlines()) if git else 0
    env["git"] = f"{git or 'unknown'}{f' (+{changed} changed files)' if changed else ''}"
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    env["nvcc"] = (re.findall(r"release ([\d.]+)", cmd(nvcc, "--version")) or [None])[0] if nvcc else None
    san = os.environ.get("SANITIZER") or ""
    env["sanitizer"] = (re.findall(r"Version ([\d.]+)", cmd(san, "--version")) or ["present"])[0] if san else None
    env["driver"] = cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader") or None
    try:
        import torch
        env["torch"], env["cuda"] = torch.__version__, torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["device"] = (f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                             f"{p.total_memory / 2 ** 30:.1f} GiB, driver {env['driver']})")
            env["arch"] = f"{p.major}.{p.minor}"
        else:
            env["device"] = f"no GPU: {os.cpu_count()}-core {platform.machine()} CPU"
    except Exception as exc:  # reported in the summary, the steps say the rest
        env["torch"], env["device"] = f"not importable ({exc})", "unknown"
    env["memory_policy"] = memory_policy_picks()
    for mod in ("pytest", "numpy", "tqdm", "ninja"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "present")
        except Exception:
            env[mod] = None
    path.write_text(json.dumps(env, indent=1))
    print("\n".join(f"{k}: {v}" for k, v in env.items()))


def memory_policy_picks():
    """What checkpoint_every=None picks on GPU 0 at N = 1000, T = 106, float32, B = 32 and 1024 (docs/cuda.md,
    "Memory policy on CUDA"); None without a GPU. The policy needs no compiled extension."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the extension may not be built yet: the policy is Python
            from plastic_ops import ops
        T, N = 106, 1000
        available = ops.cuda_available_bytes(0)
        picks = [f"N={N}, T={T}, float32, {available / 2**30:.1f} GiB available"]
        for B in (32, 1024):
            try:
                K = ops.choose_checkpoint_every(T, B * N * N * 4, device="cuda:0", batch=B, trace_dtype=torch.float32)
                picks.append(f"B={B}: K = {K}")
            except torch.cuda.OutOfMemoryError as exc:
                picks.append(f"B={B}: OutOfMemoryError ({str(exc)[:300]})")
        return "; ".join(picks)
    except Exception as exc:
        return f"not computed ({type(exc).__name__}: {exc})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check_report.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="write the machine and versions to a JSON file")
    e.add_argument("path")
    k = sub.add_parser("pack", help="judge the steps, write the summary and the packed files into --out")
    k.add_argument("--work", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--budget", type=int, default=0)
    k.add_argument("--started", type=float, default=0.0, help="start time of the check (epoch seconds)")
    k.add_argument("--dry-run", action="store_true")
    k.add_argument("--print", action="store_true", help="print the summary")
    a = p.parse_args(argv)
    if a.cmd == "env":
        environment(Path(a.path))
        return 0
    out = Path(a.out)
    summary = pack(Path(a.work), out, a.budget, a.started, a.dry_run)
    problems = check_out_layout(out)
    if a.print:
        sys.stdout.write(render(summary))
        for pr in problems:
            print(f"warning: OUT would not come back whole: {pr}")
    return 0 if summary["verdict"].startswith("PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
