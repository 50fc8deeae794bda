"""Run one experiment for several seeds and write one table of means, spreads and paired differences.

    python -m experiments.seeds classification --seeds 0,1,2 --out results/seeds/cl-paper -- \\
        --protocol paper --data-root DIR
    python -m experiments.seeds denoising --seeds 0,1,2 --out results/seeds/dae -- --data-root DIR

Everything after "--" goes to the experiment (not --seed, --out or --resume: the driver sets them). Seed S
runs into OUT/seed-S; rerunning the command skips the finished seeds and continues an interrupted one.
The table: OUT/seeds.md and OUT/seeds.json (experiments/common/seeds.py says how it is computed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common.seeds import EXPERIMENTS, run_seeds  # noqa: E402


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds is empty")
    return seeds


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m experiments.seeds", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", required=True, help="folder of the per-seed folders and of the table")
    args = p.parse_args(argv)
    try:
        result = run_seeds(args.experiment, args.seeds, args.out, rest)
    except ValueError as exc:
        p.error(str(exc))
    print((Path(args.out) / "seeds.md").read_text())
    return result


if __name__ == "__main__":
    main()
