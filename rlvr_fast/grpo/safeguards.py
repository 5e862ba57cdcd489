"""What keeps a long run from ending worse than it started: the best model kept, and warnings when training
goes wrong.

**The best model.** After every evaluation of the target set, a held-out accuracy above every earlier one
(the starting model's included) is kept: the model goes to OUTPUT/best (HF layout, loadable with --model;
with LoRA the merged model) and OUTPUT/best.json says which step it is and how it scored. When no step beats
the starting model, best.json names the starting model itself (--model, or OUTPUT/cold-start) and nothing is
copied. Like `load_best_model_at_end` of other trainers, but the last checkpoint is left as it is.

**Warnings**, each printed once per run (and recorded in OUTPUT/warnings.jsonl); `--stop-on NAME` ends the run
when NAME is raised, with its final evaluation and checkpoint, and exit code 3:

- collapse:   held-out accuracy is below the starting model's by more than two standard errors;
- hacking:    correctness fell while another rewarded component rose, each by more than a standard error,
              from the starting model's evaluation (e.g. format credit won without right answers);
- repetition: in one step at least a quarter of the completions hit --max-new-tokens while repeating
              themselves (under half of their 4-grams distinct);
- no-signal:  K steps in a row (--no-signal-steps) drew no group whose rewards differ: nothing was trained.

The standard error of a difference of two accuracies p0, p on n problems is sqrt((p0(1-p0) + p(1-p)) / n),
at least 1/n (so that 0 -> 0 is no change and a single problem is not a trend).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

WARNINGS = ("collapse", "hacking", "repetition", "no-signal")
STOPPED_EXIT_CODE = 3
BEST_DIR, BEST_JSON = "best", "best.json"
REPEAT_NGRAM, REPEAT_DISTINCT, REPEAT_SHARE = 4, 0.5, 0.25


def is_repetitive(token_ids: Sequence[int], n: int = REPEAT_NGRAM) -> bool:
    """True when fewer than half of the sequence's n-grams are distinct (a loop, not prose or worked steps)."""
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    return len(grams) >= 8 and len(set(grams)) < REPEAT_DISTINCT * len(grams)


def standard_error(p0: float, p: float, n: int) -> float:
    var = max(0.0, p0 * (1 - p0)) + max(0.0, p * (1 - p))
    return max(math.sqrt(var / n), 1.0 / n)


@dataclass
class Safeguards:
    """The run's warnings: fed each step's metrics and each target evaluation, returns the warnings newly raised
    as (name, message). State (what was raised, the no-signal streak, the starting evaluation) is checkpointed."""

    no_signal_steps: int = 5
    correct_names: tuple[str, ...] = ("correct",)
    """The components that measure correctness (not checked for rising against it)."""
    weights: dict[str, float] = field(default_factory=dict)
    raised: list[str] = field(default_factory=list)
    no_signal_streak: int = 0
    start: dict[str, Any] | None = None

    def _new(self, name: str, message: str) -> list[tuple[str, str]]:
        if name in self.raised:
            return []
        self.raised.append(name)
        return [(name, message)]

    def after_step(self, m: dict[str, Any]) -> list[tuple[str, str]]:
        found = []
        if "groups_kept" in m:  # a GRPO step (a supervised step always trains)
            self.no_signal_streak = self.no_signal_streak + 1 if m["groups_kept"] == 0 else 0
            if self.no_signal_streak >= self.no_signal_steps:
                found += self._new("no-signal", f"{self.no_signal_streak} steps in a row drew no group whose rewards "
                                   "differ, so nothing was trained. The task may be too hard for the model now (try "
                                   "--cold-start-steps, more --max-oversample, a larger --group-size or a higher "
                                   "--temperature), or the policy has collapsed (see best.json).")
        if m.get("repetitive_truncated_frac", 0.0) >= REPEAT_SHARE:
            found += self._new("repetition", f"step {m['step']}: {m['repetitive_truncated_frac']:.0%} of the completions "
                               "ran to --max-new-tokens repeating themselves; a policy in a loop rarely recovers. "
                               "Try a lower --lr, --beta > 0, or a shorter --max-new-tokens.")
        return found

    def after_eval(self, result: dict[str, Any]) -> list[tuple[str, str]]:
        if self.start is None or result["step"] == 0:  # the starting model (after the cold start, if any)
            self.start = {"accuracy": result["accuracy"], "components": dict(result["components"])}
            return []
        n, p0, p = result["size"], self.start["accuracy"], result["accuracy"]
        found = []
        if p0 - p > 2 * standard_error(p0, p, n):
            found += self._new("collapse", f"held-out accuracy {p:.3f} at step {result['step']} is below the starting "
                               f"model's {p0:.3f} by more than two standard errors ({n} problems). The best model so far "
                               "is kept (best.json); try a lower --lr or --beta > 0.")
        if p0 - p > standard_error(p0, p, n):
            for name, weight in self.weights.items():
                if weight <= 0 or name in self.correct_names or name not in result["components"]:
                    continue
                q0, q = self.start["components"].get(name, 0.0), result["components"][name]
                if q - q0 > standard_error(q0, q, n):
                    found += self._new("hacking", f"at step {result['step']} the reward component {name!r} rose "
                                       f"{q0:.3f} -> {q:.3f} while held-out accuracy fell {p0:.3f} -> {p:.3f}: the "
                                       f"policy may be winning {name!r} without right answers (reward hacking). Lower "
                                       f"its weight, or make it pay only alongside a well-formed answer.")
                    break
        return found

    def state_dict(self) -> dict[str, Any]:
        return {"raised": list(self.raised), "no_signal_streak": self.no_signal_streak, "start": self.start}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.raised, self.no_signal_streak, self.start = list(state["raised"]), state["no_signal_streak"], state["start"]


def read_best(output: Path) -> dict[str, Any] | None:
    path = output / BEST_JSON
    return json.loads(path.read_text()) if path.is_file() else None
