"""Several processes, one run: `torchrun --nproc-per-node N -m rlvr_fast.train ...` (torch.distributed).

What is split and what is shared, per step (P prompts, G completions each, N ranks):

* every rank draws the same P problems from the shared data generator (seeded identically) and
  takes its contiguous P / N of them: it generates, scores and computes advantages for whole
  groups (a group never straddles ranks). The engine keys sampling on the *global* prompt index,
  so the completions are those of one process whatever N is.
* the update is data parallel: each rank runs its micro-batches, weighted by the global number of
  completions (or tokens) so that the summed gradient is the one-process gradient; then
  `all_reduce_grads` sums the gradients over ranks, once per step, in flat buckets.
* metrics are global: the step's rollout records are gathered once per step (`gather_rollouts`),
  the update's few scalar sums are all-reduced once (`all_reduce_sum`).
* rank 0 alone writes metrics, samples, evaluations, the plot, the progress line and checkpoints
  (`Dist.writer`, `Dist.print`).

Why not DistributedDataParallel: the trainer calls `model.forward_packed` (not `forward`, where
DDP prepares its reducer) and the fused loss reads `model.lm_head.weight` outside any forward; with
gradient accumulation DDP would also need `no_sync` on all micro-batches but the last. One bucketed
all-reduce after the last backward does the same communication with none of those constraints
(what it gives up is overlapping that all-reduce with the last micro-batch's backward).

`--shard fsdp` (FSDP2, `fully_shard` per decoder layer and on the root) shards parameters,
gradients and optimizer states instead; see `shard_model`.

Failures: collectives time out after --dist-timeout seconds, and a rank that raises records the
error in the rendezvous store and leaves the process group, so the other ranks' pending collectives
fail at once; rank 0 then prints which rank failed and why (`fail`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from rlvr_fast.grpo.report import JsonlWriter

log = logging.getLogger("rlvr_fast")

FAILURE_KEY = "rlvr_fast/failure"
REPORTED_KEY = "rlvr_fast/failure_reported"
BUCKET_BYTES = 32 << 20


class DistributedError(RuntimeError):
    """Another rank failed, or a collective timed out."""


class NullWriter:
    """What a rank other than 0 gets instead of a JsonlWriter: writes nothing, reads nothing."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        pass

    def read(self) -> list[dict[str, Any]]:
        return []


@dataclass
class Dist:
    """This process's place in the run; Dist() is a single process and every method a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    shard: str = "none"  # "none": every rank holds the whole model; "fsdp": FSDP2 shards
    compute_dtype: torch.dtype | None = None  # --shard fsdp: the MixedPrecisionPolicy's param_dtype
    step: int | None = None  # the training step being run, for failure messages

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.shard == "fsdp"

    # ---- rank 0 output --------------------------------------------------------------------

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def writer(self, path: Path, truncate_after_step: int | None = None) -> JsonlWriter | NullWriter:
        return (JsonlWriter if self.is_main else NullWriter)(path, truncate_after_step=truncate_after_step)

    # ---- splitting the work ---------------------------------------------------------------

    def local_slice(self, n: int, exact: bool = True) -> slice:
        """This rank's contiguous share of n items. exact: n must split evenly (training prompts);
        otherwise the first n % N ranks take one more (evaluation problems)."""
        if exact and n % self.world_size:
            raise ValueError(f"--prompts-per-step {n} does not split over {self.world_size} ranks: use a multiple "
                             f"of {self.world_size} (every rank generates whole groups)")
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    # ---- collectives ----------------------------------------------------------------------

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums of a few scalars over ranks, in one collective (float64, so counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
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
        """Call on a rank where `exc` was raised, before leaving. Its own error is recorded in the
        rendezvous store and the rank leaves the process group, so that the other ranks' pending
        collectives fail now rather than at the timeout; rank 0 prints the first recorded error.
        Returns True when `exc` is only the echo of another rank's failure (a failed collective)."""
        if not self.enabled or not dist.is_initialized():
            return False
        store = _store()
        echo = _is_collective_error(exc)
        if echo:
            if self.is_main:
                print(f"error: {self.failure_message(store, exc)}", file=sys.stderr, flush=True)
        else:
            where = f" at step {self.step + 1}" if self.step is not None else ""
            record = f"rank {self.rank}{where}: {type(exc).__name__}: {exc}"
            _try(lambda: store.compare_set(FAILURE_KEY, "", record))  # the first failure wins
            if self.is_main and not isinstance(exc, SystemExit):  # Python prints a SystemExit's message itself
                print(f"error: {record}", file=sys.stderr, flush=True)
        if self.is_main:
            _try(lambda: store.set(REPORTED_KEY, "1"))
        _try(dist.destroy_process_group)
        if not self.is_main and not echo:
            # Give rank 0 a few seconds to print the message: torchrun stops every rank once one exits.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not _try(lambda: store.check([REPORTED_KEY])):
                time.sleep(0.05)
        return echo

    def failure_message(self, store, exc: BaseException) -> str:
        recorded = _try(lambda: store.get(FAILURE_KEY).decode() if store.check([FAILURE_KEY]) else None)
        if recorded:
            return f"{recorded} -- stopping all ranks"
        return (f"a collective failed on rank {self.rank} and no rank recorded an error (a rank died or hung, or "
                f"--dist-timeout passed): {type(exc).__name__}: {exc}")


def gather_rollout(d: Dist, ro):
    """The step's rollout records of all ranks, in rank order (= global prompt order): one collective."""
    if not d.enabled:
        return ro
    parts = d.all_gather_objects(ro)
    return dataclasses.replace(
        ro, problems=[p for r in parts for p in r.problems], prompt_ids=[p for r in parts for p in r.prompt_ids],
        completions=[g for r in parts for g in r.completions], components=[c for r in parts for c in r.components],
        rewards=torch.cat([r.rewards for r in parts]), reward_errors=sum(r.reward_errors for r in parts),
        seconds=max(r.seconds for r in parts))


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
    return isinstance(exc, (dist.DistBackendError, dist.DistError)) or "gloo" in str(exc).lower()


# ---- process group ------------------------------------------------------------------------


def init_distributed(timeout_s: int, device: str, shard: str = "none") -> Dist:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); a plain `python -m` start is a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(shard=shard)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=torch.device("cuda", local_rank) if use_cuda else None)
    if rank != 0:  # one copy of the INFO lines, from rank 0
        logging.getLogger("rlvr_fast").setLevel(logging.WARNING)
    return Dist(rank, world_size, local_rank, shard)


def close(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def device_for(d: Dist, device: torch.device) -> torch.device:
    """A CUDA rank trains on its own GPU (LOCAL_RANK)."""
    if d.enabled and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device
