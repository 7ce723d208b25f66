"""Automatic process labels by completion (Math-Shepherd, Wang et al. 2024).

For a solution with steps s_1..s_S, the label of step i < S comes from N
continuations of the prefix "prompt s_1 sep … s_i sep" sampled by a completer
policy: the hard label HE = 1[any continuation reaches the right answer], the
soft label SE = the fraction that do. The last step's label is the solution's
own correctness (the prefix is the whole solution; nothing is left to sample).
With the completer equal to the generator, SE is an unbiased estimate of the
prefix's success probability v, and P(HE = 1) = 1 − (1 − v)^N.

All prefixes of all solutions are completed in one batched call, so a model
completer samples them on device in one `sample` per chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import numpy as np

from rljax.distributed import to_host
from rljax.sampling import SampleConfig, filled_prompts, sample

# complete(prefixes: list[str], n: int, key) -> list of n continuation strings per prefix
Completer = Callable[[Sequence[str], int, jax.Array], Sequence[Sequence[str]]]


@dataclass(frozen=True)
class StepLabels:
    """Per-step labels of one solution: hard (0/1 floats) and soft (fractions in [0, 1])."""

    hard: tuple[float, ...]
    soft: tuple[float, ...]


def model_completer(model, params, tokenizer, cfg: SampleConfig, *, max_batch: int = 256) -> Completer:
    """A completer that samples with the KV-cache sampler: prefixes are encoded as prompts
    ([bos] text, left-padded) and sampled n at a time with `cfg` (cfg.n is replaced by
    n), `max_batch` prompts per call; continuations are decoded up to eos."""

    def complete(prefixes: Sequence[str], n: int, key) -> list[list[str]]:
        out = []
        step_cfg = cfg.replace(n=n)
        for start in range(0, len(prefixes), max_batch):
            chunk = list(prefixes[start:start + max_batch])
            tokens, mask = tokenizer.encode_batch(filled_prompts(chunk, model, n), padding_side="left")
            roll = sample(params, tokens, mask, jax.random.fold_in(key, start), model=model, cfg=step_cfg)
            text = tokenizer.decode_batch(to_host(roll.completions))[:len(chunk) * n]
            out += [text[i * n:(i + 1) * n] for i in range(len(chunk))]
        return out

    return complete


def label_steps(prompts: Sequence[str], solutions: Sequence[Sequence[str]], check: Callable[[int, str], bool],
                complete: Completer, *, n: int = 8, separator: str, key) -> list[StepLabels]:
    """Math-Shepherd labels for every step of every solution.

    prompts [M]; solutions [M] lists of steps without the separator (as
    `rljax.data.reward_collate.split_solution(completion, sep)` gives them, and as
    `collate_steps` takes them); the prefix of step i is prompt + sep.join(steps[:i]) + sep.
    OREO's trajectory steps (`oreo_training.split_keeping_separator`) keep their separator
    and are refused here: strip it (or use split_solution on the completion).
    check(m, completion) -> whether a full completion of prompt m is right; complete:
    a `Completer` (e.g. `model_completer`); n continuations per prefix. Returns one
    `StepLabels` per solution, in order. Errors name the solution (and step): no steps, a step
    that is not a string, is empty, or contains the separator (either would build a prefix
    other than the one `collate_steps` trains on).
    """
    if n < 1:
        raise ValueError(f"label_steps: n must be >= 1, got {n}")
    if not separator:
        raise ValueError("label_steps: the separator is empty")
    if len(prompts) != len(solutions):
        raise ValueError(f"label_steps: {len(prompts)} prompts but {len(solutions)} solutions")
    prefixes, owners = [], []  # every proper prefix of every solution, in one batch
    for m, steps in enumerate(solutions):
        if isinstance(steps, str) or not steps:
            raise ValueError(f"solution {m}: expected a non-empty list of steps, got {steps!r}")
        for k, step in enumerate(steps):  # the checks of `encode_steps`, so labels and training agree
            if not isinstance(step, str) or not step:
                raise ValueError(f"solution {m}: step {k} is empty or not a string: {step!r}")
            if separator in step:
                raise ValueError(f"solution {m}: step {k} contains the separator {separator!r} ({step!r}); steps "
                                 "must not (split_solution drops it; OREO's split_keeping_separator keeps it)")
        for i in range(1, len(steps)):
            prefixes.append(separator.join(steps[:i]) + separator)
            owners.append((m, i - 1))
    continuations = complete([prompts[m] + p for (m, _), p in zip(owners, prefixes)], n, key) if prefixes else []
    if len(continuations) != len(prefixes):
        raise ValueError(f"label_steps: the completer returned {len(continuations)} lists for {len(prefixes)} "
                         "prefixes")
    soft = [[0.0] * len(steps) for steps in solutions]
    for (m, i), prefix, conts in zip(owners, prefixes, continuations):
        if len(conts) != n:
            raise ValueError(f"label_steps: the completer returned {len(conts)} continuations, expected {n}")
        soft[m][i] = float(np.mean([bool(check(m, prefix + c)) for c in conts]))
    out = []
    for m, steps in enumerate(solutions):
        soft[m][-1] = float(bool(check(m, separator.join(steps))))
        out.append(StepLabels(hard=tuple(float(v > 0) for v in soft[m]), soft=tuple(soft[m])))
    return out
