"""`--task jsonl --data FILE.jsonl`: your prompts and answers, scored by named rewards (rewards.py).

Each line is a JSON object with `prompt` (a string, or a list of chat messages {"role", "content"}),
`answer` (a string or a number) and optionally `system` (a system message put first). Lines that
cannot be read are counted and skipped with one summary line. The last-shuffled `--eval-size`
lines (at most half the file; a fixed shuffle) are held out for evaluation, the rest train.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

from rlvr_fast.tasks.base import Problem, check_loaded
from rlvr_fast.tasks.custom import RewardTask
from rlvr_fast.tasks.rewards import RewardSet, parse_number

log = logging.getLogger("rlvr_fast")

DEFAULT_REWARDS = ("exact:1.0", "format:0.1")


class BadLine(ValueError):
    pass


def parse_line(line: str) -> Problem:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise BadLine("not JSON") from None
    if not isinstance(record, dict) or "prompt" not in record or "answer" not in record:
        raise BadLine("no 'prompt' or 'answer'")
    prompt, answer, system = record["prompt"], record["answer"], record.get("system")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise BadLine("'answer' is not a string or number")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise BadLine("'prompt' is not a string or a list of {role, content} messages")
    if system is not None:
        if not isinstance(system, str):
            raise BadLine("'system' is not a string")
        messages = [{"role": "system", "content": system}, *messages]
    meta = {"prompt": prompt} if isinstance(prompt, str) else {}
    return Problem(messages=messages, answer=str(answer), meta=meta)


def load_jsonl(path: str | Path) -> tuple[list[Problem], Counter]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file (the jsonl task reads prompts and answers from it)")
    problems, skipped = [], Counter()
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            problems.append(parse_line(line))
        except BadLine as exc:
            skipped[str(exc)] += 1
    return problems, skipped


def jsonl_task(path: str | None, rewards: tuple[str, ...] = (), eval_size: int = 32, seed: int = 1234) -> RewardTask:
    if path is None:
        raise ValueError("--task jsonl needs --data FILE.jsonl (one {\"prompt\": ..., \"answer\": ...} object a line)")
    problems, skipped = load_jsonl(path)
    check_loaded(path, len(problems), skipped, "lines")
    reward_set = RewardSet(list(rewards or DEFAULT_REWARDS))
    if "number" in reward_set.weights:
        bad = next((p.answer for p in problems if parse_number(p.answer) is None), None)
        if bad is not None:
            raise ValueError(f"--data {path}: the number reward needs numeric answers, got {bad!r}")
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    n_eval = min(eval_size, len(problems) // 2)
    log.info("--data %s: %d problems, %d held out for evaluation; rewards %s", path, len(problems), n_eval,
             ", ".join(f"{k}:{w:g}" for k, w in reward_set.weights.items()))
    return RewardTask(name="jsonl", train=[problems[i] for i in order[n_eval:]], eval=[problems[i] for i in order[:n_eval]],
                      rewards=reward_set)
