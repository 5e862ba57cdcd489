"""Scoring completions: a task's reward components for each (problem, completion), and their weighted total.

Built-in tasks' rewards are fast and trusted: they score in this process. A task with a user reward hands
over a picklable `scorer`, which runs in worker processes with a time limit per call (pool.py). A reward
that raises or passes its time limit scores {} (a total of 0) and is counted, so one bad completion does
not stop a run; with `strict`, a raising reward stops it instead (RewardError).
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Any

from rlvr_fast.tasks.base import Problem, total_reward
from rlvr_fast.tasks.pool import RewardPool

log = logging.getLogger("rlvr_fast")


class RewardError(RuntimeError):
    """The reward function raised and strict scoring was asked for (--strict-rewards)."""


@dataclass
class Scores:
    components: list[dict[str, float]]  # per completion, in order; {} where the reward raised or timed out
    totals: list[float]                 # the task's weighted sum of each completion's components
    errors: int                         # reward calls that raised
    timeouts: int                       # reward calls past the time limit


class Scorer:
    def __init__(self, task: Any, workers: int, timeout: float, strict: bool = False):
        self.task, self.timeout, self.strict = task, timeout, strict
        user_reward = getattr(task, "scorer", None)
        self.pool = RewardPool(user_reward, workers, timeout) if user_reward is not None else None
        self.error_shown = False  # the first traceback is logged, later ones only counted
        log.info("rewards: %s", f"{workers} worker processes, {timeout:g} s limit per completion"
                 if self.pool else "built-in, scored in-process")

    def _in_process(self, problem: Problem, text: str) -> tuple[str, Any]:
        try:
            return "ok", self.task.score(problem, text)
        except Exception:
            return "error", traceback.format_exc()

    def score(self, pairs: list[tuple[Problem, str]]) -> Scores:
        outcomes = self.pool.map(pairs) if self.pool else [self._in_process(p, t) for p, t in pairs]
        components, errors, timeouts = [], 0, 0
        for status, value in outcomes:
            if status == "error":
                if self.strict:
                    raise RewardError("the reward function raised (and --strict-rewards is set):\n" + value)
                if not self.error_shown:
                    self.error_shown = True
                    log.error("reward function raised; the completion scores 0 (further errors are only counted):\n%s",
                              value)
            errors += status == "error"
            timeouts += status == "timeout"
            components.append(value if status == "ok" else {})
        if timeouts:
            log.warning("%d reward call(s) passed --reward-timeout %g s and scored 0", timeouts, self.timeout)
        totals = [total_reward(c, self.task.reward_weights) for c in components]
        return Scores(components, totals, errors, timeouts)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
