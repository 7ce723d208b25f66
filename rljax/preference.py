"""Preference optimisation around the phase: reference log-probs computed once and cached on
disk, and online (iterative) DPO, which samples its own pairs with the current policy.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import jax
import numpy as np

from rljax.checkpoint import atomic_path, digest_params, restore_latest
from rljax.data.collate import BatchIterator
from rljax.losses.preference import DPOConfig, reference_logps
from rljax.sampling import SampleConfig, sample
from rljax.state import OptimizerConfig


def _digest_batch(batch, h) -> None:
    for name in ("tokens", "attention_mask", "loss_mask"):
        arr = np.asarray(getattr(batch, name))
        h.update(f"{name}|{arr.dtype}|{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())


def cached_reference_logps(params, rows: Sequence, collate: Callable, *, model, cache_dir: str | None = None,
                           batch_size: int = 32, chunk_size: int | None = None) -> np.ndarray:
    """S_ref of every row, computed once: [N, 2] float32 (chosen, rejected for pairs; the
    row and its mismatched pair for KTO rows with a fixed "mismatched" completion).

    rows are collated in order, `batch_size` at a time, by `collate` (e.g.
    `functools.partial(collate_preferences, tokenizer)`). With cache_dir the result is
    stored as ref_logps-<key>.npy, key = SHA-256 of the reference parameters and the
    collated tokens and masks, so a changed model, data set, tokenizer or truncation
    never reuses a stale file; the file is written atomically (temporary + rename).
    Attach the result with `with_reference`.
    """
    if not rows:
        raise ValueError("cached_reference_logps: no rows")
    batches = [collate(list(rows[i:i + batch_size])) for i in range(0, len(rows), batch_size)]
    path = None
    if cache_dir is not None:
        h = hashlib.sha256()
        digest_params(params, h)
        for b in batches:
            _digest_batch(b, h)
        path = os.path.join(cache_dir, f"ref_logps-{h.hexdigest()[:32]}.npy")
        if os.path.exists(path):
            out = np.load(path)
            if out.shape == (len(rows), 2):
                return out
    fn = jax.jit(functools.partial(reference_logps, model=model, chunk_size=chunk_size))
    out = np.concatenate([np.asarray(fn(params, b.replace(ref_logps=None))) for b in batches]).astype(np.float32)
    if not np.all(np.isfinite(out)):
        bad = int(np.argwhere(~np.isfinite(out))[0, 0])
        raise ValueError(f"cached_reference_logps: row {bad} has a non-finite reference log-prob {out[bad]}")
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, out)
    return out


def with_reference(rows: Sequence, ref: np.ndarray) -> list[dict]:
    """rows (tuples, adapter rows or dicts) as dicts carrying their "ref_logps" (a row of `ref`)."""
    ref = np.asarray(ref)
    if ref.shape != (len(rows), 2):
        raise ValueError(f"with_reference: ref_logps of shape {ref.shape} for {len(rows)} rows; expected "
                         f"({len(rows)}, 2)")
    out = []
    for r, lp in zip(rows, ref):
        if isinstance(r, dict):
            d = dict(r)
        elif hasattr(r, "__dataclass_fields__"):
            d = {k: getattr(r, k) for k in r.__dataclass_fields__}
            if "label" in d:  # BinaryFeedback
                d["desirable"] = d.pop("label")
        else:
            d = dict(zip(("prompt", "chosen", "rejected"), r))
        d["ref_logps"] = (float(lp[0]), float(lp[1]))
        out.append(d)
    return out


@dataclass(frozen=True)
class OnlineDPOConfig:
    """Online (iterative) DPO: each of `rounds` rounds samples `samples` answers to each of
    `prompts_per_round` prompts with the current policy, scores them, pairs the best with
    the worst answer of every prompt whose scores differ, and trains `steps_per_round`
    DPO steps on those pairs. refresh_reference: the reference of round r is the policy
    at the start of round r (iterative DPO) instead of the initial policy (online DPO)."""

    rounds: int = 3
    samples: int = 4
    prompts_per_round: int = 256
    steps_per_round: int = 50
    batch_size: int = 16
    loss: DPOConfig = field(default_factory=DPOConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5, schedule="constant"))
    sampling: SampleConfig = field(default_factory=lambda: SampleConfig(max_new_tokens=32, temperature=1.0))
    refresh_reference: bool = False
    log_every: int = 10
    progress: bool = True

    def __post_init__(self):
        if self.rounds < 1 or self.samples < 2 or self.steps_per_round < 1:
            raise ValueError(f"OnlineDPOConfig: need rounds >= 1, samples >= 2, steps_per_round >= 1; got "
                             f"{self.rounds}, {self.samples}, {self.steps_per_round}")


def best_worst_pairs(prompts: Sequence[str], answers: Sequence[Sequence[str]], scores: np.ndarray) -> list[dict]:
    """The highest- against the lowest-scored answer of every prompt (the first of equals);
    prompts whose answers all score the same, or whose best and worst texts are equal, or
    which have an empty answer at either end, give no pair."""
    out = []
    for p, ans, s in zip(prompts, answers, np.asarray(scores, np.float64)):
        i, j = int(np.argmax(s)), int(np.argmin(s))
        if s[i] > s[j] and ans[i] != ans[j] and ans[i] and ans[j]:
            out.append({"prompt": p, "chosen": ans[i], "rejected": ans[j], "margin": float(s[i] - s[j])})
    return out


def online_dpo(state, prompts: Sequence[str], scorer: Callable, cfg: OnlineDPOConfig, *, model, tokenizer, collate,
               reference=None, run_dir: str | None = None, eval_fn: Callable | None = None):
    """Online DPO for cfg.rounds rounds from `state` (a TrainState made with cfg.optimizer).

    prompts: the prompt pool; round r uses prompts[(r·n) mod N ...] with n =
    prompts_per_round. scorer(prompts, completions) -> rewards [B] (a rule reward, a
    reward model's `reward_model_reward`, ...). collate: rows -> PreferenceBatch (e.g.
    functools.partial(collate_preferences, tokenizer)). reference: the DPO reference
    (default: the params of `state`). With run_dir every round's pairs (with their
    reference log-probs) are saved as round-r/pairs.json and the state is checkpointed,
    so a killed run resumes at the right round and step. Returns (state, per-round stats).
    """
    from rljax.phases import LoopConfig, PreferencePhaseConfig, preference

    if reference is None:
        reference = jax.tree.map(np.asarray, jax.device_get(state.params))
    phase_loop = dict(log_every=cfg.log_every, checkpoint_every=0, progress=cfg.progress)
    if run_dir is not None:  # resume: the latest checkpoint tells how many rounds are done
        state = restore_latest(state, os.path.join(run_dir, "checkpoints"))
    stats = []
    scfg = cfg.sampling
    for r in range(cfg.rounds):
        target = (r + 1) * cfg.steps_per_round
        pairs_path = os.path.join(run_dir, f"round-{r}", "pairs.json") if run_dir else None
        if pairs_path and os.path.exists(pairs_path):
            with open(pairs_path) as f:
                saved = json.load(f)
            pairs, round_stats = saved["pairs"], saved["stats"]
        else:
            if int(jax.device_get(state.step)) >= target:
                raise ValueError(f"online_dpo: state is at step {int(jax.device_get(state.step))} but round {r}'s "
                                 f"pairs are missing from {run_dir}")
            start = (r * cfg.prompts_per_round) % len(prompts)
            chosen_prompts = [prompts[(start + i) % len(prompts)] for i in range(cfg.prompts_per_round)]
            tokens, mask = tokenizer.encode_batch(chosen_prompts, padding_side="left")
            key = jax.random.fold_in(state.rng, r)
            roll = sample(state.params, tokens, mask, key, model=model,
                          cfg=dataclasses.replace(scfg, n=cfg.samples))
            text = tokenizer.decode_batch(np.asarray(roll.completions))
            flat_prompts = [p for p in chosen_prompts for _ in range(cfg.samples)]
            scores = np.asarray(scorer(flat_prompts, text), np.float64).reshape(len(chosen_prompts), cfg.samples)
            answers = [text[i * cfg.samples:(i + 1) * cfg.samples] for i in range(len(chosen_prompts))]
            pairs = best_worst_pairs(chosen_prompts, answers, scores)
            if not pairs:
                raise ValueError(f"online_dpo: round {r}: the answers of every prompt scored the same, so there "
                                 "is no pair to learn from; sample more prompts or answers, or at a higher "
                                 "temperature")
            if len(pairs) < cfg.batch_size:
                warnings.warn(f"online_dpo: round {r} found only {len(pairs)} prompts whose answers score "
                              f"differently; training on batches of {len(pairs)} instead of {cfg.batch_size}",
                              stacklevel=2)
            ref_params = jax.device_get(state.params) if cfg.refresh_reference else reference
            if cfg.loss.needs_reference:
                ref = cached_reference_logps(ref_params, pairs, collate, model=model, batch_size=cfg.batch_size,
                                             chunk_size=cfg.loss.chunk_size)
                pairs = with_reference(pairs, ref)
            round_stats = dict(round=r, pairs=len(pairs), score_mean=float(scores.mean()),
                               score_best=float(scores.max(axis=1).mean()))
            if pairs_path:
                os.makedirs(os.path.dirname(pairs_path), exist_ok=True)
                with atomic_path(pairs_path) as tmp, open(tmp, "w") as f:
                    json.dump(dict(pairs=pairs, stats=round_stats), f)
        stats.append(round_stats)
        if int(jax.device_get(state.step)) < target:
            data = BatchIterator(pairs, min(cfg.batch_size, len(pairs)), collate, seed=r)
            phase = PreferencePhaseConfig(loss=cfg.loss, optimizer=cfg.optimizer,
                                          loop=LoopConfig(steps=target, **phase_loop))
            state = preference(state, data, phase, model=model, run_dir=run_dir, eval_fn=eval_fn)
    return state, stats
