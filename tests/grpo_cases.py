"""Shared GRPO test batches: advantages of both signs and a ragged mask with a fully masked row."""

import torch


def ragged_advantages_and_mask(B: int, T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    adv = torch.randn(B, generator=g)
    adv[0] = abs(adv[0]) + 0.1
    if B > 1:
        adv[1] = -abs(adv[1]) - 0.1
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    if B > 2:
        mask[2] = 0  # a fully masked completion
    return adv, mask
