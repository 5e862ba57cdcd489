"""Reader for a local copy of the Glaive function-calling v2 data (glaiveai/glaive-function-calling-v2).

The file is a JSON list of records, each with
- `system`: "SYSTEM: You are a helpful assistant with access to the following functions. Use them
  if required -" followed by one JSON object per function definition (or a sentence saying there are none);
- `chat`: the conversation as "USER: ...", "ASSISTANT: ...", "FUNCTION RESPONSE: ..." turns.

A record becomes one single-turn function-picking example: the functions and the first user
message are the prompt; the label is the function named in the `<functioncall>` JSON of the
assistant's reply to that message, or None when that reply does not call (it answers, or asks
for missing information). Records that cannot be read this way are counted and skipped.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

TURN_RE = re.compile(r"(?:^|\n)\s*(USER|ASSISTANT|FUNCTION RESPONSE):\s?")
CALL_NAME_RE = re.compile(r"<functioncall>\s*\{\s*\"name\"\s*:\s*\"([^\"]+)\"")


@dataclass(frozen=True)
class GlaiveExample:
    system: str
    """The record's system text without its "SYSTEM:" prefix (function definitions included)."""
    functions: tuple[str, ...]
    """Names of the functions defined in the system text, in order."""
    user: str
    label: str | None
    """The function the first assistant reply calls, or None."""


class MalformedRecord(ValueError):
    pass


def function_definitions(system: str) -> list[dict]:
    """Every JSON object in the system text, in order (Glaive puts one per function after the preamble)."""
    decoder, out, i = json.JSONDecoder(), [], system.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(system, i)
        except json.JSONDecodeError as exc:
            raise MalformedRecord(f"function definition is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise MalformedRecord("function definition without a string 'name'")
        out.append(obj)
        i = system.find("{", end)
    return out


def parse_record(record: object) -> GlaiveExample:
    if not isinstance(record, dict):
        raise MalformedRecord("record is not a JSON object")
    system, chat = record.get("system"), record.get("chat")
    if not isinstance(system, str) or not isinstance(chat, str):
        raise MalformedRecord("missing 'system' or 'chat' string")
    system = system.strip().removeprefix("SYSTEM:").strip()
    names = tuple(f["name"] for f in function_definitions(system))
    parts = TURN_RE.split(chat)  # ["", role, text, role, text, ...]
    turns = [(parts[k], parts[k + 1].replace("<|endoftext|>", "").strip()) for k in range(1, len(parts) - 1, 2)]
    roles = [role for role, _ in turns]
    if "USER" not in roles:
        raise MalformedRecord("no USER turn")
    first_user = roles.index("USER")
    user = turns[first_user][1]
    reply = next((text for role, text in turns[first_user + 1:] if role == "ASSISTANT"), None)
    if not user or reply is None:
        raise MalformedRecord("no ASSISTANT reply to the first USER turn")
    label = None
    if "<functioncall>" in reply:
        match = CALL_NAME_RE.search(reply)
        if match is None:
            raise MalformedRecord("<functioncall> without a readable function name")
        label = match.group(1)
        if label not in names:
            raise MalformedRecord(f"calls {label!r}, which the system message does not define")
    return GlaiveExample(system=system, functions=names, user=user, label=label)


def load_glaive(path: str | Path) -> tuple[list[GlaiveExample], Counter]:
    """The readable examples of a Glaive JSON file, and a count of skipped records by reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--data {path}: not a JSON file ({exc}); expected a JSON list of Glaive records") from None
    if not isinstance(records, list):
        raise ValueError(f"--data {path}: expected a JSON list of records with 'system' and 'chat' fields")
    examples, skipped = [], Counter()
    for record in records:
        try:
            examples.append(parse_record(record))
        except MalformedRecord as exc:
            skipped[str(exc).split(" (")[0]] += 1
    return examples, skipped
