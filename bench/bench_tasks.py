"""A user's own task, with the defaults: does GRPO help, or at least do no harm, on tasks it was not tuned on?

    python bench/bench_tasks.py                              # six tasks x (our defaults, TRL's defaults)
    python bench/bench_tasks.py --tasks sort json --configs defaults --minutes 5
    python bench/bench_tasks.py --write-data DIR             # only write the JSONL files (to try by hand)

Each task is a JSONL file of a few hundred short verifiable problems that this script writes (seeded), run as a
new user would: `python -m rlvr_fast.train --task jsonl --data FILE --reward R --reward format:0.1` with every
other option at its default, for at most --minutes of steps (--max-train-minutes). The prompts end with the
instruction a user would write ("End with 'The answer is N.'"), placeholder and all: format credit must not be
won by copying it. Configurations:

- defaults: ours, as `python -m rlvr_fast.train --help` lists them (advantages not divided by the group's std,
  Dr. GRPO's choice, since this suite showed what the std does to a 0.1 format credit: docs/user-task-defaults.md);
- trl: TRL 1.16 GRPOConfig's defaults where they differ from ours in kind: learning rate 1e-6, no KL term
  (beta 0), temperature 1.0, advantages divided by the group's std, the DAPO token-level loss, and no dynamic
  sampling (one round of prompts per step).

The table (appended to bench/RESULTS.md) gives per task and configuration: held-out accuracy before, at the best
evaluation (OUTPUT/best.json), and at the end (the last checkpoint, which is what the run leaves), the change,
the warnings raised (rlvr_fast/grpo/safeguards.py: collapse, hacking, repetition, no-signal), and the wall time
of the whole command. Each run's exit code and wall time are kept in OUT/NAME-CONFIG/bench.json: a suite that was
stopped (or ran out of disk) goes on where it stopped when run again with the same --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import markdown_table, publish, read_jsonl, timed  # noqa: E402

from rlvr_fast.grpo.safeguards import STOPPED_EXIT_CODE  # noqa: E402

FINISHED = (0, STOPPED_EXIT_CODE)  # exit codes of a run that finished (3: ended by --stop-on)

INSTRUCTION = "Think briefly, then end with 'The answer is N.'"
LINES = 300
EVAL_SIZE = 64

# ---- the tasks: (prompt, answer) generators ------------------------------------------------------------------------

NAMES = ["Sam", "Ana", "Lee", "Maya", "Omar", "Kim", "Ravi", "Zoe"]
THINGS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells"]


def word_problem(rng: random.Random) -> tuple[str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    if rng.random() < 0.5:
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have left?", str(a - b)


WORDS = ["red", "cat", "tree", "lamp", "blue", "fish", "door", "moon", "sand", "ship", "rain", "milk"]


def counting(rng: random.Random) -> tuple[str, str]:
    items = rng.sample(WORDS, rng.randint(2, 7))
    return f"How many words are in this list: {', '.join(items)}?", str(len(items))


UNITS = [("kilometers", "meters", 1000), ("hours", "minutes", 60), ("kilograms", "grams", 1000),
         ("meters", "centimeters", 100), ("minutes", "seconds", 60), ("days", "hours", 24)]


def unit_conversion(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 80)
    return f"How many {small} are in {n} {big}?", str(n * factor)


def sorting(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 50), rng.randint(3, 5))
    return (f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}. Give them separated by "
            "commas.", ", ".join(map(str, sorted(numbers))))


CITIES = ["Lima", "Oslo", "Cairo", "Quito", "Accra", "Hanoi", "Perth", "Dakar", "Riga", "Porto"]
COLORS = ["green", "orange", "purple", "yellow", "silver", "black"]


def json_field(rng: random.Random) -> tuple[str, str]:
    record = {"name": rng.choice(NAMES), "city": rng.choice(CITIES), "age": rng.randint(18, 80),
              "color": rng.choice(COLORS)}
    key = rng.choice(list(record))
    return f"Here is a record: {json.dumps(record)}. What is the value of \"{key}\"?", str(record[key])


CATEGORIES = {"an animal": ["horse", "rabbit", "eagle", "tiger", "whale"],
              "a fruit": ["banana", "cherry", "mango", "grape", "peach"],
              "a tool": ["hammer", "wrench", "saw", "drill", "shovel"],
              "a color": ["red", "green", "blue", "violet", "brown"]}


def choice(rng: random.Random) -> tuple[str, str]:
    category = rng.choice(list(CATEGORIES))
    right = rng.choice(CATEGORIES[category])
    others = [rng.choice(CATEGORIES[c]) for c in rng.sample([c for c in CATEGORIES if c != category], 2)]
    options = [right, *others]
    rng.shuffle(options)
    letters = "ABC"
    listed = " ".join(f"{letters[i]}) {w}" for i, w in enumerate(options))
    return f"Which of these is {category}? {listed}. Answer with the letter.", letters[options.index(right)]


# name -> (generator, correctness reward)
TASKS: dict[str, tuple[Callable[[random.Random], tuple[str, str]], str]] = {
    "word": (word_problem, "number"), "count": (counting, "number"), "units": (unit_conversion, "number"),
    "sort": (sorting, "exact"), "json": (json_field, "exact"), "choice": (choice, "exact"),
}

CONFIGS: dict[str, list[str]] = {
    "defaults": [],
    "trl": ["--lr", "1e-6", "--beta", "0", "--temperature", "1.0", "--scale-rewards", "group", "--loss-type", "dapo",
            "--max-oversample", "1"],
}


def write_task(name: str, directory: Path, lines: int = LINES, seed: int = 0) -> Path:
    """The task's JSONL file: `lines` distinct problems, each prompt followed by the instruction."""
    generate, _ = TASKS[name]
    rng, seen, records = random.Random(f"{name}-{seed}"), set(), []
    for _ in range(100 * lines):
        prompt, answer = generate(rng)
        if prompt not in seen:
            seen.add(prompt)
            records.append({"prompt": f"{prompt} {INSTRUCTION}", "answer": answer})
        if len(records) == lines:
            break
    else:
        raise ValueError(f"task {name}: only {len(records)} distinct problems, {lines} asked for")
    path = directory / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_task(name: str, config: str, data: Path, out: Path, minutes: float, extra: list[str]) -> None:
    """One run, as a user would type it; its exit code and wall time go to OUT/bench.json (written last, so a run
    that was killed has none and is run again by the next invocation)."""
    _, reward = TASKS[name]
    cmd = [sys.executable, "-m", "rlvr_fast.train", "--task", "jsonl", "--data", str(data), "--reward", reward,
           "--reward", "format:0.1", "--eval-size", str(EVAL_SIZE), "--max-train-minutes", str(minutes),
           "--save-every", "0", *CONFIGS[config], *extra, "--output", str(out)]
    print("running:", " ".join(cmd), flush=True)
    seconds: list[float] = []
    with timed(seconds):
        code = subprocess.run(cmd).returncode
    (out / "bench.json").write_text(json.dumps({"command": cmd, "exit": code, "seconds": seconds[0]}))


def finished(out: Path) -> bool:
    """A run this bench completed."""
    record = out / "bench.json"
    return record.exists() and json.loads(record.read_text())["exit"] in FINISHED


def task_row(name: str, config: str, out: Path) -> list[str]:
    record = json.loads((out / "bench.json").read_text())
    code, minutes = record["exit"], record["seconds"] / 60
    evals = [e for e in read_jsonl(out / "eval.jsonl") if e["set"] == "target"]
    if code not in FINISHED or not evals:
        return [name, config, f"failed (exit {code})", "", "", "", "", f"{minutes:.1f} min"]
    before, after = evals[0], evals[-1]
    best = json.loads((out / "best.json").read_text()) if (out / "best.json").exists() else None
    warnings = [w["warning"] for w in read_jsonl(out / "warnings.jsonl")]
    steps = len(read_jsonl(out / "metrics.jsonl"))
    return [name, config, f"{before['accuracy']:.3f}",
            f"{best['accuracy']:.3f} (step {best['step']})" if best else "-",
            f"{after['accuracy']:.3f} (step {after['step']})", f"{after['accuracy'] - before['accuracy']:+.3f}",
            ", ".join(warnings) or "none", f"{steps} steps, {minutes:.1f} min"]


HEADER = ["task", "configuration", "before", "best (best.json)", "after (last checkpoint)", "change", "warnings",
          "steps, wall time"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--minutes", type=float, default=8.0, help="--max-train-minutes of each run (default 8: with the "
                   "model load and the evaluations, a task takes about 10 min on a 2-core CPU)")
    p.add_argument("--out", type=Path, default=None, help="where the data and runs go (default: a temporary directory)")
    p.add_argument("--write-data", type=Path, default=None, help="only write the tasks' JSONL files here")
    p.add_argument("--no-write", action="store_true", help="print the table, do not record it in RESULTS.md")
    p.add_argument("--rerun", action="store_true", help="run again the runs that OUT already holds finished "
                   "(by default they are read, so a suite that was stopped goes on where it stopped)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="options added to every run (last)")
    a = p.parse_args(argv)
    if a.write_data is not None:
        a.write_data.mkdir(parents=True, exist_ok=True)
        for name in a.tasks:
            print(write_task(name, a.write_data))
        return
    out = a.out or Path(tempfile.mkdtemp(prefix="bench_tasks_"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.tasks:
        data = write_task(name, out)
        for config in a.configs:
            run = out / f"{name}-{config}"
            if finished(run) and not a.rerun:
                print(f"{run}: finished earlier, read as it is (--rerun runs it again)", flush=True)
            else:
                shutil.rmtree(run, ignore_errors=True)  # a killed or failed run starts over, it does not resume
                run_task(name, config, data, run, a.minutes, a.extra)
            rows.append(task_row(name, config, run))
            print(markdown_table(HEADER, rows), flush=True)
    extra = f" {' '.join(a.extra)}" if a.extra else ""
    method = (f"{LINES} problems per task, {EVAL_SIZE} held out (greedy); `--task jsonl --data FILE --reward R --reward "
              f"format:0.1 --eval-size {EVAL_SIZE} --max-train-minutes {a.minutes:g} --save-every 0{extra}`, every other "
              "option at its default (--save-every 0: one checkpoint, at the end); trl: " + " ".join(CONFIGS["trl"])
              + f"; runs in {out}; {os.cpu_count()} cores")
    publish("A user's own task: the defaults on six small tasks (bench_tasks)", markdown_table(HEADER, rows), "cpu",
            write=not a.no_write, method=method)


if __name__ == "__main__":
    main()
