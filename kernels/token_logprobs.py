"""Per-token log-probabilities (and entropy) straight from logits, without an fp32 [.., V] copy.

Math, per row (one position) with logits x in R^V, target y and temperature T, z = x / T:

    lse     = log sum_j exp(z_j)                 (online: running max m and sum s, one pass)
    logp    = z_y - lse                           (<= 0 always)
    entropy = lse - sum_j p_j z_j,   p = exp(z - lse)

Backward, given g = dL/dlogp and h = dL/dentropy per row:

    dL/dz_j = g * ([j == y] - p_j) - h * p_j * (z_j - lse + entropy),      dL/dx = dL/dz / T

Memory traffic per row of V elements of `b` bytes: forward reads the row once (b*V) and writes
a few floats; backward reads it once and writes the gradient once (2*b*V). The naive
`log_softmax(x.float() / T).gather(...)` writes and re-reads several fp32 [.., V] tensors in
both passes. The forward saves only lse (and entropy) per row for the backward.

Layout: logits are viewed as [A, B, V] rows without copying (see `_common.as_rows`), so a
contiguous tensor and the common slice `logits[:, :-1]` both work. The last dim must be
contiguous; anything else raises instead of silently copying.

The row kernels and their launchers below are also used by `linear_token_logprobs` on the
logits chunks it computes with a matmul.
"""

from __future__ import annotations

import torch

from ._common import (as_rows, check_float, check_index, check_same_device, check_temperature, row_config,
                      pick_backend, tl, triton)

# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _row_offset(row, rows_b, stride_a, stride_b):
    # Row r of the [A, B, V] view starts at (r // B) * stride_a + (r % B) * stride_b.
    return (row // rows_b) * stride_a + (row % rows_b) * stride_b


@triton.jit
def _logprob_fwd_kernel(x_ptr, stride_a, stride_b, rows_b, tgt_ptr, logp_ptr, lse_ptr, ent_ptr, V, inv_t,
                        BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + _row_offset(row, rows_b, stride_a, stride_b)
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")  # running max of z
    s = 0.0            # running sum of exp(z - m)
    zs = 0.0           # running sum of exp(z - m) * z (entropy only)
    for start in range(0, V, BLOCK_V):
        ok = start + cols < V
        z = tl.load(x_row + start + cols, mask=ok, other=-float("inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # A row (or a first block) of -inf logits must not turn into NaN via (-inf) - (-inf).
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        scale = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref)  # 0 in the padding
        s = s * scale + tl.sum(e, axis=0)
        if ENTROPY:
            zs = zs * scale + tl.sum(e * tl.where(e > 0.0, z, 0.0), axis=0)  # no 0 * -inf (padding, -inf logits)
        m = m_new
    m_ref = tl.where(m == -float("inf"), 0.0, m)
    lse = m_ref + tl.log(s)
    tgt = tl.load(tgt_ptr + row)
    z_t = tl.load(x_row + tgt).to(tl.float32) * inv_t
    tl.store(logp_ptr + row, z_t - lse)
    tl.store(lse_ptr + row, lse)
    if ENTROPY:
        tl.store(ent_ptr + row, lse - zs / s)


@triton.jit
def _logprob_bwd_kernel(x_ptr, stride_a, stride_b, rows_b, dx_ptr, dstride_a, dstride_b, tgt_ptr, lse_ptr,
                        g_ptr, gent_ptr, ent_ptr, V, inv_t, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr):
    # dx may alias x (same strides): every element is read, then written, by the same program.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + _row_offset(row, rows_b, stride_a, stride_b)
    dx_row = dx_ptr + _row_offset(row, rows_b, dstride_a, dstride_b)
    cols = tl.arange(0, BLOCK_V)
    tgt = tl.load(tgt_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    if ENTROPY:
        g_ent = tl.load(gent_ptr + row)
        ent = tl.load(ent_ptr + row)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        ok = idx < V
        z = tl.load(x_row + idx, mask=ok, other=0.0).to(tl.float32) * inv_t
        p = tl.exp(z - lse)
        dz = tl.where(idx == tgt, g, 0.0) - g * p
        if ENTROPY:
            dz -= tl.where(p > 0.0, g_ent * p * (z - lse + ent), 0.0)  # -inf logits: p = 0, no NaN
        tl.store(dx_row + idx, (dz * inv_t).to(dx_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers


def rows_fwd_triton(x3: torch.Tensor, targets: torch.Tensor, inv_t: float, entropy: bool):
    """x3 [A, B, V] (last dim contiguous), targets [A*B] -> logp, lse, entropy-or-None, each fp32 [A*B]."""
    assert x3.dim() == 3 and x3.stride(2) == 1 and targets.is_contiguous() and targets.numel() == x3.shape[0] * x3.shape[1]
    n = targets.numel()
    logp = torch.empty(n, device=x3.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if entropy else lse  # dummy pointer when unused
    if n:
        block, warps = row_config(x3.shape[2])
        _logprob_fwd_kernel[(n,)](x3, x3.stride(0), x3.stride(1), x3.shape[1], targets, logp, lse, ent,
                                  x3.shape[2], inv_t, BLOCK_V=block, ENTROPY=entropy, num_warps=warps)
    return logp, lse, (ent if entropy else None)


def rows_bwd_triton(x3: torch.Tensor, dx3: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                    g: torch.Tensor, g_ent: torch.Tensor | None, ent: torch.Tensor | None, inv_t: float) -> None:
    """Write dL/dx into dx3 [A, B, V] (may be x3 itself, for an in-place gradient)."""
    assert x3.stride(2) == 1 and dx3.stride(2) == 1 and dx3.shape == x3.shape
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in (lse, g))
    n = targets.numel()
    if n == 0:
        return
    entropy = g_ent is not None
    block, warps = row_config(x3.shape[2])
    _logprob_bwd_kernel[(n,)](x3, x3.stride(0), x3.stride(1), x3.shape[1], dx3, dx3.stride(0), dx3.stride(1),
                              targets, lse, g, g_ent if entropy else g, ent if entropy else g, x3.shape[2], inv_t,
                              BLOCK_V=block, ENTROPY=entropy, num_warps=warps)


# ----------------------------------------------------------------------------- PyTorch path (CPU)

_TORCH_CHUNK_BYTES = 16 << 20  # fp32 working set per chunk of rows


def _row_chunks(x3: torch.Tensor):
    """Yield (a, b0, b1, flat0) chunks of rows small enough for a 16 MiB fp32 working set."""
    rows = max(1, _TORCH_CHUNK_BYTES // (4 * x3.shape[2]))
    for a in range(x3.shape[0]):
        for b0 in range(0, x3.shape[1], rows):
            b1 = min(b0 + rows, x3.shape[1])
            yield a, b0, b1, a * x3.shape[1] + b0


def _fp32_chunk(x: torch.Tensor, inv_t: float) -> torch.Tensor:
    """A fresh fp32 copy of a chunk of rows, scaled by 1/T (safe to modify in place)."""
    z = x.to(torch.float32, copy=True)
    return z.mul_(inv_t) if inv_t != 1.0 else z


def chunk_fwd_torch(z: torch.Tensor, targets: torch.Tensor, entropy: bool):
    """z: fp32 [C, V] logits already divided by T (not modified) -> logp, lse, entropy-or-None [C]."""
    logp_all = torch.log_softmax(z, dim=-1)
    tgt = targets.unsqueeze(1)
    logp = logp_all.gather(1, tgt).squeeze(1)
    lse = z.gather(1, tgt).squeeze(1) - logp
    ent = -torch.where(logp_all > -float("inf"), logp_all.exp() * logp_all, 0.0).sum(-1) if entropy else None
    return logp, lse, ent


def chunk_grad_torch(z, targets, lse, g, g_ent, ent, inv_t: float) -> torch.Tensor:
    """Turn z (fp32 [C, V] logits / T, owned by the caller) into dL/dlogits in place, and return it."""
    coef = g.unsqueeze(1)
    if g_ent is not None:  # dz = -p * (g + h * (z - lse + entropy)) + g at the target
        z.clamp_(min=torch.finfo(torch.float32).min)  # -inf logits would give p * coef = 0 * inf
        coef = (z - lse[:, None] + ent[:, None]) * g_ent[:, None] + coef
    dz = z.sub_(lse[:, None]).exp_().mul_(coef.neg())  # -p * coef; coef is [C, 1], cheap to negate
    dz.scatter_add_(1, targets.unsqueeze(1), g.unsqueeze(1))
    return dz.mul_(inv_t) if inv_t != 1.0 else dz


def rows_fwd_torch(x3: torch.Tensor, targets: torch.Tensor, inv_t: float, entropy: bool):
    """Same contract as rows_fwd_triton, in chunks of rows (never an fp32 copy of all of x3)."""
    n = targets.numel()
    logp = torch.empty(n, device=x3.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if entropy else None
    for a, b0, b1, f0 in _row_chunks(x3):
        sl = slice(f0, f0 + b1 - b0)
        lp, ls, en = chunk_fwd_torch(_fp32_chunk(x3[a, b0:b1], inv_t), targets[sl], entropy)
        logp[sl], lse[sl] = lp, ls
        if entropy:
            ent[sl] = en
    return logp, lse, ent


def rows_bwd_torch(x3, dx3, targets, lse, g, g_ent, ent, inv_t) -> None:
    """Same contract as rows_bwd_triton (dx3 may alias x3)."""
    for a, b0, b1, f0 in _row_chunks(x3):
        sl = slice(f0, f0 + b1 - b0)
        dz = chunk_grad_torch(_fp32_chunk(x3[a, b0:b1], inv_t), targets[sl], lse[sl], g[sl],
                              None if g_ent is None else g_ent[sl], None if ent is None else ent[sl], inv_t)
        dx3[a, b0:b1].copy_(dz)


def rows_fwd(backend: str, *args):
    return (rows_fwd_triton if backend == "triton" else rows_fwd_torch)(*args)


def rows_bwd(backend: str, *args) -> None:
    (rows_bwd_triton if backend == "triton" else rows_bwd_torch)(*args)


# ----------------------------------------------------------------------------- autograd


class TokenLogprobsFunction(torch.autograd.Function):
    """x3 [A, B, V], targets [A*B] -> logp [A*B] (and entropy [A*B]); saves only lse per row."""

    @staticmethod
    def forward(ctx, x3, targets, inv_t: float, entropy: bool, backend: str):
        logp, lse, ent = rows_fwd(backend, x3, targets, inv_t, entropy)
        ctx.save_for_backward(x3, targets, lse, ent)
        ctx.inv_t, ctx.backend = inv_t, backend
        if entropy:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, g, g_ent=None):
        x3, targets, lse, ent = ctx.saved_tensors
        dx3 = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)  # written once, by the kernel
        g = g.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        rows_bwd(ctx.backend, x3, dx3, targets, lse, g, g_ent, ent, ctx.inv_t)
        return dx3, None, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, *, backend: str = "auto"):
    """Log-probability of each target token under softmax(logits / temperature).

    Args:
        logits: [..., V] float32 / bfloat16 / float16. The last dim
            must be contiguous and the rest viewable as rows without a copy (a contiguous tensor,
            or a slice like ``logits[:, :-1]``); otherwise a ValueError asks for ``.contiguous()``.
        targets: [...] int64 (or int32) token ids in [0, V), same leading shape as logits.
        temperature: positive float; the log-probs are those of ``log_softmax(logits / T)``.
        return_entropy: also return the entropy of ``softmax(logits / T)`` per position.
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "triton" or "torch".

    Returns:
        float32 [...] log-probs (and float32 [...] entropies if asked). Differentiable w.r.t.
        logits; the backward writes the gradient of the logits once, in the logits' dtype.
        Never allocates an fp32 copy of the logits (the torch path works in 16 MiB row chunks).
    """
    op = "token_logprobs"
    check_float(op, "logits", logits)
    check_index(op, "targets", targets)
    device = check_same_device(op, logits=logits, targets=targets)
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"{op}: targets must have shape logits.shape[:-1] = {list(logits.shape[:-1])}, "
                         f"got {list(targets.shape)}")
    inv_t = 1.0 / check_temperature(op, temperature)
    backend = pick_backend(op, backend, device)
    x3 = as_rows(op, "logits", logits)
    flat_targets = targets.reshape(-1).contiguous()
    out = TokenLogprobsFunction.apply(x3, flat_targets, inv_t, bool(return_entropy), backend)
    if return_entropy:
        return out[0].view(targets.shape), out[1].view(targets.shape)
    return out.view(targets.shape)
