"""Rejection sampling and expert iteration (ReST, RAFT), as stages of `rljax.pipelines.run_stages`.

    rows, stats = rejection_sample(params, prompts, reward_fn, RejectionConfig(samples=8, threshold=1.0,
                                   max_per_prompt=2), model=model, tokenizer=tok, key=key, problems=problems)

draws n completions per prompt from the policy, scores them, and keeps those with reward ≥ threshold
that are well formed (stopped by the stop token, and `well_formed(completion)` when given), one copy of
each distinct completion per prompt, at most k per prompt (highest rewards first); `select_samples` is
that selection as a pure function of the scored samples. Its stats: kept fraction, prompts with at
least one kept, and why the others were dropped.

    state, rows = expert_iteration(state, prompts, reward_fn, ExpertIterationConfig(rounds=3), model=model,
                                   tokenizer=tok, key=key, held_out=test, run_dir="runs/ei", problems=train)

runs k rounds of sample → keep by reward → SFT on the kept completions (Anthony et al. 2017's expert
iteration; RAFT, Dong et al. 2023, continues from the current policy; ReST-EM, Singh et al. 2023, trains
the base checkpoint again each round: `from_base=True`), resumable after a kill at any point: each
round is one stage (its samples saved in round-r/samples.json, its SFT phase checkpointing into
run_dir/policy or run_dir/policy-round-r), and every stage records one results row (held-out accuracy
greedy and sampled, mean reward, completion length, KL to the stage's start, and the round's
rejection stats) into the pipeline's table, run_dir/results.jsonl and results.md.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import jax
import numpy as np

from rljax.checkpoint import state_digest
from rljax.data.collate import BatchIterator, collate_prompt_completion
from rljax.distributed import to_host
from rljax.eval import PolicyEvalConfig, evaluate_policy
from rljax.metrics import WandbConfig
from rljax.phases import LoopConfig, SFTPhaseConfig, sft
from rljax.pipelines import Stage, run_stages
from rljax.rewards.rules import (COMPLETION_IDS, RewardCallConfig, completion_id_lists, score_with_failures,
                                 takes_completion_ids)
from rljax.sampling import SampleConfig, filled_prompts, sample, tokenizer_ids
from rljax.state import OptimizerConfig, TrainState

__all__ = ["ExpertIterationConfig", "RejectionConfig", "expert_iteration", "rejection_sample", "select_samples"]


# ----------------------------------------------------------------------------- rejection sampling


@dataclass(frozen=True)
class RejectionConfig:
    """Rejection sampling: `samples` completions per prompt (sampling: how; its n is replaced by
    `samples` and its eos / stop / pad ids by the tokenizer's, `tokenizer_ids`; None: at most 64
    new tokens at temperature 1, or, in `rljax.r1.r1_pipeline`, the pipeline's max_new_tokens and
    temperature), `prompts_per_batch` prompts per sampling call (the last call is filled with copies
    of its first prompt, dropped afterwards, so every call has one shape); keep a sample when its
    reward ≥ threshold, its reward call did not fail (`RewardCallConfig(on_failure="value")`), it
    ended with a stop token (require_stop; a completion cut at max_new_tokens is not well formed)
    and `well_formed(completion)` holds (when given); deduplicate: one copy of each distinct
    completion text per prompt; max_per_prompt: keep at most k per prompt, the highest rewards
    first (ties: sample order; None: no cap). A prompt text given more than once is one prompt
    (its samples pooled). reward_call: how the reward function is called (`RewardCallConfig`)."""

    samples: int = 8
    threshold: float = 1.0
    max_per_prompt: int | None = None
    deduplicate: bool = True
    require_stop: bool = True
    prompts_per_batch: int = 64
    sampling: SampleConfig | None = None
    reward_call: RewardCallConfig = field(default_factory=RewardCallConfig)

    def __post_init__(self):
        if self.samples < 1:
            raise ValueError(f"RejectionConfig.samples: must be >= 1, got {self.samples}")
        if self.max_per_prompt is not None and self.max_per_prompt < 1:
            raise ValueError(f"RejectionConfig.max_per_prompt: must be >= 1 or None, got {self.max_per_prompt}")
        if self.prompts_per_batch < 1:
            raise ValueError(f"RejectionConfig.prompts_per_batch: must be >= 1, got {self.prompts_per_batch}")
        if not np.isfinite(self.threshold):
            raise ValueError(f"RejectionConfig.threshold: must be finite, got {self.threshold}")
        if self.sampling is not None and not isinstance(self.sampling, SampleConfig):
            raise TypeError(f"RejectionConfig.sampling: a SampleConfig or None, got {type(self.sampling).__name__}")

    def sampling_or(self, default: SampleConfig) -> RejectionConfig:
        """This config, its sampling `default` where it has none."""
        return self if self.sampling is not None else dataclasses.replace(self, sampling=default)


DEFAULT_REJECTION_SAMPLING = SampleConfig(max_new_tokens=64, temperature=1.0)


def select_samples(prompts: Sequence[str], completions: Sequence[str], rewards, *, n: int, threshold: float,
                   max_per_prompt: int | None = None, deduplicate: bool = True, well_formed=None, failed=None):
    """The selection of rejection sampling, a pure function of the scored samples.

    prompts [P]; completions, rewards [P·n] (sample j of prompt i at i·n + j); well_formed [P·n]
    bool or None (all well formed); failed [P·n] bool or None (no reward call failed: a failed
    call's reward is a stand-in, so its sample is never kept). A prompt text given more than once
    is one prompt: its samples are pooled before the selection (the same rows as when its samples
    were drawn in one call). Per prompt: drop the samples whose reward call failed, those with
    reward < threshold, then the malformed ones, order the rest by reward (highest first, ties in
    sample order), drop repeated completion texts (deduplicate), keep the first max_per_prompt.
    -> (rows, stats): rows [{"prompt", "completion", "reward", "prompt_index" (of the sample's own
    prompt slot), "sample"}] in the order of the prompts' first slots; stats {"samples", "passed"
    (scored, reward ≥ threshold and well formed), "reward_failed", "below_threshold", "malformed",
    "duplicates", "over_cap", "kept", "kept_fraction" (kept / samples), "prompts" (distinct prompt
    texts), "prompts_with_kept", "prompts_with_kept_fraction", "sampled_reward_mean" (the mean
    reward of the P·n samples whose call did not fail)}."""
    P = len(prompts)
    rewards = np.asarray(rewards, np.float64)
    if len(completions) != P * n or rewards.shape != (P * n,):
        raise ValueError(f"select_samples: {P} prompts x n = {n} need {P * n} completions and rewards, got "
                         f"{len(completions)} and {rewards.shape}")
    flags = {}
    for name, value in (("well_formed", well_formed), ("failed", failed)):
        flags[name] = np.asarray(value, bool) if value is not None else np.full(P * n, name == "well_formed")
        if flags[name].shape != (P * n,):
            raise ValueError(f"select_samples: {name} has shape {flags[name].shape}, expected ({P * n},)")
    ok, bad_call = flags["well_formed"], flags["failed"]
    slots: dict[str, list[int]] = {}  # prompt text -> its slots, in order of first appearance
    for i, p in enumerate(prompts):
        slots.setdefault(p, []).append(i)
    rows = []
    counts = dict(reward_failed=0, below_threshold=0, malformed=0, duplicates=0, over_cap=0)
    with_kept = 0
    for prompt, group in slots.items():
        idx = [k for i in group for k in range(i * n, (i + 1) * n)]
        scored = [k for k in idx if not bad_call[k]]
        counts["reward_failed"] += len(idx) - len(scored)
        high = [k for k in scored if rewards[k] >= threshold]
        counts["below_threshold"] += len(scored) - len(high)
        good = [k for k in high if ok[k]]
        counts["malformed"] += len(high) - len(good)
        good.sort(key=lambda k: (-rewards[k], k))
        seen, kept = set(), []
        for k in good:
            if deduplicate and completions[k] in seen:
                counts["duplicates"] += 1
                continue
            seen.add(completions[k])
            if max_per_prompt is not None and len(kept) >= max_per_prompt:
                counts["over_cap"] += 1
                continue
            kept.append(k)
        with_kept += bool(kept)
        rows += [dict(prompt=prompt, completion=completions[k], reward=float(rewards[k]), prompt_index=k // n,
                      sample=k % n) for k in kept]
    samples, distinct = P * n, len(slots)
    scored_rewards = rewards[~bad_call]
    stats = dict(samples=samples, passed=samples - sum(counts[c] for c in ("reward_failed", "below_threshold",
                                                                         "malformed")), **counts,
                 kept=len(rows), kept_fraction=len(rows) / samples if samples else 0.0, prompts=distinct,
                 prompts_with_kept=with_kept, prompts_with_kept_fraction=with_kept / distinct if distinct else 0.0,
                 sampled_reward_mean=float(scored_rewards.mean()) if scored_rewards.size else 0.0)
    return rows, stats


def rejection_sample(params, prompts: Sequence[str], reward_fn: Callable, cfg: RejectionConfig, *, model, tokenizer,
                     key, well_formed: Callable[[str], bool] | None = None, add_bos: bool = True, **metadata):
    """Sample cfg.samples completions of every prompt with `params`, score them and keep the good
    ones (`select_samples`). -> (rows, stats), JSON-able.

    reward_fn(prompts, completions, **metadata) -> [B] (the `rljax.rewards` protocol; metadata are
    per-prompt lists, e.g. problems=..., repeated for the samples of each prompt). Call b samples
    prompts [b·m, (b+1)·m) (m = cfg.prompts_per_batch) with key fold_in(key, b), stopping at the
    tokenizer's stop ids. well_formed: the task's format check (e.g. `task.well_formed`), on top of
    cfg.require_stop. add_bos: passed to `tokenizer.encode_batch` (False for chat templates, which
    write bos themselves). The stats add "truncated": samples without a stop token."""
    P = len(prompts)
    if P == 0:
        raise ValueError("rejection_sample: no prompts")
    for name, values in metadata.items():
        if len(values) != P:
            raise ValueError(f"rejection_sample: metadata {name!r} has {len(values)} entries for {P} prompts")
        if name == COMPLETION_IDS:
            raise ValueError(f"rejection_sample: metadata {name!r} is the name under which the completions' token "
                             "ids reach the reward functions that take them; rename it")
    n, m = cfg.samples, cfg.prompts_per_batch
    # the tokenizer's stop ids, as `rljax.eval.complete` does: SampleConfig's own (2, 0) are CharTokenizer's
    sampling = dataclasses.replace(cfg.sampling or DEFAULT_REJECTION_SAMPLING, n=n, **tokenizer_ids(tokenizer))
    completions, stopped, completion_ids = [], [], []
    wants_ids = takes_completion_ids(reward_fn)
    for b, lo in enumerate(range(0, P, m)):
        chunk = list(prompts[lo:lo + m])
        real = len(chunk)
        # one shape for every call, rows a multiple of the mesh's (`prompt_multiple`); the copies are dropped
        chunk = filled_prompts(chunk, model, n, m if P > m else None)
        tokens, mask = tokenizer.encode_batch(chunk, add_bos=add_bos, padding_side="left")
        roll = sample(params, tokens, mask, jax.random.fold_in(key, b), model=model, cfg=sampling)
        ids, stops, lengths = to_host((roll.completions, roll.stopped_at_eos, roll.lengths))
        completions += tokenizer.decode_batch(ids)[:real * n]
        stopped += stops[:real * n].tolist()
        if wants_ids:
            completion_ids += completion_id_lists(ids[:real * n], lengths[:real * n])
    flat_prompts = [p for p in prompts for _ in range(n)]
    meta = {k: [v for v in vals for _ in range(n)] for k, vals in metadata.items()}
    if wants_ids:
        meta[COMPLETION_IDS] = completion_ids
    scores = score_with_failures(reward_fn, flat_prompts, completions, call_config=cfg.reward_call, **meta)
    ok = np.asarray(stopped, bool) if cfg.require_stop else np.ones(P * n, bool)
    if well_formed is not None:
        ok &= np.array([bool(well_formed(c)) for c in completions])
    rows, stats = select_samples(prompts, completions, scores.rewards, n=n, threshold=cfg.threshold,
                                 max_per_prompt=cfg.max_per_prompt, deduplicate=cfg.deduplicate, well_formed=ok,
                                 failed=scores.failed)
    stats["truncated"] = int(P * n - int(np.sum(stopped)))
    return rows, stats


# ----------------------------------------------------------------------------- expert iteration


@dataclass(frozen=True)
class ExpertIterationConfig:
    """Expert iteration: `rounds` rounds of rejection sampling (`rejection`) on prompts_per_round
    prompts (round r takes prompts[(r·m + i) mod N], m = prompts_per_round) → SFT for
    steps_per_round steps of batch_size rows (fewer rows: one batch of all) on the kept
    completions (with accumulate, those of every round so far) and the given general SFT rows.
    from_base: each round trains the pipeline's starting state again (ReST-EM) instead of
    continuing the current policy (RAFT); either way round r samples from the current policy.
    optimizer: the one the state was made with. evaluation: how each stage's results row
    measures the policy on the held-out problems (`PolicyEvalConfig`). seed: round r's SFT
    batches are shuffled with seed + r. eval_every: steps between the SFT phase's eval_fn calls.
    checkpoint_every: steps between checkpoints inside a round's SFT (0: at its end only)."""

    rounds: int = 3
    prompts_per_round: int = 64
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    steps_per_round: int = 50
    batch_size: int = 16
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-4, schedule="constant"))
    from_base: bool = False
    accumulate: bool = False
    evaluation: PolicyEvalConfig = field(default_factory=PolicyEvalConfig)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    progress: bool = True
    tensorboard: bool | None = None
    wandb: WandbConfig | None = None

    def __post_init__(self):
        if self.rounds < 1 or self.prompts_per_round < 1 or self.steps_per_round < 1 or self.batch_size < 1:
            raise ValueError(f"ExpertIterationConfig: rounds, prompts_per_round, steps_per_round and batch_size must "
                             f"be >= 1, got {self.rounds}, {self.prompts_per_round}, {self.steps_per_round}, "
                             f"{self.batch_size}")


# a stage's arguments: the config but for how the phases report (REPORTING_FIELDS), and digests of its inputs
from rljax.pipeline_steps import REPORTING_FIELDS as _SHOWN_FIELDS, json_digest as _digest  # noqa: E402


def expert_iteration(state: TrainState, prompts: Sequence[str], reward_fn: Callable, cfg: ExpertIterationConfig, *,
                     model, tokenizer, key, held_out: Sequence[Any] = (), check: Callable | None = None,
                     well_formed: Callable[[str], bool] | None = None, sft_rows: Sequence[tuple[str, str]] = (),
                     run_dir: str | None = None, allow_change: bool = False, eval_fn: Callable | None = None,
                     eval_reward_fn: Callable | None = None, prompt: Callable[[Any], str] | None = None,
                     add_bos: bool = True, **metadata):
    """cfg.rounds rounds of sample → keep by reward → SFT from `state` (a TrainState made with
    cfg.optimizer). -> (state, results rows: one per stage).

    prompts and metadata (per-prompt lists, e.g. problems=...) feed `rejection_sample` (round r
    with key fold_in(key, r)); reward_fn and well_formed as there. sft_rows: general
    (prompt, completion) pairs trained on with every round's kept completions (R1's mix).
    held_out: problems the stages' results rows are measured on with `check`
    (`rljax.eval.evaluate_policy`; default the arithmetic task's check; no problems: rows hold
    only the rejection stats), prompt(problem) their prompt text (default `problem.prompt`); their
    reward_mean is eval_reward_fn's (default reward_fn), called with problems=held-out problems.
    eval_fn: the SFT phase's eval_fn (cfg.eval_every). add_bos: how prompts are encoded for
    sampling (False for chat templates, which write bos themselves).

    Stages: "start" (the starting policy's results row, when held_out is given), then "round-r"
    for r < cfg.rounds: collect = rejection sampling with the policy at the round's start (saved
    in round-r/samples.json), train = the SFT phase (run_dir/policy, or run_dir/policy-round-r
    with from_base), then its results row (kept fraction, prompts with a kept sample, ..., and
    the number of kept and general rows trained on, the SFT step reached, and the held-out metrics
    with the KL to the policy the round started from). A round that keeps nothing
    trains on the sft_rows alone, or nothing when there are none (with a warning either way). Each stage's arguments (the config, digests
    of the prompts, metadata, held-out set, general rows and the starting state) are saved in its
    stage.json: a rerun with other ones is refused naming the stage and the file (allow_change=True: recorded in
    stage_changes.jsonl and applied to the rounds still to run).
    """
    P = len(prompts)
    if P == 0:
        raise ValueError("expert_iteration: no prompts")
    for name, values in metadata.items():
        if len(values) != P:
            raise ValueError(f"expert_iteration: metadata {name!r} has {len(values)} entries for {P} prompts")
    base = state
    shared = dict(config={k: v for k, v in dataclasses.asdict(cfg).items() if k not in _SHOWN_FIELDS},
                  prompts=_digest(list(prompts)), metadata=_digest({k: list(v) for k, v in metadata.items()}),
                  held_out=_digest([prompt(p) if prompt else getattr(p, "prompt", repr(p)) for p in held_out]),
                  sft_rows=_digest([list(r) for r in sft_rows]), start=state_digest(base),
                  **({} if add_bos else {"add_bos": False}))
    phase_loop = dict(log_every=cfg.log_every, eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every,
                      progress=cfg.progress, tensorboard=cfg.tensorboard, wandb=cfg.wandb)
    collate = functools.partial(collate_prompt_completion, tokenizer, max_length=model.config.max_seq_len)

    def evaluate(params, start_params) -> dict:
        if not held_out:
            return {}
        return evaluate_policy(params, model, tokenizer, list(held_out), cfg.evaluation, check=check, prompt=prompt,
                               reward_fn=reward_fn if eval_reward_fn is None else eval_reward_fn,
                               start_params=start_params, add_bos=add_bos)

    def start(state, data, ctx):
        ctx.record(dict(round=-1, **evaluate(state.params, None)))
        return state

    def collect(r, state, ctx):
        m = cfg.prompts_per_round
        idx = [(r * m + i) % P for i in range(m)]
        rows, stats = rejection_sample(state.params, [prompts[i] for i in idx], reward_fn, cfg.rejection,
                                       model=model, tokenizer=tokenizer, key=jax.random.fold_in(key, r),
                                       well_formed=well_formed, add_bos=add_bos,
                                       **{k: [v[i] for i in idx] for k, v in metadata.items()})
        for row in rows:
            row["prompt_index"] = idx[row["prompt_index"]]  # the index in `prompts`
        return dict(rows=rows, stats=stats)

    def train(r, state, data, ctx):
        kept = [x for j in range(r + 1) for x in ctx.data(f"round-{j}")["rows"]] if cfg.accumulate else data["rows"]
        pairs = [(x["prompt"], x["completion"]) for x in kept] + [tuple(x) for x in sft_rows]
        start_params = state.params
        if not kept and pairs:
            warnings.warn(f"expert_iteration: round {r} kept no sample (stats {data['stats']}): "
                          f"{'from the base' if cfg.from_base else 'the policy'} trains on the sft_rows alone",
                          stacklevel=2)
        if pairs:
            begin = base if cfg.from_base else state
            target = int(jax.device_get(begin.step)) + cfg.steps_per_round
            phase = SFTPhaseConfig(optimizer=cfg.optimizer, loop=LoopConfig(steps=target, **phase_loop))
            batches = BatchIterator(pairs, min(cfg.batch_size, len(pairs)), collate, seed=cfg.seed + r)
            component = f"policy-round-{r}" if cfg.from_base else "policy"
            state = sft(begin, batches, phase, model=model, run_dir=ctx.component_dir(component), eval_fn=eval_fn)
        else:
            warnings.warn(f"expert_iteration: round {r} kept no sample (stats {data['stats']}) and there are no "
                          "sft_rows: the round trains nothing", stacklevel=2)
        ctx.record(dict(round=r, **data["stats"], trained_kept=len(kept), trained_general=len(sft_rows),
                        sft_steps=int(jax.device_get(state.step)), **evaluate(state.params, start_params)))
        return state

    stages = [Stage("start", train=start, args=shared, data_file=None)] if held_out else []
    stages += [Stage(f"round-{r}", collect=functools.partial(collect, r), train=functools.partial(train, r),
                     data_file="samples.json", args=dict(shared, round=r)) for r in range(cfg.rounds)]
    results: dict = {}
    state, _ = run_stages(state, stages, run_dir=run_dir, results=results, allow_change=allow_change)
    return state, [results[s.name] for s in stages if s.name in results]
