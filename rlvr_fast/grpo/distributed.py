"""Several processes, one run: `torchrun --nproc-per-node N -m rlvr_fast.train ...` (torch.distributed).

What is split and what is shared, per step (P prompts, G completions each, N ranks):

* every rank draws the same P problems from the shared data generator (seeded identically) and
  generates and scores its contiguous share of them (`local_slice`), whole groups (a group never
  straddles ranks). The engine keys sampling on the *global* prompt index, so the completions are
  those of one process whatever N is.
* the shares are gathered at once (`GRPOTrainer.rollout`): every rank computes the advantages (a
  batch std is the whole batch's), the metrics and the curriculum from all groups.
* the update is data parallel: each rank trains its own groups' completions, weighted by the
  global number of completions (or tokens), so that the sum of the ranks' gradients is the
  one-process gradient; `all_reduce_grads` sums them once per step, in flat fp32 buckets (the
  masters' gradients with bf16 weights). The few loss statistics are all-reduced once.
  `--shard fsdp` shards parameters, gradients and optimizer states instead (fsdp.py).
* rank 0 alone speaks: the other ranks' stdout goes nowhere and their log shows warnings only
  (`init_distributed`); rank 0 writes the metrics, the plot and the checkpoints (checkpointing.py).

Why not DistributedDataParallel: the trainer calls `model.forward_packed` (not `forward`, where
DDP prepares its reducer) and the fused loss reads `model.lm_head.weight` outside any forward; with
gradient accumulation DDP would also need `no_sync` on all micro-batches but the last. One bucketed
all-reduce after the last backward is the same communication with none of those constraints
(what it gives up is overlapping that all-reduce with the last micro-batch's backward).

Failures: collectives time out after --dist-timeout seconds, and a rank that raises records the
error in the rendezvous store and leaves the process group, so that the other ranks' pending
collectives fail at once; rank 0 prints the first recorded error, naming the rank (`Dist.fail`).
A rank that dies without a word (killed, out of memory) makes the others' collectives fail on the
closed connections, or torchrun stop them with SIGTERM (raised here as `Stopped`); the survivors then
name the ranks that no longer answer (`Dist._lost_ranks`).
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("rlvr_fast")

FAILURE_KEY = "rlvr_fast/failure"
REPORTED_KEY = "rlvr_fast/failure_reported"
ANSWER_KEY = "rlvr_fast/alive"
ANSWER_S = 3.0  # how long surviving ranks wait for each other's answer before calling a rank lost
BUCKET_BYTES = 32 << 20


@dataclass
class Dist:
    """This process's place in the run; Dist() is a single process and every collective a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    step: int | None = None  # the training step being run, for failure messages

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_slice(self, n: int) -> slice:
        """This rank's contiguous share of n items; when n does not split evenly the first n % N ranks take one more."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    # ---- collectives ----------------------------------------------------------------------

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sums (or maxima) of a few scalars over ranks, in one collective (float64, so counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t.tolist()

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """obj of every rank, in rank order (pickled: for small per-step records only)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @torch.no_grad()
    def all_reduce_grads(self, params: list[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
        """Sum the gradients of `params` over ranks (a rank with no samples contributes zeros).
        Gradients are flattened into buckets of about bucket_bytes per dtype: a few large
        all-reduces instead of one per tensor."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            bucket: list[torch.Tensor] = []
            size = 0
            for g in grads:
                bucket.append(g)
                size += g.numel() * g.element_size()
                if size >= bucket_bytes:
                    _all_reduce_flat(bucket)
                    bucket, size = [], 0
            if bucket:
                _all_reduce_flat(bucket)

    def _comm_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---- failures -------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> bool:
        """Call on a rank where `exc` was raised, before leaving. The first error of the run is
        recorded in the rendezvous store, and the rank leaves the process group, so that the other
        ranks' pending collectives fail now rather than at the timeout; rank 0 prints the record.
        When a collective failed and no rank recorded why, the surviving ranks find out which are
        lost (`_lost_ranks`) and the message names them; the lowest surviving rank prints it.
        Returns True when `exc` is only the echo of another rank's recorded failure."""
        if not self.enabled or not dist.is_initialized():
            return False
        # torchrun sends SIGTERM to every rank once one has died; finish the message first (it
        # sends SIGKILL 30 s later).
        _try(lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))  # (main thread only)
        store = _try(_store)  # None: no record, the other ranks fail on the closed connections or the timeout
        recorded = _try(lambda: store.get(FAILURE_KEY).decode() if store.check([FAILURE_KEY]) else None)
        echo = bool(recorded) and not recorded.startswith((f"rank {self.rank} ", f"rank {self.rank}:"))
        lost: list[int] = []
        if not echo:
            where = f" at step {self.step + 1}" if self.step is not None else ""
            recorded = f"rank {self.rank}{where}: {type(exc).__name__}: {exc}"
            if _is_collective_error(exc) or isinstance(exc, Stopped):  # and nobody recorded why
                lost = self._lost_ranks(store) if store is not None else []
                if _is_collective_error(exc):
                    recorded += (" (a collective failed and no other rank recorded an error: a rank died or hung, "
                                 "or --dist-timeout passed)")
                if lost:
                    recorded += (f"; lost: {', '.join(f'rank {r}' for r in lost)} (did not answer within "
                                 f"{ANSWER_S:g} s: killed, crashed or hung)")
            _try(lambda: store.compare_set(FAILURE_KEY, "", recorded))  # the first failure wins
        printer = min(set(range(self.world_size)) - set(lost))
        if self.rank == printer:
            if echo or not isinstance(exc, SystemExit):  # Python prints a SystemExit's message itself
                print(f"error: {recorded}" + (" -- stopping all ranks" if echo else ""), file=sys.stderr, flush=True)
            _try(lambda: store.set(REPORTED_KEY, "1"))
        _try(dist.destroy_process_group)
        if self.rank != printer and not echo:
            # Give the printing rank a few seconds: torchrun stops every rank once one exits.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not _try(lambda: store.check([REPORTED_KEY])):
                time.sleep(0.05)
        return echo

    def _lost_ranks(self, store) -> list[int]:
        """The ranks that do not answer within ANSWER_S seconds. Every rank that reaches here posts an
        answer in the rendezvous store (which torchrun's agent keeps, whichever rank died) and waits for
        the others': a rank that was killed, crashed or hangs outside a collective never posts one."""
        _try(lambda: store.set(f"{ANSWER_KEY}/{self.rank}", "1"))
        keys = {r: f"{ANSWER_KEY}/{r}" for r in range(self.world_size) if r != self.rank}
        deadline = time.monotonic() + ANSWER_S
        while True:
            missing = [r for r, key in keys.items() if not _try(lambda: store.check([key]))]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.05)


def _all_reduce_flat(tensors: list[torch.Tensor]) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _store():
    # The default group's store, reached through the rendezvous (set by torchrun's environment).
    return dist.distributed_c10d._get_default_store()


def _try(fn):
    try:
        return fn()
    except Exception:
        return None


def _is_collective_error(exc: BaseException) -> bool:
    text = str(exc).lower()  # gloo raises plain RuntimeErrors
    return isinstance(exc, dist.DistError) or any(w in text for w in ("gloo", "nccl", "timed out", "connection closed"))


# ---- process group ------------------------------------------------------------------------


def init_distributed(timeout_s: int, device: str) -> Dist:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); a plain `python -m` start is a single process, Dist()."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=torch.device("cuda", local_rank) if use_cuda else None)
    if rank != 0:  # one copy of what the run prints and logs, from rank 0 (errors still go to stderr)
        sys.stdout = open(os.devnull, "w")
        logging.getLogger("rlvr_fast").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _stop)  # torchrun's (or a scheduler's) stop: an error that Dist.fail reports
    return Dist(rank, world_size, local_rank)


class Stopped(BaseException):
    """SIGTERM: torchrun stops every rank once one has exited (or died), a scheduler preempts the job.
    A BaseException, like KeyboardInterrupt: no `except Exception` on the way (a reward call) may swallow it."""


def _stop(signum, frame) -> None:
    raise Stopped("SIGTERM: torchrun stops the other ranks when one exits or dies")


def close(d: Dist, finished: bool = False) -> None:
    """Leave the process group. After a finished run the ranks first meet at a barrier, so that none tears
    its gloo/NCCL connections down while a peer is still finishing: PyTorch's own distributed tests do the
    same, and a rank that left alone is a possible cause of a rare abort at exit once seen in a CI run
    ("terminate called without an active exception"). After a failure there is no barrier: a peer may be
    dead, and the failure path has destroyed the group already."""
    if d.enabled:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if d.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def device_for(d: Dist, device: torch.device) -> torch.device:
    """A CUDA rank trains on its own GPU (LOCAL_RANK)."""
    if d.enabled and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device
