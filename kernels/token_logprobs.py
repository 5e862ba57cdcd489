"""Per-token log-probabilities (and entropy) straight from logits, without an fp32 [.., V] copy.

Math, per row (one position) with logits x in R^V, target y and temperature T, z = x / T:

    logp    = z_y - log sum_j exp(z_j)            (<= 0 always)
    entropy = -sum_j p_j log p_j,   p = softmax(z)

computed by the shared row routine in `_rows.py` (its docstring has the online formulas, the
gradient and the numerics), one Triton program per row here.

Memory traffic per row of V elements of `b` bytes: forward reads the row once (b*V) and writes
a few floats; backward reads it once and writes the gradient once (2*b*V). The naive
`log_softmax(x.float() / T).gather(...)` writes and re-reads several fp32 [.., V] tensors in
both passes. The forward saves only (max, log-sum) per row (and the entropy) for the backward.

Layout: logits are viewed as [A, B, V] rows without copying (see `_common.as_rows`), so a
contiguous tensor and the common slice `logits[:, :-1]` both work. The last dim must be
contiguous; anything else raises instead of silently copying. The Triton row kernels read that
view in place; the PyTorch path copies 16 MiB of rows at a time to fp32 and runs the row
routine's PyTorch twin on the copy.
"""

from __future__ import annotations

import torch

from ._common import as_rows, check_float, check_index, check_same_device, check_temperature, pick_backend
from ._rows import chunk_fwd, chunk_grad, grad_buffer, rows_bwd_triton, rows_fwd_triton

# ----------------------------------------------------------------------------- PyTorch path (CPU)

_TORCH_CHUNK_BYTES = 16 << 20  # fp32 working set per chunk of rows


def _row_chunks(x3: torch.Tensor):
    """Yield (a, b0, b1, rows) chunks of rows small enough for a 16 MiB fp32 working set; rows indexes the flat rows."""
    rows = max(1, _TORCH_CHUNK_BYTES // (4 * x3.shape[2]))
    for a in range(x3.shape[0]):
        for b0 in range(0, x3.shape[1], rows):
            b1 = min(b0 + rows, x3.shape[1])
            f0 = a * x3.shape[1] + b0
            yield a, b0, b1, slice(f0, f0 + b1 - b0)


def rows_fwd_torch(x3: torch.Tensor, targets: torch.Tensor, inv_t: float, entropy: bool):
    """Same contract as rows_fwd_triton, on fp32 copies of chunks of rows (never of all of x3)."""
    n = targets.numel()
    logp = torch.empty(n, device=x3.device, dtype=torch.float32)
    state = torch.empty(n, 2, device=x3.device, dtype=torch.float32)
    ent = torch.empty_like(logp) if entropy else None
    for a, b0, b1, sl in _row_chunks(x3):
        lp, st, en = chunk_fwd("torch", x3[a, b0:b1].to(torch.float32, copy=True), targets[sl], inv_t, entropy)[:3]
        logp[sl], state[sl] = lp, st
        if entropy:
            ent[sl] = en
    return logp, state, ent


def rows_bwd_torch(x3, dx3, targets, state, g, h, ent, inv_t) -> None:
    """Same contract as rows_bwd_triton (dx3 may alias x3)."""
    for a, b0, b1, sl in _row_chunks(x3):
        buf = grad_buffer("torch", x3[a, b0:b1].to(torch.float32, copy=True), state[sl], inv_t)
        dx3[a, b0:b1].copy_(chunk_grad("torch", buf, targets[sl], state[sl], g[sl], None if h is None else h[sl],
                                       None if ent is None else ent[sl], inv_t, torch.float32))


# ----------------------------------------------------------------------------- autograd


class TokenLogprobsFunction(torch.autograd.Function):
    """x3 [A, B, V], targets [A*B] -> logp [A*B] (and entropy [A*B]); saves only the row state (2 floats a row)."""

    @staticmethod
    def forward(ctx, x3, targets, inv_t: float, entropy: bool, backend: str):
        logp, state, ent = (rows_fwd_triton if backend == "triton" else rows_fwd_torch)(x3, targets, inv_t, entropy)
        ctx.save_for_backward(x3, targets, state, ent)
        ctx.inv_t, ctx.backend = inv_t, backend
        if entropy:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, g, g_ent=None):
        x3, targets, state, ent = ctx.saved_tensors
        dx3 = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)  # written once, by the kernel
        g = g.float().contiguous()
        h = None if g_ent is None else g_ent.float().contiguous()
        rows_bwd = rows_bwd_triton if ctx.backend == "triton" else rows_bwd_torch
        rows_bwd(x3, dx3, targets, state, g, h, ent, ctx.inv_t)
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
