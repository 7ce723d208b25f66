"""Sorting by insertion: each step inserts the next number into the sorted list so far.

    prompt      "sort:53,7,21="
    completion  "7,53;7,21,53;answer:7,21,53"

Level L >= 1: L + 2 numbers drawn uniformly from 0..10 * 2**L - 1 (repeats allowed); the reference
has L + 1 steps, step k (1-based) the sorted list of the first k + 1 numbers. Checking a step is
local (is the list sorted, does it hold the previous list plus the next number: adjacent
comparisons and a count), while writing it needs the insertion point, a comparison against the
whole list.

Step labels (`check_steps`) have arithmetic's semantics: step k is right iff steps 1..k are each
right, i.e. step k is sorted and is the previous (right) list plus number k + 1 of the prompt; with
every earlier step right this makes it the sorted list of the first k + 1 numbers, which can still
reach the answer. The answer check is independent of the steps: the list after `answer:` equals
the sorted numbers (a right answer reached by wrong steps is right; its steps are labelled False).

Gold score: arithmetic's formula, `rljax.tasks.base.step_gold_score` (1 for the right answer,
+ 0.5 x right steps / max(reference steps, written steps), - 0.01 per character beyond the
reference); the reference scores 1.5.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from rljax.tasks.base import (ANSWER_TAG, STANDARD_CORRUPTIONS, Task, leading_right_fraction, parse_int,
                              step_gold_score, tag_answer, verbose_completion)

__all__ = ["SORTING", "SortProblem", "make_problem", "parse_list", "check_answer", "check_steps", "split_steps",
           "gold_score", "corrupt", "well_formed", "insertion_steps"]

_LIST = re.compile(r"-?\d+(?:,-?\d+)*")
_PROMPT = "sort:"


def _fmt(xs) -> str:
    return ",".join(str(x) for x in xs)


def insertion_steps(nums) -> tuple[str, ...]:
    """The reference steps: the sorted list of the first k + 1 numbers, k = 1..len(nums) - 1."""
    return tuple(_fmt(sorted(nums[:k + 1])) for k in range(1, len(nums)))


@dataclass(frozen=True)
class SortProblem:
    nums: tuple[int, ...]
    level: int

    @property
    def prompt(self) -> str:
        return f"{_PROMPT}{_fmt(self.nums)}="

    @property
    def steps(self) -> tuple[str, ...]:
        return insertion_steps(self.nums)

    @property
    def answer(self) -> tuple[int, ...]:
        return tuple(sorted(self.nums))

    @property
    def completion(self) -> str:
        return ";".join(self.steps + (f"{ANSWER_TAG}{_fmt(self.answer)}",))


def make_problem(rng: random.Random, level: int) -> SortProblem:
    """Level L >= 1: L + 2 numbers in 0..10 * 2**L - 1."""
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    hi = 10 * 2**level - 1
    return SortProblem(tuple(rng.randint(0, hi) for _ in range(level + 2)), level)


def parse_list(text: str | None) -> tuple[int, ...] | None:
    """"3,7,21" -> (3, 7, 21); None when `text` is not a comma-separated list of integers, or holds one too
    long to convert (over 4,300 digits: no list of a problem does)."""
    if text is None or not _LIST.fullmatch(text.strip()):
        return None
    xs = tuple(parse_int(x) for x in text.strip().split(","))
    return None if None in xs else xs


def extract(completion: str) -> tuple[int, ...] | None:
    """The list after the last `answer:` tag, or None."""
    return parse_list(tag_answer(completion))


def check_answer(problem: SortProblem, completion: str) -> bool:
    return extract(completion) == problem.answer


def split_steps(completion: str) -> list[str]:
    """The step fields (everything before the answer field, empty fields dropped)."""
    fields = [f.strip() for f in completion.split(";")]
    return [f for f in fields if f and not f.startswith(ANSWER_TAG)]


def check_steps(problem: SortProblem, completion: str) -> list[bool]:
    """Step k (1-based) is True iff steps 1..k are each right: step k is sorted and holds exactly
    the previous list (number 1 alone before step 1) plus number k + 1 of the prompt."""
    labels, ok = [], True
    prev = Counter(problem.nums[:1])
    for k, step in enumerate(split_steps(completion), start=1):
        xs = parse_list(step)
        if ok and xs is not None and k < len(problem.nums):
            want = prev + Counter([problem.nums[k]])
            ok = list(xs) == sorted(xs) and Counter(xs) == want
            prev = want
        else:
            ok = False
        labels.append(ok)
    return labels


def well_formed(completion: str) -> bool:
    """`list;list;...;answer:list`, every list comma-separated integers (a syntactic check: the integers
    are not converted, so their length does not matter)."""
    fields = [f.strip() for f in completion.split(";")]
    return (fields[-1].startswith(ANSWER_TAG) and _LIST.fullmatch(fields[-1][len(ANSWER_TAG):].strip()) is not None
            and all(_LIST.fullmatch(s) for s in split_steps(completion)))


def gold_score(problem: SortProblem, completion: str) -> float:
    """`step_gold_score` (arithmetic's formula); the reference scores 1.5."""
    return step_gold_score(check_answer(problem, completion), check_steps(problem, completion), len(problem.steps),
                           len(completion), len(problem.completion))


def _delta(rng: np.random.Generator) -> int:
    return int(rng.integers(1, 10)) * (1 if rng.random() < 0.5 else -1)


def _insert(xs: list, x: int) -> list:
    """Insert x before the first element greater than it (on a sorted list: where it belongs)."""
    i = next((i for i, y in enumerate(xs) if y > x), len(xs))
    return xs[:i] + [x] + xs[i:]


def _render(lists, answer) -> str:
    return ";".join([_fmt(xs) for xs in lists] + ([f"{ANSWER_TAG}{_fmt(answer)}"] if answer is not None else []))


def corrupt(problem: SortProblem, rng: np.random.Generator, kind: str) -> str:
    """A corrupted completion (`rng` a numpy Generator).

    kind:
      "wrong_answer"  the reference steps, the answer with one number off by a nonzero delta (kept >= 0);
      "wrong_step"    step k inserts its number at a wrong place (a list that differs from the right one),
                      later steps insert theirs into that list the usual way (before the first greater
                      number), the answer is the last list: internally consistent, steps k.. labelled
                      False, the answer unsorted hence wrong (the misplaced pair stays inverted); when no
                      step can be misplaced (all numbers equal) step k's number is off by a delta instead;
      "truncated"     the first k steps (1 <= k < n when n > 1), no answer field;
      "verbose"       the reference with a filler phrase after every step (right, but longer).
    All but "verbose" fail `check_answer`."""
    nums, n = list(problem.nums), len(problem.steps)
    if kind == "wrong_answer":
        ans = list(problem.answer)
        i, d = int(rng.integers(len(ans))), _delta(rng)
        ans[i] = ans[i] + d if ans[i] + d >= 0 else ans[i] - d
        return _render([parse_list(s) for s in problem.steps], ans)
    if kind == "wrong_step":
        start = int(rng.integers(n))
        for k in list(range(start, n)) + list(range(start)):
            prefix = [sorted(nums[:j + 2]) for j in range(k)]
            prev, x = sorted(nums[:k + 1]), nums[k + 1]
            right = _insert(prev, x)
            wrong = [prev[:i] + [x] + prev[i:] for i in range(len(prev) + 1)]
            wrong = [w for w in wrong if w != right]
            if wrong:
                lists = prefix + [wrong[int(rng.integers(len(wrong)))]]
                break
        else:  # every number equal: no misplacement exists; the inserted number is off instead
            k = start
            prev = sorted(nums[:k + 1])
            x = nums[k + 1] + _delta(rng)
            lists = [sorted(nums[:j + 2]) for j in range(k)] + [_insert(prev, x)]
        for x in nums[k + 2:]:
            lists.append(_insert(lists[-1], x))
        return _render(lists, lists[-1])
    if kind == "truncated":
        k = int(rng.integers(1, n)) if n > 1 else 1
        return ";".join(problem.steps[:k])
    if kind == "verbose":
        return verbose_completion(problem.steps, f"{ANSWER_TAG}{_fmt(problem.answer)}", rng)
    raise ValueError(f"unknown corruption {kind!r}; expected one of {STANDARD_CORRUPTIONS}")


SORTING = Task(
    name="sorting",
    generate=make_problem,
    key=lambda p: p.nums,
    extract=extract,
    check=check_answer,
    gold_score=gold_score,
    corrupt=corrupt,
    corruptions=STANDARD_CORRUPTIONS,
    default_levels=(1, 2, 3),
    separator=";",
    split_steps=split_steps,
    check_steps=check_steps,
    steps=lambda p: p.steps,
    step_credit=lambda p, c: leading_right_fraction(check_steps(p, c), len(p.steps)),
    well_formed=well_formed,
    description="sort numbers by insertion, one inserted number per step",
)
