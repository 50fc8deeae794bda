"""benchmarks/gpu_check.sh in its dry-run mode (CPU only), and the verdicts of its report.

The GPU machine returns at most 8 files from $OUT, no deeper than OUT/a/b/file: the dry run checks that
layout and the summary; the report's verdicts are checked on synthetic step results (a test step where
nothing passed is a failure, a sanitizer error is a failure, a time-out is a failure).
"""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import plastic_ops
from benchmarks import cuda_vs_reference as cvr
from benchmarks import gpu_check_report as report

REPO = Path(__file__).resolve().parents[1]


def run_check(tmp_path, name, **env):
    """Runs the script in dry-run mode; returns (exit status, stdout, OUT, the script's pid)."""
    out, work = tmp_path / f"{name}-out", tmp_path / f"{name}-work"
    full_env = dict(os.environ, OUT=str(out), GPU_CHECK_WORK=str(work), PYTHON=sys.executable,
                    GPU_CHECK_DRY_RUN="1", GPU_CHECK_SKIP_BUILD="1", **env)
    full_env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    stdout, _ = proc.communicate(timeout=300)
    return proc.returncode, stdout, out, proc.pid


def step_lines(summary_text):
    """{step name: (status, rest of the line)} from the step table of summary.txt."""
    lines = summary_text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("step "))
    steps = {}
    for ln in lines[start + 1:]:
        if not ln.strip():
            break
        parts = ln.split(None, 4)
        steps[parts[0]] = (parts[1], parts[4] if len(parts) > 4 else "")
    return steps


def test_dry_run_layout_and_summary(tmp_path):
    rc, stdout, out, _ = run_check(tmp_path, "full")
    assert rc == 0, stdout[-4000:]
    assert report.check_out_layout(out) == []
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(report.OUT_FILES) and len(files) <= 8

    text = (out / "summary.txt").read_text()
    assert "DRY RUN" in text and "PASS" in text
    # The console shows the summary last.
    assert stdout.rstrip().endswith(text.rstrip())
    steps = step_lines(text)
    assert list(steps) == ["env", "build", "reference", "paths", "memcheck", "racecheck", "tests", "bench",
                           "exp_pattern", "exp_classification", "exp_denoising"]
    assert steps["build"][0] == "skip" and "skip-build" in steps["build"][1]
    assert steps["memcheck"][0] == steps["racecheck"][0] == "skip"
    for name in ("env", "reference", "paths", "tests", "bench", "exp_pattern", "exp_classification", "exp_denoising"):
        assert steps[name][0] == "pass", (name, steps[name])
    assert "0 mismatches" in steps["reference"][1] and "worst error float64" in steps["reference"][1]

    summary = json.loads((out / "summary.json").read_text())
    by = {s["name"]: s for s in summary["steps"]}
    counts = by["tests"]["counts"]
    assert counts["passed"] >= 2 and counts["failed"] == counts["errors"] == 0
    assert f"{counts['passed']} passed" in steps["tests"][1]
    ref = by["reference"]["reference"]
    assert ref["cases"] > 20 and ref["mismatches"] == 0 and ref["worst"] < 1e-9
    assert ref["per_path"]["v2"]["cases"] == ref["cases"]

    # Both kernel paths timed side by side (on the CPU both run the CPU kernel: the same results).
    paths = by["paths"]["paths"]
    assert paths["paths"] == ["v1", "v2"] and sorted({r["B"] for r in paths["rows"]}) == [1, 2]
    assert all(r["status"] == "ok" and r["median_ms"] > 0 and r["rounds"] == 2 for r in paths["rows"])
    assert all(r["max_rel_diff_between_paths"] == 0 for r in paths["rows"])
    assert set(paths["speedup_v2_over_v1"]) == {"1", "2"}
    assert "| B | v1 ms | v1 MB | v2 ms | v2 MB | v1 / v2 | paths differ by |" in text

    # The headline: one row per batch size, both implementations timed, ratios shown.
    rows = summary["headline"]["rows"]
    assert [r["B"] for r in rows] == [1, 2]
    assert all(r["fused_ms"] > 0 and r["eager_ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert "| B | fused ms | eager ms | eager/fused |" in text
    assert json.loads((out / "headline.json").read_text())["rows"]
    assert (out / "headline.csv").read_text().startswith("form,mode,device")
    assert "| B | fused ms |" in (out / "headline.md").read_text()

    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    for log in ("env", "reference", "paths", "tests", "bench", "exp_pattern", "exp_classification",
                "exp_denoising"):
        assert f"gpu_check/logs/{log}.log" in names
    assert "gpu_check/tests.junit.xml" in names and "gpu_check/reference.json" in names
    assert not any(n.endswith(".pt") for n in names)


def test_dry_run_zero_tests_is_a_failure(tmp_path):
    # Only the test step, with a selection that matches no test: pytest runs nothing, the check fails.
    rc, stdout, out, _ = run_check(tmp_path, "none", GPU_CHECK_STEPS="tests",
                                   GPU_CHECK_PYTEST_K="no_test_has_this_name")
    assert rc == 1, stdout[-4000:]
    steps = step_lines((out / "summary.txt").read_text())
    assert steps["tests"][0] == "FAIL" and "0 passed" in steps["tests"][1]
    assert all(steps[n][0] == "skip" for n in steps if n != "tests")
    assert "not in GPU_CHECK_STEPS" in steps["reference"][1]
    assert "FAIL (1 of" in (out / "summary.txt").read_text()
    assert report.check_out_layout(out) == []


def test_dry_run_step_over_its_cap_is_killed(tmp_path):
    # An 8 s cap on a benchmark asked to time far more rounds than it can in 8 s (a parent, and a child
    # detached from its process group): the step is reported as timed out, and no process is left behind.
    rc, stdout, out, pid = run_check(tmp_path, "cap", GPU_CHECK_STEPS="bench", GPU_CHECK_CAP="8",
                                     GPU_CHECK_DRY_BENCH_ARGS="--budget 100000 --min-rounds 100000 "
                                                              "--max-rounds 100000")
    assert rc == 1, stdout[-4000:]
    steps = step_lines((out / "summary.txt").read_text())
    assert steps["bench"][0] == "FAIL" and "timed out" in steps["bench"][1]
    token = f"GPU_CHECK_TOKEN={pid}-".encode()  # the script's tokens start with its pid
    left = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if token in environ.read_bytes():
                left.append(environ.parent.name)
        except OSError:  # another user's process, or one that just ended
            pass
    assert left == []


# ---------------------------------------------------------------------------------------------
# Verdicts on synthetic step results

def junit(path, tests, failures=0, errors=0, skipped=0):
    cases = "".join(f'<testcase classname="t" name="case{i}">' + ("<failure/>" if i < failures else "") +
                    "</testcase>" for i in range(tests))
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{tests}" '
                    f'failures="{failures}" errors="{errors}" skipped="{skipped}">{cases}</testsuite></testsuites>')
    return path


def test_pytest_verdicts(tmp_path):
    status, note = report.pytest_verdict(0, report.pytest_counts(junit(tmp_path / "a.xml", 114, skipped=114)))
    assert status == "FAIL" and "0 passed" in note and "114 skipped" in note
    status, note = report.pytest_verdict(5, report.pytest_counts(junit(tmp_path / "b.xml", 0)))
    assert status == "FAIL" and "zero tests passed" in note
    counts = report.pytest_counts(junit(tmp_path / "c.xml", 10, failures=2))
    status, note = report.pytest_verdict(1, counts)
    assert status == "FAIL" and "8 passed, 2 failed" in note and counts["failed_names"] == ["t::case0", "t::case1"]
    assert report.pytest_verdict(0, report.pytest_counts(junit(tmp_path / "d.xml", 10, skipped=1)))[0] == "pass"
    assert report.pytest_verdict(2, None)[0] == "FAIL"  # no report at all


def test_sanitizer_verdicts():
    assert report.sanitizer_verdict(0, "========= ERROR SUMMARY: 0 errors\n")[0] == "pass"
    status, note = report.sanitizer_verdict(
        9, "========= Invalid __global__ write of size 4 bytes\n========= ERROR SUMMARY: 3 errors\n")
    assert status == "FAIL" and "3 errors" in note and "Invalid __global__ write" in note
    assert report.sanitizer_verdict(0, "no summary here")[0] == "FAIL"
    assert report.sanitizer_verdict(1, "========= Error: Device not supported\n")[0] == "skip"


def test_step_judgement(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "exp.log").write_text("Traceback\nRuntimeError: boom\n")
    step = dict(name="exp", kind="plain", state="ran", rc="124", seconds="40", cap="40", artifact="-", note="")
    judged = report.judge(step, tmp_path)
    assert judged["status"] == "FAIL" and "timed out" in judged["verdict_note"] and "boom" in judged["log_tail"]
    ref = {"summary": {"cases": 3, "mismatches": 1, "errors": 0,
                       "per_dtype": {"float64": {"worst": 0.5, "worst_of_tolerance": 5e8}}},
           "results": [{"case": "c", "ok": False, "worst_tensor": "dw"}]}
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    judged = report.judge(dict(step, name="reference", kind="reference", rc="0", artifact="ref.json"), tmp_path)
    assert judged["status"] == "FAIL" and "1 mismatches" in judged["verdict_note"]
    assert judged["mismatched_cases"] == ["c: dw"]


def test_timing_verdicts():
    def row(b, path, ms, status="ok", error=None):
        return dict(B=b, path=path, median_ms=ms, status=status, error=error, peak_mb=10.0,
                    max_rel_diff_between_paths=1e-7)
    data = {"what": "w", "device": "cuda", "paths": ["v1", "v2"], "speedup_v2_over_v1": {"1": 2.0},
            "rows": [row(1, "v1", 4.0), row(1, "v2", 2.0)]}
    status, note = report.timing_verdict(0, data)
    assert status == "pass" and note == "B=1: v1 4.00 ms, v2 2.00 ms (2.00x)"
    assert "| 1 | 4.00 | 10 | 2.00 | 10 | 2.00x | 1.0e-07 |" in report.paths_table(data)
    data["rows"].append(row(128, "v1", None, status="error", error="OutOfMemoryError: CUDA out of memory"))
    status, note = report.timing_verdict(0, data)
    assert status == "FAIL" and "B=128 v1: OutOfMemoryError" in note
    assert report.timing_verdict(1, None)[0] == "FAIL"


def test_timing_with_graphs_reports_the_launch_cost():
    def row(path, ms):
        return dict(B=1, path=path, median_ms=ms, status="ok", error=None, peak_mb=10.0,
                    max_rel_diff_between_paths=0.0)
    data = {"what": "w", "device": "cuda", "paths": ["v1", "v2", "v1+graph", "v2+graph"],
            "speedup_v2_over_v1": {"1": 2.0}, "speedup_graph_over_launches": {"1": 4.0},
            "rows": [row("v1", 4.0), row("v2", 2.0), row("v1+graph", 1.5), row("v2+graph", 0.5)]}
    status, note = report.timing_verdict(0, data)
    assert status == "pass" and note.endswith("(2.00x) (graph 4.00x)")
    table = report.paths_table(data)
    assert "| v2+graph ms | v2+graph MB | v1 / v2 | v2 / v2+graph | paths differ by |" in table
    assert "| 1 | 4.00 | 10 | 2.00 | 10 | 1.50 | 10 | 0.50 | 10 | 2.00x | 4.00x | 0.0e+00 |" in table


def test_out_layout_limits(tmp_path):
    for i in range(9):
        (tmp_path / f"f{i}.txt").write_text("x")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "file").write_text("x")
    problems = report.check_out_layout(tmp_path)
    assert any("10 files > 8" in p for p in problems)
    assert any("deeper than" in p for p in problems)


def test_archive_stays_under_its_budget(tmp_path, monkeypatch):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "small.log").write_text("kept\n")
    (tmp_path / "big.bin").write_bytes(os.urandom(200_000))
    (tmp_path / "model.pt").write_bytes(b"0" * 100)
    monkeypatch.setattr(report, "ARCHIVE_BUDGET", 50_000)
    data, left_out = report.archive(tmp_path)
    assert len(data) <= 50_000
    assert any(s.startswith("big.bin") for s in left_out) and any(s.startswith("model.pt") for s in left_out)


# ---------------------------------------------------------------------------------------------
# The CUDA-vs-reference matrix (run here on the CPU kernels)

def test_reference_matrix_covers_every_option():
    cases = cvr.build_cases()
    assert {c.form for c in cases} == {"linear", "rnn"} and {c.rule for c in cases} == {"hebb", "oja"}
    assert {c.activation for c in cases} == set(cvr.ACTIVATIONS) and {c.alpha for c in cases} == set(cvr.ALPHA_SHAPES)
    assert {c.modulation for c in cases} == set(cvr.MODULATIONS) and {c.dtype for c in cases} == set(cvr.DTYPES)
    assert {c.clip is None for c in cases} == {True, False}
    assert any(c.T == 1 for c in cases) and any(c.B == 1 for c in cases)
    assert any(not (c.trace or c.bias or c.y0) for c in cases)


@pytest.mark.skipif(not plastic_ops.extension_available(), reason="needs the compiled extension")
def test_reference_check_finds_a_wrong_result(monkeypatch):
    case = cvr.Case("test", "linear", "float64", T=3, B=2, n_in=4, n_out=5, modulation="shared")
    assert cvr.check_case(case, "cpu")["ok"]
    real = plastic_ops.plastic_linear

    def off_by_a_little(*args, **kw):
        y, h = real(*args, **kw)
        return y, h * (1 + 1e-6)
    monkeypatch.setattr(plastic_ops, "plastic_linear", off_by_a_little)
    res = cvr.check_case(case, "cpu")
    assert not res["ok"] and 1e-9 < res["errors"]["trace_T"] < 1e-4


def test_headline_rows_and_targets():
    # A results.json as benchmarks.compare --headline writes it on CUDA: eager skipped at B=128.
    def row(impl, b, **kw):
        base = dict(impl=impl, batch=b, n=1001, steps=106, form="rnn", mode="fwdbwd", status="ok")
        return {**base, **kw}
    data = {"settings": {"device": "cuda"},
            "targets": {"32": {"speedup": 3.0, "mem_fraction": 0.1}, "128": {"runs": True}},
            "rows": [row("fused", 1, median_ms=10.0, speedup_vs_eager=2.0, peak_mb=100.0, trace_gbs=900.0,
                         copy_gbs=4000.0, bw_fraction=0.225, mem_fraction_of_eager=0.5),
                     row("eager", 1, median_ms=20.0, peak_mb=200.0),
                     row("fused", 32, median_ms=40.0, speedup_vs_eager=4.0, peak_mb=3000.0,
                         mem_fraction_of_eager=0.2),
                     row("eager", 32, median_ms=160.0, peak_mb=15000.0),
                     row("fused", 128, median_ms=150.0, peak_mb=12000.0),
                     row("eager", 128, status="skipped", error="needs about 304 GiB > limit 139 GiB")]}
    rows = report.headline_rows(data)
    assert [r["B"] for r in rows] == [1, 32, 128]
    assert rows[1]["targets"] == ">= 3x met; memory <= 0.1 not met"
    assert rows[2]["targets"] == "runs met" and rows[2]["eager_ms"] is None
    table = report.headline_table(rows)
    assert "| 1 | 10.0 | 20.0 | 2.00x | 100 | 200 | 0.500 | 900 | 4000 | 22% | – |" in table
    assert "| 128 | 150.0 | skipped | – | 12000 | – |" in table
    status, note = report.bench_verdict(0, data)
    assert status == "pass" and "3/3 fused cases measured" in note and "eager B=128: skipped (needs about 304" in note
    data["rows"][4].update(status="error", error="CUDA error: an illegal memory access")
    status, note = report.bench_verdict(0, data)
    assert status == "FAIL" and "illegal memory access" in note
