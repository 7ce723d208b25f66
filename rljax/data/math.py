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
  4. the last number in the text ("-1,234.5", "3/4", "−7" with a Unicode minus read as "-7"),
     unless `fallback=False`

An <answer> holding prose rather than a formula ("The answer is 42.") gives what follows its last
"answer is" / "answer:", else (no LaTeX in it) its last number.

`answers_match(predicted, reference)` decides equivalence: plain numbers (commas, "$" and trailing
unit words ignored; scale words applied: "5 million" = 5000000, "2 dozen" = 24, "5 squared" = 25)
compare exactly as fractions; anything else goes to `math-verify` (sympy-backed: \\frac{1}{2} = 0.5,
\\sqrt{2}/2 = \\frac{\\sqrt2}{2}, x=3 vs 3, intervals, sets) under a wall-clock limit.
`math-verify` is imported only when needed (``pip install 'rljax[math]'``).
"""
from __future__ import annotations

import functools
import gc
import logging
import re
import signal
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
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
    "MATH_VERIFY_TIMEOUT_S",
]

# The default wall-clock limit of one math-verify comparison (`answers_match`), in seconds.
MATH_VERIFY_TIMEOUT_S = 5.0

_GSM8K_MARK = "####"
# GSM8K solutions carry calculator annotations, "48/2 = <<48/2=24>>24"; the model should not learn them.
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_BOXED = re.compile(r"\\(?P<cmd>boxed|fbox)(?P<space>\s*)")
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
# Minus signs other than "-" that models and typesetting write: U+2212 MINUS SIGN, U+FE63 SMALL
# HYPHEN-MINUS, U+FF0D FULLWIDTH HYPHEN-MINUS. Not the dashes (U+2012-2015): "pages 3–5" is a range.
_MINUS_SIGNS = "\u2212\ufe63\uff0d"
_ASCII_MINUS = str.maketrans({c: "-" for c in _MINUS_SIGNS})
# A number as models write it: sign (not a binary minus, as in "6-7"), thousands separators,
# decimals, or a simple fraction.
_NUMBER = re.compile(rf"(?:(?<![\w)])[-+{_MINUS_SIGNS}])?(?:(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+)")
# A whole answer that is just a number: optional sign and "$", thousands separators, up to two scale
# words (two: "5 hundred thousand"; a bound, since "2 squared squared ..." grows doubly exponentially),
# then up to two unit words and a final period ("18 dollars", "$1,234.50", "7 cm.", "5 million
# dollars"). A unit is a word of three or more letters or a common short unit, after a space: "3x"
# or "2 pi" stay algebra. Scale and power words change the value, so they are never units ("5
# million" is 5000000, not 5); "percent" neither: "50 percent" goes to math-verify as "50\\%".
_SHORT_UNITS = "cm|km|mm|kg|mg|ml|ft|mi|lb|oz|hr|yd|in|m|g|s|h"
_SCALES = {"dozen": 12, "hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_POWERS = {"squared": 2, "cubed": 3}
_SCALE_WORD = rf"(?i:(?:{'|'.join(_SCALES)})s?|{'|'.join(_POWERS)})"
_NOT_A_UNIT = rf"(?:(?:sqrt|sin|cos|tan|log|exp)\b|(?i:percent|per\s*cent)\b|{_SCALE_WORD}\b)"
_PLAIN_NUMBER = re.compile(
    r"^(?P<sign>[-+])?\s*(?:\\?\$)?\s*(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    rf"(?P<scale>(?:\s+{_SCALE_WORD}\b){{0,2}})"
    rf"(?:\s+(?:(?!{_NOT_A_UNIT})[a-zA-Z]{{3,}}|(?:{_SHORT_UNITS})\b)){{0,2}}\.?$")
# A unit written in LaTeX text mode, "18 \\text{ cm}": read as the plain word.
_TEXT_WORD = re.compile(r"\\(?:text|textrm|mathrm|mbox)\s*\{\s*([A-Za-z][A-Za-z ]*?)\s*\}")
# "50 percent" / "50 per cent": math-verify reads "50\\%" (as 50 and as 0.5, its percent rule).
_PERCENT_WORD = re.compile(r"^(?P<num>.*\d)\s*(?i:percent|per\s*cent)\.?$")
# Prose inside <answer>: "The answer is 42." -> "42"; the last "answer is"/"answer:"/"answer ="
# phrase decides. Two plain words in a row (not a LaTeX command) mark prose.
_ANSWER_PHRASE = re.compile(r"(?i:\banswer\s*(?:is\b\s*:?|:|=)\s*)")
_PROSE = re.compile(r"(?<![\\\w])[A-Za-z]{2,}\s+[A-Za-z]{2,}\b")


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
    Raises DataError naming the row and field for a missing or empty field, a missing or empty
    final answer, or text after the final answer's line.
    """
    out = []
    for i, row in enumerate(_rows(ds)):
        question = _check_str(_get(i, row, question_field), question_field, i, allow_empty=False)
        text = _check_str(_get(i, row, answer_field), answer_field, i, allow_empty=False)
        at = text.rfind(_GSM8K_MARK)
        if at < 0:
            raise DataError(f"{_where(i, answer_field)} has no final answer: expected '#### <answer>' at the end, "
                            f"got ...{text[-60:]!r}")
        line, _, rest = text[at + len(_GSM8K_MARK):].partition("\n")
        if rest.strip():  # extract_answer reads the "####" line only: the answer would differ from the reference
            raise DataError(f"{_where(i, answer_field)}: text after the '#### <answer>' line: {rest.strip()[:60]!r}")
        final = _strip_separators(line)
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
        inner = boxed if boxed is not None else _answer_in_prose(inner.strip().strip("$").strip())
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
            return numbers[-1].translate(_ASCII_MINUS)
    return None


def _answer_in_prose(inner: str) -> str:
    """The answer an <answer> block states in words: the text after its last "answer is" /
    "answer:" / "answer =" (trailing period and "$" dropped), else, for prose (two plain words in a
    row) without LaTeX, its last number; `inner` itself otherwise (a formula, a number with units,
    prose with no number). math-verify reads "The answer is 42" as a product of letters, never 42."""
    if normalize_number(inner) is not None:  # "18 dollars", "5 million": a number with words, not prose
        return inner
    phrases = list(_ANSWER_PHRASE.finditer(inner))
    if phrases:
        stated = inner[phrases[-1].end():].strip().rstrip(".").strip().strip("$").strip()
        if stated:
            return stated
    if _PROSE.search(inner) and "\\" not in inner:
        numbers = _NUMBER.findall(inner)
        if numbers:
            return numbers[-1].translate(_ASCII_MINUS)
    return inner


# --------------------------------------------------------------------------- equivalence


def normalize_number(answer: str) -> Fraction | None:
    """The exact value of an answer that is just a number ("1,234", "$18", "-0.5", "−7" with a
    Unicode minus, "18 dollars", "7 cm.", "18 \\text{ cm}"), scale and power words applied ("5
    million" = 5000000, "2 dozen" = 24, "5 squared" = 25), or None when it is anything else (LaTeX,
    an expression, a percentage, text). Any number of digits: a 5,000-digit number is read exactly
    (through Decimal, which has no limit on digits, where int() refuses past 4,300)."""
    text = _TEXT_WORD.sub(r" \1", answer.translate(_ASCII_MINUS)).strip()
    if len(text) > 1 and text[0] == text[-1] == "$":  # LaTeX math mode, "$18$"
        text = text[1:-1].strip()
    m = _PLAIN_NUMBER.match(text)
    if m is None:
        return None
    value = Fraction(Decimal(m.group("num").replace(",", "")))
    for word in m.group("scale").lower().split():
        value = value ** _POWERS[word] if word in _POWERS else value * _SCALES[word.removesuffix("s")]
    return -value if m.group("sign") == "-" else value


@functools.lru_cache(maxsize=4096)
def _parsed(answer: str) -> tuple:
    """math-verify's parse of an answer (wrapped in \\boxed{} so bare LaTeX and numbers parse),
    cached: a reference answer is parsed once for all samples of its prompt. Unbounded in time:
    callers bound it (`_bounded`); an interrupted parse raises, so it is never cached."""
    from math_verify import parse

    return tuple(parse("\\boxed{" + answer + "}", parsing_timeout=None))


class _Deadline(BaseException):
    """Raised by `_bounded`'s SIGALRM handler. A BaseException, so that the `except Exception`
    handlers of sympy and math-verify let it through to `_bounded`."""


# After the first alarm, re-fire every _REARM_S seconds: an exception raised where Python cannot
# propagate it (a gc callback such as JAX's `_xla_gc_callback`, a __del__, a bare `except:`) is
# printed as "Exception ignored in ..." and lost, and a one-shot alarm would then never end the call.
_REARM_S = 0.05


def _on_alarm(signum, frame):
    # Quiet in `_bounded`'s own frame (its set-up and clean-up, before and after the bounded call) and
    # in signal.signal (which it calls to restore the handler): an exception there would escape it.
    if frame is not None and frame.f_code in _QUIET_CODES:
        return
    raise _Deadline()


def _bounded(fn, limit: float | None):
    """(fn(), False), or (None, True) when `fn` ran out of `limit` seconds of wall time.

    On the main thread a SIGALRM interval timer interrupts `fn` after `limit` s and again every
    _REARM_S s until it gives up (a swallowed interrupt is retried), with automatic garbage
    collection off meanwhile (its callbacks are where interrupts are swallowed); a call that
    still returns past `limit` counts as out of time too. Off the main thread (or without
    signal.setitimer, on Windows) signals cannot do this: `fn` runs unbounded (bound the reward
    call with `RewardCallConfig.timeout_s` there). Code stuck inside one C call (no Python
    bytecode runs) is not interrupted until that call returns.
    Any ITIMER_REAL timer already running is suspended and re-armed with its remaining time."""
    if (limit is None or not hasattr(signal, "setitimer")  # no interval timers on Windows
            or threading.current_thread() is not threading.main_thread()):
        return fn(), False
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    gc_was_enabled = gc.isenabled()
    outer_delay = outer_interval = 0.0
    start = time.monotonic()
    try:
        gc.disable()
        outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, limit, _REARM_S)
        result, timed_out = fn(), False
    except _Deadline:
        result, timed_out = None, True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if gc_was_enabled:
            gc.enable()
        elapsed = time.monotonic() - start
        if outer_delay > 0:  # someone else's alarm: give back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer_delay - elapsed, 1e-3), outer_interval)
    return (None, True) if timed_out or elapsed > limit else (result, False)


_QUIET_CODES = frozenset({_bounded.__code__, signal.signal.__code__})


class _NoTimeoutWarning(logging.Filter):
    """math-verify warns once that with its own timeout off "you must provide the logic for timeout
    interruption yourself": `_bounded` is that logic, so the warning would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutWarning())


def _as_text(value: Fraction) -> str | None:
    """str(value), or None for a number too long for int -> str (Python refuses past 4,300 digits)."""
    try:
        return str(value)
    except ValueError:
        return None


def answers_match(predicted: str | None, reference: str, *,
                  timeout_seconds: float | None = MATH_VERIFY_TIMEOUT_S) -> bool:
    """Whether `predicted` is mathematically equal to `reference` (both final answers as text).

    Plain numbers compare exactly (so "1,234" = "1234" = "$1,234", "0.50" = ".5", "18 dollars" =
    "18", "5 million" = "5000000", of any length); everything else through math-verify's
    `verify(gold, prediction)` (\\frac{1}{2} = 0.5, \\dfrac34 = 0.75, 3.0 = 3, x=3 vs 3, 50\\% vs
    0.5, "50 percent" as 50\\%; numbers compared after rounding to 6 decimals, so 0.333 is not 1/3).
    None or an empty prediction is never right, nor is a plain number too long to print (over
    4,300 digits) against a non-number. math-verify's parsing and comparison together get
    `timeout_seconds` of wall time (None: unbounded); past it the answer is wrong (False). The
    limit holds on the main thread only (`_bounded`: SIGALRM); elsewhere none is applied.
    """
    if timeout_seconds is not None and not timeout_seconds > 0:
        raise ValueError(f"timeout_seconds: must be positive or None, got {timeout_seconds!r}")
    if predicted is None or not predicted.strip():
        return False
    if not isinstance(reference, str) or not reference.strip():
        raise ValueError(f"reference answer must be a non-empty string, got {reference!r}")
    pred_num, ref_num = normalize_number(predicted), normalize_number(reference)
    if pred_num is not None and ref_num is not None:
        return pred_num == ref_num
    try:
        from math_verify import verify  # imported outside the time limit: an import is not the comparison
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("answer equivalence needs 'math-verify': pip install 'rljax[math]'") from e
    # Numbers with units or separators reach sympy as the bare number ("18 dollars" would parse as
    # the product 18*d*o*l*l*a*r*s).
    pred = _as_text(pred_num) if pred_num is not None else _PERCENT_WORD.sub(r"\g<num>\\%", predicted.strip())
    ref = _as_text(ref_num) if ref_num is not None else _PERCENT_WORD.sub(r"\g<num>\\%", reference.strip())
    if pred is None or ref is None:
        return False

    def compare() -> bool:
        gold, target = _parsed(ref), _parsed(pred)
        return bool(gold) and bool(target) and bool(verify(list(gold), list(target), timeout_seconds=None))

    same, timed_out = _bounded(compare, timeout_seconds)
    return bool(same) and not timed_out
