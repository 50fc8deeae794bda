"""The benchmark harness's episode cases (benchmarks/_harness.py, compare.py): masks, the split loop, reports."""
from __future__ import annotations

import json
import signal

import pytest
import torch

from benchmarks import _harness as H
from benchmarks import compare
from plastic_ops import reference


@pytest.fixture
def sigterm_restored():
    """compare.main installs its own SIGTERM handler: put the test process's back afterwards."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def test_every_k_offsets_per_row():
    case = H.Case(n=4, batch=4, steps=20, episodes="every:8")
    reset = H.make_inputs(case)["reset"]
    assert reset.shape == (20, 4) and reset.dtype == torch.bool
    for b in range(4):
        off = b * 8 // 4
        assert reset[:, b].nonzero().flatten().tolist() == [t for t in range(1, 20) if (t - off) % 8 == 0]
    assert H.episode_boundaries(case) == [2, 4, 6, 8, 10, 12, 14, 16, 18]


def test_lengths_deterministic_and_in_range():
    case = H.Case(n=4, batch=64, steps=9, episodes="lengths")
    a, b = H.make_inputs(case)["lengths"], H.make_inputs(case)["lengths"]
    assert torch.equal(a, b) and a.min() >= 5 and a.max() <= 9
    assert not torch.equal(a, H.make_inputs(H.Case(n=4, batch=64, steps=9, episodes="lengths", seed=1))["lengths"])


def test_no_episodes_keeps_inputs_and_records():
    case = H.Case(n=8, batch=2, steps=3)
    assert "episodes" not in case.to_dict() and H.Case.from_dict(case.to_dict()) == case
    assert set(H.make_inputs(case)) == {"x", "w", "alpha", "eta", "grad_y"}
    ep = H.Case(n=8, batch=2, steps=3, episodes="every:2")
    torch.testing.assert_close(H.make_inputs(ep)["x"], H.make_inputs(case)["x"], rtol=0, atol=0)
    assert H.Case.from_dict(ep.to_dict()) == ep
    with pytest.raises(ValueError):
        H.Case(episodes="every:0")


@pytest.mark.parametrize("form", ["rnn", "linear"])
@pytest.mark.parametrize("episodes", ["every:3", "lengths"])
def test_split_loop_matches_the_mask(form, episodes):
    """fused-split (separate calls) against the masked call of the reference and of the fused op."""
    case = H.Case(form=form, n=6, batch=5, steps=11, episodes=episodes, dtype="float64")
    args = H.make_inputs(case)
    ref = H.make_step(case, H.op_function("eager", form), args)(capture=True)
    # The same loop over the reference, and over the fused op: both as the masked reference.
    ref_fn = reference.plastic_rnn if form == "rnn" else reference.plastic_linear
    for fn in (H.SplitEpisodes(ref_fn, recurrent=form == "rnn"), H.op_function("fused-split", form),
               H.op_function("fused", form)):
        out = H.make_step(case, fn, args)(capture=True)
        assert H.max_rel_error(out, ref) < 1e-10
    if episodes == "lengths":  # every row shorter than T: the last steps run no row at all
        args["lengths"] = args["lengths"].clamp(max=case.steps - 2)
        ref = H.make_step(case, H.op_function("eager", form), args)(capture=True)
        out = H.make_step(case, H.op_function("fused-split", form), args)(capture=True)
        assert H.max_rel_error(out, ref) < 1e-10 and out["y"][-2:].abs().max() == 0
    unmasked = H.make_step(case, H.op_function("fused-unmasked", form), args)(capture=True)
    assert H.max_rel_error(unmasked, ref) > 1e-3  # a different function: the mask matters here


def test_compare_reports_the_ratios(tmp_path, sigterm_restored):
    out = tmp_path / "run"
    assert compare.main(["--sizes", "16", "--batches", "4", "--steps", "12", "--mode", "fwdbwd",
                         "--episodes", "every:4", "--rounds", "3", "--min-sample", "0.001", "--threads", "1",
                         "--no-plot", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = {r["impl"]: r for r in data["rows"]}
    assert set(rows) == {"fused", "fused-unmasked", "fused-split", "eager"}
    assert all(r["status"] == "ok" and r["episodes"] == "every:4" for r in rows.values())
    assert rows["fused-split"]["max_rel_err_vs_fused"] < 1e-5
    assert rows["fused"]["max_rel_err_vs_eager"] < 1e-5 and "max_rel_err_vs_eager" not in rows["fused-unmasked"]
    f = rows["fused"]
    assert f["fused_over_fused_unmasked"] == pytest.approx(f["median_ms"] / rows["fused-unmasked"]["median_ms"])
    assert f["fused_split_over_fused"] == pytest.approx(rows["fused-split"]["median_ms"] / f["median_ms"])
    assert f["fused_split_over_fused_round_q1"] <= f["fused_split_over_fused_round_q3"]
    md = (out / "results.md").read_text()
    assert "fused/fused-unmasked [per round" in md and "fused-split/fused [per round" in md
    assert "target <= 1.05x" in md and "target >= 4x" in md
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:len(compare.ROW_FIELDS)] == compare.ROW_FIELDS and "fused_split_over_fused" in header


def test_compare_without_episodes_keeps_its_format(tmp_path, sigterm_restored):
    out = tmp_path / "run"
    assert compare.main(["--sizes", "16", "--batches", "2", "--steps", "4", "--mode", "fwd", "--impls",
                         "fused,eager", "--rounds", "2", "--min-sample", "0.001", "--threads", "1",
                         "--no-plot", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert "episodes" not in data["settings"] and all("episodes" not in r for r in data["rows"])
    assert (out / "results.csv").read_text().splitlines()[0].split(",") == compare.ROW_FIELDS
    md = (out / "results.md").read_text()
    assert "| form | mode | N | B | T | rule/act | fused ms | eager ms | eager/fused |" in md
    with pytest.raises(SystemExit):
        compare.main(["--headline", "--episodes", "every:50", "--out", str(tmp_path / "no")])
