"""Several processes, one run: `torchrun --nproc-per-node N -m rlvr_fast.train ...` (torch.distributed).

What is split and what is shared, per step (P prompts, G completions each, N ranks):

* every rank draws the same P problems from the shared data generator (seeded identically) and
  generates and scores its contiguous P / N of them, whole groups (a group never straddles
  ranks). The engine keys sampling on the *global* prompt index, so the completions are those of
  one process whatever N is.
* the step's rollout records are gathered once (`gather_rollout`): every rank computes the
  advantages (a batch std is the whole batch's), the metrics and the curriculum from all groups.
* the update is data parallel: each rank trains its own groups' completions, weighted by the
  global number of completions (or tokens), so that the sum of the ranks' gradients is the
  one-process gradient; `all_reduce_grads` sums them once per step, in flat fp32 buckets (the
  masters' gradients with bf16 weights). The few loss statistics are all-reduced once.
* rank 0 alone prints and writes metrics, samples, evaluations, the plot and checkpoints
  (`Dist.print`, `Dist.writer`, `Dist.save_checkpoint`). Evaluation problems are split too.

Why not DistributedDataParallel: the trainer calls `model.forward_packed` (not `forward`, where
DDP prepares its reducer) and the fused loss reads `model.lm_head.weight` outside any forward; with
gradient accumulation DDP would also need `no_sync` on all micro-batches but the last. One bucketed
all-reduce after the last backward is the same communication with none of those constraints
(what it gives up is overlapping that all-reduce with the last micro-batch's backward).

`--shard fsdp` (FSDP2: `fully_shard` per decoder layer and on the root) shards parameters,
gradients and optimizer states instead: see `shard_model`, `full_weights` (rollouts) and
`even_passes` (every rank runs as many forward/backward passes as the busiest).

Failures: collectives time out after --dist-timeout seconds, and a rank that raises records the
error in the rendezvous store and leaves the process group, so that the other ranks' pending
collectives fail at once; rank 0 prints the first recorded error, naming the rank (`Dist.fail`).
A rank that dies without a word (killed, out of memory) makes the others' collectives fail on the
closed connections, or torchrun stop them with SIGTERM (raised here as `Stopped`); the survivors then
name the ranks that no longer answer (`Dist._lost_ranks`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from rlvr_fast.checkpoint import save_pretrained
from rlvr_fast.grpo import checkpointing
from rlvr_fast.grpo.report import JsonlWriter
from rlvr_fast.model.attention import PackedBatch

log = logging.getLogger("rlvr_fast")

FAILURE_KEY = "rlvr_fast/failure"
REPORTED_KEY = "rlvr_fast/failure_reported"
ANSWER_KEY = "rlvr_fast/alive"
ANSWER_S = 3.0  # how long surviving ranks wait for each other's answer before calling a rank lost
BUCKET_BYTES = 32 << 20


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
    passes: int = 0  # FSDP: the most micro-batches any rank trains this step (plan_passes)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.shard == "fsdp" and self.enabled  # one process has nothing to shard over

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

    def all_reduce_max(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
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
        if not self.enabled or self.fsdp:  # FSDP reduce-scatters the gradients itself, in backward
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

    # ---- FSDP2 -----------------------------------------------------------------------------

    def shard_model(self, model: torch.nn.Module, ref_model: torch.nn.Module | None) -> None:
        """--shard fsdp: `fully_shard` each decoder layer, then the root (embeddings, final norm, head).

        Precision: the sharded parameters (the optimizer's, and what checkpoints hold) are fp32; with
        a bf16 --dtype, MixedPrecisionPolicy all-gathers them as bf16 for the forward and backward
        and reduce-scatters the gradients in fp32 -- FSDP's own form of the single-device path's fp32
        master weights (precision.py), with round-to-nearest instead of stochastic rounding. The
        frozen reference is cast to the compute dtype and sharded as is.

        The root keeps its weights gathered after a forward (reshard_after_forward=False): the
        fused loss reads `model.lm_head.weight` after `forward_packed` returns; the backward
        reshards it (and `even_passes` after no-grad passes)."""
        if not self.fsdp:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        low = self.compute_dtype not in (None, torch.float32)
        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32) if low else None
        for m, mp in ((model, policy), (ref_model, None)):
            if m is None:
                continue
            if m is ref_model and low:
                m.to(self.compute_dtype)
            kwargs = {"mp_policy": mp} if mp is not None else {}
            for layer in m.model.layers:
                fully_shard(layer, **kwargs)
            fully_shard(m, reshard_after_forward=False, **kwargs)
            for module in (*m.model.layers, m):  # sum, not average: the loss weights are already global
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
            for name in ("forward_packed", "forward_cached"):  # FSDP's hooks wrap forward() only by default
                register_fsdp_forward_method(m, name)
        log.info("FSDP2: parameters, gradients and optimizer states sharded over %d ranks (fp32 shards%s)",
                 self.world_size, f", {self.compute_dtype} compute" if low else "")

    @contextmanager
    def full_weights(self, model: torch.nn.Module) -> Iterator[None]:
        """FSDP: every rank gathers the whole model for a rollout and frees it after. generate() must
        not run collectives (ranks decode different numbers of steps), so nothing is gathered or
        freed inside it. A no-op without FSDP."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        model.set_reshard_after_forward(False)
        for m in modules:  # same order on every rank
            m.unshard()
        try:
            yield
        finally:
            for m in modules:
                m.reshard()
            model.set_reshard_after_forward(True)
            model.set_reshard_after_forward(False, recurse=False)  # the root: see shard_model()

    def plan_passes(self, passes: int) -> None:
        """FSDP: every forward all-gathers and every backward reduce-scatters, so each rank must run
        as many micro-batches as the busiest one; agree on that number once per step, before the
        first pass (a collective inside the passes would meet another rank's all-gather)."""
        if self.fsdp:
            self.passes = int(self.all_reduce_max([passes])[0])

    def even_passes(self, model: torch.nn.Module, passes: int, train: bool) -> None:
        """FSDP: after its `passes` micro-batches, a rank with fewer than the step's most (or none:
        all its groups had equal rewards) runs one-token passes whose loss is 0 times the output.
        Then the root's gathered weights are freed (a backward already did it in training)."""
        if not self.fsdp:
            return
        device = model.lm_head.weight.device
        ids = torch.zeros(1, dtype=torch.long, device=device)
        batch = PackedBatch.from_cu_seqlens(torch.tensor([0, 1], dtype=torch.int32, device=device), 1)
        for _ in range(self.passes - passes):
            hidden = model.forward_packed(ids, batch)
            if train:  # every parameter, the head included, gets a (zero) gradient, as on the other ranks
                (hidden.sum() * 0 + model.lm_head.weight.sum() * 0).backward()
        if not train:
            model.reshard()

    # ---- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self, output: Path, step: int, model, tokenizer, state: dict[str, Any]) -> Path:
        """Rank 0 writes the HF-layout weights (with FSDP, gathered from all ranks to its CPU) and the
        trainer state. With FSDP each rank also writes its optimizer shard into the staging directory,
        before rank 0 writes the manifest and moves the checkpoint into place (checkpointing.py)."""
        path = output / f"checkpoint-{step}"
        state = {**state, "world_size": self.world_size, "shard": "fsdp" if self.fsdp else "none"}
        if not self.fsdp:
            if self.is_main:
                checkpointing.save_checkpoint(output, step, model, tokenizer, state)
            self.barrier()  # no rank goes on before the checkpoint is complete
            return path
        full = self._full_state_dict(model)
        optimizer = state.pop("optimizer")

        def write_shards(staging: Path) -> None:
            self.barrier()  # the weights are in the staging directory: every rank adds its shard
            checkpointing.save_rank_state(staging, self.rank, {"optimizer": optimizer, "world_size": self.world_size})
            self.barrier()

        if self.is_main:
            checkpointing.save_checkpoint(output, step, model, tokenizer, state, model_state=full,
                                          before_manifest=write_shards)
        else:
            write_shards(checkpointing.staging_dir(output, step))
        self.barrier()
        return path

    def save_model(self, model, tokenizer, path: Path) -> None:
        """Rank 0 writes the HF-layout model to path (with FSDP, gathered from all ranks to its CPU)."""
        full = self._full_state_dict(model) if self.fsdp else None
        if self.is_main:
            save_pretrained(model, tokenizer, path, state_dict=full)  # atomic on its own
        self.barrier()

    @staticmethod
    def _full_state_dict(model) -> dict[str, torch.Tensor]:
        """FSDP: every rank takes part; the unsharded weights land on CPU."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state(self, checkpoint: Path) -> dict[str, Any]:
        """The trainer state of `checkpoint` for this rank (with FSDP, its optimizer shard)."""
        state = checkpointing.load_state(checkpoint)
        saved_shard, saved_world = state.get("shard", "none"), state.get("world_size", 1)
        if saved_shard == "fsdp" and (self.shard != "fsdp" or saved_world != self.world_size):
            raise ValueError(f"{checkpoint} holds optimizer states sharded over {saved_world} ranks (--shard fsdp): "
                             f"resume it with --shard fsdp on {saved_world} ranks in all, not {self.world_size}")
        if saved_shard == "none" and self.fsdp:
            raise ValueError(f"{checkpoint} was saved with --shard none: resume it with --shard none")
        if self.fsdp:
            state["optimizer"] = checkpointing.load_rank_state(checkpoint, self.rank)["optimizer"]
        return state


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. the grad norm of FSDP-sharded gradients) as a plain tensor; others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gather_rollout(d: Dist, ro):
    """The step's rollout records of all ranks, in rank order (= global prompt order): one collective."""
    if not d.enabled:
        return ro
    parts = d.all_gather_objects(ro)
    return dataclasses.replace(
        ro, problems=[p for r in parts for p in r.problems], prompt_ids=[p for r in parts for p in r.prompt_ids],
        completions=[g for r in parts for g in r.completions], components=[c for r in parts for c in r.components],
        rewards=torch.cat([r.rewards for r in parts]), reward_errors=sum(r.reward_errors for r in parts),
        reward_timeouts=sum(r.reward_timeouts for r in parts),
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
    text = str(exc).lower()  # gloo raises plain RuntimeErrors
    return isinstance(exc, dist.DistError) or any(w in text for w in ("gloo", "nccl", "timed out", "connection closed"))


# ---- process group ------------------------------------------------------------------------


def init_distributed(timeout_s: int, device: str, shard: str = "none") -> Dist:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); a plain `python -m` start is a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        if shard == "fsdp":
            log.warning("--shard fsdp: a single process has nothing to shard over (start with torchrun); ignored")
        return Dist(shard=shard)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=torch.device("cuda", local_rank) if use_cuda else None)
    if rank != 0:  # one copy of the INFO lines, from rank 0
        logging.getLogger("rlvr_fast").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _stop)  # torchrun's (or a scheduler's) stop: an error that Dist.fail reports
    return Dist(rank, world_size, local_rank, shard)


class Stopped(BaseException):
    """SIGTERM: torchrun stops every rank once one has exited (or died), a scheduler preempts the job.
    A BaseException, like KeyboardInterrupt: no `except Exception` on the way (a reward call) may swallow it."""


def _stop(signum, frame) -> None:
    raise Stopped("SIGTERM: torchrun stops the other ranks when one exits or dies")


def close(d: Dist) -> None:
    if d.enabled:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def device_for(d: Dist, device: torch.device) -> torch.device:
    """A CUDA rank trains on its own GPU (LOCAL_RANK)."""
    if d.enabled and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device
