"""Data-parallel training (torch.distributed, gloo on the CPU): sharding, DDP's reduction of the plastic op's
gradients, and the three experiments under torchrun with 2 processes against 1 process, same seed and
global batch."""
from __future__ import annotations

import copy
import gc
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from experiments import classification, denoising_autoencoder as dae, pattern_memorization as pm
from experiments.common.distributed import Distributed, GlobalBatchNorm
from plastic_ops.nn import PlasticLinear, PlasticRNN

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not tdist.is_available() or not tdist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


# ------------------------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 5, 8, 13])
def test_shards_cover_the_batch_once(world, n):
    shards = [Distributed(rank, world).shard(n).tolist() for rank in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))  # every item exactly once, no padding
    for rank, s in enumerate(shards):
        padded = list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False))
        assert s == padded[:len(s)]  # the sampler's own split


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist, device = Distributed.from_env("cpu")
    assert not dist.enabled and dist.is_main and device == torch.device("cpu")
    model = torch.nn.Linear(2, 2)
    assert dist.wrap(model) is model and dist.broadcast({"a": 1}) == {"a": 1}
    assert dist.sum([torch.tensor(1.5), 2.0]) == [1.5, 2.0]
    assert not tdist.is_initialized()
    with pytest.raises(SystemExit, match="--batch-size 3 must be a multiple"):
        Distributed(0, 2).check_divisible(3, "--batch-size")


# -------------------------------------------------------------- DDP and the op's custom autograd

def _run_bounded(cmd, timeout, **kw) -> subprocess.CompletedProcess:
    """subprocess.run that, on a timeout, kills torchrun's workers too (they are in its session)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# (layer, alpha shape, rule, learned eta): every alpha shape, both forms, both rules
GRAD_CASES = [("rnn", "synapse", "hebb", True), ("rnn", "input", "oja", True), ("rnn", "output", "hebb", True),
              ("rnn", "scalar", "hebb", False), ("linear", "synapse", "oja", True), ("linear", "output", "hebb", True),
              ("linear", "scalar", "hebb", True), ("linear", "input", "hebb", False)]


def _make_layer(kind, alpha, rule, learn_eta):
    torch.manual_seed(0)
    if kind == "rnn":
        layer = PlasticRNN(5, alpha=alpha, rule=rule, learn_eta=learn_eta, bias=True, checkpoint_every=2,
                           init_std=0.3, dtype=torch.float64)
    else:
        layer = PlasticLinear(4, 5, alpha=alpha, rule=rule, learn_eta=learn_eta, activation="tanh", clip=2.0,
                              checkpoint_every=2, init_std=0.3, dtype=torch.float64)
    with torch.no_grad():
        if learn_eta:
            layer.eta.fill_(0.2)
    return layer


def _loss(out, shard_size):
    """Mean over the global batch of a function of the outputs and of the final trace (both gradient paths)."""
    y, trace = out[0], (out[1] if isinstance(out[1], torch.Tensor) else out[1].trace)
    per_episode = y.pow(2).mean(dim=(0, 2)) + 0.5 * trace.pow(2).mean(dim=(1, 2))
    return per_episode.sum() / shard_size  # the local mean: DDP's average of equal shares is the global mean


def _check_plastic_op(rank, world) -> dict:
    """DDP over the plastic layers against one process with the whole batch; returns what was checked."""
    dist = Distributed(rank, world)
    B, T = 4, 5
    report = {}
    for case in GRAD_CASES:
        kind, _, _, learn_eta = case
        layer = _make_layer(*case)
        single = copy.deepcopy(layer)
        ddp = DistributedDataParallel(layer, find_unused_parameters=False)
        mine = dist.shard(B)
        n_in = 5 if kind == "rnn" else 4
        for it in range(2):  # the second backward uses the buckets DDP rebuilt after the first
            g = torch.Generator().manual_seed(10 + it)
            x = torch.randn(T, B, n_in, generator=g, dtype=torch.float64)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                layer.zero_grad(set_to_none=True)
                _loss(ddp(x[:, mine]), len(mine)).backward()
            single.zero_grad(set_to_none=True)
            _loss(single(x), B).backward()
            for (name, p), q in zip(layer.named_parameters(), single.parameters()):
                assert p.grad is not None, (case, name)
                assert p.grad.shape == p.shape and p.grad.is_contiguous(), (case, name)
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=f"{case} {name}")
            assert not [w for w in caught if "stride" in str(w.message)], [str(w.message) for w in caught]
        names = {n for n, p in layer.named_parameters()}
        assert ("eta" in names) == learn_eta
        report[" ".join(map(str, case))] = sorted(names)
    return report


def _check_global_batchnorm(rank, world) -> dict:
    """GlobalBatchNorm under DDP against BatchNorm in one process with the whole batch."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                              torch.nn.Conv2d(3, 2, 3)).double()
    single = copy.deepcopy(net)
    ddp = DistributedDataParallel(GlobalBatchNorm.convert(net))
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mine = Distributed(rank, world).shard(6)
    ddp(x[mine]).pow(2).mean().backward()
    single(x).pow(2).mean().backward()
    for (name, p), q in zip(net.named_parameters(), single.parameters()):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
    for (name, b), c in zip(net.named_buffers(), single.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-12, msg=name)
    return {"buffers": sorted(n for n, _ in net.named_buffers())}


def _grad_worker(rank, world, store_file, result_dir):
    torch.set_num_threads(1)
    # a file store: no TCP port to pick in advance, which another process could take first
    tdist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        report = {"plastic_op": _check_plastic_op(rank, world), "batchnorm": _check_global_batchnorm(rank, world)}
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        gc.collect()  # the DDP modules of the checks first (Distributed.close says why)
        tdist.destroy_process_group()


def test_ddp_gradients_match_one_process(tmp_path):
    """2 processes (gloo), each with half of the batch, against 1 process with all of it, in float64:
    - DDP (find_unused_parameters=False) over the plastic op's custom autograd: w, every alpha shape, a
      learned eta, the bias, through the outputs and the final trace, before and after DDP rebuilds its
      gradient buckets, with no gradient-layout warning;
    - GlobalBatchNorm (the CPU batch norm over the global batch): gradients and running statistics."""
    mp.spawn(_grad_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0] == reports[1] and len(reports[0]["plastic_op"]) == len(GRAD_CASES)
    assert "1.running_var" in reports[0]["batchnorm"]["buffers"]


# ------------------------------------------------------------------------- the experiments, 2 vs 1

# Runs experiments' main() one after the other in each torchrun process, in one process group (torchrun's
# store keeps the keys of a destroyed group, which a new one would read). A run's third field names the
# rank that receives SIGINT (what Ctrl-C sends) in its second training step: one process alone asks to stop.
DRIVER = textwrap.dedent("""
    import gc, importlib, json, os, signal, sys
    import torch.distributed
    sys.path.insert(0, sys.argv[1])
    torch.distributed.init_process_group("gloo")
    rank = int(os.environ["RANK"])
    for module, argv, interrupted_rank in json.loads(sys.argv[2]):
        mod = importlib.import_module(module)
        real, calls = getattr(mod, "episode_loss", None), []

        def interrupting_loss(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return real(*a, **k)

        if interrupted_rank == rank:
            mod.episode_loss = interrupting_loss
        try:
            result = mod.main(argv)
        finally:
            if real is not None:
                mod.episode_loss = real
        # one write() of under PIPE_BUF bytes: atomic on the shared pipe, so the other rank's output can come
        # before or after the record but never inside it (print() writes its arguments one by one)
        sys.stdout.flush()
        os.write(1, f"RESULT {rank} {module} {'stopped' if result is None else 'done'}\\n".encode())
    gc.collect()  # the experiments' DDP modules before the group ends (Distributed.close says why)
    torch.distributed.destroy_process_group()
""")

PM = ["--pattern-size", "12", "--num-patterns", "3", "--pres-steps", "2", "--gap-steps", "1", "--test-steps", "2",
      "--eval-episodes", "6", "--eval-batch", "4", "--checkpoint-every", "100", "--threads", "1", "--no-progress",
      "--seed", "3", "--batch-size", "4", "--lr", "0.01", "--episodes", "20"]
# 4 streams of 6 images, 102 images: 4 full steps and a last one with a single stream (fewer than processes)
CL = ["--synthetic", "--train-limit", "102", "--test-limit", "30", "--channels", "4", "8", "--hidden", "16",
      "--streams", "4", "--seq-len", "6", "--epochs", "1", "--eval-subset", "20", "--threads", "1", "--no-progress",
      "--protocol", "batched", "--lr", "0.01"]
DAE = ["--synthetic", "24", "--datasets", "mnist", "--batch-size", "4", "--pretrain-steps", "3", "--pretrain-batch",
       "4", "--k", "2", "--t-ns", "1", "--t-zs", "1", "--steps-per-epoch", "3", "--epochs", "1", "--test-episodes", "3",
       "--val-episodes", "2", "--sigmas", "0.25,0.5", "--grid-examples", "1", "--code", "8", "--width", "4",
       "--impl", "fused", "--device", "cpu", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One torchrun launch (2 CPU processes, gloo) runs all the experiments; returns their output folders."""
    root = tmp_path_factory.mktemp("torchrun")
    out = {name: root / name for name in ("pm", "cl", "dae")}
    runs = [("experiments.pattern_memorization", PM + ["--out", str(out["pm"])], 1),  # Ctrl-C on rank 1
            ("experiments.pattern_memorization", PM + ["--out", str(out["pm"]), "--resume"], None),
            ("experiments.classification", CL + ["--out", str(out["cl"])], None),
            ("experiments.denoising_autoencoder", DAE + ["--out", str(out["dae"])], None)]
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(driver), str(REPO), json.dumps(runs)]
    proc = _run_bounded(cmd, 240, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out["log"] = proc.stdout
    return out


def _metrics(folder):
    return json.loads((Path(folder) / "metrics.json").read_text())


def test_launch_ran_everything_on_both_ranks(two_processes):
    # the ranks share one stdout pipe, so a record may follow another rank's unfinished line: search the
    # whole log, not line starts
    lines = re.findall(r"(RESULT) ([01]) (experiments\.\w+) (done|stopped)", two_processes["log"])
    assert len(lines) == 8 and {(r, m) for _, r, m, _ in lines} == {
        (r, m) for r in "01" for m in ("experiments.pattern_memorization", "experiments.classification",
                                       "experiments.denoising_autoencoder")}


def test_pattern_memorization_two_processes_match_one(two_processes, tmp_path):
    """Stopped by a Ctrl-C on rank 1 only, resumed, then compared with one process straight through."""
    two = _metrics(two_processes["pm"])
    one = pm.main(PM + ["--out", str(tmp_path)])
    assert two["world_size"] == 2 and two["per_process_batch"] == 2 and two["batch_size"] == 4
    assert one["world_size"] == 1 and one["per_process_batch"] == 4
    assert two["history"]["episodes"] == one["history"]["episodes"] == [4, 8, 12, 16, 20]
    for key in ("loss", "bit_error"):
        assert two["history"][key] == pytest.approx(one["history"][key], rel=1e-5, abs=1e-7), key
    a = torch.load(two_processes["pm"] / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 5
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6, msg=k)
    assert two["eval"]["bit_error"] == pytest.approx(one["eval"]["bit_error"], abs=1e-6)
    # the interrupted launch stopped both ranks at step 2 and printed the resume hint
    assert "Resuming from" in two_processes["log"] and "at episode 8" in two_processes["log"]


def test_classification_two_processes_match_one(two_processes, tmp_path):
    two = _metrics(two_processes["cl"])
    one = classification.main(CL + ["--out", str(tmp_path)])
    assert two["world_size"] == 2 and two["per_process_batch"] == {"batched": 2}
    assert one["world_size"] == 1 and one["per_process_batch"] == {"batched": 4}
    for key in one["runs"]:
        a, b = two["runs"][key]["history"]["step_loss"], one["runs"][key]["history"]["step_loss"]
        assert [c for _, c in a] == [c for _, c in b] == [24, 24, 24, 24, 6]
        assert [l for l, _ in a] == pytest.approx([l for l, _ in b], rel=1e-5), key
        for mode, t in one["runs"][key]["tests"].items():
            assert two["runs"][key]["tests"][mode]["final_loss"] == pytest.approx(t["final_loss"], rel=1e-4)


def test_denoising_two_processes_match_one(two_processes, tmp_path):
    two = _metrics(two_processes["dae"])
    one = dae.main(DAE + ["--out", str(tmp_path)])
    assert two["world_size"] == 2 and two["per_process_batch"] == 2 and one["per_process_batch"] == 4
    for name, info in one["datasets"]["mnist"]["models"].items():
        other = two["datasets"]["mnist"]["models"][name]
        assert other["final_train_loss"] == pytest.approx(info["final_train_loss"], rel=1e-5), name
        a = torch.load(two_processes["dae"] / "checkpoints" / f"mnist-{name}.pt", weights_only=False)["record"]
        b = torch.load(tmp_path / "checkpoints" / f"mnist-{name}.pt", weights_only=False)["record"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and len(a["loss"]) == 3, name


def test_bad_split_is_refused(tmp_path):
    """A global batch the processes cannot share equally: a clear error from every rank, no hang."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "experiments.pattern_memorization", "--batch-size", "3", "--out", str(tmp_path)]
    proc = _run_bounded(cmd, 120, cwd=REPO, env=env)
    assert proc.returncode != 0 and "--batch-size 3 must be a multiple of the number of processes (2)" in proc.stderr
