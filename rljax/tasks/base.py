"""The task interface: a `Task` is a frozen dataclass of pure functions over one problem type.

A task's problems are whatever its generator returns (a frozen dataclass per task); every problem has
`.prompt`, `.completion` (the reference completion, for SFT) and `.level`, so `rljax.eval.exact_match`
and the collators take them as they are. What a study needs from a task:

  split(n_train, n_test, *, levels, seed) -> (train, test)   deterministic, no problem in both
  prompt(problem) -> str, reference(problem) -> str          the prompt and the reference completion
  extract(completion) -> answer | None                       the answer a completion states
  check(problem, completion) -> bool                         whether that answer is right
  score(problem, completion) -> float                        graded verifier (default float(check))
  separator, split_steps(completion), check_steps(problem, completion) -> list[bool]
                                                             step fields and their labels (None: no steps)
  gold_score(problem, completion) -> float                   the hidden quality synthetic data is built on
  corrupt(problem, rng, kind) -> str, corruptions            the corruptions of the reference
  well_formed(completion) -> bool                            the task's output format (format reward);
                                                             with well_formed_reads_prompt, also
                                                             well_formed(completion, prompt) (a prompt that
                                                             ends in "<think>" opens the completion's block)

and the rewards built from them (`answer_reward`, `step_reward`, `format_reward`: the
`fn(prompts, completions, *, problems) -> float32[B]` protocol of `rljax.rewards`).

Every character a task generates must be encodable by `rljax.tokenizer.CharTokenizer` with
`DEFAULT_ALPHABET`: `split` and `candidate` check it and raise `TaskAlphabetError` naming the
character and the task.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rljax.tokenizer import DEFAULT_ALPHABET

__all__ = ["ANSWER_TAG", "FILLERS", "STANDARD_CORRUPTIONS", "Task", "TaskAlphabetError", "check_alphabet",
           "tag_answer", "parse_int", "leading_right_fraction", "step_gold_score", "verbose_completion"]

ANSWER_TAG = "answer:"
# The four corruptions the arithmetic task defined; tasks without steps use a subset.
STANDARD_CORRUPTIONS = ("wrong_answer", "wrong_step", "truncated", "verbose")
# Filler phrases for "verbose" (the arithmetic task's): each goes after a step field, before the next field.
FILLERS = (" let me think;", " now the next step;", " ok, so;", " checking again;")
_ALPHABET = frozenset(DEFAULT_ALPHABET)


class TaskAlphabetError(ValueError):
    """A task generated a character the character tokenizer cannot encode."""

    def __init__(self, task: str, char: str, text: str, where: str):
        super().__init__(f"task {task!r} generated the character {char!r} (in the {where} {text[:80]!r}), which "
                         "rljax.tokenizer.CharTokenizer cannot encode (DEFAULT_ALPHABET: digits, lowercase letters, "
                         f"space, newline and {''.join(c for c in DEFAULT_ALPHABET if not c.isalnum() and not c.isspace())})")
        self.task, self.char, self.text, self.where = task, char, text, where


def check_alphabet(task: str, text: str, where: str, *, alphabet: frozenset[str] = _ALPHABET) -> str:
    """`text` when every character is in `alphabet` (default DEFAULT_ALPHABET's), else TaskAlphabetError naming
    the first other one."""
    for ch in text:
        if ch not in alphabet:
            raise TaskAlphabetError(task, ch, text, where)
    return text


def tag_answer(completion: str) -> str | None:
    """The text after the last `answer:` tag, stripped; None when the tag is absent."""
    at = completion.rfind(ANSWER_TAG)
    return None if at < 0 else completion[at + len(ANSWER_TAG):].strip()


def parse_int(text: str) -> int | None:
    """int(text) of a literal the caller has matched as digits, or None when it is longer than Python
    converts (4,300 digits): such a literal comes from a completion, scores as wrong, and must not make
    the reward function raise (which would end an RL run)."""
    try:
        return int(text)
    except ValueError:
        return None


def verbose_completion(steps: Sequence[str], answer_field: str, rng: np.random.Generator) -> str:
    """The steps with one filler phrase (drawn from FILLERS) after every step, then the answer field."""
    filler = FILLERS[int(rng.integers(len(FILLERS)))]
    return "".join(step + ";" + filler for step in steps) + answer_field


def leading_right_fraction(labels: Sequence[bool], n_steps: int) -> float:
    """(number of leading True labels, capped at n_steps) / n_steps; 1 when n_steps is 0."""
    right = next((i for i, ok in enumerate(labels) if not ok), len(labels))
    return min(right, n_steps) / n_steps if n_steps else 1.0


def step_gold_score(right: bool, labels: Sequence[bool], n_reference_steps: int, length: int,
                    reference_length: int) -> float:
    """The gold score of a task with steps (the arithmetic task's formula):

        1.0 * right + 0.5 * sum(labels) / max(n_reference_steps, len(labels), 1)
                    - 0.01 * max(0, length - reference_length)
    """
    denom = max(n_reference_steps, len(labels), 1)
    return float(right) + 0.5 * sum(labels) / denom - 0.01 * max(0, length - reference_length)


def _prompt_attr(problem) -> str:
    return problem.prompt


def _completion_attr(problem) -> str:
    return problem.completion


@dataclass(frozen=True)
class Task:
    """A task as pure functions over its problem type P (see the module docstring for the protocol).

    generate(rng: random.Random, level) -> P draws one problem of difficulty `level` (>= 1);
    key(P) -> hashable identifies a problem (two problems with one key count as the same, so
    `split` keeps one); max_level: the hardest level (None: unbounded); default_levels: the
    levels a study uses when it names none. steps(P) -> the reference's step fields (for
    step credit; () for tasks without steps). step_credit(P, completion) -> float in [0, 1],
    the step reward (default: the leading right steps' fraction of the reference's steps,
    `leading_right_fraction`). well_formed_reads_prompt: well_formed also takes the sample's prompt,
    well_formed(completion, prompt) (part of the format may sit at the end of the prompt: a chat template
    that opens "<think>"); `format_reward` then passes it. well_formed(completion) keeps working."""

    name: str
    generate: Callable[[random.Random, int], Any]
    key: Callable[[Any], Hashable]
    extract: Callable[[str], Any]
    check: Callable[[Any, str], bool]
    gold_score: Callable[[Any, str], float]
    corrupt: Callable[[Any, np.random.Generator, str], str]
    corruptions: tuple[str, ...]
    default_levels: tuple[int, ...] = (1,)
    max_level: int | None = None
    prompt: Callable[[Any], str] = _prompt_attr
    reference: Callable[[Any], str] = _completion_attr
    separator: str | None = ";"
    split_steps: Callable[[str], list[str]] | None = None
    check_steps: Callable[[Any, str], list[bool]] | None = None
    steps: Callable[[Any], tuple[str, ...]] | None = None
    step_credit: Callable[[Any, str], float] | None = None
    well_formed: Callable[[str], bool] | None = None
    score: Callable[[Any, str], float] | None = None
    description: str = ""
    # the characters its text must be made of (`check_alphabet`; the CharTokenizer's); None: not checked,
    # for a task whose text goes through a subword tokenizer (the math task of an HF model)
    alphabet: frozenset[str] | None = _ALPHABET
    well_formed_reads_prompt: bool = False

    @property
    def kinds(self) -> tuple[str, ...]:
        """"reference" and the corruptions: what synthetic preference pairs and feedback draw from."""
        return ("reference",) + self.corruptions

    @property
    def has_steps(self) -> bool:
        return self.check_steps is not None

    def check_levels(self, levels) -> tuple[int, ...]:
        levels = tuple(int(v) for v in levels)
        if not levels:
            raise ValueError(f"task {self.name!r}: levels is empty")
        for v in levels:
            if v < 1 or (self.max_level is not None and v > self.max_level):
                top = "" if self.max_level is None else f"..{self.max_level}"
                raise ValueError(f"task {self.name!r}: level {v} is not one of 1{top}")
        return levels

    def split(self, n_train: int, n_test: int, *, levels=None, seed: int = 0) -> tuple[list, list]:
        """Deterministic train/test problems from `seed`; no key in both (nor twice in one).

        random.Random(seed) draws, for each problem, a level uniformly from `levels` (default
        `default_levels`) and then the problem (`generate`); a problem whose key was seen is
        redrawn. Every prompt and reference completion is checked against the tokenizer's alphabet."""
        levels = self.check_levels(self.default_levels if levels is None else levels)
        rng = random.Random(seed)
        seen, out = set(), []
        attempts = 0
        while len(out) < n_train + n_test:
            attempts += 1
            if attempts > 50 * (n_train + n_test) + 1000:
                raise ValueError(f"{self.name} split: could not find {n_train + n_test} distinct problems at levels "
                                 f"{levels} (found {len(out)}); lower n_train/n_test or add harder levels")
            p = self.generate(rng, rng.choice(list(levels)))
            k = self.key(p)
            if k not in seen:
                seen.add(k)
                self._checked(self.prompt(p), "prompt")
                self._checked(self.reference(p), "reference completion")
                out.append(p)
        return out[:n_train], out[n_train:]

    def candidate(self, problem, rng: np.random.Generator, kind: str) -> str:
        """The reference completion for kind "reference", else `corrupt(problem, rng, kind)` (alphabet-checked)."""
        if kind == "reference":
            return self.reference(problem)
        if kind not in self.corruptions:
            raise ValueError(f"task {self.name!r}: unknown corruption {kind!r}; expected one of {self.corruptions}")
        return self._checked(self.corrupt(problem, rng, kind), f"{kind} completion")

    def _checked(self, text: str, where: str) -> str:
        return text if self.alphabet is None else check_alphabet(self.name, text, where, alphabet=self.alphabet)

    def graded(self, problem, completion: str) -> float:
        """`score` when the task has one (a graded verifier), else float(check)."""
        return float(self.score(problem, completion) if self.score is not None else self.check(problem, completion))

    def credit(self, problem, completion: str) -> float:
        """The step credit in [0, 1] (`step_credit`, or the leading right steps' fraction); 0 without steps."""
        if self.step_credit is not None:
            return float(self.step_credit(problem, completion))
        if self.check_steps is None:
            return 0.0
        return leading_right_fraction(self.check_steps(problem, completion), len(self.steps(problem)))

    def records(self, problems) -> list[dict]:
        """{prompt, completion} rows (the reference), for SFT (`rljax.recipes.sft` and the adapters)."""
        return [{"prompt": self.prompt(p), "completion": self.reference(p)} for p in problems]

    # ------------------------------------------------------------------ rewards (rljax.rewards protocol)
    def _reward(self, fn: Callable[[Any, str], float], what: str) -> Callable:
        def reward(prompts, completions, *, problems, **_):
            return np.array([fn(p, c) for p, c in zip(problems, completions)], np.float32)

        reward.__name__ = f"{self.name}_{what}_reward"
        return reward

    def answer_reward(self) -> Callable:
        """fn(prompts, completions, *, problems) -> float32[B]: 1 for a right answer (`check`), else 0."""
        return self._reward(lambda p, c: float(self.check(p, c)), "answer")

    def score_reward(self) -> Callable:
        """The graded verifier (`graded`) as a reward function."""
        return self._reward(self.graded, "score")

    def gold_reward(self) -> Callable:
        """The gold score (`gold_score`, the hidden quality behind synthetic preferences) as a reward
        function: what a reward model learnt from those preferences stands in for, so RLHF monitors it
        and never trains on it."""
        return self._reward(self.gold_score, "gold")

    def step_reward(self) -> Callable:
        """The step credit (`credit`) as a reward function."""
        if not self.has_steps:
            raise ValueError(f"task {self.name!r} has no steps (no step reward)")
        return self._reward(self.credit, "step")

    def format_reward(self) -> Callable:
        """fn(prompts, completions) -> 1 when `well_formed(completion)` (`well_formed(completion, prompt)`
        with well_formed_reads_prompt), else 0."""
        if self.well_formed is None:
            raise ValueError(f"task {self.name!r} has no format check")

        def reward(prompts, completions, **_):
            if self.well_formed_reads_prompt:
                return np.array([float(self.well_formed(c, p)) for p, c in zip(prompts, completions, strict=True)],
                                np.float32)
            return np.array([float(self.well_formed(c)) for c in completions], np.float32)

        reward.__name__ = f"{self.name}_format_reward"
        return reward
