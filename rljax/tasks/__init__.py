"""Tasks: problem generators with checkable answers (and steps), one interface for every study.

    from rljax.tasks import get_task
    task = get_task("countdown")                   # "arithmetic", "sorting", "countdown", "rg:<generator>"
    train, test = task.split(1000, 128, levels=(1, 2), seed=0)
    task.prompt(train[0]), task.reference(train[0])   # "17 from 3,5,2=", "3*5=15;15+2=17;answer:3*5+2"
    task.check(train[0], completion), task.check_steps(train[0], completion), task.gold_score(...)

`Task` (rljax.tasks.base) is a frozen dataclass of pure functions; the embedded tasks are
ARITHMETIC (rljax.data.arithmetic, unchanged), SORTING (insertion steps) and COUNTDOWN (reach a
target: steps check locally, solving needs search); `reasoning_gym_task` adapts reasoning-gym's
procedural generators (an optional extra).
"""
import functools

from rljax.tasks.arithmetic import ARITHMETIC
from rljax.tasks.base import ANSWER_TAG, Task, TaskAlphabetError, check_alphabet
from rljax.tasks.countdown import COUNTDOWN
from rljax.tasks.sorting import SORTING

__all__ = ["ANSWER_TAG", "ARITHMETIC", "COUNTDOWN", "SORTING", "TASKS", "Task", "TaskAlphabetError",
           "check_alphabet", "get_task", "reasoning_gym_task", "task_names", "task_slug"]

TASKS = {t.name: t for t in (ARITHMETIC, SORTING, COUNTDOWN)}
_RG_PREFIX = "rg:"


def task_names() -> list[str]:
    """The embedded tasks' names and the reasoning-gym pattern."""
    return sorted(TASKS) + [f"{_RG_PREFIX}<generator>"]


def reasoning_gym_task(name: str, **config) -> Task:
    """`rljax.tasks.reasoning_gym.reasoning_gym_task` (imported on first use: reasoning-gym is optional)."""
    from rljax.tasks.reasoning_gym import reasoning_gym_task as build

    return build(name, **config)


def task_slug(name: str) -> str:
    """The task name as it goes into a directory name: "rg:leg_counting" -> "rg-leg_counting"."""
    return name.replace(":", "-")


@functools.lru_cache(maxsize=None)
def _rg_default(name: str) -> Task:
    return reasoning_gym_task(name)


def get_task(name: str, **config) -> Task:
    """The task called `name`: an embedded one (TASKS) or "rg:<generator>" (reasoning-gym, with
    `config` for `reasoning_gym_task`; without config one Task per generator and process, so the
    studies' calls share its datasets). An unknown name is a ValueError listing the known ones."""
    if isinstance(name, Task):
        return name
    if name.startswith(_RG_PREFIX):
        if not config:
            return _rg_default(name[len(_RG_PREFIX):])
        return reasoning_gym_task(name[len(_RG_PREFIX):], **config)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    if config:
        raise ValueError(f"task {name!r} takes no config (got {sorted(config)}); only rg:<generator> tasks do")
    return TASKS[name]
