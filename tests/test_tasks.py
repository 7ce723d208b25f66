"""The task interface (rljax.tasks): arithmetic ported unchanged, the registry and the alphabet check, task
rewards, and synthetic data through a task."""
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pytest

from rljax.data.arithmetic import Problem, check_answer, check_steps, make_split, solve
from rljax.data.synthetic import gold_score, preference_pairs, simulated_feedback
from rljax.rewards import arithmetic_answer_reward, arithmetic_format_reward, arithmetic_step_reward, score
from rljax.tasks import ARITHMETIC, Task, TaskAlphabetError, get_task


# ----------------------------------------------------------------------------- registry and interface
def test_registry_names_and_errors():
    assert get_task("arithmetic") is ARITHMETIC and get_task(ARITHMETIC) is ARITHMETIC
    with pytest.raises(ValueError, match=r"unknown task 'arithmetik'; known tasks: arithmetic"):
        get_task("arithmetik")
    with pytest.raises(ValueError, match="takes no config"):
        get_task("arithmetic", levels=3)
    for task in (ARITHMETIC,):
        assert task.kinds == ("reference", "wrong_answer", "wrong_step", "truncated", "verbose")
        assert task.separator == ";" and task.has_steps


@dataclass(frozen=True)
class Digit:
    nums: tuple
    level: int


def test_alphabet_is_checked_at_generation():
    loud = Task(name="shouting", generate=lambda rng, level: Digit((rng.randint(0, 9),), level),
                key=lambda p: p.nums, extract=str, check=lambda p, c: True, gold_score=lambda p, c: 0.0,
                corrupt=lambda p, rng, kind: "BAD", corruptions=("wrong_answer",),
                prompt=lambda p: f"Sort {p.nums[0]}", reference=lambda p: f"answer:{p.nums[0]}")
    with pytest.raises(TaskAlphabetError, match=r"task 'shouting' generated the character 'S' \(in the prompt "
                                                 r"'Sort \d'\)") as e:
        loud.split(1, 0, seed=0)
    assert e.value.char == "S" and e.value.task == "shouting"
    quiet = Task(**{**loud.__dict__, "prompt": lambda p: "sort"})
    quiet.split(1, 0, seed=0)
    with pytest.raises(TaskAlphabetError, match="'B'.*wrong_answer completion"):
        quiet.candidate(Digit((1,), 1), np.random.default_rng(0), "wrong_answer")
    with pytest.raises(ValueError, match="unknown corruption 'typo'"):
        quiet.candidate(Digit((1,), 1), np.random.default_rng(0), "typo")


# ----------------------------------------------------------------------------- arithmetic, unchanged
def test_arithmetic_task_is_the_embedded_task():
    for levels, seed in [((1, 2, 3), 0), ((1, 2, 3, 4), 7), ((3,), 11)]:
        assert ARITHMETIC.split(120, 30, levels=levels, seed=seed) == make_split(120, 30, levels=levels, seed=seed)
    assert ARITHMETIC.split(10, 5) == make_split(10, 5)  # default levels (1, 2, 3), seed 0
    q = Problem("23+58*2", *solve("23+58*2"), level=2)
    assert ARITHMETIC.prompt(q) == "23+58*2=" and ARITHMETIC.reference(q) == "58*2=116;23+116=139;answer:139"
    assert ARITHMETIC.extract("58*2=116;answer: -12") == -12 and ARITHMETIC.steps(q) == q.steps
    completions = [q.completion, "58*2=116;23+116=140;answer:140", "23+58=81;81*2=162;answer:162", "58*2=116",
                   "58 times 2 is 116 answer:139", ""]
    for c in completions:
        assert ARITHMETIC.check(q, c) == check_answer(q, c) and ARITHMETIC.check_steps(q, c) == check_steps(q, c)
        assert ARITHMETIC.gold_score(q, c) == gold_score(q, c)
    n = len(completions)
    for mine, theirs in [(ARITHMETIC.answer_reward(), arithmetic_answer_reward),
                         (ARITHMETIC.step_reward(), arithmetic_step_reward),
                         (ARITHMETIC.format_reward(), arithmetic_format_reward)]:
        np.testing.assert_array_equal(score(mine, ["p"] * n, completions, problems=[q] * n),
                                      score(theirs, ["p"] * n, completions, problems=[q] * n))
    np.testing.assert_array_equal(score(ARITHMETIC.step_reward(), ["p"] * n, completions, problems=[q] * n),
                                  [1.0, 0.5, 0.0, 0.5, 0.0, 0.0])


def _digest(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def test_synthetic_arithmetic_rows_unchanged_and_the_same_through_the_task():
    problems = make_split(60, 0, levels=(1, 2, 3), seed=7)[0]
    # digests of the rows as rljax.data.synthetic wrote them before it took a task (commit a629739)
    assert _digest(preference_pairs(problems, 0)) == "99ec2852dd9a2e98"
    assert _digest(preference_pairs(problems, 3, noise_free=True)) == "c18a5474ff496e19"
    assert _digest(simulated_feedback(problems, 0)) == "e174746cc1547652"
    assert preference_pairs(problems[:2], 0) == [
        {"prompt": "10+26*4=", "chosen": "26*4=104",
         "rejected": "26*4=104; now the next step;10+104=114; now the next step;answer:114", "gold_margin": -0.495},
        {"prompt": "12+19=", "chosen": "12+19=31;answer:31", "rejected": "12+19=31; checking again;answer:31",
         "gold_margin": pytest.approx(0.41)}]
    assert preference_pairs(problems, 0, task=ARITHMETIC) == preference_pairs(problems, 0)
    assert simulated_feedback(problems, 5, task=ARITHMETIC) == simulated_feedback(problems, 5)
