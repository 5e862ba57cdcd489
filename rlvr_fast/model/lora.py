"""LoRA: trainable low-rank updates on frozen projection weights, and the base model for free.

    apply_lora(model, LoRAConfig(rank=16, alpha=32, targets=("q", "v")))   # in place
    with lora_disabled(model):                                              # the base model again
        ref_logits = model(ids)

A target projection y = x W^T + b becomes y = x W^T + b + s (x A^T) B^T with A [r, in], B [out, r],
s = alpha / r. W and b stay the same Parameter objects (frozen, in the model's dtype, never
copied); A and B are fp32 whatever the base dtype, so they need no master copy and their small
updates are not lost to bf16 rounding (with bf16 activations the matmuls run in bf16 on casts of
A and B, like the rest of the model's). B starts at zero, so a fresh adapter leaves the model
exactly unchanged, and with the adapters switched off the model *is* the base model: GRPO's KL
reference needs no second copy of the weights.

The update is applied unmerged, x -> (x A^T) B^T beside the base matmul, in training, in
reference passes and in the rollout engine on CUDA and with bf16 weights. Merging W + s B A into a
weight buffer is not done there because with bf16 base weights the merged buffer would be rounded
to bf16, whose resolution (about 4e-3 relative) is coarser than a few steps' worth of adapter
update, so the rollout policy would lag the trained one (the reason precision.py keeps fp32
masters); on CUDA a merged buffer would also be a second copy of every adapted weight. The
exception is the CPU rollout with fp32 weights: it already builds fused, pre-packed copies of the
projection weights for every rollout (packed.py), and merges the adapters into those copies
(exact to fp32 rounding, one B A product per adapter and rollout): measured on one decoder layer's
projections at a decode batch of 16, the per-call adapter matmuls took 1.56x the time of the base
projections and the merged copies 1.14x (bench/RESULTS.md, bench_memory.py --rollout; one run on a shared
2-core CPU, where whole-rollout times were too noisy to resolve the difference).

Module names follow PEFT's (`q_proj.lora_A.weight`, `q_proj.lora_B.weight`), so adapters save in
the layout PEFT loads (rlvr_fast/checkpoint/adapters.py).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

# Short names for --lora-targets -> the module path inside a decoder layer (HF names).
TARGET_MODULES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
ALL_TARGETS = tuple(TARGET_MODULES)


@dataclass(kw_only=True)
class LoRAConfig:
    rank: int
    """r: the inner width of each adapter."""
    alpha: float
    """The update is scaled by alpha / rank."""
    targets: tuple[str, ...] = ALL_TARGETS
    """Which projections of every decoder layer get an adapter (keys of TARGET_MODULES)."""
    base_model: str | None = None
    """Where the frozen base weights come from (adapter_config.json's base_model_name_or_path)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: choose from {', '.join(ALL_TARGETS)} "
                             f"(comma-separated, e.g. q,k,v,o,gate,up,down)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def parse_targets(cls, text: str) -> tuple[str, ...]:
        return tuple(t.strip() for t in text.split(",") if t.strip())


class LoRALinear(nn.Linear):
    """An nn.Linear (sharing the original's weight and bias) plus a low-rank update s * B A."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: no copy
        dev = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=dev, dtype=torch.float32)
        with torch.no_grad():
            # A as nn.Linear initialises its weight (PEFT's default too), B zero: the start is the base model.
            bound = 1 / math.sqrt(self.in_features)
            self.lora_A.weight.uniform_(-bound, bound, generator=generator)
            self.lora_B.weight.zero_()
        self.scale = scale
        self.enabled = True

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s * (x A^T) B^T in x's dtype. With bf16 activations the fp32 adapters are cast for the matmuls
        (as the bf16 base weights are used): gradients are computed in bf16 like the full model's, and
        accumulate into the fp32 adapters' .grad; no fp32 copy of x is kept for backward."""
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        return F.linear(F.linear(x, a), b) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.lora_delta(x) if self.enabled else y

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + s B A in W's dtype (summed in fp32), a new tensor."""
        delta = self.lora_B.weight @ self.lora_A.weight
        return (self.weight.float() + self.scale * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.out_features}, scale={self.scale:g}"


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[nn.Parameter]:
    """Put adapters on cfg.targets of every decoder layer of `model` (in place) and freeze everything
    else. Returns the adapter parameters: the only trainable ones."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    gen = torch.Generator(device=model.device).manual_seed(seed)
    model.requires_grad_(False)
    for layer in model.model.layers:
        for target in cfg.targets:
            parent_name, _, name = TARGET_MODULES[target].rpartition(".")
            parent = layer.get_submodule(parent_name)
            setattr(parent, name, LoRALinear(getattr(parent, name), cfg.rank, cfg.scale, gen))
    model.lora_config = cfg
    return [p for p in model.parameters() if p.requires_grad]


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear))


def has_lora(model: nn.Module) -> bool:
    return getattr(model, "lora_config", None) is not None


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under the model's own names (e.g. model.layers.0.self_attn.q_proj.lora_A.weight)."""
    return {name: t for name, t in model.state_dict().items() if ".lora_A." in name or ".lora_B." in name}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The HF-layout state dict of the adapted model: each target weight replaced by W + s B A."""
    state = {name: t for name, t in model.state_dict().items() if ".lora_A." not in name and ".lora_B." not in name}
    for name, m in lora_modules(model):
        state[name + ".weight"] = m.merged_weight()
    return state


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Within this block the model computes with its base weights only (adapters off)."""
    mods = [m for _, m in lora_modules(model)]
    previous = [m.enabled for m in mods]
    try:
        for m in mods:
            m.enabled = False
        yield
    finally:
        for m, was in zip(mods, previous):
            m.enabled = was
