"""The phase runs that several stage pipelines (`rljax.r1`, `rljax.rlaif`) make the same way: an SFT run of a
model from given params on (prompt, completion) rows, and the RLConfig of an RL stage. One place, so the
pipelines train and sample identically and a change reaches all of them."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

from rljax.data.collate import BatchIterator, collate_prompt_completion
from rljax.phases import LoopConfig, SFTPhaseConfig, sft
from rljax.sampling import SampleConfig, tokenizer_ids
from rljax.state import OptimizerConfig, create_state

__all__ = ["stage_rl_config", "stage_sft"]


def stage_sft(model, start, rows: Sequence, *, tokenizer, optimizer: OptimizerConfig, steps: int, batch_size: int,
              key, seed: int, run_dir: str | None, eval_fn: Callable | None = None, **loop):
    """`steps` SFT steps of `model` from the params `start` (a fresh optimizer state, rng `key`) on (prompt,
    completion) rows (prompts may be `Tokens`), batches of min(batch_size, len(rows)) shuffled with `seed`;
    run_dir: the phase's directory (metrics, checkpoints: resumed from); loop: LoopConfig fields (log_every,
    eval_every, checkpoint_every, progress, tensorboard, wandb). -> the TrainState."""
    state = create_state(model, optimizer, key, params=start)
    collate = functools.partial(collate_prompt_completion, tokenizer, max_length=model.config.max_seq_len)
    batches = BatchIterator(list(rows), min(batch_size, len(rows)), collate, seed=seed)
    phase = SFTPhaseConfig(optimizer=optimizer, loop=LoopConfig(steps=steps, **loop))
    return sft(state, batches, phase, model=model, run_dir=run_dir, eval_fn=eval_fn)


def stage_rl_config(algorithm: str, optimizer: OptimizerConfig, *, tokenizer, max_new_tokens: int,
                    samples_per_prompt: int, temperature: float, kl_coef: float = 0.0,
                    teacher_coef: float | None = None):
    """The RLConfig of an RL stage: the registry's `algorithm` (on_policy_distill with `teacher_coef`; any
    other with kl_coef to the stage's start when > 0), samples_per_prompt completions of at most
    max_new_tokens at `temperature`, stopping at the tokenizer's stop ids, KL tracked."""
    from rljax.algorithms import get_algorithm
    from rljax.rl import RLConfig

    algo = get_algorithm(algorithm)
    if algorithm == "on_policy_distill":
        algo = algo.with_config(advantage=dataclasses.replace(algo.estimator.config, teacher_coef=teacher_coef))
    elif kl_coef:
        algo = algo.with_kl_coef(kl_coef)
    sampling = SampleConfig(max_new_tokens=max_new_tokens, n=samples_per_prompt, temperature=temperature,
                            **tokenizer_ids(tokenizer))
    return RLConfig(algorithm=algo, sampling=sampling, optimizer=optimizer, track_kl=True)
