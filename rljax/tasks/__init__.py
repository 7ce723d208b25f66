"""Tasks: problem generators with checkable answers (and steps), one interface for every study.

    from rljax.tasks import get_task
    task = get_task("arithmetic")
    train, test = task.split(1000, 128, levels=(1, 2), seed=0)
    task.prompt(train[0]), task.reference(train[0])   # "23+58*2=", "58*2=116;23+116=139;answer:139"
    task.check(train[0], completion), task.check_steps(train[0], completion), task.gold_score(...)

`Task` (rljax.tasks.base) is a frozen dataclass of pure functions; the embedded task is
ARITHMETIC (rljax.data.arithmetic, unchanged).
"""
from rljax.tasks.arithmetic import ARITHMETIC
from rljax.tasks.base import ANSWER_TAG, Task, TaskAlphabetError, check_alphabet

__all__ = ["ANSWER_TAG", "ARITHMETIC", "TASKS", "Task", "TaskAlphabetError",
           "check_alphabet", "get_task", "task_names"]

TASKS = {t.name: t for t in (ARITHMETIC,)}


def task_names() -> list[str]:
    """The embedded tasks' names and the reasoning-gym pattern."""
    return sorted(TASKS)


def get_task(name: str, **config) -> Task:
    """The task called `name` (TASKS). An unknown name is a ValueError listing the known ones."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    if config:
        raise ValueError(f"task {name!r} takes no config (got {sorted(config)})")
    return TASKS[name]
