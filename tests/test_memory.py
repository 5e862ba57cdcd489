"""The memory estimate (grpo/memory.py) against the tensors a tiny run actually holds, and the per-step peak."""

from __future__ import annotations

import pytest
import torch

import rlvr_fast
from rlvr_fast.grpo.config import TrainConfig
from rlvr_fast.grpo.memory import (activation_bytes_per_token, layer_activation_bytes_per_token, peak_memory_bytes,
                                   peak_memory_scope, reset_peak_memory)
from rlvr_fast.grpo.trainer import GRPOTrainer
from rlvr_fast.model.lora import LoRAConfig, apply_lora
from tests.test_train import DigitsTask
from tests.tiny import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", num_hidden_layers=4)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype,lora", [("float32", 0), ("bfloat16", 0), ("float32", 4), ("bfloat16", 4)])
def test_estimate_matches_the_tensors_of_a_step(tiny, tmp_path, dtype, lora):
    cfg = TrainConfig(model=str(tiny), output=str(tmp_path), prompts_per_step=2, group_size=4, max_new_tokens=6,
                      eval_size=3, micro_batch_tokens=64, lr=1e-3, warmup_steps=0, dtype=dtype, beta=0.1,
                      lora_rank=lora, lora_alpha=8.0)
    model, tok = rlvr_fast.load_pretrained(tiny, dtype=getattr(torch, dtype))
    trainer = GRPOTrainer(cfg, model, tok, DigitsTask(), tmp_path, torch.device("cpu"))
    est = trainer.memory_estimate
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    assert est.weights == nbytes(params)
    assert est.reference == (0 if lora else nbytes(trainer.ref_model.parameters()))
    assert (trainer.ref_model is None) == bool(lora)
    runner = trainer.engine._ensure_cache()
    assert est.kv_cache == nbytes([runner.k_cache, runner.v_cache])

    # Gradients: one backward through the model.
    ids = torch.tensor(tok.encode("12 * 3 = 36 and some more tokens"))
    model.logits(model.forward_hidden(ids[None])).float().logsumexp(-1).sum().backward()
    assert est.gradients == nbytes([p.grad for p in trainable])
    trainer.master.zero_grad()

    # Optimizer states and fp32 masters after a real step.
    trainer.train_step()
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert state and est.optimizer_states == nbytes(state)
    masters = [m for m, p in zip(trainer.master.master_params, trainer.master.params) if m is not p]
    assert est.master_weights == nbytes(masters)
    assert (est.master_weights > 0) == (dtype == "bfloat16" and not lora)  # fp32 adapters need no masters


def saved_activation_bytes(model, lengths: list[int]) -> float:
    """Bytes per token of the tensors autograd saves in one training forward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (sum(lengths),), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model.forward_hidden(ids, cu)
    return (sum(storages.values()) + nbytes([hidden])) / sum(lengths)  # the loss keeps the hidden states too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("ckpt", [False, True])
def test_activation_estimate_matches_saved_tensors(tiny, dtype, lora, ckpt):
    model, _ = rlvr_fast.load_pretrained(tiny, dtype=dtype)
    if lora:
        apply_lora(model, LoRAConfig(rank=4, alpha=8))
    model.gradient_checkpointing = ckpt
    model.train()
    measured = saved_activation_bytes(model, [41, 40, 40, 40])
    estimate = activation_bytes_per_token(model, ckpt)
    if ckpt:  # the forward keeps only layer inputs; one layer's set is recomputed later, in backward
        estimate -= layer_activation_bytes_per_token(model)
    assert estimate == pytest.approx(measured, rel=0.03)


def test_peak_memory_is_per_step_on_linux():
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    if peak_memory_scope(cpu) != "step":
        pytest.skip("/proc/self/clear_refs is not writable here: the CPU peak is process-wide")
    big = torch.ones(64 * 2**20)  # 256 MiB, touched
    del big
    first = peak_memory_bytes(cpu)
    reset_peak_memory(cpu)
    second = peak_memory_bytes(cpu)
    assert first - second > 200 * 2**20
