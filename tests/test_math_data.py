"""Real math data: GSM8K / MATH adapters, answer extraction, equivalence, math rewards.

Every expected value is written by hand from the problem (not computed by the code under test).
"""
from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from rljax.data.adapters import DataError, load_records
from rljax.data.math import (MathProblem, answers_match, extract_answer, gsm8k, last_boxed, math_problems,
                             normalize_number)
from rljax.rewards import score
from rljax.rewards.math_answers import math_answer_reward, think_answer_format_reward, think_answer_tag_reward

# Two rows in the real GSM8K layout (test split, rows 0 and 1 shortened) and one with separators.
GSM8K_ROWS = [
    {"question": "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
                 "for her friends every day with four. She sells the remainder for $2 per fresh duck egg. How much "
                 "in dollars does she make every day at the farmers' market?",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day "
               "at the farmer’s market.\n#### 18"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?",
     "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 "
               "bolts of fabric\n#### 3"},
    {"question": "A city has 1,200 houses with 3 people each and 34 more people. How many people?",
     "answer": "1,200 * 3 = <<1200*3=3600>>3,600\n3,600 + 34 = 3,634\n#### 3,634"},
]

MATH_ROWS = [
    {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
     "solution": "We have $\\frac{1}{2} + \\frac{1}{4} = \\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$.",
     "level": "Level 1", "type": "Prealgebra"},
    {"problem": "Find the set of $x$ with $x^2 = 1$.",
     "solution": "Since $x^2 = 1$, first try $\\boxed{1}$; in fact $x \\in \\boxed{\\left\\{-1, 1\\right\\}}$.",
     "level": "Level 2", "type": "Algebra"},
    {"problem": "Simplify $\\sqrt{\\frac{1}{4}}$.",
     "solution": "$\\sqrt{\\frac{1}{4}} = \\boxed{\\dfrac{1}{\\sqrt{4}}} = \\boxed{\\frac{1}{2}}$",
     "level": "Level 1", "type": "Algebra"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_parquet(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))


# --------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("writer,name", [(_write_jsonl, "gsm8k.jsonl"), (_write_parquet, "gsm8k.parquet")])
def test_gsm8k_from_files(tmp_path, writer, name):
    writer(tmp_path / name, GSM8K_ROWS)
    problems = gsm8k(load_records(tmp_path / name, cache_dir=tmp_path / "cache"))
    assert [p.answer for p in problems] == ["18", "3", "3634"]
    assert problems[0].question.startswith("Janet's ducks lay 16 eggs")
    # The solution is the text before "####", calculator annotations removed.
    assert problems[0].solution == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
                                    "She makes 9 * 2 = $18 every day at the farmer’s market.")
    assert problems[2].solution == "1,200 * 3 = 3,600\n3,600 + 34 = 3,634"
    kept = gsm8k(GSM8K_ROWS[1:2], keep_calculator=True)[0]
    assert kept.solution.startswith("It takes 2/2=<<2/2=1>>1 bolt")


def test_gsm8k_errors_name_row_and_field():
    good = GSM8K_ROWS[1]
    with pytest.raises(DataError, match=r"row 1: field 'answer' has no final answer: expected '#### <answer>'"):
        gsm8k([good, {"question": "q", "answer": "It is 4."}])
    with pytest.raises(DataError, match=r"row 0: field 'answer': nothing after '####'"):
        gsm8k([{"question": "q", "answer": "work\n#### "}])
    # the answer the reward reads is the "####" line's: a line after it would make the reference another answer
    with pytest.raises(DataError, match=r"row 0: field 'answer': text after the '#### <answer>' line: 'extra'"):
        gsm8k([{"question": "q", "answer": "work\n#### 72\nextra"}])
    assert gsm8k([{"question": "q", "answer": "work\n#### 72\n\n"}])[0].answer == "72"
    with pytest.raises(DataError, match=r"row 2: field 'question' is missing \(columns with a value: answer\)"):
        gsm8k([good, good, {"answer": "#### 1"}])
    with pytest.raises(DataError, match=r"row 0: field 'question' is empty"):
        gsm8k([{"question": "  ", "answer": "#### 1"}])
    with pytest.raises(DataError, match=r"row 0: field 'sol' must be a string, got int"):
        gsm8k([{"q": "x", "sol": 4}], question_field="q", answer_field="sol")


@pytest.mark.parametrize("writer,name", [(_write_jsonl, "math.jsonl"), (_write_parquet, "math.parquet")])
def test_math_from_files(tmp_path, writer, name):
    writer(tmp_path / name, MATH_ROWS)
    problems = math_problems(load_records(tmp_path / name, cache_dir=tmp_path / "cache"))
    # The LAST \boxed counts, with nested and escaped braces kept whole.
    assert [p.answer for p in problems] == ["\\frac{3}{4}", "\\left\\{-1, 1\\right\\}", "\\frac{1}{2}"]
    assert problems[0] == MathProblem(MATH_ROWS[0]["problem"], MATH_ROWS[0]["solution"], "\\frac{3}{4}")


def test_math_answer_field_and_errors():
    rows = [{"problem": "p", "solution": "s", "answer": " 7 "}]
    assert math_problems(rows, answer_field="answer")[0].answer == "7"
    with pytest.raises(DataError, match=r"row 1: field 'solution' has no \\boxed\{...\} final answer"):
        math_problems([MATH_ROWS[0], {"problem": "p", "solution": "The answer is 5."}])
    with pytest.raises(DataError, match=r"row 0: field 'solution': unbalanced braces: the \\boxed\{ at position 4"):
        math_problems([{"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}$"}])
    with pytest.raises(DataError, match=r"row 0: field 'solution': the last \\boxed\{\} is empty"):
        math_problems([{"problem": "p", "solution": "\\boxed{ }"}])
    with pytest.raises(DataError, match=r"row 0: field 'problem' is missing"):
        math_problems([{"question": "p", "solution": "\\boxed{1}"}])
    with pytest.raises(DataError, match=r"row 0: field 'answer' is missing"):
        math_problems([{"problem": "p", "solution": "\\boxed{1}"}], answer_field="answer")


# --------------------------------------------------------------------------- extraction


def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{b^{2}}} c") == "\\frac{a}{b^{2}}"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces do not close the group
    assert last_boxed("\\fbox{x}") == "x"
    assert last_boxed("so \\boxed 5.") == "5."
    assert last_boxed("\\boxed {42}") == "42"
    assert last_boxed("no box") is None
    with pytest.raises(ValueError, match="never closes"):
        last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}")
    with pytest.raises(ValueError, match="without an answer"):
        last_boxed("ends in \\boxed")


@pytest.mark.parametrize("text,expected", [
    # 1. <answer> tags win, and a \boxed inside them is unwrapped.
    ("<think>maybe \\boxed{3}</think>\n<answer>42</answer>", "42"),
    ("<answer>$\\boxed{\\frac{1}{2}}$</answer>", "\\frac{1}{2}"),
    ("<answer>first</answer> <answer> $7$ </answer>", "7"),
    # 2. the last \boxed, nested braces whole.
    ("So $x = \\boxed{\\frac{\\sqrt{3}}{2}}$. Check: 12.", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{1} or rather \\boxed{2}", "2"),
    # 3. "#### n" (GSM8K), commas kept for answers_match to read.
    ("She makes 9 * 2 = 18.\n#### 1,234\n", "1,234"),
    ("#### 5 then 6 more words", "5 then 6 more words"),
    # 4. the last number, signed only when the sign is not a binary minus.
    ("First 3 apples, then 12 more: 15 in all.", "15"),
    ("It is 6-7 = -1.", "-1"),
    ("12 - 5", "5"),
    ("the total is 1,234,567.89 dollars", "1,234,567.89"),
    ("half is 3/4 of 1.5", "1.5"),
    ("ratio 3/4", "3/4"),
    # Malformed or absent answers give None.
    ("", None),
    ("no digits here", None),
    ("The answer is \\boxed{12", None),  # truncated: no credit for the stray 12
    ("<answer>12", None),
    ("12</answer>", None),
    ("<answer>  </answer> 5", None),
    ("#### \n", None),
    ("then \\boxed", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_without_fallback():
    assert extract_answer("The result is 15.", fallback=False) is None
    assert extract_answer("\\boxed{15}", fallback=False) == "15"
    with pytest.raises(TypeError, match="expects a string"):
        extract_answer(None)


# --------------------------------------------------------------------------- equivalence


def test_normalize_number():
    assert normalize_number("1,234") == 1234
    assert normalize_number(" $1,234.50 ") == Fraction(246900, 200)
    assert normalize_number("-0.5") == Fraction(-1, 2)
    assert normalize_number(".25") == Fraction(1, 4)
    assert normalize_number("18 dollars") == 18
    assert normalize_number("7 cm.") == 7
    assert normalize_number("$18$") == 18
    for not_plain in ("3x", "2 pi", "5 sqrt", "50%", "\\frac{1}{2}", "1/2", "abc", "", "1,23", "x = 3"):
        assert normalize_number(not_plain) is None, not_plain


@pytest.mark.parametrize("predicted,reference", [
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("1/2", "\\frac12"),
    ("\\dfrac{3}{4}", ".75"),
    ("1,234", "1234"),
    ("1234", "1,234"),
    ("$1,234.00", "1234"),
    ("18 dollars", "18"),
    ("18 \\text{ cm}", "18"),
    ("3.0", "3"),
    ("-5", "-5"),
    ("x = 3", "3"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("\\{1, -1\\}", "\\left\\{-1, 1\\right\\}"),
    ("(1, 2)", "(1,2)"),
    ("2\\pi", "\\pi \\cdot 2"),
])
def test_answers_match(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize("predicted,reference", [
    ("0.333", "\\frac{1}{3}"),  # rounded to 6 decimals before comparing
    ("5", "-5"),
    ("3x", "3"),
    ("2 pi", "2"),
    ("1,235", "1234"),
    ("\\frac{1}{3}", "0.5"),
    ("(1, 2)", "[1, 2]"),
    (None, "5"),
    ("", "5"),
    ("   ", "5"),
])
def test_answers_differ(predicted, reference):
    assert not answers_match(predicted, reference)


def test_answers_match_needs_a_reference():
    with pytest.raises(ValueError, match="reference answer must be a non-empty string"):
        answers_match("5", "")


# --------------------------------------------------------------------------- rewards


def test_math_answer_reward():
    completions = [
        "<think>9 eggs at $2</think><answer>18</answer>",  # right
        "So the answer is \\boxed{\\frac{36}{2}}.",  # right, as LaTeX
        "She makes 9 * 2 = $18.\n#### 18",  # right, GSM8K style
        "I think it is 17.",  # wrong
        "The answer is \\boxed{18",  # truncated
        "",  # empty
        "1/2 of it: 0.5",  # right for the second problem
    ]
    answers = ["18", "18", "18", "18", "18", "18", "\\frac{1}{2}"]
    r = score(math_answer_reward, [""] * 7, completions, answers=answers)
    np.testing.assert_array_equal(r, [1, 1, 1, 0, 0, 0, 1])
    assert r.dtype == np.float32


def test_math_answer_reward_with_gsm8k_rows():
    problems = gsm8k(GSM8K_ROWS)
    completions = ["18", "It is 3 bolts.", "#### 3634"]
    r = math_answer_reward([p.question for p in problems], completions, answers=[p.answer for p in problems])
    np.testing.assert_array_equal(r, [1, 1, 1])


@pytest.mark.parametrize("prompt,completion,full,tags", [
    ("", "<think>6*7 is 42</think><answer>42</answer>", 1, 1),
    ("", "  <think>\nstep\n</think>\n\n<answer>\n42\n</answer>\n", 1, 1),
    ("Assistant: <think>", "6*7 is 42</think> <answer>42</answer>", 1, 1),  # prefilled opening tag
    ("", "<answer>42</answer>", 0, 0.5),  # no reasoning block
    ("", "<think></think><answer>42</answer>", 0, 1),  # empty reasoning
    ("", "<think>x</think><answer> </answer>", 0, 1),  # empty answer
    ("", "<answer>42</answer><think>x</think>", 0, 1),  # wrong order
    ("", "<think>x</think><answer>42</answer> and more", 0, 1),  # text after the answer
    ("", "hello <think>x</think><answer>42</answer>", 0, 1),  # text before the reasoning
    ("", "<think>x</think><think>y</think><answer>42</answer>", 0, 0.5),  # repeated tags
    ("", "<think>x</think><answer>42", 0, 0.75),  # truncated
    ("", "42", 0, 0),
    ("", "", 0, 0),
])
def test_format_rewards(prompt, completion, full, tags):
    assert think_answer_format_reward([prompt], [completion])[0] == full
    assert think_answer_tag_reward([prompt], [completion])[0] == tags
