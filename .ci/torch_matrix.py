#!/usr/bin/env python3
"""The torch compatibility matrix: every supported torch release, each built and tested in isolation.

For each torch release of LEGS (or those chosen with --torch), one after the other:
  1. the working tree (`git ls-files --cached --others --exclude-standard`: uncommitted edits
     included; virtual environments, build outputs and compiled modules not) is copied into a fresh
     folder, so that the in-place build there never replaces the checkout's own plastic_ops/_C*.so;
  2. a fresh virtual environment gets that torch, its torchvision and the rest of requirements.txt;
  3. the extension is built there, CPU-only and in place (PLASTIC_OPS_CPU_ONLY=1);
  4. the whole test suite runs there (`python -m pytest tests`), its output echoed to stdout.
A failing release does not stop the others; the exit status is 1 when any release failed to
install, to build, or had a failing test or an error.

Printed at the end, and written to results/torch-matrix.md with the failing tests: a markdown
table, one row per release. --write-readme also puts it into README.md, between the markers
<!-- torch-matrix:begin --> and <!-- torch-matrix:end -->. Logs and JUnit XML files go to
results/torch-matrix/.

  python3 .ci/torch_matrix.py                      # all releases (`make torch-matrix` adds --write-readme)
  python3 .ci/torch_matrix.py --torch 2.4.1        # the oldest only (`make test-oldest-torch`)
  python3 .ci/torch_matrix.py --torch 2.4.1 --keep .torch-matrix --pytest-args "tests/test_validation.py"

Standard library only: it runs before any virtual environment exists.
"""
import argparse
import datetime
import fcntl
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# (torch, torchvision made for it, numpy requirement).
# numpy: no wheel of these asks for numpy<2 (torch's metadata names no numpy at all, each torchvision's
# a plain `numpy`), so pip alone gives every release the newest numpy, 2.4.6 as of 2026-12-07. The
# cap is not needed by torch 2.4.1 or 2.5.1 either: their wheels work with NumPy 2 (torch.from_numpy,
# Tensor.numpy and torchvision's transforms included), and with numpy 2.4.6 (`--numpy "numpy>=2"`) both passed and failed exactly the same tests as with
# numpy 1.26.4, with no NumPy warning. Those two legs keep numpy<2 anyway: they test the numpy 1.x
# that environments of that time still have, while the later legs test numpy 2.
LEGS = [
    ("2.4.1", "0.19.1", "numpy<2"),
    ("2.5.1", "0.20.1", "numpy<2"),
    ("2.6.0", "0.21.0", "numpy"),
    ("2.14.1", "0.29.1", "numpy"),
]
PINNED_HERE = {"torch", "torchvision", "numpy"}  # requirements.txt's own lines for these are replaced
BEGIN, END = "<!-- torch-matrix:begin -->", "<!-- torch-matrix:end -->"
# Never copied, even when not ignored: top-level folders of environments and outputs, and caches anywhere.
COPY_SKIP_TOP = {".venv", "venv", "build", "dist", "results", ".torch-matrix"}


def say(msg):
    """A progress line on stderr: a full run takes long."""
    print(f"[torch-matrix {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt_time(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---------------------------------------------------------------------------------------------
# the copy of the working tree

def tree_files(repo):
    """The working tree's files as git sees them: tracked (as they are now) and untracked-but-not-ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=repo, check=True, capture_output=True).stdout.decode()
    files = []
    for rel in sorted(set(filter(None, out.split("\0")))):
        parts = Path(rel).parts
        if (len(parts) > 1 and (parts[0] in COPY_SKIP_TOP or parts[0].endswith(".egg-info")))   \
                or "__pycache__" in parts or rel.endswith((".so", ".o", ".pyc")):
            continue
        if os.path.lexists(repo / rel):  # a tracked file deleted in the working tree is left out
            files.append(rel)
    return files


def copy_tree(repo, dest):
    files = tree_files(repo)
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target, follow_symlinks=False)
    return len(files)


# ---------------------------------------------------------------------------------------------
# running the steps

def clean_env(venv):
    """The environment of the venv's commands: its bin/ first (ninja), nothing of the caller's Python setup."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")
    env["VIRTUAL_ENV"] = str(venv)
    return env


def run_logged(cmd, log, cwd, env, echo=False):
    """Runs cmd, its stdout and stderr into the log (and to our stdout when echo). Returns (rc, seconds)."""
    start = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(str(c) for c in cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            for raw in proc.stdout:
                line = raw.decode(errors="replace")
                f.write(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            rc = proc.wait()
        finally:  # stopped: the child goes too
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, time.monotonic() - start


def tail(path, n=15):
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError:
        return ""


def requirements(repo, numpy_req):
    """requirements.txt without its torch/torchvision pins, numpy as this leg wants it, and wheel."""
    reqs = []
    for line in (repo / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[\s<>=!~\[;]", line, maxsplit=1)[0].lower()
        if name not in PINNED_HERE:
            reqs.append(line)
    reqs.append(numpy_req)
    if "wheel" not in [re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in reqs]:
        reqs.append("wheel")
    return reqs


def build_outcome(rc, log, src):
    """The build's outcome in one short phrase."""
    text = Path(log).read_text(errors="replace")
    if rc != 0:
        errors = [l.strip().replace(f"{src}/", "") for l in text.splitlines() if re.search(r"\berror\b", l, re.I)]
        return "failed: " + (errors[0][:160] if errors else f"exit status {rc}")
    lines = text.splitlines()
    compiler = [l for l in lines if re.search(r"\.(c|cc|cpp|cxx|cu|h|hpp|cuh):\d+:(\d+:)? warning:", l)]
    # Python warnings of the build tools ("site-packages/setuptools/x.py:108: SomeWarning: ..."), by package
    python = sorted({m.group(1) for l in lines for m in [re.search(r"site-packages/([^/]+)/\S*\.py:\d+: \w+: ", l)] if m})
    try:
        info = json.loads((src / "plastic_ops" / "_build_info.json").read_text())
        kind = "CPU and CUDA" if info.get("with_cuda") else "CPU-only"
    except (OSError, ValueError):
        kind = "built"
    phrase = f"{kind}, " + (f"{len(compiler)} compiler warning{'s' if len(compiler) > 1 else ''}" if compiler
                            else "no compiler warnings")
    if python:
        phrase += f" (Python warnings from {', '.join(python)})"
    return phrase


def nodeid(classname, name, src):
    """A JUnit (classname, name) pair back to pytest's node id: tests.test_x.TestY + test_z -> tests/test_x.py::TestY::test_z."""
    parts = classname.split(".") if classname else []
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (src / path).exists():
            return "::".join([path] + parts[i:] + [name])
    return "::".join(parts + [name])


def parse_junit(xml_path, src):
    """(counts, failing) from pytest's JUnit XML; failing is [(node id, kind, first line of the message)]."""
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failing = []
    for suite in suites:
        tests = int(suite.get("tests", 0))
        failed, errors, skipped = (int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
        counts["failed"] += failed
        counts["errors"] += errors
        counts["skipped"] += skipped
        counts["passed"] += tests - failed - errors - skipped
        for case in suite.iter("testcase"):
            for kind in ("failure", "error"):
                for el in case.findall(kind):
                    message = (el.get("message") or el.text or "").strip().splitlines()
                    failing.append((nodeid(case.get("classname", ""), case.get("name", ""), src), kind,
                                    message[0][:300] if message else ""))
    return counts, failing


SUMMARY_RE = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)")


def parse_summary_line(log):
    """The counts from pytest's final line ("3 failed, 240 passed, 114 skipped in 301.2s"), when there is no XML."""
    lines = [l for l in Path(log).read_text(errors="replace").splitlines() if l.strip()]
    for line in reversed(lines):
        found = SUMMARY_RE.findall(line)
        if found and re.search(r" in [\d.]+s", line):
            counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
            for n, what in found:
                key = {"error": "errors", "errors": "errors"}.get(what, what)
                if key in counts:
                    counts[key] += int(n)
            return counts, line.strip("= ").strip()
    return None, None


def failing_from_log(log):
    """Node ids from pytest's short summary ("FAILED tests/x.py::t - message")."""
    out = []
    for line in Path(log).read_text(errors="replace").splitlines():
        m = re.match(r"(FAILED|ERROR) (\S+)(?: - (.*))?$", line)
        if m:
            out.append((m.group(2), "failure" if m.group(1) == "FAILED" else "error", (m.group(3) or "")[:300]))
    return out


# ---------------------------------------------------------------------------------------------
# one leg

def run_leg(leg, args, work, logs):
    torch_v, tv_v, numpy_req = leg
    res = {"torch_wanted": torch_v, "torch": torch_v, "torchvision": tv_v, "numpy": "?", "install": None,
           "build": "not run", "counts": None, "failing": [], "pytest_line": None, "ok": False, "times": {}}
    src, venv = work / "src", work / "venv"
    leg_logs = logs / f"torch-{torch_v}"
    leg_logs.mkdir(parents=True, exist_ok=True)

    say(f"torch {torch_v}: copying the working tree into {src}")
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    say(f"torch {torch_v}: {copy_tree(REPO, src)} files copied")

    pkgs = [f"torch=={torch_v}", f"torchvision=={tv_v}"] + requirements(REPO, numpy_req)
    marker = venv / ".torch-matrix-installed"  # what a kept environment was made with
    if marker.exists() and marker.read_text() == "\n".join(pkgs):
        say(f"torch {torch_v}: reusing the kept virtual environment {venv}")
        res["times"]["install"] = None  # reused, not installed
    else:
        if venv.exists():
            shutil.rmtree(venv)
        say(f"torch {torch_v}: creating a fresh virtual environment with {args.python}")
        subprocess.run([args.python, "-m", "venv", str(venv)], check=True)
        say(f"torch {torch_v}: installing {' '.join(pkgs)} (log: {leg_logs / 'install.log'})")
        rc, secs = run_logged([venv / "bin" / "python", "-m", "pip", "install", "-q"] + pkgs,
                              leg_logs / "install.log", src, clean_env(venv))
        res["times"]["install"] = secs
        if rc != 0:
            errors = [l[len("ERROR: "):] for l in tail(leg_logs / "install.log", 40).splitlines() if l.startswith("ERROR: ")]
            res["install"] = f"pip install failed: {errors[-1][:160]}" if errors else f"pip install failed (exit status {rc})"
            res["build"] = "not built: install failed"
            say(f"torch {torch_v}: INSTALL FAILED\n{tail(leg_logs / 'install.log')}")
            return res
        marker.write_text("\n".join(pkgs))

    probe = ("import json, torch, torchvision, numpy, setuptools; print(json.dumps({'torch': torch.__version__, "
             "'torchvision': torchvision.__version__, 'numpy': numpy.__version__, 'setuptools': setuptools.__version__}))")
    proc = subprocess.run([venv / "bin" / "python", "-c", probe], cwd=work, env=clean_env(venv),
                          capture_output=True, text=True)
    if proc.returncode == 0:
        res.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        res["install"] = "import failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        say(f"torch {torch_v}: the installed packages do not import:\n{proc.stderr[-2000:]}")
        res["build"] = "not built: import failed"
        return res
    took = res["times"]["install"]
    say(f"torch {torch_v}: torch {res['torch']}, torchvision {res['torchvision']}, numpy {res['numpy']}"
        + (f", installed in {fmt_time(took)}" if took is not None else ""))

    say(f"torch {torch_v}: building in place, CPU-only (log: {leg_logs / 'build.log'})")
    env = clean_env(venv)
    env["PLASTIC_OPS_CPU_ONLY"] = "1"
    rc, secs = run_logged([venv / "bin" / "python", "setup.py", "-q", "build_ext", "--inplace"],
                          leg_logs / "build.log", src, env)
    res["times"]["build"] = secs
    res["build"] = build_outcome(rc, leg_logs / "build.log", src)
    if rc != 0:
        say(f"torch {torch_v}: BUILD FAILED in {fmt_time(secs)}: {res['build']}\n{tail(leg_logs / 'build.log')}")
        return res
    say(f"torch {torch_v}: built in {fmt_time(secs)}: {res['build']}")

    junit = leg_logs / "junit.xml"
    if junit.exists():
        junit.unlink()
    cmd = [venv / "bin" / "python", "-m", "pytest"] + (shlex.split(args.pytest_args) if args.pytest_args else ["tests"])
    cmd += ["-q", f"--junitxml={junit}"]
    say(f"torch {torch_v}: running {' '.join(str(c) for c in cmd[1:])} (log: {leg_logs / 'pytest.log'})")
    print(f"\n=== torch {res['torch']}: python -m pytest "
          f"{args.pytest_args or 'tests'} -q ===", flush=True)
    rc, secs = run_logged(cmd, leg_logs / "pytest.log", src, clean_env(venv), echo=True)
    res["times"]["tests"] = secs
    res["pytest_rc"] = rc
    counts, line = parse_summary_line(leg_logs / "pytest.log")
    res["pytest_line"] = line
    try:
        res["counts"], res["failing"] = parse_junit(junit, src)
    except (OSError, ET.ParseError):  # pytest died before writing it: its last line, if any
        res["counts"] = counts
        res["failing"] = failing_from_log(leg_logs / "pytest.log")
    c = res["counts"]
    res["ok"] = rc == 0 and c is not None and c["failed"] == 0 and c["errors"] == 0
    say(f"torch {torch_v}: tests {'passed' if res['ok'] else 'FAILED'} in {fmt_time(secs)}: "
        f"{counts_text(res)} (pytest exit status {rc})")
    return res


# ---------------------------------------------------------------------------------------------
# the report

def counts_text(res):
    c = res["counts"]
    if c is None:
        if res.get("pytest_rc") is not None:
            return f"no result (pytest exit status {res['pytest_rc']})"
        return "not run"
    parts = [f"{c['passed']} passed"]
    if c["failed"]:
        parts.append(f"**{c['failed']} failed**")
    if c["errors"]:
        parts.append(f"**{c['errors']} errors**")
    parts.append(f"{c['skipped']} skipped")
    if c["failed"] == 0 and c["errors"] == 0 and res.get("pytest_rc") not in (0, None):
        parts.append(f"**pytest exit status {res['pytest_rc']}**")
    return ", ".join(parts)


def machine():
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model or platform.processor() or 'an unknown CPU'} ({platform.machine()}, {cores} cores, no GPU used)"


def venv_python_version(args):
    out = subprocess.run([args.python, "-c", "import platform; print(platform.python_version())"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "?"


def table(results):
    rows = ["| torch | torchvision | numpy | build (CPU-only, in place) | tests (`python -m pytest tests`) "
            "| wall time (install + build + tests) |",
            "|---|---|---|---|---|---|"]
    for r in results:
        t = r["times"]
        wall = " + ".join(("kept" if t[k] is None else fmt_time(t[k])) if k in t else "-"
                          for k in ("install", "build", "tests"))
        build = r["install"] if r["install"] else r["build"]
        cells = [r["torch"], r["torchvision"], r["numpy"], build, counts_text(r), wall]
        rows.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def header(args, made_by):
    """The sentence above the table: when, where, with which Python, by which command."""
    return (f"On {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} (UTC), on {machine()}, with Python "
            f"{venv_python_version(args)}, `{made_by}` gave:")


def failing_text(results):
    lines = []
    for r in results:
        if r["failing"]:
            lines.append(f"torch {r['torch']}: {len(r['failing'])} failing:")
            for nid, kind, msg in r["failing"]:
                lines.append(f"- {'FAILED' if kind == 'failure' else 'ERROR'} `{nid}`" + (f": {msg}" if msg else ""))
        elif not r["ok"]:
            lines.append(f"torch {r['torch']}: {r['install'] or r['build']}; pytest: {r['pytest_line'] or 'not run'}")
    return "\n".join(lines)


def readme_block(results, head, tbl):
    versions = sorted((r["torch_wanted"] for r in results), key=lambda v: tuple(int(x) for x in v.split(".")))
    oldest, newest = versions[0], versions[-1]
    text = (f"Tested range: torch {oldest} to {newest}, each release in a fresh copy of the source tree and a "
            "fresh virtual environment with that torch, its torchvision and the rest of `requirements.txt`, "
            "built CPU-only in place (`PLASTIC_OPS_CPU_ONLY=1 python setup.py build_ext --inplace`), and the "
            "whole test suite run (`python -m pytest tests`). The table is the output of `make torch-matrix` "
            f"(`.ci/torch_matrix.py`, which rewrites this paragraph and the table). CI runs the torch {oldest} "
            f"leg (`make test-oldest-torch`) on every run, after `make test` (torch {newest}), so a change "
            f"that breaks torch {oldest} fails CI.")
    return f"{BEGIN}\n{wrap(text)}\n\n{wrap(head)}\n\n{tbl}\n{END}"


def wrap(text):
    return textwrap.fill(text, 100, break_on_hyphens=False, break_long_words=False)


def write_readme(path, block):
    text = path.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} markers")
    path.write_text(text[:start] + block + text[end + len(END):])


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torch", action="append", metavar="VERSION",
                   help="a torch release of the list to test (repeatable); default: all of "
                        + ", ".join(l[0] for l in LEGS))
    p.add_argument("--write-readme", action="store_true",
                   help=f"replace README.md's table between {BEGIN} and {END} (all releases, whole suite only)")
    p.add_argument("--keep", metavar="DIR",
                   help="keep each release's copy and virtual environment in DIR/torch-VERSION (a kept "
                        "environment is reused by the next run; the copy is always fresh); .torch-matrix is ignored by git")
    p.add_argument("--python", default=sys.executable, help="the Python that makes the virtual environments")
    p.add_argument("--numpy", metavar="SPEC",
                   help="the numpy requirement instead of the list's (e.g. 'numpy>=2', to check a cap)")
    p.add_argument("--made-by", default=None, help="the command named in the report (default: this command line)")
    p.add_argument("--pytest-args", default=os.environ.get("TORCH_MATRIX_PYTEST_ARGS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    known = {l[0]: l for l in LEGS}
    if args.torch:
        unknown = [v for v in args.torch if v not in known]
        if unknown:
            p.error(f"not in the list: {', '.join(unknown)} (known: {', '.join(known)})")
        legs = [known[v] for v in dict.fromkeys(args.torch)]
    else:
        legs = LEGS
    if args.numpy:
        legs = [(t, tv, args.numpy) for t, tv, _ in legs]
    if args.write_readme and (len(legs) != len(LEGS) or args.pytest_args or args.numpy):
        p.error("--write-readme writes the whole table: all releases, as listed, and the whole test suite only")
    made_by = args.made_by or shlex.join(["python3", ".ci/torch_matrix.py"] + (argv if argv is not None else sys.argv[1:]))

    logs = REPO / "results" / "torch-matrix"
    logs.mkdir(parents=True, exist_ok=True)
    lock = open(logs / ".lock", "w")  # one run at a time: they share the logs, README.md and the CPUs
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        p.error(f"another run is going on in this checkout ({logs / '.lock'} is locked)")
    # Stopped (CI's time limit, kill): the temporary folders are still removed, as on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    started = time.monotonic()
    for i, leg in enumerate(legs, 1):
        say(f"=== leg {i}/{len(legs)}: torch {leg[0]}, torchvision {leg[1]}, {leg[2]} ===")
        if args.keep:
            work = Path(args.keep).resolve() / f"torch-{leg[0]}"
            work.mkdir(parents=True, exist_ok=True)
            results.append(run_leg(leg, args, work, logs))
        else:
            with tempfile.TemporaryDirectory(prefix=f"torch-matrix-{leg[0]}-") as tmp:
                results.append(run_leg(leg, args, Path(tmp), logs))
                say(f"torch {leg[0]}: removing {tmp}")
    say(f"all legs done in {fmt_time(time.monotonic() - started)}")

    head, tbl, fails = header(args, made_by), table(results), failing_text(results)
    report = f"{head}\n\n{tbl}\n"
    if args.pytest_args:
        report += f"\n(Only `pytest {args.pytest_args}`: not the whole suite.)\n"
    if fails:
        report += f"\nFailing:\n\n{fails}\n"
    report += f"\nLogs and JUnit XML: {logs.relative_to(REPO)}/torch-VERSION/\n"
    out = REPO / "results" / "torch-matrix.md"
    out.write_text(report)
    print("\n" + report, flush=True)
    for r in results:  # pytest's own final lines, together at the end
        print(f"torch {r['torch']}: pytest: {r['pytest_line'] or 'not run: ' + (r['install'] or r['build'])}", flush=True)
    say(f"written: {out.relative_to(REPO)}")
    if args.write_readme:
        write_readme(REPO / "README.md", readme_block(results, head, tbl))
        say("written: README.md")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
