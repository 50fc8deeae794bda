"""Figures of a comparison run: median time against batch size, one line per implementation.

    python -m benchmarks.plot results/bench-cpu/results.json [--out fig.png]

compare.py calls :func:`plot_time_vs_batch` itself; this entry point redraws from a saved JSON.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable, List

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

STYLE = {"fused": dict(color="tab:blue", marker="o"), "eager": dict(color="tab:orange", marker="s"),
         "compile": dict(color="tab:green", marker="^"), "fused-unmasked": dict(color="tab:cyan", marker="v"),
         "fused-split": dict(color="tab:red", marker="D")}


def plot_time_vs_batch(rows: Iterable[dict], path, title: str = "") -> List[Path]:
    """One figure per (form, rule, activation, alpha): a panel per (mode, N, T), time (log) against B.

    Returns the paths written: ``path`` itself when a single figure suffices, else ``path`` with the
    group appended to its stem.
    """
    rows = [r for r in rows if r.get("status") == "ok" and r.get("median_ms") is not None]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["form"], r["rule"], r["activation"], r["alpha"])].append(r)
    path = Path(path)
    written = []
    for gi, (key, grows) in enumerate(sorted(groups.items())):
        panels = sorted({(r["mode"], r["n"], r["steps"], r.get("episodes", "none")) for r in grows},
                        key=lambda p: (p[0] != "fwd", p[1], p[2], p[3]))
        ncol = min(3, len(panels))
        nrow = -(-len(panels) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(max(5.5, 4.2 * ncol), 0.5 + 3.3 * nrow), squeeze=False)
        for ax, (mode, n, steps, episodes) in zip(axes.flat, panels):
            sel = [r for r in grows if (r["mode"], r["n"], r["steps"], r.get("episodes", "none"))
                   == (mode, n, steps, episodes)]
            for impl in STYLE:
                pts = sorted((r["batch"], r["median_ms"], r.get("q1_ms"), r.get("q3_ms"))
                             for r in sel if r["impl"] == impl)
                if not pts:
                    continue
                b = [p[0] for p in pts]
                t = [p[1] for p in pts]
                ax.plot(b, t, label=impl, **STYLE.get(impl, {}))
                if all(p[2] is not None and p[3] is not None for p in pts):
                    ax.fill_between(b, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2,
                                    color=STYLE.get(impl, {}).get("color"))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            batches = sorted({r["batch"] for r in sel})
            ax.set_xticks(batches, [str(b) for b in batches])  # the measured B, not powers of two
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_title(f"{mode}  N={n}  T={steps}" + ("" if episodes == "none" else f"  episodes {episodes}"),
                         fontsize=9)
            ax.set_xlabel("batch size B")
            ax.set_ylabel("median time per call (ms)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        form, rule, act, alpha = key
        fig.suptitle(f"{title}\nplastic_{form}, {rule}/{act}, alpha per {alpha}".strip(), fontsize=9)
        fig.tight_layout()
        out = path if len(groups) == 1 else path.with_name(f"{path.stem}_{form}_{rule}_{act}_{alpha}{path.suffix}")
        fig.savefig(out, dpi=80)
        plt.close(fig)
        written.append(out)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    p.add_argument("results", help="results.json written by python -m benchmarks.compare")
    p.add_argument("--out", default=None, help="PNG path (default: time_vs_batch.png next to the JSON)")
    a = p.parse_args(argv)
    data = json.loads(Path(a.results).read_text())
    out = a.out or str(Path(a.results).with_name("time_vs_batch.png"))
    env = data.get("env", {})
    for f in plot_time_vs_batch(data["rows"], out, title=env.get("gpu") or env.get("cpu_model", "")):
        print(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
