"""The classification experiment's time-to-accuracy curve (--curve-every, --stop-at-acc, --time-budget) and
the driver that compares the protocols (experiments/classification_time_to_accuracy.py), on tiny synthetic
images. No assertion here depends on how fast anything runs: the clocks are faked where they matter."""
import json
import time as real_time

import pytest
import torch

import plastic_ops
from experiments import classification
from experiments import classification_time_to_accuracy as tta

TINY = ["--synthetic", "--train-limit", "200", "--test-limit", "60", "--channels", "4", "8", "--hidden", "16",
        "--paper-images", "20", "--streams", "4", "--seq-len", "5", "--epochs", "2", "--eval-subset", "40",
        "--threads", "1", "--no-progress"]

needs_extension = pytest.mark.skipif(not plastic_ops.extension_available(),
                                     reason="the compiled extension (fused op) is not built")


def _run(out, *extra):
    return classification.main(TINY + ["--out", str(out), *extra])


class FakeTime:
    """time.perf_counter and time.process_time, shifted by `offset` (which a test moves at will)."""

    def __init__(self):
        self.offset = 0.0

    def perf_counter(self):
        return real_time.perf_counter() + self.offset

    def process_time(self):
        return real_time.process_time() + self.offset


@needs_extension
@pytest.mark.parametrize("protocol", ["paper", "batched"])
def test_curve_points_read_validation_images_off_the_training_clock(tmp_path, monkeypatch, protocol):
    args = classification.parse_args(TINY + ["--out", str(tmp_path)])
    _, _, val_x, _, _, _ = classification.load_data(args)
    clock = FakeTime()
    monkeypatch.setattr(classification, "time", clock)
    real_evaluate = classification.evaluate
    curve_calls = []

    def spy(model, images, labels, *a, **k):
        if len(images) == 30:  # the curve's images: the first --curve-images validation images
            assert torch.equal(images, val_x[:30])
            curve_calls.append(1)
            clock.offset += 1000.0  # an evaluation "taking" 1000 s must not reach the training clocks
        return real_evaluate(model, images, labels, *a, **k)

    monkeypatch.setattr(classification, "evaluate", spy)
    metrics = _run(tmp_path, "--protocol", protocol, "--curve-every", "10", "--curve-images", "30")
    for key, run in metrics["runs"].items():
        curve = run["curve"]
        steps = 40 if protocol == "paper" else 2 * 10  # 2 epochs of 20 images / of 10 steps (4 x 5 images)
        assert curve["opt_steps"] == list(range(10, steps + 1, 10)), key
        assert curve["images"] == [s * (1 if protocol == "paper" else 20) for s in curve["opt_steps"]]
        assert all(0.0 <= a <= 1.0 for a in curve["acc"])
        assert curve["train_cpu_s"] == sorted(curve["train_cpu_s"])
        assert curve["train_wall_s"] == sorted(curve["train_wall_s"])
        assert run["train_cpu_seconds"] < 1000.0 and run["train_seconds"] < 1000.0, key
        assert curve["eval_cpu_s"] >= 1000.0 * len(curve["acc"]), key
        assert run["stop_reason"] is None and run["optimizer_steps"] == steps
    assert len(curve_calls) == sum(len(r["curve"]["acc"]) for r in metrics["runs"].values())


@needs_extension
def test_stop_at_accuracy_ends_training_and_still_selects_and_tests(tmp_path):
    metrics = _run(tmp_path, "--protocol", "batched", "--epochs", "6", "--lr", "0.03", "--curve-every", "2",
                   "--curve-images", "50", "--stop-at-acc", "0.4")
    for key, run in metrics["runs"].items():
        assert run["stop_reason"] == "target", key
        assert run["curve"]["acc"][-1] >= 0.4 and all(a < 0.4 for a in run["curve"]["acc"][:-1])
        assert run["optimizer_steps"] == run["curve"]["opt_steps"][-1] < 60
        # the epoch the stop falls in (a fraction when it is cut short) is validated; selection and the
        # test set then work as after a whole run
        epochs = run["history"]["epoch"]
        assert epochs[-1] == pytest.approx(run["optimizer_steps"] / 10, abs=1e-3)
        for t in run["tests"].values():
            assert t["selected_epoch"] in epochs and 0.0 <= t["selected_test_acc"] <= 1.0


@needs_extension
def test_time_budget_stops_after_the_unit_that_spends_it(tmp_path):
    metrics = _run(tmp_path, "--protocol", "paper,batched", "--time-budget", "1e-9")
    for key, run in metrics["runs"].items():
        assert run["stop_reason"] == "budget" and run["optimizer_steps"] == 1, key


@needs_extension
def test_interrupted_curve_resumes_into_the_same_curve(tmp_path):
    opts = ["--protocol", "batched", "--curve-every", "3", "--curve-images", "20", "--models", "plastic"]
    whole = _run(tmp_path / "whole", *opts)
    stopped = _run(tmp_path / "cut", *opts, "--stop-after", "7")
    assert stopped["stopped"]
    resumed = _run(tmp_path / "cut", *opts, "--resume")
    a, b = whole["runs"]["batched/plastic"]["curve"], resumed["runs"]["batched/plastic"]["curve"]
    assert a["opt_steps"] == b["opt_steps"] and a["images"] == b["images"] and a["acc"] == b["acc"]


def test_curve_options_are_checked(tmp_path):
    for bad, match in ((["--stop-at-acc", "0.9"], "needs --curve-every"),
                       (["--curve-every", "5", "--stop-at-acc", "1.5"], "stop-at-acc"),
                       (["--curve-every", "-1"], "curve-every"), (["--curve-images", "0"], "curve-images"),
                       (["--time-budget", "-1"], "time-budget"), (["--time-budget", "nan"], "time-budget")):
        with pytest.raises(SystemExit):
            classification.main(["--synthetic", "--out", str(tmp_path), *bad])


def test_first_reached_reads_the_first_point_at_or_above_the_threshold():
    curve = {"acc": [0.5, 0.97, 0.96, 0.99], "train_cpu_s": [1.0, 2.0, 3.0, 4.0], "train_wall_s": [1.5, 2.5, 3.5, 4.5],
             "opt_steps": [10, 20, 30, 40], "images": [100, 200, 300, 400]}
    assert tta.first_reached(curve, 0.97) == {"cpu_s": 2.0, "wall_s": 2.5, "steps": 20, "images": 200}
    assert tta.first_reached(curve, 0.99)["steps"] == 40
    assert tta.first_reached(curve, 0.995) is None


@needs_extension
def test_driver_runs_both_protocols_and_writes_the_table(tmp_path):
    data = " ".join(a for a in TINY if a not in ("--threads", "1", "--no-progress"))
    argv = ["--out", str(tmp_path), "--seeds", "0", "1", "--thresholds", "0.3", "0.999",
            "--paper-curve-every", "10", "--batched-curve-every", "5", "--curve-images", "50",
            "--paper-args", "", "--data-args", data]
    table = tta.main(argv)
    assert {(r["protocol"], r["model"]) for r in table} == {(p, m) for p in ("paper", "batched")
                                                             for m in ("nonplastic", "plastic")}
    for row in table:
        assert row["seeds"] == [0, 1]
        for s in row["thresholds"]:
            assert s["seeds"] == 2 and 0 <= s["reached"] <= 2
            hits = [h for h in s["per_seed"] if h is not None]
            assert all(h["cpu_s"] >= 0 and h["steps"] >= 1 for h in hits)
    for name in ("table.md", "table.json", "time_to_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "table.json").read_text())["thresholds"] == [0.3, 0.999]
    # a second call finds every run finished and trains nothing
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("report/*/seed*/metrics.json")}
    tta.main(argv)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("report/*/seed*/metrics.json")} == before
