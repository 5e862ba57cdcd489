"""A task from user code: problems (a list or a generator), reward functions, an evaluation set.

    from rlvr_fast.tasks import Problem, RewardTask, register_task
    from rlvr_fast.train import main

    def shows_work(prompt: str, completion: str, answer: str) -> float:
        return float("=" in completion)

    if __name__ == "__main__":  # the reward workers import this module: keep the run under the guard
        problems = [Problem([{"role": "user", "content": f"What is {a} + {a}?"}], str(2 * a)) for a in range(100)]
        register_task("double", RewardTask(name="double", train=problems[:80], eval=problems[80:],
                                           rewards=[("number", 1.0), (shows_work, 0.2)]))
        main(["--task", "double", "--steps", "20"])

Rewards are built-in names, `--reward`-style spec strings, functions, or (function, weight). When
any is not a built-in, the task hands the trainer its `scorer` and scoring runs in the reward
worker pool with a time limit per call (rlvr_fast/tasks/pool.py); that needs the functions to be
importable by name (defined at module level). Otherwise (lambdas, closures) it scores in-process
without a time limit, and the trainer says so.
"""

from __future__ import annotations

import logging
import pickle
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from rlvr_fast.tasks.base import Problem
from rlvr_fast.tasks.rewards import RewardSet

log = logging.getLogger("rlvr_fast")


def _as_reward(r: Any) -> Any:
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str):
        return f"{r[0]}:{r[1]}"  # ("number", 1.0) -> "number:1.0"
    return r


@dataclass(kw_only=True)
class RewardTask:
    name: str
    train: Sequence[Problem] | Callable[[random.Random, int], list[Problem]]
    """Training problems: a list (drawn uniformly with replacement) or a function (rng, n) -> n problems."""
    eval: Sequence[Problem]
    """The fixed held-out set."""
    rewards: Sequence[Any] | RewardSet = field(default_factory=lambda: ["exact:1.0", "format:0.1"])

    def __post_init__(self) -> None:
        if not isinstance(self.rewards, RewardSet):
            self.rewards = RewardSet([_as_reward(r) for r in self.rewards])
        if not self.eval:
            raise ValueError(f"task {self.name!r}: the evaluation set is empty")
        if not callable(self.train) and not self.train:
            raise ValueError(f"task {self.name!r}: no training problems")
        self.rewards.prepare()  # import user rewards now: a wrong module path fails before any work
        self.reward_weights = self.rewards.weights
        self.scorer = None
        if self.rewards.needs_pool:
            try:
                pickle.dumps(self.rewards)
                self.scorer = self.rewards
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                log.warning("task %s: reward functions cannot be sent to worker processes (%s); they run in-process, "
                            "with no time limit. Define them at module level to get the limit.", self.name, exc)

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        if callable(self.train):
            return list(self.train(rng, n))
        return [rng.choice(self.train) for _ in range(n)]

    def eval_problems(self) -> list[Problem]:
        return list(self.eval)

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        return self.rewards(problem, completion)
