"""Progress bars of the experiments: a few whole lines into a file, tqdm's own redraws in a terminal."""
from __future__ import annotations

import io

import pytest

pytest.importorskip("tqdm")
from experiments.common import progress  # noqa: E402


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _run(stream, steps=1000):
    bar = progress.progress_bar(total=steps, desc="train", unit="ep", file=stream, dynamic_ncols=True)
    for i in range(steps):
        bar.update(1)
        bar.set_postfix(loss=f"{i / steps:.3f}")  # the experiments set a postfix every step
    bar.close()
    return stream.getvalue()


def test_file_gets_a_few_whole_lines(monkeypatch):
    monkeypatch.setattr(progress, "LOG_MIN_SECONDS", 0.0)  # so that only the fraction limits the lines
    text = _run(io.StringIO())
    lines = text.splitlines()
    assert "\r" not in text
    assert 3 <= len(lines) <= 13, lines  # the start, every 10%, the final state
    assert lines[-1].startswith("train: 100%") and "1000/1000" in lines[-1]


def test_file_lines_are_spaced_in_time():
    lines = _run(io.StringIO()).splitlines()
    assert len(lines) <= 3, lines  # a fast run: the start and the end only


def test_terminal_keeps_tqdm_redraws():
    text = _run(_Terminal(), steps=50)
    assert text.count("\r") > 1 and text.count("\n") <= 1
