"""Group-relative advantages and zero-signal groups."""

import pytest
import torch

from rlvr_fast.grpo.advantages import group_advantages


def test_group_scaling_matches_hand_computation():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv, zero = group_advantages(r, "group", eps=0.0)
    m0, s0 = 0.5, torch.tensor([1.0, 0, 0, 1]).std().item()
    torch.testing.assert_close(adv[0], (torch.tensor([1.0, 0, 0, 1]) - m0) / s0)
    s1 = torch.tensor([0.0, 0, 0, 1]).std().item()
    torch.testing.assert_close(adv[1], (torch.tensor([0.0, 0, 0, 1]) - 0.25) / s1)
    assert zero.tolist() == [False, False]
    torch.testing.assert_close(adv.sum(1), torch.zeros(2), atol=1e-6, rtol=0)


def test_none_is_dr_grpo_and_batch_uses_one_scale():
    r = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    adv, _ = group_advantages(r, "none")
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5], [1.5, -1.5]]))
    adv_b, _ = group_advantages(r, "batch", eps=0.0)
    torch.testing.assert_close(adv_b, torch.tensor([[0.5, -0.5], [1.5, -1.5]]) / r.std())


def test_without_std_division_a_format_only_difference_stays_as_small_as_its_weight():
    """The default (none): a group where correctness never varies and only 0.1 of format credit differs (the
    bench_tasks units run that collapsed onto a well-formed wrong answer) moves the policy by at most 0.1, a
    tenth of what one right answer does; dividing by the group's std makes it as large as a right answer."""
    format_only = torch.tensor([[0.1, 0.1, 0.0, 0.1, 0.0, 0.1, 0.1, 0.1]])
    one_right = torch.tensor([[1.1, 0.1, 0.0, 0.1, 0.0, 0.1, 0.1, 0.1]])
    none_format, none_right = (group_advantages(r, "none")[0].abs().max() for r in (format_only, one_right))
    assert none_format <= 0.1 and none_right > 0.9 and none_right > 9 * none_format
    group_format, group_right = (group_advantages(r, "group")[0].abs().max() for r in (format_only, one_right))
    assert group_format > 1.5 and group_format > 0.5 * group_right


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_reward_groups_have_zero_advantage_and_are_flagged(scale):
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.25], [0.0, 0.0, 0.0]])
    adv, zero = group_advantages(r, scale)
    assert zero.tolist() == [True, False, True]
    assert torch.all(adv[zero] == 0)
    assert torch.all(adv[1] != 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(2, 2), "mean")
    with pytest.raises(ValueError, match="prompts, group_size"):
        group_advantages(torch.zeros(4), "group")
