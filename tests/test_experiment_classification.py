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
    full = _run(tmp_path / "full", "--protocol", "both")

    out = tmp_path / "full"
    for name in ("metrics.json", "table.md", "curves_paper.png", "curves_batched.png", "checkpoint.pt",
                 "model_paper_plastic.pt", "model_batched_nonplastic.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"paper/nonplastic", "paper/plastic", "batched/nonplastic", "batched/plastic"}
    assert metrics["data"] == {"dataset": "synthetic", "train_images": 200, "test_images": 60}
    assert metrics["impl"] == "fused" and "environment" in metrics
    for key, r in metrics["runs"].items():
        modes = {"reset", "carry"} if key.endswith("/plastic") else {"plain"}
        assert set(r["tests"]) == modes and set(r["history"]["test"]) == modes
        assert r["history"]["epoch"] == [1, 2] and len(r["history"]["train_loss"]) == 2
        for t in r["tests"].values():
            assert 0.0 <= t["final_acc"] <= 1.0 and 0.0 <= t["best_acc"] <= 1.0
            assert math.isfinite(t["final_loss"]) and t["final_loss"] > 0
        assert r["wall_seconds"] >= r["train_seconds"] > 0
        if key.endswith("/plastic"):
            assert 0.0 <= r["eta"] <= 1.0
    # 4 streams x 5 images = 20 images per step, 200 training images: 10 steps per epoch, 2 epochs
    assert len(metrics["runs"]["batched/plastic"]["history"]["step_loss"]) == 20
    table = (out / "table.md").read_text()
    assert table.count("| paper |") == 3 and table.count("| batched |") == 3

    # Stop twice (in the paper protocol, then mid-epoch in the batched one) and resume: same results.
    part = tmp_path / "part"
    assert _run(part, "--protocol", "both", "--stop-after", "3")["stopped"]
    assert (part / "checkpoint.pt").is_file() and not (part / "metrics.json").exists()
    assert _run(part, "--protocol", "both", "--resume", "--stop-after", "9")["stopped"]
    state = torch.load(part / "checkpoint.pt", weights_only=False)
    assert state["current"]["protocol"] == "batched" and 0 < state["current"]["step"] < 10
    resumed = _run(part, "--protocol", "both", "--resume")
    a, b = _finals(full), _finals(resumed)
    assert a.keys() == b.keys()
    for key in a:
        for mode in a[key]:
            assert b[key][mode] == pytest.approx(a[key][mode], rel=1e-4, abs=1e-5), (key, mode)

    # A checkpoint is not resumed under options that change the results.
    with pytest.raises(SystemExit, match="other options"):
        _run(part, "--protocol", "both", "--resume", "--hidden", "8")


def test_reference_impl_paper_protocol(tmp_path):
    metrics = _run(tmp_path, "--protocol", "paper", "--models", "plastic", "--plastic-test", "carry",
                   impl="reference")
    r = metrics["runs"]["paper/plastic"]
    assert set(r["tests"]) == {"carry"} and len(r["history"]["epoch"]) == 2
    assert (tmp_path / "curves_paper.png").is_file()


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit):
        classification.main(["--synthetic", "--seq-len", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="longer than"):
        classification.main(["--synthetic", "--train-limit", "5", "--seq-len", "10", "--impl", "reference",
                             "--out", str(tmp_path)])
