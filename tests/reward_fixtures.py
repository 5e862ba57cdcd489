"""User rewards for the tests, loaded by module path (`--reward tests.reward_fixtures:NAME`) like a user's own."""

from __future__ import annotations

import os
import time


def ends_with_period(prompt: str, completion: str, answer: str) -> float:
    return float(completion.rstrip().endswith("."))


def parts(prompt: str, completion: str, answer: str) -> dict[str, float]:
    return {"mentions_answer": float(answer in completion), "short": float(len(completion) < 20)}


def hang_on_request(prompt: str, completion: str, answer: str) -> float:
    if "HANG" in prompt:
        time.sleep(3600)
    return 1.0


def slow(prompt: str, completion: str, answer: str) -> float:
    time.sleep(0.5)
    return 1.0


def boom(prompt: str, completion: str, answer: str) -> float:
    raise RuntimeError("bug in the user's reward")


def die(prompt: str, completion: str, answer: str) -> float:
    os._exit(3)


def not_a_number(prompt: str, completion: str, answer: str) -> str:
    return "yes"
