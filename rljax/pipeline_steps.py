"""Building blocks the library pipelines share (`rljax.r1`, `rljax.rlhf`, `rljax.rlaif`, `rljax.expert_iteration`):
a stage's arguments and digests of its inputs (what `rljax.pipelines.Stage.args` compares on a rerun), the
Bradley–Terry reward-model stage, an SFT run on (prompt, completion) rows and the RLConfig of an RL stage, made one
way so the pipelines train and sample identically.

    args = dict(config_args(cfg), held_out=json_digest([task.prompt(p) for p in held_out]), base=state_digest(params))
    rm_model, rm_state, row = bradley_terry_reward_model(params, model=model, tokenizer=tok, task=task,
                                                        train_problems=general, held_out=held_out, ...)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax

from rljax.checkpoint import json_digest
from rljax.data.collate import BatchIterator, encode_prompt_completion
from rljax.state import OptimizerConfig

__all__ = ["REPORTING_FIELDS", "bradley_terry_reward_model", "config_args", "gold_pairs", "json_digest",
           "sft_on_rows", "stage_rl_config"]

# what the arguments of a stage do not include: where the metrics go and how they are shown
REPORTING_FIELDS = ("log_every", "eval_every", "checkpoint_every", "progress", "tensorboard", "wandb")


def config_args(cfg) -> dict:
    """{"config.<field>": value} for every field of the dataclass `cfg` but the REPORTING_FIELDS: one entry
    per field, so a refused rerun names the field that changed."""
    return {f"config.{k}": v for k, v in dataclasses.asdict(cfg).items() if k not in REPORTING_FIELDS}


def gold_pairs(problems: Sequence[Any], seed: int, *, task, tokenizer, max_length: int, **kw) -> tuple[list, int]:
    """Preference pairs (prompt, chosen, rejected) of `problems` (`rljax.data.synthetic.preference_pairs(problems,
    seed, task=task, **kw)`: beta= for Bradley–Terry labels on the gold score, noise_free=True for the gold order)
    with distinct texts and a gold order (gold margin ≠ 0), and whose [bos] prompt completion [eos] fits
    `max_length` tokens -> (pairs, the number left out for their length)."""
    from rljax.data.synthetic import preference_pairs

    def fits(prompt, completion) -> bool:
        ids, _ = encode_prompt_completion(tokenizer, prompt, completion, 0, add_bos=True, add_eos=True)
        return len(ids) <= max_length

    rows = [(r["prompt"], r["chosen"], r["rejected"]) for r in preference_pairs(list(problems), seed, task=task, **kw)
            if r["chosen"] != r["rejected"] and r["gold_margin"] != 0]
    kept = [r for r in rows if fits(r[0], r[1]) and fits(r[0], r[2])]
    return kept, len(rows) - len(kept)


def bradley_terry_reward_model(params, *, model, tokenizer, task, train_problems: Sequence[Any],
                               held_out: Sequence[Any], beta: float, steps: int, batch_size: int, optimizer,
                               pair_seed: int, batch_seed: int, key, rm_model=None, run_dir: str | None = None,
                               loop: dict | None = None, eval_fn: Callable | None = None, what: str = "reward model"):
    """A Bradley–Terry reward model: the backbone of `params` (a policy of `model`) with a zero reward head
    (`rljax.models.transformer.add_head`; rm_model: that model, when the caller has it), trained `steps` steps of
    `batch_size` pairs (`optimizer`, a fresh state from `key`; batches shuffled with batch_seed) on
    `gold_pairs(train_problems, pair_seed, beta=beta)`, the loss −log σ(r(x, y_w) − r(x, y_l)) (RankingConfig).

    -> (rm_model, TrainState, row): row = rm_pairs, rm_pairs_too_long, rm_steps, rm_held_out_pairs and
    rm_pairwise_accuracy, the fraction of the noise-free pairs of `held_out` (`gold_pairs(held_out, pair_seed + 1,
    noise_free=True)`) that the model scores in the gold order (ties count half; absent without held-out pairs).
    run_dir: the phase's metrics and checkpoints (resumed from); loop: LoopConfig fields (log_every, ...);
    what: names the caller in errors."""
    from rljax.data.reward_collate import collate_pairs
    from rljax.losses.reward_model import RankingConfig
    from rljax.models.transformer import add_head
    from rljax.phases import LoopConfig, RewardModelPhaseConfig, train_reward_model
    from rljax.rewards.evaluation import reward_model_eval
    from rljax.state import create_state

    built, init = add_head(model, params, "reward")
    rm_model = built if rm_model is None else rm_model
    length = rm_model.config.max_seq_len
    train_pairs, too_long = gold_pairs(train_problems, pair_seed, task=task, tokenizer=tokenizer, max_length=length,
                                       beta=beta)
    held, _ = gold_pairs(held_out, pair_seed + 1, task=task, tokenizer=tokenizer, max_length=length, noise_free=True)
    if not train_pairs:
        raise ValueError(f"{what}: no preference pair of the {len(train_problems)} training problems fits the reward "
                         f"model's max_seq_len {length} ({too_long} too long)")
    collate = functools.partial(collate_pairs, tokenizer)
    rm = create_state(rm_model, optimizer, key, params=init)
    phase = RewardModelPhaseConfig(loss=RankingConfig(), optimizer=optimizer,
                                   loop=LoopConfig(steps=steps, **(loop or {})))
    batches = BatchIterator(train_pairs, min(batch_size, len(train_pairs)), collate, seed=batch_seed)
    rm = train_reward_model(rm, batches, phase, model=rm_model, run_dir=run_dir, eval_fn=eval_fn)
    row = dict(rm_pairs=len(train_pairs), rm_pairs_too_long=too_long, rm_steps=int(jax.device_get(rm.step)),
               rm_held_out_pairs=len(held))
    if held:
        evaluator = reward_model_eval(rm_model, [collate(held[i:i + 64]) for i in range(0, len(held), 64)])
        row["rm_pairwise_accuracy"] = evaluator(rm)["pairwise_accuracy"]
    return rm_model, rm, row


def sft_on_rows(model, params, rows: Sequence[tuple[str, str]], *, tokenizer, optimizer, steps: int, batch_size: int,
                seed: int, key, run_dir: str | None = None, loop: dict | None = None, eval_fn: Callable | None = None):
    """`steps` SFT steps of `model` from `params` (a fresh optimizer state from `key`) on (prompt, completion) rows,
    min(batch_size, rows) a batch, shuffled with `seed`: the loss −Σ_t log π(y_t | x, y_<t) over the completion's
    tokens (`rljax.phases.sft`). run_dir: the phase's metrics and checkpoints (resumed from); loop: LoopConfig
    fields. -> the TrainState."""
    from rljax.data.collate import collate_prompt_completion
    from rljax.phases import LoopConfig, SFTPhaseConfig, sft
    from rljax.state import create_state

    if not rows:
        raise ValueError("sft_on_rows: no (prompt, completion) rows")
    state = create_state(model, optimizer, key, params=params)
    collate = functools.partial(collate_prompt_completion, tokenizer, max_length=model.config.max_seq_len)
    batches = BatchIterator(list(rows), min(batch_size, len(rows)), collate, seed=seed)
    phase = SFTPhaseConfig(optimizer=optimizer, loop=LoopConfig(steps=steps, **(loop or {})))
    return sft(state, batches, phase, model=model, run_dir=run_dir, eval_fn=eval_fn)


def check_algorithm(owner: str, algorithm) -> None:
    """A pipeline config's RL algorithm must be a registry name (or an Algorithm): checked when the
    config is made, not when the first RL stage starts after the stages before it have trained."""
    from rljax.algorithms import ALGORITHMS

    if isinstance(algorithm, str) and algorithm not in ALGORITHMS:
        raise ValueError(f"{owner}.algorithm: {algorithm!r} is not a registry algorithm; choose from "
                         f"{sorted(ALGORITHMS)}")


def stage_rl_config(algorithm: str, optimizer: OptimizerConfig, *, tokenizer, max_new_tokens: int,
                    samples_per_prompt: int, temperature: float, kl_coef: float | None = None,
                    teacher_coef: float | None = None):
    """The RLConfig of an RL stage: the registry's `algorithm` (on_policy_distill with `teacher_coef`; any
    other with kl_coef, the KL penalty to the stage's start: None keeps the algorithm's own, e.g. GRPO's
    0.04, and 0 turns it off), samples_per_prompt completions of at most
    max_new_tokens at `temperature`, stopping at the tokenizer's stop ids, KL tracked."""
    from rljax.algorithms import get_algorithm
    from rljax.rl import RLConfig
    from rljax.sampling import SampleConfig, tokenizer_ids

    algo = get_algorithm(algorithm)
    if algorithm == "on_policy_distill":
        algo = algo.with_config(advantage=dataclasses.replace(algo.estimator.config, teacher_coef=teacher_coef))
    elif kl_coef is not None:
        algo = algo.with_kl_coef(kl_coef)
    sampling = SampleConfig(max_new_tokens=max_new_tokens, n=samples_per_prompt, temperature=temperature,
                            **tokenizer_ids(tokenizer))
    return RLConfig(algorithm=algo, sampling=sampling, optimizer=optimizer, track_kl=True)
