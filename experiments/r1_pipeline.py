"""The DeepSeek-R1 recipe end to end on a task of rljax.tasks (default: the embedded arithmetic task), from a
freshly initialised model, then distilled into a smaller student:

    python -m experiments.r1_pipeline --smoke                       # ~1 min on 2 CPU cores
    python -m experiments.r1_pipeline                               # tiny preset, arithmetic level 1: ~11 min
    python -m experiments.r1_pipeline --task sorting --run-dir runs/r1-sorting
    python -m experiments.r1_pipeline --model DIR --data gsm8k_train.jsonl --eval-data gsm8k_test.jsonl \\
        --cold-start 2000 --reasoning 3000 --general 1000 --max-new-tokens 512   # an HF checkpoint, GSM8K
    python -m experiments.r1_pipeline --smoke --model fixture                   # the same on the test fixtures
    python -m experiments.r1_pipeline --model DIR --data FILE --mesh-fsdp 8     # sharded over 8 devices
    RLJAX_COORDINATOR=host0:1234 RLJAX_NUM_PROCESSES=2 RLJAX_PROCESS_ID=<0 or 1> python -m experiments.r1_pipeline \\
        --model DIR --data FILE --mesh-fsdp 16 --run-dir SHARED/run      # 2 hosts x 8 devices, on each host

With --model (a Hugging Face Llama / Qwen2 / Qwen3 checkpoint with its tokenizer files) the task is
`rljax.tasks.math.math_task` of its tokenizer: GSM8K / MATH rows (--data, --data-format, as grpo_math reads them),
prompts through the model's chat template, references and rewards in the --style answer format (think: R1's
<think>/<answer>; boxed), the answer checked by math-verify-style matching. The student is --student-model (an HF
checkpoint with the same tokenizer) or the teacher's first --student-layers blocks (`select_layers`).

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

import dataclasses
import os
import time
from dataclasses import dataclass

import jax

from rljax.cli import IGNORED_FIELDS, LoggingFlags, MeshFlags, apply_preset, make_run_dir, run, save_config
from rljax.distributed import say
from rljax.eval import PolicyEvalConfig
from rljax.expert_iteration import RejectionConfig
from rljax.models import Model, preset
from rljax.pipelines import report_results
from rljax.r1 import R1Config, r1_pipeline
from rljax.sharding import place_params
from rljax.sampling import SampleConfig, tokenizer_ids
from rljax.state import OptimizerConfig
from rljax.tasks import get_task
from rljax.tokenizer import CharTokenizer


@dataclass
class Config(LoggingFlags, MeshFlags):
    task: str = "arithmetic"
    # a Hugging Face checkpoint directory (or hub id) with its tokenizer files: the teacher, on the math task
    # (`rljax.tasks.math`) over --data instead of --task; "fixture": the test fixtures' tiny Qwen2 with random
    # weights and the GSM8K fixture (as grpo_math --smoke). "" (default): a fresh character-level model on --task
    model: str = ""
    data: str = ""  # HF mode: GSM8K / MATH rows, split into cold-start / reasoning / general problems
    data_format: str = "gsm8k"  # gsm8k | math
    eval_data: str | None = None  # HF mode: the held-out problems (first --n-test); None: the last --n-test of --data
    style: str = "think"  # HF mode: the answer style, think (<think>/<answer>) | boxed
    system_prompt: str | None = None  # HF mode: None for the style's default
    student_model: str = ""  # HF mode: the student's checkpoint (same tokenizer); "": the teacher's first
    #                          --student-layers blocks (`select_layers`)
    dtype: str | None = None  # HF mode: parameter dtype (None: the checkpoint's)
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
    kl_coef: float | None = None  # KL penalty to the stage's start (None: the algorithm's, e.g. GRPO's 0.04; 0: off)
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


def hf_setup(cfg: Config, run_dir: str, mesh=None):
    """HF mode's (task, tokenizer, teacher, base params, student, student params, problem sets): the checkpoint
    --model, the math task of its tokenizer, --data split in order into --cold-start / --reasoning / --general
    problems, the held-out ones from --eval-data (else the last --n-test of --data). With --smoke on the fixture's
    8 problems every set is their first k (the sets overlap: the smoke checks the plumbing, not learning)."""
    from experiments.fixtures import SMOKE_DATA, write_smoke_model
    from rljax.cli import explicit_fields
    from rljax.models.hf import load_pretrained, resolve_path
    from rljax.models.transformer import select_layers
    from rljax.tasks.math import math_task, read_problems
    from rljax.tokenizer import HFTokenizer

    if cfg.model == "fixture":
        cfg.data = cfg.data or SMOKE_DATA
        model_dir = write_smoke_model(os.path.join(run_dir, "smoke-model"), seed=cfg.seed)
    else:
        model_dir = resolve_path(cfg.model)
    if not cfg.data:
        raise ValueError("Config.data: HF mode (--model) needs GSM8K / MATH rows: pass --data FILE")
    tok = HFTokenizer.from_pretrained(model_dir)
    overrides = {"max_seq_len": cfg.max_seq_len} if "max_seq_len" in explicit_fields(cfg) else {}
    arch, params = load_pretrained(model_dir, dtype=cfg.dtype, config_overrides=overrides, mesh=mesh)
    model = Model(arch, mesh)
    if cfg.student_model:
        student_dir = resolve_path(cfg.student_model)
        student_tok = HFTokenizer.from_pretrained(student_dir)
        if student_tok.vocab_size != tok.vocab_size:
            raise ValueError(f"Config.student_model: {student_dir}'s tokenizer has {student_tok.vocab_size} ids, the "
                             f"teacher's {tok.vocab_size}; on-policy distillation compares them token by token")
        student_arch, student_params = load_pretrained(student_dir, dtype=cfg.dtype, config_overrides=overrides,
                                                       mesh=mesh)
        student = Model(student_arch, mesh)
    else:
        student, student_params = select_layers(model, params, range(min(cfg.student_layers, arch.n_layers)))
        student_params = place_params(student, student_params)  # the student's own layout of the kept blocks
    task = math_task(tok, style=cfg.style, system_prompt=cfg.system_prompt)
    problems = read_problems(cfg.data, cfg.data_format)
    held_out = read_problems(cfg.eval_data, cfg.data_format)[:cfg.n_test] if cfg.eval_data else None
    need = cfg.cold_start + cfg.reasoning + cfg.general + (0 if held_out else cfg.n_test)
    if cfg.smoke:
        sets = dict(cold_start=problems[:cfg.cold_start], reasoning=problems[:cfg.reasoning],
                    general=problems[:cfg.general], held_out=held_out or problems[:cfg.n_test])
    elif len(problems) < need:
        raise ValueError(f"Config.data: {cfg.data} has {len(problems)} problems; --cold-start {cfg.cold_start} + "
                         f"--reasoning {cfg.reasoning} + --general {cfg.general}"
                         + ("" if held_out else f" + --n-test {cfg.n_test}") + f" = {need} are needed")
    else:
        a, b, c = cfg.cold_start, cfg.cold_start + cfg.reasoning, cfg.cold_start + cfg.reasoning + cfg.general
        sets = dict(cold_start=problems[:a], reasoning=problems[a:b], general=problems[b:c],
                    held_out=held_out or problems[len(problems) - cfg.n_test:])
    return task, tok, model, params, student, student_params, sets


def setup(cfg: Config, run_dir: str | None = None, mesh=None):
    """(task, tokenizer, teacher model, base params, student model, student params, problem sets) of `cfg`,
    the models and params on `mesh` (None: one device)."""
    if cfg.model:
        return hf_setup(cfg, run_dir, mesh)
    task = get_task(cfg.task)
    tok = CharTokenizer()
    model = Model(preset(cfg.preset, n_layers=cfg.layers, vocab_size=tok.vocab_size, max_seq_len=cfg.max_seq_len),
                  mesh)
    student = Model(preset(cfg.preset, n_layers=cfg.student_layers, vocab_size=tok.vocab_size,
                           max_seq_len=cfg.max_seq_len), mesh)
    key = jax.random.key(cfg.seed)
    # initialised on one device (the same values on every process), then laid out on the mesh
    params = place_params(model, dataclasses.replace(model, mesh=None).init(jax.random.fold_in(key, 0)))
    student_params = place_params(student, dataclasses.replace(student, mesh=None).init(jax.random.fold_in(key, 1)))
    train, test = task.split(cfg.cold_start + cfg.reasoning + cfg.general, cfg.n_test, levels=cfg.levels,
                             seed=cfg.seed)
    a, b = cfg.cold_start, cfg.cold_start + cfg.reasoning
    sets = dict(cold_start=train[:a], reasoning=train[a:b], general=train[b:], held_out=test)
    return task, tok, model, params, student, student_params, sets


HF_SMOKE = dict({k: v for k, v in SMOKE.items() if k != "max_seq_len"}, cold_start=8, reasoning=8, general=8, n_test=4, sft_batch=4, max_new_tokens=16)


def main(cfg: Config) -> dict:
    if cfg.smoke:
        apply_preset(cfg, **(HF_SMOKE if cfg.model else SMOKE))
    mesh = cfg.mesh()  # on several processes, one over all their devices (before a run directory is made)
    run_dir = cfg.run_dir or make_run_dir(cfg.run_root, "r1_pipeline")
    os.makedirs(run_dir, exist_ok=True)
    task, tok, model, params, student, student_params, sets = setup(cfg, run_dir, mesh)  # loads, trains nothing
    r1 = pipeline_config(cfg, tok)  # validates: a bad value is refused before config.json records it
    save_config(cfg, run_dir, allow_change=cfg.force_config, ignore=IGNORED_FIELDS)  # before any training
    say(f"r1_pipeline: task {task.name}, teacher {model.config.num_params() / 1e6:.2f}M params, student "
        f"{student.config.num_params() / 1e6:.2f}M; {len(sets['cold_start'])} cold-start / {len(sets['reasoning'])} "
        f"reasoning / {len(sets['general'])} general / {len(sets['held_out'])} held-out problems; run dir {run_dir}"
        + (f", mesh {cfg.mesh_axes()}" if mesh is not None else ""))
    t0 = time.perf_counter()
    state, rows = r1_pipeline(params, r1, model=model, tokenizer=tok, task=task, student_model=student,
                              student_params=student_params, key=jax.random.key(cfg.seed + 1), run_dir=run_dir,
                              allow_change=cfg.force_config, **sets)
    wall = time.perf_counter() - t0
    results = report_results(cfg, run_dir, rows, COLUMNS, wall)
    return dict(results, state=state)


if __name__ == "__main__":
    # a preempted run exits 143 (SIGTERM) / 130 (SIGINT) with a one-line message; processes=True: one process
    # per host when the RLJAX_* / JAX_* coordinator variables are set (rljax.cli.run)
    run(main, Config, processes=True)
