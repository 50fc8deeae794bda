"""`make demo`: a short pattern-memorization training on the fused op, and its speed against the reference.

1. Trains Miconi's plastic network on 100-bit patterns (101 neurons with the bias neuron) for
   2000 episodes at batch 1 on the fused op, with a progress bar, and tests it on fresh episodes.
2. Runs the first episodes of the same training again on the fused op and on the pure-PyTorch
   reference, one after the other, and prints the speed ratio.

The full-size experiment (1000-bit patterns) is experiments/pattern_memorization.py.
"""
from __future__ import annotations

import argparse
import sys

from experiments import pattern_memorization


def run(extra, out, episodes, impl, quiet=False):
    argv = ["--pattern-size", str(ARGS.pattern_size), "--episodes", str(episodes), "--batch-size", "1",
            "--impl", impl, "--out", out, "--eval-episodes", "50" if not quiet else "5",
            "--threads", str(ARGS.threads)] + extra
    if quiet:
        argv.append("--no-progress")
    metrics = pattern_memorization.main(argv)
    if metrics is None:
        sys.exit(130)
    return metrics


def main(argv=None):
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pattern-size", type=int, default=100, help="bits per pattern")
    p.add_argument("--episodes", type=int, default=2000, help="training episodes")
    p.add_argument("--speed-episodes", type=int, default=100, help="episodes timed on each implementation")
    p.add_argument("--out", default="results/demo", help="results folder")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both implementations (a 101-neuron network gains nothing from more)")
    ARGS = p.parse_args(argv)

    print(f"== 1. Training on the fused op: {ARGS.pattern_size}-bit patterns, {ARGS.episodes} episodes, batch 1")
    trained = run([], f"{ARGS.out}/train", ARGS.episodes, "fused")

    print(f"\n== 2. Speed: the same training, {ARGS.speed_episodes} episodes on each implementation")
    fused = run([], f"{ARGS.out}/speed_fused", ARGS.speed_episodes, "fused", quiet=True)
    ref = run([], f"{ARGS.out}/speed_reference", ARGS.speed_episodes, "reference", quiet=True)

    print("\n== Summary")
    print(f"held-out bit error after {trained['episodes']} episodes: {100 * trained['eval']['bit_error']:.2f}% "
          f"(loss {trained['eval']['loss']:.4f}); figures in {ARGS.out}/train")
    print(f"episodes/s: fused {fused['episodes_per_s']:.1f}, reference {ref['episodes_per_s']:.1f} -> "
          f"fused is {fused['episodes_per_s'] / ref['episodes_per_s']:.1f}x faster on this machine")


ARGS = None

if __name__ == "__main__":
    main()
