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
        "--sigmas", "0.25,1", "--grid-examples", "1", "--code", "8", "--width", "4", "--impl", "fused",
        "--device", "cpu", "--quiet", "--threads", "1"]
TABLE = dae.corruptions([0.0, 1.0], "half")  # noise 0, noise 1, occlusion of half


def test_episode_layout():
    images = torch.rand(10, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    frames, targets, query, corrupted = dae.make_episodes(images, 3, k=2, t_ns=2, t_zs=1, which=0, recall=True,
                                                          gen=gen, table=TABLE)
    assert frames.shape == (2 * 3 + 1, 3, 1, 28, 28) and targets.shape == (7, 3, 784)
    assert torch.equal(frames[0], frames[1]) and frames[2].abs().sum() == 0  # t_ns repeats, then a blank
    torch.testing.assert_close(corrupted, query)  # sigma 0
    assert torch.equal(frames[-1], corrupted) and torch.equal(targets[-1], query.reshape(3, 784))
    shown = torch.stack([frames[0], frames[3]], 1)  # (B, k, 1, 28, 28)
    assert all(any(torch.equal(query[b], shown[b, j]) for j in range(2)) for b in range(3))
    frames, _, query, _ = dae.make_episodes(images, 3, k=2, t_ns=1, t_zs=1, which=1, recall=False, gen=gen,
                                            table=TABLE)
    assert not any(torch.equal(query[b], frames[t, b]) for b in range(3) for t in range(4))


def test_occlusion_hides_exactly_one_half():
    images = torch.rand(64, 1, 28, 28) + 0.5  # no zero pixel of its own
    out = dae.corrupt(images, torch.full((64,), 2), TABLE, torch.Generator().manual_seed(1))
    hidden = out == 0
    assert (hidden.flatten(1).sum(1) == 28 * 14).all()  # half of the pixels, for every image
    halves = {(bool(h[0, 0, 0]), bool(h[0, 27, 27]), bool(h[0, 0, 27])) for h in hidden}
    assert len(halves) == 4  # top, bottom, left and right all drawn
    kept = ~hidden
    assert torch.equal(out[kept], images[kept])  # the other half untouched, no noise added


def test_memory_stores_the_clean_frames():
    """The memory's trace after the shown frames is the Hebbian sum of the clean, centred frames (alpha = 0:
    its output is the frame itself), whatever the decoder does."""
    torch.manual_seed(0)
    model = dae.DenoisingAE(True, code=8, width=4, impl="reference", eta_init=0.5).eval()
    frames = torch.rand(3, 2, 1, 28, 28)
    c = frames.reshape(3, 2, 784)
    c = c - c.mean(-1, keepdim=True)
    _, state = model.memory(c)
    trace = state.trace
    expected = torch.zeros(2, 784, 784)
    for t in range(3):
        expected = 0.5 * expected + 0.5 * c[t, :, :, None] * c[t, :, None, :]
    torch.testing.assert_close(trace, expected, atol=1e-5, rtol=1e-4)
    assert not model.memory.weight.requires_grad


def test_recall_reads_back_a_stored_image():
    """With alpha > 0, an occluded query of a shown image moves the output towards that image."""
    torch.manual_seed(0)
    model = dae.DenoisingAE(True, code=8, width=4, impl="reference", alpha_init=0.05, eta_init=0.5).eval()
    images = (torch.rand(2, 1, 28, 28) > 0.7).float()
    query = images[0].clone()
    query[:, 14:] = 0
    frames = torch.stack([images[0], images[1], query])[:, None]  # (T=3, B=1, 1, 28, 28)
    with torch.no_grad():
        base = torch.sigmoid(model.logits(query[None]))[0]
        out = model(frames)[-1, 0]
    shift = out - base
    stored = images[0].reshape(784) - images[0].mean()
    assert torch.dot(shift, stored) > 0 and torch.dot(shift[392:], stored[392:]) > 0  # also the hidden half


def test_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    m1 = dae.main(TINY + ["--epochs", "1", "--out", str(out)])
    for name in ("metrics.json", "results.md", "grid_mnist.png", "training_curves.png",
                 "checkpoints/mnist-plastic.pt", "checkpoints/mnist-baseline.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["impl"] == "fused" and metrics["config"]["T"] == 5 and metrics["seed"] == 0
    assert metrics["config"]["corruptions"] == ["noise-0.25", "noise-1", "occlude-half"]
    entry = metrics["datasets"]["mnist"]
    assert (entry["n_train"], entry["n_val"], entry["n_test"]) == (18, 6, 12)  # 24 = 18 + the last 6
    models = entry["models"]
    assert set(models) == {"plastic", "baseline"}
    for info in models.values():
        assert len(info["epoch_seconds"]) == 1 and info["mean_epoch_seconds"] > 0
        assert info["selected_epoch"] == 1 and len(info["val"]) == 1
        for which in ("test", "test_final"):
            for protocol in ("recall", "denoise"):
                for key in metrics["config"]["corruptions"]:
                    cell = info[which][protocol][key]
                    for part in ("model", "input", "ceiling"):
                        assert 0 <= cell[part]["mse"] and math.isfinite(cell[part]["psnr"])
                    assert cell["model"]["mse"] <= 1
                    # mean per-image PSNR >= PSNR of the mean MSE (Jensen)
                    assert cell["model"]["psnr"] >= 10 * math.log10(1 / cell["model"]["mse"]) - 1e-6
    assert 0 < models["plastic"]["plasticity"]["final"]["eta"] <= 1
    noisy = models["plastic"]["test"]["denoise"]["noise-1"]["input"]["mse"]
    assert 0.5 < noisy < 1.6  # sigma^2 = 1 up to sampling
    # the same test episodes for both variants: the corrupted input's error is the same
    assert noisy == models["baseline"]["test"]["denoise"]["noise-1"]["input"]["mse"]
    results = (out / "results.md").read_text()
    assert "| mnist | recall | occlude-half |" in results and "clean query" in results
    assert m1["datasets"]["mnist"]["models"]["plastic"]["test"].keys() == {"recall", "denoise"}

    # --resume with one more epoch continues from the saved step instead of starting over
    state = torch.load(out / "checkpoints/mnist-plastic.pt", weights_only=False)
    assert state["step"] == 2 and state["best_model"] is not None
    m2 = dae.main(TINY + ["--epochs", "2", "--out", str(out), "--resume"])
    plastic = m2["datasets"]["mnist"]["models"]["plastic"]
    assert len(plastic["epoch_seconds"]) == 2 and len(plastic["val"]) == 2
    assert plastic["epoch_seconds"][0] == models["plastic"]["epoch_seconds"][0]
    assert plastic["selected_epoch"] == 1 + min(range(2), key=lambda i: plastic["val"][i]["mse"])
    assert torch.load(out / "checkpoints/mnist-plastic.pt", weights_only=False)["step"] == 4

    # resuming with an incompatible episode shape is refused, not silently mixed
    with pytest.raises(SystemExit, match="--resume"):
        dae.main(TINY + ["--epochs", "2", "--t-ns", "2", "--out", str(out), "--resume"])


def test_same_seed_same_metrics(tmp_path):
    """Deterministic on the CPU: two runs with the same seed give identical numbers; another seed does not."""
    strip = lambda m: {ds: {name: {k: v for k, v in info.items() if "seconds" not in k}  # noqa: E731
                            for name, info in d["models"].items()} for ds, d in m["datasets"].items()}
    args = TINY + ["--epochs", "1", "--threads", "2"]
    a = dae.main(args + ["--out", str(tmp_path / "a")])
    b = dae.main(args + ["--out", str(tmp_path / "b")])
    assert strip(a) == strip(b)
    a_rec = torch.load(tmp_path / "a/checkpoints/mnist-plastic.pt", weights_only=False)["record"]["loss"]
    b_rec = torch.load(tmp_path / "b/checkpoints/mnist-plastic.pt", weights_only=False)["record"]["loss"]
    assert a_rec == b_rec
    c = dae.main(args + ["--seed", "1", "--out", str(tmp_path / "c")])
    assert strip(c) != strip(a)
    assert not torch.are_deterministic_algorithms_enabled()  # the setting is the run's alone


def test_validation_images_only_in_the_per_epoch_curve(tmp_path, monkeypatch):
    """The per-epoch evaluation reads the validation split (the last images of the training file, never
    trained on); the test images are read twice per variant (selected epoch, last epoch), after training."""
    args = dae.build_parser().parse_args(TINY + ["--out", str(tmp_path)])
    train_x, val_x, test_x = dae.load("mnist", args)
    calls = []
    real_eval, real_make = dae.evaluate_all, dae.make_episodes

    def spy_eval(model, images, *a, **k):
        calls.append("test" if torch.equal(images, test_x) else "val" if torch.equal(images, val_x) else "other")
        return real_eval(model, images, *a, **k)

    def spy_make(images, *a, **k):
        if torch.is_grad_enabled():  # training episodes: the training images only
            assert torch.equal(images, train_x)
        return real_make(images, *a, **k)

    monkeypatch.setattr(dae, "evaluate_all", spy_eval)
    monkeypatch.setattr(dae, "make_episodes", spy_make)
    dae.main(TINY + ["--epochs", "2", "--out", str(tmp_path)])
    assert calls == ["val", "val", "test", "test"] * 2  # per variant: 2 epochs, then selected and final


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PLASTIC_OPS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit, match="MNIST/raw"):
        dae.main(["--data-root", str(tmp_path / "nothing"), "--no-download", "--datasets", "mnist",
                  "--impl", "reference", "--out", str(tmp_path / "out"), "--quiet"])


def test_plastic_starts_as_the_baseline():
    """alpha = 0: before training, the plastic net computes exactly what the baseline does."""
    torch.manual_seed(0)
    plastic = dae.DenoisingAE(True, code=8, width=4, impl="reference").eval()
    baseline = dae.DenoisingAE(False, code=8, width=4).eval()
    shared = {k: v for k, v in plastic.state_dict().items() if not k.startswith("memory")}
    baseline.load_state_dict(shared)
    frames = torch.rand(3, 2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(plastic(frames), baseline(frames))


def test_seed_rows_pair_plastic_with_baseline():
    cell = lambda m, c: {"model": {"mse": m}, "ceiling": {"mse": c}, "input": {"mse": 1.0}}  # noqa: E731
    metrics = {"config": {"corruptions": ["occlude-half"]},
               "datasets": {"mnist": {"models": {
                   "plastic": {"test": {p: {"occlude-half": cell(0.02, 0.01)} for p in dae.PROTOCOLS}},
                   "baseline": {"test": {p: {"occlude-half": cell(0.05, 0.015)} for p in dae.PROTOCOLS}}}}}}
    rows = dae.seed_rows(metrics)
    assert [r["quantity"] for r in rows] == ["mnist, recall, occlude-half: test MSE (lower is better)",
                                             "mnist, denoise, occlude-half: test MSE (lower is better)"]
    assert rows[0]["values"] == {"plastic": 0.02, "baseline": 0.05, "plastic, clean query": 0.01,
                                 "baseline, clean query": 0.015}
    assert rows[0]["pairs"] == [("plastic", "baseline")]
