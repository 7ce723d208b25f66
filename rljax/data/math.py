"""Real math word problems: GSM8K- and MATH-style rows, final-answer extraction and equivalence.

Rows (from a local .json/.jsonl/.parquet file or directory, a list of dicts, a `datasets.Dataset`
or a hub name: anything `rljax.data.adapters.load_records` takes) become `MathProblem`s:

  gsm8k          {question, answer}: the answer field is the worked solution, then "#### <final>";
                 thousands separators are dropped from the final answer ("#### 1,234" -> "1234")
  math_problems  {problem, solution[, answer]}: the final answer is the content of the solution's
                 last \\boxed{...} (nested braces allowed), unless an answer field is named

A bad row raises `DataError` naming the row and the field.

`extract_answer(text)` reads a model's final answer, trying in order (the first rule that applies
decides; a rule applies as soon as its marker appears, so a malformed marker gives None rather than
a guess from elsewhere in the text — a truncated "\\boxed{4" must not earn credit for a stray "4"):

  1. the last <answer>...</answer> (R1 style); inside it, its last \\boxed{...} if any
  2. the last \\boxed{...} (or \\fbox{...}, or "\\boxed 5")
  3. the last "#### <answer>" line (GSM8K style)
  4. the last number in the text ("-1,234.5", "3/4"), unless `fallback=False`

`answers_match(predicted, reference)` decides equivalence: plain numbers (commas, "$" and trailing
unit words ignored) compare exactly as fractions; anything else goes to `math-verify`
(sympy-backed: \\frac{1}{2} = 0.5, \\sqrt{2}/2 = \\frac{\\sqrt2}{2}, x=3 vs 3, intervals, sets).
`math-verify` is imported only when needed (``pip install 'rljax[math]'``).
"""
from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass
from fractions import Fraction

from rljax.data.adapters import DataError, _check_str, _get, _rows, _where

__all__ = [
    "MathProblem",
    "gsm8k",
    "math_problems",
    "last_boxed",
    "extract_answer",
    "normalize_number",
    "answers_match",
]

_GSM8K_MARK = "####"
# GSM8K solutions carry calculator annotations, "48/2 = <<48/2=24>>24"; the model should not learn them.
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_BOXED = re.compile(r"\\(?P<cmd>boxed|fbox)(?P<space>\s*)")
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
# A number as models write it: sign (not a binary minus, as in "6-7"), thousands separators,
# decimals, or a simple fraction.
_NUMBER = re.compile(r"(?:(?<![\w)])[-+])?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+)")
# A whole answer that is just a number: optional sign and "$", thousands separators, then up to
# two unit words and a final period ("18 dollars", "$1,234.50", "7 cm."). A unit is a word of three
# or more letters or a common short unit, after a space: "3x" or "2 pi" stay algebra.
_SHORT_UNITS = "cm|km|mm|kg|mg|ml|ft|mi|lb|oz|hr|yd|in|m|g|s|h"
_PLAIN_NUMBER = re.compile(
    r"^(?P<sign>[-+])?\s*(?:\\?\$)?\s*(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    rf"(?:\s+(?:(?!(?:sqrt|sin|cos|tan|log|exp)\b)[a-zA-Z]{{3,}}|(?:{_SHORT_UNITS})\b)){{0,2}}\.?$")


@dataclass(frozen=True)
class MathProblem:
    """A math problem with its reference solution and final answer.

    question: the problem statement; solution: the worked reference solution (GSM8K: the text
    before "####", calculator annotations removed; MATH: the solution as given); answer: the
    reference final answer as text (a number, or LaTeX such as "\\frac{1}{2}").
    """

    question: str
    solution: str
    answer: str


# --------------------------------------------------------------------------- adapters


def _strip_separators(answer: str) -> str:
    """'1,234' -> '1234' for a number written with thousands separators; other text unchanged."""
    text = answer.strip()
    return text.replace(",", "") if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text) else text


def gsm8k(ds, *, question_field: str = "question", answer_field: str = "answer",
          keep_calculator: bool = False) -> list[MathProblem]:
    """Rows {question: str, answer: "<worked solution>\\n#### <final answer>"} -> MathProblems.

    The final answer is the text after the last "####" (thousands separators dropped); the solution
    is the text before it, without the "<<48/2=24>>" calculator annotations unless `keep_calculator`.
    Raises DataError naming the row and field for a missing or empty field, or a missing or empty
    final answer.
    """
    out = []
    for i, row in enumerate(_rows(ds)):
        question = _check_str(_get(i, row, question_field), question_field, i, allow_empty=False)
        text = _check_str(_get(i, row, answer_field), answer_field, i, allow_empty=False)
        at = text.rfind(_GSM8K_MARK)
        if at < 0:
            raise DataError(f"{_where(i, answer_field)} has no final answer: expected '#### <answer>' at the end, "
                            f"got ...{text[-60:]!r}")
        final = _strip_separators(text[at + len(_GSM8K_MARK):])
        if not final:
            raise DataError(f"{_where(i, answer_field)}: nothing after '####'")
        solution = text[:at].rstrip()
        if not keep_calculator:
            solution = _CALCULATOR.sub("", solution)
        out.append(MathProblem(question, solution, final))
    return out


def math_problems(ds, *, problem_field: str = "problem", solution_field: str = "solution",
                  answer_field: str | None = None) -> list[MathProblem]:
    """Rows {problem: str, solution: str[, answer: str]} -> MathProblems (MATH, MATH-500, ...).

    The answer is the row's `answer_field` when given, else the content of the solution's last
    \\boxed{...}. Raises DataError naming the row and field for a missing or empty field, a
    solution without \\boxed, or a \\boxed whose braces do not close.
    """
    out = []
    for i, row in enumerate(_rows(ds)):
        problem = _check_str(_get(i, row, problem_field), problem_field, i, allow_empty=False)
        solution = _check_str(_get(i, row, solution_field), solution_field, i, allow_empty=False)
        if answer_field is not None:
            answer = _check_str(_get(i, row, answer_field), answer_field, i, allow_empty=False).strip()
        else:
            try:
                answer = last_boxed(solution)
            except ValueError as e:
                raise DataError(f"{_where(i, solution_field)}: {e}") from None
            if answer is None:
                raise DataError(f"{_where(i, solution_field)} has no \\boxed{{...}} final answer")
            if not answer:
                raise DataError(f"{_where(i, solution_field)}: the last \\boxed{{}} is empty")
        out.append(MathProblem(problem, solution, answer))
    return out


# --------------------------------------------------------------------------- extraction


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced, stripped; the
    token after "\\boxed " when no brace follows ("\\boxed 5" -> "5"); None when there is none.

    Raises ValueError when the last \\boxed{ never closes (a truncated answer) or has no answer.
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    start = m.end()
    if start >= len(text) or text[start] != "{":
        word = re.match(r"[^\s${}]+", text[start:])
        # "\boxed 5" is legal TeX (the space is required); "\boxed" alone is a marker without an answer.
        if word is None or not m.group("space"):
            raise ValueError(f"\\{m.group('cmd')} without an answer at position {m.start()}")
        return word.group()
    depth, j = 0, start
    while j < len(text):
        c = text[j]
        if c == "\\":  # skip the escaped character: "\{" and "\}" neither open nor close a group
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:j].strip()
        j += 1
    raise ValueError(f"unbalanced braces: the \\{m.group('cmd')}{{ at position {m.start()} never closes")


def extract_answer(text: str, *, fallback: bool = True) -> str | None:
    """The final answer a model wrote in `text`, or None (rules and their order: see the module
    docstring). A present but malformed marker (an unclosed <answer> or \\boxed{, an empty
    <answer></answer>, "####" with nothing after it) gives None."""
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a string, got {type(text).__name__}")
    open_at = text.rfind(_ANSWER_OPEN)
    if open_at >= 0 or _ANSWER_CLOSE in text:
        close_at = text.find(_ANSWER_CLOSE, open_at + len(_ANSWER_OPEN)) if open_at >= 0 else -1
        if open_at < 0 or close_at < 0:
            return None
        inner = text[open_at + len(_ANSWER_OPEN):close_at]
        try:
            boxed = last_boxed(inner)
        except ValueError:
            return None
        inner = boxed if boxed is not None else inner.strip().strip("$").strip()
        return inner or None
    if _BOXED.search(text):
        try:
            boxed = last_boxed(text)
        except ValueError:
            return None
        return boxed or None
    mark = text.rfind(_GSM8K_MARK)
    if mark >= 0:
        line = text[mark + len(_GSM8K_MARK):].split("\n", 1)[0].strip()
        return line or None
    if fallback:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1]
    return None


# --------------------------------------------------------------------------- equivalence


def normalize_number(answer: str) -> Fraction | None:
    """The exact value of an answer that is just a number ("1,234", "$18", "-0.5", "18 dollars",
    "7 cm."), or None when it is anything else (LaTeX, an expression, a percentage, text)."""
    text = answer.strip()
    if len(text) > 1 and text[0] == text[-1] == "$":  # LaTeX math mode, "$18$"
        text = text[1:-1].strip()
    m = _PLAIN_NUMBER.match(text)
    if m is None:
        return None
    value = Fraction(m.group("num").replace(",", ""))
    return -value if m.group("sign") == "-" else value


@functools.lru_cache(maxsize=4096)
def _parsed(answer: str, timeout: int | None) -> tuple:
    """math-verify's parse of an answer (wrapped in \\boxed{} so bare LaTeX and numbers parse),
    cached: a reference answer is parsed once for all samples of its prompt."""
    from math_verify import parse

    return tuple(parse("\\boxed{" + answer + "}", parsing_timeout=timeout))


def answers_match(predicted: str | None, reference: str, *, timeout_seconds: int = 5) -> bool:
    """Whether `predicted` is mathematically equal to `reference` (both final answers as text).

    Plain numbers compare exactly (so "1,234" = "1234" = "$1,234", "0.50" = ".5", "18 dollars" =
    "18"); everything else through math-verify's `verify(gold, prediction)` (\\frac{1}{2} = 0.5,
    \\dfrac34 = 0.75, 3.0 = 3, x=3 vs 3, 50\\% vs 0.5; numbers compared after rounding to 6 decimals,
    so 0.333 is not 1/3). None or an empty prediction is never right. math-verify bounds parsing
    and comparison with `timeout_seconds` through SIGALRM, which works on the main thread only;
    elsewhere no timeout is applied.
    """
    if predicted is None or not predicted.strip():
        return False
    if not isinstance(reference, str) or not reference.strip():
        raise ValueError(f"reference answer must be a non-empty string, got {reference!r}")
    pred_num, ref_num = normalize_number(predicted), normalize_number(reference)
    if pred_num is not None and ref_num is not None:
        return pred_num == ref_num
    try:
        from math_verify import verify
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("answer equivalence needs 'math-verify': pip install 'rljax[math]'") from e
    timeout = timeout_seconds if threading.current_thread() is threading.main_thread() else None
    # Numbers with units or separators reach sympy as the bare number ("18 dollars" would parse as
    # the product 18*d*o*l*l*a*r*s).
    pred = str(pred_num) if pred_num is not None else predicted.strip()
    ref = str(ref_num) if ref_num is not None else reference.strip()
    gold, target = _parsed(ref, timeout), _parsed(pred, timeout)
    if not gold or not target:
        return False
    return bool(verify(list(gold), list(target), timeout_seconds=timeout))
