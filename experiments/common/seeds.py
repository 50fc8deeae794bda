"""Several seeds of one experiment: per-seed folders, skipped when finished, and one table of means and spreads.

An experiment takes part by defining ``seed_rows(metrics) -> list of rows``, read from its metrics.json:

    {"quantity": "test MSE, recall, noise 1 (lower is better)",
     "values": {"plastic": 0.031, "baseline": 0.045},        # one number per model, this seed
     "pairs": [("plastic", "baseline")]}                      # differences to report: first minus second

The table gives, per quantity and model, the mean over the seeds, the sample standard deviation and a 95%
interval of the mean (Student's t); per pair, the same for the per-seed difference (paired: both models of a
seed share its data order and initialization), with the verdict "difference" only when that interval
excludes 0 and "within the spread" otherwise.
"""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

# Experiments the driver knows: name -> module (each defines main(argv) and seed_rows(metrics)).
EXPERIMENTS = {"classification": "experiments.classification",
               "denoising": "experiments.denoising_autoencoder"}

# Two-sided 95% quantiles of Student's t (the 0.975 quantile) by degrees of freedom; a df between two rows
# uses the smaller df's value (a slightly wider, conservative interval).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101,
        19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return T975[max(k for k in T975 if k <= df)]


def spread(values) -> dict:
    """n, mean, sample standard deviation and the 95% interval of the mean (None where one value gives none)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None, "values": values}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "values": values}


def verdict(diff: dict) -> str:
    if diff["ci95"] is None:
        return "one seed: no spread"
    lo, hi = diff["ci95"]
    return "difference" if lo > 0 or hi < 0 else "within the spread"


def summarize(per_seed: dict) -> list[dict]:
    """per_seed: {seed: rows of that seed} -> one entry per quantity with every model's and pair's spread."""
    seeds = sorted(per_seed)
    table = []
    for i, row in enumerate(per_seed[seeds[0]]):
        rows = [per_seed[s][i] for s in seeds]
        if any(r["quantity"] != row["quantity"] for r in rows):
            raise ValueError(f"the seeds' results do not list the same quantities: {row['quantity']!r}")
        entry = {"quantity": row["quantity"], "seeds": seeds,
                 "models": {m: spread([r["values"][m] for r in rows]) for m in row["values"]}, "pairs": []}
        for a, b in row.get("pairs", []):
            d = spread([r["values"][a] - r["values"][b] for r in rows])
            entry["pairs"].append({"a": a, "b": b, **d, "verdict": verdict(d)})
        table.append(entry)
    return table


def _fmt(x, digits):
    return "-" if x is None else f"{x:.{digits}f}"


def _interval(s, digits):
    return "-" if s["ci95"] is None else f"[{s['ci95'][0]:.{digits}f}, {s['ci95'][1]:.{digits}f}]"


def markdown(table: list[dict], digits: int = 4) -> str:
    lines = ["| quantity | model | mean | std | 95% interval | seeds |", "|---|---|---|---|---|---|"]
    for e in table:
        for m, s in e["models"].items():
            lines.append(f"| {e['quantity']} | {m} | {_fmt(s['mean'], digits)} | {_fmt(s['std'], digits)} | "
                         f"{_interval(s, digits)} | {s['n']} |")
    lines += ["", "| quantity | difference | mean | std | 95% interval | verdict |", "|---|---|---|---|---|---|"]
    for e in table:
        for p in e["pairs"]:
            lines.append(f"| {e['quantity']} | {p['a']} - {p['b']} | {_fmt(p['mean'], digits)} | "
                         f"{_fmt(p['std'], digits)} | {_interval(p, digits)} | {p['verdict']} |")
    lines += ["", "std: sample standard deviation over the seeds; 95% interval: mean +- t(0.975, n-1) std / sqrt(n); "
              "a difference is paired by seed and called a difference only when its interval excludes 0."]
    return "\n".join(lines) + "\n"


def seed_folder(out: Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def run_seeds(experiment: str, seeds, out, argv=(), log=print) -> dict:
    """Run experiment for each seed into OUT/seed-S (a finished seed, one with metrics.json, is skipped; an
    interrupted one is continued with --resume), then write OUT/seeds.md and OUT/seeds.json."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {sorted(EXPERIMENTS)}, got {experiment!r}")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    argv = list(argv)
    for flag in ("--seed", "--out", "--resume"):
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise ValueError(f"{flag} is set by the seeds driver; remove it from the experiment's arguments")
    module = importlib.import_module(EXPERIMENTS[experiment])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "seeds.json"
    if previous.is_file():  # seeds of one table must come from one command
        before = json.loads(previous.read_text())
        if (before.get("experiment"), before.get("argv")) != (experiment, argv):
            raise SystemExit(f"{out} holds seeds of another command ({before.get('experiment')} "
                             f"{' '.join(before.get('argv', []))}); use another --out")
    per_seed, ran = {}, []
    for seed in seeds:
        folder = seed_folder(out, seed)
        metrics_path = folder / "metrics.json"
        if not metrics_path.is_file():
            resume = ["--resume"] if folder.is_dir() else []
            log(f"seed {seed}: running into {folder}" + (" (resuming)" if resume else ""))
            result = module.main(argv + ["--seed", str(seed), "--out", str(folder)] + resume)
            if isinstance(result, dict) and result.get("stopped"):
                raise SystemExit(f"seed {seed} stopped; rerun the same command to continue")
            ran.append(seed)
        else:
            log(f"seed {seed}: finished earlier, read from {metrics_path}")
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("seed", metrics.get("config", {}).get("seed")) != seed:
            raise SystemExit(f"{metrics_path} is not the run of seed {seed}")
        per_seed[seed] = module.seed_rows(metrics)
    table = summarize(per_seed)
    result = {"experiment": experiment, "seeds": seeds, "argv": argv, "ran": ran, "table": table}
    (out / "seeds.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "seeds.md").write_text(markdown(table))
    return result
