"""Progress bars that suit where they are written: one redrawn line in a terminal, a few plain lines in a file.

tqdm redraws its bar up to ten times a second with a carriage return; in a terminal that is one
line, but a log file keeps every redraw (hundreds of kilobytes for one run). Into a file (anything
that is not a terminal) a bar here writes a line at most every LOG_EVERY_FRACTION of its total and
LOG_MIN_SECONDS apart, then its final state, each as a line of its own.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

LOG_EVERY_FRACTION = 0.1
LOG_MIN_SECONDS = 30.0


class _Lines:
    """A stream that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


class _LogBar(tqdm):
    """A bar for files: new postfixes and descriptions wait for the next scheduled line."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s="", refresh=True):
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)

    def set_description_str(self, desc=None, refresh=True):
        super().set_description_str(desc, refresh=False)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable=None, *, file=None, **kwargs):
    """tqdm(iterable, **kwargs), with the redraw policy above; same arguments as tqdm."""
    stream = file if file is not None else sys.stderr
    if _is_terminal(stream):
        kwargs.setdefault("dynamic_ncols", True)  # follow the window's width: never wrap into a second line
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    total = kwargs.get("total")
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if total:
        kwargs["miniters"] = max(1, int(total * LOG_EVERY_FRACTION))
    kwargs["mininterval"] = LOG_MIN_SECONDS
    kwargs["maxinterval"] = float("inf")  # no forced redraw from tqdm's monitor thread
    kwargs.setdefault("ncols", 100)
    return _LogBar(iterable, file=_Lines(stream), **kwargs)
