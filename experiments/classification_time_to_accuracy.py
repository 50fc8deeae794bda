"""Time to accuracy on MNIST classification: the batched protocol against the paper's one image at a time.

For each protocol, model (non-plastic, plastic) and seed, one run of experiments/classification.py with
--curve-every: every few optimizer steps the validation accuracy on a fixed set of validation images
(the first --curve-images of the split, never test images), against the training clocks. From those
curves, the training time at which each model first reaches each accuracy threshold (97% and 98% by
default): median and range over the seeds, and how many seeds reached it within the budget.

    python -m experiments.classification_time_to_accuracy --stage report --data-root DIR   # the runs
    python -m experiments.classification_time_to_accuracy --stage table                    # table + figure

The training clock is the process CPU time of the training steps (--threads 1: one thread's CPU time);
the wall-clock is recorded beside it, and the curve's evaluation time is reported apart. A run stops at
the highest threshold, at --budget CPU seconds, or at the end of its protocol's epochs. Each protocol runs
with its own defaults (experiments/classification.py) unless --paper-args / --batched-args add flags.
See docs/experiments/classification.md, "Time to accuracy".
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if __package__ in (None, ""):  # run as a file: make `experiments` and `plastic_ops` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import classification as cl  # noqa: E402
from experiments.time_to_accuracy import fmt, summarize  # noqa: E402

PROTOCOLS = ("paper", "batched")
MODEL_NAMES = {"nonplastic": "non-plastic", "plastic": "plastic"}


def run_dir(out: Path, protocol: str, seed: int) -> Path:
    return out / "report" / protocol / f"seed{seed}"


def train_once(out: Path, protocol: str, seed: int, args) -> dict:
    """Both models of one protocol and seed, in this process; resumes a checkpoint, skips a finished run."""
    path = run_dir(out, protocol, seed)
    if (path / "metrics.json").exists():
        return json.loads((path / "metrics.json").read_text())
    curve_every = args.paper_curve_every if protocol == "paper" else args.batched_curve_every
    argv = ["--protocol", protocol, "--models", "both", "--seed", str(seed), "--threads", str(args.threads),
            "--curve-every", str(curve_every), "--curve-images", str(args.curve_images),
            "--stop-at-acc", repr(max(args.thresholds)), "--time-budget", repr(args.budget),
            "--plastic-test", "reset", "--out", str(path), "--no-progress"]
    argv += shlex.split(args.paper_args if protocol == "paper" else args.batched_args)
    argv += shlex.split(args.data_args)
    if (path / "checkpoint.pt").exists():
        argv.append("--resume")
    metrics = cl.main(argv)
    if metrics.get("stopped"):  # Ctrl-C: the run saved its checkpoint; the next call resumes it
        raise SystemExit(130)
    return metrics


def first_reached(curve: dict, threshold: float) -> dict | None:
    """Training clocks, steps and images at the first curve point with accuracy >= threshold (None: never)."""
    for i, acc in enumerate(curve["acc"]):
        if acc >= threshold:
            return {"cpu_s": curve["train_cpu_s"][i], "wall_s": curve["train_wall_s"][i],
                    "steps": curve["opt_steps"][i], "images": curve["images"][i]}
    return None


def load_rows(out: Path, protocols) -> list[dict]:
    """One row per (protocol, model): every seed's run of it."""
    rows = []
    for protocol in protocols:
        metrics = [json.loads(p.read_text()) for p in sorted((out / "report" / protocol).glob("seed*/metrics.json"))]
        for model in MODEL_NAMES:
            runs = [m["runs"][f"{protocol}/{model}"] | {"seed": m["seed"], "config": m["config"]}
                    for m in metrics if f"{protocol}/{model}" in m["runs"]]
            if runs:
                rows.append({"protocol": protocol, "model": model, "runs": runs})
    return rows


def describe(run: dict) -> str:
    c = dict(run["config"])
    for k, v in cl.PROTOCOL_DEFAULTS[run["protocol"]].items():  # flags not given: the protocol's defaults
        c[k] = v if c.get(k) is None else c[k]
    if run["protocol"] == "paper":
        return f"paper: 1 image per step, lr {c['lr']:g}"
    return (f"batched: {c['streams']} x {c['seq_len']} images per step, {c['epochs']} epochs, lr {c['lr']:g} "
            f"({c['schedule']})")


def make_table(rows: list[dict], thresholds) -> tuple[str, list[dict]]:
    head = ["protocol", "model", "seeds"]
    for t in thresholds:
        head += [f"CPU s to {100 * t:g}%", f"wall s to {100 * t:g}%", f"images to {100 * t:g}%",
                 f"reached {100 * t:g}%"]
    head += ["best curve accuracy", "curve eval CPU s (apart)", "stop"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = []
    for row in rows:
        cells = [describe(row["runs"][0]), MODEL_NAMES[row["model"]], str(len(row["runs"]))]
        stats = []
        for t in thresholds:
            hits = [first_reached(r["curve"], t) for r in row["runs"]]
            pick = lambda key: [None if h is None else h[key] for h in hits]  # noqa: E731
            s = {"threshold": t, "reached": sum(h is not None for h in hits), "seeds": len(hits),
                 "cpu_s": summarize(pick("cpu_s")), "wall_s": summarize(pick("wall_s")),
                 "images": summarize(pick("images")), "per_seed": hits}
            stats.append(s)
            cells += [fmt(s["cpu_s"]), fmt(s["wall_s"]), fmt(s["images"]), f"{s['reached']}/{s['seeds']}"]
        best = [max(r["curve"]["acc"]) for r in row["runs"]]
        evals = [r["curve"]["eval_cpu_s"] for r in row["runs"]]
        stops = [r["stop_reason"] or "end of epochs" for r in row["runs"]]
        cells += [f"{100 * np.median(best):.2f}% ({100 * min(best):.2f}-{100 * max(best):.2f})",
                  f"{np.median(evals):.0f}", ", ".join(sorted(set(stops)))]
        lines.append("| " + " | ".join(cells) + " |")
        table.append({"protocol": row["protocol"], "model": row["model"], "seeds": [r["seed"] for r in row["runs"]],
                      "setup": describe(row["runs"][0]), "thresholds": stats, "best_curve_acc": best,
                      "curve_eval_cpu_s": evals, "stop": stops,
                      "train_cpu_s": [r["train_cpu_seconds"] for r in row["runs"]],
                      "optimizer_steps": [r["optimizer_steps"] for r in row["runs"]]})
    return "\n".join(lines) + "\n", table


def acc_at(curve: dict, grid: np.ndarray) -> np.ndarray:
    """The curve as a step function of training CPU time (the last value measured), NaN outside it."""
    t, a = np.asarray(curve["train_cpu_s"]), np.asarray(curve["acc"])
    idx = np.searchsorted(t, grid, side="right") - 1
    values = a[np.clip(idx, 0, len(a) - 1)]
    return np.where((grid >= t[0]) & (grid <= t[-1]), values, np.nan)


def plot(rows: list[dict], thresholds, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.8))
    end = max(r["curve"]["train_cpu_s"][-1] for row in rows for r in row["runs"] if r["curve"]["acc"])
    grid = np.geomspace(0.5, end, 600)
    for i, row in enumerate(rows):
        curves = [r["curve"] for r in row["runs"] if r["curve"]["acc"]]
        stack = np.vstack([acc_at(c, grid) for c in curves])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns, outside every seed's curve
            med, lo, hi = np.nanmedian(stack, 0), np.nanmin(stack, 0), np.nanmax(stack, 0)
        style = "-" if row["model"] == "plastic" else "--"
        color = "C0" if row["protocol"] == "paper" else "C1"
        label = f"{row['protocol']}, {MODEL_NAMES[row['model']]} ({len(curves)} seeds)"
        ax.plot(grid, 100 * med, color=color, ls=style, lw=1.6, label=label)
        ax.fill_between(grid, 100 * lo, 100 * hi, color=color, alpha=0.12, lw=0)
    for t in thresholds:
        ax.axhline(100 * t, color="0.4", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylim(90, 100)
    ax.set_xlabel("training time (CPU seconds of one thread; evaluation excluded)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("MNIST classification: validation accuracy against training time (median of seeds, range shaded)",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def stage_table(out: Path, args) -> list[dict]:
    rows = load_rows(out, args.protocols)
    if not rows:
        raise SystemExit(f"no finished runs in {out / 'report'}: run --stage report first")
    markdown, table = make_table(rows, args.thresholds)
    (out / "table.md").write_text(markdown)
    (out / "table.json").write_text(json.dumps({"thresholds": args.thresholds, "rows": table}, indent=2) + "\n")
    plot(rows, args.thresholds, out / "time_to_accuracy.png")
    print(markdown)
    print(f"Written: {out / 'table.md'}, {out / 'table.json'}, {out / 'time_to_accuracy.png'}")
    return table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/classification_time_to_accuracy", help="results folder")
    p.add_argument("--stage", choices=("report", "table", "all"), default="all")
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.97, 0.98],
                   help="validation accuracies; a run stops at the highest")
    p.add_argument("--budget", type=float, default=900.0, help="training CPU seconds of a run, per model")
    p.add_argument("--curve-images", type=int, default=2000, help="validation images of each curve point")
    p.add_argument("--paper-curve-every", type=int, default=500, help="paper protocol: steps between curve points")
    p.add_argument("--batched-curve-every", type=int, default=25, help="batched protocol: steps between points")
    p.add_argument("--paper-args", default="--eval-subset 500",
                   help="extra flags of the paper runs (its per-epoch validation, model selection's, on the "
                        "first 500 validation images: it is not on the training clock either way)")
    p.add_argument("--batched-args", default="", help="extra flags of the batched runs")
    p.add_argument("--data-args", default="", help="data flags of every run, e.g. \"--data-root DIR\"")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every run")
    args = p.parse_args(argv)
    if any(not 0 < t <= 1 for t in args.thresholds):
        p.error("--thresholds are accuracies in (0, 1]")
    if args.budget <= 0:
        p.error("--budget must be positive")
    return args


def main(argv=None) -> list[dict] | None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("report", "all"):
        for seed in args.seeds:  # seed by seed: if the time runs out, every protocol has as many seeds
            for protocol in args.protocols:
                print(f"{protocol}, seed {seed}", file=sys.stderr)
                train_once(out, protocol, seed, args)
    if args.stage in ("table", "all"):
        return stage_table(out, args)
    return None


if __name__ == "__main__":
    main()
