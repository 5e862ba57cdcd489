"""What keeps a run from ending worse than it started: best/ kept by held-out accuracy, warnings raised once
(collapse, reward hacking, repetition at the length limit, no signal), --stop-on, and all of it across resume."""

from __future__ import annotations

import json
import random

import pytest
import torch

import rlvr_fast
from rlvr_fast.grpo.safeguards import STOPPED_EXIT_CODE, Safeguards, is_repetitive, standard_error
from rlvr_fast.grpo.trainer import GRPOTrainer
from rlvr_fast.tasks import Problem, register_task
from rlvr_fast.train import main
from tests.test_train import args, tiny  # noqa: F401 - the tiny checkpoint fixture


class ConstantTask:
    """Every completion scores the same: no group ever has signal."""

    name = "constant"
    reward_weights = {"correct": 1.0}

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        return [Problem([{"role": "user", "content": f"{rng.randint(1, 99)}"}], "0") for _ in range(n)]

    def eval_problems(self) -> list[Problem]:
        return self.sample(random.Random(7), 3)

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        return {"correct": 0.0}


register_task("constant-test", lambda cfg: ConstantTask())


def evaluation(step: int, accuracy: float, fmt: float, size: int = 64) -> dict:
    return {"step": step, "accuracy": accuracy, "size": size, "components": {"correct": accuracy, "format": fmt}}


# ---- the warnings, alone ---------------------------------------------------------------------------------------


def test_collapse_and_hacking_are_raised_once_against_the_starting_evaluation():
    guard = Safeguards(weights={"correct": 1.0, "format": 0.1}, correct_names=("correct",))
    assert guard.after_eval(evaluation(0, 0.125, 0.156, size=32)) == []
    assert guard.after_eval(evaluation(5, 0.094, 0.4, size=32)) == []  # within noise: nothing
    found = guard.after_eval(evaluation(10, 0.0, 1.0, size=32))  # the run: 0.125 -> 0, format -> 1
    assert [name for name, _ in found] == ["collapse", "hacking"]
    assert "'format' rose 0.156 -> 1.000" in found[1][1]
    assert guard.after_eval(evaluation(15, 0.0, 1.0, size=32)) == []  # once per run
    assert guard.raised == ["collapse", "hacking"]


def test_no_hacking_when_correctness_holds_or_the_component_has_no_weight():
    guard = Safeguards(weights={"correct": 1.0, "format": 0.1, "length": 0.0}, correct_names=("correct",))
    guard.after_eval(evaluation(0, 0.5, 0.2))
    assert guard.after_eval(evaluation(5, 0.5, 1.0)) == []  # format rose, correctness did not fall
    guard = Safeguards(weights={"correct": 1.0, "length": 0.0}, correct_names=("correct",))
    guard.after_eval({**evaluation(0, 0.5, 0.0), "components": {"correct": 0.5, "length": 0.1}})
    found = guard.after_eval({**evaluation(5, 0.2, 0.0), "components": {"correct": 0.2, "length": 0.9}})
    assert [name for name, _ in found] == ["collapse"]  # the unweighted component earns nothing: not hacking


def test_the_start_is_the_last_step_zero_evaluation():
    """After a cold start the starting model is the cold start's, evaluated second at step 0."""
    guard = Safeguards()
    guard.after_eval(evaluation(0, 0.0, 0.0))
    guard.after_eval(evaluation(0, 0.6, 1.0))
    assert guard.start["accuracy"] == 0.6 and [n for n, _ in guard.after_eval(evaluation(4, 0.3, 1.0))] == ["collapse"]


def test_standard_error_of_a_difference():
    assert standard_error(0.5, 0.5, 100) == pytest.approx((0.5 / 100) ** 0.5)
    assert standard_error(0.0, 0.0, 32) == 1 / 32  # never zero: 0 -> 1/32 is not two standard errors


def test_no_signal_after_k_steps_in_a_row():
    guard = Safeguards(no_signal_steps=3)
    kept = [0, 0, 2, 0, 0, 0, 0]
    found = [guard.after_step({"step": i + 1, "groups_kept": k}) for i, k in enumerate(kept)]
    assert [i + 1 for i, f in enumerate(found) if f] == [6]  # the streak restarts after step 3's groups
    assert found[5][0][0] == "no-signal" and guard.after_step({"step": 8}) == []  # a supervised step: no streak


def test_repetition_at_the_length_limit():
    loop = [5, 6, 7, 8] * 20
    prose = list(range(80))
    worked = [t for i in range(10) for t in (i, 42, i + 1, 43, i + 2, 44, 10 + i, 45)]  # worked steps share tokens
    assert is_repetitive(loop) and not is_repetitive(prose) and not is_repetitive(worked)
    assert not is_repetitive([1, 1, 1])  # too short to tell
    guard = Safeguards()
    assert guard.after_step({"step": 1, "repetitive_truncated_frac": 0.125}) == []
    assert guard.after_step({"step": 2, "repetitive_truncated_frac": 0.5})[0][0] == "repetition"


# ---- in a run ------------------------------------------------------------------------------------------------------


def test_no_signal_stops_a_run_with_stop_on(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    code = main(args(tiny, out, "--task", "constant-test", "--steps", "20", "--no-signal-steps", "2",
                     "--max-oversample", "1", "--stop-on", "no-signal"))
    assert code == STOPPED_EXIT_CODE
    text = capsys.readouterr().out
    assert text.count("WARNING (no-signal)") == 1 and "stopping at step 2" in text
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    [warning] = [json.loads(line) for line in (out / "warnings.jsonl").read_text().splitlines()]
    assert warning["warning"] == "no-signal" and warning["step"] == 2
    assert (out / "checkpoint-2").is_dir()  # ended like a finished run: final evaluation and checkpoint
    assert [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()] == [0, 2]


def test_without_stop_on_a_warning_is_printed_once_and_the_run_goes_on(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "constant-test", "--steps", "4", "--no-signal-steps", "2",
                     "--max-oversample", "1")) == 0
    assert capsys.readouterr().out.count("WARNING (no-signal)") == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def scripted_evaluations(monkeypatch, script: dict[int, tuple[float, float]]) -> None:
    """The trainer's evaluations give these (accuracy, the `digits` component) at each step, on 64 problems:
    held-out figures that a tiny random model cannot produce by itself (digits-test weights `digits` 0.1)."""
    original = GRPOTrainer.evaluate

    def evaluate(self, problems, label):
        result = original(self, problems, label)
        accuracy, digits = script[self.step]
        return {**result, "accuracy": accuracy, "size": 64, "components": {"correct": accuracy, "digits": digits,
                                                                            "hash": 0.5}}
    monkeypatch.setattr(GRPOTrainer, "evaluate", evaluate)


def test_best_model_is_kept_and_collapse_and_hacking_warned(tiny, tmp_path, monkeypatch, capsys):  # noqa: F811
    scripted_evaluations(monkeypatch, {0: (0.5, 0.2), 2: (0.75, 0.3), 4: (0.25, 0.9), 6: (0.6, 0.9)})
    saved = {}
    original_keep_best = GRPOTrainer.keep_best

    def keep_best(self, result):
        original_keep_best(self, result)
        saved[self.step] = self.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    monkeypatch.setattr(GRPOTrainer, "keep_best", keep_best)

    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "digits-test", "--steps", "6", "--eval-every", "2")) == 0
    text = capsys.readouterr().out
    best = json.loads((out / "best.json").read_text())
    assert best["step"] == 2 and best["accuracy"] == 0.75 and best["model"] == str(out / "best")
    model, _ = rlvr_fast.load_pretrained(out / "best")
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, saved[2])  # the model of step 2, not the last
    assert not torch.equal(saved[2], saved[6])
    warnings = [json.loads(line) for line in (out / "warnings.jsonl").read_text().splitlines()]
    assert [(w["warning"], w["step"]) for w in warnings] == [("collapse", 4), ("hacking", 4)]
    assert "'digits' rose 0.200 -> 0.900" in warnings[1]["message"]
    assert text.count("WARNING (collapse)") == 1 and "best held-out accuracy 0.750 at step 2" in text


def test_when_no_step_beats_the_start_best_names_the_starting_model(tiny, tmp_path, monkeypatch):  # noqa: F811
    scripted_evaluations(monkeypatch, {0: (0.5, 0.2), 2: (0.5, 0.2), 3: (0.25, 0.2)})
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "digits-test", "--steps", "3", "--eval-every", "2")) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["step"] == 0 and best["model"] == str(tiny.resolve()) and not (out / "best").exists()


def test_stop_on_collapse_ends_at_that_evaluation_and_resume_keeps_what_was_raised(tiny, tmp_path, monkeypatch, capsys):  # noqa: F811
    scripted_evaluations(monkeypatch, {0: (0.5, 0.2), 2: (0.75, 0.2), 4: (0.1, 0.2), 6: (0.1, 0.9)})
    out = tmp_path / "run"
    common = ["--task", "digits-test", "--eval-every", "2", "--save-every", "4"]
    assert main(args(tiny, out, *common, "--steps", "6", "--stop-on", "collapse")) == STOPPED_EXIT_CODE
    assert [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()] == [0, 2, 4]
    assert (out / "checkpoint-4").is_dir() and json.loads((out / "best.json").read_text())["step"] == 2
    capsys.readouterr()
    # Resumed: the collapse was raised before and is not raised again; the start (0.5, digits 0.2) is the saved
    # one, so step 6's digits 0.9 with accuracy 0.1 is hacking; best.json is read back.
    assert main(["--resume", str(out), "--steps", "6", "--stop-on", "hacking"]) == STOPPED_EXIT_CODE
    text = capsys.readouterr().out
    assert "WARNING (collapse)" not in text and text.count("WARNING (hacking)") == 1
    assert "best held-out accuracy 0.750 at step 2" in text
