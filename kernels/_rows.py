"""One row of logits: its softmax statistics, and the gradient of a weighted log-prob (+ entropy).

Every log-prob op here is this routine applied to rows of logits, one Triton program (or one
PyTorch chunk of rows) per row: `token_logprobs` (the rows of a logits tensor, read in place),
`linear_token_logprobs` (the rows of each matmul chunk) and `fused_linear_grpo_loss` (the same,
with the GRPO terms between the two passes). Change the row math here, in both twins.

Math, per row with logits x in R^V, target y and temperature T, z = x / T:

    m     = max_j z_j,   s = sum_j e_j,   e_j = exp(z_j - m)      (online over blocks: one read)
    logp  = (z_y - m) - log s                                     (<= 0 always)
    H     = log s - sum_j e_j (z_j - m) / s                       (entropy of p = softmax(z))

Gradient, given g = dL/dlogp and h = dL/dH of the row, with log p_j = (z_j - m) - log s:

    dL/dx_j = (g [j == y] - p_j (g + h (log p_j + H))) / T

Numerics: statistics are fp32 whatever the logits' dtype. m and log s are kept apart: logp =
(z_y - m) - log s rounds once per small term, where z_y - (m + log s) would first round lse to the
ulp of a large number (up to a few 1e-7 relative), an error that the target's p (near 1, in
g (1 - p)) turns into a gradient error. H sums e_j (z_j - m), relative to the max, so it does not
cancel against a large max the way lse - sum_j p_j z_j would. -inf logits have p = 0 and add
nothing (never 0 * inf).

Between the two passes a row keeps its state (m, log s): fp32 [N, 2], plus H when it has a
gradient term. Any reference m works in the formulas: the Triton routine uses the max, the
PyTorch twin (log p from log_softmax) stores lse as m and log s = 0, which costs no extra pass
over the row but rounds lse once (a few 1e-5 of gradient error for logits near 2000).

Memory traffic per row of V elements of b bytes: statistics read it once (b V); the gradient
reads it once and writes it once (2 b V), in place when the caller owns the row.
"""

from __future__ import annotations

import torch

from ._common import row_config, tl, triton

# ----------------------------------------------------------------------------- Triton: the routine


@triton.jit
def row_stats(x_row, tgt_ptr, V, inv_t, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    """One read of the row x_row[0:V] -> (logp of the target *tgt_ptr, m, log s, H) of z = x / T; H only with
    ENTROPY. The target is read after the loop, so it holds no registers during it."""
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")
    s = 0.0
    zs = 0.0        # sum of e * (z - m_ref) (entropy only)
    prev_ref = 0.0  # the m_ref that zs is relative to (finite, unlike m before the first value)
    for start in range(0, V, BLOCK_V):
        z = tl.load(x_row + start + cols, mask=start + cols < V, other=-float("inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # A row (or a first block) of -inf logits must not turn into NaN via (-inf) - (-inf).
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        scale = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref)  # 0 in the padding
        if ENTROPY:  # move zs to the new reference: sum e' (z - m_ref) = scale * (zs - (m_ref - prev) * s)
            zs = (zs - (m_ref - prev_ref) * s) * scale + tl.sum(e * tl.where(e > 0.0, z - m_ref, 0.0), axis=0)
            prev_ref = m_ref
        s = s * scale + tl.sum(e, axis=0)
        m = m_new
    m = tl.where(m == -float("inf"), 0.0, m)
    log_s = tl.log(s)
    logp = (tl.load(x_row + tl.load(tgt_ptr)).to(tl.float32) * inv_t - m) - log_s
    ent = log_s  # a placeholder without ENTROPY (never read)
    if ENTROPY:
        ent = log_s - zs / s
    return logp, m, log_s, ent


@triton.jit
def row_grad(x_row, dx_row, tgt, m, log_s, ent, g, h, V, inv_t, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    """dx_row[0:V] = dL/dx given g = dL/dlogp and h = dL/dH (read only with ENTROPY). dx_row may be x_row:
    each element is read, then written, by the same program."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        ok = idx < V
        z = tl.load(x_row + idx, mask=ok, other=0.0).to(tl.float32) * inv_t
        lp = (z - m) - log_s
        p = tl.exp(lp)
        dz = tl.where(idx == tgt, g, 0.0) - g * p
        if ENTROPY:
            dz -= h * p * tl.where(p > 0.0, lp + ent, 0.0)  # -inf logits: p = 0, no 0 * inf
        tl.store(dx_row + idx, (dz * inv_t).to(dx_row.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- Triton: rows of [A, B, V]


@triton.jit
def _row_offset(row, rows_b, stride_a, stride_b):
    # Row r of the [A, B, V] view starts at (r // B) * stride_a + (r % B) * stride_b.
    return (row // rows_b) * stride_a + (row % rows_b) * stride_b


@triton.jit
def _rows_fwd_kernel(x_ptr, stride_a, stride_b, rows_b, tgt_ptr, logp_ptr, state_ptr, ent_ptr, V, inv_t,
                     BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + _row_offset(row, rows_b, stride_a, stride_b)
    logp, m, log_s, ent = row_stats(x_row, tgt_ptr + row, V, inv_t, BLOCK_V, ENTROPY)
    tl.store(logp_ptr + row, logp)
    tl.store(state_ptr + 2 * row, m)
    tl.store(state_ptr + 2 * row + 1, log_s)
    if ENTROPY:
        tl.store(ent_ptr + row, ent)


@triton.jit
def _rows_bwd_kernel(x_ptr, stride_a, stride_b, rows_b, dx_ptr, dstride_a, dstride_b, tgt_ptr, state_ptr, g_ptr,
                     h_ptr, ent_ptr, V, inv_t, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(g_ptr + row)
    h = g  # placeholders without ENTROPY (never read)
    ent = g
    if ENTROPY:
        h = tl.load(h_ptr + row)
        ent = tl.load(ent_ptr + row)
    row_grad(x_ptr + _row_offset(row, rows_b, stride_a, stride_b), dx_ptr + _row_offset(row, rows_b, dstride_a,
             dstride_b), tl.load(tgt_ptr + row), tl.load(state_ptr + 2 * row), tl.load(state_ptr + 2 * row + 1), ent,
             g, h, V, inv_t, BLOCK_V, ENTROPY)


def _one_level(x3: torch.Tensor) -> torch.Tensor:
    """[1, B, V] rows as [B, 1, V]: Triton specializes rows_b == 1, so the row offset needs no division."""
    return x3[0].unsqueeze(1) if x3.shape[0] == 1 else x3


def rows_fwd_triton(x3: torch.Tensor, targets: torch.Tensor, inv_t: float, entropy: bool):
    """x3 [A, B, V] (last dim contiguous), targets [A*B] -> logp [A*B], state [A*B, 2], entropy [A*B] or None (fp32)."""
    assert x3.dim() == 3 and x3.stride(2) == 1 and targets.is_contiguous() and targets.numel() == x3.shape[0] * x3.shape[1]
    n = targets.numel()
    logp = torch.empty(n, device=x3.device, dtype=torch.float32)
    state = torch.empty(n, 2, device=x3.device, dtype=torch.float32)
    ent = torch.empty_like(logp) if entropy else None
    if n:
        x3 = _one_level(x3)
        block, warps = row_config(x3.shape[2])
        _rows_fwd_kernel[(n,)](x3, x3.stride(0), x3.stride(1), x3.shape[1], targets, logp, state,
                               ent if entropy else logp, x3.shape[2], inv_t, BLOCK_V=block, ENTROPY=entropy,
                               num_warps=warps)
    return logp, state, ent


def rows_bwd_triton(x3: torch.Tensor, dx3: torch.Tensor, targets: torch.Tensor, state: torch.Tensor,
                    g: torch.Tensor, h: torch.Tensor | None, ent: torch.Tensor | None, inv_t: float) -> None:
    """Write dL/dx into dx3 [A, B, V] (may be x3 itself: an in-place gradient); h None: no entropy term."""
    assert x3.stride(2) == 1 and dx3.stride(2) == 1 and dx3.shape == x3.shape
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in (state, g))
    n = targets.numel()
    if n == 0:
        return
    entropy = h is not None
    x3, dx3 = _one_level(x3), _one_level(dx3)
    block, warps = row_config(x3.shape[2])
    _rows_bwd_kernel[(n,)](x3, x3.stride(0), x3.stride(1), x3.shape[1], dx3, dx3.stride(0), dx3.stride(1), targets,
                           state, g, h if entropy else g, ent if entropy else g, x3.shape[2], inv_t, BLOCK_V=block,
                           ENTROPY=entropy, num_warps=warps)


# ----------------------------------------------------------------------------- PyTorch twins

_LOGP_FLOOR = -1e4  # fp32 exp() is exactly 0 below about -104: a floor there changes no p, and keeps h * log p finite


def row_stats_torch(z: torch.Tensor, targets: torch.Tensor, entropy: bool):
    """z: fp32 [C, V] logits / T (not modified) -> log p fp32 [C, V], logp [C], state [C, 2], entropy [C] or None."""
    logp_all = torch.log_softmax(z, dim=-1)
    tgt = targets.unsqueeze(1)
    logp = logp_all.gather(1, tgt).squeeze(1)
    state = torch.zeros(z.shape[0], 2, device=z.device, dtype=torch.float32)
    state[:, 0] = z.gather(1, tgt).squeeze(1) - logp  # lse as the reference m, log s = 0: no extra pass over z
    ent = None
    if entropy:  # -sum p log p; p = 0 at -inf logits, whose p * log p is NaN: count 0 instead
        ent = -logp_all.exp().mul_(logp_all).nan_to_num_(nan=0.0).sum(-1)
    return logp_all, logp, state, ent


def row_grad_torch(logp_all: torch.Tensor, targets: torch.Tensor, g: torch.Tensor, h: torch.Tensor | None,
                   ent: torch.Tensor | None, inv_t: float) -> torch.Tensor:
    """logp_all: fp32 [C, V] log p, overwritten by dL/dx (fp32, returned); h None: no entropy term."""
    if h is None:
        dz = logp_all.exp_().mul_(g.neg().unsqueeze(1))
    else:  # -(g + h * (log p + H)), then times p
        neg_coef = logp_all.clamp_(min=_LOGP_FLOOR).add(ent[:, None]).mul_(h.neg()[:, None]).sub_(g[:, None])
        dz = logp_all.exp_().mul_(neg_coef)
    dz.scatter_add_(1, targets.unsqueeze(1), g.unsqueeze(1))
    return dz.mul_(inv_t) if inv_t != 1.0 else dz


# ----------------------------------------------------------------------------- a chunk of fresh logits, either backend
# linear_token_logprobs and fused_linear_grpo_loss compute logits [C, V] chunk by chunk with a matmul; the chunk is
# theirs to overwrite. A pass-1 "buffer" is what chunk_grad turns into dL/dlogits in place: the logits themselves
# (Triton) or the fp32 log p (PyTorch).


def _fp32_scaled(logits: torch.Tensor, inv_t: float) -> torch.Tensor:
    z = logits.float()  # fp32 logits: the same tensor, scaled in place
    return z.mul_(inv_t) if inv_t != 1.0 else z


def chunk_fwd(backend: str, logits: torch.Tensor, targets: torch.Tensor, inv_t: float, entropy: bool):
    """logits [C, V] (fresh, may be overwritten) -> logp [C], state [C, 2], entropy [C] or None, buffer."""
    if backend == "triton":
        logp, state, ent = rows_fwd_triton(logits.view(1, *logits.shape), targets, inv_t, entropy)
        return logp, state, ent, logits
    logp_all, logp, state, ent = row_stats_torch(_fp32_scaled(logits, inv_t), targets, entropy)
    return logp, state, ent, logp_all


def grad_buffer(backend: str, logits: torch.Tensor, state: torch.Tensor, inv_t: float) -> torch.Tensor:
    """chunk_fwd's buffer again, from recomputed logits [C, V] and the saved state (no statistics pass)."""
    if backend == "triton":
        return logits
    return _fp32_scaled(logits, inv_t).sub_(state.sum(1, keepdim=True))  # log p = z - (m + log s)


def chunk_grad(backend: str, buf: torch.Tensor, targets: torch.Tensor, state: torch.Tensor, g: torch.Tensor,
               h: torch.Tensor | None, ent: torch.Tensor | None, inv_t: float, dtype: torch.dtype) -> torch.Tensor:
    """The buffer becomes dL/dlogits [C, V] (in place; returned in `dtype`); h None: no entropy term."""
    if backend == "triton":
        x3 = buf.view(1, *buf.shape)
        rows_bwd_triton(x3, x3, targets, state, g, h, ent, inv_t)
        return buf
    return row_grad_torch(buf, targets, g, h, ent, inv_t).to(dtype)
