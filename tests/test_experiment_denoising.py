"""End to end: experiments/denoising_autoencoder.py on tiny synthetic images (no data files), then --resume."""
from __future__ import annotations

import json
import math

import pytest
import torch

import plastic_ops
from experiments import denoising_autoencoder as dae

pytestmark = pytest.mark.skipif(not plastic_ops.extension_available(),
                                reason="the fused op (compiled extension) is not built")

TINY = ["--synthetic", "24", "--datasets", "mnist", "--batch-size", "2", "--pretrain-steps", "2", "--pretrain-batch", "4", "--k", "2", "--t-ns", "1",
        "--t-zs", "1", "--steps-per-epoch", "2", "--test-episodes", "3", "--val-episodes", "2",
        "--sigmas", "0.25,0.5", "--grid-examples", "1", "--code", "8", "--width", "4", "--impl", "fused",
        "--device", "cpu", "--quiet"]


def test_episode_layout():
    images = torch.rand(10, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    frames, targets, query, noisy = dae.make_episodes(images, 3, k=2, t_ns=2, t_zs=1, sigma=0.0, recall=True, gen=gen)
    assert frames.shape == (2 * 3 + 1, 3, 1, 28, 28) and targets.shape == (7, 3, 784)
    assert torch.equal(frames[0], frames[1]) and frames[2].abs().sum() == 0  # t_ns repeats, then a zero image
    torch.testing.assert_close(noisy, query)  # sigma 0
    shown = torch.stack([frames[0], frames[3]], 1)  # (B, k, 1, 28, 28)
    assert all(any(torch.equal(query[b], shown[b, j]) for j in range(2)) for b in range(3))
    frames, _, query, _ = dae.make_episodes(images, 3, k=2, t_ns=1, t_zs=1, sigma=0.5, recall=False, gen=gen)
    assert not any(torch.equal(query[b], frames[t, b]) for b in range(3) for t in range(4))


def test_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    m1 = dae.main(TINY + ["--epochs", "1", "--out", str(out)])
    for name in ("metrics.json", "results.md", "grid_mnist.png", "training_curves.png",
                 "checkpoints/mnist-plastic.pt", "checkpoints/mnist-baseline.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["impl"] == "fused" and metrics["config"]["T"] == 5
    models = metrics["datasets"]["mnist"]["models"]
    assert set(models) == {"plastic", "baseline"}
    for info in models.values():
        assert len(info["epoch_seconds"]) == 1 and info["mean_epoch_seconds"] > 0
        for protocol in ("recall", "denoise"):
            for sigma in ("0.25", "0.5"):
                cell = info["test"][protocol][sigma]
                assert 0 <= cell["mse"] <= 1 and math.isfinite(cell["psnr"])
                # mean per-image PSNR >= PSNR of the mean MSE (Jensen)
                assert cell["psnr"] >= 10 * math.log10(1 / cell["mse"]) - 1e-6
    assert 0 < models["plastic"]["plasticity"]["pixel_layer"]["eta"] <= 1
    noisy = metrics["datasets"]["mnist"]["noisy_input"]["denoise"]["0.5"]["mse"]
    assert 0.1 < noisy < 0.5  # sigma^2 = 0.25 up to sampling
    assert "| mnist | recall | 0.25 |" in (out / "results.md").read_text()
    assert m1["datasets"]["mnist"]["models"]["plastic"]["test"].keys() == {"recall", "denoise"}

    # --resume with one more epoch continues from the saved step instead of starting over
    state = torch.load(out / "checkpoints/mnist-plastic.pt", weights_only=False)
    assert state["step"] == 2
    m2 = dae.main(TINY + ["--epochs", "2", "--out", str(out), "--resume"])
    plastic = m2["datasets"]["mnist"]["models"]["plastic"]
    assert len(plastic["epoch_seconds"]) == 2 and len(plastic["val"]) == 2
    assert plastic["epoch_seconds"][0] == models["plastic"]["epoch_seconds"][0]
    assert torch.load(out / "checkpoints/mnist-plastic.pt", weights_only=False)["step"] == 4

    # resuming with an incompatible episode shape is refused, not silently mixed
    with pytest.raises(SystemExit, match="--resume"):
        dae.main(TINY + ["--epochs", "2", "--t-ns", "2", "--out", str(out), "--resume"])


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PLASTIC_OPS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match="MNIST/raw"):
        dae.main(["--data-root", str(tmp_path / "nothing"), "--no-download", "--datasets", "mnist",
                  "--impl", "reference", "--out", str(tmp_path / "out"), "--quiet"])


def test_plastic_starts_as_the_baseline():
    """alpha = 0 and identity weights: before training, the plastic net computes what the baseline does."""
    torch.manual_seed(0)
    plastic = dae.DenoisingAE(True, code=8, width=4, impl="reference").eval()
    baseline = dae.DenoisingAE(False, code=8, width=4).eval()
    shared = {k: v for k, v in plastic.state_dict().items() if not k.startswith(("code_layer", "pixel_layer"))}
    baseline.load_state_dict(shared, strict=False)
    frames = torch.rand(3, 2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(plastic(frames), baseline(frames), atol=1e-5, rtol=1e-5)
