"""Built-in rewards on hand-written completions, reward specs, user rewards by module path, and the worker pool."""

from __future__ import annotations

import pytest

from rlvr_fast.tasks import Problem
from rlvr_fast.tasks.pool import RewardPool
from rlvr_fast.tasks.rewards import (RewardSet, RewardSpec, answer_statements, exact, format, normalize, number,
                                     parse_reward_spec)

EXACT = [
    # (completion, answer, reward)
    ("The answer is 42.", "42", 1.0),
    ("Let me see.\n\\boxed{42}", "42", 1.0),
    ("6 * 7 = 42\n#### 42", "42", 1.0),
    ("I think it is the French capital.\nParis", "paris", 1.0),  # no explicit answer: the last line
    ("The answer is PARIS!", "paris", 1.0),  # case and trailing punctuation
    ("Answer:   New \t York", "new york", 1.0),  # whitespace collapsed
    ("The answer is Paris. I hope it is correct.", "Paris", 1.0),  # X ends with its sentence
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # nested braces
    ("The answer is 41.\nNo wait: \\boxed{42}", "42", 1.0),  # boxed wins over "answer is"
    ("\\boxed{1} then \\boxed{2}", "2", 1.0),  # the last boxed
    ("The answer is 43, not 42", "42", 0.0),
    ("answer: 42", "42.0", 0.0),  # exact is not numeric
    ("", "42", 0.0),
]

NUMBER = [
    ("The answer is 42.", "42", 1.0),
    ("40 + 2 = 42", "42", 1.0),  # the last number
    ("42 apples, or maybe 41", "42", 0.0),
    ("#### 1,234", "1234", 1.0),
    ("\\boxed{3.50}", "3.5", 1.0),
    ("The answer is 12. Check: 12 * 3 = 36", "12", 1.0),  # the first number of the explicit answer
    ("It is -7", "-7", 1.0),
    ("The answer is five", "5", 0.0),
    ("no numbers here", "5", 0.0),
    ("0.30000000000000004", "0.3", 1.0),  # relative tolerance
]

FORMAT = [
    ("\\boxed{1}", 1.0), ("work\n#### 3", 1.0), ("The answer is x", 1.0), ("Answer: 4", 1.0),
    ("I think 4", 0.0), ("", 0.0), ("\\boxed{unclosed", 0.0),
]


@pytest.mark.parametrize("completion,answer,expected", EXACT)
def test_exact_table(completion, answer, expected):
    assert exact("q", completion, answer) == expected


@pytest.mark.parametrize("completion,answer,expected", NUMBER)
def test_number_table(completion, answer, expected):
    assert number("q", completion, answer) == expected


@pytest.mark.parametrize("completion,expected", FORMAT)
def test_format_table(completion, expected):
    assert format("q", completion, "x") == expected


INSTRUCTION = "Reply with your working, then end with 'The answer is N.' A train goes 3 km a minute; how far in 4?"
# What a collapsing run wrote to win format credit without an answer (issue: a user's own task).
ADVERSARIAL = [
    "The answer is N.",                                    # the instruction's placeholder, copied
    "So, the answer is N.",
    "The answer is X.", "The answer is <answer>.", "The answer is [number].", "The answer is ...", "\\boxed{}",
    "The answer is.", "The answer is:", "####",            # an answer sentence with no value
    "The answer is 12.\nThe answer is 12.",               # the answer line repeated
    "The answer is 12. The answer is 12. The answer is",
    "The answer is The Answer is The answer is",           # the collapsed run's repetition
    "The answer is 12.\nThe answer is 7.",                 # repeated with different values
    "\\boxed{12} and \\boxed{7}",
    "#### 12\nThe answer is 7.",
]


@pytest.mark.parametrize("completion", ADVERSARIAL)
@pytest.mark.parametrize("answer,rewards", [("12", ["number", "format"]), ("12", ["exact", "format"]),
                                            ("twelve km", ["exact", "format"])])
def test_format_credit_needs_one_real_answer(completion, answer, rewards):
    scored = RewardSet(rewards)(problem(INSTRUCTION, answer), completion)
    assert scored["format"] == 0.0 and format(INSTRUCTION, completion, answer) == 0.0


@pytest.mark.parametrize("completion,answer", [
    ("3 * 4 = 12. The answer is 12.", "12"), ("The answer is \\boxed{12}.", "12"), ("work\n#### 12", "12"),
    ("The answer is 7.", "12"),                            # wrong, but a real answer: format credit, no correctness
    ("The answer is twelve km.", "twelve km"), ("The answer is Paris.", "twelve km"),
    ("The answer is N.", "N"),                             # the label itself is never a placeholder
])
def test_format_credit_for_one_real_answer(completion, answer):
    assert format(INSTRUCTION, completion, answer) == 1.0


def test_format_credit_for_a_copy_of_the_prompts_own_template_value():
    prompt = 'Name the capital. Finish with "The answer is your_city."'
    assert format(prompt, "The answer is your_city.", "Paris") == 0.0
    assert format(prompt, "The answer is Paris.", "Paris") == 1.0 and format(prompt, "The answer is Rome.", "Paris") == 1.0


def test_format_for_a_list_answer_needs_a_list_of_its_shape():
    """A sorting task's answer is a list: one number, or a list of another length, is not an answer of its kind
    (a collapsing run won format credit with "The answer is 17." for "1, 4, 15, 17, 38")."""
    prompt, label = "Sort 17, 4, 38, 1, 15. End with 'The answer is N.'", "1, 4, 15, 17, 38"
    assert format(prompt, "The answer is 1, 4, 15, 17, 38.", label) == 1.0
    assert format(prompt, "The answer is 38, 17, 15, 4, 1.", label) == 1.0  # wrong, but of the right kind
    for wrong_kind in ("The answer is 17.", "The answer is 1, 4, 15.", "The answer is a, b, c, d, e."):
        assert format(prompt, wrong_kind, label) == 0.0
    assert format("q", "The answer is red, green.", "blue, red") == 1.0


def test_format_beside_number_needs_a_number_even_for_a_text_label():
    # The number reward reads the first number of a label like "12 km": the stated answer must hold one too.
    scored = RewardSet(["number", "format"])(problem(INSTRUCTION, "12 km"), "The answer is twelve.")
    assert scored["format"] == 0.0 and format(INSTRUCTION, "The answer is twelve.", "12 km") == 1.0
    assert RewardSet(["number", "format"])(problem(INSTRUCTION, "12 km"), "The answer is 12 km.")["format"] == 1.0


def test_answer_statements_count_a_boxed_answer_inside_its_sentence_once():
    assert answer_statements("The answer is \\boxed{7}.") == ["7"]
    assert answer_statements("#### 5\nso the answer is 6.\n\\boxed{7}") == ["5", "6", "7"]


def test_normalize():
    assert normalize("  The  Answer\n IS. ") == "the answer is"
    assert normalize("3.5") == "3.5" and normalize("yes!?") == "yes"


@pytest.mark.parametrize("spec,expected", [
    ("number", RewardSpec("number", "number", 1.0)),
    ("number:1.0", RewardSpec("number", "number", 1.0)),
    ("format:0.1", RewardSpec("format", "format", 0.1)),
    ("tests.reward_fixtures:parts", RewardSpec("parts", "tests.reward_fixtures:parts", 1.0)),
    ("tests.reward_fixtures:parts:0.5", RewardSpec("parts", "tests.reward_fixtures:parts", 0.5)),
    ("my/rewards.py:score:2", RewardSpec("score", "my/rewards.py:score", 2.0)),
])
def test_reward_specs(spec, expected):
    assert parse_reward_spec(spec) == expected


@pytest.mark.parametrize("spec,message", [("nope", "unknown reward"), ("a:b:c", "expected NAME"), ("mod:", "expected NAME")])
def test_bad_reward_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_reward_spec(spec)


def problem(prompt: str, answer: str = "42") -> Problem:
    return Problem([{"role": "user", "content": prompt}], answer)


def test_user_reward_from_module_path_with_named_components():
    rewards = RewardSet(["number:1", "tests.reward_fixtures:parts:0.5"])
    assert rewards.weights == {"number": 1.0, "parts": 0.5}
    comps = rewards(problem("q"), "The answer is 42.")
    assert comps == {"number": 1.0, "parts.mentions_answer": 1.0, "parts.short": 1.0, "parts": 2.0,
                     "correct": 1.0, "format": 1.0}
    assert rewards(problem("q"), "no")["correct"] == 0.0


def test_user_reward_from_a_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def longer(prompt, completion, answer):\n    return len(completion) / 10\n")
    rewards = RewardSet([f"{path}:longer:2"])
    assert rewards(problem("q"), "abcde")["longer"] == 0.5 and rewards.weights == {"longer": 2.0}
    pool = RewardPool(rewards, workers=1, timeout=5)
    try:  # the worker re-imports it from the file
        assert pool.map([(problem("q"), "abc")]) == [("ok", {"longer": 0.3, "correct": 0.3, "format": 0.0})]
    finally:
        pool.close()


@pytest.mark.parametrize("spec,message", [("tests.no_such_module:f", "cannot import"),
                                          ("tests.reward_fixtures:missing", "no function 'missing'"),
                                          ("/no/such/file.py:f", "no such file")])
def test_bad_user_rewards_fail_when_loaded(spec, message):
    with pytest.raises(ValueError, match=message):
        RewardSet([spec]).prepare()


def test_duplicate_rewards_are_refused():
    with pytest.raises(ValueError, match="given twice"):
        RewardSet(["number:1", "number:0.5"])


def test_a_reward_must_return_numbers():
    with pytest.raises(TypeError, match="returned str"):
        RewardSet(["tests.reward_fixtures:not_a_number"])(problem("q"), "x")


@pytest.fixture
def hang_pool():
    pool = RewardPool(RewardSet(["tests.reward_fixtures:hang_on_request"]), workers=2, timeout=1.0)
    yield pool
    pool.close()


def test_a_hanging_reward_times_out_and_the_pool_goes_on(hang_pool):
    hang_pool.map([(problem("warm up"), "x")])  # workers started
    out = hang_pool.map([(problem("please HANG"), "a"), (problem("fine"), "b"), (problem("fine"), "c")])
    assert [status for status, _ in out] == ["timeout", "ok", "ok"]
    assert out[1][1]["hang_on_request"] == 1.0
    assert hang_pool.timeouts == 1 and hang_pool.replaced == 1
    # The replacement worker scores, and a second hang costs one more limit, not a stall.
    out = hang_pool.map([(problem("HANG"), "a"), (problem("HANG"), "b"), (problem("ok"), "c")])
    assert [status for status, _ in out] == ["timeout", "timeout", "ok"] and hang_pool.timeouts == 3


def test_the_time_limit_counts_per_completion_from_its_dispatch():
    """One worker, four rewards of 0.5 s each under a 1.5 s limit: 2 s in all, yet none is late. A limit
    counted from the start of map() (or shared by the batch) would time out the last ones."""
    pool = RewardPool(RewardSet(["tests.reward_fixtures:slow"]), workers=1, timeout=1.5)
    try:
        out = pool.map([(problem(f"q{i}"), "x") for i in range(4)])
        assert [status for status, _ in out] == ["ok"] * 4 and pool.timeouts == 0
    finally:
        pool.close()


def test_pool_reports_errors_and_dead_workers():
    pool = RewardPool(RewardSet(["tests.reward_fixtures:boom"]), workers=1, timeout=5)
    try:
        (status, text), = pool.map([(problem("q"), "x")])
        assert status == "error" and "bug in the user's reward" in text
    finally:
        pool.close()
    pool = RewardPool(RewardSet(["tests.reward_fixtures:die"]), workers=1, timeout=5)
    try:
        out = pool.map([(problem("q"), "x"), (problem("q"), "y")])
        assert [s for s, _ in out] == ["error", "error"] and "died" in out[0][1] and pool.replaced == 2
    finally:
        pool.close()


def test_unpicklable_reward_is_refused_by_the_pool():
    with pytest.raises(ValueError, match="module level"):
        RewardPool(RewardSet([lambda p, c, a: 1.0]))
