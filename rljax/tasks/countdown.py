"""Countdown: reach a target from given numbers with + - *, one equation per step.

    prompt      "17 from 3,5,2="
    completion  "3*5=15;15+2=17;answer:3*5+2"

Rules. Each given number may be used at most once. A step `a op b=c` (op one of + - *) is valid
when a and b are available (given numbers not yet used, or results of earlier steps not yet
used; a == b needs two of them), c is a op b, and c >= 0; the step uses a and b up and makes c
available. The answer is an expression after `answer:` (integers, + - *, parentheses): it is right
when it evaluates to the target and uses each given number at most once (intermediate values
inside the expression are not restricted). Many solutions usually exist; the checks accept any.

Why this task: checking a step is local (one small evaluation and a look at what is still
available), while solving needs search over which numbers to combine. `valid_steps` gives the
local labels; `check_steps` the labels with arithmetic's semantics, "the prefix can still reach
the answer": step k is True iff steps 1..k are each valid and the target is still reachable from
what is available after step k (`reachable`, an exhaustive search: a valid step into a dead end
is labelled False, which a verifier can only see by searching too).

Generation, level L in 1..4: L + 2 numbers drawn from 1..4 + 5L; the reference combines two
random available numbers with a random operation (- as larger minus smaller, never 0; * only
while the product stays <= 100 L, else +) until one number is left, the target (redrawn when
it is one of the given numbers). The reference answer renders that combination tree with the
fewest parentheses.

Gold score: arithmetic's formula (`rljax.tasks.base.step_gold_score`), with one change so that
any solution scores like the reference: when the written steps are all right and the last one
produces the target (a complete solution), its steps count as all the steps (denominator
len(steps)) instead of max(reference steps, written steps). So the reference and any complete
solution no longer than it score 1.5; a longer complete solution loses 0.01 per extra character.
"""
from __future__ import annotations

import functools
import random
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from rljax.tasks.base import (ANSWER_TAG, STANDARD_CORRUPTIONS, Task, leading_right_fraction, parse_int,
                              step_gold_score, tag_answer, verbose_completion)

__all__ = ["COUNTDOWN", "CountdownProblem", "make_problem", "evaluate", "reachable", "check_answer",
           "check_steps", "valid_steps", "split_steps", "gold_score", "corrupt", "well_formed", "MAX_LEVEL",
           "MAX_DEPTH"]

MAX_LEVEL = 4
# The deepest parenthesis nesting `evaluate` reads. Its parser recurses three frames per level, so ~330
# levels would exhaust Python's default recursion limit (RecursionError inside the reward function); a
# reference answer nests at most MAX_LEVEL + 1 deep.
MAX_DEPTH = 32
_STEP = re.compile(r"^(-?\d+)([+\-*])(-?\d+)=(-?\d+)$")
_TOKEN = re.compile(r"\s*(\d+|[+\-*()])")
_PREC = {"+": 1, "-": 1, "*": 2}


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


@dataclass(frozen=True)
class CountdownProblem:
    """nums: the given numbers; target; plan: the reference, one (left, op, right) per step, where
    node i < len(nums) is given number i and node len(nums) + k the result of step k."""

    nums: tuple[int, ...]
    target: int
    plan: tuple[tuple[int, str, int], ...]
    level: int

    @property
    def prompt(self) -> str:
        return f"{self.target} from {','.join(map(str, self.nums))}="

    @property
    def steps(self) -> tuple[str, ...]:
        return _steps(self.plan, _values(self.nums, self.plan))

    @property
    def answer(self) -> str:
        return _expression(self.nums, self.plan)

    @property
    def completion(self) -> str:
        return ";".join(self.steps + (f"{ANSWER_TAG}{self.answer}",))


def _values(leaves, plan) -> list[int]:
    vals = list(leaves)
    for left, op, right in plan:
        vals.append(_apply(vals[left], op, vals[right]))
    return vals


def _steps(plan, vals) -> tuple[str, ...]:
    n = len(vals) - len(plan)
    return tuple(f"{vals[l]}{op}{vals[r]}={vals[n + k]}" for k, (l, op, r) in enumerate(plan))


def _expression(leaves, plan) -> str:
    """The plan's final value as one expression with the fewest parentheses."""
    n = len(leaves)
    text = [str(v) for v in leaves] + [None] * len(plan)
    prec = [3] * n + [0] * len(plan)
    for k, (l, op, r) in enumerate(plan):
        ls = f"({text[l]})" if prec[l] < _PREC[op] else text[l]
        rs = f"({text[r]})" if prec[r] < _PREC[op] or (prec[r] == _PREC[op] and op == "-") else text[r]
        text[n + k], prec[n + k] = f"{ls}{op}{rs}", _PREC[op]
    return text[-1]


def make_problem(rng: random.Random, level: int) -> CountdownProblem:
    """Level L in 1..MAX_LEVEL: L + 2 numbers in 1..4 + 5L, every one used by the reference."""
    if not 1 <= level <= MAX_LEVEL:
        raise ValueError(f"countdown level must be in 1..{MAX_LEVEL}, got {level}")
    n, hi, cap = level + 2, 4 + 5 * level, 100 * level
    while True:
        nums = tuple(rng.randint(1, hi) for _ in range(n))
        vals, live, plan = list(nums), list(range(n)), []
        while len(live) > 1:
            i, j = rng.sample(live, 2)
            op = rng.choice("+-*")
            if op == "-" and vals[i] == vals[j]:
                op = "+"
            if op == "-" and vals[i] < vals[j]:
                i, j = j, i
            if op == "*" and vals[i] * vals[j] > cap:
                op = "+"
            plan.append((i, op, j))
            vals.append(_apply(vals[i], op, vals[j]))
            live = [x for x in live if x not in (i, j)] + [len(vals) - 1]
        if vals[-1] not in nums:
            return CountdownProblem(nums, vals[-1], tuple(plan), level)


# ----------------------------------------------------------------------------- checking
def evaluate(expression: str) -> tuple[int, tuple[int, ...]] | None:
    """(value, the integer literals in order) of an expression of non-negative integers, + - * and
    parentheses (* before + -, left to right); None when it is not one, or when it nests parentheses
    deeper than MAX_DEPTH or holds a literal too long to convert (over 4,300 digits)."""
    toks, pos, expression = [], 0, expression.strip()
    depth = 0
    while pos < len(expression):
        m = _TOKEN.match(expression, pos)
        if not m:
            return None
        tok = m.group(1)
        if tok.isdigit() and parse_int(tok) is None:
            return None
        depth += (tok == "(") - (tok == ")")
        if depth > MAX_DEPTH:
            return None
        toks.append(tok)
        pos = m.end()
    lits: list[int] = []
    i = 0

    def atom():
        nonlocal i
        if i < len(toks) and toks[i].isdigit():
            i += 1
            lits.append(int(toks[i - 1]))
            return int(toks[i - 1])
        if i < len(toks) and toks[i] == "(":
            i += 1
            v = expr()
            if v is None or i >= len(toks) or toks[i] != ")":
                return None
            i += 1
            return v
        return None

    def term():
        nonlocal i
        v = atom()
        while v is not None and i < len(toks) and toks[i] == "*":
            i += 1
            w = atom()
            v = None if w is None else v * w
        return v

    def expr():
        nonlocal i
        v = term()
        while v is not None and i < len(toks) and toks[i] in "+-":
            op = toks[i]
            i += 1
            w = term()
            v = None if w is None else _apply(v, op, w)
        return v

    v = expr() if toks else None
    return None if v is None or i != len(toks) else (v, tuple(lits))


def extract(completion: str) -> str | None:
    """The expression after the last `answer:` tag when it parses (`evaluate`), else None."""
    text = tag_answer(completion)
    return text if text is not None and evaluate(text) is not None else None


def check_answer(problem: CountdownProblem, completion: str) -> bool:
    """The answer expression evaluates to the target and uses each given number at most once."""
    text = extract(completion)
    if text is None:
        return False
    value, lits = evaluate(text)
    return value == problem.target and not Counter(lits) - Counter(problem.nums)


@functools.lru_cache(maxsize=1 << 16)
def _reachable(avail: tuple[int, ...], target: int) -> bool:
    if target in avail:
        return True
    for i in range(len(avail)):
        for j in range(i + 1, len(avail)):
            a, b = max(avail[i], avail[j]), min(avail[i], avail[j])
            rest = avail[:i] + avail[i + 1:j] + avail[j + 1:]
            for c in {a + b, a - b, a * b}:
                if _reachable(tuple(sorted(rest + (c,))), target):
                    return True
    return False


def reachable(available, target: int) -> bool:
    """Whether valid steps from the multiset `available` can make `target` (it is available, or some
    step leads to a multiset from which it is reachable)."""
    return _reachable(tuple(sorted(available)), target)


def split_steps(completion: str) -> list[str]:
    """The step fields (everything before the answer field, empty fields dropped)."""
    fields = [f.strip() for f in completion.split(";")]
    return [f for f in fields if f and not f.startswith(ANSWER_TAG)]


def _walk(problem: CountdownProblem, completion: str, search: bool) -> tuple[list[bool], Counter]:
    avail, labels, ok = Counter(problem.nums), [], True
    for step in split_steps(completion):
        m = _STEP.match(step)
        if ok and m:
            a, op, b, c = parse_int(m.group(1)), m.group(2), parse_int(m.group(3)), parse_int(m.group(4))
            need = Counter([a, b])  # a number too long to convert (None) is never available: the step is wrong
            ok = None not in (a, b, c) and not need - avail and _apply(a, op, b) == c and c >= 0
            if ok:
                avail = avail - need + Counter([c])
                ok = not search or reachable(avail.elements(), problem.target)
        else:
            ok = False
        labels.append(ok)
    return labels, avail


def valid_steps(problem: CountdownProblem, completion: str) -> list[bool]:
    """Local labels: step k is True iff steps 1..k are each valid (available operands, right result,
    c >= 0), whether or not the target can still be reached. A number too long to convert (over 4,300
    digits) makes its step invalid."""
    return _walk(problem, completion, search=False)[0]


def check_steps(problem: CountdownProblem, completion: str) -> list[bool]:
    """Step k is True iff steps 1..k are each valid and the target is still reachable after step k."""
    return _walk(problem, completion, search=True)[0]


def _complete(problem: CountdownProblem, completion: str, labels: list[bool]) -> bool:
    """The written steps are all right and the last one produces the target."""
    steps = split_steps(completion)
    return bool(labels) and all(labels) and int(_STEP.match(steps[-1]).group(4)) == problem.target


def gold_score(problem: CountdownProblem, completion: str) -> float:
    """`step_gold_score`, with a complete solution's steps counted against its own length (module docstring)."""
    labels = check_steps(problem, completion)
    n_ref = len(labels) if _complete(problem, completion, labels) else len(problem.plan)
    return step_gold_score(check_answer(problem, completion), labels, n_ref, len(completion),
                           len(problem.completion))


def step_credit(problem: CountdownProblem, completion: str) -> float:
    """1 for a complete solution (steps all right, the last one produces the target), else the leading
    right steps' fraction of the reference's steps."""
    labels = check_steps(problem, completion)
    return 1.0 if _complete(problem, completion, labels) else leading_right_fraction(labels, len(problem.plan))


def well_formed(completion: str) -> bool:
    """`a op b=c;...;answer:expression` with well-formed equations and a parseable expression."""
    fields = [f.strip() for f in completion.split(";")]
    return (fields[-1].startswith(ANSWER_TAG) and extract(fields[-1]) is not None
            and all(_STEP.match(s) for s in split_steps(completion)))


# ----------------------------------------------------------------------------- corruptions
def _delta(rng: np.random.Generator) -> int:
    return int(rng.integers(1, 10)) * (1 if rng.random() < 0.5 else -1)


def _render(steps, answer: str | None) -> str:
    return ";".join(list(steps) + ([f"{ANSWER_TAG}{answer}"] if answer is not None else []))


def corrupt(problem: CountdownProblem, rng: np.random.Generator, kind: str) -> str:
    """A corrupted completion (`rng` a numpy Generator).

    kind:
      "wrong_answer"  the reference steps, the answer expression with one given number off by a nonzero
                      delta (kept >= 1; the value then misses the target);
      "wrong_step"    the step that uses some given number uses it off by a delta instead, a value not
                      available at that step (the typical countdown slip: a number one does not have);
                      later steps recomputed consistently and the answer rendered from the same slip,
                      so steps k.. are labelled False and the answer misses the target;
      "truncated"     the first k steps (1 <= k < n when n > 1), no answer field;
      "verbose"       the reference with a filler phrase after every step (right, but longer).
    All but "verbose" fail `check_answer`."""
    nums, plan, n = list(problem.nums), problem.plan, len(problem.plan)

    def slipped(leaf: int, avail: Counter):
        """nums with nums[leaf] moved by a delta to a value >= 1 that is not in `avail`."""
        d = _delta(rng)
        for step in range(1, 40):
            for v in (nums[leaf] + d * step, nums[leaf] - d * step):
                if v >= 1 and v != nums[leaf] and avail[v] == 0:
                    return nums[:leaf] + [v] + nums[leaf + 1:]
        raise AssertionError("unreachable: finitely many values are available")

    if kind == "wrong_answer":
        leaf = int(rng.integers(len(nums)))
        leaves = slipped(leaf, Counter())
        return _render(problem.steps, _expression(leaves, plan))
    if kind == "wrong_step":
        # every given number is an operand of exactly one step; pick one, slip it there
        leaf = int(rng.integers(len(nums)))
        k = next(k for k, (l, _, r) in enumerate(plan) if leaf in (l, r))
        vals = _values(nums, plan)
        used = {x for l, _, r in plan[:k] for x in (l, r)}
        avail = Counter(vals[x] for x in range(len(nums) + k) if x not in used)
        leaves = slipped(leaf, avail)
        return _render(_steps(plan, _values(leaves, plan)), _expression(leaves, plan))
    if kind == "truncated":
        k = int(rng.integers(1, n)) if n > 1 else 1
        return _render(problem.steps[:k], None)
    if kind == "verbose":
        return verbose_completion(problem.steps, f"{ANSWER_TAG}{problem.answer}", rng)
    raise ValueError(f"unknown corruption {kind!r}; expected one of {STANDARD_CORRUPTIONS}")


COUNTDOWN = Task(
    name="countdown",
    generate=make_problem,
    key=lambda p: (p.target, tuple(sorted(p.nums))),
    extract=extract,
    check=check_answer,
    gold_score=gold_score,
    corrupt=corrupt,
    corruptions=STANDARD_CORRUPTIONS,
    default_levels=(1, 2),
    max_level=MAX_LEVEL,
    separator=";",
    split_steps=split_steps,
    check_steps=check_steps,
    steps=lambda p: p.steps,
    step_credit=step_credit,
    well_formed=well_formed,
    description="reach a target from given numbers with + - *, one equation per step (solving needs search)",
)
