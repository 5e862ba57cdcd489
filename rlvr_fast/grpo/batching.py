"""Turn rollouts into packed training micro-batches.

Sequences are packed back to back (no padding in the model's forward) and grouped into
micro-batches under a token budget. Two layouts:

* one sequence per completion, prompt + completion (share_prompts=False);
* shared prompts (share_prompts=True): the completions of one group that land in the same
  micro-batch share a single copy of their prompt. Tokens go prompts first, then each prompt's
  completions, [p_1, ..., p_M, c_11, c_12, ..., c_21, ...], and the model's shared-prompt attention
  lets each completion see its prompt and itself only (model/attention.py). With the multiply
  task's ~77-token prompt and ~30-token completions, a group of 8 is 317 tokens instead of 856.
  The hidden states, and so the loss and gradients, are those of the first layout.
  Sharing is exact and, measured, never slower than the first layout: the attention does the same
  pairs or fewer (bench/bench_shared_prompt.py, one layer: 0.97-1.02x plain packing's time with a
  128-token prompt and completions of 1-2k tokens, 1.2-2.8x faster with a 1024-token prompt) and every
  other layer runs the prompt once instead of once per completion.

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
    prompt_lens: list[int] | None  # shared prompts: tokens of each prompt (None: plain sequences)
    completion_lens: list[list[int]] | None  # shared prompts: fed tokens of each prompt's completions
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
        if self.prompt_lens is None:
            return PackedBatch.from_cu_seqlens(self.cu_seqlens, self.max_seqlen)
        return PackedBatch.shared_prompt(self.prompt_lens, self.completion_lens, device=self.input_ids.device)

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """Packed hidden [N, H] -> [B, T, H] hidden states of the completion predictors."""
        return hidden[self.predictor_index]

    def to(self, device: torch.device) -> "MicroBatch":
        for name in ("input_ids", "cu_seqlens", "positions", "predictor_index", "targets", "mask", "advantages"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def _shares_prompt(prev: Sample | None, s: Sample) -> bool:
    return prev is not None and s.group >= 0 and prev.group == s.group and prev.prompt_ids == s.prompt_ids


def make_micro_batch(samples: list[Sample], share_prompts: bool = True) -> MicroBatch:
    """Pack samples in order; with share_prompts, consecutive samples of one group share one prompt copy."""
    groups: list[list[Sample]] = []  # consecutive samples that share a prompt (singletons without sharing)
    for s in samples:
        if share_prompts and groups and _shares_prompt(groups[-1][-1], s):
            groups[-1].append(s)
        else:
            groups.append([s])
    shared = len(groups) < len(samples)
    t_max = max(len(s.completion_ids) for s in samples)
    predictor = torch.zeros(len(samples), t_max, dtype=torch.long)
    targets = torch.zeros(len(samples), t_max, dtype=torch.long)
    mask = torch.zeros(len(samples), t_max)
    ids: list[int] = []
    # Where each sample's prompt ends and its completion's fed tokens (all but the last) start.
    last_prompt: list[int] = []
    first: list[int] = []
    if shared:  # prompts first, then each prompt's completions
        for g in groups:
            ids += g[0].prompt_ids
            last_prompt += [len(ids) - 1] * len(g)
        for s in samples:
            first.append(len(ids))
            ids += s.completion_ids[:-1]
        prompt_lens = [len(g[0].prompt_ids) for g in groups]
        completion_lens = [[max(len(s.completion_ids) - 1, 0) for s in g] for g in groups]
        batch = PackedBatch.shared_prompt(prompt_lens, completion_lens)
        cu, max_len, positions = batch.cu_seqlens, batch.max_seqlen, batch.positions
    else:  # one sequence per sample: its prompt, then its completion
        bounds, positions_list = [0], []
        for s in samples:
            ids += s.prompt_ids
            last_prompt.append(len(ids) - 1)
            first.append(len(ids))
            ids += s.completion_ids[:-1]
            bounds.append(len(ids))
            positions_list += range(bounds[-1] - bounds[-2])
        cu = torch.tensor(bounds, dtype=torch.int32)
        max_len = max(b - a for a, b in zip(bounds, bounds[1:]))
        positions, prompt_lens, completion_lens = torch.tensor(positions_list), None, None
    for i, s in enumerate(samples):
        lc = len(s.completion_ids)
        predictor[i, :] = last_prompt[i]  # completion token 0; padding rows (masked out) too
        predictor[i, 1:lc] = torch.arange(first[i], first[i] + lc - 1)
        targets[i, :lc] = torch.tensor(s.completion_ids, dtype=torch.long)
        mask[i, :lc] = 1.0
    adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    return MicroBatch(samples, torch.tensor(ids, dtype=torch.long), cu, max_len, positions, prompt_lens,
                      completion_lens, predictor, targets, mask, adv)


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
