"""Scorer: a task's reward components per completion, their weighted totals, and what a raising reward does."""

from __future__ import annotations

import pytest

from rlvr_fast.tasks.base import Problem
from rlvr_fast.tasks.scoring import RewardError, Scorer


class Task:
    reward_weights = {"correct": 1.0, "format": 0.5}

    def score(self, problem: Problem, text: str) -> dict[str, float]:
        if text == "boom":
            raise ValueError("bad completion")
        return {"correct": float(text == problem.answer), "format": 1.0}


def problem(answer: str) -> Problem:
    return Problem(messages=[{"role": "user", "content": "?"}], answer=answer)


def test_totals_are_the_weighted_components_and_a_raising_reward_scores_zero(caplog):
    scores = Scorer(Task(), workers=1, timeout=1.0).score([(problem("4"), "4"), (problem("4"), "5"),
                                                          (problem("4"), "boom"), (problem("4"), "boom")])
    assert scores.components == [{"correct": 1.0, "format": 1.0}, {"correct": 0.0, "format": 1.0}, {}, {}]
    assert scores.totals == [1.5, 0.5, 0.0, 0.0]
    assert (scores.errors, scores.timeouts) == (2, 0)
    assert caplog.text.count("ValueError: bad completion") == 1  # the first traceback is shown, the second only counted


def test_strict_scoring_stops_at_the_first_raising_reward():
    with pytest.raises(RewardError, match="--strict-rewards(.|\n)*bad completion"):
        Scorer(Task(), workers=1, timeout=1.0, strict=True).score([(problem("4"), "boom")])
