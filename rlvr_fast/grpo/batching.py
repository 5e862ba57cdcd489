"""Turn rollouts into packed training micro-batches.

Each training sequence is prompt + completion. Sequences are packed back to back (no padding in
the model's forward) and grouped into micro-batches under a token budget. The loss only needs the
hidden states that predict completion tokens: position t's hidden state predicts token t + 1, so
for a prompt of length Lp the completion's predictors are positions Lp - 1 ... Lp + Lc - 2. They
are gathered into a [B, T_max, H] block (padding only here, where it is cheap) with a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    """One completion to train on."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    index: int  # position in the step's flat list of completions (for old/ref log-prob lookup)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class MicroBatch:
    samples: list[Sample]
    input_ids: torch.Tensor      # [N] packed prompt + completion tokens
    cu_seqlens: torch.Tensor     # [B + 1] int32
    max_seqlen: int
    predictor_index: torch.Tensor  # [B, T] flat position in the packed batch whose hidden state predicts each target
    targets: torch.Tensor        # [B, T] completion token ids (0 where masked)
    mask: torch.Tensor           # [B, T] 1.0 for real completion tokens
    advantages: torch.Tensor     # [B]

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """Packed hidden [N, H] -> [B, T, H] hidden states of the completion predictors."""
        return hidden[self.predictor_index]

    def to(self, device: torch.device) -> "MicroBatch":
        for name in ("input_ids", "cu_seqlens", "predictor_index", "targets", "mask", "advantages"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def make_micro_batch(samples: list[Sample]) -> MicroBatch:
    lengths = [s.length for s in samples]
    t_max = max(len(s.completion_ids) for s in samples)
    input_ids = torch.tensor([tok for s in samples for tok in s.prompt_ids + s.completion_ids], dtype=torch.long)
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    predictor = torch.zeros(len(samples), t_max, dtype=torch.long)
    targets = torch.zeros(len(samples), t_max, dtype=torch.long)
    mask = torch.zeros(len(samples), t_max)
    for i, s in enumerate(samples):
        lc = len(s.completion_ids)
        start = int(cu[i]) + len(s.prompt_ids) - 1
        predictor[i, :lc] = torch.arange(start, start + lc)
        predictor[i, lc:] = start  # any valid row; masked out
        targets[i, :lc] = torch.tensor(s.completion_ids)
        mask[i, :lc] = 1.0
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    return MicroBatch(samples, input_ids, cu, max(lengths), predictor, targets, mask, adv)


def split_by_tokens(samples: list[Sample], budget: int) -> list[list[Sample]]:
    """Greedy, in order: fill each micro-batch up to `budget` tokens (a longer sample gets its own)."""
    batches: list[list[Sample]] = []
    used = budget + 1
    for s in samples:
        if used + s.length > budget:
            batches.append([])
            used = 0
        batches[-1].append(s)
        used += s.length
    return batches
