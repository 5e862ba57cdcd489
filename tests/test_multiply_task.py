"""The multiply reward on hand-written completions, the curriculum, and the held-out set."""

import json
import random

import pytest

from rlvr_fast.tasks.multiply import (PROMPT, MultiplyTask, answer_line, carries, curriculum_levels, first_wrong_step,
                                      multiply_reward, worked_product)

PRODUCT = 1497 * 63  # 94311

CASES = [
    # (completion, correct, format)
    ("1497 * 63 = 94311\nFinal Answer: the final answer is 94311. I hope it is correct.", 1.0, 1.0),
    ("Final Answer: the final answer is 94311. I hope it is correct.", 1.0, 1.0),
    ("Let me think.\nFinal Answer: the final answer is 94310. I hope it is correct.", 0.0, 1.0),  # wrong number
    ("The answer is 94311.", 0.0, 0.0),  # right number, wrong form
    ("Final Answer: The final answer is 94311. I hope it is correct.", 0.0, 0.5),  # capital T: near miss
    ("The final answer is 94311. I hope it is correct.", 0.0, 0.25),  # the line without its prefix
    ("the final answer is 94311.", 0.0, 0.0),
    ("Final Answer: the final answer is 94,311. I hope it is correct.", 0.0, 0.5),  # a comma: near miss only
    ("Final Answer: the final answer is -94311. I hope it is correct.", 0.0, 0.0),
    ("", 0.0, 0.0),
    # The blog's regex has unescaped dots: any character matches there, and we keep it verbatim.
    ("Final Answer: the final answer is 94311! I hope it is correct!", 1.0, 1.0),
    # First match counts (re.search), as in the blog; an answer line stated twice gets no format credit.
    ("Final Answer: the final answer is 1. I hope it is correct.\n"
     "Final Answer: the final answer is 94311. I hope it is correct.", 0.0, 0.0),
    ("Final Answer: the final answer is 94311. I hope it is correct.\n"
     "Final Answer: the final answer is 94311. I hope it is correct.", 1.0, 0.0),
    ("Final Answer: the final answer is X. I hope it is correct.", 0.0, 0.0),  # the prompt's placeholder
]


@pytest.mark.parametrize("completion,correct,fmt", CASES)
def test_multiply_reward_table(completion, correct, fmt):
    assert multiply_reward(completion, PRODUCT) == {"correct": correct, "format": fmt}


def test_prompt_is_the_blogs_verbatim():
    assert PROMPT.format(a=1497, b=63) == (
        "Please answer the following question. You may write out your argument before stating your final answer X "
        "in a new line, following the format \"Final Answer: the final answer is X. I hope it is correct.\" 1497 * 63")


def test_problems_have_the_target_sizes_and_answers():
    task = MultiplyTask(digits=(4, 2), curriculum=False)
    for p in task.sample(random.Random(0), 50):
        a, b = p.meta["a"], p.meta["b"]
        assert 1000 <= a <= 9999 and 10 <= b <= 99 and p.answer == str(a * b)
        assert p.messages[-1]["content"].endswith(f"{a} * {b}")
    assert task.score(p, f"Final Answer: the final answer is {a * b}. I hope it is correct.")["correct"] == 1.0


def test_eval_set_is_fixed_and_independent_of_training_draws():
    task = MultiplyTask(digits=(3, 2), eval_size=20)
    first = [p.answer for p in task.eval_problems()]
    task.sample(random.Random(5), 100)
    assert [p.answer for p in task.eval_problems()] == first
    assert len(set(first)) > 10


@pytest.mark.parametrize("digits,eval_size,expected", [((1, 1), 32, 32), ((1, 1), 80, 50), ((2, 1), 64, 64)])
def test_training_never_draws_held_out_problems(digits, eval_size, expected):
    task = MultiplyTask(digits=digits, curriculum=False, eval_size=eval_size)
    held_out = {(p.meta["a"], p.meta["b"]) for p in task.eval_problems()}
    assert len(held_out) == expected  # distinct, and at most half of the problems of that size
    drawn = {(p.meta["a"], p.meta["b"]) for p in task.sample(random.Random(0), 2000)}
    assert not drawn & held_out
    if digits == (1, 1):
        assert len(drawn) == 100 - expected  # every other 1x1 problem is still trained on


def groups(task, problems, solved):
    """Each problem's group of 2 completions: one right if solved(problem) else none. "up", "down" or None."""
    metrics, note = task.observe(problems, [[{"correct": float(solved(p))}, {"correct": 0.0}] for p in problems])
    moved = "up" if metrics["promoted"] else "down" if metrics["demoted"] else None
    assert (note is None) == (moved is None) and (moved is None or f"to {task.current_digits[0]} x" in note)
    return moved


def sizes(problems):
    return [(len(str(p.meta["a"])), len(str(p.meta["b"]))) for p in problems]


def test_curriculum_levels():
    assert curriculum_levels((4, 2)) == [(1, 1), (2, 1), (2, 2), (3, 2), (4, 2)]
    assert curriculum_levels((1, 1)) == [(1, 1)]


def test_curriculum_moves_up_only_when_probes_of_the_next_level_are_solved():
    rng = random.Random(0)
    task = MultiplyTask(digits=(2, 2), window=4, promote_at=0.5, probe_groups=4, demote_after=3)
    assert task.current_digits == (1, 1) and not task.probing
    assert sizes(task.sample(rng, 4)) == [(1, 1)] * 4
    assert groups(task, task.sample(rng, 1), lambda p: True) is None   # 2 of 4 completions: window not full
    assert groups(task, task.sample(rng, 1), lambda p: True) is None   # full, 2/4 >= 0.5: probing starts
    assert task.probing and task.current_digits == (1, 1)
    problems = task.sample(rng, 8)
    assert sizes(problems) == [(1, 1)] * 6 + [(2, 1)] * 2              # a quarter of the prompts probe
    # Probes never solved: no promotion however accurate the current level is.
    for _ in range(3):
        assert groups(task, task.sample(rng, 8), lambda p: p.meta["a"] < 10) is None
    assert task.current_digits == (1, 1)
    # One probe group in four solved: up.
    problems = task.sample(rng, 4)
    assert groups(task, problems, lambda p: True) == "up"
    assert task.current_digits == (2, 1) and not task.probing
    state = json.loads(json.dumps(task.state_dict()))  # JSON-serialisable, and it round-trips
    fresh = MultiplyTask(digits=(2, 2), window=4, promote_at=0.5, probe_groups=4, demote_after=3)
    fresh.load_state_dict(state)
    assert fresh.current_digits == (2, 1) and fresh.state_dict() == task.state_dict()


def test_curriculum_moves_down_after_steps_without_a_right_answer():
    rng = random.Random(0)
    task = MultiplyTask(digits=(2, 1), window=4, promote_at=0.5, probe_groups=4, demote_after=3)
    task.load_state_dict({"level": 1, "recent": [], "probes": [], "dry_steps": 0})
    assert groups(task, task.sample(rng, 4), lambda p: False) is None
    assert groups(task, task.sample(rng, 4), lambda p: False) is None
    assert groups(task, task.sample(rng, 4), lambda p: True) is None   # a right answer resets the count
    assert groups(task, task.sample(rng, 4), lambda p: False) is None
    assert groups(task, task.sample(rng, 4), lambda p: False) is None
    assert groups(task, task.sample(rng, 4), lambda p: False) == "down"
    assert task.current_digits == (1, 1)
    for _ in range(5):  # the first level never moves down
        assert groups(task, task.sample(rng, 4), lambda p: False) is None


def test_bad_digits():
    with pytest.raises(ValueError, match="--digits"):
        MultiplyTask(digits=(0, 2))


def check_worked_product(text: str, a: int, b: int) -> None:
    """Every step of the worked product is true arithmetic, and its lines end at a * b."""
    lines = text.split("\n")
    assert len(lines) == 2 * len(str(b)) - 1  # a partial product per digit of b, a running sum after the first
    for line in lines:
        *steps, so, claim = line.split(" ")
        assert so == "so"
        for step in steps:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs), step  # noqa: S307 (digits and + * only)
        lhs, rhs = claim.split("=")
        assert eval(lhs) == int(rhs), claim  # noqa: S307
        # the value claimed is the last step's value followed by the earlier steps' last digits (then the zeros
        # of the place of b's digit)
        values = [step.split("=")[1] for step in steps]
        digits = values[-1] + "".join(v[-1] for v in reversed(values[:-1]))
        zeros = len(lhs.split("*")[1]) - 1 if "*" in lhs else 0
        assert rhs == str(int(digits)) + "0" * zeros if int(digits) else rhs == "0", line
    assert lines[-1].endswith(f"={a * b}")


def test_worked_product_example():
    assert worked_product(47, 38) == ("7*8=56 4*8+5=37 so 47*8=376\n7*3=21 4*3+2=14 so 47*30=1410\n"
                                      "6+0=6 7+1=8 3+4=7 0+1=1 so 376+1410=1786")


@pytest.mark.parametrize("digits", [(1, 1), (2, 1), (2, 2), (4, 2), (3, 3)])
def test_demonstrations_are_right_worked_products_with_the_answer_line(digits):
    task = MultiplyTask(digits=digits)
    demos = task.demonstrations(random.Random(0), 40)
    held_out = {(p.meta["a"], p.meta["b"]) for p in task.eval_problems()}
    seen = set()
    for problem, (text,) in demos:
        a, b = problem.meta["a"], problem.meta["b"]
        assert (a, b) not in held_out
        seen.add((len(str(a)), len(str(b))))
        work, answer = text.rsplit("\n", 1)
        check_worked_product(work, a, b)
        assert answer == f"Final Answer: the final answer is {a * b}. I hope it is correct."
        assert task.score(problem, text) == {"correct": 1.0, "format": 1.0}
    assert digits in seen and (digits == (1, 1) or len(seen) > 1)  # sizes are mixed


def test_demonstrations_without_curriculum_are_all_at_the_target_size():
    """--no-curriculum trains and evaluates the target size only; the cold start demonstrates it only."""
    task = MultiplyTask(digits=(2, 2), curriculum=False)
    sizes = {(len(str(p.meta["a"])), len(str(p.meta["b"]))) for p, _ in task.demonstrations(random.Random(0), 40)}
    assert sizes == {(2, 2)}


def test_first_wrong_step_names_where_a_completion_leaves_the_worked_product():
    """47 * 38: the worked product has digit products, partial products, column sums and the running sum."""
    worked = worked_product(47, 38)
    right = worked + "\n" + answer_line(1786)
    assert first_wrong_step(right, 47, 38) == "right"
    # the answer line alone decides "right", whatever the argument (the blog's check)
    assert first_wrong_step("Final Answer: the final answer is 1786. I hope it is correct.", 47, 38) == "right"
    wrong = {"digit product": ("4*8+5=37", "4*8+5=36"), "partial product": ("so 47*8=376", "so 47*8=386"),
             "column sum": ("3+4=7", "3+4=8"), "running sum": ("so 376+1410=1786", "so 376+1410=1796")}
    for kind, (good, bad) in wrong.items():
        assert first_wrong_step(right.replace(good, bad).replace("is 1786", "is 1"), 47, 38) == kind, kind
    # a later slip does not hide an earlier one
    two_slips = right.replace("4*8+5=37", "4*8+5=36").replace("3+4=7", "3+4=8").replace("is 1786", "is 1")
    assert first_wrong_step(two_slips, 47, 38) == "digit product"
    assert first_wrong_step(worked + "\n" + answer_line(1787), 47, 38) == "answer line"
    assert first_wrong_step(worked.splitlines()[0], 47, 38) == "cut short"
    assert first_wrong_step("47 times 38 is about 1800.\n" + answer_line(1800), 47, 38) == "other form"


@pytest.mark.parametrize("a,b,expected", [(11, 11, 0),  # 1*1 ... and 11+110: no carry anywhere
                                          (47, 38, 2),  # 4*8+5 and 4*3+2 add a carry; the sum 376+1410 has none
                                          (99, 99, 4)])  # 9*9+8 twice; 891+8910: 1+1, 9+9 carry -> 9+8+1, 0+8+1
def test_carries_counts_the_steps_that_carry(a, b, expected):
    assert carries(a, b) == expected
