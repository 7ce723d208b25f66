"""Rule rewards and the one place that calls a user's reward function.

A reward function takes decoded text in batches and returns one float per sample:

    reward_fn(prompts: list[str], completions: list[str], **metadata) -> float32[B]

Metadata are per-sample lists (e.g. `problems=[Problem, ...]`). `score` calls it,
checks the result (shape, finiteness) and reports failures with the sample.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from rljax.data.arithmetic import ANSWER_TAG, Problem, check_answer, check_steps, split_steps

RewardFn = Callable[..., Sequence[float]]
_STEP = re.compile(r"^-?\d+[+\-*]-?\d+=-?\d+$")


class RewardError(ValueError):
    """A reward function failed or returned something unusable."""


def _preview(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def score(reward_fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], **metadata) -> np.ndarray:
    """Call `reward_fn` once on the batch and return float32[B].

    Raises RewardError naming the problem: an exception inside the function (with
    the first sample on which calling it alone also fails, when one does), a
    result of the wrong shape, or non-finite rewards (with the offending samples).
    """
    B = len(completions)
    if len(prompts) != B:
        raise RewardError(f"{len(prompts)} prompts but {B} completions")
    for k, v in metadata.items():
        if len(v) != B:
            raise RewardError(f"metadata {k!r} has {len(v)} entries for {B} samples")
    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    try:
        out = reward_fn(list(prompts), list(completions), **metadata)
    except Exception as e:  # find the sample that breaks it, then report both
        for i in range(B):
            try:
                reward_fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in metadata.items()})
            except Exception:  # noqa: BLE001
                raise RewardError(f"reward function {name} raised {type(e).__name__}: {e} "
                                  f"(sample {i}: prompt {_preview(prompts[i])}, completion "
                                  f"{_preview(completions[i])})") from e
        raise RewardError(f"reward function {name} raised {type(e).__name__}: {e} on the batch of {B}") from e
    try:
        r = np.asarray(out, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward function {name} returned {type(out).__name__}, not numbers: {e}") from e
    if r.shape != (B,):
        raise RewardError(f"reward function {name} returned shape {r.shape}; expected ({B},), one reward per sample")
    bad = np.flatnonzero(~np.isfinite(r))
    if len(bad):
        i = int(bad[0])
        raise RewardError(f"reward function {name} returned non-finite rewards for {len(bad)} sample(s), e.g. "
                          f"sample {i} = {r[i]} (completion {_preview(completions[i])})")
    return r


def arithmetic_answer_reward(prompts, completions, *, problems: Sequence[Problem], **_) -> np.ndarray:
    """1 when the final answer is right (exact integer after `answer:`), else 0."""
    return np.array([float(check_answer(p, c)) for p, c in zip(problems, completions)], np.float32)


def arithmetic_step_reward(prompts, completions, *, problems: Sequence[Problem], **_) -> np.ndarray:
    """Fraction of the problem's reduction steps done right: (number of leading
    steps that `check_steps` accepts, capped at len(problem.steps)) / len(problem.steps).
    Partial credit for a right start: a chain that goes wrong at step k earns
    (k − 1)/S whatever follows, so outcome-only credit does not punish the right
    steps before the first mistake. 1 for a zero-step problem."""
    out = []
    for p, c in zip(problems, completions):
        labels = check_steps(p, c)
        right = next((i for i, ok in enumerate(labels) if not ok), len(labels))
        out.append(min(right, len(p.steps)) / len(p.steps) if p.steps else 1.0)
    return np.array(out, np.float32)


def arithmetic_format_reward(prompts, completions, **_) -> np.ndarray:
    """1 when the completion is `step;step;...;answer:N` with well-formed steps, else 0."""
    out = []
    for c in completions:
        fields = [f.strip() for f in c.split(";")]
        ok = (len(fields) >= 1 and re.fullmatch(re.escape(ANSWER_TAG) + r"-?\d+", fields[-1] or "") is not None
              and all(_STEP.match(s) for s in split_steps(c)))
        out.append(float(ok))
    return np.array(out, np.float32)


def length_penalty(max_length: int, *, cache: int = 0, scale: float = 1.0) -> RewardFn:
    """DAPO-style overlong shaping on completion length L (characters here):
    0 for L <= max_length − cache, −scale · (L − (max_length − cache)) / cache within
    the last `cache` characters, −scale beyond max_length (or past it when cache = 0)."""
    start = max_length - cache

    def penalty(prompts, completions, **_):
        L = np.array([len(c) for c in completions], np.float32)
        if cache <= 0:
            return np.where(L > max_length, -scale, 0.0).astype(np.float32)
        return (-scale * np.clip((L - start) / cache, 0.0, 1.0)).astype(np.float32)

    penalty.__name__ = f"length_penalty({max_length}, cache={cache})"
    return penalty


def weighted_sum(*terms: tuple[float, RewardFn]) -> RewardFn:
    """Σ_k w_k · reward_k(prompts, completions, **metadata)."""
    if not terms:
        raise ValueError("weighted_sum needs at least one (weight, reward_fn) term")

    def combined(prompts, completions, **metadata):
        total = np.zeros(len(completions), np.float32)
        for w, fn in terms:
            total += w * score(fn, prompts, completions, **metadata)
        return total

    combined.__name__ = " + ".join(f"{w}*{getattr(fn, '__name__', 'reward')}" for w, fn in terms)
    return combined
