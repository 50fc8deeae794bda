"""The benchmark harness's neuromodulation cases (benchmarks/_harness.py, compare.py): inputs, fused-hebb,
the split loop with eligibility, the report's ratios and verdicts."""
from __future__ import annotations

import json
import signal

import pytest
import torch

import plastic_ops
from benchmarks import _harness as H
from benchmarks import compare
from plastic_ops import reference


@pytest.fixture
def sigterm_restored():
    """compare.main installs its own SIGTERM handler: put the test process's back afterwards."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def fused_neuromodulation_available() -> bool:
    """Whether the built fused op runs neuromodulation (it refuses it until its kernel exists)."""
    if not plastic_ops.extension_available():
        return False
    case = H.Case(n=3, batch=2, steps=2, rule="add", mode="fwd", neuromodulation="retroactive")
    try:
        H.make_step(case, H.op_function("fused", "rnn"), H.make_inputs(case))()
    except RuntimeError as exc:
        if "not implemented" in str(exc):
            return False
        raise
    return True


def test_neuromodulation_inputs():
    none = H.Case(n=8, batch=2, steps=3)
    simple = H.Case(n=8, batch=2, steps=3, rule="add", neuromodulation="simple")
    retro = H.Case(n=8, batch=2, steps=3, rule="add", neuromodulation="retroactive")
    base = H.make_inputs(none)
    assert set(base) == {"x", "w", "alpha", "eta", "grad_y"} and "neuromodulation" not in none.to_dict()
    a, b = H.make_inputs(simple), H.make_inputs(retro)
    assert set(a) == set(base) | set(H.MOD_ARGS) and set(b) == set(a) | set(H.ELIG_ARGS)
    for k in base:  # the other inputs are those of the case without neuromodulation
        torch.testing.assert_close(a[k], base[k], rtol=0, atol=0)
        torch.testing.assert_close(b[k], base[k], rtol=0, atol=0)
    assert all(a[k].requires_grad for k in H.MOD_ARGS) and b["eligibility_eta"].requires_grad
    assert b["eligibility"].shape == (2, 8, 8) and not b["eligibility"].requires_grad
    assert a["mod_bias"].dim() == 0 and a["mod_weight"].shape == (8,)
    fwd = H.make_inputs(H.Case(n=8, batch=2, steps=3, rule="add", mode="fwd", neuromodulation="retroactive"))
    assert not any(fwd[k].requires_grad for k in H.NEURO_ARGS)
    assert H.Case.from_dict(retro.to_dict()) == retro and retro.to_dict()["neuromodulation"] == "retroactive"
    assert retro.eager_bytes_estimate() > simple.eager_bytes_estimate()
    with pytest.raises(ValueError):
        H.Case(neuromodulation="simple")  # rule hebb: the variants are defined with rule add
    with pytest.raises(ValueError):
        H.Case(rule="add", neuromodulation="modulated")


@pytest.mark.parametrize("variant", ["simple", "retroactive"])
def test_eager_step_captures_the_neuromodulation(variant):
    case = H.Case(n=5, batch=3, steps=4, rule="add", neuromodulation=variant, dtype="float64")
    args = H.make_inputs(case)
    out = H.make_step(case, H.op_function("eager", "rnn"), args)(capture=True)
    grads = {"grad_w", "grad_alpha", "grad_eta"} | {f"grad_{k}" for k in H.MOD_ARGS}
    if variant == "retroactive":
        grads |= {"grad_eligibility_eta", "eligibility"}
    assert set(out) == {"y", "trace"} | grads
    # The same call written out: the step passes every argument of the case.
    kw = {k: args[k] for k in H.NEURO_ARGS if k in args}
    ref = reference.plastic_rnn(args["x"], args["w"], args["alpha"], args["eta"], rule="add", **kw)
    torch.testing.assert_close(out["y"], ref[0].detach(), rtol=0, atol=0)


@pytest.mark.skipif(not plastic_ops.extension_available(), reason="the compiled extension is not built")
def test_fused_hebb_is_the_plain_hebb_op():
    case = H.Case(n=6, batch=2, steps=5, rule="add", neuromodulation="retroactive", dtype="float64")
    args = H.make_inputs(case)
    out = H.make_step(case, H.op_function("fused-hebb", "rnn"), args)(capture=True)
    plain = H.Case(n=6, batch=2, steps=5, dtype="float64")
    ref = H.make_step(plain, H.op_function("eager", "rnn"), H.make_inputs(plain))(capture=True)
    assert set(out) == set(ref) and H.max_rel_error(out, ref) < 1e-12


@pytest.mark.skipif(not fused_neuromodulation_available(), reason="the fused op does not run neuromodulation yet")
@pytest.mark.parametrize("variant", ["simple", "retroactive"])
def test_fused_matches_eager(variant):
    case = H.Case(n=6, batch=2, steps=5, rule="add", neuromodulation=variant, dtype="float64")
    args = H.make_inputs(case)
    ref = H.make_step(case, H.op_function("eager", "rnn"), args)(capture=True)
    out = H.make_step(case, H.op_function("fused", "rnn"), args)(capture=True)
    assert set(out) == set(ref) and H.max_rel_error(out, ref) < 1e-10


@pytest.mark.parametrize("form", ["rnn", "linear"])
@pytest.mark.parametrize("episodes", ["every:3", "lengths"])
def test_split_loop_carries_the_eligibility(form, episodes):
    """fused-split's loop over the reference with eligibility traces against the reference's masked call."""
    case = H.Case(form=form, n=5, batch=4, steps=9, rule="add", episodes=episodes, neuromodulation="retroactive",
                  dtype="float64")
    args = H.make_inputs(case)
    ref_fn = reference.plastic_rnn if form == "rnn" else reference.plastic_linear
    ref = H.make_step(case, ref_fn, args)(capture=True)
    out = H.make_step(case, H.SplitEpisodes(ref_fn, recurrent=form == "rnn"), args)(capture=True)
    assert "eligibility" in out and H.max_rel_error(out, ref) < 1e-10


def test_compare_reports_the_neuromodulation(tmp_path, sigterm_restored):
    out = tmp_path / "run"
    assert compare.main(["--sizes", "12", "--batches", "2", "--steps", "6", "--mode", "fwdbwd",
                         "--neuromodulation", "none,simple", "retroactive", "--rules", "hebb,oja", "--rounds", "3",
                         "--min-sample", "0.001", "--threads", "1", "--no-plot", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["neuromodulation"] == ["none", "simple", "retroactive"]
    assert data["settings"]["impls"] == ["fused", "fused-hebb", "eager"]
    cases = [(c["case"]["rule"], c["case"].get("neuromodulation", "none")) for c in data["cases"]]
    assert cases == [("hebb", "none"), ("oja", "none"), ("add", "simple"), ("add", "retroactive")]
    fused_ok = fused_neuromodulation_available()
    for variant in ("simple", "retroactive"):
        rows = {r["impl"]: r for r in data["rows"] if r.get("neuromodulation") == variant}
        assert rows["eager"]["status"] == "ok" and rows["fused-hebb"]["status"] == "ok"
        assert "max_rel_err_vs_eager" not in rows["fused-hebb"]  # another function: timed, not checked
        f = rows["fused"]
        if not fused_ok:
            assert f["status"] == "error" and "neuromodulation" in f["error"]
            continue
        # float32: a scalar gradient (mod_bias: a sum over t, b of terms of both signs) is the least exact
        assert f["status"] == "ok" and f["max_rel_err_vs_eager"] < 1e-4
        assert f["fused_over_fused_hebb"] == pytest.approx(f["median_ms"] / rows["fused-hebb"]["median_ms"])
        assert f["eager_over_fused"] == pytest.approx(rows["eager"]["median_ms"] / f["median_ms"])
        assert f["fused_over_fused_hebb_round_q1"] <= f["fused_over_fused_hebb_round_q3"]
    md = (out / "results.md").read_text()
    assert "| neuromodulation |" in md and "fused-hebb ms" in md
    if fused_ok:
        assert "fused/fused-hebb [per round" in md and "eager/fused [per round" in md
        assert "target <= 1.3x" in md and "target <= 2.2x" in md and "target >= 8x" in md
        assert "(the target is set for rnn fwdbwd N=1000 T=106 B in {1, 8} on the cpu)" in md
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:len(compare.ROW_FIELDS)] == compare.ROW_FIELDS and "neuromodulation" in header
    with pytest.raises(SystemExit):
        compare.main(["--headline", "--neuromodulation", "simple", "--out", str(tmp_path / "no")])


def test_neuro_verdicts_and_memory_ratio():
    """The verdict lines from rows as run_case leaves them (no child processes)."""
    f = {"impl": "fused", "status": "ok", "rounds": 5, "peak_mb": 300.0, "mem_fused_over_fused_hebb": 2.0}
    for key, v in (("fused_over_fused_hebb", 2.0), ("eager_over_fused", 9.0)):
        f.update({key: v, key + "_round_median": v, key + "_round_q1": v, key + "_round_q3": v,
                  key + "_round_min": v, key + "_round_max": v})
    res = {"case": H.Case(n=1000, batch=1, steps=106, rule="add", neuromodulation="retroactive").to_dict(),
           "rows": [f, {"impl": "fused-hebb", "status": "ok", "peak_mb": 150.0}]}
    lines = compare.neuro_verdicts([res], ["fused/fused-hebb", "eager/fused"])
    assert len(lines) == 3
    assert lines[0].endswith("target <= 2.2x: met") and lines[1].endswith("target >= 8x: met")
    assert "peak memory fused/fused-hebb = 2.00x (300 MB against 150 MB)" in lines[2]
    res["case"] = dict(res["case"], neuromodulation="simple", batch=8)
    lines = compare.neuro_verdicts([res], ["fused/fused-hebb", "eager/fused"])
    assert "target <= 1.3x: not met" in lines[0] and "target >= 8x: met (the target is set for" in lines[1]
