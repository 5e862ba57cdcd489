"""Function picking: the reward on hand-written completions (the blog's two included), the synthetic
generator, and the Glaive parser on fixtures written here in that format (malformed records included)."""

from __future__ import annotations

import json
import logging
import random

import pytest

from rlvr_fast.tasks.function_catalog import CATALOGUE, SLOTS
from rlvr_fast.tasks.function_pick import (CONFUSION, INSTRUCTION, KINDS, NO_CALL, FunctionPickTask, _fill, final_choice,
                                           function_pick_reward, synthetic_problem)
from rlvr_fast.tasks.glaive import load_glaive, parse_record

# The blog's example, before training: it reasons its way to calling calculate_distance although the
# user gave city names, not the coordinates the function requires. Wrong: the answer is no call.
BLOG_BEFORE = """First, we need to convert the city names into geographic coordinates. For New York, we'll use approximately 40.7128° N latitude and 74.0060° W longitude. For Los Angeles, we'll use approximately 34.0522° N latitude and 118.2437° W longitude.

Now, with these coordinates, we can call the relevant function to calculate the distance:
python
start_coordinates = {"latitude": 40.7128, "longitude": -74.0060}
end_coordinates = {"latitude": 34.0522, "longitude": -118.2437}


Since we have all the required parameters to make the function call, I can call the function as follows:
python
'<functioncall> calculate_distance'


However, since this is a textual description, I won't actually execute the function but will state it clearly. If this were a code execution scenario, the call to the `calculate_distance` function would be made with these specified start and end coordinates. But here, the final answer is:
python
'calculate_distance'
"""
# ... and after training: short, and right.
BLOG_AFTER = "To calculate the distance between New York and Los Angeles, I need their geographic coordinates. \n\n<no_functioncall>"

CASES = [
    # (completion, answer, correct, format, confusion cell)
    (BLOG_BEFORE, NO_CALL, 0.0, 0.5, "called_unneeded"),
    (BLOG_AFTER, NO_CALL, 1.0, 1.0, "no_call_right"),
    ("The user gave the city.\n<functioncall> get_current_weather", "get_current_weather", 1.0, 1.0, "called_right"),
    ("'<functioncall> get_current_weather'", "get_current_weather", 1.0, 1.0, "called_right"),  # quoted, as instructed
    ("<functioncall> `get_current_weather`.", "get_current_weather", 1.0, 1.0, "called_right"),
    ("<functioncall> get_stock_price", "get_current_weather", 0.0, 1.0, "called_wrong"),
    ("Not enough information.\n<no_functioncall>", "get_current_weather", 0.0, 1.0, "missed_call"),
    ("<functioncall> get_current_weather", NO_CALL, 0.0, 1.0, "called_unneeded"),
    # The right choice, but not at the end: the blog's reward checks the end.
    ("<no_functioncall>\nLet me know if you need anything else.", NO_CALL, 0.0, 0.5, "no_call_right"),
    # The last choice counts.
    # ... and two choices (a changed mind, or the same one twice) get no format credit.
    ("<functioncall> get_stock_price ... no, wait.\n<no_functioncall>", NO_CALL, 1.0, 0.0, "no_call_right"),
    ("<no_functioncall>\n<no_functioncall>", NO_CALL, 1.0, 0.0, "no_call_right"),
    ("**no_functioncall**", NO_CALL, 0.0, 0.25, "no_choice"),  # the word without its brackets: graded credit only
    ("The weather in Paris is sunny.", NO_CALL, 0.0, 0.0, "no_choice"),
    ("", "get_current_weather", 0.0, 0.0, "no_choice"),
]


@pytest.mark.parametrize("completion,answer,correct,fmt,cell", CASES)
def test_function_pick_reward_table(completion, answer, correct, fmt, cell):
    r = function_pick_reward(completion, answer)
    assert (r["correct"], r["format"]) == (correct, fmt)
    assert {name for name in CONFUSION if r[name] == 1.0} == {cell} and sum(r[name] for name in CONFUSION) == 1.0


def test_format_credit_only_for_a_function_on_offer():
    """The instruction's own "<functioncall> name_of_the_function", copied, wins no format credit; an offered
    name, right or wrong, does (the task reads the names from the problem's system message)."""
    task = FunctionPickTask(eval_size=4)
    problem = next(p for p in task.eval_problems() if p.answer != NO_CALL)
    other = next(name for name in problem.meta["functions"] if name != problem.answer) \
        if len(problem.meta["functions"]) > 1 else None
    assert "name_of_the_function" in INSTRUCTION
    assert task.score(problem, "I will call it.\n<functioncall> name_of_the_function")["format"] == 0.0
    assert task.score(problem, f"<functioncall> {problem.answer}") == {
        **function_pick_reward(f"<functioncall> {problem.answer}", problem.answer), "format": 1.0, "correct": 1.0}
    if other:
        assert task.score(problem, f"<functioncall> {other}")["format"] == 1.0
    assert task.score(problem, "<no_functioncall>")["format"] == 1.0


def test_final_choice():
    assert final_choice(BLOG_BEFORE) == ("calculate_distance", False)
    assert final_choice(BLOG_AFTER) == (NO_CALL, True)
    assert final_choice("nothing") == (None, False)


# ---- the synthetic generator ---------------------------------------------------------------------

def test_catalogue_has_30_varied_schemas_whose_requests_fill():
    assert len(CATALOGUE) >= 30
    types = {p.get("type") for f in CATALOGUE for p in f.schema["parameters"]["properties"].values()}
    assert {"string", "number", "integer", "boolean", "array", "object"} <= types
    assert any("enum" in p for f in CATALOGUE for p in f.schema["parameters"]["properties"].values())
    rng = random.Random(0)
    for f in CATALOGUE:
        assert f.call and f.missing, f.name
        assert set(f.schema["parameters"]["required"]) <= set(f.schema["parameters"]["properties"]), f.name
        for template in f.call + f.missing:  # every slot has values (a KeyError otherwise)
            assert "{" not in _fill(template, rng), template


def test_prompt_shows_schemas_then_the_instruction_verbatim():
    p = synthetic_problem(random.Random(3), "call")
    system, user = p.messages[0]["content"], p.messages[1]["content"]
    assert [m["role"] for m in p.messages] == ["system", "user"]
    assert system.endswith("\n" + INSTRUCTION)
    assert INSTRUCTION == ("provide your thought process, if function call is needed and there is enough information to "
                           "make the function call, return '<functioncall> name_of_the_function' at the end, otherwise "
                           "return '<no_functioncall>' at the end")
    shown = p.meta["functions"]
    assert p.answer in shown and all(f'"name": "{name}"' in system for name in shown)
    json.loads(system[system.index("{"):system.index("\n}") + 2])  # the schemas are real JSON


def test_generator_is_deterministic_balanced_and_holds_out_its_eval_set():
    task = FunctionPickTask(eval_size=64)
    assert [p.messages for p in FunctionPickTask(eval_size=64).eval_problems()] == [p.messages for p in task.eval_problems()]
    kinds = [p.meta["kind"] for p in task.eval_problems()]
    assert kinds.count("call") == 32 and kinds.count("missing") == 16 and kinds.count("unrelated") == 16
    a, b = task.sample(random.Random(5), 200), task.sample(random.Random(5), 200)
    assert [p.messages for p in a] == [p.messages for p in b]
    for n in (4, 8, 6):  # every batch is balanced: as many calls as non-calls (stratified over KINDS)
        for seed in range(5):
            batch = task.sample(random.Random(seed), n)
            assert sum(p.answer != NO_CALL for p in batch) == n // 2
    kinds = [p.meta["kind"] for p in task.sample(random.Random(2), 8)]
    assert kinds.count("call") == 4 and kinds.count("missing") == 2 and kinds.count("unrelated") == 2
    held = {(p.messages[0]["content"], p.messages[1]["content"]) for p in task.eval_problems()}
    assert not held & {(p.messages[0]["content"], p.messages[1]["content"]) for p in task.sample(random.Random(1), 2000)}


def test_generator_is_the_same_in_every_process():
    """The draws do not depend on a process's string hashing (PYTHONHASHSEED), e.g. a run and its resume."""
    import subprocess
    import sys
    code = ("import random; from rlvr_fast.tasks.function_pick import FunctionPickTask; "
            "print([p.messages for p in FunctionPickTask(eval_size=4).sample(random.Random(0), 64)])")
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert out[0] == out[1] and len(out[0]) > 1000


def test_unrelated_requests_are_not_about_the_functions_shown():
    rng = random.Random(11)
    for _ in range(200):
        p = synthetic_problem(rng, "unrelated")
        assert p.answer == NO_CALL
        topics = {f.topic for f in CATALOGUE if f.name in p.meta["functions"]}
        servers = [f for f in CATALOGUE if any(_matches(t, p.messages[1]["content"]) for t in f.call)]
        assert all(f.topic not in topics for f in servers)


def _matches(template: str, text: str) -> bool:
    import re
    pattern = re.escape(template)
    for name in SLOTS:
        pattern = pattern.replace(re.escape("{" + name + "}"), ".+")
    return re.fullmatch(pattern, text) is not None


def test_missing_kind_withholds_a_required_argument():
    # The blog's case: city names cannot stand in for the coordinates calculate_distance requires.
    distance = next(f for f in CATALOGUE if f.name == "calculate_distance")
    assert any("distance between {city} and {city2}" in t for t in distance.missing)
    rng = random.Random(2)
    for _ in range(50):
        p = synthetic_problem(rng, "missing")
        assert p.answer == NO_CALL and p.meta["kind"] == "missing"
    assert KINDS.count("call") * 2 == len(KINDS)


# ---- Glaive ----------------------------------------------------------------------------------------

WEATHER = {"name": "get_current_weather", "description": "Get the weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
NEWS = {"name": "get_news", "description": "Get news", "parameters": {"type": "object", "properties": {}}}
HEADER = "SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"


def glaive_system(*functions) -> str:
    return HEADER + "\n\n".join(json.dumps(f, indent=4) for f in functions) + "\n\n"


GOOD = [
    # a call in the first reply; Glaive's arguments are a single-quoted string (not valid JSON)
    {"system": glaive_system(WEATHER, NEWS),
     "chat": "USER: What's the weather in Oslo?\n\n\nASSISTANT: <functioncall> {\"name\": \"get_current_weather\", "
             "\"arguments\": '{\"city\": \"Oslo\"}'} <|endoftext|>\n\n\nFUNCTION RESPONSE: {\"temp\": 3}\n\n\n"
             "ASSISTANT: It is 3 degrees in Oslo. <|endoftext|>\n\n\n"},
    # the reply asks for missing information: no call (a later turn calls, but the first reply decides)
    {"system": glaive_system(WEATHER),
     "chat": "USER: What's the weather like?\n\n\nASSISTANT: Which city? <|endoftext|>\n\n\nUSER: Oslo\n\n\n"
             "ASSISTANT: <functioncall> {\"name\": \"get_current_weather\", \"arguments\": '{\"city\": \"Oslo\"}'} "
             "<|endoftext|>\n\n\n"},
    # no functions at all
    {"system": "SYSTEM: You are a helpful assistant, with no access to external functions.\n\n\n",
     "chat": "USER: Tell me a joke.\n\n\nASSISTANT: Why did the chicken cross the road? <|endoftext|>\n\n\n"},
]
BAD = [
    ["not", "a", "record"],
    {"system": glaive_system(WEATHER)},  # no chat
    {"system": glaive_system(WEATHER), "chat": 42},
    {"system": HEADER + "{\"name\": \"broken\", ", "chat": "USER: hi\n\n\nASSISTANT: hello <|endoftext|>"},  # bad JSON
    {"system": glaive_system(WEATHER), "chat": "ASSISTANT: hello <|endoftext|>"},  # no user turn
    {"system": glaive_system(WEATHER), "chat": "USER: hi there"},  # no reply
    {"system": glaive_system(WEATHER), "chat": "USER: hi\n\n\nASSISTANT: <functioncall> oops <|endoftext|>"},
    {"system": glaive_system(WEATHER),  # calls a function that is not defined
     "chat": "USER: news?\n\n\nASSISTANT: <functioncall> {\"name\": \"get_news\", \"arguments\": '{}'} <|endoftext|>"},
]


def test_glaive_records_parse():
    a, b, c = (parse_record(r) for r in GOOD)
    assert (a.functions, a.user, a.label) == (("get_current_weather", "get_news"), "What's the weather in Oslo?",
                                              "get_current_weather")
    assert a.system.startswith("You are a helpful assistant with access") and '"name": "get_news"' in a.system
    assert (b.user, b.label) == ("What's the weather like?", None)
    assert (c.functions, c.label) == ((), None)


def test_glaive_file_skips_malformed_records_with_one_summary_line(tmp_path, caplog):
    path = tmp_path / "glaive.json"
    path.write_text(json.dumps(GOOD + BAD))
    examples, skipped = load_glaive(path)
    assert len(examples) == 3 and sum(skipped.values()) == len(BAD)
    with caplog.at_level(logging.WARNING, logger="rlvr_fast"):
        task = FunctionPickTask(data=str(path), eval_size=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 8 of 11 records" in warnings[0]
    assert len(task.eval_problems()) == 1
    problems = task.eval_problems() + task.sample(random.Random(0), 50)
    assert {p.answer for p in problems} == {"get_current_weather", NO_CALL}
    system = problems[0].messages[0]["content"]
    assert system.endswith("\n" + INSTRUCTION) and not system.startswith("SYSTEM:")


@pytest.mark.parametrize("content,message", [("{not json", "not a JSON file"), ('{"a": 1}', "JSON list")])
def test_glaive_file_that_is_not_a_list(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_glaive(path)


def test_glaive_file_with_nothing_readable(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(BAD))
    with pytest.raises(ValueError, match="0 readable records"):
        FunctionPickTask(data=str(path))


def test_demonstrations_check_the_request_then_choose_right():
    """Cold-start demonstrations: per training problem one right completion, a thought that checks the request
    (the function it is for, what that needs, whether the request gives it), then the choice that follows."""
    task = FunctionPickTask(eval_size=16)
    demos = task.demonstrations(random.Random(3), 200)
    assert [t for _, t in demos] == [t for _, t in task.demonstrations(random.Random(3), 200)]  # deterministic
    held = {(p.messages[0]["content"], p.messages[1]["content"]) for p in task.eval_problems()}
    schemas = {f.name: f.schema for f in CATALOGUE}
    kinds = []
    for problem, texts in demos:
        assert (problem.messages[0]["content"], problem.messages[1]["content"]) not in held
        kind, shown, wanted = problem.meta["kind"], problem.meta["functions"], problem.meta["wanted"]
        kinds.append(kind)
        [text] = texts
        assert function_pick_reward(text, problem.answer)["correct"] == 1.0
        assert function_pick_reward(text, problem.answer)["format"] == 1.0
        thought, marker = text.split("\n")
        if kind == "unrelated":
            assert wanted is None and marker == "<no_functioncall>"
            assert thought == "The user wants something that none of the functions on show does."
            continue
        assert wanted in shown
        required = schemas[wanted]["parameters"]["required"]
        verdict = "The request gives all of that." if kind == "call" else "Some of that is missing from the request."
        assert thought == f"The user wants {wanted}, which needs {', '.join(required)}. {verdict}"
        assert marker == (f"<functioncall> {wanted}" if kind == "call" else "<no_functioncall>")
    # Balanced batches: half calls, the non-calls split between the two kinds.
    assert (kinds.count("call"), kinds.count("missing"), kinds.count("unrelated")) == (100, 50, 50)


def test_demonstrations_from_glaive_data(tmp_path):
    path = tmp_path / "glaive.json"
    path.write_text(json.dumps(GOOD * 4))
    task = FunctionPickTask(data=str(path), eval_size=1)
    answers = set()
    for problem, [text] in task.demonstrations(random.Random(0), 6):
        answers.add(problem.answer)
        assert function_pick_reward(text, problem.answer)["correct"] == 1.0
        if problem.answer != NO_CALL:  # the thought is about the function the record calls
            assert problem.answer == "get_current_weather"  # the only call record of GOOD
            assert text == ("The user wants get_current_weather, which needs city. The request gives all of that.\n"
                            "<functioncall> get_current_weather")
        else:  # a Glaive non-call does not say whether an argument is missing or the request is unrelated
            assert text == "None of the functions on show can be called with what the request gives.\n<no_functioncall>"
    assert answers == {"get_current_weather", NO_CALL}
