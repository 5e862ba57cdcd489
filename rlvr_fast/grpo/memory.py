"""Where a run's memory goes: an estimate per component at start, the measured peak of each step.

`estimate_memory` counts, from the model as built (adapters included) and the run's settings:

    weights            every parameter, once (tied embeddings once)
    gradients          trainable parameters, in their own dtype
    master weights     fp32 copies of trainable bf16 parameters (precision.py); 0 in fp32 and for fp32 adapters
    optimizer states   AdamW's two fp32 moments per trainable parameter
    reference          the frozen copy for the KL term: the base weights with beta > 0 in full
                       fine-tuning, 0 with LoRA (adapters off) or beta = 0
    KV cache pool      the rollout engine's blocks, held through the run
    activations        saved for backward, per token x --micro-batch-tokens (see activation_bytes_per_token)

The activation figure is an estimate from the layer shapes (checked against the tensors autograd
actually saves on a tiny model in tests/test_memory.py); the rest are exact tensor sizes. Not
counted: the allocator's slack, temporaries, attention's quadratic scores when SDPA falls back to
its math path, the CPU rollout's packed weight copies (alive only while generating), the fused loss's
[chunk, vocab] logits chunk.

`peak_memory_bytes` after `reset_peak_memory` gives the peak of one step: CUDA's max allocated
bytes (reset per step), or on Linux the process's peak resident set (VmHWM, reset by writing "5"
to /proc/self/clear_refs, the same method bench/benchlib.py uses). Where that reset is not possible
the CPU figure is the peak RSS of the whole process so far (getrusage), and `peak_memory_scope`
says "process" instead of "step".
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from rlvr_fast.model.lora import has_lora


@dataclass(kw_only=True)
class MemoryEstimate:
    weights: int
    gradients: int
    master_weights: int
    optimizer_states: int
    reference: int
    reference_note: str
    kv_cache: int
    activations_per_token: int
    micro_batch_tokens: int

    @property
    def activations(self) -> int:
        return self.activations_per_token * self.micro_batch_tokens

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.master_weights + self.optimizer_states + self.reference
                + self.kv_cache + self.activations)

    def table(self) -> str:
        rows = [("weights", self.weights, ""), ("gradients", self.gradients, ""),
                ("master weights", self.master_weights, ""), ("optimizer states", self.optimizer_states, "AdamW, fp32"),
                ("reference copy", self.reference, self.reference_note), ("KV cache pool", self.kv_cache, ""),
                ("activations", self.activations,
                 f"{self.activations_per_token:,} B/token x {self.micro_batch_tokens} micro-batch tokens"),
                ("total", self.total, "estimate; allocator slack and temporaries not included")]
        lines = ["memory estimate:"] + [f"  {name:<17} {format_bytes(n):>10}  {note}".rstrip() for name, n, note in rows]
        return "\n".join(lines)


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def estimate_memory(model: torch.nn.Module, *, beta: float, grad_checkpoint: bool, micro_batch_tokens: int,
                    kv_cache_bytes: int) -> MemoryEstimate:
    """The memory of a GRPO run per component, for the model as it will train (see the module doc)."""
    params = list(model.parameters())  # tied weights appear once
    trainable = [p for p in params if p.requires_grad]
    lora = has_lora(model)
    base = [p for p in params if not lora or not p.requires_grad]  # what a reference copy would hold
    if beta <= 0:
        ref, note = 0, "beta = 0: no KL term"
    elif lora:
        ref, note = 0, "none: LoRA, the reference is the model with adapters off"
    else:
        ref, note = _nbytes(base), "frozen copy of the initial weights"
    return MemoryEstimate(
        weights=_nbytes(params),
        gradients=_nbytes(trainable),
        master_weights=4 * sum(p.numel() for p in trainable if p.dtype != torch.float32),
        optimizer_states=8 * sum(p.numel() for p in trainable),
        reference=ref, reference_note=note,
        kv_cache=kv_cache_bytes,
        activations_per_token=activation_bytes_per_token(model, grad_checkpoint),
        micro_batch_tokens=micro_batch_tokens,
    )


def activation_bytes_per_token(model: torch.nn.Module, grad_checkpoint: bool) -> int:
    """Bytes autograd keeps per trained token for backward, from the layer shapes.

    Without checkpointing every layer keeps layer_activation_bytes_per_token; with it a layer keeps
    only its input (H values) and one layer's full set exists while it is recomputed in backward.
    Around the layers: rotary cos/sin (2 head_dim), the final norm (fp32 input, rsqrt, output) and
    the loss's input hidden state; the embedding backward's token ids in full fine-tuning.
    """
    cfg = model.config
    h, a = cfg.hidden_size, model.dtype.itemsize
    per_layer = layer_activation_bytes_per_token(model)
    body = cfg.num_hidden_layers * (a * h if grad_checkpoint else per_layer) + (per_layer if grad_checkpoint else 0)
    final_norm = 4 * h + 4 + (0 if has_lora(model) else a * h)
    ids = 0 if has_lora(model) else 8
    return body + 2 * a * cfg.head_dim + final_norm + a * h + ids


def layer_activation_bytes_per_token(model: torch.nn.Module) -> int:
    """One decoder layer's saved activations per token (a = bytes of the activation dtype).

    Each RMSNorm: an fp32 copy of its input (the input itself in fp32), the rsqrt, the normalised
    value and the output (4 H + 4 + 2 a H). Attention: q/k/v padded per sequence for SDPA, its output
    and per-head log-sum-exp, the gathered output that o_proj reads (a (3 Q + 2 KV) + 4 heads, with
    Q = heads x head_dim, KV likewise). MLP: gate, up, silu(gate), their product (4 a I). With LoRA
    each adapter keeps its rank-r intermediate (the projections' inputs are kept as before, now for
    the adapters' A), and the norms' weights are frozen, so their normalised values are not kept.
    """
    cfg = model.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    a = model.dtype.itemsize
    per_layer = 2 * (4 * h + 4 + 2 * a * h) + a * (3 * q + 2 * kv) + 4 * cfg.num_attention_heads + 4 * a * i
    lora_cfg = getattr(model, "lora_config", None)
    if lora_cfg is not None:
        per_layer += a * lora_cfg.rank * len(lora_cfg.targets) - 2 * a * h  # frozen norm weights need no normalised value
    return per_layer


# ----------------------------------------------------------------------------- measured peak


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_CAN_RESET_RSS: bool | None = None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (one training step)."""
    global _CAN_RESET_RSS
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _CAN_RESET_RSS is None or _CAN_RESET_RSS:
        _CAN_RESET_RSS = _clear_refs_works()


def peak_memory_scope(device: torch.device) -> str:
    return "step" if device.type == "cuda" or _CAN_RESET_RSS else "process"


def status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB (e.g. VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since the last reset_peak_memory: CUDA max allocated, else peak RSS (see the module doc)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if _CAN_RESET_RSS:
        return status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
