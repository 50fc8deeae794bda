"""The pattern-memorization experiment: episode generator, and the script end to end on a tiny configuration."""
import json
import math

import pytest
import torch

import plastic_ops
from experiments import pattern_memorization as pm
from experiments import time_to_accuracy as driver

needs_fused = pytest.mark.skipif(not plastic_ops.extension_available(),
                                 reason="the compiled extension of plastic_ops is not built")

TINY = ["--pattern-size", "12", "--num-patterns", "3", "--pres-steps", "2", "--gap-steps", "1", "--test-steps", "2",
        "--eval-episodes", "6", "--eval-batch", "4", "--checkpoint-every", "4", "--threads", "1", "--no-progress",
        "--seed", "3"]


def test_episode_shapes_and_schedule():
    cfg = pm.EpisodeConfig(pattern_size=10, num_patterns=3, cycles=2, pres_steps=2, gap_steps=1, test_steps=2)
    assert cfg.steps == 3 * 2 * 3 + 2
    ep = pm.make_episodes(4, cfg, torch.Generator().manual_seed(0))
    assert ep.inputs.shape == (cfg.steps, 4, 11)
    assert ep.target.shape == ep.cue.shape == (4, 10)
    assert ep.patterns.shape == (4, 3, 10)
    assert torch.all(ep.inputs[:, :, -1] == 1)  # the bias neuron's input, at every step
    assert set(ep.patterns.unique().tolist()) == {-1.0, 1.0}
    for b in range(4):
        shown = []
        for block in range(6):
            t0 = block * 3
            assert torch.equal(ep.inputs[t0, b, :10], ep.inputs[t0 + 1, b, :10])  # shown for pres_steps
            assert torch.all(ep.inputs[t0 + 2, b, :10] == 0)  # then a zero step
            shown.append(next(i for i in range(3) if torch.equal(ep.inputs[t0, b, :10], ep.patterns[b, i])))
        # each cycle shows every pattern exactly once
        assert sorted(shown[:3]) == sorted(shown[3:]) == [0, 1, 2]
        assert any(torch.equal(ep.target[b], p) for p in ep.patterns[b])
        assert torch.equal(ep.inputs[-1, b, :10], ep.cue[b]) and torch.equal(ep.inputs[-2, b, :10], ep.cue[b])


@pytest.mark.parametrize("corruption, erased_value", [("zero", 0.0), ("minus-one", -1.0)])
def test_corruption(corruption, erased_value):
    cfg = pm.EpisodeConfig(pattern_size=100, corruption=corruption, corrupt_fraction=0.5)
    ep = pm.make_episodes(8, cfg, torch.Generator().manual_seed(1))
    changed = ep.cue != ep.target
    kept = ep.cue == ep.target
    if corruption == "zero":
        # exactly half of the bits erased, the others untouched
        assert torch.all((ep.cue == 0).sum(dim=1) == 50)
        assert torch.all(kept.sum(dim=1) == 50)
    else:
        assert set(ep.cue.unique().tolist()) <= {-1.0, 1.0}
        assert torch.all(ep.cue[changed] == erased_value)  # only +1 bits can change, and they become -1
        assert torch.all(ep.target[changed] == 1)
        assert torch.all(changed.sum(dim=1) <= 50) and changed.any()


def test_generator_is_reproducible():
    cfg = pm.EpisodeConfig(pattern_size=20)
    a = pm.make_episodes(3, cfg, torch.Generator().manual_seed(5))
    b = pm.make_episodes(3, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.target, b.target)


def test_image_shape():
    assert pm.image_shape(961) == (31, 31)
    assert pm.image_shape(1000) == (25, 40)
    assert pm.image_shape(7) == (1, 7)


def test_bad_flags_are_rejected():
    with pytest.raises(SystemExit):
        pm.parse_args(["--batch-size", "0"])
    with pytest.raises(SystemExit):
        pm.parse_args(["--no-plastic", "--lstm"])
    with pytest.raises(SystemExit):
        pm.parse_args(["--corrupt-fraction", "1.5"])


def test_lstm_baseline_is_sized_like_the_plastic_network():
    args = pm.parse_args(["--lstm", "--pattern-size", "100"])
    model = pm.build_model(args)
    plastic = 2 * 101 ** 2 + 1
    assert abs(pm.num_trainable(model) - plastic) / plastic < 0.05


def _read(out):
    return json.loads((out / "metrics.json").read_text())


@needs_fused
def test_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    metrics = pm.main(TINY + ["--episodes", "8", "--batch-size", "2", "--impl", "fused", "--out", str(out)])
    for name in ("metrics.json", "loss_curve.png", "reconstruction.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    saved = _read(out)
    assert saved["episodes"] == 8 and saved["impl"] == "fused" and saved["model"] == "plastic"
    assert len(saved["history"]["loss"]) == 4
    assert math.isfinite(saved["final_train_loss"]) and 0 <= saved["final_train_loss"] <= 4
    assert 0 <= saved["eval"]["bit_error"] <= 1 and 0 <= saved["eval"]["loss"] <= 4
    assert saved["episodes_per_s"] > 0 and saved["wall_clock_s"] > 0
    assert metrics["eval"] == saved["eval"]

    # --resume continues the same run: 8 episodes, then 8 more, equals 16 in one go
    pm.main(TINY + ["--episodes", "16", "--batch-size", "2", "--impl", "fused", "--out", str(out), "--resume"])
    resumed = _read(out)
    assert resumed["episodes"] == 16 and resumed["history"]["loss"][:4] == saved["history"]["loss"]
    straight = tmp_path / "straight"
    pm.main(TINY + ["--episodes", "16", "--batch-size", "2", "--impl", "fused", "--out", str(straight)])
    assert _read(straight)["history"]["loss"] == resumed["history"]["loss"]
    a = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(straight / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a checkpoint of another run is refused, with the reason
    with pytest.raises(SystemExit, match="batch-size"):
        pm.main(TINY + ["--episodes", "16", "--batch-size", "4", "--out", str(out), "--resume"])


@needs_fused
def test_ctrl_c_saves_and_resume_loses_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_maybe_save = pm.CheckpointManager.maybe_save

    def interrupt_after_3(self, step, make_state):  # what the SIGINT handler does, at step 3
        if step == 3:
            self.stop_requested = True
        return real_maybe_save(self, step, make_state)

    monkeypatch.setattr(pm.CheckpointManager, "maybe_save", interrupt_after_3)
    assert pm.main(TINY + ["--episodes", "6", "--out", str(out)]) is None
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3
    monkeypatch.undo()
    resumed = pm.main(TINY + ["--episodes", "6", "--out", str(out), "--resume"])
    straight = pm.main(TINY + ["--episodes", "6", "--out", str(tmp_path / "straight")])
    assert resumed["history"]["loss"] == straight["history"]["loss"]


@pytest.mark.parametrize("flags", [["--no-plastic", "--impl", "fused"], ["--lstm"], ["--impl", "reference"]])
def test_baselines_and_reference_run(tmp_path, flags):
    if "fused" in flags and not plastic_ops.extension_available():
        pytest.skip("the compiled extension of plastic_ops is not built")
    metrics = pm.main(TINY + ["--episodes", "4", "--batch-size", "2", "--out", str(tmp_path)] + flags)
    assert metrics["episodes"] == 4 and 0 <= metrics["eval"]["bit_error"] <= 1
    if "--no-plastic" in flags:
        state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
        assert torch.all(state["rnn.alpha"] == 0)  # alpha stayed at 0 through training


# ---------------------------------------------------------------------------------------------
# Time to accuracy: the held-out curve, its clocks, early stop, budget, and the driver

CURVE = ["--eval-every", "4", "--curve-episodes", "6"]


def _tta(out):
    return _read(out)["time_to_accuracy"]


@needs_fused
def test_curve_is_measured_on_fixed_episodes_at_each_interval(tmp_path):
    pm.main(TINY + CURVE + ["--episodes", "12", "--batch-size", "2", "--out", str(tmp_path / "a")])
    tta = _tta(tmp_path / "a")
    curve = tta["curve"]
    assert curve["episodes"] == [0, 4, 8, 12]  # before training, then every 4 episodes
    assert curve["train_cpu_s"][0] == curve["train_wall_s"][0] == 0.0
    assert curve["train_cpu_s"] == sorted(curve["train_cpu_s"]) and curve["train_cpu_s"][-1] == tta["train_cpu_s"]
    assert tta["stop"] == "episodes" and tta["curve_seed"] == 4321 and tta["curve_episodes"] == 6
    # the point at 0 episodes is the untrained network on the curve's own fixed episodes
    torch.manual_seed(3)  # the run's seed: the same initial weights
    model = pm.build_model(pm.parse_args(TINY))
    cfg = pm.EpisodeConfig(12, 3, 2, 2, 1, 2)
    loss, err, _ = pm.evaluate(model, cfg, 6, 4321, 4, torch.device("cpu"))
    assert curve["bit_error"][0] == err and curve["loss"][0] == pytest.approx(loss, rel=1e-6)
    # a batch that does not divide the interval: a point each time a multiple of 4 is crossed
    pm.main(TINY + CURVE + ["--episodes", "12", "--batch-size", "3", "--out", str(tmp_path / "b")])
    assert _tta(tmp_path / "b")["curve"]["episodes"] == [0, 6, 9, 12]


@needs_fused
def test_curve_evaluation_is_outside_the_training_clock(tmp_path, monkeypatch):
    """Each curve evaluation takes 1000 s on a shifted clock: the training clocks must not see them."""
    shift = {"s": 0.0}
    real_cpu, real_wall, real_evaluate = pm.time.process_time, pm.time.perf_counter, pm.evaluate

    def slow_evaluate(*a, **k):
        shift["s"] += 1000.0
        return real_evaluate(*a, **k)

    monkeypatch.setattr(pm.time, "process_time", lambda: real_cpu() + shift["s"])
    monkeypatch.setattr(pm.time, "perf_counter", lambda: real_wall() + shift["s"])
    monkeypatch.setattr(pm, "evaluate", slow_evaluate)
    metrics = pm.main(TINY + CURVE + ["--episodes", "8", "--batch-size", "2", "--out", str(tmp_path)])
    tta = metrics["time_to_accuracy"]
    points = len(tta["curve"]["episodes"])
    assert points == 3
    # the final test is the last evaluation: every curve point's 1000 s went to the evaluation clocks
    assert tta["eval_cpu_s"] >= 1000.0 * points and tta["eval_wall_s"] >= 1000.0 * points
    assert tta["train_cpu_s"] < 1000.0 and metrics["wall_clock_s"] < 1000.0
    assert max(tta["curve"]["train_wall_s"]) < 1000.0


@needs_fused
def test_resume_keeps_the_curve_and_clocks_exact(tmp_path):
    out, straight = tmp_path / "run", tmp_path / "straight"
    pm.main(TINY + CURVE + ["--episodes", "8", "--batch-size", "2", "--out", str(out)])
    first = _tta(out)
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["time_to_accuracy"]
    assert saved["curve"] == first["curve"] and saved["train_cpu_s"] == first["train_cpu_s"]
    pm.main(TINY + CURVE + ["--episodes", "16", "--batch-size", "2", "--out", str(out), "--resume"])
    resumed = _tta(out)["curve"]
    for key in first["curve"]:  # the points measured before the resume are kept as they were
        assert resumed[key][:3] == first["curve"][key]
    assert resumed["train_cpu_s"] == sorted(resumed["train_cpu_s"])  # the clock goes on from where it was
    assert resumed["train_cpu_s"][3] > first["train_cpu_s"]
    pm.main(TINY + CURVE + ["--episodes", "16", "--batch-size", "2", "--out", str(straight)])
    plain = _tta(straight)["curve"]
    assert resumed["episodes"] == plain["episodes"] == [0, 4, 8, 12, 16]
    assert resumed["bit_error"] == plain["bit_error"] and resumed["loss"] == plain["loss"]
    # the curve must go on being measured the same way
    with pytest.raises(SystemExit, match="curve-seed"):
        pm.main(TINY + CURVE + ["--episodes", "20", "--batch-size", "2", "--out", str(out), "--resume",
                                "--curve-seed", "99"])


@needs_fused
def test_early_stop_at_the_target_error(tmp_path, monkeypatch):
    errors = iter([0.30, 0.20, 0.004, 0.001, 0.0])
    real_evaluate = pm.evaluate

    def scripted(model, cfg, episodes, seed, batch, device):
        loss, err, first = real_evaluate(model, cfg, episodes, seed, batch, device)
        return loss, (next(errors) if seed == 4321 else err), first  # the final test (seed 1234) is real

    monkeypatch.setattr(pm, "evaluate", scripted)
    metrics = pm.main(TINY + CURVE + ["--episodes", "40", "--batch-size", "2", "--target-error", "0.005",
                                      "--out", str(tmp_path / "a")])
    tta = metrics["time_to_accuracy"]
    assert tta["stop"] == "target" and tta["curve"]["episodes"] == [0, 4, 8] and metrics["episodes"] == 8
    assert tta["curve"]["bit_error"][-1] == 0.004
    # resuming a run that already reached its target trains no further
    errors = iter([0.5] * 10)
    again = pm.main(TINY + CURVE + ["--episodes", "40", "--batch-size", "2", "--target-error", "0.005",
                                    "--out", str(tmp_path / "a"), "--resume"])
    assert again["episodes"] == 8 and again["time_to_accuracy"]["stop"] == "target"
    # a target already met by the untrained network: no training step at all, and the run still reports
    errors = iter([0.0])
    none = pm.main(TINY + CURVE + ["--episodes", "40", "--target-error", "0.005", "--out", str(tmp_path / "b")])
    assert none["episodes"] == 0 and none["time_to_accuracy"]["curve"]["episodes"] == [0]


@needs_fused
def test_time_budget_stops_the_run(tmp_path, monkeypatch):
    real_end = pm.TimeToAccuracy.step_ended

    def one_second_steps(self):  # every training step counts exactly 1 s on the CPU clock
        real_end(self)
        self.train_cpu_s = float(round(self.train_cpu_s + 1.0))

    monkeypatch.setattr(pm.TimeToAccuracy, "step_ended", one_second_steps)
    metrics = pm.main(TINY + ["--episodes", "40", "--batch-size", "2", "--time-budget", "3.5",
                              "--out", str(tmp_path / "a")])
    assert metrics["episodes"] == 8 and metrics["time_to_accuracy"]["stop"] == "budget"
    # a larger budget on --resume goes on from there
    more = pm.main(TINY + ["--episodes", "40", "--batch-size", "2", "--time-budget", "5.5",
                           "--out", str(tmp_path / "a"), "--resume"])
    assert more["episodes"] == 12 and more["history"]["loss"][:4] == metrics["history"]["loss"]


def test_time_to_accuracy_flags_are_checked():
    for bad in (["--target-error", "0.01"],  # needs a curve
                ["--eval-every", "4", "--target-error", "1.5"],
                ["--eval-every", "-1"], ["--curve-episodes", "0"], ["--time-budget", "0"],
                ["--curve-seed", "7", "--eval-seed", "7"]):  # the final test's episodes stay unseen
        with pytest.raises(SystemExit):
            pm.parse_args(bad)


@needs_fused
def test_curve_of_a_reference_run_can_be_measured_on_the_fused_op(tmp_path):
    base = TINY + CURVE + ["--episodes", "8", "--batch-size", "2", "--impl", "reference"]
    pm.main(base + ["--out", str(tmp_path / "a")])
    pm.main(base + ["--curve-impl", "fused", "--out", str(tmp_path / "b")])
    a, b = _tta(tmp_path / "a")["curve"], _tta(tmp_path / "b")["curve"]
    assert a["bit_error"] == b["bit_error"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert _read(tmp_path / "b")["impl"] == "reference"  # only the curve used the fused op


DRIVER_TASK = "--pattern-size 12 --num-patterns 3 --pres-steps 2 --gap-steps 1 --test-steps 2 --eval-batch 4"
DRIVER = ["--task", DRIVER_TASK, "--eval-every", "4", "--curve-episodes", "6", "--final-eval-episodes", "4",
          "--lr-grid", "1e-3", "3e-3", "--select-budget", "0.02", "--budget", "0.05", "--reference-budget", "0.05",
          "--max-episodes", "16", "--seeds", "0", "1"]


@needs_fused
def test_driver_selects_on_validation_episodes_and_writes_the_table(tmp_path):
    out = tmp_path / "tta"
    table = driver.main(DRIVER + ["--out", str(out), "--configs", "reference-b1", "fused-b1", "fused-b4"])
    selection = json.loads((out / "select" / "fused-b4" / "selection.json").read_text())
    assert set(selection["grid"]) == {"0.001", "0.003"} and selection["chosen_lr"] in (1e-3, 3e-3)
    best = min(selection["grid"].values(), key=lambda g: (g["min_bit_error"], g["cpu_s_at_min"]))
    assert selection["chosen_lr"] == best["lr"]
    # the selection trained and validated on other episodes than the reported runs
    for lr in ("1e-3", "0.003"):
        run = json.loads((out / "select" / "fused-b4" / f"lr{float(lr):g}" / "metrics.json").read_text())
        assert run["time_to_accuracy"]["curve_seed"] == 8765 and run["args"]["seed"] == 100
    reported = json.loads((out / "report" / "fused-b4" / "seed1" / "metrics.json").read_text())
    assert reported["time_to_accuracy"]["curve_seed"] == 4321 and reported["args"]["seed"] == 1
    assert reported["args"]["lr"] == selection["chosen_lr"] and reported["batch_size"] == 4
    assert reported["time_to_accuracy"]["curve_seed"] != selection["validation_seed"]
    assert reported["args"]["seed"] != selection["train_seed"]
    ref = json.loads((out / "report" / "reference-b1" / "seed0" / "metrics.json").read_text())
    assert ref["impl"] == "reference" and ref["args"]["lr"] == 3e-4 and ref["time_to_accuracy"]["curve_impl"] == "fused"
    assert [r["config"] for r in table] == ["reference-b1", "fused-b1", "fused-b4"]
    assert all(r["seeds"] == [0, 1] for r in table)
    for name in ("table.md", "table.json", "time_to_accuracy.png"):
        assert (out / name).stat().st_size > 0
    assert "fused-b4" in (out / "table.md").read_text()
    # a second call finds every run done and trains nothing
    mtime = (out / "report" / "fused-b1" / "seed0" / "metrics.json").stat().st_mtime_ns
    driver.main(DRIVER + ["--out", str(out), "--configs", "fused-b1", "fused-b4"])
    assert (out / "report" / "fused-b1" / "seed0" / "metrics.json").stat().st_mtime_ns == mtime


def test_driver_refuses_to_select_on_the_reported_episodes():
    with pytest.raises(SystemExit):
        driver.parse_args(["--validation-seed", "5", "--report-seed", "5"])
    with pytest.raises(SystemExit):
        driver.parse_args(["--select-seed", "1", "--seeds", "0", "1", "2"])
    args = driver.parse_args([])
    assert args.validation_seed != args.report_seed and args.select_seed not in args.seeds
    assert args.report_seed != pm.parse_args([]).eval_seed != args.validation_seed


def test_time_to_threshold_is_read_off_the_curve():
    curve = {"episodes": [0, 32, 64, 96], "train_cpu_s": [0.0, 10.0, 20.0, 30.0],
             "train_wall_s": [0.0, 11.0, 22.0, 33.0], "bit_error": [0.3, 0.02, 0.008, 0.004]}
    assert driver.first_reached(curve, 0.01) == {"cpu_s": 20.0, "wall_s": 22.0, "episodes": 64}
    assert driver.first_reached(curve, 0.005)["episodes"] == 96
    assert driver.first_reached(curve, 0.001) is None
    # a seed that never reached the threshold counts as +inf: the median is defined while most seeds reached it
    s = driver.summarize([20.0, None, 10.0])
    assert s["median"] == 20.0 and s["min"] == 10.0 and s["max"] == float("inf")
    assert driver.summarize([None, None, 5.0])["median"] == float("inf")
    assert driver.fmt(driver.summarize([None, None, 5.0])) == "not reached"
    # the curve as a step function of CPU time, undefined after the run's end
    at = driver.error_at(curve, torch.tensor([0.0, 5.0, 10.0, 29.0, 31.0]).numpy())
    assert at[:4].tolist() == [0.3, 0.3, 0.02, 0.008] and math.isnan(at[4])
