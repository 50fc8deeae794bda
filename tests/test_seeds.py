"""The seeds driver (experiments/seeds.py, experiments/common/seeds.py): its arithmetic against numbers worked
out by hand, resume, and one real run of the classification experiment on tiny synthetic data."""
from __future__ import annotations

import json
import math
import sys
import types

import pytest

from experiments import seeds as driver
from experiments.common import seeds


def test_spread_against_hand_computed_values():
    # values 1, 2, 4: mean 7/3; squared deviations 16/9, 1/9, 25/9 sum to 42/9, over n - 1 = 2: 7/3
    s = seeds.spread([1.0, 2.0, 4.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(math.sqrt(7 / 3))
    half = 4.303 * math.sqrt(7 / 3) / math.sqrt(3)  # t(0.975, df 2) = 4.303
    assert s["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half])
    # two values 0.5 and 1.5: std = sqrt(0.5), half-width 12.706 * sqrt(0.5) / sqrt(2) = 6.353
    assert seeds.spread([0.5, 1.5])["ci95"] == pytest.approx([1.0 - 6.353, 1.0 + 6.353])
    one = seeds.spread([3.0])
    assert one["mean"] == 3.0 and one["std"] is None and one["ci95"] is None


def test_t_quantiles():
    assert seeds.t975(1) == 12.706 and seeds.t975(4) == 2.776 and seeds.t975(30) == 2.042
    assert seeds.t975(35) == 2.042  # between rows: the smaller df's (wider) value
    assert seeds.t975(1000) == 1.980
    with pytest.raises(ValueError):
        seeds.t975(0)


def test_paired_differences_and_verdicts():
    per_seed = {s: [{"quantity": "q", "values": {"p": p, "b": b}, "pairs": [("p", "b")]}]
                for s, (p, b) in enumerate([(0.90, 0.80), (0.91, 0.80), (0.92, 0.81)])}
    entry = seeds.summarize(per_seed)[0]
    d = entry["pairs"][0]
    # differences 0.10, 0.11, 0.11: mean 0.32/3, deviations -2/300, 1/300, 1/300 -> variance (6/90000)/2
    assert d["mean"] == pytest.approx(0.32 / 3)
    assert d["std"] == pytest.approx(math.sqrt(3 / 90000))
    assert d["verdict"] == "difference" and d["ci95"][0] > 0
    assert entry["models"]["b"]["mean"] == pytest.approx(2.41 / 3)
    # differences of both signs: the interval holds 0
    noisy = {s: [{"quantity": "q", "values": {"p": p, "b": 0.5}, "pairs": [("p", "b")]}]
             for s, p in enumerate([0.4, 0.7, 0.5])}
    assert seeds.summarize(noisy)[0]["pairs"][0]["verdict"] == "within the spread"
    md = seeds.markdown(seeds.summarize(per_seed))
    assert "| q | p - b | 0.1067 |" in md and "difference |" in md


def _fake_experiment(monkeypatch, calls):
    """A stand-in experiment: metrics.json with a number that depends on the seed."""
    def main(argv):
        seed, out = int(argv[argv.index("--seed") + 1]), argv[argv.index("--out") + 1]
        calls.append((seed, "--resume" in argv, list(argv)))
        from pathlib import Path
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "metrics.json").write_text(json.dumps({"seed": seed, "acc": {"plastic": 0.5 + seed / 10,
                                                                                "baseline": 0.5}}))
        return {}

    def seed_rows(metrics):
        return [{"quantity": "acc", "values": metrics["acc"], "pairs": [("plastic", "baseline")]}]

    mod = types.ModuleType("fake_experiment")
    mod.main, mod.seed_rows = main, seed_rows
    monkeypatch.setitem(sys.modules, "fake_experiment", mod)
    monkeypatch.setitem(seeds.EXPERIMENTS, "fake", "fake_experiment")


def test_resume_skips_finished_seeds(tmp_path, monkeypatch):
    calls = []
    _fake_experiment(monkeypatch, calls)
    out = tmp_path / "s"
    (out / "seed-1").mkdir(parents=True)  # an interrupted seed: a folder without metrics.json
    seeds.run_seeds("fake", [0, 1], out, ["--x", "3"], log=lambda *_: None)
    assert [(s, r) for s, r, _ in calls] == [(0, False), (1, True)]
    assert calls[0][2][:2] == ["--x", "3"]
    result = seeds.run_seeds("fake", [0, 1, 2], out, ["--x", "3"], log=lambda *_: None)
    assert [s for s, _, _ in calls] == [0, 1, 2] and result["ran"] == [2]  # 0 and 1 were finished
    entry = json.loads((out / "seeds.json").read_text())["table"][0]
    assert entry["models"]["plastic"]["mean"] == pytest.approx(0.6)
    assert entry["pairs"][0]["mean"] == pytest.approx(0.1)
    assert "| acc | plastic - baseline |" in (out / "seeds.md").read_text()
    with pytest.raises(SystemExit, match="another command"):
        seeds.run_seeds("fake", [0, 1], out, ["--x", "4"], log=lambda *_: None)


def test_driver_refuses_what_it_sets(tmp_path):
    with pytest.raises(SystemExit):
        driver.main(["classification", "--out", str(tmp_path), "--", "--seed", "3"])
    with pytest.raises(SystemExit):
        driver.main(["classification", "--seeds", "1,x", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="distinct"):
        seeds.run_seeds("classification", [1, 1], tmp_path, [])


def test_classification_three_seeds_end_to_end(tmp_path):
    tiny = ["--synthetic", "--train-limit", "60", "--test-limit", "30", "--val-images", "20", "--channels", "2",
            "4", "--hidden", "8", "--paper-images", "10", "--epochs", "1", "--threads", "1", "--no-progress",
            "--protocol", "paper"]
    result = driver.main(["classification", "--seeds", "0,1,2", "--out", str(tmp_path), "--"] + tiny)
    for s in (0, 1, 2):
        assert json.loads((tmp_path / f"seed-{s}" / "metrics.json").read_text())["seed"] == s
    rows = result["table"]
    assert [r["quantity"] for r in rows] == ["paper: test accuracy, epoch selected on validation (higher is better)",
                                             "paper: test accuracy, last epoch (higher is better)"]
    for r in rows:
        assert set(r["models"]) == {"nonplastic", "plastic (reset)", "plastic (carry)"}
        assert all(m["n"] == 3 for m in r["models"].values()) and len(r["pairs"]) == 2
    assert (tmp_path / "seeds.md").is_file()


def test_denoising_two_seeds_end_to_end(tmp_path):
    tiny = ["--synthetic", "24", "--datasets", "mnist", "--batch-size", "2", "--pretrain-steps", "1",
            "--pretrain-batch", "4", "--k", "2", "--t-ns", "1", "--t-zs", "1", "--steps-per-epoch", "1",
            "--epochs", "1", "--test-episodes", "2", "--val-episodes", "2", "--sigmas", "1", "--grid-examples", "1",
            "--code", "8", "--width", "4", "--device", "cpu", "--quiet", "--threads", "1"]
    result = seeds.run_seeds("denoising", [3, 4], tmp_path, tiny, log=lambda *_: None)
    assert result["ran"] == [3, 4]
    assert [r["quantity"] for r in result["table"]] == [
        f"mnist, {p}, {c}: test MSE (lower is better)" for p in ("recall", "denoise") for c in ("noise-1", "occlude-half")]
    for r in result["table"]:
        assert set(r["models"]) == {"plastic", "baseline", "plastic, clean query", "baseline, clean query"}
        assert r["pairs"][0]["a"] == "plastic" and r["pairs"][0]["b"] == "baseline" and r["pairs"][0]["n"] == 2
