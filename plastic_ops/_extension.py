"""Loads the compiled extension (plastic_ops/_C*.so), which registers the ops with torch.

When it cannot be used, the reason kept here says what to do: build it, rebuild it for the
running torch, or stop importing an unbuilt source checkout that shadows an installed copy.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
INFO_FILE = PACKAGE_DIR / "_build_info.json"  # written by setup.py beside the compiled module

_error: Exception | None = None


def build_info() -> dict | None:
    """What setup.py built (CUDA or not, architectures, torch and CUDA versions), or None when unknown."""
    try:
        return json.loads(INFO_FILE.read_text())
    except (OSError, ValueError):
        return None


def _release(version: str) -> tuple:
    """(major, minor) of a torch version: the C++ ABI an extension is bound to."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else ()


BUILD_HINT = ("(Re)build it for the running torch with `pip install --no-build-isolation .`, or in a source checkout "
              "with `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace` (README.md)")


def _installed_copies() -> list:
    """Other importable plastic_ops packages on sys.path that hold a compiled module."""
    found = []
    for entry in sys.path:
        candidate = Path(entry or os.getcwd()) / "plastic_ops"
        try:
            if candidate.resolve() != PACKAGE_DIR and any(candidate.glob("_C*.so")):
                found.append(str(candidate))
        except OSError:
            continue
    return found


def _explain(exc: ImportError) -> str:
    built = build_info()
    if not any(PACKAGE_DIR.glob("_C*.so")) and not any(PACKAGE_DIR.glob("_C*.pyd")):
        if not (PACKAGE_DIR.parent / "setup.py").exists():
            return f"it is not built in {PACKAGE_DIR}"
        msg = f"plastic_ops was imported from an unbuilt source checkout ({PACKAGE_DIR})"
        others = _installed_copies()
        if others:
            msg += (f", which hides the installed copy ({others[0]}) because Python puts the current folder "
                    "first on sys.path: run from another folder to use that copy, or build the checkout in place")
        return msg
    if built and built.get("torch") != torch.__version__:
        return f"it was built against torch {built['torch']} but torch {torch.__version__} is running ({exc})"
    if "undefined symbol" in str(exc):
        return f"it was built against another torch than the running {torch.__version__} ({exc})"
    return str(exc)


def load() -> bool:
    global _error
    built = build_info()
    if built and _release(built.get("torch", "")) != _release(torch.__version__):
        # another release's C++ ABI: loading could crash instead of failing cleanly
        _error = ImportError(f"it was built against torch {built['torch']} but torch {torch.__version__} is running")
        warnings.warn(f"plastic_ops: the compiled extension cannot be used: {_error}. {BUILD_HINT}.",
                      RuntimeWarning, stacklevel=2)
        return False
    try:
        importlib.import_module("plastic_ops._C")
    except ImportError as exc:  # the reference still works, the fused op says why it can't
        _error = ImportError(_explain(exc))
        _error.__cause__ = exc
        if any(PACKAGE_DIR.glob("_C*")) or _installed_copies():  # a broken or shadowed install: say so now
            warnings.warn(f"plastic_ops: the compiled extension cannot be used: {_error}. {BUILD_HINT}.",
                          RuntimeWarning, stacklevel=2)
        return False
    if built and built.get("torch") != torch.__version__:
        warnings.warn(f"plastic_ops was built against torch {built['torch']} but torch {torch.__version__} is "
                      f"running; if the op misbehaves, rebuild it. {BUILD_HINT}.", RuntimeWarning, stacklevel=2)
    return True


def available() -> bool:
    return _error is None


def error() -> Exception | None:
    """Why the compiled extension is not available (None when it is)."""
    return _error


def require() -> None:
    if _error is not None:
        raise RuntimeError(
            f"plastic_ops: the compiled extension is not available, so the fused op cannot run: {_error}. "
            f"{BUILD_HINT}, or use plastic_ops.reference.")
