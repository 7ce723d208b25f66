"""The task interface (rljax.tasks): arithmetic ported unchanged, sorting and countdown on hand-computed
cases, the registry and the alphabet check, task rewards, and synthetic data generic over a task."""
import hashlib
import json
import random
from dataclasses import dataclass

import numpy as np
import pytest

from rljax.data import adapters
from rljax.data.arithmetic import Problem, check_answer, check_steps, make_split, solve
from rljax.data.synthetic import gold_score, preference_pairs, simulated_feedback
from rljax.rewards import arithmetic_answer_reward, arithmetic_format_reward, arithmetic_step_reward, score
from rljax.tasks import ARITHMETIC, COUNTDOWN, SORTING, Task, TaskAlphabetError, get_task
from rljax.tasks.countdown import CountdownProblem, evaluate, reachable, valid_steps
from rljax.tasks.sorting import SortProblem
from rljax.tokenizer import CharTokenizer

TOK = CharTokenizer()


# ----------------------------------------------------------------------------- registry and interface
def test_registry_names_and_errors():
    assert get_task("arithmetic") is ARITHMETIC and get_task("sorting") is SORTING
    assert get_task("countdown") is COUNTDOWN and get_task(COUNTDOWN) is COUNTDOWN
    with pytest.raises(ValueError, match=r"unknown task 'sortng'; known tasks: arithmetic, countdown, sorting, "
                                         r"rg:<generator>"):
        get_task("sortng")
    with pytest.raises(ValueError, match="takes no config"):
        get_task("sorting", levels=3)
    for task in (ARITHMETIC, SORTING, COUNTDOWN):
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


@pytest.mark.parametrize("task", [SORTING, COUNTDOWN], ids=lambda t: t.name)
def test_split_is_deterministic_disjoint_leveled_and_tokenizable(task):
    train, test = task.split(150, 50, levels=(1, 2, 3), seed=3)
    again = task.split(150, 50, levels=(1, 2, 3), seed=3)
    assert (train, test) == again
    assert task.split(20, 0, levels=(1, 2, 3), seed=4)[0] != train[:20]
    keys = [task.key(p) for p in train + test]
    assert len(set(keys)) == len(keys)  # no problem twice, none in both
    assert {p.level for p in train} == {1, 2, 3}
    for p in train + test:
        text = task.prompt(p) + task.reference(p)
        assert TOK.decode(TOK.encode(text)) == text
        assert task.check(p, task.reference(p)) and all(task.check_steps(p, task.reference(p)))
        assert task.gold_score(p, task.reference(p)) == pytest.approx(1.5)
        assert task.well_formed(task.reference(p)) and task.credit(p, task.reference(p)) == 1.0
    easiest = task.split(200, 0, levels=(1,), seed=0)[0]
    assert max(len(task.prompt(p) + task.reference(p)) for p in easiest) <= 60
    with pytest.raises(ValueError, match="level 0 is not one of"):
        task.split(1, 0, levels=(0,))
    assert task.records(train[:1]) == [{"prompt": task.prompt(train[0]), "completion": task.reference(train[0])}]


def test_split_asking_for_more_problems_than_exist_fails_clearly():
    with pytest.raises(ValueError, match="sorting split: could not find 9000 distinct problems"):
        SORTING.split(9000, 0, levels=(1,))  # level 1: 20**3 = 8000 lists


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


@pytest.mark.parametrize("task", [SORTING, COUNTDOWN], ids=lambda t: t.name)
def test_synthetic_pairs_and_feedback_over_a_task(task):
    problems = task.split(200, 0, levels=(1, 2), seed=1)[0]
    pairs = preference_pairs(problems, 0, noise_free=True, task=task)
    assert pairs == preference_pairs(problems, 0, noise_free=True, task=task)
    for p, r in zip(problems, pairs):
        gc, gr = task.gold_score(p, r["chosen"]), task.gold_score(p, r["rejected"])
        assert r["prompt"] == task.prompt(p) and gc >= gr and r["gold_margin"] == pytest.approx(gc - gr)
    assert len(adapters.preference_pairs(pairs)) == len(pairs)
    rows = simulated_feedback(problems[:50], 0, task=task)
    assert len(rows) == 250 and {r["kind"] for r in rows} == set(task.kinds)
    for r in rows:
        assert r["gold"] == task.gold_score(problems[[task.prompt(p) for p in problems].index(r["prompt"])],
                                            r["completion"])


@pytest.mark.parametrize("task", [SORTING, COUNTDOWN], ids=lambda t: t.name)
def test_corruptions(task):
    rng = np.random.default_rng(0)
    for p in task.split(150, 0, levels=(1, 2, 3, 4), seed=2)[0]:
        ref = task.reference(p)
        for kind in task.corruptions:
            c = task.candidate(p, rng, kind)
            labels = task.check_steps(p, c)
            assert c != ref and task.check(p, c) == (kind == "verbose"), (kind, p, c)
            if kind == "truncated":
                assert "answer:" not in c and all(labels) and task.split_steps(c) == list(task.steps(p))[:len(labels)]
            if kind == "wrong_answer":
                assert task.split_steps(c) == list(task.steps(p)) and all(labels)
            if kind == "verbose":
                assert len(c) > len(ref) and task.gold_score(p, c) < 1.5
            if kind == "wrong_step":  # consistent chain, wrong from the first changed step on
                steps = task.split_steps(c)
                assert len(steps) == len(task.steps(p)) and task.well_formed(c)
                k = next(i for i, (s, r) in enumerate(zip(steps, task.steps(p))) if s != r)
                assert labels == [i < k for i in range(len(labels))], (p, c)
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    few = task.split(30, 0, seed=0)[0]
    assert [task.corrupt(p, a, "wrong_step") for p in few] == [task.corrupt(p, b, "wrong_step") for p in few]
    with pytest.raises(ValueError, match="unknown corruption"):
        task.corrupt(few[0], a, "nonsense")


# ----------------------------------------------------------------------------- sorting
S = SortProblem((53, 7, 21), level=1)
S_REF = "7,53;7,21,53;answer:7,21,53"  # 27 characters


def test_sorting_reference_and_checks():
    assert S.prompt == "sort:53,7,21=" and S.completion == S_REF and S.steps == ("7,53", "7,21,53")
    assert SORTING.extract("7,53;answer: 7,21,53") == (7, 21, 53) and SORTING.extract("answer:7,,21") is None
    assert SORTING.check(S, S_REF) and SORTING.check(S, "answer:7,21,53") and not SORTING.check(S, "answer:7,53,21")
    assert SORTING.check_steps(S, S_REF) == [True, True]
    assert SORTING.check_steps(S, "7,53;7,53,21;answer:7,21,53") == [True, False]  # not sorted
    assert SORTING.check_steps(S, "7,53;7,53;answer:7,21,53") == [True, False]  # 21 dropped
    assert SORTING.check_steps(S, "7,53;7,21,22,53") == [True, False]  # an element added
    assert SORTING.check_steps(S, "53;7,21,53") == [False, False]  # step 1 must insert 7
    # extra steps past the last number are wrong; garbage is wrong and so is all that follows
    assert SORTING.check_steps(S, "7,53;7,21,53;7,21,53;answer:7,21,53") == [True, True, False]
    assert SORTING.check_steps(S, "7,53;seven;7,21,53") == [True, False, False]
    d = SortProblem((5, 5, 3), 1)
    assert d.completion == "5,5;3,5,5;answer:3,5,5" and SORTING.check_steps(d, d.completion) == [True, True]
    assert SORTING.check_steps(d, "5,5;3,5;answer:3,5,5") == [True, False]  # a repeat is an element too


def test_sorting_right_answer_by_wrong_steps_and_gold_scores():
    wrong_order = "21,53;7,21,53;answer:7,21,53"  # inserts 21 before 7: right answer, wrong steps
    assert SORTING.check(S, wrong_order) and SORTING.check_steps(S, wrong_order) == [False, False]
    assert SORTING.gold_score(S, S_REF) == 1.5
    assert SORTING.gold_score(S, wrong_order) == pytest.approx(1.0 - 0.01)  # 28 chars, one extra
    assert SORTING.gold_score(S, "7,53;7,21,53;answer:7,53,21") == pytest.approx(0.5)  # steps right, answer wrong
    assert SORTING.gold_score(S, "7,53") == pytest.approx(0.25)  # one of two steps, no answer
    assert SORTING.gold_score(S, "answer:7,21,53") == pytest.approx(1.0)
    extra = "7,53;7,21,53;7,21,53;answer:7,21,53"  # 35 chars: steps T, T, F
    assert SORTING.gold_score(S, extra) == pytest.approx(1.0 + 0.5 * 2 / 3 - 0.08)
    completions = [S_REF, wrong_order, "7,53;7,53,21;answer:7,53,21", "7,53", "sorted: 7 21 53"]
    n = len(completions)
    np.testing.assert_array_equal(score(SORTING.answer_reward(), ["p"] * n, completions, problems=[S] * n),
                                  [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(score(SORTING.step_reward(), ["p"] * n, completions, problems=[S] * n),
                                  [1, 0, 0.5, 0.5, 0])
    np.testing.assert_array_equal(score(SORTING.format_reward(), ["p"] * n, completions), [1, 1, 1, 0, 0])


def test_sorting_levels():
    for level in (1, 2, 3, 4):
        p = SORTING.generate(random.Random(level), level)
        assert len(p.nums) == level + 2 and max(p.nums) < 10 * 2**level and len(p.steps) == level + 1


# ----------------------------------------------------------------------------- countdown
C = CountdownProblem(nums=(3, 5, 2), target=17, plan=((0, "*", 1), (3, "+", 2)), level=1)
C_REF = "3*5=15;15+2=17;answer:3*5+2"  # 27 characters


def test_countdown_reference_and_answer_check():
    assert C.prompt == "17 from 3,5,2=" and C.completion == C_REF and C.answer == "3*5+2"
    assert evaluate("3*5+2") == (17, (3, 5, 2)) and evaluate("(7-2)*3") == (15, (7, 2, 3))
    assert evaluate("2*(3+4)*5") == (70, (2, 3, 4, 5)) and evaluate("9-4-3") == (2, (9, 4, 3))
    for bad in ["", "3*", "(3+5", "3+5)", "-3+20", "3x5", "3 5"]:
        assert evaluate(bad) is None, bad
    assert COUNTDOWN.check(C, C_REF) and COUNTDOWN.check(C, "answer:2+3*5") and COUNTDOWN.check(C, "answer:(5*3)+2")
    assert not COUNTDOWN.check(C, "answer:3*5+3")  # 18
    assert not COUNTDOWN.check(C, "answer:17")  # 17 is not a given number
    assert not COUNTDOWN.check(C, "answer:3*5+2+3-3")  # 17, but uses 3 twice
    assert not COUNTDOWN.check(C, "3*5=15;15+2=17")  # no answer field
    assert COUNTDOWN.extract("answer: 3*5+2") == "3*5+2" and COUNTDOWN.extract("answer:3*") is None


def test_countdown_rendering_uses_the_fewest_parentheses():
    def render(nums, plan):
        return CountdownProblem(nums, 0, plan, 1).answer

    assert render((7, 2, 3), ((0, "-", 1), (3, "*", 2))) == "(7-2)*3"
    assert render((9, 4, 3), ((1, "-", 2), (0, "-", 3))) == "9-(4-3)"
    assert render((9, 4, 3), ((1, "+", 2), (0, "-", 3))) == "9-(4+3)"
    assert render((9, 4, 3), ((0, "-", 1), (3, "-", 2))) == "9-4-3"
    assert render((9, 4, 3), ((1, "-", 2), (0, "+", 3))) == "9+4-3"
    assert render((2, 3, 4, 5), ((1, "+", 2), (0, "*", 4), (5, "*", 3))) == "2*(3+4)*5"


def test_countdown_step_labels_and_alternative_solutions():
    assert COUNTDOWN.check_steps(C, C_REF) == [True, True]
    alternative = "5*3=15;2+15=17;answer:2+5*3"  # another order, another expression: all right
    assert COUNTDOWN.check(C, alternative) and COUNTDOWN.check_steps(C, alternative) == [True, True]
    assert COUNTDOWN.gold_score(C, alternative) == 1.5
    # valid arithmetic into a dead end: from {8, 2} no step makes 17; the local labels accept it
    dead_end = "3+5=8;8*2=16;answer:3+5*2"
    assert valid_steps(C, dead_end) == [True, True] and COUNTDOWN.check_steps(C, dead_end) == [False, False]
    assert COUNTDOWN.check_steps(C, "3*5=16;16+1=17") == [False, False]  # wrong product; 1 not available after
    assert COUNTDOWN.check_steps(C, "3*3=9;9+5=14") == [False, False]  # one 3 only
    assert COUNTDOWN.check_steps(C, "5-3=2;2*2=4") == [False, False]  # valid, but {2, 2} cannot make 17
    assert valid_steps(C, "5-3=2;2*2=4") == [True, True]
    assert COUNTDOWN.check_steps(C, "3-5=-2;answer:1") == [False]  # negative results are not allowed
    assert COUNTDOWN.check_steps(C, "3*5=15;15*2=30") == [True, False]
    assert reachable([3, 5, 2], 17) and reachable([15, 2], 17) and not reachable([8, 2], 17)
    assert reachable([17], 17) and not reachable([], 17)
    # a right answer reached by wrong steps: right, but its steps earn nothing
    by_wrong_steps = "3*5=16;16+1=17;answer:3*5+2"
    assert COUNTDOWN.check(C, by_wrong_steps) and COUNTDOWN.gold_score(C, by_wrong_steps) == pytest.approx(1.0)


def test_countdown_gold_score_and_rewards_credit_any_complete_solution():
    e = CountdownProblem(nums=(4, 6, 2), target=12, plan=((0, "+", 1), (3, "+", 2)), level=1)
    assert e.completion == "4+6=10;10+2=12;answer:4+6+2"
    shorter = "6*2=12;answer:6*2"  # one step, 4 unused: complete, so its one step is all its steps
    assert COUNTDOWN.check_steps(e, shorter) == [True] and COUNTDOWN.gold_score(e, shorter) == 1.5
    assert COUNTDOWN.credit(e, shorter) == 1.0
    longer = "6*2=12;12-4=8;answer:6*2"  # 24 chars; past the target into a dead end: T, F
    assert COUNTDOWN.check_steps(e, longer) == [True, False]
    assert COUNTDOWN.gold_score(e, longer) == pytest.approx(1.0 + 0.5 * 1 / 2)
    other = "4-2=2;2*6=12;answer:(4-2)*6"  # as long as the reference, another route
    assert COUNTDOWN.check_steps(e, other) == [True, True] and COUNTDOWN.gold_score(e, other) == 1.5
    assert COUNTDOWN.check_steps(e, "4*2=8;8-6=2") == [False, False]  # valid steps: {8, 6}, {2} cannot make 12
    assert C.completion and COUNTDOWN.gold_score(C, "3*5=15") == pytest.approx(0.25)
    assert COUNTDOWN.gold_score(C, "3*5=15;15+2=17;answer:3*5+3") == pytest.approx(0.5)
    completions = [C_REF, "5*3=15;2+15=17;answer:2+5*3", "3*5=15", "3+5=8;8*2=16;answer:3+5*2",
                   "3*5=16;16+1=17;answer:3*5+2", "seventeen"]
    n = len(completions)
    np.testing.assert_array_equal(score(COUNTDOWN.answer_reward(), ["p"] * n, completions, problems=[C] * n),
                                  [1, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(score(COUNTDOWN.step_reward(), ["p"] * n, completions, problems=[C] * n),
                                  [1, 1, 0.5, 0, 0, 0])
    np.testing.assert_array_equal(score(COUNTDOWN.format_reward(), ["p"] * n, completions), [1, 1, 0, 1, 1, 0])


def test_countdown_wrong_step_uses_a_number_not_available():
    rng = np.random.default_rng(0)
    for p in COUNTDOWN.split(100, 0, levels=(1, 2, 3), seed=9)[0]:
        c = COUNTDOWN.corrupt(p, rng, "wrong_step")
        k = next(i for i, (s, r) in enumerate(zip(COUNTDOWN.split_steps(c), p.steps)) if s != r)
        assert valid_steps(p, c) == [i < k for i in range(len(p.steps))]  # invalid locally, not just a dead end
        value, _ = evaluate(COUNTDOWN.extract(c))
        assert value != p.target and value == int(c.split(";")[-2].split("=")[1])  # the answer follows the steps


def test_countdown_levels():
    for level in (1, 2, 3, 4):
        p = COUNTDOWN.generate(random.Random(level), level)
        assert len(p.nums) == level + 2 and max(p.nums) <= 4 + 5 * level and p.target not in p.nums
        assert len(p.plan) == level + 1 and evaluate(p.answer)[0] == p.target
    with pytest.raises(ValueError, match="level 5 is not one of 1..4"):
        COUNTDOWN.split(1, 0, levels=(5,))
