"""Runs a snippet in a fresh Python process, so that a crash (a signal) fails one test only."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def run_child(code: str, timeout: float = 300) -> str:
    """Runs code with the project and tests/ importable; fails on any non-zero exit, signals included."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        raise AssertionError(f"child process failed ({how}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout
