"""Multiplication with a fixed prompt and a regex-checked answer line.

The first experiment of the reference blog: an A-digit by B-digit product (4 x 2 there), asked
with a fixed prompt; a completion is correct when the exact answer line below holds the product.
A small model gets no learning signal from problems it never solves, so the task can run a
curriculum: it starts at smaller operands and grows towards the target. Rolling accuracy alone is
not enough to move up (a level the model never solves gives GRPO nothing to learn from), so once
the rolling training accuracy passes `promote_at` a quarter of each step's prompts probe the next
level, and the curriculum moves up only when some probe groups hold a right completion; a level
that yields no right completion for `demote_after` steps in a row moves it back down. Evaluation
always includes the target size.
"""

from __future__ import annotations

import random
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

from rlvr_fast.tasks.base import CORRECT, Problem

PROMPT = ("Please answer the following question. You may write out your argument before stating your final "
          "answer X in a new line, following the format \"Final Answer: the final answer is X. I hope it is "
          "correct.\" {a} * {b}")
# Verbatim from the blog (the unescaped dots included): correctness is judged exactly this way.
ANSWER_RE = re.compile(r"Final Answer: the final answer is (\d+). I hope it is correct.")


def extract_answer(completion: str) -> int | None:
    match = ANSWER_RE.search(completion)
    return int(match.group(1)) if match else None


# Graded format credit, so a small model that writes a near-miss answer line gets a signal to move
# towards the exact one. Checked in order; the first match sets the format score.
FORMAT_LEVELS = (
    (ANSWER_RE, 1.0),                                                      # the exact line
    (re.compile(r"final answer: the final answer is \d+", re.I), 0.5),    # prefix present, case off
    (re.compile(r"the final answer is \d+\. I hope it is correct", re.I), 0.25),  # the line without its prefix
)


ANSWER_LINES_RE = re.compile(r"the final answer is \d+", re.I)


def format_score(completion: str) -> float:
    """The first level that matches; 0 for a completion that states its answer line more than once (the same
    number or another): format credit pays for one stated answer, never for repeating it."""
    if len(ANSWER_LINES_RE.findall(completion)) > 1:
        return 0.0
    return next((score for pattern, score in FORMAT_LEVELS if pattern.search(completion)), 0.0)


def multiply_reward(completion: str, product: int) -> dict[str, float]:
    """correct: the exact answer line holds the product (the blog's check);
    format: 1 for the exact answer line with any number, partial credit for near misses."""
    answer = extract_answer(completion)
    return {"correct": float(answer == product), "format": format_score(completion)}


def worked_product(a: int, b: int) -> str:
    """A worked multiplication, short and checkable line by line (the cold-start demonstrations): one line per
    digit of b, a's digits times it from the right with the carry added ("4*8+5=37"), then the running sum
    column by column from the right with its carry ("3+4+1=8", 0 for a missing digit). Each line ends with
    what it proved ("so 47*8=376"): the last step's value followed by the earlier steps' last digits.

        7*8=56 4*8+5=37 so 47*8=376
        7*3=21 4*3+2=14 so 47*30=1410
        6+0=6 7+1=8 3+4=7 0+1=1 so 376+1410=1786
    """
    lines, total = [], None
    for place, digit in enumerate(reversed(str(b))):
        d, carry, steps = int(digit), 0, []
        for x in reversed(str(a)):
            value = int(x) * d + carry
            steps.append(f"{x}*{d}{f'+{carry}' if carry else ''}={value}")
            carry = value // 10
        partial = a * d * 10**place
        lines.append(" ".join(steps) + f" so {a}*{d}{'0' * place}={partial}")
        if total is None:
            total = partial
            continue
        xs, ys, carry, steps = str(total)[::-1], str(partial)[::-1], 0, []
        for i in range(max(len(xs), len(ys))):
            x, y = (int(s[i]) if i < len(s) else 0 for s in (xs, ys))
            value = x + y + carry
            steps.append(f"{x}+{y}{f'+{carry}' if carry else ''}={value}")
            carry = value // 10
        lines.append(" ".join(steps) + f" so {total}+{partial}={total + partial}")
        total += partial
    return "\n".join(lines)


STEP_KINDS = ("digit product", "partial product", "column sum", "running sum", "answer line")
"""The kinds of step in a worked product, in the order `first_wrong_step` names them."""


def _steps(text: str) -> list[tuple[str, str]]:
    """(kind, text) of each step of a worked product: its lines split at spaces, "so ..." joined to what follows."""
    steps = []
    for line in text.strip().splitlines():
        if line.startswith("Final Answer"):
            break
        words = line.split()
        if "so" in words:
            head, tail = words[:words.index("so")], " ".join(words[words.index("so"):])
        else:
            head, tail = words, ""
        summing = bool(head) and "*" not in head[0]
        steps += [("column sum" if summing else "digit product", w) for w in head]
        if tail:
            steps.append(("running sum" if summing else "partial product", tail))
    return steps


def first_wrong_step(completion: str, a: int, b: int) -> str:
    """Where a completion of a * b first leaves the worked product the cold start demonstrates (`worked_product`):
    "right" (the blog's check passes), the kind of the first step that differs (STEP_KINDS; "answer line" when every
    step is right and the answer is not), "cut short" when the steps it has are right but some are missing, or
    "other form" when it does not follow the worked form."""
    if extract_answer(completion) == a * b:
        return "right"
    want, got = _steps(worked_product(a, b)), _steps(completion)
    for (kind, expected), (got_kind, text) in zip(want, got):
        if expected != text:
            return kind if got_kind == kind else "other form"
    return "answer line" if len(got) == len(want) else "cut short" if len(got) < len(want) else "other form"


def carries(a: int, b: int) -> int:
    """How many steps of the worked product add a carried digit (`4*8+5=37`, `8+9+1=18`): the harder steps for a
    small model."""
    return sum(step.count("+") - (kind == "column sum") > 0 for kind, step in _steps(worked_product(a, b))
               if kind in ("digit product", "column sum"))


def answer_line(product: int) -> str:
    """The blog's answer line, which ANSWER_RE reads."""
    return f"Final Answer: the final answer is {product}. I hope it is correct."


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
    """Start at 1 x 1 digits and step towards `digits` (see the module docstring)."""
    promote_at: float = 0.6
    """Rolling training accuracy at the current level that starts probing the next one."""
    window: int = 64
    """Completions in the rolling accuracy window."""
    probe_groups: int = 8
    """Probe groups (prompts of the next level) judged together; the curriculum moves up once a quarter of
    them hold at least one right completion, otherwise the oldest probe makes room for the next."""
    demote_after: int = 8
    """Steps in a row without one right completion at the current level that move the curriculum back down
    (0 = never)."""
    format_weight: float = 0.1
    eval_size: int = 64
    """Held-out problems per size (at most half of all problems of that size); training never draws them."""
    eval_seed: int = 1234
    name: str = "multiply"

    def __post_init__(self) -> None:
        if len(self.digits) != 2 or min(self.digits) < 1 or max(self.digits) > 9:
            raise ValueError(f"--digits takes two sizes between 1 and 9, got {self.digits}")
        self.digits = tuple(self.digits)
        self.levels = curriculum_levels(self.digits) if self.curriculum else [self.digits]
        self.level = 0
        self._recent: deque[float] = deque(maxlen=self.window)
        self._probes: deque[bool] = deque(maxlen=self.probe_groups)  # per probe group: held a right completion
        self._dry_steps = 0  # steps in a row without a right completion at the current level
        self._held_out_cache: dict[tuple[int, int], set[tuple[int, int]]] = {}
        self.reward_weights = {"correct": 1.0, "format": self.format_weight}

    @property
    def current_digits(self) -> tuple[int, int]:
        return self.levels[self.level]

    @property
    def probing(self) -> bool:
        """The current level is learnt well enough (rolling accuracy) to try the next one."""
        return (self.level + 1 < len(self.levels) and len(self._recent) == self._recent.maxlen
                and sum(self._recent) / len(self._recent) >= self.promote_at)

    def make_problem(self, a: int, b: int) -> Problem:
        return Problem(messages=[{"role": "user", "content": PROMPT.format(a=a, b=b)}], answer=str(a * b),
                       meta={"a": a, "b": b})

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        """Training problems at the current level (while probing, the last quarter of them at the next level),
        never one of the held-out evaluation problems."""
        probes = -(-n // 4) if self.probing else 0
        return (self.sample_at(self.current_digits, rng, n - probes)
                + self.sample_at(self.levels[min(self.level + 1, len(self.levels) - 1)], rng, probes))

    def sample_at(self, digits: tuple[int, int], rng: random.Random, n: int) -> list[Problem]:
        held_out = self._held_out(digits)
        problems = []
        while len(problems) < n:
            a, b = _operand(rng, digits[0]), _operand(rng, digits[1])
            if (a, b) not in held_out:
                problems.append(self.make_problem(a, b))
        return problems

    def eval_problems(self, digits: tuple[int, int] | None = None) -> list[Problem]:
        return [self.make_problem(a, b) for a, b in self._eval_pairs(tuple(digits or self.digits))]

    def eval_sets(self) -> list[tuple[str, list[Problem]]]:
        """The target size, and the curriculum's current level while it is below the target."""
        sets = [("target", self.eval_problems())]
        if self.current_digits != self.digits:
            sets.append(("level", self.eval_problems(self.current_digits)))
        return sets

    @property
    def title(self) -> str:
        return f"{self.name} {self.digits[0]} x {self.digits[1]} digits"

    def _eval_pairs(self, digits: tuple[int, int]) -> list[tuple[int, int]]:
        """A fixed set of distinct problems of this size, from its own generator (never the training one)."""
        da, db = digits
        space = (10**da - (10 ** (da - 1) if da > 1 else 0)) * (10**db - (10 ** (db - 1) if db > 1 else 0))
        # Keep at least half of all problems of this size for training.
        size = min(self.eval_size, space // 2)
        rng, pairs = random.Random(self.eval_seed), dict()
        while len(pairs) < size:
            pairs[(_operand(rng, da), _operand(rng, db))] = None
        return list(pairs)

    def _held_out(self, digits: tuple[int, int]) -> set[tuple[int, int]]:
        if digits not in self._held_out_cache:
            self._held_out_cache[digits] = set(self._eval_pairs(digits))
        return self._held_out_cache[digits]

    def demonstrations(self, rng: random.Random, n: int) -> list[tuple[Problem, list[str]]]:
        """Cold-start demonstrations (--cold-start-steps): n training problems, each with its worked product
        (`worked_product`) and the answer line, at the sizes the run will train on. With the curriculum they are
        mixed: the target half of the time, otherwise any smaller level (a model shown only 2 x 2 reads the single
        digit of 2 x 1 as a tens digit). Without it, GRPO and the evaluations see the target size only, and so do
        the demonstrations: measured at 2 x 2, 60 steps of target-only demonstrations reach a held-out accuracy that
        mixed ones do not (README, "Multiplication at the blog's sizes")."""
        smaller = curriculum_levels(self.digits)[:-1] if self.curriculum else []
        out = []
        for _ in range(n):
            digits = rng.choice(smaller) if smaller and rng.random() < 0.5 else self.digits
            (problem,) = self.sample_at(digits, rng, 1)
            a, b = problem.meta["a"], problem.meta["b"]
            out.append((problem, [worked_product(a, b) + "\n" + answer_line(a * b)]))
        return out

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        return multiply_reward(completion, int(problem.answer))

    def observe(self, problems: list[Problem], components: list[list[dict[str, float]]]) -> tuple[dict[str, Any], str | None]:
        """The trainer's hook after each step's rollout, fed every group it drew ([P][G] reward components): the
        curriculum's move. Returns the step's metrics (the level it trained at, whether it moved up or down) and,
        when it moved, a line that says so."""
        level, probe_level = self.current_digits, self.levels[min(self.level + 1, len(self.levels) - 1)]
        solved_here, moved = False, None
        for problem, row in zip(problems, components):
            right = [c.get(CORRECT, 0.0) for c in row]
            digits = (len(str(problem.meta["a"])), len(str(problem.meta["b"])))
            if digits == level:
                self._recent.extend(right)
                solved_here |= any(right)
            elif digits == probe_level:
                self._probes.append(any(right))
        self._dry_steps = 0 if solved_here else self._dry_steps + 1
        if self.level > 0 and self.demote_after and self._dry_steps >= self.demote_after:
            moved, why = "down", f"no right answer in {self.demote_after} steps"
        elif len(self._probes) == self._probes.maxlen and sum(self._probes) >= self.probe_groups / 4:
            moved, why = "up", "probes of it held right answers"
        metrics = {"level": list(level), "promoted": moved == "up", "demoted": moved == "down"}
        if moved is None:
            return metrics, None
        self._move(+1 if moved == "up" else -1)
        a, b = self.current_digits
        return metrics, f"curriculum: moving {'up' if moved == 'up' else 'back down'} to {a} x {b} digits ({why})"

    def _move(self, by: int) -> None:
        self.level += by
        self._recent.clear()
        self._probes.clear()
        self._dry_steps = 0

    def state_dict(self) -> dict:
        """JSON-serialisable: ints and lists."""
        return {"level": self.level, "recent": list(self._recent), "probes": list(self._probes),
                "dry_steps": self._dry_steps}

    def load_state_dict(self, state: dict) -> None:
        self.level = state["level"]
        self._recent = deque(state["recent"], maxlen=self.window)
        self._probes = deque(state.get("probes", []), maxlen=self.probe_groups)
        self._dry_steps = state.get("dry_steps", 0)
