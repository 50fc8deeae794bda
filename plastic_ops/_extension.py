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


def _rebuild_hint() -> str:
    return ("rebuild it against the running torch: `pip install --no-build-isolation .` "
            "(or `python setup.py build_ext --inplace` in a source checkout, see README.md)")


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
        msg = f"the compiled module is not built in {PACKAGE_DIR}"
        if (PACKAGE_DIR.parent / "setup.py").exists():
            msg += (". This is an unbuilt source checkout: build it in place with "
                    "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace` (`make build`)")
            others = _installed_copies()
            if others:
                msg += (f", or run from outside the checkout to use the installed copy ({others[0]}), which "
                        "the checkout shadows because Python puts the current folder first on sys.path")
        return msg
    if built and built.get("torch") != torch.__version__:
        return (f"it was built against torch {built['torch']} but torch {torch.__version__} is running "
                f"({exc}); {_rebuild_hint()}")
    if "undefined symbol" in str(exc):
        return f"it was built against another torch than the running {torch.__version__} ({exc}); {_rebuild_hint()}"
    return str(exc)


def load() -> bool:
    global _error
    built = build_info()
    if built and _release(built.get("torch", "")) != _release(torch.__version__):
        # another release's C++ ABI: loading could crash instead of failing cleanly
        _error = ImportError(f"it was built against torch {built['torch']} but torch {torch.__version__} is "
                             f"running; {_rebuild_hint()}")
        return False
    try:
        importlib.import_module("plastic_ops._C")
    except ImportError as exc:  # the reference still works, the fused op says why it can't
        _error = ImportError(_explain(exc))
        _error.__cause__ = exc
        return False
    if built and built.get("torch") != torch.__version__:
        warnings.warn(f"plastic_ops was built against torch {built['torch']} but torch {torch.__version__} is "
                      f"running: if the op misbehaves, {_rebuild_hint()}", RuntimeWarning, stacklevel=2)
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
            "Build it with `pip install --no-build-isolation .` or `python setup.py build_ext --inplace` "
            "(see README.md), or use plastic_ops.reference.")
