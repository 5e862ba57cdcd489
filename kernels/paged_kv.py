"""Write new keys and values into a paged KV cache.

    k_cache[slot // block_size, slot % block_size] = k[i]     for i, slot in enumerate(slot_mapping)
    v_cache[...]                                   = v[i]

k, v [N, kv_heads, D]; caches [num_blocks, block_size, kv_heads, D]; slot_mapping [N] int64.
A negative slot means "skip this token": CUDA-graph decode batches are padded to a captured size
and the padding rows must not write anywhere. Memory traffic: 2 * N * kv_heads * D elements read
and written; the kernel is a pure copy, one program per token.

Backends: CUDA tensors -> the Triton kernel; CPU tensors -> the native op torch.ops.rlvr_fast.write_kv
(csrc/ops.cpp: a memcpy per token and head) when the extension is built, else `index_copy_`
(paged_reference.write_kv_ref).
"""

from __future__ import annotations

import torch

from .paged_reference import write_kv_ref

from ._common import HAS_TRITON, pick_backend, tl, triton


if HAS_TRITON:

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                         stride_kn, stride_kh, stride_vn, stride_vh,
                         stride_cb, stride_cs, stride_ch,
                         block_size, num_heads, head_dim,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        i = tl.program_id(0)
        slot = tl.load(slot_ptr + i)
        if slot >= 0:
            blk = slot // block_size
            off = slot % block_size
            h = tl.arange(0, BLOCK_H)[:, None]
            d = tl.arange(0, BLOCK_D)[None, :]
            mask = (h < num_heads) & (d < head_dim)
            k = tl.load(k_ptr + i * stride_kn + h * stride_kh + d, mask=mask)
            v = tl.load(v_ptr + i * stride_vn + h * stride_vh + d, mask=mask)
            dst = blk * stride_cb + off * stride_cs + h * stride_ch + d
            tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def _write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    n, hkv, d = k.shape
    # The kernel assumes unit stride along head_dim and identical cache layouts.
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k/v must be contiguous along head_dim"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "caches must share a dense layout"
    assert k_cache.shape[2:] == (hkv, d) and v.shape == k.shape
    assert slot_mapping.shape == (n,) and slot_mapping.dtype in (torch.int32, torch.int64)
    if n == 0:
        return
    _write_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.shape[1], hkv, d,
        BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
    )


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, backend: str = "auto") -> None:
    """Scatter k, v [N, kv_heads, D] into the paged caches at slot_mapping [N] (negative = skip).

    backend: "auto" (Triton on CUDA; on CPU native if built, else PyTorch), "triton" (also under
    TRITON_INTERPRET=1), "native" (torch.ops.rlvr_fast.write_kv), "torch".
    """
    picked = pick_backend("write_kv", backend, k.device, has_native=True)
    if picked == "triton":
        _write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
        return
    if picked == "native":
        torch.ops.rlvr_fast.write_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping.long())
