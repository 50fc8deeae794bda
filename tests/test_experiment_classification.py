"""End-to-end test of experiments/classification.py on tiny synthetic images (seconds, no data files)."""
import json
import math

import pytest
import torch

import plastic_ops
from experiments import classification

TINY = ["--synthetic", "--train-limit", "200", "--test-limit", "60", "--channels", "4", "8", "--hidden", "16",
        "--paper-images", "20", "--streams", "4", "--seq-len", "5", "--epochs", "2", "--eval-subset", "40",
        "--threads", "1", "--no-progress"]

needs_extension = pytest.mark.skipif(not plastic_ops.extension_available(),
                                     reason="the compiled extension (fused op) is not built")


def _run(out, *extra, impl="fused"):
    return classification.main(TINY + ["--impl", impl, "--out", str(out), *extra])


def _finals(metrics):
    return {key: {mode: (t["final_acc"], t["final_loss"]) for mode, t in r["tests"].items()}
            for key, r in metrics["runs"].items()}


@needs_extension
def test_end_to_end_outputs_and_resume(tmp_path):
    full = _run(tmp_path / "full", "--protocol", "paper,batched")

    out = tmp_path / "full"
    for name in ("metrics.json", "table.md", "curves_paper.png", "curves_batched.png", "checkpoint.pt",
                 "model_paper_plastic.pt", "model_paper_plastic_selected.pt", "model_batched_nonplastic.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"paper/nonplastic", "paper/plastic", "batched/nonplastic", "batched/plastic"}
    assert {k: metrics["data"][k] for k in ("dataset", "train_images", "val_images", "test_images")} == {
        "dataset": "synthetic", "train_images": 200, "val_images": 50, "test_images": 60}
    assert metrics["impl"] == "fused" and "environment" in metrics and metrics["seed"] == 0
    for key, r in metrics["runs"].items():
        modes = {"reset", "carry"} if key.endswith("/plastic") else {"plain"}
        assert set(r["tests"]) == modes and set(r["history"]["val"]) == modes and "test" not in r["history"]
        assert r["history"]["epoch"] == [1, 2] and len(r["history"]["train_loss"]) == 2
        assert r["selection_mode"] == ("reset" if key.endswith("/plastic") else "plain")
        curve = r["history"]["val"][r["selection_mode"]]["acc"]
        for t in r["tests"].values():
            assert 0.0 <= t["final_acc"] <= 1.0 and 0.0 <= t["selected_test_acc"] <= 1.0
            assert math.isfinite(t["final_loss"]) and t["final_loss"] > 0
            # the selected epoch is the first one with the best validation accuracy of the selection mode
            assert t["selected_epoch"] == 1 + curve.index(max(curve))
        assert r["wall_seconds"] >= r["train_seconds"] > 0
        if key.endswith("/plastic"):
            assert 0.0 <= r["eta"] <= 1.0
    # 4 streams x 5 images = 20 images per step, 200 training images: 10 steps per epoch, 2 epochs
    assert len(metrics["runs"]["batched/plastic"]["history"]["step_loss"]) == 20
    assert metrics["runs"]["batched/plastic"]["optimizer_steps"] == 20
    assert metrics["runs"]["paper/plastic"]["optimizer_steps"] == 2 * 20  # one per image
    table = (out / "table.md").read_text()
    assert table.count("| paper |") == 3 and table.count("| batched |") == 3

    # Stop twice (in the paper protocol, then mid-epoch in the batched one) and resume: same results.
    part = tmp_path / "part"
    assert _run(part, "--protocol", "paper,batched", "--stop-after", "3")["stopped"]
    assert (part / "checkpoint.pt").is_file() and not (part / "metrics.json").exists()
    assert _run(part, "--protocol", "paper,batched", "--resume", "--stop-after", "9")["stopped"]
    state = torch.load(part / "checkpoint.pt", weights_only=False)
    assert state["current"]["protocol"] == "batched" and 0 < state["current"]["step"] < 10
    resumed = _run(part, "--protocol", "paper,batched", "--resume")
    a, b = _finals(full), _finals(resumed)
    assert a.keys() == b.keys()
    for key in a:
        for mode in a[key]:
            assert b[key][mode] == pytest.approx(a[key][mode], rel=1e-4, abs=1e-5), (key, mode)

    # A checkpoint is not resumed under options that change the results.
    with pytest.raises(SystemExit, match="other options"):
        _run(part, "--protocol", "paper,batched", "--resume", "--hidden", "8")


def test_reference_impl_paper_protocol(tmp_path):
    metrics = _run(tmp_path, "--protocol", "paper", "--models", "plastic", "--plastic-test", "carry",
                   impl="reference")
    r = metrics["runs"]["paper/plastic"]
    assert set(r["tests"]) == {"carry"} and len(r["history"]["epoch"]) == 2
    assert (tmp_path / "curves_paper.png").is_file()


@needs_extension
@pytest.mark.parametrize("protocol,steps_per_epoch", [("paper", 20), ("paper-sequence", 1), ("batched", 10)])
def test_optimizer_steps_per_protocol(tmp_path, monkeypatch, protocol, steps_per_epoch):
    """paper: one Adam step per image (20 images an epoch); paper-sequence: one per epoch; batched: one per
    B x T images. Counted at torch's Adam.step itself, not by the experiment's own counter."""
    calls = []
    real_step = torch.optim.Adam.step

    def counting_step(self, *a, **k):
        calls.append(1)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    metrics = _run(tmp_path, "--protocol", protocol, "--models", "plastic", "--plastic-test", "reset")
    assert len(calls) == 2 * steps_per_epoch
    assert metrics["runs"][f"{protocol}/plastic"]["optimizer_steps"] == 2 * steps_per_epoch


@needs_extension
def test_paper_protocol_carries_the_trace_from_image_to_image(tmp_path, monkeypatch):
    """Each training image of an epoch gets the trace left by the one before it (zero for the first)."""
    seen = []
    real = classification.Run.train_image

    def spy(self, image, label, trace, lr):
        loss, out = real(self, image, label, trace, lr)
        seen.append((trace, out))
        return loss, out

    monkeypatch.setattr(classification.Run, "train_image", spy)
    _run(tmp_path, "--protocol", "paper", "--models", "plastic", "--plastic-test", "reset", "--epochs", "1")
    assert len(seen) == 20 and seen[0][0] is None
    for (_, out), (given, _) in zip(seen, seen[1:]):
        assert given is out and not given.requires_grad and given.abs().sum() > 0


@needs_extension
def test_validation_split_and_the_test_set_used_once_per_figure(tmp_path, monkeypatch):
    """Every per-epoch evaluation sees validation images only; the test set is evaluated twice per model and
    protocol (the selected epoch, the last one), and the validation images are neither trained on nor tested."""
    args = classification.parse_args(TINY + ["--out", str(tmp_path)])
    train_x, _, val_x, _, test_x, _ = classification.load_data(args)
    assert len(train_x) == 200 and len(val_x) == 50 and len(test_x) == 60
    flat = lambda x: {tuple(r.tolist()) for r in x.reshape(len(x), -1)}  # noqa: E731
    assert not flat(val_x) & flat(train_x) and not flat(val_x) & flat(test_x)

    calls = []
    real = classification.evaluate

    def spy(model, images, labels, *a, **k):
        if torch.equal(images, test_x):
            calls.append("test")
        else:  # the per-epoch subset: the first --eval-subset validation images
            assert torch.equal(images, val_x[:40]), "a per-epoch evaluation on images that are not validation"
            calls.append("val")
        return real(model, images, labels, *a, **k)

    monkeypatch.setattr(classification, "evaluate", spy)
    metrics = _run(tmp_path, "--protocol", "paper,batched", "--models", "both")
    assert calls.count("val") == 4 * 2  # 2 protocols x 2 models x 2 epochs
    assert calls.count("test") == 4 * 2  # per model: the selected epoch and the last one
    assert all(len(r["history"]["val"][r["selection_mode"]]["acc"]) == 2 for r in metrics["runs"].values())


def test_seed_rows_pair_plastic_with_nonplastic():
    runs = {"paper/nonplastic": {"protocol": "paper", "tests": {"plain": {"selected_test_acc": 0.9, "final_acc": 0.8}}},
            "paper/plastic": {"protocol": "paper", "tests": {"reset": {"selected_test_acc": 0.91, "final_acc": 0.82},
                                                             "carry": {"selected_test_acc": 0.92, "final_acc": 0.83}}}}
    rows = classification.seed_rows({"runs": runs})
    assert [r["quantity"] for r in rows] == ["paper: test accuracy, epoch selected on validation (higher is better)",
                                             "paper: test accuracy, last epoch (higher is better)"]
    assert rows[0]["values"] == {"nonplastic": 0.9, "plastic (reset)": 0.91, "plastic (carry)": 0.92}
    assert rows[1]["pairs"] == [("plastic (reset)", "nonplastic"), ("plastic (carry)", "nonplastic")]


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit):
        classification.main(["--synthetic", "--seq-len", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        classification.main(["--synthetic", "--protocol", "paper,nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        classification.main(["--synthetic", "--val-images", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="longer than"):
        classification.main(["--synthetic", "--train-limit", "5", "--seq-len", "10", "--impl", "reference",
                             "--out", str(tmp_path)])
