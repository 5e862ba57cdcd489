"""Causal self-attention over a packed batch of variable-length sequences.

Training and prefill see many sequences of different lengths. They travel packed: tokens of all
sequences concatenated into one [N, heads, head_dim] tensor, with `cu_seqlens` ([B + 1] int32,
cumulative lengths) marking where each sequence starts. The linear layers then do no work on
padding at all. Only attention needs to know the sequence boundaries:

* `flash_attn` (optional extra) takes the packed layout directly (`flash_attn_varlen_func`) on CUDA
  in fp16/bf16.
* Otherwise PyTorch's `scaled_dot_product_attention` runs on a padded [B, heads, L, head_dim] view,
  built by one scatter and undone by one gather. With right padding, the causal mask already keeps
  every real query away from the padding keys, so no extra mask is needed.

The backend is chosen per call from the tensors, and logged once.

Generation adds a paged KV cache (`KVCacheContext`): every layer writes the keys/values of the new
tokens into cache blocks, then either attends among the new tokens with the varlen path above
(prefill: the new tokens are whole sequences) or reads each sequence's cached blocks (decode: one
new token per sequence, `paged_attention`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger("rlvr_fast")

try:  # optional: pip install flash-attn (CUDA only)
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

# enable_gqa appeared in torch 2.5; older versions get K/V repeated per query head.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
_logged_backends: set[str] = set()


def _log_backend_once(name: str) -> None:
    if name not in _logged_backends:
        _logged_backends.add(name)
        log.info("attention backend: %s", name)


@dataclass
class PackedBatch:
    """Where each token of a packed batch sits. Built once per forward, shared by every layer."""

    cu_seqlens: torch.Tensor  # [B + 1] int32, cumulative sequence lengths
    max_seqlen: int
    positions: torch.Tensor   # [N] int64, position of each token inside its own sequence
    seq_ids: torch.Tensor     # [N] int64, which sequence each token belongs to
    equal_lengths: bool       # every sequence is max_seqlen long: padding-free reshape suffices

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> "PackedBatch":
        cu_seqlens = cu_seqlens.to(torch.int32)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        if lengths.numel() == 0 or bool((lengths <= 0).any()):
            raise ValueError(f"cu_seqlens must describe at least one non-empty sequence, got {cu_seqlens.tolist()}")
        if max_seqlen is None:
            max_seqlen = int(lengths.max())
        n = int(cu_seqlens[-1])
        seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
        positions = torch.arange(n, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq_ids]
        equal = bool((lengths == max_seqlen).all())
        return cls(cu_seqlens, max_seqlen, positions, seq_ids, equal)

    @classmethod
    def equal_length(cls, batch: int, seqlen: int, device: torch.device) -> "PackedBatch":
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        return cls.from_cu_seqlens(cu, seqlen)


@dataclass
class KVCacheContext:
    """Where one forward pass reads and writes the paged KV cache; built by the rollout engine.

    Cache tensors hold every layer: [num_layers, num_blocks, block_size, kv_heads, head_dim].
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor          # [N] int64: cache slot (block * block_size + offset) of each new token
    positions: torch.Tensor             # [N] int64: rotary position of each new token
    prefill: PackedBatch | None = None  # prefill: new tokens are whole sequences, attend among themselves
    block_tables: torch.Tensor | None = None  # decode: [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # decode: [B] int32, cached tokens incl. the new one
    max_context_len: int | None = None  # decode: host copy of context_lens.max() (None: read it when needed)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this layer's new k/v [N, Hkv, D] into the cache, then attention for q [N, Hq, D]."""
        # Imported here: the kernels package imports torch only, but keeps model import light.
        from rlvr_fast.kernels.paged_attention import paged_attention
        from rlvr_fast.kernels.paged_kv import write_kv

        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        write_kv(k, v, k_cache, v_cache, self.slot_mapping)
        if self.prefill is not None:
            return varlen_causal_attention(q, k, v, self.prefill)
        return paged_attention(q, k_cache, v_cache, self.block_tables, self.context_lens,
                               max_context_len=self.max_context_len)


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """q [N, Hq, D], k/v [N, Hkv, D] (Hq a multiple of Hkv) -> [N, Hq, D], causal within each sequence."""
    if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        _log_backend_once("flash_attn (varlen)")
        return flash_attn_varlen_func(q, k, v, batch.cu_seqlens, batch.cu_seqlens,
                                      batch.max_seqlen, batch.max_seqlen, causal=True)
    _log_backend_once("torch sdpa (padded per sequence)")
    return _sdpa_padded(q, k, v, batch)


def _sdpa_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    n, hq, d = q.shape
    b, length = batch.num_seqs, batch.max_seqlen
    if batch.equal_lengths:  # a plain [B, T] batch: reshape, no copy
        pad = lambda x: x.view(b, length, x.shape[1], d)
    else:
        def pad(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros(b, length, x.shape[1], d)
            out[batch.seq_ids, batch.positions] = x
            return out
    # [B, L, H, D] -> [B, H, L, D]
    qp, kp, vp = (pad(x).transpose(1, 2) for x in (q, k, v))
    if hq != k.shape[1]:
        if _SDPA_HAS_GQA:
            out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
        else:
            groups = hq // k.shape[1]
            out = F.scaled_dot_product_attention(qp, kp.repeat_interleave(groups, 1),
                                                 vp.repeat_interleave(groups, 1), is_causal=True)
    else:
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
    out = out.transpose(1, 2)  # [B, L, Hq, D]
    if batch.equal_lengths:
        return out.reshape(n, hq, d)
    return out[batch.seq_ids, batch.positions]
