"""Multi-step arithmetic with a verifiable chain of thought (no download needed).

A problem is an integer expression with + - * and (from level 3) parentheses:

    prompt      "23+58*2="
    completion  "58*2=116;23+116=139;answer:139"

Each step reduces one operation, innermost parentheses first, then * before
+/-, left to right; the last field states the answer. `check_answer` verifies
the final answer, `check_steps` labels every step (a step is right when it
applies a legal reduction with the right result and every earlier step was
right: the prefix can still reach the answer), which gives process labels.
All characters are in `rljax.tokenizer.DEFAULT_ALPHABET`.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

ANSWER_TAG = "answer:"
_STEP = re.compile(r"^(-?\d+)([+\-*])(-?\d+)=(-?\d+)$")
_TOKEN = re.compile(r"\d+|[+\-*()]")
_ANSWER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    expression: str  # e.g. "23+58*2"
    steps: tuple[str, ...]  # e.g. ("58*2=116", "23+116=139")
    answer: int
    level: int

    @property
    def prompt(self) -> str:
        return self.expression + "="

    @property
    def completion(self) -> str:
        return ";".join(self.steps + (f"{ANSWER_TAG}{self.answer}",))


def _tokens(expression: str) -> list:
    out = []
    for t in _TOKEN.findall(expression):
        out.append(int(t) if t.isdigit() else t)
    return out


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _next_reduction(toks: list) -> int | None:
    """Index i of the operator of the next legal reduction toks[i-1] op toks[i+1], or None when done."""
    # innermost parentheses: the last "(" before the first ")"
    lo, hi = 0, len(toks)
    if ")" in toks:
        hi = toks.index(")")
        lo = max(i for i in range(hi) if toks[i] == "(") + 1
    span = range(lo + 1, hi - 1)
    for ops in (("*",), ("+", "-")):
        for i in span:
            if toks[i] in ops and isinstance(toks[i - 1], int) and isinstance(toks[i + 1], int):
                return i
    return None


def _reduce(toks: list, i: int, value: int | None = None) -> list:
    """Replace toks[i-1] op toks[i+1] by its value (or by `value`, e.g. a wrong one)."""
    if value is None:
        value = _apply(toks[i - 1], toks[i], toks[i + 1])
    toks = toks[: i - 1] + [value] + toks[i + 2:]
    # drop parentheses around a single number
    for j in range(1, len(toks) - 1):
        if toks[j - 1] == "(" and toks[j + 1] == ")" and isinstance(toks[j], int):
            return toks[: j - 1] + [toks[j]] + toks[j + 2:]
    return toks


def _negate_unary(toks: list) -> list:
    """Fold a leading minus into its number (intermediate results may be negative)."""
    out = []
    for t in toks:
        if isinstance(t, int) and out and out[-1] == "-" and (len(out) == 1 or out[-2] in ("(", "+", "-", "*")):
            out[-1] = -t
        else:
            out.append(t)
    return out


def reduction_chain(expression: str, *, position: int | None = None, delta: int = 0) -> tuple[tuple[str, ...], int]:
    """The chain of steps and the final value of `expression`; with `position`,
    step `position` (0-based) is off by `delta` and later steps are computed
    consistently from the wrong value (a corrupted but self-consistent chain)."""
    toks = _negate_unary(_tokens(expression))
    steps: list[str] = []
    while (i := _next_reduction(toks)) is not None:
        a, op, b = toks[i - 1], toks[i], toks[i + 1]
        c = _apply(a, op, b) + (delta if len(steps) == position else 0)
        steps.append(f"{a}{op}{b}={c}")
        toks = _reduce(toks, i, c)
    if len(toks) != 1 or not isinstance(toks[0], int):
        raise ValueError(f"malformed expression {expression!r}")
    return tuple(steps), toks[0]


def solve(expression: str) -> tuple[tuple[str, ...], int]:
    """The canonical chain of steps and the value of `expression`."""
    return reduction_chain(expression)


def make_problem(rng: random.Random, level: int) -> Problem:
    """Level L >= 1: L operations, operands up to 10 * 2**L, parentheses from level 3."""
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    hi = 10 * 2**level
    nums = [rng.randint(1, hi) for _ in range(level + 1)]
    ops = [rng.choice("+-*") for _ in range(level)]
    parts = [str(nums[0])]
    for op, n in zip(ops, nums[1:]):
        parts += [op, str(n)]
    if level >= 3 and rng.random() < 0.5:  # wrap one binary sub-expression
        k = rng.randrange(level)
        parts[2 * k] = "(" + parts[2 * k]
        parts[2 * k + 2] = parts[2 * k + 2] + ")"
    expression = "".join(parts)
    steps, answer = solve(expression)
    return Problem(expression, steps, answer, level)


def make_split(n_train: int, n_test: int, levels=(1, 2, 3), seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Deterministic train/test problems from `seed`; no expression appears in both."""
    rng = random.Random(seed)
    seen, out = set(), []
    attempts = 0
    while len(out) < n_train + n_test:
        attempts += 1
        if attempts > 50 * (n_train + n_test) + 1000:
            raise ValueError(f"make_split: could not find {n_train + n_test} distinct problems at levels {levels} "
                             f"(found {len(out)}); lower n_train/n_test or add harder levels")
        p = make_problem(rng, rng.choice(list(levels)))
        if p.expression not in seen:
            seen.add(p.expression)
            out.append(p)
    return out[:n_train], out[n_train:]


def _int(text: str) -> int | None:
    """int(text), or None for a literal longer than Python converts (4,300 digits): a completion, not a
    reward-function error, and no answer or step of a problem is that long."""
    try:
        return int(text)
    except ValueError:
        return None


def parse_answer(completion: str) -> int | None:
    """The integer after the last `answer:` tag: the whole rest of the completion, surrounding whitespace
    aside, must be one integer (-?digits), as `well_formed` requires of the answer field; None when the tag
    is absent, when anything else follows ("answer:139.7", "answer:139abc", "answer:139 or 140",
    "answer:139;") or when the integer is too long to convert (over 4,300 digits)."""
    at = completion.rfind(ANSWER_TAG)
    if at < 0:
        return None
    text = completion[at + len(ANSWER_TAG):].strip()
    return _int(text) if _ANSWER.fullmatch(text) else None


def check_answer(problem: Problem, completion: str) -> bool:
    return parse_answer(completion) == problem.answer


def split_steps(completion: str) -> list[str]:
    """The step fields of a completion (everything before the answer field)."""
    fields = [f.strip() for f in completion.split(";")]
    return [f for f in fields if f and not f.startswith(ANSWER_TAG)]


def well_formed(completion: str) -> bool:
    """Whether the completion is `step;step;...;answer:N` with well-formed steps `a op b=c`."""
    fields = [f.strip() for f in completion.split(";")]
    return (fields[-1].startswith(ANSWER_TAG) and _ANSWER.fullmatch(fields[-1][len(ANSWER_TAG):]) is not None
            and all(_STEP.match(s) for s in split_steps(completion)))


def check_steps(problem: Problem, completion: str) -> list[bool]:
    """Per-step labels: step k is True iff steps 1..k each apply the next legal
    reduction of the current expression and compute it correctly. A step with a number too long to
    convert (over 4,300 digits) is wrong."""
    toks = _negate_unary(_tokens(problem.expression))
    labels, ok = [], True
    for step in split_steps(completion):
        m = _STEP.match(step)
        if ok and m:
            a, op, b, c = _int(m.group(1)), m.group(2), _int(m.group(3)), _int(m.group(4))
            i = _next_reduction(toks)
            ok = (None not in (a, b, c) and i is not None and (toks[i - 1], toks[i], toks[i + 1]) == (a, op, b)
                  and _apply(a, op, b) == c)
            if ok:
                toks = _reduce(toks, i)
        else:
            ok = False
        labels.append(ok)
    return labels
