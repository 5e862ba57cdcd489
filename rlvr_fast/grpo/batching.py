"""Turn rollouts into packed training micro-batches.

Sequences are packed back to back (no padding in the model's forward) and grouped into
micro-batches under a token budget. Two layouts:

* one sequence per completion, prompt + completion (share_prompts=False);
* shared-prompt segments (share_prompts=True, the default): the completions of one group that land
  in the same micro-batch follow a single copy of their prompt, [prompt, c1, c2, ...], and the
  model's tree mask keeps each completion from seeing the others (model/attention.py). With the
  multiply task's ~77-token prompt and ~30-token completions, a group of 8 is 317 tokens instead
  of 856. The hidden states, and so the loss and gradients, are those of the first layout.

The loss only needs the hidden states that predict completion tokens: the state at a token
predicts the next one, so completion token 0 is predicted by the prompt's last token and token t
by the completion's token t - 1. They are gathered into a [B, T_max, H] block (padding only
here, where it is cheap) with a mask. The last completion token predicts nothing and is not fed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvr_fast.model.attention import PackedBatch


@dataclass
class Sample:
    """One completion to train on."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    index: int  # position in the step's flat list of completions (for old/ref log-prob lookup)
    group: int = -1  # samples of one group share prompt_ids (-1: never shared)
    rollout_logprobs: list[float] | None = None  # the sampler's log-probs of completion_ids

    @property
    def length(self) -> int:
        """Tokens fed to the model when trained alone (the last completion token predicts nothing)."""
        return len(self.prompt_ids) + len(self.completion_ids) - 1


@dataclass
class MicroBatch:
    samples: list[Sample]
    input_ids: torch.Tensor      # [N] packed tokens
    cu_seqlens: torch.Tensor     # [S + 1] int32, one entry per packed sequence (or segment)
    max_seqlen: int
    positions: torch.Tensor      # [N] rotary position of each token
    branch_ids: torch.Tensor | None  # [N] 0 = prompt, j = j-th completion of the segment; None: plain sequences
    predictor_index: torch.Tensor  # [B, T] flat position in the packed batch whose hidden state predicts each target
    targets: torch.Tensor        # [B, T] completion token ids (0 where masked)
    mask: torch.Tensor           # [B, T] 1.0 for real completion tokens
    advantages: torch.Tensor     # [B]

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def num_input_tokens(self) -> int:
        return self.input_ids.numel()

    def packed_batch(self) -> PackedBatch:
        if self.branch_ids is None:
            return PackedBatch.from_cu_seqlens(self.cu_seqlens, self.max_seqlen)
        return PackedBatch.shared_prompt(self.cu_seqlens, self.positions, self.branch_ids, self.max_seqlen)

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """Packed hidden [N, H] -> [B, T, H] hidden states of the completion predictors."""
        return hidden[self.predictor_index]

    def to(self, device: torch.device) -> "MicroBatch":
        for name in ("input_ids", "cu_seqlens", "positions", "branch_ids", "predictor_index", "targets", "mask",
                     "advantages"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else value.to(device))
        return self


def _shares_prompt(prev: Sample | None, s: Sample) -> bool:
    return prev is not None and s.group >= 0 and prev.group == s.group and prev.prompt_ids == s.prompt_ids


def make_micro_batch(samples: list[Sample], share_prompts: bool = True) -> MicroBatch:
    """Pack samples in order; with share_prompts, consecutive samples of one group form one segment."""
    ids: list[int] = []
    positions: list[int] = []
    branches: list[int] = []
    seq_starts: list[int] = []
    t_max = max(len(s.completion_ids) for s in samples)
    predictor = torch.zeros(len(samples), t_max, dtype=torch.long)
    targets = torch.zeros(len(samples), t_max, dtype=torch.long)
    mask = torch.zeros(len(samples), t_max)
    prev, branch, last_prompt = None, 0, 0
    for i, s in enumerate(samples):
        lp, lc = len(s.prompt_ids), len(s.completion_ids)
        if share_prompts and _shares_prompt(prev, s):
            branch += 1
        else:  # a new sequence: its prompt first
            seq_starts.append(len(ids))
            last_prompt = len(ids) + lp - 1
            ids += s.prompt_ids
            positions += range(lp)
            branches += [0] * lp
            branch = 1
        first = len(ids)  # where this completion's fed tokens (all but its last) start
        ids += s.completion_ids[:-1]
        positions += range(lp, lp + lc - 1)
        branches += [branch] * (lc - 1)
        predictor[i, 0] = last_prompt
        predictor[i, 1:lc] = torch.arange(first, first + lc - 1)
        predictor[i, lc:] = last_prompt  # any valid row; masked out
        targets[i, :lc] = torch.tensor(s.completion_ids)
        mask[i, :lc] = 1.0
        prev = s
    bounds = seq_starts + [len(ids)]
    cu = torch.tensor(bounds, dtype=torch.int32)
    max_len = max(b - a for a, b in zip(bounds, bounds[1:]))
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    shared = share_prompts and len(seq_starts) < len(samples)
    return MicroBatch(samples, torch.tensor(ids, dtype=torch.long), cu, max_len, torch.tensor(positions),
                      torch.tensor(branches) if shared else None, predictor, targets, mask, adv)


def split_by_tokens(samples: list[Sample], budget: int, share_prompts: bool = True) -> list[list[Sample]]:
    """Greedy, in order: fill each micro-batch up to `budget` fed tokens (a longer sample gets its own).
    With share_prompts a sample that continues its group's segment costs only its completion."""
    batches: list[list[Sample]] = []
    used = budget + 1
    for s in samples:
        shared = share_prompts and batches and _shares_prompt(batches[-1][-1] if batches[-1] else None, s)
        cost = len(s.completion_ids) - 1 if shared else s.length
        if used + cost > budget:
            batches.append([])
            used, cost = 0, s.length
        batches[-1].append(s)
        used += cost
    return batches
