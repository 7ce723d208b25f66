"""The DeepSeek-R1 recipe end to end on a task of rljax.tasks (default: the embedded arithmetic task), from a
freshly initialised model, then distilled into a smaller student:

    python -m experiments.r1_pipeline --smoke                       # ~1 min on 2 CPU cores
    python -m experiments.r1_pipeline                               # tiny preset, arithmetic level 1: ~11 min
    python -m experiments.r1_pipeline --task sorting --run-dir runs/r1-sorting

The pipeline is `rljax.r1.r1_pipeline` (its docstring lists the stages): cold-start SFT on the task's step-by-step
reference completions (the "long chain-of-thought" data; --cold-start problems of them) → GRPO with answer +
--format-weight x format rewards → rejection sampling (--samples per problem, keep right and well-formed ones, one
copy each, at most --max-per-prompt) + SFT from the base on them with --general-sft-rows general references →
a Bradley–Terry reward model on gold-labelled pairs of the general problems and a second GRPO stage mixing the rule
reward on reasoning prompts with the reward model on general prompts → distillation of the final policy into a
student of --student-layers layers (after its own cold start), by SFT on the teacher's kept samples and by
on-policy distillation. The base is a fresh initialisation: the arithmetic task has no pretrained base model, so
the cold start is all the base knows. The problems of the train split are partitioned: the first --cold-start
are the cold-start data, the next --reasoning the reasoning prompts, the rest the general prompts.

Measured on 2 shared CPU cores: --smoke about 1 min, the default run 631 s (its table: docs/results/r1_pipeline.md).
Outputs under the run directory: results.md and results.jsonl (one row per stage), <stage>/results.json,
<stage>/stage.json (the stage's arguments; a rerun with others is refused), results.json (config and rows). A
killed run, started again with the same arguments, resumes where it stopped.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import jax

from rljax.cli import IGNORED_FIELDS, LoggingFlags, apply_preset, make_run_dir, run, save_config
from rljax.eval import PolicyEvalConfig
from rljax.expert_iteration import RejectionConfig
from rljax.models import Model, preset
from rljax.r1 import R1Config, r1_pipeline
from rljax.sampling import SampleConfig, tokenizer_ids
from rljax.state import OptimizerConfig
from rljax.tasks import get_task
from rljax.tokenizer import CharTokenizer


@dataclass
class Config(LoggingFlags):
    task: str = "arithmetic"
    levels: tuple[int, ...] = (1,)
    preset: str = "tiny"
    layers: int = 4  # the teacher's layers
    student_layers: int = 2
    max_seq_len: int = 96
    run_dir: str | None = None
    run_root: str = "runs"
    seed: int = 0
    # arithmetic level 1 has about 1200 distinct problems: cold_start + reasoning + general + n_test stay below
    cold_start: int = 512  # problems whose reference completions are the cold-start SFT data
    reasoning: int = 384  # reasoning prompts (RL, rejection sampling, distillation)
    general: int = 192  # general prompts (general SFT rows, reward-model pairs, the reward model's RL prompts)
    n_test: int = 64
    cold_start_steps: int = 1000
    sft_batch: int = 16
    sft_lr: float = 3e-3
    rl_iterations: int = 30
    prompts_per_iteration: int = 16
    samples_per_prompt: int = 8
    max_new_tokens: int = 40
    rl_lr: float = 2e-5
    kl_coef: float = 0.0
    format_weight: float = 0.1
    rejection_prompts: int = 256
    samples: int = 8
    max_per_prompt: int = 2
    rs_sft_steps: int = 1000
    from_base: bool = True
    general_sft_rows: int = 128
    rm_steps: int = 100
    rm_lr: float = 1e-4
    mixed_iterations: int = 30
    student_start_steps: int = 300
    distill_prompts: int = 256
    distill_samples: int = 4
    distill_sft_steps: int = 300
    distill_iterations: int = 30
    student_lr: float = 1e-4
    eval_samples: int = 4
    progress: bool = True
    smoke: bool = False
    force_config: bool = False  # rerun in a run_dir whose config.json differs: overwrite it, recording the change


SMOKE = dict(layers=1, student_layers=1, max_seq_len=64, cold_start=64, reasoning=32, general=16, n_test=8,
             cold_start_steps=30, sft_batch=8, rl_iterations=2, prompts_per_iteration=4, samples_per_prompt=2,
             max_new_tokens=24, rejection_prompts=8, samples=2, rs_sft_steps=4, general_sft_rows=8, rm_steps=3,
             mixed_iterations=2, student_start_steps=3, distill_prompts=8, distill_samples=2, distill_sft_steps=3,
             distill_iterations=2, eval_samples=2, levels=(1,))


def pipeline_config(cfg: Config, tok) -> R1Config:
    sampling = SampleConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0, **tokenizer_ids(tok))
    batch = min(cfg.rejection_prompts, 64)
    return R1Config(
        cold_start_steps=cfg.cold_start_steps, sft_batch_size=cfg.sft_batch,
        sft_optimizer=OptimizerConfig(lr=cfg.sft_lr, schedule="constant"), rl_iterations=cfg.rl_iterations,
        prompts_per_iteration=cfg.prompts_per_iteration, samples_per_prompt=cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens, rl_optimizer=OptimizerConfig(lr=cfg.rl_lr, schedule="constant", b2=0.95),
        kl_coef=cfg.kl_coef, format_weight=cfg.format_weight, rejection_prompts=cfg.rejection_prompts,
        rejection=RejectionConfig(samples=cfg.samples, max_per_prompt=cfg.max_per_prompt or None,
                                  prompts_per_batch=batch, sampling=sampling),
        rs_sft_steps=cfg.rs_sft_steps, from_base=cfg.from_base, general_sft_rows=cfg.general_sft_rows,
        rm_steps=cfg.rm_steps, rm_batch_size=min(cfg.sft_batch, cfg.general),
        rm_optimizer=OptimizerConfig(lr=cfg.rm_lr, schedule="constant"), mixed_iterations=cfg.mixed_iterations,
        student_start_steps=cfg.student_start_steps, distill_prompts=cfg.distill_prompts,
        distill_rejection=RejectionConfig(samples=cfg.distill_samples, max_per_prompt=cfg.max_per_prompt or None,
                                          prompts_per_batch=min(cfg.distill_prompts, 64), sampling=sampling),
        distill_sft_steps=cfg.distill_sft_steps, distill_iterations=cfg.distill_iterations,
        student_optimizer=OptimizerConfig(lr=cfg.student_lr, schedule="constant", b2=0.95),
        evaluation=PolicyEvalConfig(max_new_tokens=cfg.max_new_tokens, samples=cfg.eval_samples), seed=cfg.seed,
        progress=cfg.progress, log_every=max(cfg.rl_iterations // 10, 1), **cfg.loop_logging())


COLUMNS = ("stage", "kept_fraction", "rm_pairwise_accuracy", "accuracy_greedy", "accuracy_sampled", "reward_mean",
           "completion_length", "kl_to_start", "kl_to_teacher", "train_tokens")


def setup(cfg: Config):
    """(task, tokenizer, teacher model, base params, student model, student params, problem sets) of `cfg`."""
    task = get_task(cfg.task)
    tok = CharTokenizer()
    model = Model(preset(cfg.preset, n_layers=cfg.layers, vocab_size=tok.vocab_size, max_seq_len=cfg.max_seq_len))
    student = Model(preset(cfg.preset, n_layers=cfg.student_layers, vocab_size=tok.vocab_size,
                           max_seq_len=cfg.max_seq_len))
    key = jax.random.key(cfg.seed)
    params = model.init(jax.random.fold_in(key, 0))
    student_params = student.init(jax.random.fold_in(key, 1))
    train, test = task.split(cfg.cold_start + cfg.reasoning + cfg.general, cfg.n_test, levels=cfg.levels,
                             seed=cfg.seed)
    a, b = cfg.cold_start, cfg.cold_start + cfg.reasoning
    sets = dict(cold_start=train[:a], reasoning=train[a:b], general=train[b:], held_out=test)
    return task, tok, model, params, student, student_params, sets


def main(cfg: Config) -> dict:
    if cfg.smoke:
        apply_preset(cfg, **SMOKE)
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, "r1_pipeline")
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, run_dir, allow_change=cfg.force_config, ignore=IGNORED_FIELDS)  # before any training
    task, tok, model, params, student, student_params, sets = setup(cfg)
    r1 = pipeline_config(cfg, tok)
    print(f"r1_pipeline: task {task.name}, teacher {model.config.num_params() / 1e6:.2f}M params, student "
          f"{student.config.num_params() / 1e6:.2f}M; {len(sets['cold_start'])} cold-start / {len(sets['reasoning'])} "
          f"reasoning / {len(sets['general'])} general / {len(sets['held_out'])} held-out problems; run dir {run_dir}",
          flush=True)
    t0 = time.perf_counter()
    state, rows = r1_pipeline(params, r1, model=model, tokenizer=tok, task=task, student_model=student,
                              student_params=student_params, key=jax.random.key(cfg.seed + 1), run_dir=run_dir,
                              **sets)
    wall = time.perf_counter() - t0
    shown = [c for c in COLUMNS if any(c in r for r in rows)]
    print("\n| " + " | ".join(shown) + " |\n|" + " --- |" * len(shown))
    for r in rows:
        print("| " + " | ".join("" if r.get(c) is None else r[c] if isinstance(r[c], str) else f"{r[c]:.3f}"
                                for c in shown) + " |")
    print(f"\nwall time {wall:.0f} s; the full table: {os.path.join(run_dir, 'results.md')}")
    results = dict(config=asdict(cfg), run_dir=run_dir, rows=rows, wall_seconds=wall)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return dict(results, state=state)


if __name__ == "__main__":
    run(main, Config)  # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message
