"""Multiplication with a fixed prompt and a regex-checked answer line.

The first experiment of the reference blog: an A-digit by B-digit product (4 x 2 there), asked
with a fixed prompt; a completion is correct when the exact answer line below holds the product.
A small model gets no learning signal from problems it never solves, so the task can run a
curriculum: it starts at smaller operands and moves up one level once the rolling training
accuracy passes a threshold. Evaluation always includes the target size.
"""

from __future__ import annotations

import random
import re
from collections import deque
from dataclasses import dataclass

from rlvr_fast.tasks.base import Problem

PROMPT = ("Please answer the following question. You may write out your argument before stating your final "
          "answer X in a new line, following the format \"Final Answer: the final answer is X. I hope it is "
          "correct.\" {a} * {b}")
# Verbatim from the blog (the unescaped dots included): correctness is judged exactly this way.
ANSWER_RE = re.compile(r"Final Answer: the final answer is (\d+). I hope it is correct.")


def extract_answer(completion: str) -> int | None:
    match = ANSWER_RE.search(completion)
    return int(match.group(1)) if match else None


def multiply_reward(completion: str, product: int) -> dict[str, float]:
    """correct: the answer line holds the product; format: the answer line is there at all."""
    answer = extract_answer(completion)
    return {"correct": float(answer == product), "format": float(answer is not None)}


def curriculum_levels(target: tuple[int, int]) -> list[tuple[int, int]]:
    """Digit sizes from 1 x 1 up to the target, growing the larger operand first: (1,1), (2,1), ..."""
    a_max, b_max = target
    levels = [(1, 1)]
    while levels[-1] != (a_max, b_max):
        a, b = levels[-1]
        levels.append((a + 1, b) if a < a_max and (a <= b or b >= b_max) else (a, b + 1))
    return levels


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


@dataclass(kw_only=True)
class MultiplyTask:
    digits: tuple[int, int] = (4, 2)
    curriculum: bool = True
    """Start at 1 x 1 digits and step towards `digits` as the rolling accuracy passes `promote_at`."""
    promote_at: float = 0.6
    window: int = 64
    """Completions in the rolling accuracy window."""
    format_weight: float = 0.1
    eval_size: int = 64
    eval_seed: int = 1234
    name: str = "multiply"

    def __post_init__(self) -> None:
        if len(self.digits) != 2 or min(self.digits) < 1 or max(self.digits) > 9:
            raise ValueError(f"--digits takes two sizes between 1 and 9, got {self.digits}")
        self.digits = tuple(self.digits)
        self.levels = curriculum_levels(self.digits) if self.curriculum else [self.digits]
        self.level = 0
        self._recent: deque[float] = deque(maxlen=self.window)
        self.reward_weights = {"correct": 1.0, "format": self.format_weight}

    @property
    def current_digits(self) -> tuple[int, int]:
        return self.levels[self.level]

    def make_problem(self, a: int, b: int) -> Problem:
        return Problem(messages=[{"role": "user", "content": PROMPT.format(a=a, b=b)}], answer=str(a * b),
                       meta={"a": a, "b": b})

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        da, db = self.current_digits
        return [self.make_problem(_operand(rng, da), _operand(rng, db)) for _ in range(n)]

    def eval_problems(self, digits: tuple[int, int] | None = None) -> list[Problem]:
        rng = random.Random(self.eval_seed)  # held out: its own generator, never the training one
        da, db = digits or self.digits
        return [self.make_problem(_operand(rng, da), _operand(rng, db)) for _ in range(self.eval_size)]

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        return multiply_reward(completion, int(problem.answer))

    def observe(self, correct: list[float]) -> bool:
        """Feed training correctness; move up a level when the window is full and accurate. True if promoted."""
        self._recent.extend(correct)
        full = len(self._recent) == self._recent.maxlen
        if full and self.level + 1 < len(self.levels) and sum(self._recent) / len(self._recent) >= self.promote_at:
            self.level += 1
            self._recent.clear()
            return True
        return False

    def state_dict(self) -> dict:
        return {"level": self.level, "recent": list(self._recent)}

    def load_state_dict(self, state: dict) -> None:
        self.level = state["level"]
        self._recent = deque(state["recent"], maxlen=self.window)
