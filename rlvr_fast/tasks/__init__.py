"""Tasks: prompt sources with verifiable reward rules, looked up by name from the command line.

Built in: `multiply` (the blog's first experiment), `function-pick` (its second: choose the function
to call, or none), `jsonl` (your prompts and answers from a file, scored by named rewards).

`register_task(name, task_or_factory, defaults=None)` adds one: a Task object, or a
`factory(cfg: TrainConfig) -> Task`; `defaults` are option values the task suggests (e.g. a longer
`max_new_tokens`) that apply unless the user sets them. A user script can register its own task
(see `RewardTask` for one built from problems and reward functions) and then call
`rlvr_fast.train.main(["--task", name, ...])`.
"""

from __future__ import annotations

from typing import Any, Callable

from rlvr_fast.tasks.base import Problem, Task, total_reward
from rlvr_fast.tasks.custom import RewardTask
from rlvr_fast.tasks.function_pick import FunctionPickTask
from rlvr_fast.tasks.multiply import MultiplyTask

TASKS: dict[str, Callable] = {}
TASK_DEFAULTS: dict[str, dict[str, Any]] = {}


def register_task(name: str, task: Task | Callable, defaults: dict[str, Any] | None = None) -> None:
    is_factory = callable(task) and (isinstance(task, type) or not hasattr(task, "score"))
    TASKS[name] = task if is_factory else (lambda cfg: task)
    TASK_DEFAULTS[name] = dict(defaults or {})


def task_defaults(name: str) -> dict[str, Any]:
    """Option values a task suggests; every task writes to runs/<name> unless told otherwise."""
    return {"output": f"runs/{name}", **TASK_DEFAULTS.get(name, {})}


def make_task(cfg) -> Task:
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[cfg.task](cfg)


def _refuse(cfg, *options: str) -> None:
    given = [o for o in options if getattr(cfg, o)]
    if given:
        flags = ", ".join("--" + o.replace("_", "-") for o in given)
        raise ValueError(f"{flags} does not apply to --task {cfg.task} (--data: function-pick and jsonl; --reward: jsonl)")


def _multiply_task(cfg) -> MultiplyTask:
    _refuse(cfg, "data", "reward")
    return MultiplyTask(digits=cfg.digits, curriculum=cfg.curriculum, promote_at=cfg.promote_at,
                        demote_after=cfg.demote_after, format_weight=cfg.format_weight, eval_size=cfg.eval_size)


def _function_pick_task(cfg) -> FunctionPickTask:
    _refuse(cfg, "reward")  # the reward is the task's own: the final choice
    return FunctionPickTask(data=cfg.data, eval_size=cfg.eval_size, format_weight=cfg.format_weight)


def _jsonl_task(cfg) -> RewardTask:
    from rlvr_fast.tasks.jsonl import jsonl_task
    return jsonl_task(cfg.data, cfg.reward, eval_size=cfg.eval_size)


# multiply and function-pick keep the advantage scaling their recipes were tuned with (bench/RESULTS.md); the
# generic default (none) was chosen on bench/bench_tasks.py's suite.
register_task("multiply", _multiply_task, defaults={"scale_rewards": "group"})
# Sized for the embedded 135M model on a 2-core CPU (README): prompts are ~270 tokens of function schemas.
# The cold start teaches a short check of the request and the choice markers, which that model almost never
# writes on its own.
register_task("function-pick", _function_pick_task,
              defaults={"max_new_tokens": 64, "lr": 2e-5, "eval_every": 0, "eval_size": 64, "cold_start_steps": 60,
                        "scale_rewards": "group"})
register_task("jsonl", _jsonl_task, defaults={"max_new_tokens": 256})

__all__ = ["FunctionPickTask", "MultiplyTask", "Problem", "RewardTask", "TASKS", "Task", "make_task", "register_task",
           "task_defaults", "total_reward"]
