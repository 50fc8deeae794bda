"""Experiment 2: a convolutional denoising autoencoder with a plastic memory of clean pixels ("Plasticity in Deep
Neural Networks", Upadhyay & Bagad, after Miconi, Clune & Stanley 2018), on MNIST and Fashion-MNIST.

Both variants share one convolutional autoencoder (encoder -> tanh code -> decoder, per-pixel logits). The
plastic variant adds a memory path in the style of Miconi's image completion: a PlasticLinear(784, 784)
fed with each frame's own pixels (centred on the frame's mean, so a blank frame stores nothing), with fixed
identity weights and learned alpha (one per output pixel by default) and eta. While an image is shown its
output is that image, so the trace stores clean pixels (H += eta c c^T); at the corrupted query it reads
back x (alpha * H), a blend of the stored images weighted by their overlap with the query, which is added to
the decoder's logits:

    baseline  out = sigmoid(decoder(tanh(encoder(x))))
    plastic   out = sigmoid(decoder(tanh(encoder(x))) + c (alpha * H)),   c = x - mean(x)

With alpha = 0 (its start) the plastic variant computes exactly the baseline: what differs is learned memory.

Episode (B streams, T = k * (t_ns + t_zs) + 1 steps): each of k images is shown clean t_ns times, then a
blank frame t_zs times; the last step shows one image corrupted by Gaussian noise N(0, sigma^2) (not
clipped) or by occlusion of half of it (top, bottom, left or right set to 0). Loss: MSE at the last step
(against the clean image) + --recon-weight * MSE of the earlier steps (against what they showed).

Test protocols, on test images never used in training, the same episodes for both variants:
    recall    the corrupted image is one of the k shown clean earlier in the episode (memory can help);
    denoise   it was not shown in the episode (plain denoising).
The ceiling of a model is its output when the query is the clean image itself (same episode).

Model selection (the epoch whose weights are tested) uses a validation split, the last --val-images (5,000)
images of the training file; the test set is evaluated once at the selected epoch and once after the last.
On the CPU a run is deterministic for a given seed (seeded generators, deterministic algorithms).

    python experiments/denoising_autoencoder.py --data-root DIR       # default run, minutes on a CPU
    python experiments/denoising_autoencoder.py --full                # the long run
    python experiments/denoising_autoencoder.py --resume              # continue an interrupted run
    torchrun --standalone --nproc-per-node 2 experiments/denoising_autoencoder.py   # 2 processes
    python -m experiments.seeds denoising --seeds 0,1,2 --out DIR -- --data-root DIR   # 3 seeds, one table
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plastic_ops  # noqa: E402
from experiments.common.data import (DATASETS, VALIDATION_IMAGES, load_dataset, resolve_data_root,  # noqa: E402
                                     split_validation, synthetic_dataset)
from plastic_ops.nn import PlasticLinear  # noqa: E402
from experiments.common import (CheckpointManager, ResultsDir, StopRequested, add_common_args,  # noqa: E402
                                restores_torch_threads, set_seed)
from experiments.common.progress import progress_bar  # noqa: E402
from experiments.common.distributed import Distributed, sync_batchnorm  # noqa: E402

MODELS = ("plastic", "baseline")
PROTOCOLS = ("recall", "denoise")
PIXELS = 28 * 28

# Default run: both data sets and both variants in minutes on a 2-core CPU.
DEFAULTS = dict(epochs=3, steps_per_epoch=30, batch_size=8, k=2, t_ns=2, t_zs=1, test_episodes=128,
                val_episodes=32, pretrain_steps=250, pretrain_batch=64)
# --full: the paper's episode shape (3 images, 20 presentations, 3 blank steps) and a long training.
FULL = dict(epochs=30, steps_per_epoch=200, batch_size=32, k=3, t_ns=20, t_zs=3, test_episodes=2000,
            val_episodes=256, pretrain_steps=5000, pretrain_batch=128)


# ------------------------------------------------------------------------------------------ corruptions

def corruptions(sigmas, occlude: str) -> list[tuple[str, float]]:
    """The corruption list: ("noise", sigma) per level, then ("occlude", 0.5) unless occlude == "none"."""
    out = [("noise", float(s)) for s in sigmas]
    if occlude == "half":
        out.append(("occlude", 0.5))
    return out


def corruption_key(c) -> str:
    return f"noise-{c[1]:g}" if c[0] == "noise" else "occlude-half"


def corrupt(images: torch.Tensor, which: torch.Tensor, table, gen: torch.Generator) -> torch.Tensor:
    """images (B, 1, 28, 28), which (B,) indices into table -> corrupted copies. The same generator draws
    happen whatever the corruptions, so an episode's other random choices do not depend on them."""
    B = images.shape[0]
    noise = torch.randn(images.shape, generator=gen)
    side = torch.randint(4, (B,), generator=gen)  # occluded half: top, bottom, left, right
    sigma = torch.tensor([c[1] if c[0] == "noise" else 0.0 for c in table])[which]
    out = images + sigma[:, None, None, None] * noise
    occluded = torch.tensor([c[0] == "occlude" for c in table])[which]
    rows = torch.arange(28)
    top, left = rows[:, None] < 14, rows[None, :] < 14
    masks = torch.stack([top.expand(28, 28), ~top.expand(28, 28), left.expand(28, 28), ~left.expand(28, 28)])
    mask = masks[side][:, None] & occluded[:, None, None, None]
    return out.masked_fill(mask, 0.0)


# ----------------------------------------------------------------------------------------------- model

class DenoisingAE(nn.Module):
    """Conv autoencoder; the plastic variant adds a Hebbian memory of the frames' clean pixels to its logits."""

    def __init__(self, plastic: bool, code: int = 64, width: int = 16, impl: str = "fused",
                 alpha_init: float = 0.0, eta_init: float = 0.1, alpha_shape: str = "output"):
        super().__init__()
        self.plastic, self.code = plastic, code
        w2 = 2 * width
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, w2, 3, stride=2, padding=1), nn.BatchNorm2d(w2), nn.ReLU(),
            nn.Flatten(), nn.Linear(w2 * 7 * 7, code))
        self.decoder = nn.Sequential(
            nn.Linear(code, w2 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (w2, 7, 7)),
            nn.ConvTranspose2d(w2, width, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, 1, 3, stride=2, padding=1, output_padding=1))
        if plastic:
            # identity weights, fixed: the layer's output while an image is shown is that image, so its trace
            # stores clean pixels; alpha (from alpha_init, 0: exactly the baseline) and eta are learned
            self.memory = PlasticLinear(PIXELS, PIXELS, activation="identity", alpha=alpha_shape, bias=False,
                                        eta=eta_init, impl=impl)
            with torch.no_grad():
                self.memory.weight.copy_(torch.eye(PIXELS))
                self.memory.alpha.fill_(alpha_init)
            self.memory.weight.requires_grad_(False)

    def param_groups(self, lr: float, plastic_lr_scale: float):
        """The memory's few plasticity coefficients (alpha, eta) get a larger step: a short run must grow
        alpha from 0."""
        if not self.plastic:
            return [{"params": list(self.parameters()), "lr": lr}]
        large = [self.memory.alpha] + ([self.memory.eta] if isinstance(self.memory.eta, nn.Parameter) else [])
        ids = {id(p) for p in large}
        rest = [p for p in self.parameters() if id(p) not in ids and p.requires_grad]
        return [{"params": rest, "lr": lr}, {"params": large, "lr": lr * plastic_lr_scale}]

    def set_impl(self, impl: str) -> None:
        if self.plastic:
            self.memory.impl = impl

    def clamp_eta(self) -> None:
        """Keep the plasticity rate in (0, 1]: outside it the Hebbian trace stops being a decaying average."""
        if self.plastic:
            with torch.no_grad():
                self.memory.eta.clamp_(1e-4, 1.0)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 1, 28, 28) -> the autoencoder's pixel logits (N, 784)."""
        return self.decoder(torch.tanh(self.encoder(images))).reshape(-1, PIXELS)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (T, B, 1, 28, 28) -> output pixels in [0, 1] (T, B, 784); each call is a fresh episode."""
        T, B = frames.shape[:2]
        logits = self.logits(frames.reshape(T * B, 1, 28, 28)).reshape(T, B, PIXELS)
        if self.plastic:
            c = frames.reshape(T, B, PIXELS)
            c = c - c.mean(dim=-1, keepdim=True)
            y, _ = self.memory(c)
            logits = logits + (y - c)  # the recalled part, c (alpha * H): the identity weights give c back
        return torch.sigmoid(logits)


# -------------------------------------------------------------------------------------------- episodes

def make_episodes(images: torch.Tensor, batch: int, k: int, t_ns: int, t_zs: int, which, recall,
                  gen: torch.Generator, table):
    """Sample B episodes from images (N, 1, 28, 28).

    which: int or (B,) tensor, the query's corruption (index into table); recall: bool or (B,) bool tensor
    (True: the query is one of the images shown). Returns frames (T, B, 1, 28, 28), targets (T, B, 784),
    and the last step's clean and corrupted images (B, 1, 28, 28).
    """
    n = images.shape[0]
    if n < k + 1:
        raise ValueError(f"need at least k + 1 = {k + 1} images, got {n}")
    idx = torch.randint(n, (batch, k + 1), generator=gen)
    # distinct images within an episode, so a "denoise" query is really unseen (collisions are rare)
    while True:
        s = idx.sort(dim=1).values
        dup = (s[:, 1:] == s[:, :-1]).any(dim=1)
        if not dup.any():
            break
        idx[dup] = torch.randint(n, (int(dup.sum()), k + 1), generator=gen)
    shown = images[idx[:, :k]]                                           # (B, k, 1, 28, 28)
    pick = torch.randint(k, (batch,), generator=gen)
    recall = torch.as_tensor(recall, dtype=torch.bool).expand(batch)
    query = torch.where(recall[:, None, None, None], shown[torch.arange(batch), pick], images[idx[:, k]])
    which = torch.as_tensor(which, dtype=torch.long).expand(batch)
    corrupted = corrupt(query, which, table, gen)
    blanks = torch.zeros(batch, t_zs, 1, 28, 28)
    blocks = []
    for j in range(k):
        blocks += [shown[:, j:j + 1].expand(batch, t_ns, 1, 28, 28), blanks]
    seq = torch.cat(blocks, dim=1)                                       # (B, k (t_ns + t_zs), 1, 28, 28)
    frames = torch.cat([seq, corrupted[:, None]], dim=1).transpose(0, 1).contiguous()
    targets = torch.cat([seq, query[:, None]], dim=1).transpose(0, 1).reshape(-1, batch, PIXELS).contiguous()
    return frames, targets, query, corrupted


def episode_loss(y, targets, recon_weight: float):
    final = (y[-1] - targets[-1]).pow(2).mean()
    recon = (y[:-1] - targets[:-1]).pow(2).mean() if y.shape[0] > 1 else y.new_zeros(())
    return final + recon_weight * recon, final


# ------------------------------------------------------------------------------------------ evaluation

def _cell_seed(seed: int, ci: int, protocol: str, salt: int) -> int:
    return seed * 7919 + salt * 104729 + ci * 2 + (protocol == "recall")


@torch.no_grad()
def evaluate(model, images, cfg, table, ci: int, protocol: str, n_episodes: int, seed: int, device) -> dict:
    """Mean MSE and PSNR (dB, per image, then averaged) of the last step's output for corruption table[ci],
    of the corrupted input itself, and of the model's output when the query is the clean image (the ceiling).
    The episodes depend only on (seed, corruption, protocol), so every model sees the same ones."""
    model.eval()
    gen = torch.Generator().manual_seed(_cell_seed(seed, ci, protocol, 1))
    sums = {"model": [0.0, 0.0], "input": [0.0, 0.0], "ceiling": [0.0, 0.0]}
    done = 0
    while done < n_episodes:
        b = min(cfg["batch_size"], n_episodes - done)
        frames, _, query, corrupted = make_episodes(images, b, cfg["k"], cfg["t_ns"], cfg["t_zs"], ci,
                                                    protocol == "recall", gen, table)
        out = model(frames.to(device))[-1].cpu()
        frames[-1] = query
        clean_out = model(frames.to(device))[-1].cpu()
        target = query.reshape(b, PIXELS)
        for name, pred in (("model", out), ("input", corrupted.reshape(b, PIXELS)), ("ceiling", clean_out)):
            per_image = (pred - target).pow(2).mean(dim=1)
            sums[name][0] += per_image.sum().item()
            sums[name][1] += (10 * torch.log10(1.0 / per_image.clamp_min(1e-10))).sum().item()
        done += b
    model.train()
    return {name: {"mse": m / done, "psnr": p / done} for name, (m, p) in sums.items()}


def evaluate_all(model, images, cfg, table, n_episodes: int, seed: int, device) -> dict:
    """{protocol: {corruption key: evaluate(...)}} over every protocol and corruption."""
    return {p: {corruption_key(c): evaluate(model, images, cfg, table, ci, p, n_episodes, seed, device)
                for ci, c in enumerate(table)} for p in PROTOCOLS}


@torch.no_grad()
def sample_outputs(model, images, cfg, table, ci: int, protocol: str, n: int, seed: int, device):
    """(clean, corrupted, output) of n fixed test episodes, for the image grid."""
    model.eval()
    gen = torch.Generator().manual_seed(_cell_seed(seed, ci, protocol, 2))
    frames, _, query, corrupted = make_episodes(images, n, cfg["k"], cfg["t_ns"], cfg["t_zs"], ci,
                                                protocol == "recall", gen, table)
    out = model(frames.to(device))[-1].cpu().reshape(n, 28, 28)
    model.train()
    return query[:, 0], corrupted[:, 0], out


# ------------------------------------------------------------------------------------------- training

def model_config(args) -> dict:
    return dict(code=args.code, width=args.width, alpha_init=args.alpha_init, eta_init=args.eta_init,
                alpha_shape=args.alpha_shape)


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """Deterministic algorithms while a run lasts (restored after, so a caller's setting is left alone).
    Only on the CPU: on CUDA it would need cuBLAS settings made before start-up, and refuse some kernels."""
    before = torch.are_deterministic_algorithms_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


class _PretrainAE(nn.Module):
    """The encoder and decoder alone (what pretraining trains), as one module DDP can wrap."""

    def __init__(self, model: DenoisingAE):
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder

    def forward(self, x):
        return torch.sigmoid(self.decoder(torch.tanh(self.encoder(x))).reshape(-1, PIXELS))


def pretrain(dataset: str, train_x, args, cfg: dict, table, device, run_dir: Path,
             dist: Distributed | None = None) -> dict:
    """Pretrain the shared conv autoencoder on single corrupted (or clean) images; returns its state.

    Episodes cost T frames and a B x 784 x 784 trace per stream; single images cost one cheap conv pass.
    Both variants start from this same pretrained autoencoder, then train on episodes. The state is saved,
    so --resume (or a second variant) does not repeat it. Under torchrun each process trains on its share
    of every global batch (batch norm over the global batch), and rank 0 saves."""
    dist = dist or Distributed()
    path = run_dir / "checkpoints" / f"{dataset}-pretrain.pt"
    key = {"model": model_config(args), "steps": cfg["pretrain_steps"], "data": dataset, "seed": args.seed,
           "corruptions": [list(c) for c in table], "n_train": len(train_x)}
    cached = None
    if dist.is_main and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["key"] == key:
            cached = state["ae"]
    cached = dist.broadcast(cached)  # rank 0's file decides for every process
    if cached is not None:
        return cached
    set_seed(args.seed)
    model = sync_batchnorm(DenoisingAE(False, **model_config(args)), dist).to(device)
    ae = nn.ModuleDict({"encoder": model.encoder, "decoder": model.decoder})
    net = dist.wrap(_PretrainAE(model)) if dist.enabled else _PretrainAE(model)
    opt = torch.optim.Adam(ae.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 2)
    bs = cfg["pretrain_batch"]
    model.train()
    for _ in progress_bar(range(cfg["pretrain_steps"]), desc=f"{dataset}/pretrain", unit="step",
                          disable=args.quiet):
        x = train_x[torch.randint(len(train_x), (bs,), generator=gen)]
        # clean images too (the episodes show them), then every corruption equally often
        which = torch.randint(len(table) + 1, (bs,), generator=gen)
        inputs = corrupt(x, (which - 1).clamp_min(0), table, gen)
        inputs = torch.where((which == 0)[:, None, None, None], x, inputs)
        if dist.enabled:  # the global batch drawn above, the same on every process: train on this process's share
            mine = dist.shard(bs)
            x, inputs = x[mine], inputs[mine]
        out = net(inputs.to(device))
        loss = (out - x.to(device).reshape(-1, PIXELS)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    last = dist.sum([loss])[0] / dist.world_size if dist.enabled else loss.item()  # equal shares: mean of means
    print(f"[{dataset}] pretrained the autoencoder for {cfg['pretrain_steps']} steps, last batch MSE "
          f"{last:.4f}", flush=True)
    state = {k: v.detach().cpu().clone() for k, v in ae.state_dict().items()}
    if dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "ae": state}, path)
    return state


def _mean_val(cells: dict) -> float:
    return float(np.mean([c["model"]["mse"] for p in cells.values() for c in p.values()]))


def train_one(name: str, dataset: str, train_x, val_x, cfg: dict, table, args, device, run_dir: Path,
              pretrained: dict | None = None, dist: Distributed | None = None):
    """Train one variant on one data set, with checkpoints and resume; returns (final model, model of the
    epoch selected on validation, train record).

    Under torchrun every process draws the same global batch of episodes and trains on its share (batch
    norm over the global batch, gradients averaged by DDP); the logged losses are the global batch's;
    rank 0 alone validates and writes the checkpoint.
    """
    dist = dist or Distributed()
    plastic = name == "plastic"
    set_seed(args.seed)
    model = sync_batchnorm(DenoisingAE(plastic, impl=args.impl, **model_config(args)), dist).to(device)
    if pretrained is not None:
        nn.ModuleDict({"encoder": model.encoder, "decoder": model.decoder}).load_state_dict(pretrained)
    opt = torch.optim.Adam(model.param_groups(args.lr, args.plastic_lr_scale))
    gen = torch.Generator().manual_seed(args.seed + 1)
    total = cfg["epochs"] * cfg["steps_per_epoch"]
    rec = {"loss": [], "final_mse": [], "epoch_seconds": [], "val": [], "steps_per_epoch": cfg["steps_per_epoch"],
           "selected": None}
    best_state = None
    step, epoch_elapsed = 0, 0.0
    ckpt = CheckpointManager(run_dir / "checkpoints" / f"{dataset}-{name}.pt", every=cfg["steps_per_epoch"])
    identity = {"model": model_config(args), "episode": {key: cfg[key] for key in ("k", "t_ns", "t_zs")},
                "data": dataset, "pretrain_steps": cfg["pretrain_steps"], "corruptions": [list(c) for c in table],
                "n_train": len(train_x), "n_val": len(val_x)}
    if args.resume:
        state = dist.broadcast(ckpt.load() if dist.is_main else None)  # read once, by rank 0
        if state is not None:
            if state["identity"] != identity:
                raise SystemExit(f"--resume: {ckpt.path} was made with {state['identity']}, not {identity}; "
                                 "use the same options or another --out")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            torch.set_rng_state(state["torch_rng"])
            rec, step, epoch_elapsed = state["record"], state["step"], state["epoch_elapsed"]
            best_state = state["best_model"]
            print(f"[{dataset}/{name}] resumed at step {step}/{total}", flush=True)
        else:
            print(f"[{dataset}/{name}] --resume: no checkpoint at {ckpt.path}, starting afresh", flush=True)
    model.set_impl(args.impl)  # the implementation is not part of the state: a run may switch it
    net = dist.wrap(model)
    mine = dist.shard(cfg["batch_size"]) if dist.enabled else None

    def state():
        return {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "record": rec, "step": step,
                "epoch_elapsed": epoch_elapsed, "identity": identity, "best_model": best_state}

    model.train()
    with ckpt.catch_interrupt():
        bar = progress_bar(total=total, initial=step, desc=f"{dataset}/{name}", unit="step", disable=args.quiet)
        t0 = time.perf_counter()
        while step < total:
            B = cfg["batch_size"]
            # each stream draws its own corruption and protocol, so one model covers all test conditions
            which = torch.randint(len(table), (B,), generator=gen)
            recall = torch.rand(B, generator=gen) < args.train_recall_frac
            frames, targets, _, _ = make_episodes(train_x, B, cfg["k"], cfg["t_ns"], cfg["t_zs"], which, recall,
                                                  gen, table)
            if mine is not None:  # the global batch, the same on every process: this process's episodes
                frames, targets = frames[:, mine], targets[:, mine]
            y = net(frames.to(device))
            loss, final = episode_loss(y, targets.to(device), args.recon_weight)
            if dist.enabled:  # equal shares: the global means are the means of the local ones
                loss_s, final_s, stops = dist.sum([loss, final, float(ckpt.stop_requested)])
                loss_v, final_v = loss_s / dist.world_size, final_s / dist.world_size
            else:
                loss_v, final_v = loss.item(), final.item()
            if not np.isfinite(loss_v):
                raise FloatingPointError(f"[{dataset}/{name}] non-finite loss at step {step}; try a lower "
                                         "--lr or --alpha-init")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.clamp_eta()
            step += 1
            rec["loss"].append(loss_v)
            rec["final_mse"].append(final_v)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.4f}", last=f"{final_v:.4f}")
            if step % cfg["steps_per_epoch"] == 0 and dist.is_main:  # rank 0 alone validates and writes
                epoch_elapsed += time.perf_counter() - t0
                rec["epoch_seconds"].append(epoch_elapsed)
                epoch_elapsed = 0.0
                # validation images only: the per-epoch curve and the choice of the tested epoch
                cells = evaluate_all(model, val_x, cfg, table, cfg["val_episodes"], args.seed + 17, device)
                entry = {"step": step, "epoch": step // cfg["steps_per_epoch"], "mse": _mean_val(cells),
                         **{f"{p}_mse": float(np.mean([c["model"]["mse"] for c in cells[p].values()]))
                            for p in PROTOCOLS}}
                rec["val"].append(entry)
                if rec["selected"] is None or entry["mse"] < rec["selected"]["mse"]:  # ties keep the earlier
                    rec["selected"] = {"epoch": entry["epoch"], "mse": entry["mse"]}
                    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                bar.write(f"[{dataset}/{name}] epoch {entry['epoch']}/{cfg['epochs']}: "
                          f"{rec['epoch_seconds'][-1]:.1f} s, validation MSE recall {entry['recall_mse']:.4f} "
                          f"denoise {entry['denoise_mse']:.4f}")
                ckpt.save(state())
                t0 = time.perf_counter()
            # under torchrun the processes stop on the step they agreed on, never one alone (it would hang)
            if (stops > 0) if dist.enabled else ckpt.stop_requested:
                epoch_elapsed += time.perf_counter() - t0
                if dist.is_main:
                    ckpt.save(state())
                bar.close()
                raise StopRequested(str(ckpt.path))
        bar.close()
    selected = model
    if best_state is not None:
        selected = copy.deepcopy(model)
        selected.load_state_dict(best_state)
    return model, selected, rec


# ---------------------------------------------------------------------------------------------- plots

def plot_grid(path: Path, samples: dict, columns, title: str) -> None:
    """Rows: clean, corrupted, plastic, baseline; columns: examples per (protocol, corruption)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(p, c, i) for p in PROTOCOLS for c in columns for i in range(samples[(p, c)]["clean"].shape[0])]
    rows = [("clean", "clean"), ("corrupted", "corrupted"), ("plastic", "plastic"), ("baseline", "non-plastic")]
    rows = [r for r in rows if r[0] in samples[cols[0][:2]]]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(0.75 * len(cols) + 1.0, 0.8 * len(rows) + 0.6),
                             squeeze=False)
    for c, (p, key, i) in enumerate(cols):
        for r, (name, label) in enumerate(rows):
            ax = axes[r, c]
            ax.imshow(samples[(p, key)][name][i].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
            if r == 0 and i == 0:
                ax.set_title(f"{p}\n{key}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(path: Path, records: dict) -> None:
    """Training loss (smoothed) per step and validation MSE per epoch, per data set and variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(records)
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 3.2 * len(datasets)), squeeze=False)
    for r, ds in enumerate(datasets):
        for name, rec in records[ds].items():
            loss = np.asarray(rec["final_mse"])
            win = max(1, len(loss) // 20)
            smooth = np.convolve(loss, np.ones(win) / win, mode="valid")
            axes[r, 0].plot(np.arange(len(smooth)) + win, smooth, label=name)
            steps = [v["step"] for v in rec["val"]]
            for p, style in zip(PROTOCOLS, ("-o", "--s")):
                axes[r, 1].plot(steps, [v[f"{p}_mse"] for v in rec["val"]], style, ms=3, label=f"{name}, {p}")
        axes[r, 0].set(title=f"{ds}: training MSE at the corrupted step (moving average)", xlabel="step",
                       ylabel="MSE", yscale="log")
        axes[r, 1].set(title=f"{ds}: validation MSE (mean over corruptions)", xlabel="step", ylabel="MSE",
                       yscale="log")
        for ax in axes[r]:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown_table(metrics: dict, which: str = "test") -> str:
    """MSE per (data set, protocol, corruption): the two variants, the corrupted input, and each variant's
    ceiling (its output for the clean query). which: "test" (epoch selected on validation) or "test_final"."""
    lines = ["| data set | protocol | corruption | plastic | baseline | corrupted input | plastic, clean query "
             "| baseline, clean query |", "|---|---|---|---|---|---|---|---|"]
    for ds, d in metrics["datasets"].items():
        for p in PROTOCOLS:
            for key in metrics["config"]["corruptions"]:
                cell = {m: d["models"][m][which][p][key] for m in d["models"]}
                mse = [f"{cell[m]['model']['mse']:.4f}" if m in cell else "-" for m in MODELS]
                ceil = [f"{cell[m]['ceiling']['mse']:.4f}" if m in cell else "-" for m in MODELS]
                inp = next(iter(cell.values()))["input"]["mse"]
                lines.append(f"| {ds} | {p} | {key} | {mse[0]} | {mse[1]} | {inp:.4f} | {ceil[0]} | {ceil[1]} |")
    return "\n".join(lines)


def seed_rows(metrics: dict) -> list[dict]:
    """The figures a several-seed table compares (experiments/common/seeds.py): test MSE at the epoch selected
    on validation per (data set, protocol, corruption), both variants and their ceilings, plastic minus
    baseline."""
    rows = []
    for ds, d in metrics["datasets"].items():
        for p in PROTOCOLS:
            for key in metrics["config"]["corruptions"]:
                values = {}
                for m in MODELS:
                    if m in d["models"]:
                        values[m] = d["models"][m]["test"][p][key]["model"]["mse"]
                for m in MODELS:
                    if m in d["models"]:
                        values[f"{m}, clean query"] = d["models"][m]["test"][p][key]["ceiling"]["mse"]
                pairs = [("plastic", "baseline")] if {"plastic", "baseline"} <= set(values) else []
                rows.append({"quantity": f"{ds}, {p}, {key}: test MSE (lower is better)", "values": values,
                             "pairs": pairs})
    return rows


# ----------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Denoising autoencoder with a plastic memory of clean pixels (Upadhyay & Bagad, after "
                    "Miconi et al. 2018) on MNIST and Fashion-MNIST: recall and plain-denoising test MSE/PSNR "
                    "under noise and occlusion, plastic vs non-plastic, with each model's ceiling.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(ap, default_out="results/denoising_autoencoder")
    ap.add_argument("--data-root", default=None,
                    help="data root in torchvision's layout (ROOT/MNIST/raw, ROOT/FashionMNIST/raw); "
                         "default: $PLASTIC_OPS_DATA, else ./data")
    ap.add_argument("--datasets", default="mnist,fashion-mnist",
                    help=f"comma-separated, from {sorted(DATASETS)}")
    ap.add_argument("--models", default="plastic,baseline", help=f"comma-separated, from {MODELS}")
    ap.add_argument("--no-download", "--offline", dest="no_download", action="store_true",
                    help="never try to download missing data")
    ap.add_argument("--full", action="store_true",
                    help=f"the long run: {FULL} (explicit flags still override)")
    for key, val in DEFAULTS.items():
        helps = {"epochs": "training epochs", "steps_per_epoch": "episode batches per epoch",
                 "batch_size": "episodes (streams) per batch", "k": "images shown per episode",
                 "t_ns": "steps each image is shown", "t_zs": "blank steps after each image",
                 "test_episodes": "test episodes per (protocol, corruption)",
                 "val_episodes": "validation episodes per (protocol, corruption) after each epoch",
                 "pretrain_steps": "steps of the shared autoencoder pretraining on single images (0: none)",
                 "pretrain_batch": "images per pretraining step"}
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                        help=f"{helps[key]} (default {val}, --full {FULL[key]})")
    ap.add_argument("--sigmas", type=_sigmas, default=[0.5, 1.0, 1.5],
                    help="Gaussian noise levels (pixels in [0, 1]); with --occlude, the corruptions: training "
                         "draws one per stream, the test reports each")
    ap.add_argument("--occlude", choices=("half", "none"), default="half",
                    help="also corrupt by occluding half of the image (top, bottom, left or right, at random)")
    ap.add_argument("--val-images", type=int, default=None,
                    help=f"validation split: the last N images of the training file (default {VALIDATION_IMAGES}; "
                         "--synthetic N: N // 4)")
    ap.add_argument("--train-recall-frac", type=float, default=0.75,
                    help="fraction of training episodes whose corrupted image was shown earlier (the rest: unseen)")
    ap.add_argument("--recon-weight", type=float, default=0.5,
                    help="weight of the MSE of the earlier steps, beside the corrupted step's MSE")
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    ap.add_argument("--plastic-lr-scale", type=float, default=5.0,
                    help="learning-rate factor of the memory's alpha and eta")
    ap.add_argument("--alpha-shape", choices=("synapse", "input", "output", "scalar"), default="output",
                    help="granularity of the memory's alpha: 'output' is one per pixel, which a short run can "
                         "learn; 'synapse' (Miconi et al.) has 614k of them")
    ap.add_argument("--code", type=int, default=64, help="code size of the autoencoder")
    ap.add_argument("--width", type=int, default=16, help="channels of the first conv (the second has twice)")
    ap.add_argument("--alpha-init", type=float, default=0.0,
                    help="initial alpha of the memory; 0: the plastic variant starts as the baseline")
    ap.add_argument("--eta-init", type=float, default=0.1, help="initial plasticity rate of the memory")
    ap.add_argument("--grid-examples", type=int, default=2, help="image-grid columns per (protocol, corruption)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="use N synthetic training images (and N/2 test images) instead of the data sets: "
                         "for tests and smoke runs, no files needed")
    return ap


def _sigmas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sigmas takes comma-separated numbers, got {text!r}") from None
    if any(not np.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"--sigmas must be finite and >= 0, got {text!r}")
    return values


def episode_config(args) -> dict:
    base = FULL if args.full else DEFAULTS
    return {key: (getattr(args, key) if getattr(args, key) is not None else base[key]) for key in DEFAULTS}


def load(dataset: str, args):
    """(train, validation, test) images; validation: the last images of the training file."""
    if args.synthetic:
        n = args.synthetic
        seed = 1000 * list(DATASETS).index(dataset)
        file_x, test_x = synthetic_dataset(n, seed=seed)[0], synthetic_dataset(max(n // 2, 8), seed=seed + 1)[0]
    else:
        try:
            file_x, _ = load_dataset(dataset, "train", args.data_root, download=not args.no_download)
            test_x, _ = load_dataset(dataset, "test", args.data_root, download=not args.no_download)
        except FileNotFoundError as exc:
            raise SystemExit(f"error: {exc}") from None
    n_val = args.val_images if args.val_images is not None else (
        max(args.synthetic // 4, 1) if args.synthetic else VALIDATION_IMAGES)
    try:
        train_x, _, val_x, _ = split_validation(file_x, None, n_val)
    except ValueError as exc:
        raise SystemExit(f"error: --val-images: {exc}") from None
    return train_x, val_x, test_x


@restores_torch_threads
def main(argv=None) -> dict:
    """Train, test, write the results; returns the metrics. Under torchrun (WORLD_SIZE > 1) the processes
    share every batch of episodes; rank 0 alone tests and writes, the others return {"rank": rank}."""
    args = build_parser().parse_args(argv)
    dist, device = Distributed.from_env(args.device)
    with dist.scope(), deterministic(device.type == "cpu"):
        return run(args, argv, dist, device)


def run(args, argv, dist: Distributed, device) -> dict:
    cfg = episode_config(args)
    table = corruptions(args.sigmas, args.occlude)
    if not table:
        raise SystemExit("error: no corruption: give --sigmas or --occlude half")
    keys = [corruption_key(c) for c in table]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"error: --sigmas lists a level twice: {args.sigmas}")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for d in datasets:
        if d not in DATASETS:
            raise SystemExit(f"error: unknown data set {d!r}; choose from {sorted(DATASETS)}")
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"error: unknown model {m!r}; choose from {MODELS}")
    if "plastic" in models and args.impl == "fused" and not plastic_ops.extension_available():
        raise SystemExit("error: --impl fused needs the compiled extension (plastic_ops._C), which is not "
                         "built; build it (see README.md) or pass --impl reference")
    if args.threads:
        torch.set_num_threads(args.threads)
    dist.check_divisible(cfg["batch_size"], "--batch-size")
    if cfg["pretrain_steps"] > 0:
        dist.check_divisible(cfg["pretrain_batch"], "--pretrain-batch")
    args.quiet = args.quiet or not dist.is_main  # one set of progress bars, rank 0's
    out = ResultsDir(args.out)
    T = cfg["k"] * (cfg["t_ns"] + cfg["t_zs"]) + 1
    print(f"episodes: k={cfg['k']} images x ({cfg['t_ns']} shown + {cfg['t_zs']} blank) + 1 corrupted = {T} steps, "
          f"batch {cfg['batch_size']}; {cfg['epochs']} epochs x {cfg['steps_per_epoch']} steps; corruptions "
          f"{', '.join(keys)}; impl={args.impl}, device={device}, threads={torch.get_num_threads()}"
          + (f", {dist.world_size} processes ({dist.backend})" if dist.enabled else ""), flush=True)
    metrics = {"config": {**cfg, "T": T, "corruptions": keys, "sigmas": args.sigmas, "occlude": args.occlude,
                          "impl": args.impl, "device": str(device), "datasets": datasets, "models": models,
                          "full": args.full, "seed": args.seed, "lr": args.lr,
                          "train_recall_frac": args.train_recall_frac, "recon_weight": args.recon_weight,
                          "plastic_lr_scale": args.plastic_lr_scale, "synthetic": args.synthetic,
                          "data_root": None if args.synthetic else str(resolve_data_root(args.data_root)),
                          "argv": sys.argv[1:] if argv is None else list(argv), **model_config(args)},
               "seed": args.seed, "world_size": dist.world_size,
               "per_process_batch": cfg["batch_size"] // dist.world_size,
               "test": "the epoch selected on validation (lowest mean validation MSE), on test images",
               "test_final": "the model after the last epoch, on test images",
               "datasets": {}}
    records = {}
    try:
        for ds in datasets:
            train_x, val_x, test_x = load(ds, args)
            entry = {"n_train": len(train_x), "n_val": len(val_x), "n_test": len(test_x),
                     "validation": f"the last {len(val_x)} images of the training file, never trained on",
                     "models": {}}
            trained = {}
            pre = (pretrain(ds, train_x, args, cfg, table, device, out.path, dist)
                   if cfg["pretrain_steps"] > 0 else None)
            for name in models:
                model, selected, rec = train_one(name, ds, train_x, val_x, cfg, table, args, device, out.path,
                                                 pre, dist)
                if not dist.is_main:  # rank 0 alone tests and writes
                    continue
                trained[name] = selected
                # the test set: once at the selected epoch, once after the last
                test = evaluate_all(selected, test_x, cfg, table, cfg["test_episodes"], args.seed, device)
                final = evaluate_all(model, test_x, cfg, table, cfg["test_episodes"], args.seed, device)
                info = {"n_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                        "selected_epoch": rec["selected"]["epoch"] if rec["selected"] else None,
                        "test": test, "test_final": final, "epoch_seconds": rec["epoch_seconds"],
                        "mean_epoch_seconds": float(np.mean(rec["epoch_seconds"])) if rec["epoch_seconds"] else None,
                        "final_train_loss": float(np.mean(rec["loss"][-cfg["steps_per_epoch"]:])),
                        "val": rec["val"]}
                if model.plastic:
                    info["plasticity"] = {lbl: {"eta": m.memory.eta.item(), "alpha_mean": m.memory.alpha.mean().item(),
                                                "alpha_abs_mean": m.memory.alpha.abs().mean().item()}
                                          for lbl, m in (("selected", selected), ("final", model))}
                entry["models"][name] = info
                records.setdefault(ds, {})[name] = rec
                print(f"[{ds}/{name}] test MSE (epoch {info['selected_epoch']}) " + ", ".join(
                    f"{p} {k}: {test[p][k]['model']['mse']:.4f}" for p in PROTOCOLS for k in test[p]), flush=True)
            if not dist.is_main:
                continue
            metrics["datasets"][ds] = entry
            samples = {}
            for p in PROTOCOLS:
                for ci, c in enumerate(table):
                    cell = {}
                    for name, model in trained.items():
                        clean, bad, o = sample_outputs(model, test_x, cfg, table, ci, p, args.grid_examples,
                                                       args.seed, device)
                        cell.update(clean=clean, corrupted=bad)
                        cell[name] = o
                    samples[(p, corruption_key(c))] = cell
            plot_grid(out.file(f"grid_{ds}.png"), samples, keys,
                      f"{ds}: clean / corrupted / plastic / non-plastic (test images)")
    except StopRequested as exc:
        print(f"Stopped; the checkpoint is in {exc}. Continue with the same command plus --resume.")
        raise SystemExit(130)
    if not dist.is_main:
        return {"rank": dist.rank}
    plot_curves(out.file("training_curves.png"), records)
    table_md = markdown_table(metrics)
    out.file("results.md").write_text("Test MSE at the epoch selected on validation\n\n" + table_md
                                      + "\n\nTest MSE after the last epoch\n\n"
                                      + markdown_table(metrics, "test_final") + "\n")
    path = out.write_json("metrics.json", metrics)
    print(table_md)
    print(f"wrote {path}, {out.file('results.md')}, grid_*.png, training_curves.png in {out.path}")
    return json.loads(path.read_text())


if __name__ == "__main__":
    main()
