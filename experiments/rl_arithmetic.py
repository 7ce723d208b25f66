"""RL on the arithmetic task, starting from the SFT study's checkpoint.

    python -m experiments.rl_arithmetic --algo grpo               # runs SFT first if its checkpoint is missing
    python -m experiments.rl_arithmetic --algo rloo --iterations 40
    python -m experiments.rl_arithmetic --smoke

--algo is any entry of rljax.algorithms.ALGORITHMS (reinforce, rloo, scst, mrt,
grpo, dr_grpo, dapo, a2c, ppo, trpo; A3C is a2c with --staleness 1 or more). Reward: 1 for the right final answer + 0.1 for the
step;...;answer:N format (+ --step-reward times the fraction of right steps).
Reports held-out accuracy before/after (greedy, and sampled at temperature 1),
mean reward, KL to the SFT policy and wall time; outputs under the run directory.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import jax

from experiments import sft_arithmetic
from rljax.algorithms import get_algorithm
from rljax.checkpoint import Checkpointer
from rljax.cli import make_run_dir, parse_config, save_config
from rljax.data.arithmetic import make_split
from rljax.data.collate import BatchIterator
from rljax.losses import GRPOConfig, TRPOConfig
from rljax.losses.actor_critic import with_value_head
from rljax.metrics import read_metrics
from rljax.phases import LoopConfig, PromptBatch, rl
from rljax.rewards import (arithmetic_answer_reward, arithmetic_format_reward, arithmetic_step_reward,
                           weighted_sum)
from rljax.rl import RLConfig, create_rl_state
from rljax.sampling import SampleConfig
from rljax.state import OptimizerConfig, create_state
from rljax.tokenizer import CharTokenizer


@dataclass
class Config:
    algo: str = "grpo"
    iterations: int = 30
    prompts_per_iteration: int = 16
    n: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    lr: float = 2e-5
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    kl_coef: float = 0.0
    step_reward: float = 0.0  # weight of the fraction of right steps (partial credit) in the reward
    epochs: int = 1
    minibatches: int = 1
    max_refills: int = 0  # dynamic sampling (dapo): refill batches with informative groups
    staleness: int = 0  # A3C (with --algo a2c): actor threads sample this many iterations ahead of the learner
    actors: int = 2  # A3C: actor threads
    max_kl: float = 0.01  # trpo: the trust region δ
    head_lr: float = 1e-3  # learning rate of the value head (a2c, ppo: on the policy's backbone; trpo: the critic's)
    critic_lr: float = 1e-4  # trpo: the separate critic's learning rate
    critic_epochs: int = 4  # trpo: critic regression passes per iteration
    sft_run_dir: str = "runs/sft_arithmetic-default"
    run_dir: str | None = None
    run_root: str = "runs"
    seed: int = 0
    progress: bool = True
    track_kl: bool = True  # KL to the SFT policy every iteration (one reference forward; training is unchanged)
    eval_samples: int = 8  # held-out accuracy is also measured on this many samples per problem at temperature 1
    smoke: bool = False


def finished_sft(run_dir: str, steps: int) -> bool:
    """True when `run_dir` holds the SFT study's checkpoint after `steps` steps."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(ckpt_dir) and Checkpointer(ckpt_dir).latest_step() == steps


def load_sft(cfg: Config, tok):
    """Params of the SFT study's final checkpoint, running the study if it is missing.
    The SFT run's config.json (when there) gives its model and its train/test split."""
    saved = os.path.join(cfg.sft_run_dir, "config.json")
    if os.path.exists(saved):
        with open(saved) as f:
            fields = {k: v for k, v in json.load(f).items() if k in sft_arithmetic.Config.__dataclass_fields__}
        fields["levels"] = tuple(fields.get("levels", (1,)))
        sft_cfg = sft_arithmetic.Config(**{**fields, "run_dir": cfg.sft_run_dir, "progress": cfg.progress})
    else:
        sft_cfg = sft_arithmetic.Config(run_dir=cfg.sft_run_dir, smoke=cfg.smoke, progress=cfg.progress)
    sft_arithmetic.apply_smoke(sft_cfg)
    ckpt_dir = os.path.join(cfg.sft_run_dir, "checkpoints")
    if not finished_sft(cfg.sft_run_dir, sft_cfg.steps):
        print(f"no finished SFT checkpoint in {cfg.sft_run_dir}: running the SFT study first")
        sft_arithmetic.main(sft_cfg)
    model = sft_arithmetic.build_model(sft_cfg, tok)
    target = create_state(model, sft_arithmetic.optimizer_config(sft_cfg), jax.random.key(0))
    with Checkpointer(ckpt_dir) as ck:
        state, _ = ck.restore(target)
    return model, state.params, sft_cfg


def main(cfg: Config) -> dict:
    if cfg.smoke:
        cfg.iterations, cfg.prompts_per_iteration, cfg.n, cfg.max_new_tokens = 3, 4, 4, 16
    tok = CharTokenizer()
    model, params, sft_cfg = load_sft(cfg, tok)
    algo = get_algorithm(cfg.algo)
    critic_model = critic_params = None
    if algo.needs().critic:  # trpo: a separate critic, initialised from the policy (V = 0 at first)
        critic_model, critic_params = with_value_head(model, params)
    elif algo.needs().values:  # a2c, ppo: a value head on the policy's backbone, V = 0 at first
        model, params = with_value_head(model, params)
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, f"rl_arithmetic-{cfg.algo}")
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, run_dir)
    train, test = make_split(sft_cfg.n_train, sft_cfg.n_test, levels=sft_cfg.levels, seed=sft_cfg.seed)

    def collate(problems):
        tokens, mask = tok.encode_batch([p.prompt for p in problems], padding_side="left")
        return PromptBatch(tokens=tokens, mask=mask, metadata={"problems": list(problems)})

    prompts = BatchIterator(train, cfg.prompts_per_iteration, collate, seed=cfg.seed + 1)
    terms = [(1.0, arithmetic_answer_reward), (0.1, arithmetic_format_reward)]
    reward = weighted_sum(*terms, *([(cfg.step_reward, arithmetic_step_reward)] if cfg.step_reward else []))
    algo = algo.with_kl_coef(cfg.kl_coef)
    loss = algo.loss.config
    if isinstance(loss, TRPOConfig):
        algo = algo.with_config(max_kl=cfg.max_kl)
    if isinstance(loss, GRPOConfig) and loss.aggregation == "constant":  # Dr. GRPO: normalise by the max length
        algo = algo.with_config(constant=float(cfg.max_new_tokens))
    rl_cfg = RLConfig(algorithm=algo,
                      sampling=SampleConfig(max_new_tokens=cfg.max_new_tokens, n=cfg.n, temperature=cfg.temperature,
                                            eos_id=tok.eos_id, pad_id=tok.pad_id),
                      optimizer=OptimizerConfig(lr=cfg.lr, schedule="constant", b2=cfg.adam_b2, eps=cfg.adam_eps,
                                                head_lr=cfg.head_lr),
                      epochs=cfg.epochs, track_kl=cfg.track_kl,
                      minibatches=cfg.minibatches, max_refills=cfg.max_refills, staleness=cfg.staleness,
                      actors=cfg.actors, critic_epochs=cfg.critic_epochs,
                      critic_optimizer=OptimizerConfig(lr=cfg.critic_lr, schedule="constant", head_lr=cfg.head_lr))
    state = create_rl_state(model, params, rl_cfg, jax.random.key(cfg.seed), critic_model=critic_model,
                            critic_params=critic_params)
    def evaluate(p) -> tuple[float, float]:
        """Held-out (greedy, sampled) accuracy; the sampled one is the mean over eval_samples at temperature 1,
        with one fixed key for every run, so runs differ only by their params."""
        greedy = sft_arithmetic.exact_match(p, model, tok, test, sft_cfg.max_new_tokens)[0]
        sampled = sft_arithmetic.exact_match(p, model, tok, test, sft_cfg.max_new_tokens, n=cfg.eval_samples,
                                             temperature=1.0, key=jax.random.key(7))[0]
        return greedy, sampled

    before, before_sampled = evaluate(params)
    t0 = time.perf_counter()
    state = rl(state, prompts, reward, rl_cfg, model=model, decode=tok.decode_batch, run_dir=run_dir,
               accuracy_fn=arithmetic_answer_reward, critic_model=critic_model,
               loop=LoopConfig(steps=cfg.iterations, log_every=1, checkpoint_every=50, progress=cfg.progress))
    wall = time.perf_counter() - t0
    after, after_sampled = evaluate(state.policy.params)
    rows = [r for r in read_metrics(run_dir) if "rl/reward_mean" in r]
    first, last = rows[0], rows[-1]
    results = dict(config=asdict(cfg), run_dir=run_dir, accuracy_sft=before, accuracy_rl=after,
                   sampled_accuracy_sft=before_sampled, sampled_accuracy_rl=after_sampled,
                   reward_first=first["rl/reward_mean"], reward_last=last["rl/reward_mean"],
                   train_accuracy_first=first["rl/accuracy"], train_accuracy_last=last["rl/accuracy"],
                   kl_k3_last=last.get("rl/kl_k3"), wall_seconds=wall)
    print(f"\n| {cfg.algo}, {cfg.iterations} iterations x {cfg.prompts_per_iteration} prompts x {cfg.n} | value |\n"
          f"|---|---|\n| held-out exact match after SFT, greedy | {before:.1%} |\n| after RL, greedy | {after:.1%} |\n"
          f"| after SFT, sampled (T = 1, {cfg.eval_samples} per problem) | {before_sampled:.1%} |\n"
          f"| after RL, sampled | {after_sampled:.1%} |\n"
          f"| mean reward first / last iteration | {results['reward_first']:.3f} / {results['reward_last']:.3f} |\n"
          f"| wall time of RL | {wall:.0f} s |\n")
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main(parse_config(Config))
