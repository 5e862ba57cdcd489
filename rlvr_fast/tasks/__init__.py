"""Tasks: prompt sources with verifiable reward rules, looked up by name from the command line.

`register_task(name, factory)` adds one: `factory(cfg: TrainConfig) -> Task`. A user script can
register its own task and then call `rlvr_fast.train.main([...,"--task", name])`.
"""

from __future__ import annotations

from typing import Callable

from rlvr_fast.tasks.base import Problem, Task, total_reward
from rlvr_fast.tasks.multiply import MultiplyTask

TASKS: dict[str, Callable] = {}


def register_task(name: str, factory: Callable) -> None:
    TASKS[name] = factory


def make_task(cfg) -> Task:
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[cfg.task](cfg)


register_task("multiply", lambda cfg: MultiplyTask(digits=cfg.digits, curriculum=cfg.curriculum, promote_at=cfg.promote_at,
                                                   format_weight=cfg.format_weight, eval_size=cfg.eval_size))

__all__ = ["MultiplyTask", "Problem", "TASKS", "Task", "make_task", "register_task", "total_reward"]
