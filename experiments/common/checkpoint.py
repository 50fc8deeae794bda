"""Checkpoints that survive Ctrl-C: atomic writes, and a SIGINT handler that asks the loop to stop.

Usage:
    ckpt = CheckpointManager(run_dir / "checkpoint.pt", every=200)
    state = ckpt.load() if args.resume else None        # dict or None
    with ckpt.catch_interrupt():
        for step in range(start, total):
            ...
            ckpt.maybe_save(step + 1, lambda: {...})    # every `every` steps
            if ckpt.stop_requested: ckpt.save({...}); raise StopRequested
"""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Callable, Optional

import torch


class StopRequested(Exception):
    """Raised by a training loop after it saved a checkpoint in answer to Ctrl-C."""


class CheckpointManager:
    def __init__(self, path, every: int):
        self.path = Path(path)
        self.every = max(1, int(every))
        self.stop_requested = False

    def save(self, state: dict) -> None:
        """Write to a temporary file and rename it, so a crash mid-write never leaves a torn checkpoint."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self) -> Optional[dict]:
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)

    def maybe_save(self, step: int, make_state: Callable[[], dict]) -> bool:
        if step % self.every == 0:
            self.save(make_state())
            return True
        return False

    @contextlib.contextmanager
    def catch_interrupt(self):
        """The first Ctrl-C sets stop_requested (the loop saves and exits); a second one kills as usual."""
        def handler(signum, frame):
            if self.stop_requested:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.stop_requested = True
            print("\nInterrupt: saving a checkpoint and stopping (press Ctrl-C again to abort)...", flush=True)

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
        try:
            yield self
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
