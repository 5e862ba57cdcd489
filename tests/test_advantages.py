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
