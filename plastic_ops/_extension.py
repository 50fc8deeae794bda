"""Loads the compiled extension (plastic_ops/_C*.so), which registers the ops with torch."""
from __future__ import annotations

import importlib

_error: Exception | None = None


def load() -> bool:
    global _error
    try:
        importlib.import_module("plastic_ops._C")
        return True
    except ImportError as exc:  # not built: the reference still works, the fused op says why it can't
        _error = exc
        return False


def available() -> bool:
    return _error is None


def require() -> None:
    if _error is not None:
        raise RuntimeError(
            "plastic_ops: the compiled extension is not available, so the fused op cannot run "
            f"({_error}). Build it with `pip install --no-build-isolation .` or "
            "`python setup.py build_ext --inplace` (see README.md), or use plastic_ops.reference.")
