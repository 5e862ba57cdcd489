"""BlockManager: hands out fixed-size KV cache blocks, shares prompt blocks, counts references.

Pure bookkeeping on the host; the K/V tensors live in the ModelRunner. A block holds the K/V of
`block_size` consecutive tokens of a sequence. The G samples of one GRPO prompt share the
prompt's *full* blocks (reference count G, written once by one prefill); each sample owns a copy
of the partly filled last prompt block (copied right after the prefill, since every sample
appends its own tokens to it) and every block after it. A block goes back to the free pool when
its reference count drops to zero.
"""

from __future__ import annotations

from collections import deque

from rlvr_fast.rollout.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.num_allocations = 0  # cumulative count of blocks taken from the pool (tests, stats)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def _take(self) -> int:
        block = self._free.popleft()
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        self.num_allocations += 1
        return block

    def blocks_needed(self, num_tokens: int, group_size: int) -> int:
        """Blocks a group of `group_size` sequences sharing `num_tokens` tokens needs for them plus one
        new token each: the shared full blocks once, the rest once per sequence."""
        shared = num_tokens // self.block_size
        return shared + group_size * (cdiv(num_tokens + 1, self.block_size) - shared)

    def max_group_that_fits(self, num_tokens: int, group_size: int) -> int:
        """How many of a group's sequences can be admitted now (0 if not even one)."""
        shared = num_tokens // self.block_size
        per_seq = cdiv(num_tokens + 1, self.block_size) - shared
        if self.num_free < shared + per_seq:
            return 0
        return min(group_size, (self.num_free - shared) // per_seq)

    def allocate_group(self, seqs: list[Sequence]) -> tuple[list[int], list[int]]:
        """Block tables for sequences with identical tokens (the samples of one prompt, or one
        preempted sequence). Returns (src, dst) block lists: the caller copies the K/V of the
        partial last block src[i] -> dst[i] after the prefill has written it."""
        num_tokens = seqs[0].num_tokens
        shared = [self._take() for _ in range(num_tokens // self.block_size)]
        for block in shared:
            self.ref_counts[block] = len(seqs)
        src, dst = [], []
        partial = num_tokens % self.block_size != 0
        for i, seq in enumerate(seqs):
            assert not seq.block_table, f"{seq} already holds blocks"
            seq.block_table = list(shared)
            if partial:
                block = self._take()
                seq.block_table.append(block)
                if i > 0:
                    src.append(seqs[0].block_table[-1])
                    dst.append(block)
        return src, dst

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next decode step's token of `seq` finds a slot (in its blocks or a free one)."""
        return len(seq.block_table) * self.block_size >= seq.num_tokens or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make room for the K/V of seq's last token (position num_tokens - 1)."""
        if len(seq.block_table) * self.block_size < seq.num_tokens:
            seq.block_table.append(self._take())
        # Samples only ever write into blocks they own: the shared ones are full.
        assert self.ref_counts[seq.block_table[(seq.num_tokens - 1) // self.block_size]] == 1

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self._free.append(block)
        seq.block_table = []
