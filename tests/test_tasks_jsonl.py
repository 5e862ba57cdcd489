"""The jsonl task: reading prompt/answer lines, malformed lines, reward choice, and the RewardTask API."""

from __future__ import annotations

import json
import logging
import random

import pytest

from rlvr_fast.tasks import Problem, RewardTask
from rlvr_fast.tasks.jsonl import jsonl_task, parse_line

LINES = [
    {"prompt": "What is 6 * 7?", "answer": "42"},
    {"prompt": [{"role": "user", "content": "Capital of France?"}], "answer": "Paris", "system": "Be brief."},
    {"prompt": "How many legs has a spider?", "answer": 8},
    {"prompt": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"}], "answer": "6"},
]
NUMERIC = [line for line in LINES if str(line["answer"]).isdigit()]
BAD_LINES = ["{not json", json.dumps({"prompt": "no answer"}), json.dumps({"answer": "1"}),
             json.dumps({"prompt": 3, "answer": "1"}), json.dumps({"prompt": [{"role": "user"}], "answer": "1"}),
             json.dumps({"prompt": "q", "answer": ["list"]}), json.dumps({"prompt": "q", "answer": "1", "system": 5})]


def write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_lines_become_chat_problems():
    a, b, c, d = (parse_line(json.dumps(line)) for line in LINES)
    assert a.messages == [{"role": "user", "content": "What is 6 * 7?"}] and a.answer == "42"
    assert b.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    assert c.answer == "8" and len(d.messages) == 3


def test_malformed_lines_are_counted_and_skipped_with_one_line(tmp_path, caplog):
    path = write(tmp_path / "data.jsonl", LINES + BAD_LINES + [""])
    with caplog.at_level(logging.WARNING, logger="rlvr_fast"):
        task = jsonl_task(path, eval_size=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"skipped {len(BAD_LINES)} of {len(LINES) + len(BAD_LINES)} lines" in warnings[0]
    assert len(task.eval_problems()) == 1 and len({p.answer for p in task.sample(random.Random(0), 60)}) == 3
    assert task.reward_weights == {"exact": 1.0, "format": 0.1} and task.scorer is None  # built-ins: in-process


def test_scores_with_the_rewards_asked_for(tmp_path):
    task = jsonl_task(write(tmp_path / "d.jsonl", NUMERIC), ("number:1", "tests.reward_fixtures:ends_with_period:0.5"))
    assert task.reward_weights == {"number": 1.0, "ends_with_period": 0.5}
    assert task.scorer is not None  # a user reward: scored in the worker pool
    problem = parse_line(json.dumps(LINES[0]))
    comps = task.score(problem, "6 * 7 = 42.")
    assert comps == {"number": 1.0, "ends_with_period": 1.0, "correct": 1.0, "format": 0.0}
    # The user's reward sees the prompt string
    assert task.rewards.entries[1][0] == "ends_with_period"


@pytest.mark.parametrize("lines,rewards,message", [
    ([{"prompt": "q", "answer": "x"}] * 3, ("number",), "numeric answers"),
    ([{"prompt": "q", "answer": "1"}], (), "need at least 2"),
    (LINES, ("tests.reward_fixtures:nope",), "no function 'nope'"),
])
def test_bad_setups_fail_before_training(tmp_path, lines, rewards, message):
    with pytest.raises(ValueError, match=message):
        jsonl_task(write(tmp_path / "d.jsonl", lines), rewards)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs --data"):
        jsonl_task(None)
    with pytest.raises(FileNotFoundError, match="no such file"):
        jsonl_task(str(tmp_path / "missing.jsonl"))


def test_reward_task_from_user_code():
    problems = [Problem([{"role": "user", "content": f"{a} + {a}"}], str(2 * a)) for a in range(10)]
    closure_weight = 0.5
    task = RewardTask(name="double", train=problems[:8], eval=problems[8:],
                      rewards=[("number", 1.0), (lambda p, c, a: closure_weight * len(c), 0.1)])
    assert task.reward_weights == {"number": 1.0, "reward1": 0.1}
    assert task.scorer is None  # a lambda cannot go to worker processes: in-process, and a warning says so
    assert task.score(problems[0], "It is 0")["number"] == 1.0
    generated = RewardTask(name="gen", train=lambda rng, n: problems[:n], eval=problems[:1], rewards=["exact"])
    assert generated.sample(random.Random(0), 3) == problems[:3]
    with pytest.raises(ValueError, match="evaluation set is empty"):
        RewardTask(name="x", train=problems, eval=[], rewards=["exact"])
