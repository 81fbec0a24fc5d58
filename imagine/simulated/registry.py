"""Which built-in tasks have a scripted simulated user."""

from __future__ import annotations

from functools import cache

from imagine.simulated.base import ScriptedTask
from imagine.task import load_task


def _tasks() -> dict[str, type[ScriptedTask]]:
    from imagine.simulated.teaching import TeachingTask
    from imagine.simulated.travel import TravelTask

    return {"travel": TravelTask, "teaching": TeachingTask}


def scripted_tasks() -> list[str]:
    """Names of the tasks with a scripted user."""
    return sorted(_tasks())


@cache
def scripted_task(task_name: str) -> ScriptedTask:
    """The scripted task for a built-in task name; ``ValueError`` for a task without one."""
    tasks = _tasks()
    if task_name not in tasks:
        raise ValueError(
            f"no scripted user for task {task_name!r}: scripted users exist for {', '.join(sorted(tasks))}; "
            "use LLM users for other tasks"
        )
    return tasks[task_name]()


@cache
def opening_line(task_name: str) -> str:
    """The agent's opening line from the built-in task spec."""
    return load_task(task_name).opening_line
