"""Synthetic preferences and simulated user feedback with a known ground truth.

Built on the arithmetic task (`rljax.data.arithmetic`) by default: every candidate
completion is the reference chain of steps or one of four corruptions
(`corrupt`), and `gold_score` is the hidden quality a reward model should
recover. `preference_pairs` and `simulated_feedback` take any `rljax.tasks.Task`
instead (`task=`): its kinds ("reference" + its corruptions), `Task.candidate`,
its `gold_score` and its prompts; with the arithmetic task, or none, the rows
are the same for the same seed. `preference_pairs` labels pairs by Bradley–Terry on the gold score;
`simulated_feedback` produces implicit signals (likes, accepts, dwell time,
position-biased clicks) from a documented generative model with a known bias,
so tests can check that a learner recovers gold (or relevance) and not the bias.

Everything is deterministic from a seed via `numpy.random.default_rng(seed)`.
All generated text stays within `rljax.tokenizer.DEFAULT_ALPHABET`.
"""
from __future__ import annotations

import math

import numpy as np

from rljax.data.arithmetic import ANSWER_TAG, Problem, check_answer, check_steps, reduction_chain

__all__ = [
    "KINDS",
    "CORRUPTIONS",
    "FILLERS",
    "corrupt",
    "corrupt_step",
    "candidate",
    "gold_score",
    "relevance",
    "preference_pairs",
    "gold_ranked_lists",
    "simulated_feedback",
]

CORRUPTIONS = ("wrong_answer", "wrong_step", "truncated", "verbose")
KINDS = ("reference",) + CORRUPTIONS
# Filler phrases for "verbose": each is inserted after a step field, before the next field.
FILLERS = (" let me think;", " now the next step;", " ok, so;", " checking again;")


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _delta(rng: np.random.Generator) -> int:
    """A nonzero integer offset in [-9, -1] U [1, 9]."""
    return int(rng.integers(1, 10)) * (1 if rng.random() < 0.5 else -1)


def _chain(problem: Problem, position: int | None = None, delta: int = 0) -> tuple[list[str], int]:
    """Steps and final value of `problem`, with `delta` added to the result of step
    `position` (0-based) and every later step recomputed from the wrong value."""
    steps, value = reduction_chain(problem.expression, position=position, delta=delta)
    return list(steps), value


def _render(steps, answer: int | None) -> str:
    fields = list(steps) + ([f"{ANSWER_TAG}{answer}"] if answer is not None else [])
    return ";".join(fields)


def corrupt_step(problem: Problem, position: int, delta: int = 1) -> str:
    """The completion whose step `position` (0-based) has its result off by `delta`,
    every later step recomputed consistently from the wrong value, and the final
    answer the resulting (wrong) value. `check_steps` labels steps < position True
    and steps >= position False. The answer can coincide with the true one only when
    the error is later multiplied by zero; `corrupt` avoids such positions."""
    if not 0 <= position < len(problem.steps):
        raise ValueError(f"position must be in [0, {len(problem.steps)}), got {position}")
    if delta == 0:
        raise ValueError("delta must be nonzero")
    steps, answer = _chain(problem, position, delta)
    return _render(steps, answer)


def corrupt(problem: Problem, rng: np.random.Generator, kind: str) -> str:
    """A corrupted completion of `problem` (`rng` a `numpy.random.Generator`).

    kind:
      "wrong_answer"  the reference steps with the final answer off by a nonzero delta;
      "wrong_step"    one step's result off by a nonzero delta and the later steps
                      recomputed from it (internally consistent, wrong answer);
      "truncated"     only the first k steps (1 <= k < n when n > 1, else the one
                      step), no answer field;
      "verbose"       the reference with a filler phrase from `FILLERS` after every
                      step (still correct per `check_answer`, but longer and with
                      non-step fields that `check_steps` labels False).
    All but "verbose" fail `check_answer`.
    """
    n = len(problem.steps)
    if kind == "wrong_answer":
        return _render(problem.steps, problem.answer + _delta(rng))
    if kind == "wrong_step":
        start = int(rng.integers(n))
        delta = _delta(rng)
        for position in list(range(start, n)) + list(range(start)):
            steps, answer = _chain(problem, position, delta)
            if answer != problem.answer:
                return _render(steps, answer)
        raise AssertionError("unreachable: an error in the last step always changes the answer")
    if kind == "truncated":
        k = int(rng.integers(1, n)) if n > 1 else 1
        return _render(problem.steps[:k], None)
    if kind == "verbose":
        filler = FILLERS[int(rng.integers(len(FILLERS)))]
        out = "".join(step + ";" + filler for step in problem.steps)
        return out + f"{ANSWER_TAG}{problem.answer}"
    raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")


def candidate(problem: Problem, rng: np.random.Generator, kind: str) -> str:
    """The reference completion for kind "reference", else `corrupt(problem, rng, kind)`."""
    return problem.completion if kind == "reference" else corrupt(problem, rng, kind)


def gold_score(problem: Problem, completion: str) -> float:
    """The hidden "gold" quality of `completion` for `problem`:

        gold = 1.0 * check_answer(problem, completion)
             + 0.5 * sum(check_steps(problem, completion)) / max(len(problem.steps), n_fields)
             - 0.01 * max(0, len(completion) - len(problem.completion))

    where n_fields = len(check_steps(problem, completion)), the number of step
    fields written. The step term is the fraction of correct steps, counted
    against the reference step count so a truncated chain gets partial credit and
    extra (e.g. filler) fields dilute it. The length term prefers concise answers.
    The reference completion scores exactly 1.5; the range is about [-inf, 1.5].
    """
    labels = check_steps(problem, completion)
    denom = max(len(problem.steps), len(labels), 1)
    extra = max(0, len(completion) - len(problem.completion))
    return float(check_answer(problem, completion)) + 0.5 * sum(labels) / denom - 0.01 * extra


def relevance(gold: float) -> float:
    """P(relevant | gold) = sigmoid(3 * gold - 1.5), used by `simulated_feedback`."""
    return _sigmoid(3.0 * gold - 1.5)


def _task_functions(task):
    """(kinds, candidate, gold, prompt) of `task`, or of this module's arithmetic task for None."""
    if task is None:
        return KINDS, candidate, gold_score, lambda p: p.prompt
    return task.kinds, task.candidate, task.gold_score, task.prompt


def preference_pairs(problems, seed: int, *, beta: float = 1.0, noise_free: bool = False, task=None) -> list[dict]:
    """One preference pair per problem, with a known Bradley–Terry labeller.

    For each problem two distinct kinds a, b are drawn from `KINDS` (reference or a
    corruption) and rendered with `candidate`. The first is preferred with
    probability sigmoid(beta * (gold(a) - gold(b))) (Bradley–Terry with reward
    `gold_score`); with `noise_free=True` the higher gold score always wins (ties:
    the first). Returns dicts {prompt, chosen, rejected, gold_margin} where
    gold_margin = gold(chosen) - gold(rejected) (negative when the noisy labeller
    preferred the worse completion). Rows fit `adapters.preference_pairs`.
    task: a `rljax.tasks.Task` whose problems these are (default: arithmetic); its kinds,
    candidates and gold score replace this module's.
    """
    kinds, cand, gold, prompt = _task_functions(task)
    rng = np.random.default_rng(seed)
    out = []
    for p in problems:
        ka, kb = rng.choice(len(kinds), size=2, replace=False)
        a, b = cand(p, rng, kinds[ka]), cand(p, rng, kinds[kb])
        ga, gb = gold(p, a), gold(p, b)
        u = rng.random()  # drawn in both modes so the candidates match across modes
        a_wins = ga >= gb if noise_free else u < _sigmoid(beta * (ga - gb))
        chosen, rejected, gc, gr = (a, b, ga, gb) if a_wins else (b, a, gb, ga)
        out.append({"prompt": prompt(p), "chosen": chosen, "rejected": rejected, "gold_margin": gc - gr})
    return out


def gold_ranked_lists(problems, samples, task=None) -> list[tuple[str, list[str], list[int]]]:
    """(prompt, distinct samples, ranks) per problem, its samples (e.g. a policy's) ranked by the gold
    score (0 = best, equal gold = tie; empty samples dropped); problems whose samples all tie carry no
    preference and are left out. samples[i]: the completions of problems[i]. task: as in
    `preference_pairs` (default: arithmetic)."""
    _, _, gold, prompt = _task_functions(task)
    if len(samples) != len(problems):
        raise ValueError(f"gold_ranked_lists: {len(samples)} sample lists for {len(problems)} problems")
    out = []
    for p, cs in zip(problems, samples):
        answers = sorted({c for c in cs if c})
        scores = [gold(p, c) for c in answers]
        levels = sorted(set(scores), reverse=True)
        if len(levels) > 1:
            out.append((prompt(p), answers, [levels.index(g) for g in scores]))
    return out


def simulated_feedback(problems, seed: int, *, length_bias: float = 0.02, slate_size: int = 5,
                       task=None) -> list[dict]:
    """Implicit feedback from simulated users, with a known generative model.

    For each problem a slate of `slate_size` (default 5) candidates is drawn, each
    kind uniform over `KINDS` (with replacement), and shown in random order at
    ranks 1..slate_size (the order is independent of quality). For a candidate c
    with g = gold_score(problem, c) and L = len(c), independently:

        like          ~ Bernoulli(sigmoid(2 * g - 1 + length_bias * L))
                        (users like longer answers a bit: the engagement proxy
                        drifts from gold by length_bias per character)
        accept        ~ Bernoulli(sigmoid(3 * g - 1.5))
        dwell_seconds = exp(0.5 + 0.01 * L + 0.3 * z),  z ~ Normal(0, 1)
                        (lognormal, grows with length, says nothing about gold)
        position      = the rank r in 1..slate_size the candidate was shown at
        propensity    = P(examined | r) = 1 / r
        examined      ~ Bernoulli(1 / r)
        relevant      ~ Bernoulli(relevance) with relevance = sigmoid(3 * g - 1.5)
        click         = examined and relevant

    so P(click) = relevance / r: the raw click rate underestimates relevance, and
    the inverse-propensity weighted click, click / propensity, is an unbiased
    estimate of relevance (E[click / propensity] = relevance).

    Returns one dict per shown candidate with keys prompt, completion, gold, like,
    accept, dwell_seconds, position, click, propensity, plus the ground truth
    relevance and kind (for evaluation; a learner should not read them).
    task: a `rljax.tasks.Task` whose problems these are (default: arithmetic), as in `preference_pairs`.
    """
    if slate_size < 1:
        raise ValueError(f"slate_size must be >= 1, got {slate_size}")
    all_kinds, cand, gold, prompt = _task_functions(task)
    rng = np.random.default_rng(seed)
    out = []
    for p in problems:
        drawn = rng.integers(len(all_kinds), size=slate_size)
        ranks = rng.permutation(slate_size) + 1
        for k, rank in zip(drawn, ranks):
            kind = all_kinds[int(k)]
            c = cand(p, rng, kind)
            g = gold(p, c)
            n = len(c)
            rel = relevance(g)
            rank = int(rank)
            examined = rng.random() < 1.0 / rank
            relevant = rng.random() < rel
            out.append({
                "prompt": prompt(p),
                "completion": c,
                "gold": g,
                "like": bool(rng.random() < _sigmoid(2.0 * g - 1.0 + length_bias * n)),
                "accept": bool(rng.random() < rel),
                "dwell_seconds": float(math.exp(0.5 + 0.01 * n + 0.3 * rng.standard_normal())),
                "position": rank,
                "click": bool(examined and relevant),
                "propensity": 1.0 / rank,
                "relevance": rel,
                "kind": kind,
            })
    return out
