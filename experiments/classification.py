"""Experiment 3: MNIST classification with a plastic vs a non-plastic output layer ("Plasticity in Deep Neural
Networks", Upadhyay & Bagad, building on Miconi, Clune & Stanley 2018).

A small convolutional network (two convolution + ReLU + max-pooling blocks, then a hidden ReLU layer)
ends either in a softmax linear layer (non-plastic) or in a plastic_ops.nn.PlasticLinear with softmax
activation whose Hebbian trace persists from image to image (plastic). Three training protocols:

  paper           each epoch samples P (default 100) training images and feeds them one at a time, the
                  trace carried from image to image (from zero at the start of the epoch), with one
                  optimizer step per image: P steps per epoch (the paper's reading: 250 epochs, 25,000
                  steps). The gradient of an image's loss stops at the trace it was given (the weights
                  change after every image), so eta gets no gradient and keeps its initial value.
  paper-sequence  the same P images as one sequence (T = P, B = 1) and one optimizer step on their mean
                  loss, the gradient flowing through the whole trace history: one step per epoch.
  batched         B parallel streams of T-image sequences, each with a trace starting from zero; the
                  convolutional features of all B * T images of a step are computed in one call; every
                  epoch covers all the training images.

Model selection uses a validation split, the last --val-images (5,000) images of the training file, never
the test set: after every epoch the model is evaluated on validation images, the epoch with the best
validation accuracy is kept, and at the end the test set is evaluated once at that epoch ("selected") and
once at the last one ("final").

The plastic model is evaluated in two ways (--plastic-test): "reset", the images in order cut into sequences
of T images with a fresh trace each (as in training), and "carry", one stream through all the images in order
with the trace never reset. Selection uses the first of them.

    python -m experiments.classification --protocol batched --data-root /path/to/data
    python -m experiments.classification --protocol paper --data-root /path/to/data   # the paper's protocol
    torchrun --standalone --nproc-per-node 2 -m experiments.classification --protocol batched  # 2 processes
    python -m experiments.seeds classification --seeds 0,1,2 --out DIR -- --protocol paper   # 3 seeds, one table

Outputs in --out: metrics.json, table.md, curves_<protocol>.png, model_<protocol>_<model>[_selected].pt,
checkpoint.pt.
Docs and measured results: docs/experiments/classification.md.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:  # the experiments are meant to be run as `python -m experiments.classification` from the repo root
    from experiments.common import (CheckpointManager, ResultsDir, StopRequested, add_common_args,
                                    restores_torch_threads, set_seed)
except ImportError:  # `python experiments/classification.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from experiments.common import (CheckpointManager, ResultsDir, StopRequested, add_common_args,
                                    restores_torch_threads, set_seed)

from experiments.common.distributed import Distributed
from experiments.common.data import VALIDATION_IMAGES
import plastic_ops
from plastic_ops.nn import PlasticLinear

PROTOCOLS = ("paper", "paper-sequence", "batched")
MODELS = ("nonplastic", "plastic")
TEST_MODES = ("reset", "carry")
NUM_CLASSES = 10
LOG_EPS = 1e-8  # the plastic layer returns probabilities: clamp before the log so a zero gives a finite loss

# Per-protocol defaults, used when the flag is not given.
PROTOCOL_DEFAULTS = {
    "paper": dict(epochs=250, lr=1e-3, schedule="constant", eval_subset=0),
    "paper-sequence": dict(epochs=250, lr=1e-3, schedule="constant", eval_subset=0),
    # batched: B = 8 streams and 3 epochs, chosen on validation (docs/experiments/classification.md)
    "batched": dict(epochs=3, lr=2e-3, schedule="cosine", eval_subset=0),
}
SYNTHETIC_VAL_IMAGES = 50  # --synthetic: the validation images carved out of the synthetic training set
# Options that change the results: a checkpoint is only resumed under the same values.
RESULT_KEYS = ("protocols", "models", "dataset", "synthetic", "train_limit", "test_limit", "val_images", "seed",
               "channels",
               "hidden", "eta", "alpha", "paper_images", "streams", "seq_len", "epochs", "lr", "schedule",
               "eval_subset", "plastic_test", "curve_every", "curve_images", "stop_at_acc", "time_budget")


# ----------------------------------------------------------------------------------------------- model

class ConvFeatures(nn.Module):
    """28x28 image -> hidden ReLU features: [conv 3x3 -> ReLU -> max-pool 2] x 2 -> linear -> ReLU."""

    def __init__(self, channels=(32, 64), hidden=128):
        super().__init__()
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3), nn.ReLU(), nn.MaxPool2d(2),   # 28 -> 26 -> 13
            nn.Conv2d(c1, c2, 3), nn.ReLU(), nn.MaxPool2d(2),  # 13 -> 11 -> 5
        )
        self.fc = nn.Linear(c2 * 5 * 5, hidden)

    def forward(self, images):
        return torch.relu(self.fc(self.conv(images).flatten(1)))


class Classifier(nn.Module):
    """Conv features then a softmax output layer, plain (nn.Linear) or plastic (PlasticLinear).

    forward(images (T, B, 1, 28, 28), trace) -> (log-probabilities (T, B, 10), trace_T or None).
    The trace only lives in the last layer, so the features of all T * B images are one batched call.
    """

    def __init__(self, plastic: bool, channels=(32, 64), hidden=128, eta=0.01, alpha="synapse", impl="fused"):
        super().__init__()
        self.plastic = plastic
        self.features = ConvFeatures(channels, hidden)
        # Both models draw the same nn.Linear, so with the same seed they start from the same weights and
        # differ only by the plastic term (alpha is small and the trace starts at zero).
        linear = nn.Linear(hidden, NUM_CLASSES)
        if plastic:
            self.out = PlasticLinear(hidden, NUM_CLASSES, activation="softmax", alpha=alpha, eta=eta, impl=impl)
            with torch.no_grad():
                self.out.weight.copy_(linear.weight.t())  # PlasticLinear stores w as (N_in, N_out)
                self.out.bias.copy_(linear.bias)
        else:
            self.out = linear

    def forward(self, images, trace=None):
        T, B = images.shape[:2]
        h = self.features(images.reshape(T * B, *images.shape[2:])).reshape(T, B, -1)
        return self.head(h, trace)

    def head(self, h, trace=None):
        """Output layer on precomputed features h (T, B, hidden)."""
        if self.plastic:
            p, state = self.out(h, trace)
            return torch.log(p.clamp_min(LOG_EPS)), state.trace
        return F.log_softmax(self.out(h), dim=-1), None

    def project(self):
        """Keep the learned plasticity rate in [0, 1]: outside it the decay (1 - eta) of the trace diverges."""
        if self.plastic and isinstance(self.out.eta, nn.Parameter):
            with torch.no_grad():
                self.out.eta.clamp_(0.0, 1.0)


# ------------------------------------------------------------------------------------------------ data

def load_data(args):
    """(train_x, train_y, val_x, val_y, test_x, test_y) on the CPU, MNIST-like float32 (N, 1, 28, 28) in [0, 1].

    The validation images are the last args.val_images of the training file (experiments.common.data.
    split_validation); --train-limit then keeps the first N of the remaining training images.
    """
    from experiments.common import data

    if args.synthetic:
        n_train = args.train_limit or 600
        n_test = args.test_limit or 200
        # one call, so every split shares the class prototypes; the training file is train + validation
        x, y = data.synthetic_dataset(n_train + args.val_images + n_test, seed=1234)
        n_file = n_train + args.val_images
        train_x, train_y, val_x, val_y = data.split_validation(x[:n_file], y[:n_file], args.val_images)
        return train_x, train_y, val_x, val_y, x[n_file:], y[n_file:]
    try:
        file_x, file_y = data.load_dataset(args.dataset, "train", root=args.data_root, download=not args.offline)
        test_x, test_y = data.load_dataset(args.dataset, "test", root=args.data_root, download=not args.offline)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        train_x, train_y, val_x, val_y = data.split_validation(file_x, file_y, args.val_images)
    except ValueError as exc:
        raise SystemExit(f"error: --val-images: {exc}") from None
    if args.train_limit:
        train_x, train_y = train_x[:args.train_limit], train_y[:args.train_limit]
    if args.test_limit:
        test_x, test_y = test_x[:args.test_limit], test_y[:args.test_limit]
    return train_x, train_y, val_x, val_y, test_x, test_y


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The data order of an epoch depends on (seed, epoch) only, so a resumed run sees the same images."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def features_of(model, images, device, chunk=1000):
    return torch.cat([model.features(images[i:i + chunk].to(device)) for i in range(0, len(images), chunk)])


@torch.no_grad()
def evaluate(model, images, labels, device, seq_len: int, modes) -> dict:
    """{mode: (loss, accuracy)} on the images in order. Non-plastic: mode "plain".

    reset: the test images cut into sequences of seq_len consecutive images, each from a zero trace
           (the last, shorter one too); carry: one stream (B = 1) through all images, never reset.
    """
    model.eval()
    h = features_of(model, images, device)
    labels = labels.to(device)
    results = {}
    for mode in (modes if model.plastic else ("plain",)):
        if mode == "plain":
            logp = model.head(h.unsqueeze(0))[0][0]
        elif mode == "carry":
            logp = model.head(h.unsqueeze(1))[0][:, 0]  # (T = N, B = 1)
        else:
            n = len(h) // seq_len * seq_len
            parts = []
            if n:  # (S, T, hidden) -> (T, S, hidden): S streams side by side
                y = model.head(h[:n].reshape(-1, seq_len, h.shape[1]).transpose(0, 1))[0]
                parts.append(y.transpose(0, 1).reshape(n, -1))
            if n < len(h):
                parts.append(model.head(h[n:].unsqueeze(1))[0][:, 0])
            logp = torch.cat(parts)
        loss = F.nll_loss(logp, labels).item()
        acc = (logp.argmax(-1) == labels).float().mean().item()
        results[mode] = (loss, acc)
    model.train()
    return results


# -------------------------------------------------------------------------------------------- training

def seq_len_of(args, protocol: str) -> int:
    """T of a protocol's sequences, in training and in the "reset" evaluation."""
    return args.seq_len if protocol == "batched" else args.paper_images


def learning_rate(args, step: int, total: int) -> float:
    if args.schedule == "cosine":  # from lr down to lr / 20, a function of the step so resume needs no state
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1))))
    return args.lr


class Run:
    """One (protocol, model) training run: its model, optimizer, history and clock, checkpointable."""

    def __init__(self, args, protocol, model_name, device, dist: Distributed | None = None):
        self.protocol, self.name, self.device = protocol, model_name, device
        self.dist = dist or Distributed()
        set_seed(args.seed)
        self.model = Classifier(model_name == "plastic", tuple(args.channels), args.hidden, eta=args.eta,
                                alpha=args.alpha, impl=args.impl).to(device)
        self.net = self.dist.wrap(self.model)  # trains through DDP under torchrun; states are the plain model's
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.step = 0  # paper protocols: epochs done; batched: optimizer steps done
        self.opt_steps = 0  # optimizer steps taken, whatever the protocol
        self.history = {"epoch": [], "train_loss": [], "val": {}}
        # model selection on validation: the mode it reads, and the best epoch so far with its weights
        self.select_mode = args.plastic_test[0] if self.model.plastic else "plain"
        self.best = {"epoch": None, "acc": None, "model": None}
        self.train_seconds = self.eval_seconds = 0.0
        self.cpu_seconds = 0.0  # process CPU time (all threads): less sensitive than wall-clock to a busy machine
        # time to accuracy (--curve-every): validation accuracy against the training clocks alone
        self.train_cpu_seconds = 0.0  # process CPU time of the training steps, evaluations excluded
        self.curve = {"opt_steps": [], "images": [], "train_cpu_s": [], "train_wall_s": [], "acc": [],
                      "eval_cpu_s": 0.0}
        self.images_seen = 0
        self.stop_reason = None  # "target" or "budget" once training stops early

    def state(self) -> dict:
        return {"protocol": self.protocol, "name": self.name, "model": self.model.state_dict(),
                "opt": self.opt.state_dict(), "step": self.step, "opt_steps": self.opt_steps,
                "history": self.history, "best": self.best, "train_seconds": self.train_seconds,
                "eval_seconds": self.eval_seconds, "cpu_seconds": self.cpu_seconds,
                "train_cpu_seconds": self.train_cpu_seconds, "curve": self.curve, "images_seen": self.images_seen,
                "stop_reason": self.stop_reason}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.history = state["step"], state["history"]
        self.opt_steps, self.best = state["opt_steps"], state["best"]
        self.train_seconds, self.eval_seconds = state["train_seconds"], state["eval_seconds"]
        self.cpu_seconds = state.get("cpu_seconds", 0.0)
        self.train_cpu_seconds = state.get("train_cpu_seconds", 0.0)
        self.curve = state.get("curve", self.curve)
        self.images_seen, self.stop_reason = state.get("images_seen", 0), state.get("stop_reason")

    def trained(self, wall: float, cpu: float, images: int, args, curve_data) -> None:
        """Book one training unit (an image or a step) on the training clocks; at every --curve-every
        optimizer steps, a point of the time-to-accuracy curve, whose evaluation stays off those clocks.
        Sets stop_reason when --stop-at-acc is reached or --time-budget is spent."""
        self.train_seconds += wall
        self.train_cpu_seconds += cpu
        self.images_seen += images
        if args.time_budget and self.train_cpu_seconds >= args.time_budget:
            self.stop_reason = "budget"
        if not args.curve_every or self.opt_steps % args.curve_every or not self.dist.is_main:
            return
        c0 = time.process_time()
        mode = self.select_mode
        results = evaluate(self.model, *curve_data, self.device, seq_len_of(args, self.protocol),
                           [mode] if mode != "plain" else ())
        acc = results[mode][1]
        for key, value in (("opt_steps", self.opt_steps), ("images", self.images_seen),
                           ("train_cpu_s", self.train_cpu_seconds), ("train_wall_s", self.train_seconds),
                           ("acc", acc)):
            self.curve[key].append(value)
        self.curve["eval_cpu_s"] += time.process_time() - c0
        if args.stop_at_acc is not None and acc >= args.stop_at_acc:
            self.stop_reason = "target"

    def _optimize(self, loss) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.opt_steps += 1
        self.model.project()

    def train_image(self, image, label, trace, lr):
        """The paper protocol's unit: one image (1, 28, 28) seen with the trace left by the images before it,
        one optimizer step on its loss. Returns (loss, the trace after this image, detached)."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        logp, trace = self.net(image[None, None].to(self.device), trace)
        loss = F.nll_loss(logp[0], label.reshape(1).to(self.device))
        self._optimize(loss)
        return loss.item(), (trace.detach() if trace is not None else None)

    def train_step(self, images, labels, lr) -> float:
        """images (T, B, 1, 28, 28), labels (T, B): one optimizer step on the mean loss of all T * B images.

        Under torchrun every process gets the whole (T, B) batch, trains on its share of the streams and
        returns the mean loss of the whole batch.
        """
        for group in self.opt.param_groups:
            group["lr"] = lr
        dist, B = self.dist, images.shape[1]
        if dist.enabled:
            mine = dist.shard(B)
            # DDP averages the processes' gradients: weighting each local mean by its share of the streams
            # makes that average the gradient of the global mean, also when B does not divide evenly (the
            # last step of an epoch). A process without a stream runs one with weight 0: DDP needs every
            # process in every step.
            weight = len(mine) * dist.world_size / B
            if not len(mine):
                mine = torch.zeros(1, dtype=torch.long)
            images, labels = images[:, mine], labels[:, mine]
        logp, _ = self.net(images.to(self.device))
        loss = F.nll_loss(logp.reshape(-1, NUM_CLASSES), labels.to(self.device).reshape(-1))
        self._optimize(loss * weight if dist.enabled else loss)
        if dist.enabled:  # the global mean: local means weighted by the local share of the streams
            return dist.sum([loss.detach() * weight])[0] / dist.world_size
        return loss.item()

    def record(self, epoch, train_loss, results) -> None:
        """One epoch's training loss and validation results; keeps the weights of the best validation epoch."""
        self.history["epoch"].append(epoch)
        self.history["train_loss"].append(train_loss)
        for mode, (loss, acc) in results.items():
            entry = self.history["val"].setdefault(mode, {"loss": [], "acc": []})
            entry["loss"].append(loss)
            entry["acc"].append(acc)
        acc = results[self.select_mode][1]
        if self.best["acc"] is None or acc > self.best["acc"]:  # ties keep the earlier epoch
            self.best = {"epoch": epoch, "acc": acc,
                         "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}


def _tick(ckpt, save, stop_after, counter, dist: Distributed | None = None) -> None:
    """After each unit of work: honour Ctrl-C (or the hidden --stop-after) by saving and stopping.

    Under torchrun a Ctrl-C seen by any process stops them all at the same step (one alone would hang).
    """
    counter[0] += 1
    requested = dist.any(ckpt.stop_requested) if dist is not None and dist.enabled else ckpt.stop_requested
    if requested or (stop_after and counter[0] >= stop_after):
        if dist is None or dist.is_main:  # only rank 0 writes
            save()
        raise StopRequested


def train_paper(run, args, data, ckpt, save, make_state, counter):
    """paper: P images one at a time, a step per image; paper-sequence: the P images as one sequence, one step."""
    train_x, train_y, eval_x, eval_y, curve_data = data
    P = args.paper_images
    bar = _bar(args, total=args.epochs, initial=run.step, desc=f"{run.protocol}/{run.name}", unit="epoch")
    while run.step < args.epochs and run.stop_reason is None:
        epoch = run.step
        c0 = time.process_time()
        idx = torch.randperm(len(train_x), generator=epoch_generator(args.seed, epoch))[:P]
        lr = learning_rate(args, epoch, args.epochs)
        if run.protocol == "paper":
            # the trace starts from zero each epoch and is carried from image to image
            trace, losses = None, []
            for i in idx:
                t0, u0 = time.perf_counter(), time.process_time()
                loss_i, trace = run.train_image(train_x[i], train_y[i], trace, lr)
                run.trained(time.perf_counter() - t0, time.process_time() - u0, 1, args, curve_data)
                losses.append(loss_i)
                if run.stop_reason is not None:  # an early stop ends the epoch here
                    break
            loss = sum(losses) / len(losses)
        else:
            # one stream of P images fed in order: T = P, B = 1; the trace is carried through all of them
            t0, u0 = time.perf_counter(), time.process_time()
            loss = run.train_step(train_x[idx].unsqueeze(1), train_y[idx].unsqueeze(1), lr)
            run.trained(time.perf_counter() - t0, time.process_time() - u0, P, args, curve_data)
        t1 = time.perf_counter()
        results = evaluate(run.model, eval_x, eval_y, run.device, P, args.plastic_test)
        run.eval_seconds += time.perf_counter() - t1
        run.step += 1
        run.record(run.step, loss, results)
        run.cpu_seconds += time.process_time() - c0
        bar.update(1)
        bar.set_postfix(_postfix(loss, results))
        ckpt.maybe_save(run.step, make_state)
        _tick(ckpt, save, args.stop_after, counter)
    bar.close()


def train_batched(run, args, data, ckpt, save, make_state, counter):
    train_x, train_y, eval_x, eval_y, curve_data = data
    B, T = args.streams, args.seq_len
    per_step = B * T
    steps_per_epoch = -(-len(train_x) // per_step)
    total = steps_per_epoch * args.epochs
    bar = _bar(args, total=total, initial=run.step, desc=f"batched/{run.name}", unit="step")
    # per step: (mean loss, images); kept in the history so a resumed epoch still averages all its steps
    steps = run.history.setdefault("step_loss", [])
    while run.step < total and run.stop_reason is None:
        epoch, k = divmod(run.step, steps_per_epoch)
        perm = torch.randperm(len(train_x), generator=epoch_generator(args.seed, epoch))
        chunk = perm[k * per_step:(k + 1) * per_step]
        chunk = chunk[:len(chunk) // T * T]  # the last step of an epoch may hold fewer streams
        t0, c0 = time.perf_counter(), time.process_time()
        loss = float("nan")
        if len(chunk):
            b = len(chunk) // T
            # stream s holds images chunk[s*T:(s+1)*T]; (B, T) -> time-major (T, B)
            images = train_x[chunk].reshape(b, T, *train_x.shape[1:]).transpose(0, 1)
            labels = train_y[chunk].reshape(b, T).t()
            loss = run.train_step(images, labels, learning_rate(args, run.step, total))
        steps.append((loss, len(chunk)))
        run.step += 1
        run.trained(time.perf_counter() - t0, time.process_time() - c0, len(chunk), args, curve_data)
        bar.update(1)
        # rank 0 alone tests and records, after every epoch and after an early stop within one
        if (run.step % steps_per_epoch == 0 or run.stop_reason is not None) and run.dist.is_main:
            t1 = time.perf_counter()
            results = evaluate(run.model, eval_x, eval_y, run.device, T, args.plastic_test)
            run.eval_seconds += time.perf_counter() - t1
            this = [(l, c) for l, c in steps[epoch * steps_per_epoch:run.step] if c]
            train_loss = sum(l * c for l, c in this) / max(sum(c for _, c in this), 1)
            # a partial epoch (early stop) is recorded as a fraction
            run.record(run.step // steps_per_epoch if run.step % steps_per_epoch == 0
                       else round(run.step / steps_per_epoch, 3), train_loss, results)
            bar.set_postfix(_postfix(train_loss, results))
        elif len(chunk):
            bar.set_postfix(loss=f"{loss:.3f}")
        run.cpu_seconds += time.process_time() - c0
        if run.dist.is_main:
            ckpt.maybe_save(run.step, make_state)
        _tick(ckpt, save, args.stop_after, counter, run.dist)
    bar.close()


def _bar(args, **kw):
    from experiments.common.progress import progress_bar
    return progress_bar(disable=args.no_progress, leave=False, **kw)


def _postfix(loss, results):
    out = {"loss": f"{loss:.3f}"}
    out.update({f"acc_{m}": f"{acc:.4f}" for m, (_, acc) in results.items()})
    return out


# ---------------------------------------------------------------------------------------------- report

def summarize(run, args, final: dict, selected: dict, wall: float) -> dict:
    """Per test mode: the selected epoch (best validation accuracy of the selection mode) with its validation
    and test figures, and the final model's test figures. final / selected: {mode: (test loss, accuracy)}."""
    tests = {}
    epochs = run.history["epoch"]
    at = epochs.index(run.best["epoch"]) if run.best["epoch"] is not None else None
    for mode, (loss, acc) in final.items():
        curve = run.history["val"].get(mode, {"acc": [], "loss": []})
        tests[mode] = {"selected_epoch": run.best["epoch"],
                       "selected_val_acc": curve["acc"][at] if at is not None else None,
                       "selected_test_acc": selected[mode][1], "selected_test_loss": selected[mode][0],
                       "final_val_acc": curve["acc"][-1] if curve["acc"] else None,
                       "final_acc": acc, "final_loss": loss}
    out = {"protocol": run.protocol, "model": run.name, "tests": tests, "selection_mode": run.select_mode,
           "optimizer_steps": run.opt_steps,
           # 4 decimals: a short run must not round to 0 s
           "train_seconds": round(run.train_seconds, 4), "eval_seconds": round(run.eval_seconds, 4),
           "wall_seconds": round(wall, 4), "cpu_seconds": round(run.cpu_seconds, 4), "history": run.history,
           "train_cpu_seconds": round(run.train_cpu_seconds, 4), "images_seen": run.images_seen,
           "stop_reason": run.stop_reason, "curve": run.curve,
           "parameters": sum(p.numel() for p in run.model.parameters())}
    if run.model.plastic:
        out["eta"] = float(run.model.out.eta.detach())
        out["mean_abs_alpha"] = float(run.model.out.alpha.detach().abs().mean())
    return out


def write_table(results: dict, path: Path, what: dict) -> str:
    lines = ["| protocol | model | test | selected epoch | validation acc (selected) | test acc (selected) "
             "| test acc (final) | test loss (final) | optimizer steps | train s | wall-clock s | CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        for mode, t in r["tests"].items():
            val = "-" if t["selected_val_acc"] is None else f"{100 * t['selected_val_acc']:.2f}%"
            lines.append(f"| {r['protocol']} | {r['model']} | {mode} | {t['selected_epoch']} | {val} | "
                         f"{100 * t['selected_test_acc']:.2f}% | {100 * t['final_acc']:.2f}% | "
                         f"{t['final_loss']:.4f} | {r['optimizer_steps']} | {r['train_seconds']:.0f} | "
                         f"{r['wall_seconds']:.0f} | "
                         f"{'-' if r.get('cpu_seconds') is None else format(r['cpu_seconds'], '.0f')} |")
    notes = [f"- {p}: {what[p]}" for p in what]
    notes += ["- selected epoch: the best validation accuracy (plastic model: of its first test mode); test acc "
              "(selected) / (final): the whole test set, evaluated once at that epoch / after the last one; "
              "train s / wall-clock s: training / training + evaluation time; CPU s: process CPU time, all threads"]
    text = "\n".join(lines + [""] + notes) + "\n"
    path.write_text(text)
    return text


def plot_curves(results: dict, protocol: str, path: Path, dataset: str = "MNIST") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for r in results.values():
        if r["protocol"] != protocol:
            continue
        h = r["history"]
        label = "non-plastic" if r["model"] == "nonplastic" else "plastic"
        marker = "o" if len(h["epoch"]) <= 20 else None  # a few epochs: show where the evaluations are
        axes[0].plot(h["epoch"], h["train_loss"], label=label, marker=marker)
        for mode, curve in h["val"].items():
            lab = label if mode == "plain" else f"{label} ({mode})"
            axes[1].plot(h["epoch"], curve["loss"], label=lab, marker=marker)
            axes[2].plot(h["epoch"], [100 * a for a in curve["acc"]], label=lab, marker=marker)
    for ax, title in zip(axes, ("train loss", "validation loss", "validation accuracy (%)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.suptitle(f"{dataset}, {protocol} protocol")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def describe(args, protocol, n_train, n_val, n_test) -> str:
    evals = (f"the first {min(args.eval_subset, n_val)} validation images" if args.eval_subset
             else f"all {n_val} validation images")
    tail = (f"per-epoch evaluation on {evals} (model selection); the test set ({n_test} images) evaluated at "
            f"the selected epoch and after the last one")
    if protocol == "paper":
        return (f"{args.epochs} epochs of {args.paper_images} random training images fed one at a time, trace "
                f"carried from image to image, one Adam step per image ({args.epochs * args.paper_images} steps); "
                + tail)
    if protocol == "paper-sequence":
        return (f"{args.epochs} epochs of {args.paper_images} random training images fed one at a time "
                f"(T={args.paper_images}, B=1, trace carried), one Adam step per epoch on their mean loss; " + tail)
    steps = -(-n_train // (args.streams * args.seq_len))
    return (f"{args.epochs} epochs over {n_train} training images, B={args.streams} streams x T={args.seq_len} "
            f"images ({steps} Adam steps per epoch, trace reset every T images); " + tail)


# -------------------------------------------------------------------------------------------------- cli

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.classification",
        description="MNIST classification with a plastic vs a non-plastic softmax output layer "
                    "(Upadhyay & Bagad, after Miconi et al. 2018): the paper's protocol and a batched one, "
                    "with model selection on a validation split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, default_out="results/classification")
    p.add_argument("--protocol", default="batched",
                   help="comma-separated, from %s, or 'all'. paper: P images one at a time per epoch, a step per "
                        "image; paper-sequence: the same P images, one step per epoch; batched: B streams x T "
                        "images over all the data" % (PROTOCOLS,))
    p.add_argument("--models", choices=MODELS + ("both",), default="both", help="which output layer(s) to train")
    p.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist")
    p.add_argument("--data-root", default=None, help="data root (default: $PLASTIC_OPS_DATA, else ./data)")
    p.add_argument("--offline", action="store_true", help="never try to download missing data")
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--test-limit", type=int, default=0, help="use only the first N test images (0: all)")
    p.add_argument("--val-images", type=int, default=None,
                   help="validation split: the last N images of the training file (default 5000; "
                        "synthetic data: %d)" % SYNTHETIC_VAL_IMAGES)
    # with several protocols, a value given for one of the next four flags applies to all of them
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs (default: paper and paper-sequence %d, batched %d)" % (
                       PROTOCOL_DEFAULTS["paper"]["epochs"], PROTOCOL_DEFAULTS["batched"]["epochs"]))
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: paper 1e-3, batched 2e-3)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default=None,
                   help="learning-rate schedule (default: paper constant, batched cosine down to lr/20)")
    p.add_argument("--eval-subset", type=int, default=None,
                   help="evaluate after each epoch on the first N validation images, 0 = all (default 0); the "
                        "test figures always use the whole test set")
    p.add_argument("--paper-images", type=int, default=100, help="paper protocols: images per epoch (B = 1)")
    p.add_argument("--streams", type=int, default=8, help="batched protocol: B parallel streams")
    p.add_argument("--seq-len", type=int, default=10, help="batched protocol: T images per sequence")
    p.add_argument("--channels", type=int, nargs=2, default=(32, 64), metavar=("C1", "C2"),
                   help="channels of the two convolutions")
    p.add_argument("--hidden", type=int, default=128, help="units of the hidden linear layer")
    p.add_argument("--eta", type=float, default=0.03, help="initial (learned) plasticity rate of the trace")
    p.add_argument("--alpha", choices=("synapse", "input", "output", "scalar"), default="synapse",
                   help="granularity of the learned plasticity coefficients")
    p.add_argument("--plastic-test", choices=TEST_MODES + ("both",), default="both",
                   help="how the plastic model is tested: reset the trace every T test images, carry it "
                        "through the whole test set in order, or both")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="save a checkpoint every N epochs (paper protocols) / steps (batched) (default: 10 / 50)")
    p.add_argument("--curve-every", type=int, default=0,
                   help="time to accuracy: every N optimizer steps, the validation accuracy on --curve-images "
                        "images against the training clocks (evaluation time excluded, reported apart); 0: off")
    p.add_argument("--curve-images", type=int, default=2000,
                   help="the first N validation images, for --curve-every")
    p.add_argument("--stop-at-acc", type=float, default=None,
                   help="stop training a model once a --curve-every point reaches this validation accuracy")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="stop training a model after this many CPU seconds of training steps (0: no limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)  # tiny fake data, for tests
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)  # simulate Ctrl-C, for tests
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [p.strip() for p in args.protocol.split(",") if p.strip()]
    args.protocols = list(PROTOCOLS) if names == ["all"] else names
    bad = [p for p in args.protocols if p not in PROTOCOLS]
    if bad or not args.protocols or len(set(args.protocols)) != len(args.protocols):
        parser.error(f"--protocol: expected distinct names from {PROTOCOLS} or 'all', got {args.protocol!r}")
    if args.val_images is None:
        args.val_images = SYNTHETIC_VAL_IMAGES if args.synthetic else VALIDATION_IMAGES
    if args.val_images < 1:
        parser.error("--val-images must be >= 1")
    args.models = list(MODELS) if args.models == "both" else [args.models]
    args.plastic_test = list(TEST_MODES) if args.plastic_test == "both" else [args.plastic_test]
    for name in ("paper_images", "streams", "seq_len", "hidden"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.curve_every < 0:
        parser.error("--curve-every must be >= 0")
    if args.curve_images < 1:
        parser.error("--curve-images must be >= 1")
    if args.stop_at_acc is not None and not (0.0 < args.stop_at_acc <= 1.0):
        parser.error("--stop-at-acc must be an accuracy in (0, 1]")
    if args.stop_at_acc is not None and not args.curve_every:
        parser.error("--stop-at-acc needs --curve-every (the accuracy is read at the curve's points)")
    if not math.isfinite(args.time_budget) or args.time_budget < 0:
        parser.error("--time-budget must be a finite number of seconds >= 0")
    if "plastic" in args.models and args.impl == "fused" and not plastic_ops.extension_available():
        parser.error("--impl fused needs the compiled extension (plastic_ops._C), which is not built; "
                     "build it or pass --impl reference")
    return args


def protocol_args(args, protocol):
    """A copy of args with the protocol's defaults filled in."""
    a = argparse.Namespace(**vars(args))
    for k, v in PROTOCOL_DEFAULTS[protocol].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.checkpoint_every is None:
        a.checkpoint_every = 50 if protocol == "batched" else 10
    return a


@restores_torch_threads
def main(argv=None) -> dict:
    """Train, test, write the results; returns the metrics. Under torchrun (WORLD_SIZE > 1) the batched
    protocol's streams are shared by the processes; rank 0 alone tests and writes, the others return
    {"rank": rank}."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist, device = Distributed.from_env(args.device)
    with dist.scope():
        if dist.enabled:
            if args.protocols != ["batched"]:
                raise SystemExit("error: the paper protocols train a single stream (B = 1), which cannot be "
                                 "shared by several processes: run them without torchrun, or use --protocol batched")
            dist.check_divisible(args.streams, "--streams")
            if args.curve_every or args.time_budget:
                raise SystemExit("error: --curve-every, --stop-at-acc and --time-budget measure one process's "
                                 "clock: run them without torchrun")
            args.no_progress = args.no_progress or not dist.is_main  # one progress bar, rank 0's
        return run_all(args, argv, dist, device)


def run_all(args, argv, dist: Distributed, device) -> dict:
    out = ResultsDir(args.out)
    config = {k: getattr(args, k) for k in RESULT_KEYS}
    config["channels"] = list(config["channels"])

    ckpt = CheckpointManager(out.file("checkpoint.pt"), every=1)
    state = dist.broadcast(ckpt.load() if args.resume and dist.is_main else None)  # read once, by rank 0
    if args.resume and state is None and dist.is_main:
        print(f"--resume: no checkpoint in {out.path}, starting from scratch", file=sys.stderr)
    if state is not None:
        diff = {k: (state["config"].get(k), v) for k, v in config.items() if state["config"].get(k) != v}
        if diff:
            raise SystemExit("error: the checkpoint in {} was made with other options: {}".format(
                out.path, ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items())))
    done = dict(state["done"]) if state else {}

    train_x, train_y, val_x, val_y, test_x, test_y = load_data(args)
    if "batched" in args.protocols and len(train_x) < args.seq_len:
        raise SystemExit(f"error: --seq-len {args.seq_len} is longer than the {len(train_x)} training images")
    if set(args.protocols) - {"batched"} and len(train_x) < args.paper_images:
        raise SystemExit(f"error: --paper-images {args.paper_images} exceeds the {len(train_x)} training images")
    what = {}
    counter = [0]
    stopped = False
    with ckpt.catch_interrupt():
        try:
            for protocol in args.protocols:
                pa = protocol_args(args, protocol)
                what[protocol] = describe(pa, protocol, len(train_x), len(val_x), len(test_x))
                # the per-epoch evaluation, model selection's, sees validation images only
                eval_x, eval_y = ((val_x[:pa.eval_subset], val_y[:pa.eval_subset]) if pa.eval_subset
                                  else (val_x, val_y))
                # the time-to-accuracy curve's images: the first --curve-images validation images
                curve_data = (val_x[:args.curve_images], val_y[:args.curve_images])
                data = (train_x, train_y, eval_x, eval_y, curve_data)
                for name in args.models:
                    key = f"{protocol}/{name}"
                    if key in done:
                        continue
                    run = Run(pa, protocol, name, device, dist)
                    current = state.get("current") if state else None
                    if current and current["protocol"] == protocol and current["name"] == name:
                        run.load(current)
                        state["current"] = None
                        if dist.is_main:
                            print(f"resuming {key} at {'step' if protocol == 'batched' else 'epoch'} {run.step}",
                                  file=sys.stderr)

                    def save(run=run):
                        ckpt.save(make_state(run))

                    def make_state(run=run):
                        return {"config": config, "done": done, "current": run.state()}

                    ckpt.every = pa.checkpoint_every
                    train = train_batched if protocol == "batched" else train_paper
                    train(run, pa, data, ckpt, save, make_state, counter)
                    if not dist.is_main:  # rank 0 alone tests and writes
                        continue
                    t0, c0 = time.perf_counter(), time.process_time()
                    T = seq_len_of(pa, protocol)
                    # the test set, once at the last epoch and once at the epoch selected on validation
                    final = evaluate(run.model, test_x, test_y, device, T, args.plastic_test)
                    torch.save(run.model.state_dict(), out.file(f"model_{protocol}_{name}.pt"))
                    run.model.load_state_dict(run.best["model"])
                    selected = evaluate(run.model, test_x, test_y, device, T, args.plastic_test)
                    torch.save(run.model.state_dict(), out.file(f"model_{protocol}_{name}_selected.pt"))
                    run.eval_seconds += time.perf_counter() - t0
                    run.cpu_seconds += time.process_time() - c0
                    done[key] = summarize(run, pa, final, selected, run.train_seconds + run.eval_seconds)
                    ckpt.save({"config": config, "done": done, "current": None})
                    for mode, t in done[key]["tests"].items():
                        _print_result(key, mode, t)
        except StopRequested:
            stopped = True

    if stopped:
        if dist.is_main:
            print(f"stopped; continue with the same command plus --resume (checkpoint: {ckpt.path})",
                  file=sys.stderr)
        return {"stopped": True, "checkpoint": str(ckpt.path)}
    if not dist.is_main:
        return {"rank": dist.rank}

    results = {k: done[k] for k in done}
    table = write_table(results, out.file("table.md"), what)
    for protocol in sorted({r["protocol"] for r in results.values()}):
        plot_curves(results, protocol, out.file(f"curves_{protocol}.png"),
                    "synthetic data" if args.synthetic else {"mnist": "MNIST"}.get(args.dataset, "Fashion-MNIST"))
    metrics = {"experiment": "classification", "command": " ".join(["python -m experiments.classification"]
                                                                     + (argv if argv is not None else sys.argv[1:])),
               "config": config, "impl": args.impl, "device": str(device),
               # streams per optimizer step in each process (of T images each; the paper protocol has one)
               "world_size": dist.world_size,
               "per_process_batch": {p: args.streams // dist.world_size if p == "batched" else 1
                                     for p in args.protocols},
               "seed": args.seed,
               "data": {"dataset": "synthetic" if args.synthetic else args.dataset,
                        "train_images": len(train_x), "val_images": len(val_x), "test_images": len(test_x),
                        "validation": f"the last {len(val_x)} images of the training file, never trained on"},
               "protocols": what,
               "test_modes": {"plain": "non-plastic model (no trace)",
                              "reset": "trace reset every T images (T as in training), images in order",
                              "carry": "one stream through all the images in order, trace never reset"},
               "selected": "the epoch of the best validation accuracy; its test figures: the whole test set",
               "final": "the model after the last epoch on the whole test set",
               "runs": results}
    out.write_json("metrics.json", metrics)
    print(table)
    return metrics


def _print_result(key, mode, t):
    print(f"{key} [{mode}]: test accuracy {100 * t['selected_test_acc']:.2f}% at the epoch selected on "
          f"validation ({t['selected_epoch']}), {100 * t['final_acc']:.2f}% after the last", file=sys.stderr)


def seed_rows(metrics: dict) -> list[dict]:
    """The figures a several-seed table compares (experiments/common/seeds.py): per protocol, test accuracy at
    the selected epoch and at the last one, for every model and plastic test mode, plastic minus non-plastic."""
    rows = []
    protocols = sorted({r["protocol"] for r in metrics["runs"].values()}, key=PROTOCOLS.index)
    for protocol in protocols:
        runs = {k.split("/")[1]: r for k, r in metrics["runs"].items() if r["protocol"] == protocol}
        for field, what in (("selected_test_acc", "epoch selected on validation"), ("final_acc", "last epoch")):
            values = {}
            for name, r in runs.items():
                for mode, t in r["tests"].items():
                    values[name if mode == "plain" else f"{name} ({mode})"] = t[field]
            pairs = [(m, "nonplastic") for m in values if m.startswith("plastic")] if "nonplastic" in values else []
            rows.append({"quantity": f"{protocol}: test accuracy, {what} (higher is better)",
                         "values": values, "pairs": pairs})
    return rows


if __name__ == "__main__":
    main()
