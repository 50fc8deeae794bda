"""Where a training step of the pattern-memorization experiment spends its time.

    python -m benchmarks.pattern_memorization_breakdown [--impl fused|reference] [--steps 10] [--threads N]

Runs the experiment's own pieces (episode generation, PlasticPatternNet, episode_loss, Adam) at
Miconi's settings, batch 1, and times each phase of every training step after one warm-up step;
prints the median of each phase in ms and its share of the step. The fused op's phases are the
forward (the op's forward plus the input scaling) and the backward (the op's backward plus the
autograd of the wrappers: alpha expansion, e = eta * modulation, the loss).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from experiments.pattern_memorization import EpisodeConfig, PlasticPatternNet, episode_loss, make_episodes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--impl", choices=("fused", "reference"), default="fused")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = EpisodeConfig()  # Miconi's settings, the experiment's defaults
    model = PlasticPatternNet(cfg.pattern_size, impl=a.impl)
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=3e-4)
    gen = torch.Generator().manual_seed(0)
    phases = {"episode": [], "forward": [], "backward": [], "optimizer": []}
    for step in range(a.steps + 1):
        t0 = time.perf_counter()
        ep = make_episodes(1, cfg, gen)
        t1 = time.perf_counter()
        loss, _ = episode_loss(model(ep.inputs), ep.target)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if step:  # the first step is a warm-up
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[name].append(dt)
    med = {k: statistics.median(v) for k, v in phases.items()}
    total = sum(med.values())
    print(f"impl={a.impl} threads={torch.get_num_threads()} steps={a.steps} (medians, batch 1, N = 1000, T = 106)")
    for k, v in med.items():
        print(f"  {k:10s} {1e3 * v:8.1f} ms  {100 * v / total:5.1f}%")
    print(f"  {'total':10s} {1e3 * total:8.1f} ms")


if __name__ == "__main__":
    main()
