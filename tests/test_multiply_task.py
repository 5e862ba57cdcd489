"""The multiply reward on hand-written completions, the curriculum, and the held-out set."""

import random

import pytest

from rlvr_fast.tasks.multiply import PROMPT, MultiplyTask, curriculum_levels, multiply_reward

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
    # First match counts (re.search), as in the blog.
    ("Final Answer: the final answer is 1. I hope it is correct.\n"
     "Final Answer: the final answer is 94311. I hope it is correct.", 0.0, 1.0),
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


def test_curriculum_levels_and_promotion():
    assert curriculum_levels((4, 2)) == [(1, 1), (2, 1), (2, 2), (3, 2), (4, 2)]
    assert curriculum_levels((1, 1)) == [(1, 1)]
    task = MultiplyTask(digits=(2, 1), window=4, promote_at=0.5)
    assert task.current_digits == (1, 1)
    assert not task.observe([1.0, 0.0, 0.0])  # window not full yet
    assert task.observe([1.0])                # 2/4 >= 0.5
    assert task.current_digits == (2, 1)
    assert not task.observe([1.0] * 8)        # already at the target
    state = task.state_dict()
    fresh = MultiplyTask(digits=(2, 1), window=4, promote_at=0.5)
    fresh.load_state_dict(state)
    assert fresh.current_digits == (2, 1)


def test_bad_digits():
    with pytest.raises(ValueError, match="--digits"):
        MultiplyTask(digits=(0, 2))
