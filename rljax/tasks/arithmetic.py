"""The embedded arithmetic task (`rljax.data.arithmetic`, `rljax.data.synthetic`) as a `Task`, unchanged.

    prompt      "23+58*2="
    completion  "58*2=116;23+116=139;answer:139"

`ARITHMETIC.split` yields exactly the problems of `rljax.data.arithmetic.make_split` for the same
seed and levels; check, step labels, gold score and corruptions are those modules' functions.
"""
from __future__ import annotations

from rljax.data import arithmetic as _a
from rljax.data import synthetic as _s
from rljax.tasks.base import Task

__all__ = ["ARITHMETIC"]

ARITHMETIC = Task(
    name="arithmetic",
    generate=_a.make_problem,
    key=lambda p: p.expression,
    extract=_a.parse_answer,
    check=_a.check_answer,
    gold_score=_s.gold_score,
    corrupt=_s.corrupt,
    corruptions=_s.CORRUPTIONS,
    default_levels=(1, 2, 3),
    separator=";",
    split_steps=_a.split_steps,
    check_steps=_a.check_steps,
    steps=lambda p: p.steps,
    well_formed=_a.well_formed,
    description="integer expressions with + - * and parentheses, reduced one operation per step",
)
