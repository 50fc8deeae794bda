"""Experiment 4: cue-reward association, trained by reinforcement learning (Backpropamine: Miconi, Rawal,
Clune & Stanley, ICLR 2019).

Each episode draws a few random binary cues, one of which is secretly the rewarded one. Trial after
trial the agent sees two of the cues together and must answer: "the rewarded cue is there" (action 1)
or "it is not" (action 0); a right answer earns +1, a wrong one -1, and the reward comes back as an
input at the next step, while the pair is still shown. Nothing in the fixed weights can know which cue is rewarded
in this episode: the agent must find out by trial and error within the episode and remember it. That
is where plasticity, and neuromodulated plasticity above all, is meant to help.

The agent is Backpropamine's recurrent actor-critic: a plastic RNN (the fused op of plastic_ops), a
policy head and a value head, with the previous reward and action fed back as inputs. Four variants:

    nonplastic   alpha fixed at 0: an ordinary RNN of the same size
    plastic      Miconi et al. (2018): rule "hebb", learned eta, no neuromodulation
    simple       Backpropamine's simple neuromodulation: rule "add", eta 1, clip 2, a self-generated M_t
    retroactive  Backpropamine's retroactive neuromodulation: the same with an eligibility trace, clip 1

Training (A2C) alternates a ROLLOUT of the B episodes of a batch, one step at a time under
torch.no_grad() (the next input depends on the sampled action), and a REPLAY of the recorded inputs
in one call of the op with gradients, which computes the very same outputs, then the loss.

    python -m experiments.cue_reward --variant simple --seed 0                 # one run
    python -m experiments.cue_reward --variant simple --impl reference         # same on the reference
    python -m experiments.cue_reward --sweep --variants nonplastic plastic simple retroactive \\
        --seeds 0 1 2 --out results/cue_reward                                 # the comparison, then its table
    python -m experiments.cue_reward --summarize --out results/cue_reward      # table and figure only
    python -m experiments.cue_reward --bench --variant retroactive             # time one training step

Outputs of a run (in --out): metrics.json, curve.png, checkpoint.pt. Of a sweep: summary.md, summary.json,
curves.png. See docs/experiments/cue_reward.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

if __package__ in (None, ""):  # run as a file: make `experiments` and `plastic_ops` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plastic_ops  # noqa: E402
from plastic_ops import reference  # noqa: E402
from experiments.common import (CheckpointManager, ResultsDir, StopRequested, add_common_args,  # noqa: E402
                                restores_torch_threads, set_seed)
from experiments.common.progress import progress_bar  # noqa: E402
from experiments.common.seeds import spread  # noqa: E402

VARIANTS = ("nonplastic", "plastic", "simple", "retroactive")
ACTIONS = 2  # 0: "the rewarded cue is not in this trial's pair", 1: "it is"

# Fields of the command line that define a run: --resume refuses a checkpoint made with others.
RUN_FIELDS = ("variant", "hidden", "cue_bits", "num_cues", "trials", "batch_size", "lr", "gamma", "value_coef",
              "entropy_coef", "grad_clip", "seed", "plastic_eta", "eligibility_eta", "mod_init_scale", "val_seed",
              "val_episodes", "eval_every")


# ---------------------------------------------------------------------------------------------
# The task


@dataclass
class TaskConfig:
    cue_bits: int = 20  # each cue is a random +-1 vector of this many bits
    num_cues: int = 4  # cues per episode, one of them rewarded
    trials: int = 20  # trials per episode

    STEPS_PER_TRIAL = 3  # cue, response, feedback (the trial's pair of cues is shown at all three)
    RESPONSE = 1  # the phase of the trial where the answer counts

    @property
    def steps(self) -> int:
        return self.trials * self.STEPS_PER_TRIAL

    @property
    def obs_size(self) -> int:
        # the pair of cues (summed), "answer now", previous reward, previous action (one-hot), bias, time
        return self.cue_bits + 1 + 1 + ACTIONS + 1 + 1


class CueRewardEnv:
    """B independent episodes of the cue-reward association task, as tensors (every row in step).

    Each trial has 3 steps and shows the same pair of cues at all three: two distinct cues of the episode's
    set, superposed (their sum, an input that does not depend on their order). The cue step shows the pair
    alone; at the response step the "answer now" input is 1 and the action is scored; at the feedback step
    the reward of that answer comes back as an input. (The plastic weights act on the previous step's
    output, y_{t-1} @ (w + alpha * H): the cue step lets the response step read what the traces hold about
    this pair, and the feedback step pairs the response step's activity with the reward.) Reward: +1 when
    the action says rightly whether the rewarded cue is in the pair, -1 otherwise, 0 at the other steps.
    With 4 cues the rewarded one is in half of the pairs, so chance is 0 reward per trial. Inputs at every
    step also carry the previous step's reward and action, a bias and the time t / T (as in Backpropamine's
    code).
    """

    def __init__(self, cfg: TaskConfig, batch: int, generator: torch.Generator):
        self.cfg, self.B, self.t = cfg, batch, 0
        g, K, C = generator, cfg.num_cues, cfg.cue_bits
        self.cues = torch.randint(0, 2, (batch, K, C), generator=g).float() * 2 - 1
        self.target = torch.randint(0, K, (batch,), generator=g)
        # two distinct cues per trial, in random order
        self.pairs = torch.rand(batch, cfg.trials, K, generator=g).argsort(dim=-1)[..., :2]
        self.present = (self.pairs == self.target[:, None, None]).any(dim=-1)  # (B, trials)
        self.prev_reward = torch.zeros(batch)
        self.prev_action = torch.zeros(batch, dtype=torch.long)
        self.started = False

    @property
    def done(self) -> bool:
        return self.t >= self.cfg.steps

    def observe(self) -> torch.Tensor:
        cfg, B, C = self.cfg, self.B, self.cfg.cue_bits
        trial, phase = divmod(self.t, cfg.STEPS_PER_TRIAL)
        obs = torch.zeros(B, cfg.obs_size)
        rows = torch.arange(B)
        obs[:, :C] = self.cues[rows, self.pairs[:, trial, 0]] + self.cues[rows, self.pairs[:, trial, 1]]
        if phase == cfg.RESPONSE:
            obs[:, C] = 1.0
        obs[:, C + 1] = self.prev_reward
        if self.started:
            obs[rows, C + 2 + self.prev_action] = 1.0
        obs[:, C + 2 + ACTIONS] = 1.0
        obs[:, C + 3 + ACTIONS] = self.t / cfg.steps
        return obs

    def step(self, action: torch.Tensor) -> torch.Tensor:
        """Scores the action of the current step; returns the (B,) rewards and moves to the next step."""
        if self.done:
            raise RuntimeError("the episodes are over")
        trial, phase = divmod(self.t, self.cfg.STEPS_PER_TRIAL)
        if phase == self.cfg.RESPONSE:
            right = (action == 1) == self.present[:, trial]
            reward = torch.where(right, 1.0, -1.0)
        else:
            reward = torch.zeros(self.B)
        self.prev_reward, self.prev_action, self.started = reward, action.clone(), True
        self.t += 1
        return reward

    @staticmethod
    def response_mask(cfg: TaskConfig) -> torch.Tensor:
        """(T,) bool: the steps whose action is scored."""
        return torch.arange(cfg.steps) % cfg.STEPS_PER_TRIAL == cfg.RESPONSE


# ---------------------------------------------------------------------------------------------
# The agent


class Agent(nn.Module):
    """Backpropamine's recurrent actor-critic: x -> i2h -> plastic RNN (N units, tanh) -> policy, value.

    The recurrent layer is plastic_ops.plastic_rnn with y_{t-1} @ (w + alpha * H_t) + i2h(x_t); its
    parameters are those of Backpropamine's code (w and alpha from 0.001 * U(0, 1); h2mod: Linear(N, 1);
    modfanout: Linear(1, N)), passed to the op as mod_weight, mod_bias, mod_fanout_weight, mod_fanout_bias.
    mod_init_scale != 1 multiplies modfanout's initial weight by it and zeroes its bias: with nn.Linear's
    initialization the additive traces of a new network sit at the clip after one episode (where their
    gradient is 0), which a short training budget cannot afford to wait out.
    """

    def __init__(self, obs_size: int, hidden: int, variant: str, *, impl: str = "fused", plastic_eta: float = 0.01,
                 eligibility_eta: float = 0.1, mod_init_scale: float = 1.0):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant, self.impl, self.hidden = variant, impl, hidden
        self.i2h = nn.Linear(obs_size, hidden)
        self.w = nn.Parameter(0.001 * torch.rand(hidden, hidden))
        if variant == "nonplastic":
            self.register_buffer("alpha", torch.zeros(hidden, hidden))  # frozen at 0: an ordinary RNN
            self.register_buffer("eta", torch.tensor(0.0))
        else:
            self.alpha = nn.Parameter(0.001 * torch.rand(hidden, hidden))
            if variant == "plastic":
                self.eta = nn.Parameter(torch.tensor(float(plastic_eta)))  # learned, as in Miconi et al. 2018
            else:
                self.register_buffer("eta", torch.tensor(1.0))  # Backpropamine: the rate is M_t itself
        if variant in ("simple", "retroactive"):
            self.h2mod = nn.Linear(hidden, 1)
            self.modfanout = nn.Linear(1, hidden)
            if mod_init_scale != 1.0:  # a smaller initial M_t: the traces start far from the clip
                with torch.no_grad():
                    self.modfanout.weight.mul_(mod_init_scale)
                    self.modfanout.bias.zero_()
        if variant == "retroactive":
            self.eligibility_eta = nn.Parameter(torch.tensor(float(eligibility_eta)))
        self.h2o = nn.Linear(hidden, ACTIONS)
        self.h2v = nn.Linear(hidden, 1)

    @property
    def rule(self) -> str:
        return "add" if self.variant in ("simple", "retroactive") else "hebb"

    @property
    def clip(self):
        return {"simple": 2.0, "retroactive": 1.0}.get(self.variant)

    def op_kwargs(self) -> dict:
        kw = {"rule": self.rule, "clip": self.clip}
        if self.variant in ("simple", "retroactive"):
            kw.update(mod_weight=self.h2mod.weight[0], mod_bias=self.h2mod.bias[0],
                      mod_fanout_weight=self.modfanout.weight[:, 0], mod_fanout_bias=self.modfanout.bias)
        if self.variant == "retroactive":
            kw["eligibility_eta"] = self.eligibility_eta
        return kw

    def backend(self):
        return plastic_ops if self.impl == "fused" else reference

    def forward(self, obs: torch.Tensor, state=None):
        """obs (T, B, obs_size); state None (new episodes) or (y, trace, eligibility) from a previous call.
        Returns logits (T, B, ACTIONS), values (T, B) and the state after the last step."""
        y0, trace, elig = (None, None, None) if state is None else state
        kw = self.op_kwargs()
        if self.variant == "retroactive" and elig is not None:
            kw["eligibility"] = elig
        out = self.backend().plastic_rnn(self.i2h(obs), self.w, self.alpha, self.eta, trace, y0, **kw)
        y, trace = out[0], out[1]
        elig = out[2] if self.variant == "retroactive" else None
        return self.h2o(y), self.h2v(y).squeeze(-1), (y[-1], trace, elig)


def num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Rollout, replay, loss


@dataclass
class Rollout:
    obs: torch.Tensor  # (T, B, obs_size)
    actions: torch.Tensor  # (T, B)
    rewards: torch.Tensor  # (T, B)
    logits: torch.Tensor  # (T, B, ACTIONS), as computed step by step
    values: torch.Tensor  # (T, B)


@torch.no_grad()
def rollout(agent: Agent, env: CueRewardEnv, generator: torch.Generator | None, greedy: bool = False) -> Rollout:
    """Play the env's episodes to the end, one T = 1 call per step, without a graph.

    Actions are sampled from the policy with `generator` (or the most likely one with greedy=True)."""
    state, obs, actions, rewards, logits, values = None, [], [], [], [], []
    while not env.done:
        o = env.observe()
        logit, value, state = agent(o[None], state)
        if greedy:
            a = logit[0].argmax(dim=-1)
        else:
            a = torch.multinomial(torch.softmax(logit[0], dim=-1), 1, generator=generator)[:, 0]
        r = env.step(a)
        obs.append(o), actions.append(a), rewards.append(r), logits.append(logit[0]), values.append(value[0])
    return Rollout(*map(torch.stack, (obs, actions, rewards, logits, values)))


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} within each episode (every row ends at the last step)."""
    returns, G = torch.zeros_like(rewards), torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        G = rewards[t] + gamma * G
        returns[t] = G
    return returns


def a2c_loss(logits, values, ro: Rollout, mask: torch.Tensor, gamma: float, value_coef: float,
             entropy_coef: float):
    """The A2C loss of a replayed rollout. The policy term and the entropy bonus count the response steps
    (`mask`, (T,)), where the action matters; the value term counts every step."""
    returns = discounted_returns(ro.rewards, gamma)
    advantage = returns - values
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ro.actions.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    m = mask.to(logits.dtype)[:, None].expand_as(logp)
    policy = -(logp * advantage.detach() * m).sum() / m.sum()
    value = advantage.pow(2).mean()
    ent = (entropy * m).sum() / m.sum()
    loss = policy + value_coef * value - entropy_coef * ent
    return loss, {"policy": policy.item(), "value": value.item(), "entropy": ent.item()}


def reward_per_trial(rewards: torch.Tensor, cfg: TaskConfig) -> torch.Tensor:
    """(B,) mean reward per trial of each episode (+1: always right, 0: chance, -1: always wrong)."""
    return rewards.sum(0) / cfg.trials


def train_step(agent: Agent, optimizer, cfg: TaskConfig, args, env_gen, act_gen, mask):
    """One A2C update on a fresh batch: rollout, replay, loss, step. Returns (mean reward per trial, stats)."""
    env = CueRewardEnv(cfg, args.batch_size, env_gen)
    ro = rollout(agent, env, act_gen)
    logits, values, _ = agent(ro.obs)  # the replay: one call, with gradients
    loss, stats = a2c_loss(logits, values, ro, mask, args.gamma, args.value_coef, args.entropy_coef)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(agent.parameters(), args.grad_clip))
    optimizer.step()
    stats["loss"] = loss.item()
    return reward_per_trial(ro.rewards, cfg).mean().item(), stats


@torch.no_grad()
def evaluate(agent: Agent, cfg: TaskConfig, episodes: int, seed: int, batch: int = 500) -> dict:
    """Greedy play on `episodes` fresh episodes drawn from `seed` (the same episodes for every run).

    Returns the mean reward per trial, the accuracy of the answers, and the accuracy per trial index
    (how fast the agent finds the rewarded cue within an episode)."""
    g = torch.Generator().manual_seed(seed)
    per_episode, per_trial = [], []
    done = 0
    mask = CueRewardEnv.response_mask(cfg)
    while done < episodes:
        n = min(batch, episodes - done)
        ro = rollout(agent, CueRewardEnv(cfg, n, g), None, greedy=True)
        per_episode.append(reward_per_trial(ro.rewards, cfg))
        per_trial.append((ro.rewards[mask] > 0).float())  # (trials, n)
        done += n
    r = torch.cat(per_episode)
    acc_trial = torch.cat(per_trial, dim=1).mean(dim=1)
    return {"episodes": episodes, "seed": seed, "reward_per_trial": r.mean().item(),
            "reward_per_trial_sem": (r.std() / math.sqrt(len(r))).item() if len(r) > 1 else 0.0,
            "accuracy": (r.mean().item() + 1) / 2, "accuracy_by_trial": acc_trial.tolist()}


# ---------------------------------------------------------------------------------------------
# Training loop


def run_fields(args) -> dict:
    return {k: getattr(args, k) for k in RUN_FIELDS}


def build_agent(args, cfg: TaskConfig) -> Agent:
    return Agent(cfg.obs_size, args.hidden, args.variant, impl=args.impl, plastic_eta=args.plastic_eta,
                 eligibility_eta=args.eligibility_eta, mod_init_scale=args.mod_init_scale)


def make_optimizer(agent: Agent, lr: float):
    return torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=lr, eps=1e-4)


def train(args, agent: Agent, optimizer, cfg: TaskConfig, results: ResultsDir):
    """The training loop with its validation points and the best checkpoint on validation.

    Everything it needs is in checkpoint.pt (saved every --checkpoint-every updates, at the end and on Ctrl-C):
    the model, the optimizer, both generators (episodes, actions), the history, the best validated state."""
    ckpt = CheckpointManager(results.file("checkpoint.pt"), every=args.checkpoint_every)
    env_gen = torch.Generator().manual_seed(10_000 + args.seed)
    act_gen = torch.Generator().manual_seed(20_000 + args.seed)
    mask = CueRewardEnv.response_mask(cfg)
    history = {"updates": [], "episodes": [], "train_reward": [], "loss": [], "entropy": [],
               "val_updates": [], "val_episodes": [], "val_reward": []}
    best = {"reward": -math.inf, "update": 0, "model": None}
    update, elapsed = 0, 0.0
    if args.resume:
        state = ckpt.load()
        if state is None:
            raise SystemExit(f"--resume: no checkpoint at {ckpt.path}")
        mismatch = {k: (v, state["run"].get(k)) for k, v in run_fields(args).items() if state["run"].get(k) != v}
        if mismatch:
            detail = ", ".join(f"--{k.replace('_', '-')} {new!r} (checkpoint: {old!r})"
                               for k, (new, old) in mismatch.items())
            raise SystemExit(f"--resume: the checkpoint in {results.path} belongs to another run: {detail}")
        agent.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        env_gen.set_state(state["env_generator"])
        act_gen.set_state(state["act_generator"])
        history, best, update, elapsed = state["history"], state["best"], state["update"], state["elapsed"]
        print(f"Resuming from {ckpt.path} at update {update}")

    def make_state():
        return {"run": run_fields(args), "model": agent.state_dict(), "optimizer": optimizer.state_dict(),
                "env_generator": env_gen.get_state(), "act_generator": act_gen.get_state(), "history": history,
                "best": best, "update": update, "elapsed": elapsed}

    def validate():
        if history["val_updates"] and history["val_updates"][-1] == update:
            return
        r = evaluate(agent, cfg, args.val_episodes, args.val_seed)["reward_per_trial"]
        history["val_updates"].append(update)
        history["val_episodes"].append(update * args.batch_size)
        history["val_reward"].append(r)
        if r > best["reward"]:
            best.update(reward=r, update=update, model={k: v.clone() for k, v in agent.state_dict().items()})

    bar = progress_bar(total=args.updates, initial=update, unit="upd", disable=args.no_progress,
                       desc=f"{args.variant}/{args.impl}/seed {args.seed}")
    if update == 0:
        validate()
    with ckpt.catch_interrupt():
        while update < args.updates:
            t0 = time.perf_counter()
            r, stats = train_step(agent, optimizer, cfg, args, env_gen, act_gen, mask)
            elapsed += time.perf_counter() - t0
            update += 1
            history["updates"].append(update)
            history["episodes"].append(update * args.batch_size)
            history["train_reward"].append(r)
            history["loss"].append(stats["loss"])
            history["entropy"].append(stats["entropy"])
            if update % args.eval_every == 0 or update == args.updates:
                validate()
            bar.update(1)
            tail = history["train_reward"][-20:]
            bar.set_postfix(reward=f"{np.mean(tail):+.3f}", val=f"{history['val_reward'][-1]:+.3f}")
            ckpt.maybe_save(update, make_state)
            if ckpt.stop_requested:
                ckpt.save(make_state())
                bar.close()
                raise StopRequested
    bar.close()
    ckpt.save(make_state())  # the finished run: --resume with a larger --updates continues it
    return history, best, elapsed


# ---------------------------------------------------------------------------------------------
# Figures and summaries


def smooth(values, window):
    values = np.asarray(values, dtype=float)
    if len(values) < 2 or window <= 1:
        return values
    window = min(window, len(values))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_run(history, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ep = np.asarray(history["episodes"])
    ax.plot(ep, history["train_reward"], color="0.8", lw=0.6, label="training batch (sampled actions)")
    w = 20
    if len(ep) >= w:
        ax.plot(ep[w - 1:], smooth(history["train_reward"], w), color="C0", lw=1.2, label=f"mean of {w} batches")
    ax.plot(history["val_episodes"], history["val_reward"], "o-", color="C3", ms=3, lw=1.2,
            label="validation (greedy)")
    ax.axhline(0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("training episodes")
    ax.set_ylabel("reward per trial")
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_folder(out: Path, variant: str, seed: int) -> Path:
    return Path(out) / variant / f"seed-{seed}"


def collect(out: Path) -> dict:
    """{variant: {seed: metrics}} of the finished runs under out/VARIANT/seed-S."""
    found = {}
    for variant in VARIANTS:
        for path in sorted((Path(out) / variant).glob("seed-*/metrics.json")):
            m = json.loads(path.read_text())
            found.setdefault(variant, {})[m["seed"]] = m
    return found


def _fmt(s, digits=3):
    if s["std"] is None:
        return f"{s['mean']:+.{digits}f}"
    return f"{s['mean']:+.{digits}f} ± {s['std']:.{digits}f}"


def _pct(s):
    if s["std"] is None:
        return f"{100 * s['mean']:.1f}%"
    return f"{100 * s['mean']:.1f}% ± {100 * s['std']:.1f}"


def summarize(out: Path) -> dict:
    """summary.json, summary.md (the table) and curves.png (validation curves, mean over seeds, min-max band)."""
    out = Path(out)
    runs = collect(out)
    if not runs:
        raise SystemExit(f"no finished runs under {out}")
    rows = []
    for variant, by_seed in runs.items():
        seeds = sorted(by_seed)
        test = [by_seed[s]["test"]["reward_per_trial"] for s in seeds]
        val = [by_seed[s]["best"]["val_reward"] for s in seeds]
        last = [by_seed[s]["test"]["accuracy_last_third"] for s in seeds]
        rows.append({"variant": variant, "seeds": seeds, "test_reward": spread(test), "best_val_reward": spread(val),
                     "test_accuracy_last_third": spread(last),
                     "best_update": [by_seed[s]["best"]["update"] for s in seeds],
                     "train_s": [by_seed[s]["train_wall_s"] for s in seeds],
                     "impl": sorted({by_seed[s]["impl"] for s in seeds})})
    lines = ["| variant | seeds | held-out test reward per trial (mean ± sd) | min .. max | "
             "test accuracy, last third of the trials | best validation reward | update chosen | impl |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["test_reward"]
        lines.append(f"| {r['variant']} | {len(r['seeds'])} | {_fmt(t)} | {min(t['values']):+.3f} .. "
                     f"{max(t['values']):+.3f} | {_pct(r['test_accuracy_last_third'])} | "
                     f"{_fmt(r['best_val_reward'])} | {', '.join(map(str, r['best_update']))} | "
                     f"{', '.join(r['impl'])} |")
    lines.append("")
    lines.append("reward per trial: +1 always right, 0 chance, -1 always wrong; sd: sample standard deviation "
                 "over the seeds; test: greedy actions on held-out episodes; the update (checkpoint) of each seed "
                 "was chosen on validation episodes.")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_summary(runs, out / "curves.png")
    return {"rows": rows, "table": "\n".join(lines)}


def plot_summary(runs: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (variant, by_seed) in enumerate(runs.items()):
        seeds = sorted(by_seed)
        color = f"C{VARIANTS.index(variant)}"
        # validation curves (greedy), on the points every run shares
        n = min(len(by_seed[s]["history"]["val_reward"]) for s in seeds)
        x = np.asarray(by_seed[seeds[0]]["history"]["val_episodes"][:n])
        v = np.asarray([by_seed[s]["history"]["val_reward"][:n] for s in seeds])
        axes[0].plot(x, v.mean(0), color=color, lw=1.5, label=f"{variant} ({len(seeds)} seeds)")
        axes[0].fill_between(x, v.min(0), v.max(0), color=color, alpha=0.18, lw=0)
        # accuracy by trial index within the held-out episodes, at the chosen checkpoint
        acc = np.asarray([by_seed[s]["test"]["accuracy_by_trial"] for s in seeds])
        k = np.arange(1, acc.shape[1] + 1)
        axes[1].plot(k, acc.mean(0), "o-", ms=3, color=color, lw=1.5, label=variant)
        axes[1].fill_between(k, acc.min(0), acc.max(0), color=color, alpha=0.18, lw=0)
    axes[0].axhline(0, color="k", lw=0.6, ls=":")
    axes[0].set_xlabel("training episodes")
    axes[0].set_ylabel("validation reward per trial (greedy)")
    axes[0].set_title("learning curves: mean over seeds, band min..max", fontsize=9)
    axes[1].axhline(0.5, color="k", lw=0.6, ls=":")
    axes[1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[1].set_xlabel("trial within the episode")
    axes[1].set_ylabel("accuracy of the answer (held-out test)")
    axes[1].set_title("within-episode learning at the chosen checkpoint", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Timing of one training step


def bench(args) -> dict:
    """Median wall-clock of one training step (rollout + replay forward and backward) at the run's size:
    the replay as one call of the fused op, one call of the reference, and T chained T = 1 calls of the
    fused op under autograd (the original code's way: the graph built during the rollout itself); and the
    rollout alone on each implementation."""
    cfg = TaskConfig(args.cue_bits, args.num_cues, args.trials)
    mask = CueRewardEnv.response_mask(cfg)
    results = {}
    modes = ["fused-replay", "reference-replay", "fused-chained", "fused-rollout-only", "reference-rollout-only"]
    for mode in modes:
        set_seed(args.seed)
        agent = build_agent(args, cfg)
        agent.impl = "reference" if mode.startswith("reference") else "fused"
        opt = make_optimizer(agent, args.lr)
        env_gen, act_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        times = []
        try:
            for i in range(args.bench_repeats + 1):
                t0 = time.perf_counter()
                if mode.endswith("replay"):
                    train_step(agent, opt, cfg, args, env_gen, act_gen, mask)
                elif mode.endswith("rollout-only"):  # the part of a step that the replay cannot speed up
                    rollout(agent, CueRewardEnv(cfg, args.batch_size, env_gen), act_gen)
                else:
                    chained_step(agent, opt, cfg, args, env_gen, act_gen, mask)
                if i > 0:  # the first is a warm-up
                    times.append(time.perf_counter() - t0)
        except (RuntimeError, NotImplementedError) as e:
            results[mode] = {"error": str(e).splitlines()[0]}
            print(f"{mode}: not available: {results[mode]['error']}")
            continue
        results[mode] = {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "repeats": len(times)}
        what = "rollout" if mode.endswith("rollout-only") else "training step"
        print(f"{mode}: median {1000 * results[mode]['median_s']:.1f} ms per {what} "
              f"(min {1000 * results[mode]['min_s']:.1f} ms, {len(times)} repeats)")
    base = results.get("fused-replay", {}).get("median_s")
    for mode in modes[1:3]:
        if base and "median_s" in results[mode]:
            results[mode]["ratio_to_fused_replay"] = results[mode]["median_s"] / base
            print(f"{mode} / fused-replay: {results[mode]['ratio_to_fused_replay']:.2f}x")
    record = {"variant": args.variant, "hidden": args.hidden, "batch_size": args.batch_size, "steps": cfg.steps,
              "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()), "modes": results}
    path = ResultsDir(args.out).write_json(f"bench_{args.variant}.json", record)
    print(f"Written to {path}")
    return record


def chained_step(agent: Agent, optimizer, cfg: TaskConfig, args, env_gen, act_gen, mask):
    """The same update with the graph built step by step during the rollout (T chained T = 1 calls)."""
    env = CueRewardEnv(cfg, args.batch_size, env_gen)
    state, obs, actions, rewards, logits, values = None, [], [], [], [], []
    while not env.done:
        o = env.observe()
        logit, value, state = agent(o[None], state)
        with torch.no_grad():
            a = torch.multinomial(torch.softmax(logit[0], dim=-1), 1, generator=act_gen)[:, 0]
        r = env.step(a)
        obs.append(o), actions.append(a), rewards.append(r), logits.append(logit[0]), values.append(value[0])
    obs, actions, rewards = map(torch.stack, (obs, actions, rewards))
    logits, values = torch.stack(logits), torch.stack(values)
    ro = Rollout(obs, actions, rewards, logits.detach(), values.detach())
    loss, _ = a2c_loss(logits, values, ro, mask, args.gamma, args.value_coef, args.entropy_coef)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(agent.parameters(), args.grad_clip)
    optimizer.step()


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Cue-reward association by reinforcement learning with neuromodulated plasticity "
                    "(Backpropamine, Miconi et al. 2019): four variants of a recurrent A2C agent.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_args(p, default_out="results/cue_reward/run")
    p.add_argument("--variant", choices=VARIANTS, default="simple")
    g = p.add_argument_group("task")
    g.add_argument("--cue-bits", type=int, default=20, help="bits per cue (random +-1)")
    g.add_argument("--num-cues", type=int, default=4, help="cues per episode, one of them rewarded")
    g.add_argument("--trials", type=int, default=20, help="trials per episode (3 steps each)")
    m = p.add_argument_group("agent")
    m.add_argument("--hidden", type=int, default=64, help="units of the plastic recurrent layer")
    m.add_argument("--plastic-eta", type=float, default=0.01, help="initial learned eta of the 'plastic' variant")
    m.add_argument("--mod-init-scale", type=float, default=0.1,
                   help="initial modfanout weight times this, its bias 0 (1: nn.Linear's initialization, as "
                        "Backpropamine's code)")
    m.add_argument("--eligibility-eta", type=float, default=0.1,
                   help="initial (learned) eligibility rate of the 'retroactive' variant")
    t = p.add_argument_group("training (A2C)")
    t.add_argument("--updates", type=int, default=800, help="optimizer updates (each on --batch-size episodes)")
    t.add_argument("--batch-size", type=int, default=32, help="episodes played in parallel per update")
    t.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    t.add_argument("--gamma", type=float, default=0.9, help="discount of the returns")
    t.add_argument("--value-coef", type=float, default=0.1, help="weight of the value loss")
    t.add_argument("--entropy-coef", type=float, default=0.03, help="weight of the entropy bonus")
    t.add_argument("--grad-clip", type=float, default=4.0, help="gradient norm clip")
    t.add_argument("--checkpoint-every", type=int, default=50, help="save a checkpoint every this many updates")
    t.add_argument("--eval-every", type=int, default=25, help="validate every this many updates")
    t.add_argument("--val-episodes", type=int, default=256, help="validation episodes (choose the checkpoint)")
    t.add_argument("--val-seed", type=int, default=1001, help="seed of the validation episodes")
    t.add_argument("--test-episodes", type=int, default=2000, help="held-out test episodes (reported only)")
    t.add_argument("--test-seed", type=int, default=2002, help="seed of the held-out test episodes")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = p.add_argument_group("several runs")
    s.add_argument("--sweep", action="store_true",
                   help="run every --variants x --seeds into OUT/VARIANT/seed-S (finished runs are skipped, "
                        "interrupted ones resumed), then write the summary")
    s.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    s.add_argument("--summarize", action="store_true", help="only write the summary of the runs under --out")
    b = p.add_argument_group("timing")
    b.add_argument("--bench", action="store_true", help="time one training step: fused vs reference vs chained")
    b.add_argument("--bench-repeats", type=int, default=10)
    args = p.parse_args(argv)
    for name in ("cue_bits", "trials", "hidden", "updates", "batch_size", "checkpoint_every", "eval_every",
                 "val_episodes", "test_episodes", "bench_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.num_cues < 2:
        p.error(f"--num-cues must be at least 2 (each trial shows two distinct cues), got {args.num_cues}")
    if args.val_seed == args.test_seed:
        p.error("--val-seed must differ from --test-seed: the test episodes must stay unseen")
    if args.lr <= 0:
        p.error(f"--lr must be positive, got {args.lr}")
    return args


@restores_torch_threads
def main(argv=None) -> dict | None:
    """One run (or a sweep, a summary, a timing). Returns the metrics (None when stopped by Ctrl-C)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.impl == "fused" and not plastic_ops.extension_available():
        raise SystemExit("--impl fused needs the compiled extension of plastic_ops, which is not available "
                         "(build it, see README.md), or run with --impl reference")
    if args.summarize:
        s = summarize(Path(args.out))
        print(s["table"])
        return s
    if args.bench:
        return bench(args)
    if args.sweep:
        return sweep(args, argv)
    return run(args)


def sweep(args, argv) -> dict | None:
    out = Path(args.out)
    drop = {"--sweep", "--summarize", "--resume"}
    base, skip = [], False
    for a in argv if argv is not None else sys.argv[1:]:  # the per-run command: the sweep's own flags removed
        if skip:
            if a.startswith("--"):
                skip = False
            else:
                continue
        if a in ("--variants", "--seeds", "--out", "--seed", "--variant"):
            skip = True
            continue
        if a.split("=")[0] in drop | {"--variants", "--seeds", "--out", "--seed", "--variant"}:
            continue
        base.append(a)
    for variant in args.variants:
        for seed in args.seeds:
            folder = run_folder(out, variant, seed)
            if (folder / "metrics.json").is_file():
                print(f"{variant} seed {seed}: finished earlier ({folder})")
                continue
            resume = ["--resume"] if (folder / "checkpoint.pt").is_file() else []
            print(f"{variant} seed {seed}: running into {folder}" + (" (resuming)" if resume else ""))
            if main(base + ["--variant", variant, "--seed", str(seed), "--out", str(folder)] + resume) is None:
                return None
    s = summarize(out)
    print(s["table"])
    return s


def run(args) -> dict | None:
    cfg = TaskConfig(args.cue_bits, args.num_cues, args.trials)
    results = ResultsDir(args.out)
    set_seed(args.seed)
    agent = build_agent(args, cfg)
    optimizer = make_optimizer(agent, args.lr)
    print(f"{args.variant} agent, impl={args.impl}, N={args.hidden}, {num_trainable(agent):,} trained parameters, "
          f"T={cfg.steps} steps ({cfg.trials} trials) per episode, batch {args.batch_size}, {args.updates} updates")
    try:
        history, best, elapsed = train(args, agent, optimizer, cfg, results)
    except StopRequested:
        print(f"Stopped; checkpoint saved in {results.path}. Continue with the same command plus --resume.")
        return None
    final_state = {k: v.clone() for k, v in agent.state_dict().items()}
    agent.load_state_dict(best["model"])  # the checkpoint chosen on validation
    test = evaluate(agent, cfg, args.test_episodes, args.test_seed)
    third = max(1, cfg.trials // 3)
    test["accuracy_last_third"] = float(np.mean(test["accuracy_by_trial"][-third:]))
    agent.load_state_dict(final_state)
    title = (f"{args.variant} ({args.impl}), N={args.hidden}, seed {args.seed}: held-out reward per trial "
             f"{test['reward_per_trial']:+.3f} at update {best['update']}")
    plot_run(history, results.file("curve.png"), title)
    extra = {}
    if args.variant == "plastic":
        extra["eta"] = agent.eta.item()
    if args.variant == "retroactive":
        extra["eligibility_eta"] = agent.eligibility_eta.item()
    metrics = {"experiment": "cue_reward", "variant": args.variant, "impl": args.impl, "seed": args.seed,
               "hidden": args.hidden, "trained_parameters": num_trainable(agent), "steps_per_episode": cfg.steps,
               "updates": args.updates, "episodes": args.updates * args.batch_size,
               "best": {"update": best["update"], "episodes": best["update"] * args.batch_size,
                        "val_reward": best["reward"]},
               "test": test, "train_wall_s": elapsed, "learned": extra, "args": vars(args), "history": history}
    results.write_json("metrics.json", metrics)
    print(f"{args.variant} seed {args.seed}: best validation reward {best['reward']:+.3f} at update {best['update']}; "
          f"held-out test reward per trial {test['reward_per_trial']:+.3f} ± {test['reward_per_trial_sem']:.3f} "
          f"(accuracy {100 * test['accuracy']:.1f}%, last third of trials {100 * test['accuracy_last_third']:.1f}%); "
          f"training {elapsed:.0f} s")
    print(f"Results in {results.path}: metrics.json, curve.png, checkpoint.pt")
    return metrics


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 130)
