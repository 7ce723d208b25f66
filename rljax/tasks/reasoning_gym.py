"""reasoning-gym's procedural generators as tasks (`pip install rljax[reasoning_gym]`).

    task = reasoning_gym_task("basic_arithmetic")          # or get_task("rg:basic_arithmetic")
    train, test = task.split(1000, 100, levels=(1, 2), seed=0)
    train[0].prompt      "calculate 5 - 3 - 6.\\n"
    train[0].completion  "answer:-4"

Offline and deterministic: reasoning-gym generates every item from `random.Random(dataset.seed +
index)`; the adapter builds one dataset per level (seed 0) and `split` draws the item indices
from `random.Random(seed)` (`Task.split`), so a seed gives the same problems on every machine.

Levels: level L is the generator's curriculum at global level L - 1 (every curriculum attribute at
its (L-1)-th value, or its last; `RangeAttributeMode.UPPER_BOUND`: that level's range only), then
`**config` on top (your fields win); max_level is the curriculum's longest attribute, counted in the
distinct settings it gives: n values make n levels, but n - 1 for an attribute with
`ensure_interval` (reasoning-gym then takes the interval [values[L-1], values[L]], and caps L at the
last pair, so counting n would make the top level repeat the one below it). Every level 1..max_level
thus differs from the one below it in at least one attribute. A generator without a curriculum has
level 1 only, its config the defaults with `**config`.

Prompt: the question, stripped, lowercased (`lowercase=True`: the character tokenizer has no
capitals; for the generators in `RG_GENERATORS` case carries no information, letter_counting
counts case-insensitively), then a newline; `render(question) -> prompt` replaces this.
Completion: `answer:<answer>`; the answer of a completion is the text after its last `answer:`
tag, stripped (None without the tag). It is well formed when it is "answer:" and a non-empty
one-line answer, nothing before or after (surrounding whitespace aside), so that what `check` reads
is exactly the answer ("answer:-1590\nblah" is not). The verifier is the dataset's own `score_answer(answer,
entry)` in [0, 1]: `score` is that, `check` is score == 1, and the gold score is score - 0.01 per
character beyond the reference (no steps: reasoning-gym gives answers, not chains).
Corruptions: wrong_answer (one character of the answer changed), truncated (the answer cut
short), verbose (a filler phrase before the answer); the first two score < 1, checked.

A prompt or answer with a character the tokenizer cannot encode: for a generator in `RG_GENERATORS`
(where such items are rare: letter_counting's text holds an occasional "ë") the item is skipped and
another index drawn from the same `rng` (deterministic with the seed; `RGProblem.redrawn` counts the
skipped items), up to MAX_REDRAWS in a row; past that, and for any other generator (unless
`redraw_unencodable=True`), `TaskAlphabetError` naming the character and the task. A generator
missing from the installed reasoning-gym raises naming it and the installed version.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import random
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from rljax.tasks.base import ANSWER_TAG, FILLERS, Task, TaskAlphabetError, check_alphabet, tag_answer

__all__ = ["CORRUPTIONS", "MAX_REDRAWS", "RG_GENERATORS", "RGProblem", "reasoning_gym_task", "installed_version"]

# Generators whose items suit the tiny character-level model: short prompts and short answers over
# digits and lowercase letters. Measured with this adapter (lowercased question + newline; 200 problems
# per level, seed 0, reasoning-gym 0.1.25); "total" is the longest prompt + reference completion.
# Left out: most other generators' questions run 200-3000+ characters (instructions, grids, stories),
# or their answers hold capitals (spell_backward, syllogism: "Yes"), brackets and quotes (number_sorting:
# "['-91.9', ...]") or symbols outside the alphabet (prime_factorization's "×", power_function's "^");
# number_sequence fits (24-61 characters at levels 1-2) but its level-3 generator never returns on some
# items in 0.1.25.
RG_GENERATORS = {
    "basic_arithmetic": "integer expressions ('calculate 5 - 3 - 6.'): prompts 17-69 characters at levels 1-4, "
                        "total <= 87, integer answers; the closest to the embedded arithmetic task",
    "chain_sum": "sums and differences after a fixed 60-character preamble ('state the final answer to the "
                 "following arithmetic problem: 4 - 1 - 7 ='): prompts 68-95, total <= 108 at levels 1-4",
    "simple_equations": "one linear equation ('solve for m: 20*m = 120'): prompts 25-66 at level 1, total <= 75, "
                        "<= 134 at level 2 (levels 3-4 reach 238-409: too long)",
    "count_bits": "popcount of a decimal number ('how many 1 bits are there in the binary representation of "
                  "the number 1813?'): prompts 73-81, total <= 90, 1-2 digit answers; needs a global view",
    "count_primes": "'count how many prime numbers there are between 75 and 89 (inclusive) ?': prompts 71-77, "
                    "total <= 88, answers of 1-4 digits",
    "lcm": "least common multiple: prompts 64-89, total <= 121; answers of 3-6 digits at level 1 growing to 25 "
           "at level 4",
    "gcd": "greatest common divisor: prompts 107-132, total <= 140 (fits 128 at levels 1-2 only), "
           "answers of 1-3 digits",
    "letter_counting": "'how many times does the letter \"b\" appear in the text: \"...\"?': prompts 76-162, "
                       "total <= 170, one-digit answers; counts case-insensitively, so lowercasing keeps the answer",
    "products": "multiplication: prompts 86-113, total <= 140; level 1 has only about 100 distinct problems "
                "and answers reach 20 digits at level 4",
    "decimal_chain_sum": "decimal sums: prompts 72-119, total <= 136 at levels 1-2 (levels 3-4 reach 226-302)",
    "leg_counting": "legs of a list of animals: prompts 152-199, total <= 209 (fits 256 only); level 1 has "
                    "only about 110 distinct problems",
}


CORRUPTIONS = ("wrong_answer", "truncated", "verbose")
# Unencodable items skipped in a row before `generate` gives up: a generator that produces this many is
# not one with rare odd characters but one the character tokenizer does not fit.
MAX_REDRAWS = 50


def installed_version() -> str:
    """The installed reasoning-gym's version (its distribution metadata), or an ImportError saying how to get it."""
    try:
        return importlib.metadata.version("reasoning-gym")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("reasoning-gym is not installed: pip install 'rljax[reasoning_gym]' "
                          "(or pip install 'reasoning-gym>=0.1.25')") from None


def _rg():
    installed_version()
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import reasoning_gym.factory as factory
        from reasoning_gym.coaching.base_curriculum import DefaultCurriculumContext, RangeAttributeMode
    return factory, DefaultCurriculumContext, RangeAttributeMode


@dataclass(frozen=True)
class RGProblem:
    """One reasoning-gym item: `entry` is the dataset's dict (question, answer, metadata), what
    `score_answer` takes; index: the item's index in its level's dataset; redrawn: how many items
    `generate` skipped before this one for characters the tokenizer cannot encode."""

    task: str
    prompt: str
    answer: str
    entry: dict
    index: int
    level: int
    redrawn: int = 0

    @property
    def completion(self) -> str:
        return f"{ANSWER_TAG}{self.answer}"


def _default_render(question: str, lowercase: bool) -> str:
    return (question.strip().lower() if lowercase else question.strip()) + "\n"


# Item indices are drawn from [0, _SIZE): the datasets are built with size=_SIZE.
_SIZE = 1_000_000


def _levels(attribute) -> int:
    """The distinct settings of a curriculum attribute under UPPER_BOUND: one per value, one fewer with
    ensure_interval (each level is then the interval between two consecutive values)."""
    n = len(attribute.levels)
    return max(n - 1, 1) if getattr(attribute, "ensure_interval", False) else n


def reasoning_gym_task(name: str, *, lowercase: bool = True, render: Callable[[str], str] | None = None,
                       redraw_unencodable: bool | None = None, **config) -> Task:
    """The task "rg:<name>" from reasoning-gym's generator `name` (see the module docstring).

    config: fields of the generator's config dataclass (not seed or size, which the adapter sets);
    an unknown field is an error listing the known ones. redraw_unencodable: skip items with characters
    the tokenizer cannot encode (None: for the generators in RG_GENERATORS only)."""
    factory, Context, Mode = _rg()
    version = installed_version()
    if name not in factory.DATASETS:
        raise ValueError(f"reasoning-gym {version} has no generator {name!r}; it has: "
                         f"{', '.join(sorted(factory.DATASETS))}")
    dataset_cls, config_cls = factory.DATASETS[name]
    fields = {f.name for f in dataclasses.fields(config_cls)} - {"seed", "size"}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"reasoning-gym {name}: unknown config field(s) {unknown}; its config "
                         f"{config_cls.__name__} has {sorted(fields)}")
    task_name = f"rg:{name}"
    curriculum_cls = factory.CURRICULA.get(name)
    max_level = max((_levels(a) for a in curriculum_cls().attributes.values()), default=1) \
        if curriculum_cls is not None else 1
    redraw = name in RG_GENERATORS if redraw_unencodable is None else redraw_unencodable
    datasets: dict[int, Any] = {}

    def dataset(level: int):
        if level not in datasets:
            with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                if curriculum_cls is None:
                    cfg = config_cls(**config, seed=0, size=_SIZE)
                else:
                    cur = curriculum_cls()
                    cur.set_global_level(level - 1)
                    cfg = cur.generate_configuration(defaults={"seed": 0, "size": _SIZE},
                                                     context=Context(mode=Mode.UPPER_BOUND))
                    cfg = dataclasses.replace(cfg, **config)
                datasets[level] = dataset_cls(config=cfg)
        return datasets[level]

    def to_prompt(question: str) -> str:
        return render(question) if render is not None else _default_render(question, lowercase)

    def generate(rng: random.Random, level: int) -> RGProblem:
        for redrawn in range(MAX_REDRAWS + 1 if redraw else 1):
            index = rng.randrange(_SIZE)
            with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                entry = dataset(level)[index]
            problem = RGProblem(task_name, to_prompt(entry["question"]), str(entry["answer"]), entry, index, level,
                                redrawn)
            if not redraw:  # Task.split checks the alphabet and names the character
                return problem
            try:
                check_alphabet(task_name, problem.prompt, "prompt")
                check_alphabet(task_name, problem.completion, "reference completion")
                return problem
            except TaskAlphabetError as e:
                error = e
        raise error

    def score(problem: RGProblem, completion: str) -> float:
        return float(dataset(problem.level).score_answer(tag_answer(completion), problem.entry))

    def check(problem: RGProblem, completion: str) -> bool:
        return score(problem, completion) >= 1.0

    def gold_score(problem: RGProblem, completion: str) -> float:
        return score(problem, completion) - 0.01 * max(0, len(completion) - len(problem.completion))

    def corrupt(problem: RGProblem, rng: np.random.Generator, kind: str) -> str:
        ref, ans = problem.completion, problem.answer
        if kind == "verbose":
            return FILLERS[int(rng.integers(len(FILLERS)))] + ref
        if kind == "truncated":
            cut = int(rng.integers(len(ANSWER_TAG), len(ref)))
            for c in (ref[:cut], ANSWER_TAG, ""):
                if score(problem, c) < 1.0:
                    return c
            raise AssertionError(f"{task_name}: even an empty completion scores 1")
        if kind == "wrong_answer":
            positions = [i for i, ch in enumerate(ans) if ch.isalnum()]
            for _ in range(20):
                if positions:
                    i = positions[int(rng.integers(len(positions)))]
                    pool = "0123456789" if ans[i].isdigit() else "abcdefghijklmnopqrstuvwxyz"
                    ch = pool[int(rng.integers(len(pool)))]
                    wrong = ans[:i] + ch + ans[i + 1:]
                else:
                    wrong = "x" + ans
                if score(problem, ANSWER_TAG + wrong) < 1.0:
                    return ANSWER_TAG + wrong
            raise ValueError(f"{task_name}: found no wrong answer near {ans!r}")
        raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")

    def well_formed(completion: str) -> bool:
        # "answer:-1590\nblah" would score as the answer "-1590\nblah": trailing text is not the format
        answer = tag_answer(completion)
        return (completion.strip().startswith(ANSWER_TAG) and completion.count(ANSWER_TAG) == 1 and bool(answer)
                and "\n" not in answer)

    return Task(name=task_name, generate=generate, key=lambda p: p.entry["question"], extract=tag_answer,
                check=check, gold_score=gold_score, corrupt=corrupt, corruptions=CORRUPTIONS, default_levels=(1,),
                max_level=max_level, separator=None, steps=lambda p: (), well_formed=well_formed, score=score,
                description=f"reasoning-gym {version} generator {name!r}")

