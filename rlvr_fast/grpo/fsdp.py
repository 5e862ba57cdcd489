"""--shard fsdp: FSDP2 (`fully_shard` per decoder layer and on the root) shards parameters, gradients
and optimizer states over the ranks, instead of every rank holding the whole model (distributed.py).

What the trainer does differently: `FSDP.shard` wraps the model (and the frozen reference) once;
a rollout runs inside `full_weights` (every rank gathers the whole model, generates, frees it);
every rank runs as many forward/backward passes per step as the busiest one (`plan_passes`,
`even_passes`); checkpoints gather the weights to rank 0 (`full_state_dict`) and each rank adds
its optimizer shard (checkpointing.py). The functions here that take a model are no-ops on a model
that is not sharded.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

from rlvr_fast.grpo.distributed import Dist
from rlvr_fast.model.attention import PackedBatch

log = logging.getLogger("rlvr_fast")


def is_sharded(model: torch.nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # imported by FSDP.shard: a run without it skips the import
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


class FSDP:
    """The sharding of one run over the ranks of `dist`; compute_dtype: --dtype (the shards stay fp32)."""

    def __init__(self, dist: Dist, compute_dtype: torch.dtype):
        self.dist, self.compute_dtype = dist, compute_dtype
        self.passes = 0  # the most micro-batches any rank trains this step (plan_passes)

    def shard(self, model: torch.nn.Module, ref_model: torch.nn.Module | None) -> None:
        """`fully_shard` each decoder layer, then the root (embeddings, final norm, head).

        Precision: the sharded parameters (the optimizer's, and what checkpoints hold) are fp32; with
        a bf16 --dtype, MixedPrecisionPolicy all-gathers them as bf16 for the forward and backward
        and reduce-scatters the gradients in fp32 -- FSDP's own form of the single-device path's fp32
        master weights (precision.py), with round-to-nearest instead of stochastic rounding. The
        frozen reference is cast to the compute dtype and sharded as is.

        The root keeps its weights gathered after a forward (reshard_after_forward=False): the
        fused loss reads `model.lm_head.weight` after `forward_packed` returns; the backward
        reshards it (and `even_passes` after no-grad passes)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        low = self.compute_dtype != torch.float32
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
                 self.dist.world_size, f", {self.compute_dtype} compute" if low else "")

    def plan_passes(self, passes: int) -> None:
        """Every forward all-gathers and every backward reduce-scatters, so each rank must run as many
        micro-batches as the busiest one; agree on that number once per step, before the first pass
        (a collective inside the passes would meet another rank's all-gather)."""
        self.passes = int(self.dist.all_reduce([passes], op="max")[0])

    def even_passes(self, model: torch.nn.Module, passes: int, train: bool) -> None:
        """After its `passes` micro-batches, a rank with fewer than the step's most (or none: all its
        groups had equal rewards) runs one-token passes whose loss is 0 times the output. Then the
        root's gathered weights are freed (a backward already did it in training)."""
        device = model.lm_head.weight.device
        ids = torch.zeros(1, dtype=torch.long, device=device)
        batch = PackedBatch.from_cu_seqlens(torch.tensor([0, 1], dtype=torch.int32, device=device), 1)
        for _ in range(self.passes - passes):
            hidden = model.forward_packed(ids, batch)
            if train:  # every parameter, the head included, gets a (zero) gradient, as on the other ranks
                (hidden.sum() * 0 + model.lm_head.weight.sum() * 0).backward()
        if not train:
            model.reshard()


@contextmanager
def full_weights(model: torch.nn.Module) -> Iterator[None]:
    """Every rank gathers the whole model for a rollout and frees it after. generate() must not run
    collectives (ranks decode different numbers of steps), so nothing is gathered or freed inside it."""
    if not is_sharded(model):
        yield
        return
    modules = [m for m in model.modules() if is_sharded(m)]
    model.set_reshard_after_forward(False)
    for m in modules:  # same order on every rank
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # the root: see FSDP.shard()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded weights on CPU (every rank takes part); None for a model that is not sharded."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. the grad norm of sharded gradients) as a plain tensor; others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
