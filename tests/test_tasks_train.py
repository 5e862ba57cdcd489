"""Two-step training runs on a tiny random Llama for each task: function-pick (synthetic and --data),
jsonl with built-in and user rewards, a hanging user reward, and a task registered from user code."""

from __future__ import annotations

import json

import pytest

from rlvr_fast.tasks import Problem, RewardTask, register_task
from rlvr_fast.train import main, parse_config
from tests.test_tasks_function_pick import BAD, GOOD
from tests.test_tasks_jsonl import LINES, NUMERIC, write
from tests.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # The tiny tokenizer spends ~1700 tokens on a function-pick system message.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", max_position_embeddings=8192)


def args(model, output, *extra):
    return ["--model", str(model), "--output", str(output), "--prompts-per-step", "2", "--group-size", "4",
            "--max-new-tokens", "6", "--eval-size", "3", "--eval-every", "0", "--save-every", "0", "--sample-every", "1",
            "--micro-batch-tokens", "8192", "--lr", "1e-3", "--warmup-steps", "0", "--dtype", "float32", "--steps", "2",
            *extra]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_multiply(tiny, tmp_path):
    assert main(args(tiny, tmp_path / "run", "--task", "multiply")) == 0
    assert [m["step"] for m in records(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert all("by_kind" not in e for e in records(tmp_path / "run" / "eval.jsonl"))  # its problems have no kind


def test_function_pick_synthetic(tiny, tmp_path):
    out = tmp_path / "run"
    # --max-new-tokens: the tiny tokenizer spells the demonstrations in up to 124 tokens
    assert main(args(tiny, out, "--task", "function-pick", "--cold-start-steps", "2", "--max-new-tokens", "132")) == 0
    metrics = records(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:  # the confusion cells are logged per step; they partition the completions
        cells = [m[f"reward_{k}"] for k in ("called_right", "called_wrong", "called_unneeded", "missed_call",
                                               "no_call_right", "no_choice")]
        assert abs(sum(cells) - 1.0) < 1e-9 and m["reward_timeouts"] == 0
    evals = records(out / "eval.jsonl")
    assert [(e["step"], e.get("after_cold_start", False)) for e in evals] == [(0, False), (0, True), (2, False)]
    assert "no_choice" in evals[0]["components"]
    for e in evals:  # accuracy per request kind, over the problems of that kind
        kinds = e["by_kind"]
        assert set(kinds) <= {"call", "missing", "unrelated"} and sum(k["size"] for k in kinds.values()) == 3
        assert abs(sum(k["size"] * k["accuracy"] for k in kinds.values()) / 3 - e["accuracy"]) < 1e-9
    assert [r["demonstrations"] for r in records(out / "cold_start.jsonl")] == [2, 2]  # 2 problems x 1 right completion
    assert (out / "checkpoint-2").is_dir()


def test_function_pick_from_glaive_data(tiny, tmp_path):
    data = tmp_path / "glaive.json"
    data.write_text(json.dumps(GOOD + BAD))
    assert main(args(tiny, tmp_path / "run", "--task", "function-pick", "--data", str(data), "--eval-size", "1",
                     "--cold-start-steps", "1", "--max-new-tokens", "132")) == 0
    sample = records(tmp_path / "run" / "samples.jsonl")[0]
    assert sample["answer"] in ("get_current_weather", "none")


def test_jsonl_with_builtin_and_user_rewards(tiny, tmp_path):
    data = write(tmp_path / "d.jsonl", LINES)
    assert main(args(tiny, tmp_path / "a", "--task", "jsonl", "--data", data, "--eval-size", "1")) == 0
    m = records(tmp_path / "a" / "metrics.jsonl")[-1]
    assert {"reward_exact", "reward_format", "accuracy"} <= m.keys()
    data = write(tmp_path / "n.jsonl", NUMERIC)
    assert main(args(tiny, tmp_path / "b", "--task", "jsonl", "--data", data, "--eval-size", "1",
                     "--reward", "number:1", "--reward", "tests.reward_fixtures:parts:0.5")) == 0
    m = records(tmp_path / "b" / "metrics.jsonl")[-1]
    assert {"reward_number", "reward_parts", "reward_parts.short", "reward_parts.mentions_answer"} <= m.keys()
    assert m["reward_timeouts"] == 0 and m["reward_errors"] == 0
    # the saved config holds the list; --resume reads it back
    assert json.loads((tmp_path / "b" / "config.json").read_text())["reward"] == ["number:1", "tests.reward_fixtures:parts:0.5"]


def test_a_hanging_user_reward_times_out_and_training_goes_on(tiny, tmp_path):
    data = write(tmp_path / "d.jsonl", [{"prompt": f"HANG {i}", "answer": "1"} for i in range(4)])
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "jsonl", "--data", data, "--eval-size", "1", "--steps", "1",
                     "--reward", "tests.reward_fixtures:hang_on_request", "--reward-timeout", "0.5",
                     "--reward-workers", "4", "--max-oversample", "1")) == 0
    (m,) = records(out / "metrics.jsonl")
    assert m["reward_timeouts"] == 8 and m["reward_mean"] == 0.0 and m["groups_kept"] == 0
    assert [e["reward_timeouts"] for e in records(out / "eval.jsonl")] == [1, 1]


def double_reward(prompt: str, completion: str, answer: str) -> dict[str, float]:
    return {"has_digit": float(any(ch.isdigit() for ch in completion)), "length": len(completion) / 100}


def test_task_registered_from_user_code(tiny, tmp_path):
    problems = [Problem([{"role": "user", "content": f"{a} + {a}"}], str(2 * a)) for a in range(10)]
    register_task("double-test", RewardTask(name="double-test", train=problems[:8], eval=problems[8:],
                                            rewards=[("number", 1.0), (double_reward, 0.5)]),
                  defaults={"max_new_tokens": 5})
    assert parse_config(["--task", "double-test"]).max_new_tokens == 5  # the task's suggestion
    assert parse_config(["--task", "double-test", "--max-new-tokens", "7"]).max_new_tokens == 7  # typed wins
    out = tmp_path / "run"
    assert main(args(tiny, out, "--task", "double-test")) == 0
    m = records(out / "metrics.jsonl")[-1]
    assert {"reward_double_reward", "reward_double_reward.has_digit"} <= m.keys()


def test_advantage_scaling_is_dr_grpo_for_a_users_task_and_each_recipe_keeps_its_own(tmp_path):
    """The generic default was chosen on bench/bench_tasks.py's suite; multiply and function-pick keep the scaling
    their recipes (and the README's figures) were measured with, unless the user types another."""
    assert parse_config(["--task", "jsonl", "--data", "x.jsonl", "--reward", "number"]).scale_rewards == "none"
    assert parse_config(["--task", "multiply"]).scale_rewards == "group"
    assert parse_config(["--task", "function-pick"]).scale_rewards == "group"
    assert parse_config(["--task", "multiply", "--scale-rewards", "none"]).scale_rewards == "none"
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('task = "multiply"\nscale_rewards = "batch"\n')
    assert parse_config(["--config", str(cfg_file)]).scale_rewards == "batch"


def test_reward_option_in_a_config_file_and_flags_replace_it(tmp_path):
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('task = "jsonl"\nreward = ["number:1", "format:0.2"]\nmax_new_tokens = 99\n')
    cfg = parse_config(["--config", str(cfg_file)])
    assert cfg.reward == ("number:1", "format:0.2") and cfg.max_new_tokens == 99  # the file beats the task default
    assert parse_config(["--config", str(cfg_file), "--reward", "exact"]).reward == ("exact",)
    assert parse_config(["--task", "function-pick"]).output == "runs/function-pick"


def test_options_a_task_does_not_use_are_refused(tiny, tmp_path):
    with pytest.raises(SystemExit, match="--reward does not apply to --task multiply"):
        main(args(tiny, tmp_path / "a", "--task", "multiply", "--reward", "exact"))
    with pytest.raises(SystemExit, match="--data does not apply"):
        main(args(tiny, tmp_path / "b", "--task", "multiply", "--data", "x.json"))
    with pytest.raises(SystemExit, match="needs --data"):
        main(args(tiny, tmp_path / "c", "--task", "jsonl"))


def test_readme_script_runs(tiny, tmp_path):
    """The README's "task from your own code" example, as a script (its reward goes through the worker pool,
    which imports the script's module), on the tiny model."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    block = re.search(r"```python\n(# train_double.py\n.*?)```", (root / "README.md").read_text(), re.S).group(1)
    call = 'main(["--task", "double", "--steps", "20"])'
    assert call in block
    script = tmp_path / "train_double.py"
    script.write_text(block.replace(call, f'main(["--task", "double", *{args(tiny, tmp_path / "run")!r}])'))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker processes" in proc.stderr  # scored in the pool
    m = records(tmp_path / "run" / "metrics.jsonl")[-1]
    assert {"reward_number", "reward_shows_work"} <= m.keys() and m["reward_errors"] == 0


def test_multiply_cold_start_refuses_completions_shorter_than_its_demonstrations(tiny, tmp_path):
    with pytest.raises(SystemExit, match="raise --max-new-tokens to at least"):
        main(args(tiny, tmp_path / "run", "--task", "multiply", "--digits", "2", "2", "--cold-start-steps", "1"))
    assert not (tmp_path / "run").exists()
