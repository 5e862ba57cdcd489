"""Decode attention over a paged KV cache (one new query token per sequence), grouped-query heads.

    out[b, h] = sum_j softmax_j(q[b, h] . K_b[j] * scale) V_b[j],   0 <= j < context_lens[b]
    K_b[j] = k_cache[block_tables[b, j // block_size], j % block_size, h // G],   G = Hq / Hkv

q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
context_lens [B] int32. Decode attention is memory bound: every cached K/V element of the batch is
read once, so one program handles one (sequence, kv head) pair and all G query heads that share
it, walking the sequence's blocks with an online softmax (running max m, normalizer l, output acc).
A program whose context length is 0 (a CUDA-graph padding row) writes zeros.

Backends: CUDA tensors -> the Triton kernel (no host-side max length, so it can be captured in a
CUDA graph); CPU tensors -> the native op torch.ops.rlvr_fast.paged_attention (csrc/cpu/
paged_attention.cpp: the same per-(sequence, kv head) online softmax in C++) when the extension is
built, else paged_reference.paged_attention_ref (gather + two batched matmuls).
"""

from __future__ import annotations

import torch

from .paged_reference import paged_attention_ref

from ._common import HAS_TRITON, pick_backend, tl, triton


if HAS_TRITON:

    @triton.jit
    def _paged_attention_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, len_ptr, out_ptr,
                                stride_qb, stride_qh, stride_ob, stride_oh,
                                stride_cb, stride_cs, stride_ch, stride_btb,
                                scale, block_size, groups, head_dim,
                                BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        s = tl.arange(0, BLOCK_S)
        gmask = g < groups
        dmask = d < head_dim
        heads = kvh * groups + g  # the query heads reading this kv head
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # [G, D]
        q = q * scale
        ctx = tl.load(len_ptr + b)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        num_blocks = tl.cdiv(ctx, block_size)
        for i in range(0, num_blocks):
            blk = tl.load(bt_ptr + b * stride_btb + i).to(tl.int64)
            pos = i * block_size + s
            smask = (s < block_size) & (pos < ctx)
            base = blk * stride_cb + kvh * stride_ch
            kv_off = base + s[:, None] * stride_cs + d[None, :]
            kvmask = smask[:, None] & dmask[None, :]
            k = tl.load(kc_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)  # [S, D]
            v = tl.load(vc_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)
            # [G, 1, D] * [1, S, D] summed over D: G is tiny (GQA groups), so no tensor-core dot.
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, S]
            scores = tl.where(smask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        l = tl.where(l > 0, l, 1.0)  # ctx == 0 (padding row): acc is 0, output 0
        out = acc / l[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


def _paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    b, hq, d = q.shape
    _, block_size, hkv, dc = k_cache.shape
    assert dc == d and hq % hkv == 0, "q and cache head sizes disagree"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1, "head_dim must be the unit-stride axis"
    assert k_cache.stride() == v_cache.stride(), "k and v caches must share a layout"
    assert block_tables.dim() == 2 and block_tables.shape[0] == b and block_tables.stride(1) == 1
    assert context_lens.shape == (b,)
    out = torch.empty_like(q)
    groups = hq // hkv
    block_g = max(triton.next_power_of_2(groups), 2)
    _paged_attention_kernel[(b, hkv)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        scale, block_size, groups, d,
        BLOCK_G=block_g, BLOCK_S=triton.next_power_of_2(block_size), BLOCK_D=triton.next_power_of_2(d),
        num_warps=decode_warps(block_g),
    )
    return out


def decode_warps(block_g: int) -> int:
    """Warps of one decode program. It holds [BLOCK_G, BLOCK_S, BLOCK_D] fp32 products: with 5-8 query heads per
    kv head (block 8: Qwen2.5-0.5B/7B's 7, Llama-3.1-70B's 8) 4 warps hit the 255-register cap and spill on sm_90
    (tests/test_gpu_compile.py), so wider groups spread them over 8 warps."""
    return 8 if block_g >= 8 else 4


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float | None = None, max_context_len: int | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Decode attention q [B, Hq, D] over paged caches -> [B, Hq, D] (see the module docstring).

    max_context_len (optional, torch path only) saves a device-to-host read of context_lens.max().
    backend: "auto" (Triton on CUDA; on CPU native if built, else PyTorch), "triton" (also under
    TRITON_INTERPRET=1), "native" (torch.ops.rlvr_fast.paged_attention), "torch".
    """
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    picked = pick_backend("paged_attention", backend, q.device, has_native=True)
    if picked == "triton":
        return _paged_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
    if picked == "native":
        return torch.ops.rlvr_fast.paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len)
