"""Results folders, seeds, devices and the command-line flags every experiment has."""
from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch


def add_common_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--impl", choices=("fused", "reference"), default="fused",
                        help="plastic op implementation: the fused kernel or the pure-PyTorch reference")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=default_out, help="results folder (metrics, plots, checkpoint)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def restores_torch_threads(main):
    """For an experiment's main(), which applies --threads to the process: torch's thread count is restored
    when it returns, since main() also runs inside other programs (the time-to-accuracy drivers, the tests)."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        before = torch.get_num_threads()
        try:
            return main(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return wrapped


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ResultsDir:
    """One run's folder: metrics.json, PNG plots and the checkpoint live together."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, data: dict) -> Path:
        data = dict(data)
        data.setdefault("environment", environment())
        out = self.file(name)
        out.write_text(json.dumps(data, indent=2, default=str) + "\n")
        return out


def environment() -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
