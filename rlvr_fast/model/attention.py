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

Shared-prompt packing (GRPO training): a *segment* holds one prompt followed by several
completions of it, [prompt, c1, c2, ...], so the prompt's tokens are computed once for the whole
group. `branch_ids` marks each token (0 = prompt, j = completion j) and `positions` restart after
the prompt for every completion. A token attends to earlier tokens of its segment that are in the
prompt or in its own branch: exactly the attention each completion would get packed alone, so the
hidden states are the same, at a fraction of the tokens. This needs a mask, so it always runs on
SDPA (flash-attn's varlen entry point has no tree masks).

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
    offsets: torch.Tensor | None = None     # [N] int64, slot of each token in its sequence (default: positions)
    branch_ids: torch.Tensor | None = None  # [N] int64, shared-prompt segments only (see the module doc)
    _mask: torch.Tensor | None = None       # the segments' attention mask, built by the first layer

    def __post_init__(self) -> None:
        if self.offsets is None:
            self.offsets = self.positions

    def tree_mask(self) -> torch.Tensor:
        """[B, 1, L, L] bool: causal, and never across two completions of one prompt."""
        if self._mask is None:
            b, length, dev = self.num_seqs, self.max_seqlen, self.positions.device
            branch = torch.zeros(b, length, dtype=torch.long, device=dev)
            branch[self.seq_ids, self.offsets] = self.branch_ids
            causal = torch.ones(length, length, dtype=torch.bool, device=dev).tril()
            self._mask = (causal & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])))[:, None]
        return self._mask

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
    def shared_prompt(cls, cu_seqlens: torch.Tensor, positions: torch.Tensor, branch_ids: torch.Tensor,
                      max_seqlen: int | None = None) -> "PackedBatch":
        """Segments [prompt, c1, c2, ...] with per-token rotary positions and branch ids (0 = prompt)."""
        batch = cls.from_cu_seqlens(cu_seqlens, max_seqlen)
        if positions.shape != batch.positions.shape or branch_ids.shape != batch.positions.shape:
            raise ValueError(f"positions and branch_ids must have one entry per token ({batch.positions.numel()}), "
                             f"got {list(positions.shape)} and {list(branch_ids.shape)}")
        batch.offsets, batch.positions = batch.positions, positions.long()
        batch.branch_ids, batch.equal_lengths = branch_ids.long(), False
        return batch

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
    if batch.branch_ids is not None:
        _log_backend_once("torch sdpa (shared-prompt segments, tree mask)")
        return _sdpa_padded(q, k, v, batch)
    if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        _log_backend_once("flash_attn (varlen)")
        return flash_attn_varlen_func(q, k, v, batch.cu_seqlens, batch.cu_seqlens,
                                      batch.max_seqlen, batch.max_seqlen, causal=True)
    _log_backend_once("torch sdpa (padded per sequence)")
    return _sdpa_padded(q, k, v, batch)


def _sdpa_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    n, hq, d = q.shape
    b, length = batch.num_seqs, batch.max_seqlen
    offsets = batch.offsets  # slot of each token in its padded row (not its rotary position in segments)
    if batch.equal_lengths:  # a plain [B, T] batch: reshape, no copy
        pad = lambda x: x.view(b, length, x.shape[1], d)
    else:
        def pad(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros(b, length, x.shape[1], d)
            out[batch.seq_ids, offsets] = x
            return out
    # [B, L, H, D] -> [B, H, L, D]
    qp, kp, vp = (pad(x).transpose(1, 2) for x in (q, k, v))
    kwargs = {"attn_mask": batch.tree_mask()} if batch.branch_ids is not None else {"is_causal": True}
    if hq != k.shape[1]:
        if _SDPA_HAS_GQA:
            out = F.scaled_dot_product_attention(qp, kp, vp, enable_gqa=True, **kwargs)
        else:
            groups = hq // k.shape[1]
            out = F.scaled_dot_product_attention(qp, kp.repeat_interleave(groups, 1),
                                                 vp.repeat_interleave(groups, 1), **kwargs)
    else:
        out = F.scaled_dot_product_attention(qp, kp, vp, **kwargs)
    out = out.transpose(1, 2)  # [B, L, Hq, D]
    if batch.equal_lengths:
        return out.reshape(n, hq, d)
    return out[batch.seq_ids, offsets]
