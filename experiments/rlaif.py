"""RLAIF with a judge the run trains itself, in its labeller and direct forms, on a task of rljax.tasks (default:
the embedded arithmetic task), from freshly initialised models:

    python -m experiments.rlaif --smoke                          # about 2 min on 2 shared CPU cores
    python -m experiments.rlaif --form labeller --seed 0         # tiny preset, arithmetic level 1
    python -m experiments.rlaif --form direct --seed 0
    python -m experiments.rlaif --form both --seed 0             # both RL stages from one SFT policy and judge:
                                                                 # 532-582 s on 2 shared cores (docs/results/rlaif.md)

The pipeline is `rljax.rlaif.rlaif` (its docstring lists the stages): SFT of a --layers policy on the references
of --sft problems → a --judge-layers judge trained by SFT on comparison prompts of --judge problems (reference vs
corrupted answers, both orders, the target the gold-better answer's choice token, plus their references) → the
labeller form labels two SFT samples per prompt of --label-prompts RL problems, trains a Bradley–Terry reward
model on the soft AI labels (−[p log σ(Δ) + (1 − p) log σ(−Δ)]) and runs GRPO against it; the direct form runs GRPO with the judge's probability that the
sample beats the SFT policy's greedy answer as the reward. Every row reports the held-out accuracy and gold score
(task.gold_score, never trained on); the judge row its held-out pairwise accuracy against gold and its position
consistency. The problems of the train split are partitioned: the first --sft are the policy's SFT data, the next
--judge the judge's, the rest the RL prompts; the held-out problems are disjoint from all of them.

Outputs under the run directory: results.md and results.jsonl (one row per stage), <stage>/results.json,
<stage>/stage.json (a rerun with other arguments is refused), results.json (config and rows). A killed run,
started again with the same arguments, resumes where it stopped.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import jax

from rljax.cli import IGNORED_FIELDS, LoggingFlags, apply_preset, make_run_dir, run, save_config
from rljax.eval import PolicyEvalConfig
from rljax.models import Model, preset
from rljax.pipelines import report_results
from rljax.rlaif import RLAIFConfig, rlaif
from rljax.state import OptimizerConfig
from rljax.tasks import get_task
from rljax.tokenizer import CharTokenizer


@dataclass
class Config(LoggingFlags):
    task: str = "arithmetic"
    levels: tuple[int, ...] = (1,)
    form: str = "labeller"  # labeller | direct | both (both RL stages from one SFT policy and one judge)
    preset: str = "tiny"
    layers: int = 2  # the policy's layers
    judge_layers: int = 3  # the judge: a larger LM than the policy
    max_seq_len: int = 64  # the policy's
    judge_max_seq_len: int = 128  # a comparison prompt holds the question and two answers
    run_dir: str | None = None
    run_root: str = "runs"
    seed: int = 0
    # arithmetic level 1 has about 1200 distinct problems: sft + judge + rl + n_test stay below
    sft: int = 384
    judge: int = 384
    rl: int = 128
    n_test: int = 64
    sft_steps: int = 400
    sft_batch: int = 16
    sft_lr: float = 3e-3
    judge_steps: int = 800
    judge_pairs_per_problem: int = 2
    judge_lr: float = 3e-3
    label_prompts: int = 128
    rm_steps: int = 100
    rm_lr: float = 1e-4
    rl_iterations: int = 20
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 8
    max_new_tokens: int = 24
    rl_lr: float = 1e-4  # a short RL stage (20 iterations): at 2e-5 the policy barely moves
    kl_coef: float | None = None  # KL penalty to the stage's start (None: the algorithm's, e.g. GRPO's 0.04; 0: off)
    eval_samples: int = 4
    progress: bool = True
    smoke: bool = False
    force_config: bool = False  # rerun in a run_dir whose config.json differs: overwrite it, recording the change


SMOKE = dict(layers=1, judge_layers=1, sft=64, judge=32, rl=32, n_test=8, sft_steps=30,
             sft_batch=8, judge_steps=10, judge_pairs_per_problem=1, label_prompts=16, rm_steps=3, rl_iterations=2,
             prompts_per_iteration=4, samples_per_prompt=2, max_new_tokens=20, eval_samples=2, levels=(1,))


def pipeline_config(cfg: Config) -> RLAIFConfig:
    return RLAIFConfig(
        form=cfg.form, sft_steps=cfg.sft_steps, sft_batch_size=cfg.sft_batch,
        sft_optimizer=OptimizerConfig(lr=cfg.sft_lr, schedule="constant"), judge_steps=cfg.judge_steps,
        judge_batch_size=cfg.sft_batch, judge_optimizer=OptimizerConfig(lr=cfg.judge_lr, schedule="constant"),
        judge_pairs_per_problem=cfg.judge_pairs_per_problem, held_out_pairs=cfg.n_test,
        label_prompts=cfg.label_prompts, rm_steps=cfg.rm_steps, rm_batch_size=cfg.sft_batch,
        rm_optimizer=OptimizerConfig(lr=cfg.rm_lr, schedule="constant"), rl_iterations=cfg.rl_iterations,
        prompts_per_iteration=cfg.prompts_per_iteration, samples_per_prompt=cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens, rl_optimizer=OptimizerConfig(lr=cfg.rl_lr, schedule="constant", b2=0.95),
        kl_coef=cfg.kl_coef, evaluation=PolicyEvalConfig(max_new_tokens=cfg.max_new_tokens, samples=cfg.eval_samples),
        seed=cfg.seed, progress=cfg.progress, log_every=max(cfg.rl_iterations // 5, 1), **cfg.loop_logging())


COLUMNS = ("stage", "judge_accuracy", "judge_position_consistency", "labelled_pairs", "label_position_consistency",
           "label_gold_agreement", "rm_accuracy", "accuracy_greedy", "accuracy_sampled", "gold_score",
           "completion_length", "kl_to_start")


def setup(cfg: Config):
    """(task, tokenizer, policy model, its base params, judge model, its initial params, problem sets) of `cfg`."""
    task = get_task(cfg.task)
    tok = CharTokenizer()
    model = Model(preset(cfg.preset, n_layers=cfg.layers, vocab_size=tok.vocab_size, max_seq_len=cfg.max_seq_len))
    judge = Model(preset(cfg.preset, n_layers=cfg.judge_layers, vocab_size=tok.vocab_size,
                         max_seq_len=cfg.judge_max_seq_len))
    key = jax.random.key(cfg.seed)
    params, judge_params = model.init(jax.random.fold_in(key, 0)), judge.init(jax.random.fold_in(key, 1))
    train, test = task.split(cfg.sft + cfg.judge + cfg.rl, cfg.n_test, levels=cfg.levels, seed=cfg.seed)
    a, b = cfg.sft, cfg.sft + cfg.judge
    sets = dict(sft=train[:a], judge=train[a:b], rl=train[b:], held_out=test)
    return task, tok, model, params, judge, judge_params, sets


def main(cfg: Config) -> dict:
    if cfg.smoke:
        apply_preset(cfg, **SMOKE)
    pipeline = pipeline_config(cfg)  # a bad value (e.g. --form) is refused before anything is written
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, f"rlaif_{cfg.form}")
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, run_dir, allow_change=cfg.force_config, ignore=IGNORED_FIELDS)  # before any training
    task, tok, model, params, judge, judge_params, sets = setup(cfg)
    print(f"rlaif ({cfg.form}): task {task.name}, policy {model.config.num_params() / 1e6:.2f}M params, judge "
          f"{judge.config.num_params() / 1e6:.2f}M; {len(sets['sft'])} SFT / {len(sets['judge'])} judge / "
          f"{len(sets['rl'])} RL / {len(sets['held_out'])} held-out problems; run dir {run_dir}", flush=True)
    t0 = time.perf_counter()
    state, rows = rlaif(params, pipeline, model=model, tokenizer=tok, task=task, judge_model=judge,
                        judge_params=judge_params, key=jax.random.key(cfg.seed + 1), run_dir=run_dir,
                        allow_change=cfg.force_config, **sets)
    wall = time.perf_counter() - t0
    results = report_results(cfg, run_dir, rows, COLUMNS, wall)
    return dict(results, state=state)


if __name__ == "__main__":
    run(main, Config)  # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message
