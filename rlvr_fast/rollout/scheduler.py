"""Scheduler: which sequences run in the next model step (continuous batching with preemption).

Every step is either a *prefill* (admit waiting groups: compute their tokens' K/V in one packed
forward and sample their first token) or a *decode* (one token for every running sequence).
Prefills go first, so a sequence that finishes is replaced by a waiting one at the next step and
no decode step ever computes a finished sequence. A waiting "group" is the G samples of one prompt
(prefilled once, sharing the prompt's blocks) or a single preempted sequence (recomputed from
scratch: prompt plus the tokens it had generated).

When a decode step finds no free block for some sequence, the most recently admitted running
sequence is preempted: its blocks go back to the pool (shared prompt blocks stay while other
samples use them) and it waits, first in line, to be recomputed. Other sequences' blocks are
never touched, so preemption cannot corrupt them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rlvr_fast.rollout.block_manager import BlockManager
from rlvr_fast.rollout.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]
    """Sequences that get a new token this step (prefill: all samples of the admitted groups)."""
    groups: list[list[Sequence]] = field(default_factory=list)
    """Prefill only: sequences with identical tokens, computed once per group."""
    copy_src: list[int] = field(default_factory=list)
    """Prefill only: partial last prompt blocks to copy src[i] -> dst[i] once the prefill wrote them."""
    copy_dst: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_prefill_tokens: int):
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[list[Sequence]] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add_group(self, seqs: list[Sequence]) -> None:
        self.waiting.append(seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule_prefill()
        if batch is not None:
            return batch
        if not self.running:
            # Unreachable when the engine checked that every sequence fits the pool on its own.
            raise RuntimeError(f"the scheduler cannot admit a waiting sequence into an empty KV cache "
                               f"({self.block_manager.num_free} of {self.block_manager.num_blocks} blocks free)")
        self._reserve_decode_slots()
        return ScheduledBatch(is_prefill=False, seqs=list(self.running))

    def _schedule_prefill(self) -> ScheduledBatch | None:
        bm = self.block_manager
        batch = ScheduledBatch(is_prefill=True, seqs=[])
        num_tokens = 0
        while self.waiting:
            group = self.waiting[0]
            group_tokens = group[0].num_tokens
            room = self.max_batch_size - len(self.running)
            if room <= 0 or (batch.groups and num_tokens + group_tokens > self.max_prefill_tokens):
                break
            fit = min(room, bm.max_group_that_fits(group_tokens, len(group)))
            if fit == 0:
                break
            self.waiting.popleft()
            if fit < len(group):  # admit part of the group now; the rest prefills the prompt again later
                self.waiting.appendleft(group[fit:])
                group = group[:fit]
            src, dst = bm.allocate_group(group)
            batch.copy_src += src
            batch.copy_dst += dst
            for seq in group:
                seq.status = SequenceStatus.RUNNING
            self.running += group
            batch.groups.append(group)
            batch.seqs += group
            num_tokens += group_tokens
        return batch if batch.groups else None

    def _reserve_decode_slots(self) -> None:
        bm = self.block_manager
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if bm.can_append(seq):
                bm.append_slot(seq)
                i += 1
                continue
            victim = self.running.pop()  # the newest; possibly seq itself, which then ends the loop
            self._preempt(victim)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft([seq])
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)

    def remove_finished(self) -> None:
        self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
