"""Experiment 1: binary pattern memorization and reconstruction (Miconi, Clune & Stanley 2018).

A plastic recurrent network of N units plus one bias neuron sees, in each episode, a few random
+/-1 patterns (each shown for a few steps, then a few zero steps, the whole set twice in random
order), then one of them with half of its bits erased. It must output the full pattern at the
last step. Fixed weights cannot know the patterns in advance: only the Hebbian traces, written
within the episode, can store them. The network learns (by BPTT through the traces) the fixed
weights w, the plasticity coefficients alpha and the plasticity rate eta that make this work.

    python -m experiments.pattern_memorization                       # Miconi's setup, fused op
    python -m experiments.pattern_memorization --impl reference      # same run on the reference
    python -m experiments.pattern_memorization --no-plastic          # alpha fixed at 0
    python -m experiments.pattern_memorization --lstm                # LSTM baseline
    python -m experiments.pattern_memorization --pattern-size 961 --corruption minus-one
    torchrun --standalone --nproc-per-node 2 -m experiments.pattern_memorization --batch-size 8   # 2 processes
    python -m experiments.pattern_memorization --eval-every 32 --target-error 0.01 --time-budget 600   # to 1%

Outputs (in --out): metrics.json, loss_curve.png, reconstruction.png, checkpoint.pt.
See docs/experiments/pattern_memorization.md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

if __package__ in (None, ""):  # run as a file: make `experiments` and `plastic_ops` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plastic_ops  # noqa: E402
from experiments.common import (CheckpointManager, ResultsDir, StopRequested, add_common_args,  # noqa: E402
                                restores_torch_threads, set_seed)
from experiments.common.progress import progress_bar  # noqa: E402
from experiments.common.distributed import Distributed  # noqa: E402
from plastic_ops.nn import PlasticRNN  # noqa: E402

# Fields of the command line that define a run: --resume refuses a checkpoint made with others.
RUN_FIELDS = ("model", "pattern_size", "num_patterns", "cycles", "pres_steps", "gap_steps", "test_steps",
              "corruption", "corrupt_fraction", "input_scale", "lr", "batch_size", "seed", "lstm_hidden")


# ---------------------------------------------------------------------------------------------
# Episodes


@dataclass
class EpisodeConfig:
    pattern_size: int = 1000
    num_patterns: int = 5
    cycles: int = 2  # times the whole set is shown
    pres_steps: int = 6  # steps each pattern is shown (t_ns)
    gap_steps: int = 4  # zero steps after each presentation (t_zs)
    test_steps: int = 6  # steps the corrupted cue is shown
    corruption: str = "zero"  # erased bits become 0, or -1 with "minus-one"
    corrupt_fraction: float = 0.5

    @property
    def steps(self) -> int:
        return self.num_patterns * self.cycles * (self.pres_steps + self.gap_steps) + self.test_steps


@dataclass
class Episodes:
    inputs: torch.Tensor  # (T, B, pattern_size + 1), last column the bias neuron's input (always 1)
    target: torch.Tensor  # (B, pattern_size), the pattern to reconstruct
    cue: torch.Tensor  # (B, pattern_size), the corrupted pattern shown at the end
    patterns: torch.Tensor  # (B, num_patterns, pattern_size), all patterns of the episode


def make_episodes(batch: int, cfg: EpisodeConfig, generator: torch.Generator) -> Episodes:
    """Draw `batch` independent episodes (on the CPU, from `generator` only, so runs are reproducible)."""
    B, P, N = batch, cfg.num_patterns, cfg.pattern_size
    g = generator
    patterns = torch.randint(0, 2, (B, P, N), generator=g).float() * 2 - 1
    inputs = torch.zeros(cfg.steps, B, N + 1)
    inputs[:, :, N] = 1.0  # the bias neuron's input
    rows = torch.arange(B)
    block = cfg.pres_steps + cfg.gap_steps
    for cycle in range(cfg.cycles):
        order = torch.rand(B, P, generator=g).argsort(dim=1)  # a fresh random order per episode and cycle
        for k in range(P):
            t0 = (cycle * P + k) * block
            inputs[t0:t0 + cfg.pres_steps, :, :N] = patterns[rows, order[:, k]]
    which = torch.randint(0, P, (B,), generator=g)
    target = patterns[rows, which]
    # exactly round(fraction * N) erased bits per episode, at random positions
    n_erased = int(round(cfg.corrupt_fraction * N))
    erased = torch.rand(B, N, generator=g).argsort(dim=1)[:, :n_erased]
    cue = target.clone()
    cue.scatter_(1, erased, 0.0 if cfg.corruption == "zero" else -1.0)
    inputs[cfg.steps - cfg.test_steps:, :, :N] = cue
    return Episodes(inputs, target, cue, patterns)


def image_shape(n: int) -> tuple[int, int]:
    """The most square (rows, cols) with rows * cols == n (31x31 for 961, 25x40 for 1000)."""
    rows = int(math.isqrt(n))
    while n % rows:
        rows -= 1
    return rows, n // rows


# ---------------------------------------------------------------------------------------------
# Models


class PlasticPatternNet(nn.Module):
    """Miconi's network: N + 1 units of PlasticRNN (the last one the bias neuron), inputs times 20.

    The output is the first N units at the last step. With plastic=False alpha is zero and frozen:
    the very same network without plasticity (an ordinary RNN), the baseline of the paper.
    """

    def __init__(self, pattern_size: int, *, plastic: bool = True, impl: str = "fused", input_scale: float = 20.0):
        super().__init__()
        self.pattern_size, self.plastic, self.input_scale = pattern_size, plastic, input_scale
        self.rnn = PlasticRNN(pattern_size + 1, bias=False, impl=impl)  # Miconi's network has no bias
        if not plastic:
            with torch.no_grad():
                self.rnn.alpha.zero_()
            self.rnn.alpha.requires_grad_(False)
            self.rnn.eta.requires_grad_(False)  # without alpha the trace never reaches the output

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(inputs * self.input_scale)
        return y[-1, :, :self.pattern_size]


class LSTMPatternNet(nn.Module):
    """The LSTM baseline: the same (unscaled) inputs, a tanh readout of the last hidden state."""

    def __init__(self, pattern_size: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(pattern_size + 1, hidden)
        self.readout = nn.Linear(hidden, pattern_size)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(inputs)
        return torch.tanh(self.readout(h[-1]))


def lstm_hidden_for(pattern_size: int, budget: int) -> int:
    """The LSTM hidden size whose parameter count is closest to `budget` (Miconi compares at equal size)."""
    n_in = pattern_size + 1

    def count(h):
        return 4 * h * (n_in + h + 2) + h * pattern_size + pattern_size

    return min(range(1, 4 * n_in), key=lambda h: abs(count(h) - budget))


def build_model(args) -> nn.Module:
    if args.model == "lstm":
        return LSTMPatternNet(args.pattern_size, args.lstm_hidden)
    model = PlasticPatternNet(args.pattern_size, plastic=args.model == "plastic", impl=args.impl,
                              input_scale=args.input_scale)
    model.rnn.trace_dtype = getattr(torch, getattr(args, "trace_dtype", "float32"))  # docs/op_spec.md, "Dtypes"
    return model


def num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def episode_loss(output, target):
    """Per-episode mean squared error over the pattern bits, and the fraction of bits with the wrong sign."""
    loss = (output - target).pow(2).mean(dim=1)
    bit_error = (torch.sign(output) != target).float().mean(dim=1)
    return loss, bit_error


@torch.no_grad()
def evaluate(model, cfg: EpisodeConfig, episodes: int, seed: int, batch: int, device):
    """Loss and bit error on `episodes` fresh episodes drawn from a fixed seed (the same for every run)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    losses, errors, first = [], [], None
    done = 0
    while done < episodes:
        ep = make_episodes(min(batch, episodes - done), cfg, g)
        out = model(ep.inputs.to(device)).cpu()
        loss, err = episode_loss(out, ep.target)
        losses.append(loss)
        errors.append(err)
        if first is None:
            first = (ep, out)
        done += ep.target.shape[0]
    model.train()
    return torch.cat(losses).mean().item(), torch.cat(errors).mean().item(), first


# ---------------------------------------------------------------------------------------------
# Time to accuracy: training clocks, a held-out curve, early stop and budget


# A resumed curve must be measured on the same episodes at the same interval.
CURVE_FIELDS = ("eval_every", "curve_episodes", "curve_seed")


class TimeToAccuracy:
    """What a time-to-accuracy measurement needs from a run, kept out of the training loop itself.

    - The training clock: wall-clock and process CPU time of the training steps only (evaluation,
      checkpoints and the progress bar are outside it). With --threads 1 the CPU time is that of the
      one thread, which load from other processes on a shared machine barely changes.
    - The held-out curve: loss and bit error on a FIXED set of `curve_episodes` episodes drawn from
      `curve_seed` (distinct from the final test's `eval_seed`), before training and then every
      `eval_every` training episodes; its own time is counted apart.
    - The stop rules: `target_error` reached on the curve, or `time_budget` seconds of training spent
      (on the clock `budget_clock`).
    Everything is in the checkpoint, so a resumed run goes on with the same clocks and curve.
    """

    def __init__(self, args, cfg: EpisodeConfig, device):
        self.args, self.cfg, self.device = args, cfg, device
        self.train_cpu_s = 0.0
        self.eval_wall_s = 0.0
        self.eval_cpu_s = 0.0
        self.curve = {"episodes": [], "train_wall_s": [], "train_cpu_s": [], "loss": [], "bit_error": []}
        self._cpu0 = None
        self.loadavg_start = os.getloadavg()  # the machine's load, for the record (the CPU clock resists it)

    @property
    def enabled(self) -> bool:
        return self.args.eval_every > 0

    def step_started(self) -> None:
        self._cpu0 = time.process_time()

    def step_ended(self) -> None:
        self.train_cpu_s += time.process_time() - self._cpu0

    def measure(self, model, episodes: int, train_wall_s: float) -> None:
        """One point of the curve, after `episodes` training episodes; its cost goes to the eval clocks."""
        w0, c0 = time.perf_counter(), time.process_time()
        impl = getattr(getattr(model, "rnn", None), "impl", None)
        if impl is not None and self.args.curve_impl == "fused":
            model.rnn.impl = "fused"  # the same function, only cheaper to evaluate than the reference
        try:
            loss, err, _ = evaluate(model, self.cfg, self.args.curve_episodes, self.args.curve_seed,
                                    self.args.eval_batch, self.device)
        finally:
            if impl is not None:
                model.rnn.impl = impl
        self.eval_wall_s += time.perf_counter() - w0
        self.eval_cpu_s += time.process_time() - c0
        for key, value in (("episodes", episodes), ("train_wall_s", train_wall_s), ("train_cpu_s", self.train_cpu_s),
                           ("loss", loss), ("bit_error", err)):
            self.curve[key].append(value)

    def maybe_measure(self, model, episodes: int, batch: int, train_wall_s: float) -> None:
        """Measure when the last step crossed a multiple of eval_every (or before the first step)."""
        if not self.enabled or (self.curve["episodes"] and self.curve["episodes"][-1] == episodes):
            return
        if episodes == 0 or episodes // self.args.eval_every > (episodes - batch) // self.args.eval_every:
            self.measure(model, episodes, train_wall_s)

    def stop_reason(self, train_wall_s: float) -> str | None:
        """'target' or 'budget' when the run should stop now, else None (checked again after a resume)."""
        a = self.args
        if a.target_error is not None and self.curve["bit_error"] and self.curve["bit_error"][-1] <= a.target_error:
            return "target"
        spent = self.train_cpu_s if a.budget_clock == "cpu" else train_wall_s
        if a.time_budget is not None and spent >= a.time_budget:
            return "budget"
        return None

    def state_dict(self) -> dict:
        return {"fields": {k: getattr(self.args, k) for k in CURVE_FIELDS}, "train_cpu_s": self.train_cpu_s,
                "eval_wall_s": self.eval_wall_s, "eval_cpu_s": self.eval_cpu_s, "curve": self.curve}

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:  # a checkpoint from before these clocks: only an unmeasured curve can go on
            if self.enabled:
                raise SystemExit("--resume: the checkpoint has no held-out curve; resume without --eval-every")
            return
        if self.enabled or state["curve"]["episodes"]:
            mismatch = {k: (getattr(self.args, k), v) for k, v in state["fields"].items()
                        if getattr(self.args, k) != v}
            if mismatch:
                detail = ", ".join(f"--{k.replace('_', '-')} {new!r} (checkpoint: {old!r})"
                                   for k, (new, old) in mismatch.items())
                raise SystemExit(f"--resume: the checkpoint's held-out curve was measured otherwise: {detail}")
        self.train_cpu_s, self.eval_wall_s, self.eval_cpu_s = (state["train_cpu_s"], state["eval_wall_s"],
                                                                state["eval_cpu_s"])
        self.curve = state["curve"]

    def metrics(self, stop: str) -> dict:
        a = self.args
        return {"train_cpu_s": self.train_cpu_s, "eval_wall_s": self.eval_wall_s, "eval_cpu_s": self.eval_cpu_s,
                "eval_every": a.eval_every, "curve_episodes": a.curve_episodes, "curve_seed": a.curve_seed,
                "curve_impl": a.curve_impl,
                "target_error": a.target_error, "time_budget": a.time_budget, "budget_clock": a.budget_clock,
                "stop": stop, "loadavg_start": self.loadavg_start, "loadavg_end": os.getloadavg(),
                "curve": self.curve}


def print_time_to_accuracy(tta: TimeToAccuracy, stop: str, train_wall_s: float) -> None:
    print(f"training: {train_wall_s:.1f} s wall-clock, {tta.train_cpu_s:.1f} s CPU; stopped by "
          + {"episodes": "--episodes", "target": "--target-error", "budget": "--time-budget"}[stop])
    if tta.enabled:
        c = tta.curve
        print(f"held-out curve ({tta.args.curve_episodes} episodes, seed {tta.args.curve_seed}): {len(c['episodes'])} "
              f"points, last {100 * c['bit_error'][-1]:.2f}% bit error at {c['episodes'][-1]} episodes; measuring it "
              f"took {tta.eval_wall_s:.1f} s wall-clock, {tta.eval_cpu_s:.1f} s CPU (not in the training clock)")


def add_time_to_accuracy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("time to accuracy (held-out curve, early stop, budget)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="measure the held-out curve every this many training episodes (0: no curve)")
    g.add_argument("--curve-episodes", type=int, default=50, help="fixed held-out episodes of the curve")
    g.add_argument("--curve-seed", type=int, default=4321,
                   help="seed of the curve's episodes (must differ from --eval-seed, the final test's)")
    g.add_argument("--curve-impl", choices=("train", "fused"), default="train",
                   help="implementation that measures the curve: the one trained, or the fused op (the same "
                        "function, much cheaper than the reference's forward; outside the training clock)")
    g.add_argument("--target-error", type=float, default=None,
                   help="stop once the curve's bit error is at most this (a fraction: 0.01 is 1%%)")
    g.add_argument("--time-budget", type=float, default=None,
                   help="stop once the training steps have taken this many seconds (on --budget-clock)")
    g.add_argument("--budget-clock", choices=("cpu", "wall"), default="cpu",
                   help="clock of --time-budget: process CPU time or wall-clock of the training steps")


def check_time_to_accuracy_args(p: argparse.ArgumentParser, args) -> None:
    if args.eval_every < 0:
        p.error(f"--eval-every must be >= 0, got {args.eval_every}")
    if args.curve_episodes < 1:
        p.error(f"--curve-episodes must be at least 1, got {args.curve_episodes}")
    if args.curve_seed == args.eval_seed:
        p.error(f"--curve-seed must differ from --eval-seed (both {args.eval_seed}): the final test's episodes "
                "must stay unseen")
    if args.curve_impl == "fused" and args.eval_every and not plastic_ops.extension_available():
        p.error("--curve-impl fused needs the compiled extension of plastic_ops")
    if args.target_error is not None:
        if not 0.0 <= args.target_error < 1.0:
            p.error(f"--target-error must be in [0, 1), got {args.target_error}")
        if args.eval_every == 0:
            p.error("--target-error needs the held-out curve: give --eval-every")
    if args.time_budget is not None and not args.time_budget > 0:
        p.error(f"--time-budget must be positive, got {args.time_budget}")


def run_fields(args) -> dict:
    return {k: getattr(args, k) for k in RUN_FIELDS}


def train(args, model, optimizer, cfg, device, results: ResultsDir, dist: Distributed | None = None,
          tta: TimeToAccuracy | None = None):
    """The training loop; returns (history, training seconds, why it stopped: "episodes", "target" or
    "budget"). Everything it needs is in the checkpoint; `tta` keeps the CPU clock and the held-out curve.

    Under torchrun every process draws the same global batch and trains on its share of the episodes
    (DDP averages the gradients); the logged loss and bit error are the global batch's means.
    """
    dist = dist or Distributed()
    tta = tta or TimeToAccuracy(args, cfg, device)
    net = dist.wrap(model)  # forward/backward through DDP; the state dicts are the plain model's
    mine = dist.shard(args.batch_size) if dist.enabled else None
    ckpt = CheckpointManager(results.file("checkpoint.pt"),
                             every=max(1, round(args.checkpoint_every / args.batch_size)))
    gen = torch.Generator().manual_seed(args.seed)
    history = {"episodes": [], "loss": [], "bit_error": []}
    step, elapsed = 0, 0.0
    if args.resume:
        state = dist.broadcast(ckpt.load() if dist.is_main else None)  # read once, by rank 0
        if state is None:
            raise SystemExit(f"--resume: no checkpoint at {ckpt.path}")
        mismatch = {k: (v, state["run"].get(k)) for k, v in run_fields(args).items() if state["run"].get(k) != v}
        if mismatch:
            detail = ", ".join(f"--{k.replace('_', '-')} {new!r} (checkpoint: {old!r})"
                               for k, (new, old) in mismatch.items())
            raise SystemExit(f"--resume: the checkpoint in {results.path} belongs to another run: {detail}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        history, step, elapsed = state["history"], state["step"], state["elapsed"]
        tta.load_state_dict(state.get("time_to_accuracy"))
        print(f"Resuming from {ckpt.path} at episode {step * args.batch_size}")

    total_steps = math.ceil(args.episodes / args.batch_size)

    def make_state():
        return {"run": run_fields(args), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": gen.get_state(), "history": history, "step": step, "elapsed": elapsed,
                "time_to_accuracy": tta.state_dict()}

    def should_stop():  # rank 0 measures the curve and decides; every process stops on the same step
        if dist.is_main:
            tta.maybe_measure(model, step * args.batch_size, args.batch_size, elapsed)
        reason = tta.stop_reason(elapsed) if dist.is_main else None
        return dist.broadcast(reason) if dist.enabled and (tta.enabled or args.time_budget) else reason

    bar = progress_bar(total=total_steps * args.batch_size, initial=step * args.batch_size, unit="ep",
                       desc=f"{args.model}/{args.impl if args.model != 'lstm' else 'torch'}",
                       disable=args.no_progress)
    tail = max(1, 50 // args.batch_size)  # a resumed bar goes on from the running averages it showed
    run_loss = float(np.mean(history["loss"][-tail:])) if history["loss"] else None
    run_err = float(np.mean(history["bit_error"][-tail:])) if history["bit_error"] else None
    stop = should_stop()  # the curve's first point, before training (or a resumed run already done)
    with ckpt.catch_interrupt():
        while step < total_steps and stop is None:
            t0 = time.perf_counter()
            tta.step_started()
            ep = make_episodes(args.batch_size, cfg, gen)  # the global batch, the same on every process
            inputs, target = (ep.inputs, ep.target) if mine is None else (ep.inputs[:, mine], ep.target[mine])
            out = net(inputs.to(device))
            loss, err = episode_loss(out, target.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.mean().backward()
            optimizer.step()
            if dist.enabled:  # global means, and a Ctrl-C on any process stops all of them at this step
                loss_s, err_s, stops = dist.sum([loss.sum(), err.sum(), float(ckpt.stop_requested)])
                loss_v, err_v = loss_s / args.batch_size, err_s / args.batch_size
            else:
                loss_v, err_v = loss.mean().item(), err.mean().item()  # .item() syncs, so the timing is honest
            elapsed += time.perf_counter() - t0
            tta.step_ended()
            step += 1
            stop = should_stop()
            history["episodes"].append(step * args.batch_size)
            history["loss"].append(loss_v)
            history["bit_error"].append(err_v)
            # running averages over about the last 50 episodes, for the progress bar
            k = min(1.0, args.batch_size / 50)
            run_loss = loss_v if run_loss is None else (1 - k) * run_loss + k * loss_v
            run_err = err_v if run_err is None else (1 - k) * run_err + k * err_v
            bar.update(args.batch_size)
            bar.set_postfix(loss=f"{run_loss:.4f}", bit_err=f"{100 * run_err:.2f}%")
            if dist.is_main:  # only rank 0 writes
                ckpt.maybe_save(step, make_state)
            # under torchrun the processes stop on the step they agreed on, never one alone (it would hang)
            if (stops > 0) if dist.enabled else ckpt.stop_requested:
                if dist.is_main:
                    ckpt.save(make_state())
                bar.close()
                raise StopRequested
    bar.close()
    if dist.is_main:
        ckpt.save(make_state())  # the finished run: --resume with a larger --episodes continues it
    return history, elapsed, stop or "episodes"


# ---------------------------------------------------------------------------------------------
# Figures


def smooth(values, window):
    if len(values) < 2 or window <= 1:
        return np.asarray(values)
    window = min(window, len(values))
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_loss_curve(history, path: Path, title: str, batch: int) -> None:
    episodes = np.asarray(history["episodes"])
    window = max(1, 50 // batch)  # about 50 episodes
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    # the loss spans decades (log scale); the bit error reaches exactly 0 (linear, in percent)
    for ax, key, label, scale in ((axes[0], "loss", "loss (MSE per bit)", 1.0),
                                  (axes[1], "bit_error", "bit error (%)", 100.0)):
        values = np.asarray(history[key]) * scale
        if key == "loss":
            values = np.maximum(values, 1e-7)
            ax.set_yscale("log")
        ax.plot(episodes, values, color="0.75", lw=0.6, label="per optimizer step")
        if len(values) >= window > 1:
            ax.plot(episodes[window - 1:], smooth(values, window), color="C0", lw=1.5,
                    label=f"mean of {window * batch} episodes")
        ax.set_xlabel("training episodes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.14, top=0.88, wspace=0.3)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_reconstruction(ep: Episodes, output: torch.Tensor, path: Path, title: str, rows: int = 3) -> None:
    """Like the paper's Fig. 1-2: the episode's patterns, the corrupted cue, the output and the target.

    The panels are tiled into one image (one imshow instead of dozens of axes keeps this fast).
    """
    h, w = image_shape(ep.target.shape[1])
    rows = min(rows, ep.target.shape[0])
    P = ep.patterns.shape[1]
    labels = [f"pattern {i + 1}" for i in range(P)] + ["corrupted cue", "output", "target"]
    pad = max(1, w // 8)
    mosaic = np.full((rows * (h + pad) - pad, len(labels) * (w + pad) - pad), np.nan)
    for r in range(rows):
        images = [ep.patterns[r, i] for i in range(P)] + [ep.cue[r], output[r], ep.target[r]]
        for c, img in enumerate(images):
            y0, x0 = r * (h + pad), c * (w + pad)
            mosaic[y0:y0 + h, x0:x0 + w] = img.reshape(h, w).numpy()
    cmap = plt.get_cmap("gray").with_extremes(bad="white")  # white gaps between the panels
    width = 1.1 * len(labels)
    fig = plt.figure(figsize=(width, width * mosaic.shape[0] / mosaic.shape[1] + 0.7))
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.98 - 0.7 / fig.get_figheight()))
    ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest", aspect="equal")
    ax.set_axis_off()
    for c, label in enumerate(labels):
        ax.text(c * (w + pad) + w / 2, -pad, label, ha="center", va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Pattern memorization and reconstruction with differentiable Hebbian plasticity "
                    "(Miconi, Clune & Stanley 2018). Defaults reproduce Miconi's binary-pattern setup.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, default_out="results/pattern_memorization")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--no-plastic", action="store_true",
                       help="baseline: the same network with alpha fixed at 0 (an ordinary RNN)")
    model.add_argument("--lstm", action="store_true",
                       help="baseline: an LSTM with about as many parameters as the plastic network")
    p.add_argument("--lstm-hidden", type=int, default=None,
                   help="LSTM hidden size (default: matched to the plastic network's parameter count)")
    g = p.add_argument_group("episodes")
    g.add_argument("--pattern-size", type=int, default=1000,
                   help="bits per pattern (the network has this many units plus a bias neuron); "
                        "961 gives the paper's 31x31 images")
    g.add_argument("--num-patterns", type=int, default=5, help="patterns shown per episode")
    g.add_argument("--cycles", type=int, default=2, help="times the whole set of patterns is shown")
    g.add_argument("--pres-steps", "--t-ns", dest="pres_steps", type=int, default=6,
                   help="steps each pattern is shown for (t_ns)")
    g.add_argument("--gap-steps", "--t-zs", dest="gap_steps", type=int, default=4,
                   help="zero-input steps after each presentation (t_zs)")
    g.add_argument("--test-steps", type=int, default=6, help="steps the corrupted cue is shown for")
    g.add_argument("--corruption", choices=("zero", "minus-one"), default="zero",
                   help="what the erased bits of the cue become: 0, or -1")
    g.add_argument("--corrupt-fraction", type=float, default=0.5, help="fraction of the cue's bits erased")
    g.add_argument("--input-scale", type=float, default=20.0, help="inputs are multiplied by this (Miconi: 20)")
    p.add_argument("--trace-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="storage dtype of the plastic trace (bfloat16: half the trace's memory traffic)")
    t = p.add_argument_group("training")
    t.add_argument("--episodes", type=int, default=1000, help="training episodes (rounded up to whole batches)")
    t.add_argument("--batch-size", type=int, default=1,
                   help="independent episodes per optimizer step, each with its own trace (1: Miconi's setup)")
    t.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    t.add_argument("--checkpoint-every", type=int, default=200, help="save a checkpoint every this many episodes")
    t.add_argument("--eval-episodes", type=int, default=100, help="fresh held-out episodes for the final test")
    t.add_argument("--eval-seed", type=int, default=1234,
                   help="seed of the held-out episodes (fixed, so every run is tested on the same ones)")
    t.add_argument("--eval-batch", type=int, default=20, help="episodes per forward pass in the final test")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_time_to_accuracy_args(p)
    args = p.parse_args(argv)
    check_time_to_accuracy_args(p, args)

    for name in ("pattern_size", "num_patterns", "cycles", "pres_steps", "test_steps", "episodes", "batch_size",
                 "checkpoint_every", "eval_episodes", "eval_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.gap_steps < 0:
        p.error(f"--gap-steps must be >= 0, got {args.gap_steps}")
    if not 0.0 <= args.corrupt_fraction <= 1.0:
        p.error(f"--corrupt-fraction must be in [0, 1], got {args.corrupt_fraction}")
    if args.lr <= 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if args.lstm_hidden is not None and not args.lstm:
        p.error("--lstm-hidden only applies with --lstm")
    args.model = "lstm" if args.lstm else ("nonplastic" if args.no_plastic else "plastic")
    if args.model == "lstm" and args.lstm_hidden is None:
        args.lstm_hidden = lstm_hidden_for(args.pattern_size, 2 * (args.pattern_size + 1) ** 2 + 1)
    return args


@restores_torch_threads
def main(argv=None) -> dict | None:
    """Train, test on held-out episodes, write figures and metrics.json. Returns the metrics (None on Ctrl-C).

    Under torchrun (WORLD_SIZE > 1) the processes share the training; rank 0 alone then tests and writes,
    and the other ranks return {"rank": rank} once training is done.
    """
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dist, device = Distributed.from_env(args.device)
    with dist.scope():
        dist.check_divisible(args.batch_size, "--batch-size")
        if not dist.is_main:
            args.no_progress = True  # one progress bar, rank 0's
        return run(args, dist, device)


def run(args, dist: Distributed, device) -> dict | None:
    if args.model != "lstm" and args.impl == "fused" and not plastic_ops.extension_available():
        raise SystemExit("--impl fused needs the compiled extension of plastic_ops, which is not available "
                         "(build it, see README.md), or run with --impl reference")
    cfg = EpisodeConfig(args.pattern_size, args.num_patterns, args.cycles, args.pres_steps, args.gap_steps,
                        args.test_steps, args.corruption, args.corrupt_fraction)
    results = ResultsDir(args.out)
    set_seed(args.seed)
    model = build_model(args).to(device)
    optimizer = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=args.lr)
    impl = "torch" if args.model == "lstm" else args.impl
    print(f"{args.model} network, impl={impl}, {num_trainable(model):,} trained parameters, "
          f"T={cfg.steps} steps per episode, batch {args.batch_size}, device {device}"
          + (f", {dist.world_size} processes ({dist.backend})" if dist.enabled else ""))

    tta = TimeToAccuracy(args, cfg, device)
    try:
        history, elapsed, stop = train(args, model, optimizer, cfg, device, results, dist, tta)
    except StopRequested:
        print(f"Stopped; checkpoint saved in {results.path}. Continue with the same command plus --resume.")
        return None
    if not dist.is_main:
        return {"rank": dist.rank}

    eval_loss, eval_err, (ep, out) = evaluate(model, cfg, args.eval_episodes, args.eval_seed, args.eval_batch, device)
    episodes = history["episodes"][-1] if history["episodes"] else 0
    tail = max(1, 50 // args.batch_size)
    final_loss = float(np.mean(history["loss"][-tail:])) if history["loss"] else float("nan")
    final_err = float(np.mean(history["bit_error"][-tail:])) if history["bit_error"] else float("nan")
    eps_per_s = episodes / elapsed if elapsed > 0 else float("nan")
    title = (f"{args.model} ({impl}), N={args.pattern_size}, batch {args.batch_size}, {episodes} episodes: "
             f"held-out bit error {100 * eval_err:.2f}%")
    plot_loss_curve(history, results.file("loss_curve.png"), title, args.batch_size)
    plot_reconstruction(ep, out, results.file("reconstruction.png"), title)
    metrics = {
        "experiment": "pattern_memorization",
        "model": args.model, "impl": impl, "batch_size": args.batch_size, "device": str(device),
        "world_size": dist.world_size, "per_process_batch": args.batch_size // dist.world_size,
        "trained_parameters": num_trainable(model), "steps_per_episode": cfg.steps,
        "episodes": episodes,
        "final_train_loss": final_loss, "final_train_bit_error": final_err,
        "eval": {"episodes": args.eval_episodes, "seed": args.eval_seed, "loss": eval_loss, "bit_error": eval_err},
        "wall_clock_s": elapsed, "episodes_per_s": eps_per_s,
        "time_to_accuracy": tta.metrics(stop),
        "eta": model.rnn.eta.item() if args.model != "lstm" else None,
        "args": vars(args), "history": history,
    }
    results.write_json("metrics.json", metrics)

    header = ("model", "impl", "batch", "episodes", "final loss", "held-out loss", "held-out bit err",
              "wall-clock", "episodes/s")
    row = (args.model, impl, str(args.batch_size), str(episodes), f"{final_loss:.5f}", f"{eval_loss:.5f}",
           f"{100 * eval_err:.2f}%", f"{elapsed:.1f} s", f"{eps_per_s:.2f}")
    widths = [max(len(h), len(c)) for h, c in zip(header, row)]
    print()
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print(f"(final loss: training MSE per bit over the last {tail * args.batch_size} episodes; held-out: "
          f"{args.eval_episodes} fresh episodes, seed {args.eval_seed})")
    print_time_to_accuracy(tta, stop, elapsed)
    print(f"Results in {results.path}: metrics.json, loss_curve.png, reconstruction.png, checkpoint.pt")
    return metrics


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 130)
