"""Expert iteration on an embedded task (arithmetic by default) from the SFT study's checkpoint: rounds of rejection
sampling (n samples per problem, keep right and well-formed ones, one copy each, at most k per
problem) → SFT on the kept samples, one results row per stage.

    python -m experiments.expert_iteration --sft-run-dir <SFT run>                # RAFT: continue the policy
    python -m experiments.expert_iteration --from-base true --accumulate true     # ReST-EM-like
    python -m experiments.expert_iteration --smoke
    python -m experiments.expert_iteration --task countdown --sft-run-dir <countdown SFT run>

The pipeline is `rljax.expert_iteration.expert_iteration`: stage "start" measures the SFT policy and
stage "round-r" samples with the current policy, keeps by reward (1 for the right final answer,
`task.answer_reward`; --threshold; well formed by `task.well_formed` where the task has one), trains --steps-per-round SFT steps on the kept samples (with --general-rows reference
solutions of other training problems mixed in) and measures the result. Every row: held-out
accuracy greedy and sampled (--eval-samples at temperature 1), mean reward and completion length of
those samples, KL to the policy the round started from, and the round's kept fraction and prompts
with a kept sample. Outputs under the run directory: results.md and results.jsonl (the table),
<stage>/results.json, results.json (config and rows); a killed run resumes where it stopped.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import jax

from rljax.cli import LoggingFlags, apply_preset, check_input_dir, make_run_dir, run, save_config
from rljax.eval import PolicyEvalConfig
from rljax.expert_iteration import ExpertIterationConfig, RejectionConfig, expert_iteration
from rljax.pipelines import report_results
from rljax.recipes.arithmetic_runs import (DEFAULT_SFT_RUN_DIR, RL_IGNORED_FIELDS, SMOKE_SFT_RUN_DIR, check_sft_task,
                                           load_sft, sft_split)
from rljax.sampling import SampleConfig, tokenizer_ids
from rljax.state import OptimizerConfig, create_state
from rljax.tasks import get_task, task_slug
from rljax.tokenizer import CharTokenizer


@dataclass
class Config(LoggingFlags):
    task: str = "arithmetic"  # the SFT run's task (rljax.tasks.get_task)
    sft_run_dir: str = DEFAULT_SFT_RUN_DIR
    run_dir: str | None = None
    run_root: str = "runs"
    seed: int = 0
    rounds: int = 3
    prompts_per_round: int = 256
    samples: int = 8
    threshold: float = 1.0
    max_per_prompt: int = 2  # 0: no cap
    max_new_tokens: int = 40
    steps_per_round: int = 50
    batch: int = 16
    lr: float = 2e-5
    from_base: bool = False  # each round trains the SFT checkpoint again (ReST-EM) instead of continuing
    accumulate: bool = False  # train on every round's kept samples so far
    general_rows: int = 0  # reference solutions of other training problems mixed into every round's SFT
    eval_problems: int = 128
    eval_samples: int = 4
    progress: bool = True
    smoke: bool = False
    train_sft: bool = False  # sft_run_dir does not exist: train the SFT run there first (--smoke sets it)
    force_config: bool = False  # rerun in a run_dir whose config.json differs: overwrite it, recording the change


def pipeline_config(cfg: Config, tok) -> ExpertIterationConfig:
    sampling = SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0, **tokenizer_ids(tok))
    return ExpertIterationConfig(
        rounds=cfg.rounds, prompts_per_round=cfg.prompts_per_round, steps_per_round=cfg.steps_per_round,
        batch_size=cfg.batch, optimizer=OptimizerConfig(lr=cfg.lr, schedule="constant"), from_base=cfg.from_base,
        accumulate=cfg.accumulate, seed=cfg.seed, progress=cfg.progress,
        log_every=max(cfg.steps_per_round // 10, 1), **cfg.loop_logging(),
        rejection=RejectionConfig(samples=cfg.samples, threshold=cfg.threshold,
                                  max_per_prompt=cfg.max_per_prompt or None,
                                  prompts_per_batch=min(cfg.prompts_per_round, 64), sampling=sampling),
        evaluation=PolicyEvalConfig(max_new_tokens=cfg.max_new_tokens, samples=cfg.eval_samples))


COLUMNS = ("stage", "kept_fraction", "prompts_with_kept_fraction", "accuracy_greedy", "accuracy_sampled",
           "reward_mean", "completion_length", "kl_to_start")


def main(cfg: Config) -> dict:
    if cfg.smoke:
        # rejection sampling has the sampled evaluation's shapes (16 prompts x 2 samples) and the greedy
        # evaluation the SFT smoke's (16 held-out problems, 24 new tokens): each sampler compiles once
        apply_preset(cfg, rounds=2, prompts_per_round=16, samples=2, steps_per_round=4, batch=8, lr=3e-3,
                     general_rows=16, eval_problems=16, eval_samples=2, max_new_tokens=24, train_sft=True,
                     sft_run_dir=SMOKE_SFT_RUN_DIR)
    get_task(cfg.task)  # an unknown task fails before a run directory is made
    check_input_dir(cfg.sft_run_dir, "--sft-run-dir", create=cfg.train_sft, create_flag="--train-sft")
    check_sft_task(cfg.task, cfg.sft_run_dir)  # before the run directory is made
    name = "expert_iteration" if cfg.task == "arithmetic" else f"expert_iteration-{task_slug(cfg.task)}"
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, name)
    os.makedirs(run_dir, exist_ok=True)
    tok = CharTokenizer()
    ei = pipeline_config(cfg, tok)  # validates: a bad value is refused before config.json records it
    save_config(cfg, run_dir, allow_change=cfg.force_config, ignore=RL_IGNORED_FIELDS)  # before any training
    model, params, sft_cfg = load_sft(cfg.sft_run_dir, tok, smoke=cfg.smoke, progress=cfg.progress,
                                      run_if_missing=True, create=cfg.train_sft, logging=cfg.logging_flags(),
                                      task=cfg.task)
    task, train, test = sft_split(sft_cfg)
    general = ([(task.prompt(p), task.reference(p)) for p in train[len(train) - cfg.general_rows:]]
               if cfg.general_rows else [])
    pool = train[:len(train) - cfg.general_rows]  # the problems sampled from, apart from the general rows
    state = create_state(model, ei.optimizer, jax.random.key(cfg.seed), params=params)
    print(f"expert_iteration: {cfg.rounds} rounds x {cfg.prompts_per_round} problems x {cfg.samples} samples, "
          f"{cfg.steps_per_round} SFT steps a round ({'from the SFT checkpoint' if cfg.from_base else 'continued'}), "
          f"{len(general)} general rows; run dir {run_dir}", flush=True)
    t0 = time.perf_counter()
    state, rows = expert_iteration(state, [task.prompt(p) for p in pool], task.answer_reward(), ei, model=model,
                                   tokenizer=tok, key=jax.random.key(cfg.seed + 1), held_out=test[:cfg.eval_problems],
                                   check=task.check, well_formed=task.well_formed, sft_rows=general, run_dir=run_dir,
                                   allow_change=cfg.force_config, problems=pool)
    wall = time.perf_counter() - t0
    results = report_results(cfg, run_dir, rows, COLUMNS, wall)
    return results


if __name__ == "__main__":
    run(main, Config)  # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message
