"""Time to accuracy on pattern memorization: how long until the held-out bit error reaches 1% (and 0.5%)?

Episodes per second is not what a researcher waits for; the time to a trained network is. This driver
trains Miconi's setup (experiments/pattern_memorization.py) in several configurations, each with
several seeds, and reads off each run's held-out curve the training time at which the bit error on a
fixed set of held-out episodes first reaches each threshold:

- reference-b1: the pure-PyTorch reference at batch 1, lr 3e-4 (Miconi's setting, the baseline);
- fused-b1: the fused op at batch 1, lr 3e-4;
- fused-b4 ... fused-b32: the fused op at batch 4, 8, 16, 32, each with the learning rate of a small
  grid that reached the lowest bit error on VALIDATION episodes within a fixed training budget
  (validation episodes, training episodes and seed of the selection runs all differ from those of the
  reported runs).

Stages (each skips the runs whose metrics.json exists and resumes the interrupted ones):

    python -m experiments.time_to_accuracy --stage select   # learning rates of the batched configurations
    python -m experiments.time_to_accuracy --stage report   # the reported runs, configurations x seeds
    python -m experiments.time_to_accuracy --stage table    # table.md, table.json, time_to_accuracy.png
    python -m experiments.time_to_accuracy                  # all three

The training clock is the process CPU time of the training steps (run with --threads 1: one thread's
CPU time, which equals wall-clock on an otherwise idle core and changes far less than wall-clock when
other jobs share the machine); the wall-clock is recorded beside it. Evaluation time is reported apart.
See docs/experiments/pattern_memorization.md, "Time to accuracy".
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if __package__ in (None, ""):  # run as a file: make `experiments` and `plastic_ops` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import pattern_memorization as pm  # noqa: E402
from experiments.common.progress import progress_bar  # noqa: E402

MICONI_LR = 3e-4  # Miconi's learning rate at batch 1, and the experiment's default


@dataclass(frozen=True)
class Config:
    name: str
    impl: str
    batch: int
    lr: float | None  # None: chosen from the grid on validation episodes


CONFIGS = (Config("reference-b1", "reference", 1, MICONI_LR), Config("fused-b1", "fused", 1, MICONI_LR),
           Config("fused-b4", "fused", 4, None), Config("fused-b8", "fused", 8, None),
           Config("fused-b16", "fused", 16, None), Config("fused-b32", "fused", 32, None))


# ---------------------------------------------------------------------------------------------
# Runs


def run_dir(out: Path, *parts) -> Path:
    return out.joinpath(*parts)


def train_once(path: Path, cfg: Config, lr: float, seed: int, curve_seed: int, budget: float, target, args) -> dict:
    """One training run of the experiment, in this process; resumes its checkpoint, skips it when finished."""
    if (path / "metrics.json").exists():
        return json.loads((path / "metrics.json").read_text())
    argv = ["--impl", cfg.impl, "--batch-size", str(cfg.batch), "--lr", repr(lr), "--seed", str(seed),
            "--episodes", str(args.max_episodes), "--eval-every", str(args.eval_every),
            "--curve-episodes", str(args.curve_episodes), "--curve-seed", str(curve_seed),
            "--time-budget", repr(budget), "--eval-episodes", str(args.final_eval_episodes),
            "--checkpoint-every", str(args.checkpoint_every), "--threads", str(args.threads),
            "--out", str(path), "--no-progress"] + shlex.split(args.task)
    if target is not None:
        argv += ["--target-error", repr(target)]
    if cfg.impl == "reference":
        argv += ["--curve-impl", "fused"]  # the same function: only the (untimed) evaluation gets cheaper
    if (path / "checkpoint.pt").exists():
        argv.append("--resume")
    metrics = pm.main(argv)
    if metrics is None:  # Ctrl-C: the run saved its checkpoint; the next call resumes it
        raise SystemExit(130)
    return metrics


def select_lr(out: Path, cfg: Config, args, bar=None) -> dict:
    """Train `cfg` once per learning rate of the grid, each for --select-budget CPU seconds, and keep
    the one with the lowest bit error on the validation episodes (ties: the one that got there first)."""
    grid = {}
    for lr in args.lr_grid:
        if bar is not None:
            bar.set_description(f"select {cfg.name} lr {lr:g}")
        m = train_once(run_dir(out, "select", cfg.name, f"lr{lr:g}"), cfg, lr, args.select_seed,
                       args.validation_seed, args.select_budget, None, args)
        curve = m["time_to_accuracy"]["curve"]
        best = int(np.argmin(curve["bit_error"]))  # the first index of the minimum
        grid[f"{lr:g}"] = {"lr": lr, "min_bit_error": curve["bit_error"][best],
                           "cpu_s_at_min": curve["train_cpu_s"][best], "episodes_at_min": curve["episodes"][best],
                           "final_bit_error": curve["bit_error"][-1], "episodes": m["episodes"]}
        if bar is not None:
            bar.update(1)
    chosen = min(grid.values(), key=lambda g: (g["min_bit_error"], g["cpu_s_at_min"]))
    return {"config": cfg.name, "batch": cfg.batch, "budget_cpu_s": args.select_budget,
            "train_seed": args.select_seed, "validation_seed": args.validation_seed, "grid": grid,
            "chosen_lr": chosen["lr"]}


def load_selection(out: Path) -> dict:
    """The chosen learning rates, one file per configuration (drivers on other configurations never clash)."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "select").glob("*/selection.json"))}


def stage_select(out: Path, configs, args) -> dict:
    todo = [c for c in configs if c.lr is None]
    with progress_bar(total=len(todo) * len(args.lr_grid), unit="run", desc="select") as bar:
        for cfg in todo:
            chosen = select_lr(out, cfg, args, bar)
            (out / "select" / cfg.name / "selection.json").write_text(json.dumps(chosen, indent=2) + "\n")
    return load_selection(out)


def lr_of(cfg: Config, selection: dict) -> float:
    if cfg.lr is not None:
        return cfg.lr
    if cfg.name not in selection:
        raise SystemExit(f"{cfg.name}: no learning rate selected yet; run --stage select first")
    return selection[cfg.name]["chosen_lr"]


def stage_report(out: Path, configs, args, selection: dict) -> None:
    """Seed by seed, every configuration: if the time runs out, each has as many seeds as the others."""
    runs = [(seed, cfg) for seed in args.seeds for cfg in configs]
    with progress_bar(total=len(runs), unit="run", desc="report") as bar:
        for seed, cfg in runs:
            bar.set_description(f"report {cfg.name} seed {seed}")
            budget = args.reference_budget if cfg.impl == "reference" else args.budget
            train_once(run_dir(out, "report", cfg.name, f"seed{seed}"), cfg, lr_of(cfg, selection), seed,
                       args.report_seed, budget, args.target or min(args.thresholds), args)
            bar.update(1)


# ---------------------------------------------------------------------------------------------
# Table


def first_reached(curve: dict, threshold: float) -> dict | None:
    """Training time and episodes at the first curve point with bit error <= threshold (None: never)."""
    for i, err in enumerate(curve["bit_error"]):
        if err <= threshold:
            return {"cpu_s": curve["train_cpu_s"][i], "wall_s": curve["train_wall_s"][i],
                    "episodes": curve["episodes"][i]}
    return None


def summarize(values) -> dict:
    """Median and range over seeds; a seed that never reached the threshold counts as +inf."""
    if not values:
        return {"median": None, "min": None, "max": None}
    v = np.asarray([np.inf if x is None else x for x in values], dtype=float)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def load_reports(out: Path, configs, selection: dict) -> list[dict]:
    rows = []
    for cfg in configs:
        runs = sorted((out / "report" / cfg.name).glob("seed*/metrics.json"))
        if not runs:
            continue
        metrics = [json.loads(p.read_text()) for p in runs]
        rows.append({"config": cfg.name, "impl": cfg.impl, "batch": cfg.batch, "lr": lr_of(cfg, selection),
                     "lr_chosen_on_validation": cfg.lr is None,
                     "seeds": [m["args"]["seed"] for m in metrics], "runs": metrics})
    return rows


def measured(run: dict, threshold: float) -> bool:
    """False when the run was told to stop at a higher bit error: it says nothing about this threshold."""
    target = run["time_to_accuracy"]["target_error"]
    return target is None or target <= threshold


def threshold_stats(row: dict, threshold: float) -> dict:
    runs = [m for m in row["runs"] if measured(m, threshold)]
    hits = [first_reached(m["time_to_accuracy"]["curve"], threshold) for m in runs]
    pick = lambda key: [None if h is None else h[key] for h in hits]  # noqa: E731
    return {"threshold": threshold, "reached": sum(h is not None for h in hits), "seeds": len(hits),
            "cpu_s": summarize(pick("cpu_s")), "wall_s": summarize(pick("wall_s")),
            "episodes": summarize(pick("episodes")), "per_seed": hits,
            "budget_cpu_s": [m["time_to_accuracy"]["time_budget"] for m in runs]}


def fmt(s: dict, digits=0) -> str:
    if s["median"] is None:
        return "not run"
    if not np.isfinite(s["median"]):
        return "not reached"
    hi = "not reached" if not np.isfinite(s["max"]) else f"{s['max']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{hi})"


def make_table(rows: list[dict], thresholds) -> tuple[str, list[dict]]:
    """Markdown and JSON: per configuration and threshold, median (range) of CPU s, wall s, episodes."""
    head = ["configuration", "lr", "seeds"]
    for t in thresholds:
        head += [f"CPU s to {100 * t:g}%", f"wall s to {100 * t:g}%", f"episodes to {100 * t:g}%",
                 f"reached {100 * t:g}%"]
    head += ["eval CPU s (apart)", "budget (CPU s), stop"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = []
    for row in rows:
        stats = [threshold_stats(row, t) for t in thresholds]
        lr = f"{row['lr']:g}" + (" (validation)" if row["lr_chosen_on_validation"] else "")
        cells = [row["config"], lr, str(len(row["runs"]))]
        for s in stats:
            cells += [fmt(s["cpu_s"]), fmt(s["wall_s"]), fmt(s["episodes"]), f"{s['reached']}/{s['seeds']}"]
        evals = [m["time_to_accuracy"]["eval_cpu_s"] for m in row["runs"]]
        budget = max(m["time_to_accuracy"]["time_budget"] for m in row["runs"])
        target = max(m["time_to_accuracy"]["target_error"] or 0 for m in row["runs"])
        cells += [f"{np.median(evals):.0f}", f"{budget:g}, stop at {100 * target:g}%"]
        lines.append("| " + " | ".join(cells) + " |")
        table.append({k: row[k] for k in ("config", "impl", "batch", "lr", "lr_chosen_on_validation", "seeds")}
                     | {"thresholds": stats, "eval_cpu_s": evals,
                        "stop": [m["time_to_accuracy"]["stop"] for m in row["runs"]],
                        "train_cpu_s": [m["time_to_accuracy"]["train_cpu_s"] for m in row["runs"]],
                        "train_wall_s": [m["wall_clock_s"] for m in row["runs"]],
                        "environment": [m.get("environment") for m in row["runs"]]})
    return "\n".join(lines) + "\n", table


# ---------------------------------------------------------------------------------------------
# Figure


def error_at(curve: dict, grid: np.ndarray) -> np.ndarray:
    """The curve as a step function of training CPU time (the last value measured), NaN after its end."""
    t, e = np.asarray(curve["train_cpu_s"]), np.asarray(curve["bit_error"])
    idx = np.searchsorted(t, grid, side="right") - 1
    values = e[np.clip(idx, 0, len(e) - 1)]
    return np.where(grid <= t[-1], values, np.nan)


def plot(rows: list[dict], thresholds, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.8))
    floor = 1e-4  # log scale: a bit error of exactly 0 is drawn at 0.01%
    for i, row in enumerate(rows):
        curves = [m["time_to_accuracy"]["curve"] for m in row["runs"]]
        end = max(c["train_cpu_s"][-1] for c in curves)
        grid = np.linspace(0.0, end, 600)
        stack = np.vstack([error_at(c, grid) for c in curves])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns, past every seed's end
            med, lo, hi = np.nanmedian(stack, 0), np.nanmin(stack, 0), np.nanmax(stack, 0)
        color = f"C{i}"
        label = f"{row['config']} (lr {row['lr']:g}, {len(curves)} seed{'' if len(curves) == 1 else 's'})"
        ax.plot(grid, 100 * np.maximum(med, floor), color=color, lw=1.6, label=label)
        ax.fill_between(grid, 100 * np.maximum(lo, floor), 100 * np.maximum(hi, floor), color=color, alpha=0.18,
                        lw=0)
    for t in thresholds:
        ax.axhline(100 * t, color="0.4", ls="--", lw=0.8)
        ax.annotate(f"{100 * t:g}%", (1.0, 100 * t), xycoords=("axes fraction", "data"), xytext=(2, 0),
                    textcoords="offset points", va="center", fontsize=8, color="0.3")
    ax.set_yscale("log")
    ax.set_xlabel("training time (CPU seconds of one thread; evaluation excluded)")
    ax.set_ylabel("held-out bit error (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def selection_table(selection: dict) -> str:
    """Markdown: the lowest validation bit error each learning rate reached within the selection budget."""
    if not selection:
        return ""
    lrs = sorted({g["lr"] for sel in selection.values() for g in sel["grid"].values()})
    lines = ["| configuration | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
             "|" + "---|" * (len(lrs) + 2)]
    for name, sel in selection.items():
        by_lr = {g["lr"]: g for g in sel["grid"].values()}
        cells = [f"{100 * by_lr[lr]['min_bit_error']:.2f}% ({by_lr[lr]['episodes_at_min']} ep)" if lr in by_lr
                 else "not run" for lr in lrs]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sel['chosen_lr']:g} |")
    budget = {sel["budget_cpu_s"] for sel in selection.values()}
    return ("\n".join(lines) + f"\n\nLowest validation bit error within {', '.join(f'{b:g}' for b in budget)} "
            "CPU s of training (episodes at that point).\n")


def stage_table(out: Path, configs, args, selection: dict) -> list[dict]:
    rows = load_reports(out, configs, selection)
    if not rows:
        raise SystemExit(f"no reported runs in {out / 'report'}: run --stage report first")
    markdown, table = make_table(rows, args.thresholds)
    markdown += "\n" + selection_table({k: v for k, v in selection.items() if k in {c.name for c in configs}})
    (out / "table.md").write_text(markdown)
    (out / "table.json").write_text(json.dumps({"thresholds": args.thresholds, "selection": selection,
                                                "rows": table}, indent=2, default=str) + "\n")
    plot(rows, args.thresholds, out / "time_to_accuracy.png",
         "pattern memorization: held-out bit error against training time (median of seeds, range shaded)")
    print(markdown)
    print(f"Written: {out / 'table.md'}, {out / 'table.json'}, {out / 'time_to_accuracy.png'}")
    return table


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/time_to_accuracy", help="results folder")
    p.add_argument("--stage", choices=("select", "report", "table", "all"), default="all")
    p.add_argument("--configs", nargs="+", default=[c.name for c in CONFIGS], choices=[c.name for c in CONFIGS],
                   help="configurations to run or tabulate")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the reported runs")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.01, 0.005],
                   help="held-out bit errors (fractions); a reported run stops at the lowest")
    p.add_argument("--target", type=float, default=None,
                   help="bit error at which the reported runs stop (default: the lowest of --thresholds)")
    p.add_argument("--lr-grid", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3],
                   help="learning rates tried for each batched configuration")
    p.add_argument("--select-budget", type=float, default=90.0, help="training CPU seconds per grid point")
    p.add_argument("--budget", type=float, default=600.0, help="training CPU seconds of a reported fused run")
    p.add_argument("--reference-budget", type=float, default=1500.0,
                   help="training CPU seconds of a reported reference run")
    p.add_argument("--max-episodes", type=int, default=100000, help="episodes cap of every run (budgets stop first)")
    p.add_argument("--eval-every", type=int, default=32, help="training episodes between points of the curves")
    p.add_argument("--curve-episodes", type=int, default=50, help="held-out episodes of each curve point")
    p.add_argument("--final-eval-episodes", type=int, default=50, help="episodes of each run's final test")
    p.add_argument("--checkpoint-every", type=int, default=200, help="episodes between checkpoints")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every run (1: the CPU clock is one thread's)")
    p.add_argument("--report-seed", type=int, default=4321, help="seed of the reported curves' held-out episodes")
    p.add_argument("--validation-seed", type=int, default=8765, help="seed of the selection's validation episodes")
    p.add_argument("--select-seed", type=int, default=100, help="training seed of the selection runs")
    p.add_argument("--task", default="", help="extra task flags for every run, e.g. \"--pattern-size 100\"")
    args = p.parse_args(argv)
    if args.validation_seed == args.report_seed:
        p.error("--validation-seed must differ from --report-seed: learning rates are never chosen on the "
                "episodes of the reported curves")
    if args.select_seed in args.seeds:
        p.error(f"--select-seed {args.select_seed} is one of --seeds: the selection must train on other episodes")
    for name in ("select_budget", "budget", "reference_budget"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if any(not 0 < t < 1 for t in args.thresholds):
        p.error("--thresholds are fractions in (0, 1)")
    return args


def main(argv=None) -> list[dict] | None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = [c for c in CONFIGS if c.name in args.configs]
    selection = load_selection(out)
    if args.stage in ("select", "all"):
        selection = stage_select(out, configs, args)
    if args.stage in ("report", "all"):
        stage_report(out, configs, args, selection)
    if args.stage in ("table", "all"):
        return stage_table(out, configs, args, selection)
    return None


if __name__ == "__main__":
    main()
