"""Precision: which dtype the weights use, and fp32 master weights when that dtype is bf16.

Mixed precision the standard way (as in Megatron-LM or DeepSpeed): the model's own parameters are
bf16, so the rollout, the reference and the forward/backward passes all run bf16 matmuls (on a GPU,
and on CPUs with AMX or AVX512-BF16, several times faster than fp32). The optimizer, however,
steps fp32 *master* copies: a bf16 weight near 0.05 has a resolution of about 2e-4, so the small
per-step changes of RL fine-tuning (lr ~1e-6..1e-5) would round away entirely in bf16 weights
(measured here: a pure-bf16 run of the main command does not learn at all). After each step
the masters are rounded into the bf16 parameters *stochastically*: up or down with the
probabilities that make the bf16 weight equal the master in expectation. Round-to-nearest would
keep most bf16 weights exactly where they were until many small steps pile up in the master
(measured on the main command: with nearest rounding the policy barely moved in 3 steps, KL
0.003, where fp32 reached 0.25), so the rollout policy would lag the optimizer by many steps.
The rounding draws from a generator seeded by (seed, step), so runs and resumes reproduce.

    weights bf16 | gradients bf16 (cast to fp32 for clipping and the step) | master weights and
    AdamW moments fp32

With fp32 weights the masters are the parameters themselves: no copy, no extra work. With LoRA
(model/lora.py) only the adapters are trainable and they are fp32, so they too are their own
masters: the bf16 base is frozen and never rounded into.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("rlvr_fast")


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AMX or AVX512-BF16) that oneDNN uses."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: auto = bf16 on CUDA and on CPUs with bf16 matrix instructions, else fp32."""
    if name == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


class MasterWeights:
    """fp32 copies of a model's low-precision trainable parameters, for the optimizer to step.

    Use: build the optimizer on `master_params`; after backward call `grads_to_master()`, clip and
    step on the masters, then `master_to_model()`. fp32 parameters are their own masters.
    """

    def __init__(self, model: torch.nn.Module, seed: int = 0):
        self.seed = seed
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master_params = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True)
                              for p in self.params]
        self.enabled = any(m is not p for m, p in zip(self.master_params, self.params))
        if self.enabled:
            n = sum(p.numel() for p in self.params)
            log.info("mixed precision: %s weights, fp32 master weights and optimizer states (%.2f GB of masters)",
                     self.params[0].dtype, 4 * n / 1e9)

    def grads_to_master(self) -> None:
        """Move each parameter's gradient to its master (as fp32) and free the low-precision one."""
        if not self.enabled:
            return
        for p, m in zip(self.params, self.master_params):
            if m is p:
                continue
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def master_to_model(self, step: int = 0) -> None:
        """Round the masters into the model's parameters (stochastically for bf16, see the module doc)."""
        if not self.enabled:
            return
        gen = torch.Generator(device=self.params[0].device).manual_seed(self.seed * 1_000_003 + step)
        # One buffer of random bits per step, each tensor reading it from a random offset: drawing
        # fresh bits for every weight costs ~4x more (CPU generators run at ~3 ns per number).
        largest = max(p.numel() for p, m in zip(self.params, self.master_params) if m is not p)
        bits = torch.empty(largest, dtype=torch.int32, device=self.params[0].device).random_(0, 1 << 16, generator=gen)
        for p, m in zip(self.params, self.master_params):
            if m is p:
                continue
            if p.dtype == torch.bfloat16:
                start = int(torch.randint(0, largest - p.numel() + 1, (), generator=gen))
                p.copy_(stochastic_round_bf16(m, bits[start:start + p.numel()].view(p.shape)))
            else:
                p.copy_(m)

    def zero_grad(self) -> None:
        for t in (*self.params, *self.master_params):
            t.grad = None

    def state_dict(self) -> list[torch.Tensor] | None:
        return [m.detach().clone() for m in self.master_params] if self.enabled else None

    @torch.no_grad()
    def load_state_dict(self, state: list[torch.Tensor] | None) -> None:
        if not self.enabled:
            return
        if state is None or len(state) != len(self.master_params):
            raise ValueError("the checkpoint holds no fp32 master weights for this model (was it trained in "
                             "float32? resume with the same --dtype)")
        for m, saved in zip(self.master_params, state):
            m.copy_(saved)


def stochastic_round_bf16(x: torch.Tensor, noise: torch.Generator | torch.Tensor) -> torch.Tensor:
    """fp32 x -> bf16, rounding up or down at random so that E[result] = x.

    bf16 is the top 16 bits of an fp32: add uniform noise in [0, 2^16) to the bit pattern's low
    16 bits, then truncate them. The carry into the kept bits happens with probability equal to
    the dropped fraction. `noise` is a generator, or int32 noise in [0, 2^16) shaped like x.
    Infinities stay infinite; x is assumed free of NaN (the trainer never steps on non-finite
    gradients) and below 3.39e38 in magnitude, where the carry could reach inf.
    """
    if isinstance(noise, torch.Generator):
        noise = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_(0, 1 << 16, generator=noise)
    rounded = noise + x.contiguous().view(torch.int32)
    rounded.bitwise_and_(-65536)  # -65536 == 0xFFFF0000 as int32
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero
