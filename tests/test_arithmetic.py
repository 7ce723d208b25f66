"""Arithmetic task: solver, answer checker and step checker on hand-written cases."""
import random

import pytest

from rljax.data.arithmetic import (Problem, check_answer, check_steps, make_problem, make_split, parse_answer,
                                   solve)
from rljax.tokenizer import CharTokenizer


def test_solver_follows_precedence_and_parentheses():
    assert solve("23+58*2") == (("58*2=116", "23+116=139"), 139)
    assert solve("(3-10)*2") == (("3-10=-7", "-7*2=-14"), -14)
    assert solve("2*3+4*5") == (("2*3=6", "4*5=20", "6+20=26"), 26)
    assert solve("10-(2+3)*4") == (("2+3=5", "5*4=20", "10-20=-10"), -10)
    assert solve("7") == ((), 7)
    with pytest.raises(ValueError, match="malformed"):
        solve("3+")


def test_completion_format_and_answer_checker():
    p = make_problem(random.Random(0), 2)
    steps, answer = solve(p.expression)
    assert p.steps == steps and p.answer == answer == eval(p.expression)
    assert p.completion.endswith(f"answer:{answer}") and p.prompt == p.expression + "="
    assert check_answer(p, p.completion)
    q = Problem("23+58*2", ("58*2=116", "23+116=139"), 139, 2)
    assert q.completion == "58*2=116;23+116=139;answer:139"
    assert check_answer(q, "answer:139") and not check_answer(q, "answer:138")
    assert parse_answer("58*2=116;answer: -12") == -12
    for bad in ["", "139", "answer:", "answer:abc", "58*2=116;23+116=139"]:
        assert parse_answer(bad) is None and not check_answer(q, bad)
    assert parse_answer("answer:1;answer:139") == 139  # the last answer counts


def test_step_checker_labels():
    q = Problem("23+58*2", ("58*2=116", "23+116=139"), 139, 2)
    assert check_steps(q, q.completion) == [True, True]
    assert check_steps(q, "58*2=115;23+115=138;answer:138") == [False, False]  # wrong arithmetic
    assert check_steps(q, "23+58=81;81*2=162;answer:162") == [False, False]  # precedence violated
    assert check_steps(q, "58*2=116;23+116=140;answer:140") == [True, False]
    assert check_steps(q, "58*2=116;garbage;answer:1") == [True, False]
    assert check_steps(q, "") == [] and check_steps(q, "answer:139") == []
    r = Problem("(3-10)*2", *solve("(3-10)*2"), level=3)
    assert check_steps(r, "3-10=-7;-7*2=-14;answer:-14") == [True, True]


def test_split_is_deterministic_disjoint_and_tokenizable():
    train, test = make_split(200, 50, levels=(1, 2, 3, 4), seed=7)
    train2, test2 = make_split(200, 50, levels=(1, 2, 3, 4), seed=7)
    assert [p.expression for p in train] == [p.expression for p in train2]
    assert not {p.expression for p in train} & {p.expression for p in test}
    assert [p.expression for p in make_split(5, 0, seed=8)[0]] != [p.expression for p in train[:5]]
    tok = CharTokenizer()
    for p in train + test:
        assert eval(p.expression) == p.answer
        assert all(check_steps(p, p.completion)) and len(p.steps) == p.level
        assert tok.decode(tok.encode(p.prompt + p.completion)) == p.prompt + p.completion


def test_split_asking_for_more_problems_than_exist_fails_clearly():
    with pytest.raises(ValueError, match="distinct problems"):
        make_split(5000, 0, levels=(1,), seed=0)  # level 1 has 3 * 20 * 20 = 1200 expressions
