"""Function picking: decide whether to call one of the functions on show, and which.

The second experiment of the reference blog. The system message shows function definitions
(JSON schemas) and the blog's instruction (INSTRUCTION, verbatim); the user asks something. The
completion must end with `<functioncall> NAME` when a call is needed and every required
argument can be taken from the request, and with `<no_functioncall>` otherwise. The reward is
only that final choice; how the model reasons before it is free.

Problems come from a local Glaive function-calling v2 file (`--data`, see glaive.py) or, without
one, from a synthetic generator over function_catalog.py, deterministic by seed, with three kinds
of request: everything required is given (call), a required argument is missing or cannot be
derived (no call), the request has nothing to do with the functions shown (no call). Calls and
non-calls are balanced (half and half; the non-calls split evenly between the two kinds).
"""

from __future__ import annotations

import json
import logging
import random
import re
import string
from dataclasses import dataclass

from rlvr_fast.tasks.base import Problem, check_loaded
from rlvr_fast.tasks.function_catalog import CATALOGUE, SLOTS, UNRELATED, FunctionSpec

log = logging.getLogger("rlvr_fast")

INSTRUCTION = ("provide your thought process, if function call is needed and there is enough information to make the "
               "function call, return '<functioncall> name_of_the_function' at the end, otherwise return "
               "'<no_functioncall>' at the end")
PREAMBLE = "You are a helpful assistant with access to the following functions. Use them if required -"
NO_CALL = "none"
"""The answer of a problem that must not call (Problem.answer holds the function name otherwise)."""

MARKER_RE = re.compile(r"<functioncall>\s*[`'\"]?([A-Za-z_][\w.\-]*)|<no_functioncall>")
# What may follow the final choice and still count as "at the end": closing quotes, code fences, punctuation.
TRAILER_RE = re.compile(r"[\s'\"`.,;:!*)\]}>]*")

CONFUSION = ("called_right", "called_wrong", "called_unneeded", "missed_call", "no_call_right", "no_choice")
"""One of these is 1 per completion, judged on its last choice marker (wherever it is)."""


def final_choice(completion: str) -> tuple[str | None, bool]:
    """The completion's last choice (a function name, NO_CALL, or None if it makes none) and whether
    that choice ends the completion."""
    matches = list(MARKER_RE.finditer(completion))
    if not matches:
        return None, False
    last = matches[-1]
    choice = last.group(1) if last.group(1) else NO_CALL
    return choice, TRAILER_RE.fullmatch(completion, last.end()) is not None


# Graded format credit (a 135M model almost never writes a marker at first, so the exact reward alone
# gives no signal). It pays only for one real choice: a completion that chooses twice (the same or a changed
# choice) or names a function that is not on offer (the instruction's own "name_of_the_function") gets none,
# so the credit cannot be won without making a choice the check can score.
MARKER_WORD_RE = re.compile(r"functioncall", re.I)


def format_score(completion: str, offered: set[str] | None = None) -> float:
    """1: one choice marker, of an offered function (or none), ending the completion; 0.5: the same with text
    after it; 0.25: the marker's word without its form (e.g. "**no_functioncall**"); else 0."""
    markers = list(MARKER_RE.finditer(completion))
    if len(markers) > 1:
        return 0.0
    if not markers:
        return 0.25 if MARKER_WORD_RE.search(completion) else 0.0
    choice = markers[0].group(1) or NO_CALL
    if offered is not None and choice != NO_CALL and choice not in offered:
        return 0.0
    return 1.0 if TRAILER_RE.fullmatch(completion, markers[0].end()) else 0.5


def function_pick_reward(completion: str, answer: str, offered: set[str] | None = None) -> dict[str, float]:
    """correct: the completion ends with the right choice (the blog's reward: its last marker counts);
    format: graded credit for one real choice marker (format_score; `offered`: the function names on show);
    plus the confusion cell of its last choice (CONFUSION)."""
    choice, at_end = final_choice(completion)
    if choice is None:
        cell = "no_choice"
    elif answer == NO_CALL:
        cell = "no_call_right" if choice == NO_CALL else "called_unneeded"
    else:
        cell = "missed_call" if choice == NO_CALL else ("called_right" if choice == answer else "called_wrong")
    return {"correct": float(at_end and choice == answer), "format": format_score(completion, offered),
            **{name: float(name == cell) for name in CONFUSION}}


def choice_marker(choice: str) -> str:
    return "<no_functioncall>" if choice == NO_CALL else f"<functioncall> {choice}"


def checking_thought(functions: list[dict], wanted: str | None, gives_all: bool) -> str:
    """The thought of a cold-start demonstration: which function on show the request is for (`wanted`, or
    None for none of them), what that function requires, and whether the request gives all of it."""
    schema = next((f for f in functions if f["name"] == wanted), None)
    if schema is None:
        return "The user wants something that none of the functions on show does."
    required = (schema.get("parameters") or {}).get("required") or []
    if not required:
        return f"The user wants {wanted}, which needs no arguments."
    # The two verdicts differ from their first word: a small model tells them apart more easily.
    verdict = "The request gives all of that." if gives_all else "Some of that is missing from the request."
    return f"The user wants {wanted}, which needs {', '.join(required)}. {verdict}"


def system_message(functions: list[dict]) -> str:
    return "\n".join([PREAMBLE, *(json.dumps(f, indent=4) for f in functions), INSTRUCTION])


def make_problem(system: str, user: str, answer: str | None, **meta) -> Problem:
    return Problem(messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                   answer=answer or NO_CALL, meta=meta)


# ---- the synthetic generator ----------------------------------------------------------------

KINDS = ("call", "missing", "call", "unrelated")
"""Cycled by the evaluation set and by each training batch: half calls, half non-calls."""


def _fill(template: str, rng: random.Random) -> str:
    # In the template's order, not a set's: set order changes with each process's string hashing (PYTHONHASHSEED),
    # and with it the draws, so a run and its resume would see different problems.
    names = dict.fromkeys(field for _, field, _, _ in string.Formatter().parse(template) if field)
    return template.format(**{name: rng.choice(SLOTS[name]) for name in names})


def synthetic_problem(rng: random.Random, kind: str, max_functions: int = 2) -> Problem:
    """One problem of the given kind: 1..max_functions functions on show, of different topics."""
    shown = rng.sample(CATALOGUE, rng.randint(1, max_functions))
    topics = {f.topic for f in shown}
    target: FunctionSpec = shown[0]
    rng.shuffle(shown)
    if kind == "call":
        user, answer = _fill(rng.choice(target.call), rng), target.name
    elif kind == "missing":
        user, answer = _fill(rng.choice(target.missing), rng), None
    elif kind == "unrelated":
        others = [f for f in CATALOGUE if f.topic not in topics]
        # Half chit-chat, half a request another (not shown) function could serve.
        user = rng.choice(UNRELATED) if rng.random() < 0.5 else _fill(rng.choice(rng.choice(others).call), rng)
        answer = None
    else:
        raise ValueError(f"unknown request kind {kind!r}")
    return make_problem(system_message([f.schema for f in shown]), user, answer, kind=kind,
                        functions=[f.name for f in shown], wanted=None if kind == "unrelated" else target.name)


def _key(problem: Problem) -> tuple[str, str]:
    return problem.messages[0]["content"], problem.messages[1]["content"]


@dataclass(kw_only=True)
class FunctionPickTask:
    data: str | None = None
    """A Glaive function-calling v2 JSON file; None: the synthetic generator."""
    eval_size: int = 64
    format_weight: float = 0.3
    """Weight of `format` (graded marker credit). The blog rewards only the right choice (0); a small model
    needs the shaping to find the markers at all."""
    eval_seed: int = 1234
    name: str = "function-pick"

    def __post_init__(self) -> None:
        self.reward_weights = {"correct": 1.0, "format": self.format_weight}
        if self.data is None:
            rng = random.Random(self.eval_seed)
            self._eval = [synthetic_problem(rng, KINDS[i % len(KINDS)]) for i in range(self.eval_size)]
            self._held_out = {_key(p) for p in self._eval}
            self._train = None
        else:
            self._eval, self._train = self._load(self.data)

    def _load(self, path: str) -> tuple[list[Problem], list[Problem]]:
        from rlvr_fast.tasks.glaive import load_glaive
        examples, skipped = load_glaive(path)
        check_loaded(path, len(examples), skipped, "records")
        problems = [make_problem(f"{e.system}\n{INSTRUCTION}", e.user, e.label, functions=list(e.functions))
                    for e in examples]
        order = list(range(len(problems)))
        random.Random(self.eval_seed).shuffle(order)
        n_eval = min(self.eval_size, len(problems) // 2)  # at least half stays for training
        calls = sum(p.answer != NO_CALL for p in problems)
        log.info("--data %s: %d examples (%d call, %d no call), %d held out for evaluation", path, len(problems),
                 calls, len(problems) - calls, n_eval)
        return [problems[i] for i in order[:n_eval]], [problems[i] for i in order[n_eval:]]

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        if self._train is not None:
            return [rng.choice(self._train) for _ in range(n)]
        # Stratified: each batch cycles through KINDS from a random start, so a step's calls and non-calls are
        # as balanced as its size allows. Otherwise a step with more of one kind pushes the whole policy towards
        # calling (or not), and those swings, larger than the signal about *when* to call, make it collapse.
        start, problems = rng.randrange(len(KINDS)), []
        for i in range(n):
            kind = KINDS[(start + i) % len(KINDS)]
            while _key(p := synthetic_problem(rng, kind)) in self._held_out:
                pass
            problems.append(p)
        rng.shuffle(problems)
        return problems

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def demonstrations(self, rng: random.Random, n: int) -> list[tuple[Problem, list[str]]]:
        """Cold-start demonstrations (--cold-start-steps), as DeepSeek-R1's cold start: n training problems,
        each with one right completion, a short check of the request (`checking_thought`) and then the choice
        that follows from it. The synthetic generator knows each request's kind; a Glaive record only whether
        it calls, so its non-calls get one thought that covers both reasons not to call."""
        from rlvr_fast.tasks.glaive import function_definitions
        out = []
        for problem in self.sample(rng, n):
            functions = function_definitions(problem.messages[0]["content"])
            if problem.answer != NO_CALL:
                thought = checking_thought(functions, problem.answer, gives_all=True)
            elif problem.meta.get("kind") in ("missing", "unrelated"):
                thought = checking_thought(functions, problem.meta["wanted"], gives_all=False)
            else:
                thought = "None of the functions on show can be called with what the request gives."
            out.append((problem, [thought + "\n" + choice_marker(problem.answer)]))
        return out

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        return function_pick_reward(completion, problem.answer, set(problem.meta["functions"]))
