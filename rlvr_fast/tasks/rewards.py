"""Named rewards for tasks with free-form answers, and the `--reward` specs that pick them.

Every reward has the signature `reward(prompt: str, completion: str, answer: str) -> float | dict[str, float]`
(a dict gives named components; their sum is the reward). Built in:

- `exact`: the extracted final answer equals `answer` after normalisation;
- `number`: the final number equals `answer` numerically;
- `format`: the completion states its final answer once, and that answer is a real one: a number when
  the answer is a number (or the run's correctness reward is `number`), a list of as many items when the
  answer is a comma-separated list, otherwise non-empty and not a placeholder (`N`, `X`, `<answer>`,
  `...`, or the value the prompt's own instruction shows). A reply that states no answer, two answers
  (the same or different) or an empty one gets 0: format credit alone must never pay for "The answer
  is N." copied from the instruction, or for a repeated line.

Extraction of the final answer, first that applies: the last `\\boxed{...}` (nested braces
allowed), the last `#### X` line, the last "answer is X" / "answer: X", else the last non-empty
line ("answer is X" takes X up to the end of its sentence or line). Normalisation: strip,
case-fold, collapse runs of whitespace to one space, drop trailing punctuation (. , ; : ! ?).
`number` reads the first number of an explicit answer (boxed, ####, "answer is") if it has one,
else the last number of the completion; "1,234" is 1234; equal within a relative 1e-6.

A spec is `NAME[:WEIGHT]` for a built-in, or `package.module:function[:WEIGHT]` /
`path/to/file.py:function[:WEIGHT]` for a user's function (imported in the reward worker processes).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlvr_fast.tasks.base import Problem

RewardFn = Callable[[str, str, str], Any]

HASH_RE = re.compile(r"####\s*([^\n]*)")
# "answer is X" / "answer: X", X up to the end of its sentence (a dot then a space or the end) or line.
ANSWER_IS_RE = re.compile(r"answer(?:\s+is|\s*:)\s*:?\s*([^\n]+?)(?=\.\s|\.?$|\n)", re.I | re.M)
ANSWER_KEY_RE = re.compile(r"answer(?:\s+is|\s*:)", re.I)
NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
TRAILING_PUNCT = ".,;:!?"


def boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every closed \\boxed{...} in the text, braces balanced."""
    spans, start = [], text.find("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                spans.append((start, j + 1, text[i + 1:j]))
                break
        start = text.find("\\boxed{", start + 1)
    return spans


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced; None if there is none (or it is unclosed)."""
    spans = boxed_spans(text)
    return spans[-1][2] if spans else None


def explicit_answer(completion: str) -> str | None:
    """The answer the completion states explicitly (boxed, ####, "answer is"), or None."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    for pattern in (HASH_RE, ANSWER_IS_RE):
        matches = pattern.findall(completion)
        if matches:
            return matches[-1]
    return None


def extract_answer(completion: str) -> str:
    explicit = explicit_answer(completion)
    if explicit is not None:
        return explicit
    lines = [line for line in completion.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalize(text: str) -> str:
    return " ".join(text.split()).casefold().rstrip(TRAILING_PUNCT).strip()


def parse_number(text: str, first: bool = False) -> float | None:
    """The last (or first) number in the text, or None."""
    numbers = NUMBER_RE.findall(text)
    return float(numbers[0 if first else -1].replace(",", "")) if numbers else None


def exact(prompt: str, completion: str, answer: str) -> float:
    return float(normalize(extract_answer(completion)) == normalize(answer))


def number(prompt: str, completion: str, answer: str) -> float:
    explicit = explicit_answer(completion)
    got = parse_number(explicit, first=True) if explicit is not None else None
    if got is None:
        got = parse_number(completion)
    want = parse_number(answer)
    if want is None:
        raise ValueError(f"the number reward needs a numeric answer, got {answer!r}")
    return float(got is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9))


def answer_statements(text: str) -> list[str]:
    """Every explicit answer the text states (boxed, ####, "answer is"), in order. Statements whose spans
    overlap count once, with the innermost value ("The answer is \\boxed{7}." is one statement, 7)."""
    # Each "answer is" / "answer:" states one answer, its value cut where the next one begins ("The answer is
    # The answer is ..." states two, though ANSWER_IS_RE reads it as one answer whose value is the rest).
    keys = [m.start() for m in ANSWER_KEY_RE.finditer(text)] + [len(text)]
    said = [(k, min(m.end(), nxt), m.group(1)[:nxt - m.start(1)]) if (m := ANSWER_IS_RE.match(text, k)) else (k, nxt, "")
            for k, nxt in zip(keys, keys[1:])]
    spans = boxed_spans(text) + said + [(m.start(), m.end(), m.group(1)) for m in HASH_RE.finditer(text)]
    statements: list[tuple[int, int, str]] = []
    for begin, end, value in sorted(spans, key=lambda span: (span[0], -span[1])):
        if statements and begin < statements[-1][1]:  # inside the previous statement: its value is the inner one
            statements[-1] = (statements[-1][0], max(statements[-1][1], end), value)
        else:
            statements.append((begin, end, value))
    return [value for _, _, value in statements]


PLACEHOLDERS = {"n", "x", "y", "answer", "your answer", "the answer", "final answer", "number", "result", "value",
                "...", "…", "?", "??", "???"}
BRACKETED_RE = re.compile(r"[<\[{(][^<>\[\]{}()]*[>\]})]")


def is_placeholder(value: str, prompt: str, answer: str) -> bool:
    """A stated answer that is no answer: empty, a template word or bracketed slot, or a copy of the value the
    prompt's own instruction states ("End with 'The answer is N.'") -- unless it is the label itself."""
    v = _bare(value)
    if v == _bare(answer):
        return False
    if not v or v in PLACEHOLDERS or BRACKETED_RE.fullmatch(v) or not any(ch.isalnum() for ch in v):
        return True
    return any(_bare(shown) == v for shown in answer_statements(prompt))


def _bare(text: str) -> str:
    """normalize, then without the quotes an instruction puts around its template ("... is N.'")."""
    return normalize(normalize(text).strip("'\"`"))


def is_number(text: str) -> bool:
    return NUMBER_RE.fullmatch(normalize(text).replace(" ", "")) is not None


def list_shape(text: str) -> tuple[bool, ...] | None:
    """A comma-separated list's shape (for each item: is it a number), or None for a single value."""
    items = [item.strip() for item in normalize(text).split(",")]
    if len(items) < 2 or not all(items):
        return None
    return tuple(is_number(item) for item in items)


def format_credit(prompt: str, completion: str, answer: str, expect_number: bool = False) -> float:
    """1 when the completion states exactly one final answer of the kind expected, else 0. The kind: a number
    when `expect_number` or the label is a number; when the label is a list ("3, 7, 9"), a list of as many
    items, numbers where its items are numbers; else any text that is not a placeholder."""
    statements = answer_statements(completion)
    if len(statements) != 1:
        return 0.0  # none, or repeated (the same value or different ones)
    value = statements[0]
    if expect_number or is_number(answer):
        return float(parse_number(value) is not None)
    shape = list_shape(answer)
    if shape is not None and list_shape(value) != shape:
        return 0.0  # one number where a sorted list of five is asked for is not an answer of that kind
    return float(not is_placeholder(value, prompt, answer))


def format(prompt: str, completion: str, answer: str) -> float:  # noqa: A001 - the reward's public name
    return format_credit(prompt, completion, answer)


def number_format(prompt: str, completion: str, answer: str) -> float:
    """`format` beside the `number` reward: the one stated answer must hold a number."""
    return format_credit(prompt, completion, answer, expect_number=True)


BUILTIN: dict[str, RewardFn] = {"exact": exact, "number": number, "format": format}


# ---- specs and loading -------------------------------------------------------------------------

@dataclass(frozen=True)
class RewardSpec:
    name: str
    """Component name in the metrics: the built-in's name, or the user function's name."""
    target: str
    """A built-in name, "package.module:function" or "path/file.py:function"."""
    weight: float = 1.0

    @property
    def builtin(self) -> bool:
        return self.target in BUILTIN


def parse_reward_spec(spec: str) -> RewardSpec:
    parts = spec.strip().split(":")
    weight = 1.0
    if len(parts) > 1:
        try:
            weight = float(parts[-1])
            parts = parts[:-1]
        except ValueError:
            pass  # "module:function" without a weight
    if len(parts) == 1:
        if parts[0] not in BUILTIN:
            raise ValueError(f"--reward {spec!r}: unknown reward {parts[0]!r}; built-ins are {', '.join(BUILTIN)}, "
                             "or give your own as package.module:function (or path/to/file.py:function)")
        return RewardSpec(parts[0], parts[0], weight)
    if len(parts) != 2 or not parts[0] or not parts[1].isidentifier():
        raise ValueError(f"--reward {spec!r}: expected NAME[:WEIGHT] or package.module:function[:WEIGHT]")
    return RewardSpec(parts[1], f"{parts[0]}:{parts[1]}", weight)


def load_reward(target: str) -> RewardFn:
    """The function a spec's target names; errors say what is wrong and what to give instead."""
    if target in BUILTIN:
        return BUILTIN[target]
    module_name, function = target.split(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"--reward {target}: no such file {path}")
        spec = importlib.util.spec_from_file_location(f"rlvr_fast_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"--reward {target}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ValueError(f"--reward {target}: {module_name} has no function {function!r}")
    return fn


def prompt_text(problem: Problem) -> str:
    """What a reward sees as the prompt: the user's prompt string (for a chat, the last user message)."""
    if "prompt" in problem.meta:
        return problem.meta["prompt"]
    user = [m["content"] for m in problem.messages if m["role"] == "user"]
    return user[-1] if user else ""


class RewardSet:
    """Several weighted rewards scored together into components (picklable: the reward workers get a copy).

    Components: one per reward (its value, or for a dict the sum of its parts) weighted by the spec;
    `NAME.PART` for each part of a dict reward, `correct` (a copy of the first reward's value: the
    run's accuracy) and `format` (if not asked for) with weight 0, for the metrics.
    """

    def __init__(self, rewards: list[RewardSpec | tuple[RewardFn, float] | RewardFn | str]):
        self.entries: list[tuple[str, RewardSpec | RewardFn, float]] = []
        for i, r in enumerate(rewards):
            if isinstance(r, str):
                r = parse_reward_spec(r)
            if isinstance(r, RewardSpec):
                self.entries.append((r.name, r, r.weight))
                continue
            fn, weight = r if isinstance(r, tuple) else (r, 1.0)
            if not callable(fn):
                raise ValueError(f"reward {i}: {fn!r} is not callable (give a function, (function, weight) or a spec string)")
            name = getattr(fn, "__name__", "")
            self.entries.append((name if name.isidentifier() else f"reward{i}", fn, float(weight)))  # a lambda: reward{i}
        if not self.entries:
            raise ValueError("no reward given")
        names = [name for name, _, _ in self.entries]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"reward {', '.join(dup)} given twice; give each reward once, with its weight")
        self.weights = {name: weight for name, _, weight in self.entries}
        self._fns: dict[str, RewardFn] | None = None

    @property
    def needs_pool(self) -> bool:
        """True when any reward is the user's (it may be slow or hang: run it in the worker pool)."""
        return any(not (isinstance(r, RewardSpec) and r.builtin) for _, r, _ in self.entries)

    @property
    def format_fn(self) -> RewardFn:
        """The format check that fits the correctness reward (the first): a number beside `number`."""
        first = self.entries[0][1]
        return number_format if isinstance(first, RewardSpec) and first.target == "number" else format

    def prepare(self) -> None:
        """Import every reward now (the workers do this before their first call, off the clock)."""
        if self._fns is None:
            self._fns = {name: load_reward(r.target) if isinstance(r, RewardSpec) else r for name, r, _ in self.entries}
            for name, r, _ in self.entries:
                if isinstance(r, RewardSpec) and r.target == "format":
                    self._fns[name] = self.format_fn

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fns": None}  # user functions loaded from files are re-imported in the worker

    def __call__(self, problem: Problem, completion: str) -> dict[str, float]:
        self.prepare()
        prompt, out = prompt_text(problem), {}
        for name, _, _ in self.entries:
            value = self._fns[name](prompt, completion, problem.answer)
            if isinstance(value, dict):
                parts = {f"{name}.{k}": _number(v, f"reward {name}, part {k!r}") for k, v in value.items()}
                out.update(parts)
                out[name] = sum(parts.values())
            else:
                out[name] = _number(value, f"reward {name}")
        out["correct"] = out.get("correct", out[self.entries[0][0]])
        out.setdefault("format", self.format_fn(prompt, completion, problem.answer))
        return out


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} returned {type(value).__name__} {value!r}; a reward returns a float or a dict of floats")
    return float(value)
