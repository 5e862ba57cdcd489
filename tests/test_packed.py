"""Rollout-time packed weights (model/packed.py): same outputs as the plain model, only while generating."""

from __future__ import annotations

import pytest
import torch

from rlvr_fast import LlamaConfig, LlamaForCausalLM
from rlvr_fast.model import packed as packed_mod
from rlvr_fast.model.attention import KVCacheContext, PackedBatch
from tests.tiny import TINY_CONFIG


def tiny_model(dtype: torch.dtype, bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig.from_dict({**TINY_CONFIG, "attention_bias": bias, "mlp_bias": bias, "tie_word_embeddings": False,
                               "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.to(dtype).eval()


def prefill_logits(model: LlamaForCausalLM, lengths: list[int]) -> torch.Tensor:
    """Logits of a packed prefill through the cached path (what the rollout engine runs)."""
    cfg = model.config
    n = sum(lengths)
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(1))
    shape = (cfg.num_hidden_layers, 8, 16, cfg.num_key_value_heads, cfg.head_dim)
    kc, vc = torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype)
    packed = PackedBatch.from_cu_seqlens(torch.tensor([0, *lengths]).cumsum(0))
    ctx = KVCacheContext(kc, vc, torch.arange(n), packed.positions, prefill=packed)
    return model.logits(model.forward_cached(ids, ctx)).float()


@pytest.mark.parametrize("dtype,bias", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("backend", ["auto", "plain"])
def test_packed_weights_match_plain_projections(dtype, bias, backend, monkeypatch):
    if backend == "plain":
        monkeypatch.setitem(packed_mod._BACKEND, dtype, "plain")
    model = tiny_model(dtype, bias)
    with torch.no_grad():
        want = prefill_logits(model, [5, 9, 1])
        with model.packed_for_rollout():
            assert model.model.layers[0].self_attn.packed is not None
            got = prefill_logits(model, [5, 9, 1])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # Dropped on exit: the next call sees weights changed by training.
    assert model.model.layers[0].self_attn.packed is None and model._packed_head is None


def test_packed_weights_never_used_with_autograd():
    model = tiny_model(torch.float32)
    with model.packed_for_rollout():  # grad enabled: a no-op, so gradients stay correct
        assert model.model.layers[0].mlp.packed is None
        loss = model(torch.tensor([[1, 2, 3]])).sum()
    loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_packed_weights_follow_updates_between_rollouts():
    model = tiny_model(torch.float32)
    with torch.no_grad():
        with model.packed_for_rollout():
            before = prefill_logits(model, [4])
        model.lm_head.weight.mul_(2.0)  # an "optimizer step"
        with model.packed_for_rollout():
            after = prefill_logits(model, [4])
        torch.testing.assert_close(after, prefill_logits(model, [4]))
    assert not torch.allclose(before, after)
