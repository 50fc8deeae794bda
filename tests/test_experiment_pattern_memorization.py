"""The pattern-memorization experiment: episode generator, and the script end to end on a tiny configuration."""
import json
import math

import pytest
import torch

import plastic_ops
from experiments import pattern_memorization as pm

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
