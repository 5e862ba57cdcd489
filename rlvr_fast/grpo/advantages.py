"""Group-relative advantages: a completion is scored against the other completions of its prompt.

rewards [P, G] (P prompts, G completions each) -> advantages [P, G]:
    group: (r - mean_group) / (std_group + eps)      GRPO (DeepSeekMath)
    batch: (r - mean_group) / (std_batch + eps)      one scale for the whole batch
    none:  (r - mean_group)                          Dr. GRPO: no std division, which otherwise
                                                     up-weights prompts that are nearly solved or unsolved
std is the sample standard deviation (as TRL computes it). A group whose rewards are all equal
has advantage 0 for every completion: it carries no signal, and the trainer skips its update.
"""

from __future__ import annotations

import torch

SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (advantages [P, G], zero_std [P] bool: groups with no signal)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group_size], got shape {tuple(rewards.shape)}")
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale!r}")
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    zero_std = (rewards.max(dim=1).values - rewards.min(dim=1).values) == 0
    if scale == "group" and rewards.shape[1] > 1:
        centred = centred / (rewards.std(dim=1, keepdim=True) + eps)
    elif scale == "batch" and rewards.numel() > 1:
        centred = centred / (rewards.std() + eps)
    centred[zero_std] = 0.0  # exactly zero, not rounding noise
    return centred.float(), zero_std
