"""Adversarial RLAIF (GAIL / SeqGAN form) on a task of rljax.tasks (default: embedded arithmetic, level 1), from a
freshly initialised model:

    python -m experiments.adversarial --smoke                       # ~1-2 min on 2 CPU cores
    python -m experiments.adversarial --seed 0                      # tiny preset, arithmetic level 1
    python -m experiments.adversarial --algorithm ppo --seed 0

The pipeline is `rljax.adversarial.adversarial_rlaif` (its docstring has the equations): SFT on the reference
completions (the expert demonstrations) of the first --n-sft train problems → --rounds rounds of (sample the policy
on --prompts-per-round expert prompts → --disc-steps discriminator steps on expert (label 1) vs those samples
(label 0) → --rl-iterations REINFORCE or PPO iterations on the reward f(logit D), --reward log_d |
neg_log_one_minus_d | logit | d). The next --n-expert train problems are the discriminator's demonstrations and the RL
prompts; --n-test held-out problems measure D (held-out references vs fresh policy samples) and the policy (greedy
and sampled accuracy, the task's gold score, which is never used for training, KL to the SFT policy).

Outputs under the run directory: results.md and results.jsonl (one row per stage: sft, round-0, ...),
<stage>/results.json, <stage>/stage.json (the stage's arguments; a rerun with others is refused),
round-r/samples.json (the round's expert rows, policy samples and fresh samples), discriminator_accuracy.png
(with matplotlib), results.json (config and rows). A killed run, started again with the same arguments, resumes
where it stopped.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import jax

from rljax.adversarial import AdversarialConfig, adversarial_rlaif
from rljax.checkpoint import write_json
from rljax.cli import IGNORED_FIELDS, LoggingFlags, apply_preset, make_run_dir, run, save_config
from rljax.eval import PolicyEvalConfig
from rljax.models import Model, preset
from rljax.pipelines import markdown_table
from rljax.state import OptimizerConfig
from rljax.tasks import get_task
from rljax.tokenizer import CharTokenizer


@dataclass
class Config(LoggingFlags):
    task: str = "arithmetic"
    levels: tuple[int, ...] = (1,)
    preset: str = "tiny"
    layers: int = 2
    max_seq_len: int = 96
    run_dir: str | None = None
    run_root: str = "runs"
    seed: int = 0
    n_sft: int = 512  # problems whose reference completions are the SFT data
    n_expert: int = 256  # the discriminator's expert demonstrations and the RL prompts
    n_test: int = 64  # held-out: D's held-out demonstrations and the policy's evaluation
    sft_steps: int = 400
    sft_batch: int = 16
    sft_lr: float = 3e-3
    rounds: int = 5
    prompts_per_round: int = 64
    disc_steps: int = 20
    disc_batch: int = 16
    disc_lr: float = 3e-4
    disc_head_lr: float = 3e-3  # the zero-initialised reward head learns faster than the backbone
    disc_init: str = "sft"  # sft: the SFT policy's backbone with a zero reward head; fresh: a new model
    replay: bool = False  # the discriminator trains on every round's samples so far
    algorithm: str = "reinforce"  # reinforce | ppo
    rl_iterations: int = 8
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int = 40
    temperature: float = 1.0
    rl_lr: float = 1e-4
    head_lr: float = 1e-3  # ppo: the value head's learning rate
    kl_coef: float | None = None  # the KL penalty to the SFT policy (None: the algorithm's, e.g. PPO's 0.05; 0: none)
    reward: str = "log_d"  # log_d | neg_log_one_minus_d | logit | d
    win_accuracy: float = 0.95
    win_d_policy: float = 0.1
    win_reward_std: float | None = None
    eval_samples: int = 4
    progress: bool = True
    smoke: bool = False
    force_config: bool = False  # rerun in a run_dir whose config.json differs: overwrite it, recording the change


SMOKE = dict(layers=1, max_seq_len=64, n_sft=32, n_expert=32, n_test=8, sft_steps=10, sft_batch=8, rounds=2,
             prompts_per_round=8, disc_steps=2, disc_batch=8, rl_iterations=2, prompts_per_iteration=4,
             samples_per_prompt=2, max_new_tokens=24, eval_samples=2)

COLUMNS = ("stage", "disc_accuracy", "d_expert_mean", "d_policy_mean", "reward_mean", "reward_std",
           "discriminator_wins", "accuracy_greedy", "accuracy_sampled", "gold_score", "kl_to_sft")


def pipeline_config(cfg: Config) -> AdversarialConfig:
    return AdversarialConfig(
        sft_steps=cfg.sft_steps, sft_batch_size=cfg.sft_batch, sft_optimizer=OptimizerConfig(lr=cfg.sft_lr,
                                                                                              schedule="constant"),
        rounds=cfg.rounds, prompts_per_round=cfg.prompts_per_round, disc_steps=cfg.disc_steps,
        disc_batch_size=cfg.disc_batch, disc_optimizer=OptimizerConfig(lr=cfg.disc_lr, schedule="constant",
                                                                   head_lr=cfg.disc_head_lr),
        discriminator_init=cfg.disc_init, replay=cfg.replay, algorithm=cfg.algorithm,
        rl_iterations=cfg.rl_iterations, prompts_per_iteration=cfg.prompts_per_iteration,
        samples_per_prompt=cfg.samples_per_prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        rl_optimizer=OptimizerConfig(lr=cfg.rl_lr, schedule="constant", b2=0.95, head_lr=cfg.head_lr),
        kl_coef=cfg.kl_coef, reward=cfg.reward, win_accuracy=cfg.win_accuracy, win_d_policy=cfg.win_d_policy,
        win_reward_std=cfg.win_reward_std,
        evaluation=PolicyEvalConfig(max_new_tokens=cfg.max_new_tokens, samples=cfg.eval_samples), seed=cfg.seed,
        log_every=max(cfg.rl_iterations // 2, 1), progress=cfg.progress, **cfg.loop_logging())


def _cell(row: dict, column: str) -> str:
    v = row.get(column)
    if v is None:
        return ""
    if column == "discriminator_wins":
        return "**YES**" if v else "no"
    return v if isinstance(v, str) else f"{v:.3f}"


def table(rows) -> str:
    """The rows as a markdown table of COLUMNS (the ones some row has)."""
    return markdown_table(rows, COLUMNS, _cell)


def verdict(rows, cfg: Config) -> str:
    """One line: the rounds where the discriminator won, or that it never did, with the detector's thresholds."""
    won = [r["round"] for r in rows if r.get("discriminator_wins")]
    rule = (f"held-out accuracy >= {cfg.win_accuracy} and mean D(policy) <= {cfg.win_d_policy}"
            + ("" if cfg.win_reward_std is None else f" and reward std < {cfg.win_reward_std}"))
    if won:
        return f"THE DISCRIMINATOR WON in round(s) {won} ({rule}): the reward carried little signal there"
    return f"the discriminator never won ({rule})"


def plot(rows, path: str) -> str | None:
    """The discriminator's held-out accuracy, mean D on each set and the policy's sampled accuracy per round (the
    SFT start at round -1) as a PNG; None without matplotlib."""
    from rljax.metrics import plot_curves

    rounds = [r for r in rows if "disc_accuracy" in r]
    curves = {name: {r["round"]: r[name] for r in rounds} for name in ("disc_accuracy", "d_expert_mean",
                                                                        "d_policy_mean")}
    curves["accuracy_sampled"] = {r["round"]: r["accuracy_sampled"] for r in rows if "accuracy_sampled" in r}
    try:
        return plot_curves(curves, path, xlabel="round (-1: SFT start)", ylabel="value")
    except ImportError:
        return None


def setup(cfg: Config):
    """(task, tokenizer, model, base params, problem sets) of `cfg`."""
    task = get_task(cfg.task)
    tok = CharTokenizer()
    model = Model(preset(cfg.preset, n_layers=cfg.layers, vocab_size=tok.vocab_size, max_seq_len=cfg.max_seq_len))
    params = model.init(jax.random.fold_in(jax.random.key(cfg.seed), 0))
    train, test = task.split(cfg.n_sft + cfg.n_expert, cfg.n_test, levels=cfg.levels, seed=cfg.seed)
    sets = dict(sft_problems=train[:cfg.n_sft], expert_problems=train[cfg.n_sft:], held_out=test)
    return task, tok, model, params, sets


def main(cfg: Config) -> dict:
    if cfg.smoke:
        apply_preset(cfg, **SMOKE)
    adv = pipeline_config(cfg)  # a bad flag fails here, before a run directory is made
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, f"adversarial-{cfg.algorithm}-seed{cfg.seed}")
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, run_dir, allow_change=cfg.force_config, ignore=IGNORED_FIELDS)  # before any training
    task, tok, model, params, sets = setup(cfg)
    print(f"adversarial: task {task.name}, {model.config.num_params() / 1e6:.2f}M params, {cfg.algorithm} on "
          f"r = {cfg.reward}(D), seed {cfg.seed}; {len(sets['sft_problems'])} SFT / {len(sets['expert_problems'])} "
          f"expert / {len(sets['held_out'])} held-out problems; run dir {run_dir}", flush=True)
    t0 = time.perf_counter()
    state, rows = adversarial_rlaif(params, adv, model=model, tokenizer=tok, task=task,
                                    key=jax.random.key(cfg.seed + 1), run_dir=run_dir,
                                    allow_change=cfg.force_config, **sets)
    wall = time.perf_counter() - t0
    png = plot(rows, os.path.join(run_dir, "discriminator_accuracy.png"))
    print("\n" + table(rows) + "\n\n" + verdict(rows, cfg))
    print(f"wall time {wall:.0f} s; the full table: {os.path.join(run_dir, 'results.md')}"
          + (f"; the curve: {png}" if png else ""))
    results = dict(config=asdict(cfg), run_dir=run_dir, rows=rows, wall_seconds=wall, plot=png)
    write_json(os.path.join(run_dir, "results.json"), results, default=str)  # atomic: a crash leaves no half file
    return dict(results, state=state)


if __name__ == "__main__":
    run(main, Config)  # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message
