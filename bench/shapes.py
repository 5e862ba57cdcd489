"""Model shapes the benches build with random weights: one definition, as the LlamaConfig the model reads.

Real models' widths (their config.json values that matter for speed and memory); `shape(name, **changes)` gives
a copy with some fields changed (fewer layers, say); `random_model(cfg, ...)` builds one with random weights.
"""

from __future__ import annotations

import dataclasses

import torch

from rlvr_fast.model.config import LlamaConfig

LLAMA3_VOCAB = 128256


def _llama(h: int, i: int, layers: int, heads: int, kv: int, head_dim: int, vocab: int, tied: bool,
           rope_theta: float = 500000.0) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=rope_theta,
                       tie_word_embeddings=tied, bos_token_id=0, eos_token_id=2)


SHAPES: dict[str, LlamaConfig] = {
    "tiny": _llama(64, 128, 2, 4, 2, 16, 320, True),
    "smollm2-135m": _llama(576, 1536, 30, 9, 3, 64, 49152, True, rope_theta=100000.0),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 64, LLAMA3_VOCAB, True),
    "llama-3.2-3b": _llama(3072, 8192, 28, 24, 8, 128, LLAMA3_VOCAB, True),
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, 128, LLAMA3_VOCAB, False),
    "llama-13b-gqa": _llama(5120, 13824, 40, 40, 8, 128, LLAMA3_VOCAB, False),
    "llama-34b-gqa": _llama(8192, 22016, 48, 64, 8, 128, LLAMA3_VOCAB, False),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8, 128, LLAMA3_VOCAB, False),
}


def shape(name: str, **changes) -> LlamaConfig:
    """SHAPES[name], with `changes` applied to a copy."""
    return dataclasses.replace(SHAPES[name], **changes)


def describe(cfg: LlamaConfig) -> str:
    """One line for a results table."""
    return (f"h {cfg.hidden_size}, i {cfg.intermediate_size}, {cfg.num_hidden_layers} layers, "
            f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads x {cfg.head_dim}, vocab {cfg.vocab_size}"
            f"{', tied' if cfg.tie_word_embeddings else ''}")


def random_model(cfg: LlamaConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """Our LlamaForCausalLM of shape cfg with random weights, allocated once on `device` in `dtype` (no fp32 copy
    of a large model first): norms 1, other weights N(0, 1 / in_features), wide enough that greedy choices
    are not near-ties. Drawn in fp32 whatever the dtype, so a model in another dtype holds the same weights
    rounded. In eval mode."""
    from rlvr_fast import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gave the head its own storage
        model.lm_head.weight = model.model.embed_tokens.weight
    model._inv_freq = cfg.rope_inv_freq()  # not a buffer (kept fp32): to_empty left it on the meta device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape, device=device).normal_(0, p.shape[-1] ** -0.5, generator=gen))
    return model.eval()
