"""Experiment 2: a convolutional denoising autoencoder with plastic layers (Miconi, Clune & Stanley 2018,
Fig. 3-5), on MNIST and Fashion-MNIST, with test numbers where the paper had pictures.

Network (one class, two variants):
    encoder   conv 3x3/2 + BN + ReLU (28 -> 14), conv 3x3/2 + BN + ReLU (14 -> 7), linear -> code
    code      PlasticLinear(code, code), tanh            [baseline: nn.Linear + tanh]
    decoder   linear + ReLU, conv-T 3x3/2 + BN + ReLU (7 -> 14), conv-T 3x3/2 (14 -> 28), sigmoid
    pixels    PlasticLinear(784, 784), identity, on p - mean image   [baseline: nn.Linear]
Both linear maps start as the identity (the pixel layer's bias as the mean image) and alpha as 0, so each
variant starts as the same plain autoencoder, pretrained on single noisy images (--pretrain-steps); the
baseline keeps them as ordinary layers so that the two variants differ only by alpha, eta and the traces. The pixel
layer's output is unbounded: the loss sees it raw (a gradient everywhere) and the metrics use it clamped
to [0, 1] (which can only lower the error, the targets being in [0, 1]).

Episode (B streams in parallel, T = k * (t_ns + t_zs) + 1 steps): each of k images is shown clean t_ns
times, then a zero image t_zs times; the last step shows one image plus Gaussian noise N(0, sigma^2) (not
clipped). The conv parts see all T*B frames at once; the plastic layers see (T, B, .) with their trace
carried across the episode and reset at its start. Loss: MSE at the last step (against the clean image)
+ --recon-weight * MSE of the earlier steps (against what they showed).

Test protocols, on test images never used in training, the same episodes for both variants:
    recall    the noisy image is one of the k shown clean earlier in the episode (plasticity as memory);
    denoise   the noisy image was not shown in the episode (plain denoising).

    python experiments/denoising_autoencoder.py                       # default run, a few minutes on a CPU
    python experiments/denoising_autoencoder.py --full                # the long run
    python experiments/denoising_autoencoder.py --resume              # continue an interrupted run
    torchrun --standalone --nproc-per-node 2 experiments/denoising_autoencoder.py   # 2 processes
"""
from __future__ import annotations

import argparse
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
from experiments.common.data import DATASETS, load_dataset, resolve_data_root, synthetic_dataset  # noqa: E402
from plastic_ops.nn import PlasticLinear  # noqa: E402
from experiments.common import (CheckpointManager, ResultsDir, StopRequested, add_common_args,  # noqa: E402
                                set_seed)
from experiments.common.progress import progress_bar  # noqa: E402
from experiments.common.distributed import Distributed, sync_batchnorm  # noqa: E402

MODELS = ("plastic", "baseline")
PROTOCOLS = ("recall", "denoise")
PIXELS = 28 * 28

# Default run: both data sets and both variants in about 5.5 min of CPU time on a 2-core CPU.
DEFAULTS = dict(epochs=3, steps_per_epoch=30, batch_size=8, k=2, t_ns=2, t_zs=1, test_episodes=128,
                val_episodes=32, pretrain_steps=250, pretrain_batch=64)
# --full: the paper's episode shape (3 images, 20 presentations, 3 zero steps) and a long training.
FULL = dict(epochs=30, steps_per_epoch=200, batch_size=32, k=3, t_ns=20, t_zs=3, test_episodes=2000,
            val_episodes=256, pretrain_steps=5000, pretrain_batch=128)


# ----------------------------------------------------------------------------------------------- model

class DenoisingAE(nn.Module):
    """Conv autoencoder with a plastic (or ordinary) linear layer on the code and one on the pixels."""

    def __init__(self, plastic: bool, code: int = 64, width: int = 16, impl: str = "fused",
                 alpha_init: float = 0.0, code_alpha_init: float = 0.0, eta_init: float = 0.1,
                 alpha_shape: str = "output"):
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
        # the pixel layer sees p - mean image: its trace then stores (p - m) y^T, and recall weighs each stored
        # image by (x - m) . (c - m), which separates different images far better than x . c of two
        # non-negative images (mostly the shared stroke area); the bias starts at m, so the layer starts as
        # the identity on p
        self.register_buffer("pixel_mean", torch.zeros(PIXELS))
        if plastic:
            self.code_layer = PlasticLinear(code, code, activation="tanh", eta=eta_init, impl=impl)
            self.pixel_layer = PlasticLinear(PIXELS, PIXELS, activation="identity", eta=eta_init, impl=impl,
                                             alpha=alpha_shape)
            with torch.no_grad():
                for layer, a0 in ((self.code_layer, code_alpha_init), (self.pixel_layer, alpha_init)):
                    # identity weights and alpha = 0: the plastic net starts as exactly the baseline, and
                    # alpha grows only where the trace helps (dL/dalpha = sum p * grad * H is nonzero at 0).
                    # A positive start overwhelms the untrained decoder's dense grey outputs: p . H sums
                    # 784 terms of the same sign.
                    layer.weight.copy_(torch.eye(layer.in_features))
                    layer.alpha.fill_(a0)
        else:
            self.code_layer = nn.Linear(code, code)
            self.pixel_layer = nn.Linear(PIXELS, PIXELS)
            with torch.no_grad():
                for layer in (self.code_layer, self.pixel_layer):
                    layer.weight.copy_(torch.eye(layer.in_features))
                    layer.bias.zero_()

    def param_groups(self, lr: float, pixel_lr_scale: float, plastic_lr_scale: float):
        """Adam moves every weight by about lr per step; summed over the 784 inputs of a pixel, that is a
        jump of up to 784 * lr in each output. The 784x784 weights (and a per-synapse alpha) get a smaller
        step so the output layer does not jitter. The few plasticity coefficients of the pixel layer (alpha
        per pixel, eta) get a larger one: a short run must grow them from 0."""
        small, large = [self.pixel_layer.weight], []
        if self.plastic:
            alpha = self.pixel_layer.alpha
            (small if alpha.numel() == PIXELS * PIXELS else large).append(alpha)
            large += [p for layer in (self.code_layer, self.pixel_layer) for p in (layer.eta,)
                      if isinstance(p, nn.Parameter)]
        ids = {id(p) for p in small + large}
        rest = [p for p in self.parameters() if id(p) not in ids]
        groups = [{"params": rest, "lr": lr}, {"params": small, "lr": lr * pixel_lr_scale}]
        if large:
            groups.append({"params": large, "lr": lr * plastic_lr_scale})
        return groups

    def set_impl(self, impl: str) -> None:
        if self.plastic:
            self.code_layer.impl = self.pixel_layer.impl = impl

    def set_pixel_mean(self, mean: torch.Tensor) -> None:
        with torch.no_grad():
            self.pixel_mean.copy_(mean.reshape(PIXELS))
            self.pixel_layer.bias.copy_(self.pixel_mean)

    def clamp_eta(self) -> None:
        """Keep the plasticity rates in (0, 1]: outside it the Hebbian trace stops being a decaying average."""
        if self.plastic:
            with torch.no_grad():
                for layer in (self.code_layer, self.pixel_layer):
                    layer.eta.clamp_(1e-4, 1.0)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (T, B, 1, 28, 28) -> raw pixel outputs (T, B, 784); each call is a fresh episode."""
        T, B = frames.shape[:2]
        z = self.encoder(frames.reshape(T * B, 1, 28, 28)).reshape(T, B, self.code)
        if self.plastic:
            z, _ = self.code_layer(z)
        else:
            z = torch.tanh(self.code_layer(z))
        p = torch.sigmoid(self.decoder(z.reshape(T * B, self.code))).reshape(T, B, PIXELS) - self.pixel_mean
        if self.plastic:
            y, _ = self.pixel_layer(p)
        else:
            y = self.pixel_layer(p)
        return y


# -------------------------------------------------------------------------------------------- episodes

def make_episodes(images: torch.Tensor, batch: int, k: int, t_ns: int, t_zs: int, sigma, recall,
                  gen: torch.Generator):
    """Sample B episodes from images (N, 1, 28, 28).

    sigma: float or (B,) tensor; recall: bool or (B,) bool tensor (True: the noisy image is one shown).
    Returns frames (T, B, 1, 28, 28), targets (T, B, 784), and the last step's clean and noisy images.
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
    which = torch.randint(k, (batch,), generator=gen)
    recall = torch.as_tensor(recall, dtype=torch.bool).expand(batch)
    query = torch.where(recall[:, None, None, None], shown[torch.arange(batch), which], images[idx[:, k]])
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(batch)
    noisy = query + sigma[:, None, None, None] * torch.randn(query.shape, generator=gen)
    zeros = torch.zeros(batch, t_zs, 1, 28, 28)
    blocks = []
    for j in range(k):
        blocks += [shown[:, j:j + 1].expand(batch, t_ns, 1, 28, 28), zeros]
    seq = torch.cat(blocks, dim=1)                                       # (B, k (t_ns + t_zs), 1, 28, 28)
    frames = torch.cat([seq, noisy[:, None]], dim=1).transpose(0, 1).contiguous()
    targets = torch.cat([seq, query[:, None]], dim=1).transpose(0, 1).reshape(-1, batch, PIXELS).contiguous()
    return frames, targets, query, noisy


def episode_loss(y, targets, recon_weight: float):
    final = (y[-1] - targets[-1]).pow(2).mean()
    recon = (y[:-1] - targets[:-1]).pow(2).mean() if y.shape[0] > 1 else y.new_zeros(())
    return final + recon_weight * recon, final


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(model, images, cfg, sigma: float, protocol: str, n_episodes: int, seed: int, device):
    """Mean MSE and PSNR (dB, per image, then averaged) of the last step's output, clamped to [0, 1].
    The episodes depend only on (seed, sigma, protocol), so every model sees the same ones."""
    model.eval()
    gen = torch.Generator().manual_seed(seed * 7919 + int(round(sigma * 1000)) * 2 + (protocol == "recall"))
    mse_sum = psnr_sum = noisy_mse_sum = noisy_psnr_sum = 0.0
    done = 0
    while done < n_episodes:
        b = min(cfg["batch_size"], n_episodes - done)
        frames, _, query, noisy = make_episodes(images, b, cfg["k"], cfg["t_ns"], cfg["t_zs"], sigma,
                                                protocol == "recall", gen)
        out = model(frames.to(device))[-1].clamp(0, 1).cpu()
        for pred, sums in ((out, "model"), (noisy.reshape(b, PIXELS), "noisy")):
            per_image = (pred - query.reshape(b, PIXELS)).pow(2).mean(dim=1)
            psnr = 10 * torch.log10(1.0 / per_image.clamp_min(1e-10))
            if sums == "model":
                mse_sum += per_image.sum().item()
                psnr_sum += psnr.sum().item()
            else:
                noisy_mse_sum += per_image.sum().item()
                noisy_psnr_sum += psnr.sum().item()
        done += b
    model.train()
    return ({"mse": mse_sum / done, "psnr": psnr_sum / done},
            {"mse": noisy_mse_sum / done, "psnr": noisy_psnr_sum / done})


@torch.no_grad()
def sample_outputs(model, images, cfg, sigma: float, protocol: str, n: int, seed: int, device):
    """(clean, noisy, output) of n fixed test episodes, for the image grid."""
    model.eval()
    gen = torch.Generator().manual_seed(seed * 104729 + int(round(sigma * 1000)) * 2 + (protocol == "recall"))
    frames, _, query, noisy = make_episodes(images, n, cfg["k"], cfg["t_ns"], cfg["t_zs"], sigma,
                                            protocol == "recall", gen)
    out = model(frames.to(device))[-1].clamp(0, 1).cpu().reshape(n, 28, 28)
    model.train()
    return query[:, 0], noisy[:, 0], out


# ------------------------------------------------------------------------------------------- training

def model_config(args) -> dict:
    return dict(code=args.code, width=args.width, alpha_init=args.alpha_init,
                code_alpha_init=args.code_alpha_init, eta_init=args.eta_init, alpha_shape=args.alpha_shape)


class _PretrainAE(nn.Module):
    """The encoder and decoder alone (what pretraining trains), as one module DDP can wrap."""

    def __init__(self, model: DenoisingAE):
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder

    def forward(self, x):
        return torch.sigmoid(self.decoder(torch.tanh(self.encoder(x))))


def pretrain(dataset: str, train_x, args, cfg: dict, device, run_dir: Path, dist: Distributed | None = None) -> dict:
    """Pretrain the shared conv autoencoder on single noisy images; returns its encoder/decoder state.

    Episodes cost T frames and a B x 784 x 784 trace per stream; single images cost one cheap conv pass.
    The trace can only recall what the decoder produced for the clean images, so it helps only once the
    autoencoder reconstructs clean images better than noisy ones: both variants start from this same
    pretrained autoencoder (with the identity linear layers and alpha = 0), then train on episodes.
    The state is saved, so --resume (or a second variant) does not repeat it. Under torchrun each process
    trains on its share of every global batch (batch norm over the global batch), and rank 0 saves."""
    dist = dist or Distributed()
    path = run_dir / "checkpoints" / f"{dataset}-pretrain.pt"
    key = {"model": model_config(args), "steps": cfg["pretrain_steps"], "data": dataset, "seed": args.seed}
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
    net = dist.wrap(_PretrainAE(model)) if dist.enabled else None
    opt = torch.optim.Adam(ae.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 2)
    levels = torch.tensor([0.0] + list(args.sigmas))  # clean images too: the episodes show them
    bs = cfg["pretrain_batch"]
    model.train()
    for _ in progress_bar(range(cfg["pretrain_steps"]), desc=f"{dataset}/pretrain", unit="step",
                          disable=args.quiet):
        x = train_x[torch.randint(len(train_x), (bs,), generator=gen)]
        sigma = levels[torch.randint(len(levels), (bs,), generator=gen)]
        noisy = x + sigma[:, None, None, None] * torch.randn(x.shape, generator=gen)
        if net is None:
            out = torch.sigmoid(model.decoder(torch.tanh(model.encoder(noisy.to(device)))))
        else:  # the global batch drawn above, the same on every process: train on this process's share
            mine = dist.shard(bs)
            x = x[mine]
            out = net(noisy[mine].to(device))
        loss = (out - x.to(device)).pow(2).mean()
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


def train_one(name: str, dataset: str, train_x, test_x, cfg: dict, args, device, run_dir: Path,
              pretrained: dict | None = None, dist: Distributed | None = None):
    """Train one variant on one data set, with checkpoints and resume; returns (model, train record).

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
    model.set_pixel_mean(train_x.mean(dim=0).to(device))
    opt = torch.optim.Adam(model.param_groups(args.lr, args.pixel_lr_scale, args.plastic_lr_scale))
    gen = torch.Generator().manual_seed(args.seed + 1)
    total = cfg["epochs"] * cfg["steps_per_epoch"]
    rec = {"loss": [], "final_mse": [], "epoch_seconds": [], "val": [], "steps_per_epoch": cfg["steps_per_epoch"]}
    step, epoch_elapsed = 0, 0.0
    ckpt = CheckpointManager(run_dir / "checkpoints" / f"{dataset}-{name}.pt", every=cfg["steps_per_epoch"])
    identity = {"model": model_config(args), "episode": {key: cfg[key] for key in ("k", "t_ns", "t_zs")},
                "data": dataset, "pretrain_steps": cfg["pretrain_steps"]}
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
            print(f"[{dataset}/{name}] resumed at step {step}/{total}", flush=True)
        else:
            print(f"[{dataset}/{name}] --resume: no checkpoint at {ckpt.path}, starting afresh", flush=True)
    model.set_impl(args.impl)  # the implementation is not part of the state: a run may switch it
    net = dist.wrap(model)
    mine = dist.shard(cfg["batch_size"]) if dist.enabled else None

    def state():
        return {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "record": rec, "step": step,
                "epoch_elapsed": epoch_elapsed, "identity": identity}

    sigmas = torch.tensor(args.sigmas, dtype=torch.float32)
    model.train()
    with ckpt.catch_interrupt():
        bar = progress_bar(total=total, initial=step, desc=f"{dataset}/{name}", unit="step", disable=args.quiet)
        t0 = time.perf_counter()
        while step < total:
            B = cfg["batch_size"]
            # each stream draws its own noise level and protocol, so one model covers all test conditions
            sigma = sigmas[torch.randint(len(sigmas), (B,), generator=gen)]
            recall = torch.rand(B, generator=gen) < args.train_recall_frac
            frames, targets, _, _ = make_episodes(train_x, B, cfg["k"], cfg["t_ns"], cfg["t_zs"], sigma, recall, gen)
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
                val = {p: evaluate(model, test_x, cfg, 0.5, p, cfg["val_episodes"], args.seed + 17, device)[0]["mse"]
                       for p in PROTOCOLS}
                rec["val"].append({"step": step, **{f"{p}_mse": v for p, v in val.items()}})
                bar.write(f"[{dataset}/{name}] epoch {step // cfg['steps_per_epoch']}/{cfg['epochs']}: "
                          f"{rec['epoch_seconds'][-1]:.1f} s, val MSE (sigma 0.5) recall {val['recall']:.4f} "
                          f"denoise {val['denoise']:.4f}")
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
    return model, rec


# ---------------------------------------------------------------------------------------------- plots

def plot_grid(path: Path, samples: dict, sigmas, title: str) -> None:
    """Rows: clean, noisy, plastic, baseline; columns: examples per (protocol, sigma)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [(p, s, i) for p in PROTOCOLS for s in sigmas for i in range(samples[(p, s)]["clean"].shape[0])]
    rows = [("clean", "clean"), ("noisy", "noisy"), ("plastic", "plastic"), ("baseline", "non-plastic")]
    rows = [r for r in rows if r[0] in samples[cols[0][:2]]]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(0.75 * len(cols) + 1.0, 0.8 * len(rows) + 0.6),
                             squeeze=False)
    for c, (p, s, i) in enumerate(cols):
        for r, (key, label) in enumerate(rows):
            ax = axes[r, c]
            ax.imshow(samples[(p, s)][key][i].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
            if r == 0 and i == 0:
                ax.set_title(f"{p}\nsigma={s:g}", fontsize=7)
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
        axes[r, 0].set(title=f"{ds}: training MSE at the noisy step (moving average)", xlabel="step",
                       ylabel="MSE", yscale="log")
        axes[r, 1].set(title=f"{ds}: test MSE, sigma 0.5", xlabel="step", ylabel="MSE", yscale="log")
        for ax in axes[r]:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown_table(metrics: dict) -> str:
    lines = ["| data set | protocol | sigma | plastic MSE | baseline MSE | noisy input MSE | plastic PSNR (dB) "
             "| baseline PSNR (dB) | noisy input PSNR (dB) |", "|---|---|---|---|---|---|---|---|---|"]
    for ds, d in metrics["datasets"].items():
        for p in PROTOCOLS:
            for s in metrics["config"]["sigmas"]:
                key = f"{s:g}"
                cell = {m: d["models"][m]["test"][p][key] for m in d["models"]}
                noisy = d["noisy_input"][p][key]
                mse = [f"{cell[m]['mse']:.4f}" if m in cell else "-" for m in MODELS]
                psnr = [f"{cell[m]['psnr']:.2f}" if m in cell else "-" for m in MODELS]
                lines.append(f"| {ds} | {p} | {s:g} | {mse[0]} | {mse[1]} | {noisy['mse']:.4f} | {psnr[0]} | "
                             f"{psnr[1]} | {noisy['psnr']:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Denoising autoencoder with plastic layers (Miconi et al. 2018, Fig. 3-5) on MNIST and "
                    "Fashion-MNIST: recall and plain-denoising test MSE/PSNR, plastic vs non-plastic.",
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
                 "t_ns": "steps each image is shown", "t_zs": "zero-image steps after each image",
                 "test_episodes": "test episodes per (sigma, protocol)",
                 "val_episodes": "test episodes per protocol for the per-epoch curve (sigma 0.5)",
                 "pretrain_steps": "steps of the shared autoencoder pretraining on single images (0: none)",
                 "pretrain_batch": "images per pretraining step"}
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                        help=f"{helps[key]} (default {val}, --full {FULL[key]})")
    ap.add_argument("--sigmas", type=lambda s: [float(v) for v in s.split(",")], default=[0.25, 0.5, 0.75],
                    help="noise levels (pixels in [0, 1]); training draws one per stream, the test reports each")
    ap.add_argument("--train-recall-frac", type=float, default=0.75,
                    help="fraction of training episodes whose noisy image was shown earlier (the rest: unseen)")
    ap.add_argument("--recon-weight", type=float, default=0.5,
                    help="weight of the MSE of the earlier steps, beside the noisy step's MSE")
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    ap.add_argument("--pixel-lr-scale", type=float, default=0.02,
                    help="learning-rate factor of the 784x784 weights (and of a per-synapse alpha)")
    ap.add_argument("--plastic-lr-scale", type=float, default=5.0,
                    help="learning-rate factor of the etas and of a per-pixel or scalar alpha of the 784x784 layer")
    ap.add_argument("--alpha-shape", choices=("synapse", "input", "output", "scalar"), default="output",
                    help="granularity of the 784x784 layer's alpha: 'output' is one per pixel, which a short "
                         "run can learn; 'synapse' (Miconi et al.) has 614k of them")
    ap.add_argument("--code", type=int, default=64, help="code size (the small plastic layer is code x code)")
    ap.add_argument("--width", type=int, default=16, help="channels of the first conv (the second has twice)")
    ap.add_argument("--alpha-init", type=float, default=0.0,
                    help="initial alpha (every synapse) of the 784x784 plastic layer; 0: start as the baseline")
    ap.add_argument("--code-alpha-init", type=float, default=0.0, help="initial alpha of the code plastic layer")
    ap.add_argument("--eta-init", type=float, default=0.1, help="initial plasticity rate of both plastic layers")
    ap.add_argument("--grid-examples", type=int, default=2, help="image-grid columns per (protocol, sigma)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N",
                    help="use N synthetic training images (and N/2 test images) instead of the data sets: "
                         "for tests and smoke runs, no files needed")
    return ap


def episode_config(args) -> dict:
    base = FULL if args.full else DEFAULTS
    return {key: (getattr(args, key) if getattr(args, key) is not None else base[key]) for key in DEFAULTS}


def load(dataset: str, args):
    if args.synthetic:
        n = args.synthetic
        seed = 1000 * list(DATASETS).index(dataset)
        return synthetic_dataset(n, seed=seed)[0], synthetic_dataset(max(n // 2, 8), seed=seed + 1)[0]
    try:
        train_x, _ = load_dataset(dataset, "train", args.data_root, download=not args.no_download)
        test_x, _ = load_dataset(dataset, "test", args.data_root, download=not args.no_download)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    return train_x, test_x


def main(argv=None) -> dict:
    """Train, test, write the results; returns the metrics. Under torchrun (WORLD_SIZE > 1) the processes
    share every batch of episodes; rank 0 alone tests and writes, the others return {"rank": rank}."""
    args = build_parser().parse_args(argv)
    dist, device = Distributed.from_env(args.device)
    with dist.scope():
        return run(args, argv, dist, device)


def run(args, argv, dist: Distributed, device) -> dict:
    cfg = episode_config(args)
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
    print(f"episodes: k={cfg['k']} images x ({cfg['t_ns']} shown + {cfg['t_zs']} zero) + 1 noisy = {T} steps, "
          f"batch {cfg['batch_size']}; {cfg['epochs']} epochs x {cfg['steps_per_epoch']} steps; impl={args.impl}, "
          f"device={device}, threads={torch.get_num_threads()}"
          + (f", {dist.world_size} processes ({dist.backend})" if dist.enabled else ""), flush=True)
    metrics = {"config": {**cfg, "T": T, "sigmas": args.sigmas, "impl": args.impl, "device": str(device),
                          "datasets": datasets, "models": models, "full": args.full, "seed": args.seed,
                          "lr": args.lr, "train_recall_frac": args.train_recall_frac,
                          "recon_weight": args.recon_weight, "synthetic": args.synthetic,
                          "data_root": None if args.synthetic else str(resolve_data_root(args.data_root)),
                          "argv": sys.argv[1:] if argv is None else list(argv), **model_config(args)},
               "world_size": dist.world_size, "per_process_batch": cfg["batch_size"] // dist.world_size,
               "datasets": {}}
    records = {}
    try:
        for ds in datasets:
            train_x, test_x = load(ds, args)
            entry = {"n_train": len(train_x), "n_test": len(test_x), "models": {}, "noisy_input": {}}
            trained = {}
            pre = pretrain(ds, train_x, args, cfg, device, out.path, dist) if cfg["pretrain_steps"] > 0 else None
            for name in models:
                model, rec = train_one(name, ds, train_x, test_x, cfg, args, device, out.path, pre, dist)
                if not dist.is_main:  # rank 0 alone tests and writes
                    continue
                trained[name] = model
                test = {}
                for p in PROTOCOLS:
                    test[p] = {}
                    for s in args.sigmas:
                        res, noisy = evaluate(model, test_x, cfg, s, p, cfg["test_episodes"], args.seed, device)
                        test[p][f"{s:g}"] = res
                        entry["noisy_input"].setdefault(p, {})[f"{s:g}"] = noisy
                info = {"n_params": sum(p.numel() for p in model.parameters()), "test": test,
                        "epoch_seconds": rec["epoch_seconds"],
                        "mean_epoch_seconds": float(np.mean(rec["epoch_seconds"])) if rec["epoch_seconds"] else None,
                        "final_train_loss": float(np.mean(rec["loss"][-cfg["steps_per_epoch"]:])),
                        "val": rec["val"]}
                if model.plastic:
                    info["plasticity"] = {lay: {"eta": getattr(model, lay).eta.item(),
                                                "alpha_mean": getattr(model, lay).alpha.mean().item(),
                                                "alpha_abs_mean": getattr(model, lay).alpha.abs().mean().item()}
                                          for lay in ("code_layer", "pixel_layer")}
                entry["models"][name] = info
                records.setdefault(ds, {})[name] = rec
                print(f"[{ds}/{name}] test MSE " + ", ".join(
                    f"{p} s={s}: {test[p][s]['mse']:.4f}" for p in PROTOCOLS for s in test[p]), flush=True)
            if not dist.is_main:
                continue
            metrics["datasets"][ds] = entry
            samples = {}
            for p in PROTOCOLS:
                for s in args.sigmas:
                    cell = {}
                    for name, model in trained.items():
                        clean, noisy, o = sample_outputs(model, test_x, cfg, s, p, args.grid_examples, args.seed, device)
                        cell.update(clean=clean, noisy=noisy)
                        cell[name] = o
                    samples[(p, s)] = cell
            plot_grid(out.file(f"grid_{ds}.png"), samples, args.sigmas,
                      f"{ds}: clean / noisy / plastic / non-plastic (test images)")
    except StopRequested as exc:
        print(f"Stopped; the checkpoint is in {exc}. Continue with the same command plus --resume.")
        raise SystemExit(130)
    if not dist.is_main:
        return {"rank": dist.rank}
    plot_curves(out.file("training_curves.png"), records)
    table = markdown_table(metrics)
    out.file("results.md").write_text(table + "\n")
    path = out.write_json("metrics.json", metrics)
    print(table)
    print(f"wrote {path}, {out.file('results.md')}, grid_*.png, training_curves.png in {out.path}")
    return json.loads(path.read_text())


if __name__ == "__main__":
    main()
