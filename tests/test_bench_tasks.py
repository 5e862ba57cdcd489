"""bench/bench_tasks.py: its six tasks are what they say (every answer checked by solving the prompt), a user's
instruction placeholder earns no format credit on any of them, and one run goes end to end into a table row."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from rlvr_fast.tasks.jsonl import load_jsonl
from rlvr_fast.tasks.rewards import RewardSet
from tests.test_train import tiny  # noqa: F401 - the tiny checkpoint fixture

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_tasks  # noqa: E402


def solve(name: str, prompt: str) -> str:
    """The answer, worked out from the prompt's text alone."""
    numbers = [int(x) for x in re.findall(r"\d+", prompt.split(" Think briefly")[0])]
    if name == "word":
        return str(numbers[0] + numbers[1] if "more" in prompt else numbers[0] - numbers[1])
    if name == "count":
        return str(len(prompt.split(": ", 1)[1].split("?")[0].split(", ")))
    if name == "units":
        small, big = re.search(r"How many (\w+) are in \d+ (\w+)\?", prompt).groups()
        return str(numbers[0] * next(f for b, s, f in bench_tasks.UNITS if (b, s) == (big, small)))
    if name == "sort":
        return ", ".join(map(str, sorted(numbers)))
    if name == "json":
        record = json.loads(re.search(r"record: (\{.*?\})\.", prompt).group(1))
        return str(record[re.search(r'value of "(\w+)"', prompt).group(1)])
    category = re.search(r"Which of these is (an? \w+)\?", prompt).group(1)
    options = dict(re.findall(r"([ABC])\) (\w+)", prompt))
    [letter] = [k for k, w in options.items() if w in bench_tasks.CATEGORIES[category]]
    return letter


@pytest.mark.parametrize("name", list(bench_tasks.TASKS))
def test_each_task_is_what_it_says(name, tmp_path):
    path = bench_tasks.write_task(name, tmp_path)
    problems, skipped = load_jsonl(path)
    assert not skipped and len(problems) == bench_tasks.LINES
    assert len({p.meta["prompt"] for p in problems}) == bench_tasks.LINES  # distinct
    assert path.read_text() == bench_tasks.write_task(name, tmp_path / "..").read_text()  # seeded
    for p in problems:
        assert p.answer == solve(name, p.meta["prompt"]), p.meta["prompt"]
    rewards = RewardSet([bench_tasks.TASKS[name][1], "format:0.1"])
    p = problems[0]
    right = rewards(p, f"Let me see.\nThe answer is {p.answer}.")
    assert right["correct"] == 1.0 and right["format"] == 1.0
    copied = rewards(p, "The answer is N.")  # the prompt's own placeholder
    assert copied["correct"] == 0.0 and copied["format"] == 0.0
    assert rewards(p, f"The answer is {p.answer}. The answer is {p.answer}.")["format"] == 0.0


TINY_RUN = ["--steps", "2", "--max-new-tokens", "6", "--eval-size", "4", "--dtype", "float32",
            "--prompts-per-step", "2", "--group-size", "2"]


def test_a_run_gives_a_table_row(tiny, tmp_path):  # noqa: F811
    data = bench_tasks.write_task("sort", tmp_path)
    bench_tasks.run_task("sort", "trl", data, tmp_path / "run", minutes=5, extra=["--model", str(tiny), *TINY_RUN])
    row = bench_tasks.task_row("sort", "trl", tmp_path / "run")
    assert len(row) == len(bench_tasks.HEADER) and row[:2] == ["sort", "trl"]
    assert re.fullmatch(r"\d\.\d{3}", row[2]) and re.match(r"\d\.\d{3} \(step \d\)", row[3])
    assert row[4].endswith("(step 2)") and row[7].startswith("2 steps")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["lr"], config["beta"], config["temperature"]) == (1e-6, 0.0, 1.0)  # TRL's defaults
    assert (config["scale_rewards"], config["loss_type"], config["max_oversample"]) == ("group", "dapo", 1)
    assert config["reward"] == ["exact", "format:0.1"] and config["eval_size"] == 4  # --extra comes last
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-2"]  # --save-every 0


def test_a_stopped_suite_goes_on_where_it_stopped(tiny, tmp_path, capsys):  # noqa: F811
    """Finished runs are read, not run again; a run without its bench.json (killed) starts over from nothing."""
    argv = ["--tasks", "choice", "--configs", "defaults", "trl", "--out", str(tmp_path), "--no-write",
            "--extra", "--model", str(tiny), *TINY_RUN]
    bench_tasks.main(argv)
    done, killed = tmp_path / "choice-defaults", tmp_path / "choice-trl"
    first = (done / "bench.json").read_text()
    (killed / "bench.json").unlink()
    (killed / "leftover").write_text("from the killed run")
    capsys.readouterr()
    bench_tasks.main(argv)
    log = capsys.readouterr().out
    assert f"{done}: finished earlier" in log and f"{killed}: finished earlier" not in log
    assert (done / "bench.json").read_text() == first  # not run again
    assert (killed / "bench.json").exists() and not (killed / "leftover").exists()  # run again, from nothing
    assert log.count("| choice | ") >= 2  # both rows in the table
