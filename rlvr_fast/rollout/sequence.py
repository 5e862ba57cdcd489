"""Sequence: one completion being generated, and the bookkeeping the scheduler needs for it."""

from __future__ import annotations

import enum

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """A 64-bit integer hash (SplitMix64's finalizer): cheap, well mixed, pure Python."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()   # not in the cache (new, or preempted and to be recomputed)
    RUNNING = enum.auto()   # its tokens' K/V are in the cache; decodes every step
    FINISHED = enum.auto()


class Sequence:
    """Prompt + completion tokens of one sample, its block table and its random stream.

    The cache holds K/V for all tokens but the last one after every step (the last sampled token
    is the next decode step's input), so `num_tokens - 1` tokens are cached while it runs.
    """

    __slots__ = ("seq_id", "prompt_index", "sample_index", "prompt_ids", "token_ids", "logprobs", "block_table",
                 "status", "finish_reason", "stop_text_at", "_rng_base")

    def __init__(self, seq_id: int, prompt_index: int, sample_index: int, prompt_ids: list[int], seed: int):
        self.seq_id = seq_id
        self.prompt_index = prompt_index
        self.sample_index = sample_index
        self.prompt_ids = prompt_ids  # shared (not copied) by the samples of one prompt
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_text_at: int | None = None  # where a stop string starts in the decoded text
        # The random stream is a function of (seed, prompt, sample, step) only, so a completion does
        # not depend on batching, scheduling or preemption.
        self._rng_base = splitmix64(splitmix64(splitmix64(seed) ^ prompt_index) ^ sample_index)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.token_ids)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1] if self.token_ids else self.prompt_ids[-1]

    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.token_ids

    def rng_key(self) -> int:
        """63-bit key for the next token's draw (non-negative, so it fits torch.int64)."""
        return splitmix64(self._rng_base ^ len(self.token_ids)) >> 1

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, prompt={self.prompt_index}, sample={self.sample_index}, "
                f"tokens={len(self.prompt_ids)}+{len(self.token_ids)}, {self.status.name})")
