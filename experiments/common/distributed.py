"""Data-parallel training under torchrun: one process per device, DistributedDataParallel averages gradients.

Every process draws the same global batch from the same seeded generator and keeps its share of the
episodes (streams), the share torch's DistributedSampler gives it: rank, rank + W, rank + 2W, ... So a
run depends on the seed and the global batch, not on the number of processes W. Launched without
torchrun (no WORLD_SIZE, or WORLD_SIZE=1) nothing here does anything: the experiments run as a single
process, exactly as before.

    dist, device = Distributed.from_env(args.device)   # init_process_group when WORLD_SIZE > 1
    ddp = dist.wrap(model)                              # forward and backward through ddp
    x = x[:, dist.shard(B)]                             # this process's episodes of the global batch
    loss_sum, = dist.sum([loss.sum()])                  # the global batch's total, on every process
    if dist.is_main: ...                                # only rank 0 writes results and checkpoints
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .results import pick_device


class Distributed:
    """This process's place in the job (rank, world size) and the few collectives the experiments use."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device=torch.device("cpu")):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = torch.device(device)
        self.backend = None
        self._owns_group = False  # whether close() ends the process group (not when the caller made it)

    # ------------------------------------------------------------------------------------------- set up

    @classmethod
    def from_env(cls, device_name: str = "auto", timeout_s: float = 1800.0):
        """(Distributed, device) from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a single process without them.

        NCCL when the device is CUDA (one GPU per process: cuda:LOCAL_RANK), gloo on the CPU. A process
        group the caller already initialized is used as it is, and left open.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            device = pick_device(device_name)
            return cls(device=device), device
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        device = pick_device(device_name)
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise SystemExit(f"error: process {rank} has LOCAL_RANK {local_rank} but this machine has "
                                 f"{torch.cuda.device_count()} GPUs: start at most one process per GPU")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        self = cls(rank, world, local_rank, device)
        if tdist.is_initialized():
            self.backend = tdist.get_backend()
        else:
            self.backend = "nccl" if device.type == "cuda" else "gloo"
            tdist.init_process_group(self.backend, timeout=datetime.timedelta(seconds=timeout_s))
            self._owns_group = True
        return self, device

    def close(self) -> None:
        if self._owns_group and tdist.is_initialized():
            # DistributedDataParallel modules no longer used can still wait in reference cycles for the
            # garbage collector; collected after the group has ended, their teardown could abort the
            # process at exit ("terminate called without an active exception"). Collect them first.
            gc.collect()
            tdist.destroy_process_group()
            self._owns_group = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ----------------------------------------------------------------------------------- data and model

    def check_divisible(self, value: int, flag: str) -> None:
        """Equal shares keep DDP's plain gradient average equal to the gradient of the global mean loss."""
        if value % self.world_size:
            raise SystemExit(f"error: {flag} {value} must be a multiple of the number of processes "
                             f"({self.world_size})")

    def shard(self, n: int) -> torch.Tensor:
        """Indices of this process's items among n (rank, rank + W, ...), without DistributedSampler's padding.

        The sampler pads its shares to equal length by repeating items; a repeated episode would count
        twice in the global mean, so the padding is dropped (shares then differ by at most one item).
        """
        sampler = DistributedSampler(range(n), num_replicas=self.world_size, rank=self.rank, shuffle=False)
        own = len(range(self.rank, n, self.world_size))
        return torch.tensor(list(sampler)[:own], dtype=torch.long)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around the model (itself when single-process).

        find_unused_parameters=False: every trained parameter of the experiments' models takes part in
        every forward, so DDP need not search the graph; frozen ones (requires_grad=False) it ignores.
        """
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)

    # ------------------------------------------------------------------------------------ collectives

    def sum(self, values) -> list[float]:
        """Sums over all processes of a few numbers (floats or 0-dim tensors), in float64, one all-reduce."""
        t = torch.stack([v.detach().reshape(()).to("cpu", torch.float64) if torch.is_tensor(v)
                         else torch.tensor(float(v), dtype=torch.float64) for v in values])
        if self.enabled:
            t = t.to(self.device)  # NCCL reduces device tensors only
            tdist.all_reduce(t)
        return t.cpu().tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on one (a Ctrl-C seen by one rank stops them all together)."""
        return self.sum([float(flag)])[0] > 0 if self.enabled else bool(flag)

    def broadcast(self, obj):
        """Rank 0's object on every process (a checkpoint read once, on rank 0's machine)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    @contextlib.contextmanager
    def scope(self):
        """Around a distributed main(): only rank 0 prints to stdout (the others would repeat it; errors
        still reach stderr), and the process group is closed at the end, also on an error."""
        try:
            if self.is_main:
                yield self
            else:
                with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                    yield self
        finally:
            self.close()


def sync_batchnorm(model: nn.Module, dist: Distributed) -> nn.Module:
    """Batch-norm statistics over the global batch, so the result does not depend on how it is split.

    torch's SyncBatchNorm on CUDA; on the CPU (which SyncBatchNorm does not support) GlobalBatchNorm.
    Their state dicts are the same as BatchNorm's: checkpoints stay interchangeable.
    """
    if not dist.enabled:
        return model
    if dist.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return GlobalBatchNorm.convert(model)


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) with a gradient: every process's input feeds every process's output, so the
    gradient of an input is the sum over processes of the output gradients."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        tdist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are summed over all processes (a CPU SyncBatchNorm).

    Each process contributes per-channel count, sum and sum of squares; a differentiable all-reduce
    gives the global mean and variance, and its backward sums the gradients of the statistics, so the
    gradient (once DDP averages it) is the single-process gradient of the global batch.
    """

    def forward(self, x):
        if not (self.training and self.track_running_stats and tdist.is_initialized()):
            return super().forward(x)
        dims = [0, 2, 3]
        count = x.new_full((1,), x.numel() / x.shape[1])
        stats = _SumOverProcesses.apply(torch.cat([count, x.sum(dims), x.pow(2).sum(dims)]))
        n, mean = stats[0], stats[1:1 + x.shape[1]] / stats[0]
        var = (stats[1 + x.shape[1]:] / n - mean.pow(2)).clamp_min(0.0)
        with torch.no_grad():  # running statistics as BatchNorm keeps them: unbiased variance, momentum
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1.0))
        shape = (1, -1, 1, 1)
        y = (x - mean.reshape(shape)) * torch.rsqrt(var + self.eps).reshape(shape)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape) if self.affine else y

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Swap every BatchNorm2d of module for a GlobalBatchNorm holding the same parameters and buffers."""
        if type(module) is nn.BatchNorm2d:
            new = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, device=module.running_mean.device,
                      dtype=module.running_mean.dtype)
            new.load_state_dict(module.state_dict())
            new.train(module.training)
            return new
        for name, child in module.named_children():
            setattr(module, name, cls.convert(child))
        return module


__all__ = ["Distributed", "sync_batchnorm", "GlobalBatchNorm"]
