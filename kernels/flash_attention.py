"""FlashAttention over packed variable-length sequences, forward and backward, grouped-query heads.

Layout (flash-attn's `flash_attn_varlen_func`): q [Nq, Hq, D], k and v [Nk, Hkv, D], Hq a multiple
of Hkv (G = Hq / Hkv query heads read each kv head: GQA; G = 1 is MHA, Hkv = 1 MQA);
cu_seqlens_q / cu_seqlens_k int32 [B + 1]. Sequence b has the Lq queries q[cu_q[b]:cu_q[b+1]]
and the Lk keys/values k, v[cu_k[b]:cu_k[b+1]]. Per sequence, query i, query head h, kv head
h // G, scale c (default 1 / sqrt(D)):

    s_ij  = c * q_i . k_j
    visible(i, j) = j <= i + Lk - Lq      if causal (the diagonal aligned bottom-right, as in
                                           flash-attn >= 2.1), else every j < Lk
    lse_i = log sum_{visible j} exp(s_ij),   p_ij = exp(s_ij - lse_i)
    o_i   = sum_{visible j} p_ij v_j        (0 for a query that sees no key: Lk = 0, non-causal)

Backward, given dO (the gradient of o), with the group's query heads summed into their kv head:

    Delta_i = dO_i . o_i,   dp_ij = dO_i . v_j,   ds_ij = p_ij (dp_ij - Delta_i)
    dq_i = c sum_j ds_ij k_j,   dk_j = c sum_{h in group, i} ds_ij q_i,   dv_j = sum_{h in group, i} p_ij dO_i

Nothing of size Lq x Lk is ever stored: scores live in registers one [BLOCK_M, BLOCK_N] tile at a
time, softmax statistics in fp32 (online softmax: running max m, normalizer l, output acc, rescaled
as each key block arrives), every matmul accumulates in fp32. Work is proportional to the visible
pairs: a query block stops at its causal bound, a key block starts at the first query that sees it.

Kernels (FlashAttention-2 with the backward split in two, so no atomics and a deterministic result):

* `_fwd_kernel`, one program per (query block, query head, sequence): walk the key blocks up to
  the causal bound; writes o and lse (in base 2: the kernels use exp2 with log2(e) folded into c).
* `_bwd_dq_kernel`, the same grid: Delta for its rows (stored for the next kernel), then the same
  key blocks again; dq accumulated in registers, stored once.
* `_bwd_dkdv_kernel`, one program per (key block, kv head, sequence): for each of the G query heads
  reading this kv head, walk the query blocks that see the key block; dk and dv accumulated in
  registers over all of them (that is the GQA sum), stored once.
  The split costs recomputing q k^T and dO v^T in both backward kernels (7 matmuls against FA2's 5).

Every loop runs in up to three stages: tiles that need no mask at all (fully inside both sequences
and below the causal diagonal) and, separately, the diagonal and ragged-tail tiles that need one.
A sequence with Lq = 0 (an empty completion) launches programs that return at once, and its keys
get dk = dv = 0.

fp32 inputs use exact fp32 dots (input_precision="ieee") rather than TF32, on CUDA for head_dim <= 64
only (beyond that they spill registers; backend="auto" then runs the torch path and logs it);
bf16/fp16 inputs feed the tensor cores in their dtype (p and ds are cast to it before their
matmuls, as flash-attn does). head_dim up to 128 (any value: tiles are padded to a power of 2).
The torch backend (any device, any shape) runs SDPA per run of equal-length sequences; kernels/reference.py holds the
math as written above (`flash_attention_ref`), which the tests compare both backends to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import (check_float, check_same_device, interpreting, log_path, pick_backend, tl, triton)

MAX_HEAD_DIM = 128      # the Triton kernels keep [BLOCK, head_dim] tiles in registers; configs checked up to 128
FP32_MAX_HEAD_DIM = 64  # on CUDA: exact fp32 dots spill beyond this (see launch_config); "auto" then runs torch

# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROW_MASK: tl.constexpr):
    """A [rows, BLOCK_D] tile; masks only what may be out of bounds (an unmasked load vectorizes)."""
    if ROW_MASK:
        if BLOCK_D == HEAD_DIM:
            t = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            t = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return t


@triton.jit
def _store_tile(ptrs, value, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None])
    else:
        tl.store(ptrs, value, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _seq_bounds(cu_ptr, b):
    """(start as int64, length) of sequence b."""
    start = tl.load(cu_ptr + b)
    return start.to(tl.int64), tl.load(cu_ptr + b + 1) - start


@triton.jit
def _key_stages(start_m, len_q, len_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query block starting at start_m: keys [0, full) need no mask, [full, hi) do."""
    diag = len_k - len_q
    full = len_k // BLOCK_N * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(len_k, start_m + BLOCK_M + diag)        # the block's last row sees keys < this
        full = tl.minimum(full, (start_m + diag + 1) // BLOCK_N * BLOCK_N)  # its first row sees all of these
    else:
        hi = len_k
    return full, hi


@triton.jit
def _attended(q_idx, k_idx, in_range, diag, CAUSAL: tl.constexpr):
    """Which (query, key) pairs of a tile are attended: in_range (inside both sequences), and with CAUSAL the
    key at or below the query's diagonal, aligned bottom-right (k <= q + len_k - len_q = q + diag). q_idx and
    k_idx come broadcastable to the tile's orientation ([M, N] forward and dq, [N, M] dk/dv)."""
    if CAUSAL:
        in_range = in_range & (k_idx <= q_idx + diag)
    return in_range


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d, lo, hi, len_k, diag,
               qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_kt + offs_d[None, :], cols, len_k, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_base + cols[:, None] * stride_vt + offs_d[None, :], cols, len_k, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, N] scores in base 2
        if MASKED:
            s = tl.where(_attended(rows[:, None], cols[None, :], cols[None, :] < len_k, diag, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet: no inf - inf
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                n_q, groups, qk_scale,
                CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # Longest-running blocks (the last rows see the most keys under causal) are scheduled first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q = _seq_bounds(cu_q_ptr, b)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    k_start, len_k = _seq_bounds(cu_k_ptr, b)
    kvh = h // groups
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + (q_start + rows)[:, None] * stride_qt + h * stride_qh + offs_d[None, :], rows, len_q,
                   offs_d, HEAD_DIM, BLOCK_D, True)
    k_base = k_ptr + k_start * stride_kt + kvh * stride_kh
    v_base = v_ptr + k_start * stride_vt + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag = len_k - len_q
    full, hi = _key_stages(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                               0, full, len_k, diag, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d,
                               full, hi, len_k, diag, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # l = 0 only for a query that sees no key: o = 0, lse = m = -inf
    out = acc / l_i[:, None]
    _store_tile(o_ptr + (q_start + rows)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                out.to(o_ptr.dtype.element_ty), rows, len_q, offs_d, HEAD_DIM, BLOCK_D)
    tl.store(lse_ptr + h * n_q + q_start + rows, m_i + tl.log2(l_i), mask=rows < len_q)  # [Hq, Nq], base 2


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d, lo, hi, len_k,
              diag, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_kt + offs_d[None, :], cols, len_k, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_base + cols[:, None] * stride_vt + offs_d[None, :], cols, len_k, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:  # also drops any inf from exp2 of a hidden score
            p = tl.where(_attended(rows[:, None], cols[None, :], cols[None, :] < len_k, diag, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, cu_q_ptr, cu_k_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh,
                   n_q, groups, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q = _seq_bounds(cu_q_ptr, b)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    k_start, len_k = _seq_bounds(cu_k_ptr, b)
    kvh = h // groups
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tok = (q_start + rows)[:, None]
    q = _load_tile(q_ptr + tok * stride_qt + h * stride_qh + offs_d[None, :], rows, len_q, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    do = _load_tile(do_ptr + tok * stride_dot + h * stride_doh + offs_d[None, :], rows, len_q, offs_d,
                    HEAD_DIM, BLOCK_D, True)
    o = _load_tile(o_ptr + tok * stride_ot + h * stride_oh + offs_d[None, :], rows, len_q, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    row_ok = rows < len_q
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # Delta_i = dO_i . o_i, read again by dk/dv
    tl.store(delta_ptr + h * n_q + q_start + rows, delta, mask=row_ok)
    lse = tl.load(lse_ptr + h * n_q + q_start + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + k_start * stride_kt + kvh * stride_kh
    v_base = v_ptr + k_start * stride_vt + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag = len_k - len_q
    full, hi = _key_stages(start_m, len_q, len_k, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d, 0, full,
                   len_k, diag, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, rows, offs_n, offs_d, full, hi,
                   len_k, diag, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION)
    _store_tile(dq_ptr + tok * stride_dqt + h * stride_dqh + offs_d[None, :],
                (dq * sm_scale).to(dq_ptr.dtype.element_ty), rows, len_q, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, cols, offs_m, offs_d,
                lo, hi, len_q, diag, qk_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # Transposed tiles ([keys, queries]) so that dk and dv come out as [BLOCK_N, D] without transposes.
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_base + rows[:, None] * stride_qt + offs_d[None, :], rows, len_q, offs_d,
                       HEAD_DIM, BLOCK_D, MASKED)
        do = _load_tile(do_base + rows[:, None] * stride_dot + offs_d[None, :], rows, len_q, offs_d,
                        HEAD_DIM, BLOCK_D, MASKED)
        if MASKED:
            lse = tl.load(lse_base + rows, mask=rows < len_q, other=0.0)
            delta = tl.load(delta_base + rows, mask=rows < len_q, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])  # [N, M]
        if MASKED:
            p_t = tl.where(_attended(rows[None, :], cols[:, None], rows[None, :] < len_q, diag, CAUSAL), p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, cu_q_ptr, cu_k_ptr,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     n_q, groups, qk_scale, sm_scale,
                     CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    k_start, len_k = _seq_bounds(cu_k_ptr, b)
    start_n = pid_n * BLOCK_N
    if start_n >= len_k:
        return
    q_start, len_q = _seq_bounds(cu_q_ptr, b)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(k_ptr + (k_start + cols)[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], cols, len_k,
                   offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(v_ptr + (k_start + cols)[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], cols, len_k,
                   offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    diag = len_k - len_q
    # Query blocks that see this key block, in three stages: the causal diagonal (masked), the
    # blocks that see all of it (no mask), the ragged last block (masked).
    full_end = len_q // BLOCK_M * BLOCK_M
    if CAUSAL:
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M                      # first row seeing key start_n
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M  # rows seeing the whole block
    else:
        lo = 0
        mid = 0
    diag_end = tl.minimum(mid, tl.cdiv(len_q, BLOCK_M) * BLOCK_M)
    for g in range(0, groups):  # the query heads that read this kv head: their dk/dv add up here
        h = kvh * groups + g
        q_base = q_ptr + q_start * stride_qt + h * stride_qh
        do_base = do_ptr + q_start * stride_dot + h * stride_doh
        lse_base = lse_ptr + h * n_q + q_start
        delta_base = delta_ptr + h * n_q + q_start
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, cols, offs_m,
                             offs_d, lo, diag_end, len_q, diag, qk_scale, CAUSAL, True, HEAD_DIM, BLOCK_M, BLOCK_D,
                             PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, cols, offs_m,
                             offs_d, mid, full_end, len_q, diag, qk_scale, CAUSAL, False, HEAD_DIM, BLOCK_M, BLOCK_D,
                             PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, cols, offs_m,
                             offs_d, tl.maximum(mid, full_end), len_q, len_q, diag, qk_scale, CAUSAL, True, HEAD_DIM,
                             BLOCK_M, BLOCK_D, PRECISION)
    tok = (k_start + cols)[:, None]
    _store_tile(dk_ptr + tok * stride_dkt + kvh * stride_dkh + offs_d[None, :],
                (dk * sm_scale).to(dk_ptr.dtype.element_ty), cols, len_k, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(dv_ptr + tok * stride_dvt + kvh * stride_dvh + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty),
                cols, len_k, offs_d, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- launchers

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): the kernels fold it into the scale


@dataclass(frozen=True)
class TileConfig:
    """One kernel's launch: its tile (BLOCK_M queries x BLOCK_N keys), warps and pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class LaunchConfig:
    fwd: TileConfig
    dq: TileConfig
    dkdv: TileConfig
    precision: str = "ieee"  # tl.dot's input_precision for fp32 inputs (ignored for bf16/fp16)


def block_d(head_dim: int) -> int:
    """The tile width over head_dim: a power of 2, at least 16 (tl.dot's minimum); the rest is masked."""
    return max(16, triton.next_power_of_2(head_dim))


def launch_config(head_dim: int, dtype: torch.dtype, interpreter: bool | None = None) -> LaunchConfig:
    """Tiles per head_dim and dtype. On CUDA each program keeps a few [BLOCK, head_dim] tiles in
    registers (forward: q and the fp32 output; dq: q, dO and the fp32 dq; dk/dv: k, v and two fp32
    accumulators), so wider heads get smaller tiles or more warps. Each CUDA config here is the
    largest of those tried that compiles for both sm_80 and sm_90 with no local memory at all (no
    spills, no stack frame); tests/test_flash_attention.py compiles them and checks that. They are
    not tuned for speed on a GPU yet. fp32 runs exact fp32 dots on the FMA units, which need the
    whole head_dim of an operand row per thread: small tiles, and head_dim <= 64 only (see
    FP32_MAX_HEAD_DIM). The interpreter gets 16 x 16 tiles, so that short test sequences already
    cross several blocks and ragged tails."""
    if interpreter is None:
        interpreter = interpreting()
    if interpreter:
        t = TileConfig(16, 16, 1, 1)
        return LaunchConfig(t, t, t)
    d = block_d(head_dim)
    if dtype == torch.float32:  # head_dim <= 64 (larger ones spill at any tile size tried, down to 16 x 16)
        return LaunchConfig(TileConfig(32, 32, 4, 1), TileConfig(32, 32, 8, 1), TileConfig(16, 16, 4, 1))
    if d <= 64:
        return LaunchConfig(TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3), TileConfig(16, 64, 4, 1))
    return LaunchConfig(TileConfig(128, 32, 8, 3), TileConfig(64, 64, 8, 2), TileConfig(32, 32, 8, 2))


def _fwd_triton(q, k, v, cu_q, cu_k, max_q: int, causal: bool, scale: float):
    """q [Nq, Hq, D], k/v [Nk, Hkv, D] (unit stride on D) -> out [Nq, Hq, D] in q's dtype and
    lse [Hq, Nq] fp32 (base 2)."""
    nq, hq, d = q.shape
    hkv = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1, "head_dim must be the unit-stride axis"
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32 and cu_q.shape == cu_k.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(hq, nq, dtype=torch.float32, device=q.device)
    cfg = launch_config(d, q.dtype)
    t = cfg.fwd
    grid = (triton.cdiv(max_q, t.block_m), hq, cu_q.numel() - 1)
    if grid[0] > 0 and nq > 0:
        _fwd_kernel[grid](q, k, v, out, lse, cu_q, cu_k,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                          out.stride(0), out.stride(1), nq, hq // hkv, scale * LOG2E,
                          CAUSAL=causal, HEAD_DIM=d, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=block_d(d),
                          PRECISION=cfg.precision, num_warps=t.num_warps, num_stages=t.num_stages)
    return out, lse


def _bwd_triton(do, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """-> dq [Nq, Hq, D], dk, dv [Nk, Hkv, D] in the inputs' dtype (dk/dv summed over each kv head's query heads)."""
    nq, hq, d = q.shape
    nk, hkv, _ = k.shape
    assert do.shape == q.shape and do.stride(2) == 1
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty_like(lse)  # written by the dq kernel, read by the dk/dv kernel (same stream, in order)
    cfg = launch_config(d, q.dtype)
    nseq = cu_q.numel() - 1
    common = dict(CAUSAL=causal, HEAD_DIM=d, BLOCK_D=block_d(d), PRECISION=cfg.precision)
    grid = (triton.cdiv(max_q, cfg.dq.block_m), hq, nseq)
    if grid[0] > 0 and nq > 0:
        _bwd_dq_kernel[grid](q, k, v, out, do, dq, lse, delta, cu_q, cu_k,
                             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                             out.stride(0), out.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
                             nq, hq // hkv, scale * LOG2E, scale, BLOCK_M=cfg.dq.block_m, BLOCK_N=cfg.dq.block_n,
                             num_warps=cfg.dq.num_warps, num_stages=cfg.dq.num_stages, **common)
    grid = (triton.cdiv(max_k, cfg.dkdv.block_n), hkv, nseq)
    if grid[0] > 0 and nk > 0:  # also for max_q == 0: the keys of query-less sequences get dk = dv = 0
        _bwd_dkdv_kernel[grid](q, k, v, do, dk, dv, lse, delta, cu_q, cu_k,
                               q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                               do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                               nq, hq // hkv, scale * LOG2E, scale, BLOCK_M=cfg.dkdv.block_m,
                               BLOCK_N=cfg.dkdv.block_n, num_warps=cfg.dkdv.num_warps,
                               num_stages=cfg.dkdv.num_stages, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------- PyTorch path (any device)

# enable_gqa appeared in torch 2.5; older versions get K/V repeated per query head.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def _attention_torch(q, k, v, bounds: list[tuple[int, int, int, int]], causal: bool, scale: float) -> torch.Tensor:
    """SDPA per run of consecutive sequences with equal (Lq, Lk), on [n, H, L, D] views (autograd
    gives the gradients); bounds = (q0, q1, k0, k1) per sequence.

    The packed tensors are cut with one `split` each, whose backward is one concatenation (slicing
    per sequence would add a full-size zero gradient per sequence). A causal run with Lq < Lk gets
    an explicit [Lq, Lk] boolean mask (SDPA's is_causal is aligned top-left)."""
    nq, hq, d = q.shape
    hkv = k.shape[1]
    runs: list[list[int]] = []  # [count, Lq, Lk]
    for q0, q1, k0, k1 in bounds:
        if runs and runs[-1][1:] == [q1 - q0, k1 - k0]:
            runs[-1][0] += 1
        else:
            runs.append([1, q1 - q0, k1 - k0])
    outs = []
    for (n, lq, lk), qs, ks, vs in zip(runs, q.split([n * lq for n, lq, _ in runs]),
                                       k.split([n * lk for n, _, lk in runs]), v.split([n * lk for n, _, lk in runs])):
        if lq == 0:
            continue
        if lk == 0:  # non-causal with no keys: o = 0 (causal never gets here: Lq <= Lk)
            outs.append(qs * 0)
            continue
        # [n, H, L, D] views (SDPA's fused CPU kernel takes 4-D inputs only; 3-D ones run its math path).
        qb, kb, vb = (t.view(n, -1, t.shape[1], d).transpose(1, 2) for t in (qs, ks, vs))
        gqa = {}
        if hq != hkv:
            if _SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:
                kb, vb = kb.repeat_interleave(hq // hkv, 1), vb.repeat_interleave(hq // hkv, 1)
        mask = None
        if causal and lq != lk:  # bottom-right diagonal: query i sees keys j <= i + lk - lq
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=causal and lq == lk, scale=scale,
                                            **gqa)
        outs.append(ob.transpose(1, 2).reshape(n * lq, hq, d))
    if not outs:  # no queries at all
        return q * 0
    return torch.cat(outs)


# ----------------------------------------------------------------------------- checks


def _check(op: str, q, k, v, cu_q, cu_k, max_q, max_k) -> None:
    """Shapes, dtypes and devices (no host read)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(op, name, t)
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be [tokens, heads, head_dim] (packed sequences), got shape "
                             f"{list(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
    if q.shape[2] != k.shape[2] or q.shape[2] == 0:
        raise ValueError(f"{op}: q and k must have the same non-zero head_dim, got {q.shape[2]} and {k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{op}: the query heads ({q.shape[1]}) must be a multiple of the kv heads ({k.shape[1]}) "
                         "(grouped-query attention)")
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32 or t.dim() != 1 or t.numel() < 2:
            raise TypeError(f"{op}: {name} must be a 1-D int32 tensor [B + 1] of cumulative lengths (B >= 1), got "
                            f"{t.dtype} with shape {list(t.shape)}; build it with dtype=torch.int32")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_q.numel() - 1} and {cu_k.numel() - 1}")
    check_same_device(op, q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise TypeError(f"{op}: {name} must be a non-negative Python int, got {m!r}")


def _read_bounds(op: str, q, k, cu_q, cu_k, max_q, max_k, causal: bool) -> list[tuple[int, int, int, int]] | None:
    """One host read of the cu_seqlens (a device sync on CUDA) to check their contents. Returns
    (q0, q1, k0, k1) per sequence, or None while a CUDA graph is being captured (no host read
    possible; the kernels then trust the caller)."""
    if cu_q.is_cuda and torch.cuda.is_current_stream_capturing():
        log_path(op, "unchecked cu_seqlens", "a CUDA graph is being captured, so they cannot be read on the host")
        return None
    both = torch.cat([cu_q, cu_k]).tolist()
    cq, ck = both[:cu_q.numel()], both[cu_q.numel():]
    for name, cu, n, m in (("cu_seqlens_q", cq, q.shape[0], max_q), ("cu_seqlens_k", ck, k.shape[0], max_k)):
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        if cu[0] != 0 or min(lengths) < 0:
            raise ValueError(f"{op}: {name} must start at 0 and never decrease (cumulative lengths), got {cu}")
        if cu[-1] != n:
            raise ValueError(f"{op}: {name}[-1] = {cu[-1]} must equal the packed token count {n} "
                             f"({'q' if name.endswith('q') else 'k'}.shape[0])")
        if max(lengths) > m:
            raise ValueError(f"{op}: max_seqlen_{name[-1]} = {m} is less than the longest sequence ({max(lengths)}); "
                             "pass at least that")
    bounds = list(zip(cq[:-1], cq[1:], ck[:-1], ck[1:]))
    if causal:
        for i, (q0, q1, k0, k1) in enumerate(bounds):
            if q1 - q0 > k1 - k0:
                raise ValueError(f"{op}: causal attention with the diagonal aligned bottom-right needs at least as "
                                 f"many keys as queries per sequence; sequence {i} has {q1 - q0} queries and "
                                 f"{k1 - k0} keys")
    return bounds


# ----------------------------------------------------------------------------- autograd


class FlashAttentionFunction(torch.autograd.Function):
    """Triton forward and backward; saves q, k, v, out and lse [Hq, Nq] (fp32) for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
        out, lse = _fwd_triton(q, k, v, cu_q, cu_k, max_q, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv = _bwd_triton(do, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def _triton_unsupported(q: torch.Tensor) -> str | None:
    """Why the Triton kernels have no checked launch config for q's head_dim and dtype (None: they do)."""
    if q.shape[2] > MAX_HEAD_DIM:
        return f"the Triton kernels support head_dim <= {MAX_HEAD_DIM}, got {q.shape[2]}"
    if q.is_cuda and q.dtype == torch.float32 and q.shape[2] > FP32_MAX_HEAD_DIM:
        return (f"the Triton kernels take float32 on CUDA only with head_dim <= {FP32_MAX_HEAD_DIM} (got "
                f"{q.shape[2]}): exact fp32 dots would spill registers; bfloat16/float16 have no such limit")
    return None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                    softmax_scale: float | None = None, backend: str = "auto", check_seqlens: bool = True) -> torch.Tensor:
    """Attention over packed variable-length sequences (flash-attn's `flash_attn_varlen_func` contract).

    Args:
        q: [Nq, Hq, D] float32 / bfloat16 / float16, the queries of all sequences back to back.
        k, v: [Nk, Hkv, D], same dtype; Hq must be a multiple of Hkv (GQA / MQA / MHA).
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1] cumulative lengths: sequence b's queries
            q[cu_q[b]:cu_q[b+1]] attend to the keys k[cu_k[b]:cu_k[b+1]]. cu[-1] must equal N.
            A sequence may have no queries (Lq = 0).
        max_seqlen_q, max_seqlen_k: Python ints >= the longest sequence (sizes the Triton grid).
        causal: query i of a sequence with Lq queries and Lk keys sees keys j <= i + Lk - Lq
            (bottom-right diagonal, flash-attn >= 2.1); needs Lq <= Lk. Otherwise every key.
        softmax_scale: default 1 / sqrt(D).
        backend: "auto" (Triton for CUDA tensors, PyTorch otherwise), "triton" (CUDA, or CPU
            under TRITON_INTERPRET=1 for tests), "torch" (SDPA per run of equal-length sequences, any device).
        check_seqlens: read cu_seqlens on the host to check their contents (below). False skips that
            read on the Triton path, for callers that built them from host lengths themselves (the
            model: one check when its batch is built, not a device sync in every layer's call).

    Returns:
        [Nq, Hq, D] in q's dtype; differentiable w.r.t. q, k and v. A query that sees no key
        (non-causal, Lk = 0) gets 0. Softmax statistics and matmul accumulators are fp32.

    The contents of cu_seqlens are checked with one host read (a device sync on CUDA), except while
    a CUDA graph is being captured, or on the Triton path with check_seqlens=False.
    """
    op = "flash_attention"
    _check(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    read = lambda: _read_bounds(op, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,  # noqa: E731
                                bool(causal))
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    picked = pick_backend(op, backend, q.device)
    if picked == "triton":
        why = _triton_unsupported(q)
        if why and backend == "auto":
            log_path(op, "torch", f"{why}: the torch path (SDPA) runs instead")
            picked = "torch"
        elif why:
            raise ValueError(f"{op}: {why}; use backend='torch' (or 'auto', which does)")
    if picked == "triton":
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            raise TypeError(f"{op}: the Triton interpreter computes bfloat16 dots wrongly (Triton 3.9), so the Triton "
                            "path takes no bfloat16 on CPU: test bfloat16 on a GPU or use backend='torch'")
        if check_seqlens:
            read()
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return FlashAttentionFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            bool(causal), scale)
    bounds = read()  # the torch path cuts the packed tensors at these bounds
    if bounds is None:
        raise RuntimeError(f"{op}: the torch backend reads cu_seqlens on the host, which a CUDA graph capture forbids")
    return _attention_torch(q, k, v, bounds, bool(causal), scale)
