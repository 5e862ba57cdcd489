"""What a task is: a source of prompts with hidden answers, and a rule that scores completions.

A task hands out `Problem`s (the chat messages shown to the model and the answer the rule
checks against) and scores a completion into named reward components, e.g.
{"correct": 1.0, "format": 1.0}. The trainer weights and sums the components into the reward and
logs each one separately, so a user can see whether the model learned the answer or only the form.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Problem:
    messages: list[dict[str, str]]
    """Chat messages shown to the model (rendered through the model's chat template)."""
    answer: str
    """What the reward rule checks against; never shown to the model."""
    meta: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str
    reward_weights: dict[str, float]
    """Weight of each reward component in the total reward."""

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        """n training problems drawn with `rng` (the trainer owns and checkpoints the generator)."""
        ...

    def eval_problems(self) -> list[Problem]:
        """The fixed held-out set, the same on every call."""
        ...

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        """Reward components of one completion."""
        ...

    # Optional: `scorer`, a picklable callable (problem, completion) -> components. A task that has one
    # (a RewardTask with user rewards) is scored by it in worker processes with --reward-timeout per call;
    # other tasks are scored in-process by `score`. `demonstrations(rng, n) -> [(problem, [completion, ...])]`:
    # n training problems with completions in the expected form, for --cold-start-steps (see FunctionPickTask).
    # `state_dict()`/`load_state_dict()` (JSON-serialisable), `eval_sets()` ([(label, problems)], default
    # [("target", eval_problems())]), `observe(problems, components)` (every group a step drew; returns the
    # task's metrics of the step and a line for the console, or None) and `title`: see MultiplyTask (curriculum).


CORRECT, FORMAT = "correct", "format"
"""The components the trainer reports as `accuracy` and `format_rate` (0 for a task without them)."""


def summarize(components: list[dict[str, float]]) -> dict[str, Any]:
    """Means over completions (a component a completion lacks counts 0): `accuracy` (of CORRECT), `format_rate`
    (of FORMAT) and every component's, by name."""
    mean = lambda name: sum(c.get(name, 0.0) for c in components) / len(components)
    return {"accuracy": mean(CORRECT), "format_rate": mean(FORMAT),
            "components": {k: mean(k) for k in sorted({k for c in components for k in c})}}


def accuracy_by_kind(problems: list[Problem], components: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Size and accuracy per `Problem.meta["kind"]` (e.g. function-pick's requests), over the problems that have one."""
    by_kind: dict[str, list[float]] = {}
    for problem, c in zip(problems, components):
        if "kind" in problem.meta:
            by_kind.setdefault(str(problem.meta["kind"]), []).append(c.get(CORRECT, 0.0))
    return {k: {"size": len(v), "accuracy": sum(v) / len(v)} for k, v in by_kind.items()}


def total_reward(components: dict[str, float], weights: dict[str, float]) -> float:
    return sum(weights.get(name, 0.0) * value for name, value in components.items())


def check_loaded(path: str, kept: int, skipped: Counter, unit: str) -> None:
    """One summary line for the records of a --data file that could not be read; an error when fewer than
    two are left (one to train on, one to evaluate)."""
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
        logging.getLogger("rlvr_fast").warning("--data %s: skipped %d of %d %s that could not be read (%s)", path,
                                               sum(skipped.values()), kept + sum(skipped.values()), unit, reasons)
    if kept < 2:
        raise ValueError(f"--data {path}: {kept} readable {unit}; need at least 2 (one to train on, one to evaluate)")
