"""The cue-reward experiment: the environment's logic, replay = rollout, and the script end to end (tiny sizes)."""
import json

import pytest
import torch

import plastic_ops
from experiments import cue_reward as cr

TINY = ["--cue-bits", "6", "--trials", "3", "--hidden", "8", "--batch-size", "4", "--val-episodes", "8",
        "--test-episodes", "8", "--eval-every", "2", "--checkpoint-every", "2", "--threads", "1", "--no-progress",
        "--seed", "3"]


def _fused_supports(variant) -> bool:
    """Whether the fused op runs this variant here (neuromodulation may not be in every kernel yet)."""
    if not plastic_ops.extension_available():
        return False
    cfg = cr.TaskConfig(cue_bits=4, trials=1)
    agent = cr.Agent(cfg.obs_size, 4, variant, impl="fused")
    try:
        with torch.no_grad():
            agent(torch.zeros(2, 1, cfg.obs_size))
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return True


def test_trial_structure_and_rewards():
    cfg = cr.TaskConfig(cue_bits=5, num_cues=4, trials=6)
    env = cr.CueRewardEnv(cfg, 16, torch.Generator().manual_seed(0))
    C = cfg.cue_bits
    assert cfg.steps == 18 and cfg.obs_size == C + 6
    assert set(env.cues.unique().tolist()) == {-1.0, 1.0}
    assert torch.all(env.pairs[..., 0] != env.pairs[..., 1])  # two distinct cues per trial
    # the rewarded cue is in the pair exactly when `present` says so
    assert torch.equal(env.present, (env.pairs == env.target[:, None, None]).any(-1))
    rows = torch.arange(16)
    gen = torch.Generator().manual_seed(1)
    for t in range(cfg.steps):
        obs = env.observe()
        trial, phase = divmod(t, 3)
        assert torch.all(obs[:, C + 4] == 1)  # bias
        assert torch.allclose(obs[:, C + 5], torch.full((16,), t / cfg.steps))
        # the trial's two cues, superposed, at both steps of the trial
        pair = env.cues[rows, env.pairs[:, trial, 0]] + env.cues[rows, env.pairs[:, trial, 1]]
        assert torch.equal(obs[:, :C], pair)
        assert torch.all(obs[:, C] == (1.0 if phase == 1 else 0.0))  # "answer now" at the response step only
        if t == 0:
            assert torch.all(obs[:, C + 1:C + 4] == 0)  # no previous reward or action yet
        else:  # the previous step's reward and action come back as inputs
            assert torch.equal(obs[:, C + 1], prev_r)
            assert torch.equal(obs[:, C + 2:C + 4].argmax(-1), prev_a)
            assert torch.all(obs[:, C + 2:C + 4].sum(-1) == 1)
        a = torch.randint(0, 2, (16,), generator=gen)
        r = env.step(a)
        if phase == 1:  # +1 for the right answer, -1 for the wrong one
            right = (a == 1) == env.present[:, trial]
            assert torch.equal(r, torch.where(right, 1.0, -1.0))
        else:
            assert torch.all(r == 0)
        prev_r, prev_a = r, a
    assert env.done
    with pytest.raises(RuntimeError):
        env.step(torch.zeros(16, dtype=torch.long))


def test_right_answers_earn_one_per_trial_and_chance_is_balanced():
    cfg = cr.TaskConfig(cue_bits=4, trials=8)
    env = cr.CueRewardEnv(cfg, 2000, torch.Generator().manual_seed(2))
    assert abs(env.present.float().mean().item() - 0.5) < 0.02  # 4 cues: the rewarded one is in half the pairs
    total = torch.zeros(2000)
    while not env.done:
        total += env.step(env.present[:, env.t // 3].long())  # an oracle's answers
    assert torch.all(total == cfg.trials)
    mask = cr.CueRewardEnv.response_mask(cfg)
    assert mask.sum() == cfg.trials and mask[1] and not mask[0] and not mask[2] and mask[4]


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("variant", cr.VARIANTS)
def test_replay_gives_the_rollout(variant, impl):
    if impl == "fused" and not _fused_supports(variant):
        pytest.skip(f"the fused op does not run the {variant} variant here")
    cfg = cr.TaskConfig(cue_bits=6, trials=4)
    torch.manual_seed(0)
    agent = cr.Agent(cfg.obs_size, 12, variant, impl=impl)
    with torch.no_grad():  # larger plastic parameters than the initial ones, so that the traces matter
        for name, p in agent.named_parameters():
            if name in ("w", "alpha"):
                p.normal_(0, 0.3)
    ro = cr.rollout(agent, cr.CueRewardEnv(cfg, 5, torch.Generator().manual_seed(1)),
                    torch.Generator().manual_seed(2))
    logits, values, _ = agent(ro.obs)  # one call, with gradients
    torch.testing.assert_close(logits.detach(), ro.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values.detach(), ro.values, rtol=1e-5, atol=1e-6)
    loss, _ = cr.a2c_loss(logits, values, ro, cr.CueRewardEnv.response_mask(cfg), 0.9, 0.1, 0.03)
    loss.backward()
    for name, p in agent.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if variant != "nonplastic":
        assert agent.alpha.grad.abs().sum() > 0
    if variant in ("simple", "retroactive"):
        assert agent.h2mod.weight.grad.abs().sum() > 0 and agent.modfanout.weight.grad.abs().sum() > 0


def test_reference_and_fused_agree_when_both_run():
    variants = [v for v in cr.VARIANTS if _fused_supports(v)]
    if not variants:
        pytest.skip("the fused op is not available")
    cfg = cr.TaskConfig(cue_bits=6, trials=3)
    obs = torch.randn(cfg.steps, 3, cfg.obs_size)
    for variant in variants:
        torch.manual_seed(4)
        agent = cr.Agent(cfg.obs_size, 10, variant, impl="fused")
        out_f = agent(obs)[0]
        agent.impl = "reference"
        out_r = agent(obs)[0]
        torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-6)


def test_discounted_returns():
    r = torch.tensor([[0.0], [1.0], [0.0], [-1.0]])
    g = cr.discounted_returns(r, 0.5)
    assert torch.allclose(g[:, 0], torch.tensor([0.5 - 0.125, 1 - 0.25, -0.5, -1.0]))


def test_training_checkpoint_and_resume_give_the_same_result(tmp_path):
    straight = cr.main(TINY + ["--impl", "reference", "--variant", "retroactive", "--updates", "4",
                               "--out", str(tmp_path / "a")])
    assert straight is not None
    part = cr.main(TINY + ["--impl", "reference", "--variant", "retroactive", "--updates", "2",
                           "--out", str(tmp_path / "b")])
    assert part["updates"] == 2
    resumed = cr.main(TINY + ["--impl", "reference", "--variant", "retroactive", "--updates", "4", "--resume",
                              "--out", str(tmp_path / "b")])
    assert resumed["history"]["train_reward"] == straight["history"]["train_reward"]
    assert resumed["history"]["val_reward"] == straight["history"]["val_reward"]
    assert resumed["test"]["reward_per_trial"] == straight["test"]["reward_per_trial"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["best"]["update"] in m["history"]["val_updates"] and len(m["test"]["accuracy_by_trial"]) == 3
    assert (tmp_path / "a" / "curve.png").stat().st_size > 0
    # a checkpoint of another run is refused
    with pytest.raises(SystemExit):
        cr.main(TINY + ["--impl", "reference", "--variant", "simple", "--updates", "4", "--resume",
                        "--out", str(tmp_path / "b")])


def test_sweep_writes_the_summary(tmp_path):
    out = tmp_path / "sweep"
    s = cr.main(TINY + ["--impl", "reference", "--updates", "2", "--sweep", "--variants", "nonplastic", "simple",
                        "--seeds", "0", "1", "--out", str(out)])
    assert [r["variant"] for r in s["rows"]] == ["nonplastic", "simple"]
    assert all(r["test_reward"]["n"] == 2 for r in s["rows"])
    assert (out / "summary.md").is_file() and (out / "curves.png").stat().st_size > 0
    assert (out / "simple" / "seed-1" / "metrics.json").is_file()
    # a second call finds every run finished and only rewrites the summary
    again = cr.main(TINY + ["--impl", "reference", "--updates", "2", "--sweep", "--variants", "nonplastic",
                            "simple", "--seeds", "0", "1", "--out", str(out)])
    assert again["rows"] == s["rows"]


def test_bad_flags_are_rejected():
    with pytest.raises(SystemExit):
        cr.parse_args(["--num-cues", "1"])
    with pytest.raises(SystemExit):
        cr.parse_args(["--val-seed", "5", "--test-seed", "5"])
    with pytest.raises(SystemExit):
        cr.parse_args(["--variant", "lstm"])


@pytest.mark.parametrize("variant", ["plastic", "simple", "retroactive"])
def test_agent_is_the_plastic_rnn_layer_with_these_parameters(variant):
    """The agent's recurrent part is plastic_ops.nn.PlasticRNN with the same parameters (checked on the reference)."""
    from plastic_ops.nn import PlasticRNN
    cfg = cr.TaskConfig(cue_bits=5, trials=3)
    torch.manual_seed(5)
    agent = cr.Agent(cfg.obs_size, 9, variant, impl="reference", mod_init_scale=1.0)
    neuro = {"plastic": None, "simple": "simple", "retroactive": "retroactive"}[variant]
    layer = PlasticRNN(cfg.obs_size, 9, rule=agent.rule, clip=agent.clip, eta=agent.eta.item(),
                       learn_eta=variant == "plastic", neuromodulation=neuro, impl="reference")
    with torch.no_grad():
        layer.weight.copy_(agent.w), layer.alpha.copy_(agent.alpha)
        layer.weight_ih.copy_(agent.i2h.weight), layer.bias.copy_(agent.i2h.bias)
        if neuro is not None:
            layer.mod_weight.copy_(agent.h2mod.weight[0]), layer.mod_bias.copy_(agent.h2mod.bias[0])
            layer.mod_fanout_weight.copy_(agent.modfanout.weight[:, 0])
            layer.mod_fanout_bias.copy_(agent.modfanout.bias)
        if variant == "retroactive":
            layer.eligibility_eta.copy_(agent.eligibility_eta)
    obs = torch.randn(cfg.steps, 4, cfg.obs_size)
    y, state = layer(obs)
    logits, _, (y_last, trace, _) = agent(obs)
    torch.testing.assert_close(agent.h2o(y), logits)
    torch.testing.assert_close(state.trace, trace)


def test_bench_runs_and_writes_its_record(tmp_path):
    r = cr.main(["--bench", "--variant", "plastic", "--impl", "reference", "--threads", "1", "--trials", "2",
                 "--hidden", "6", "--batch-size", "3", "--bench-repeats", "1", "--out", str(tmp_path)])
    assert "median_s" in r["modes"]["reference-replay"]
    assert json.loads((tmp_path / "bench_plastic.json").read_text())["steps"] == 6
