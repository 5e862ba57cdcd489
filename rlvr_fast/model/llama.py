"""A Llama-family causal language model in plain PyTorch: Llama 2/3.x, SmolLM/SmolLM2, Mistral,
Qwen2/2.5 and Qwen3 (one model; the families differ by the config switches qkv_bias, o_bias,
qk_norm and sliding_window, see config.py).

Parameter names follow Hugging Face's *ForCausalLM exactly (Qwen3's q_norm/k_norm included), so
checkpoints load and save with no renaming. Entry points:

* `model(input_ids)`: input_ids [B, T] -> logits [B, T, V], a plain batch of equal lengths.
* `model.forward_hidden(input_ids, cu_seqlens)`: packed input_ids [N] holding B sequences back to
  back, cu_seqlens [B + 1] their cumulative lengths -> final hidden states [N, H] (after the last
  norm, before lm_head). Training uses this: no compute on padding, and the fused log-prob
  kernels take hidden states and `model.lm_head.weight` directly, so the [N, V] logits are never
  materialized. `model.logits(hidden)` applies the head when they are wanted.
* `model.forward_cached(input_ids, cache)`: the rollout engine's entry point; packed new tokens
  [N] plus a KVCacheContext (paged KV cache, slots, positions) -> hidden states [N, H].
  On the CPU the engine runs it inside `model.packed_for_rollout()`, which swaps in fused,
  pre-packed projection weights for the duration of one generate() call (see packed.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rlvr_fast.kernels.native import rms_norm, rotary_embedding
from rlvr_fast.model.attention import KVCacheContext, PackedBatch, varlen_causal_attention
from rlvr_fast.model.config import LlamaConfig
from rlvr_fast.model.packed import PackedLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 whatever the activation dtype: bf16 squares lose too much.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] for the given token positions, computed in fp32 then cast."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D]; rotates the two halves of each head (HF's non-interleaved layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # which slice of a KV cache this layer owns
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.qkv_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm of queries and keys, weights shared by the heads
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.packed: dict[str, PackedLinear] | None = None  # set only during a CPU rollout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PackedBatch | None,
                cache: KVCacheContext | None = None) -> torch.Tensor:
        n = x.shape[0]
        packed = self.packed if not torch.is_grad_enabled() else None
        if packed is not None:
            q, k, v = packed["qkv"](x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # before RoPE, as Qwen3 does; the plain module on both paths (one formula)
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            out = varlen_causal_attention(q, k, v, batch)  # [N, Hq, D]
        else:  # rollout: one fused op for both (the C++ op on CPU when built; bit-identical)
            q, k = rotary_embedding(q, k, cos, sin)
            out = cache.attend(self.layer_idx, q, k, v)
        out = out.reshape(n, self.num_heads * self.head_dim)
        return packed["o"](out) if packed is not None else self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.packed: dict[str, PackedLinear] | None = None  # set only during a CPU rollout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and not torch.is_grad_enabled():
            gate, up = self.packed["gate_up"](x)
            return self.packed["down"](F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: PackedBatch | None,
                cache: KVCacheContext | None = None) -> torch.Tensor:
        x = x + self.self_attn(_norm(self.input_layernorm, x, cache), cos, sin, batch, cache)
        return x + self.mlp(_norm(self.post_attention_layernorm, x, cache))


def _norm(norm: RMSNorm, x: torch.Tensor, cache: KVCacheContext | None) -> torch.Tensor:
    """RMSNorm; during a rollout (cache given) as one fused op, which saves a few microseconds of dispatch
    per call on CPU decode steps. Only there: its fp32 sum of squares runs in another order (a bf16
    element can move by one ulp), and the trainer's log-probs with and without grad must come from
    one formula."""
    return norm(x) if cache is None else rms_norm(x, norm.weight, norm.eps)


class LlamaModel(nn.Module):
    """The transformer body: embeddings, decoder layers, final norm (HF's `model.*` names)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not a buffer: it must stay fp32 whatever dtype the weights are cast to, and it is
        # derived from the config, never stored in checkpoints.
        self._inv_freq = cfg.rope_inv_freq()
        self.gradient_checkpointing = False
        self._packed_head: PackedLinear | None = None
        self.lora_config = None  # a LoRAConfig once rlvr_fast.model.lora.apply_lora has added adapters

    def forward_hidden(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                       max_seqlen: int | None = None) -> torch.Tensor:
        """Final hidden states. input_ids [B, T] -> [B, T, H]; packed [N] with cu_seqlens -> [N, H]."""
        if input_ids.dim() == 2:
            b, t = input_ids.shape
            return self._run(input_ids.reshape(-1), PackedBatch.equal_length(b, t, input_ids.device)).view(b, t, -1)
        if input_ids.dim() != 1 or cu_seqlens is None:
            raise ValueError("forward_hidden takes input_ids [B, T], or packed input_ids [N] together with "
                             f"cu_seqlens [B + 1]; got input_ids of shape {tuple(input_ids.shape)}")
        if int(cu_seqlens[-1]) != input_ids.numel():
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but input_ids holds {input_ids.numel()} tokens")
        return self._run(input_ids, PackedBatch.from_cu_seqlens(cu_seqlens.to(input_ids.device), max_seqlen))

    def forward_packed(self, input_ids: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Final hidden states [N, H] of packed input_ids [N] laid out by `batch` (e.g. the trainer's
        shared-prompt batches, PackedBatch.shared_prompt: prompts first, then their completions)."""
        return self._run(input_ids, batch)

    def forward_cached(self, input_ids: torch.Tensor, cache: KVCacheContext) -> torch.Tensor:
        """Hidden states [N, H] of the packed new tokens input_ids [N], reading/writing the paged KV cache."""
        return self._run(input_ids, cache.prefill, cache)

    def _run(self, input_ids: torch.Tensor, batch: PackedBatch | None,
             cache: KVCacheContext | None = None) -> torch.Tensor:
        # A sliding window is refused past its length (config.py); the rollout engine checks once, up front,
        # and a model without a window skips longest_sequence's per-prompt loop on every training forward.
        if cache is None and self.config.attention_window is not None:
            self.config.check_length(batch.longest_sequence)
        x = self.model.embed_tokens(input_ids)
        inv_freq = self._inv_freq.to(x.device)
        positions = cache.positions if cache is not None else batch.positions
        cos, sin = rotary_cos_sin(inv_freq, positions, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and cache is None and torch.is_grad_enabled():
                # Keep only each layer's input; recompute its activations in backward.
                x = checkpoint(layer, x, cos, sin, batch, use_reentrant=False)
            else:
                x = layer(x, cos, sin, batch, cache)
        return _norm(self.model.norm, x, cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._packed_head is not None and not torch.is_grad_enabled():
            return self._packed_head(hidden)
        return self.lm_head(hidden)

    @contextmanager
    def packed_for_rollout(self) -> Iterator[None]:
        """Within this block (no_grad), the cached forward and logits use fused, pre-packed copies of
        the projection weights (CPU only; a no-op elsewhere). Built on entry from the current
        weights, dropped on exit: training between rollouts needs no re-sync."""
        if self.device.type != "cpu" or torch.is_grad_enabled():
            yield
            return
        try:
            for layer in self.model.layers:
                a, m = layer.self_attn, layer.mlp
                a.packed = {"qkv": PackedLinear([a.q_proj, a.k_proj, a.v_proj]), "o": PackedLinear([a.o_proj])}
                m.packed = {"gate_up": PackedLinear([m.gate_proj, m.up_proj]), "down": PackedLinear([m.down_proj])}
            self._packed_head = PackedLinear([self.lm_head])
            yield
        finally:
            for layer in self.model.layers:
                layer.self_attn.packed = layer.mlp.packed = None
            self._packed_head = None

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        """Logits: input_ids [B, T] -> [B, T, V]; packed [N] with cu_seqlens -> [N, V]."""
        return self.logits(self.forward_hidden(input_ids, cu_seqlens, max_seqlen))

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
