"""The GRPO loss straight from hidden states and the lm_head: one pass, gradients included.

Math: logp = linear_token_logprobs(hidden, weight, targets, T), then exactly `grpo_loss` (see
grpo_loss.py): L = sum_t w_t * l_t(logp_t), with w_t from the mask and loss_type.

Since l_t depends on token t's own logp only, dL/dlogp_t = w_t * dl_t/dlogp is known as soon as
logp_t is. So the forward does everything, chunk by chunk over the N = B*T tokens:

    logits_c        = hidden_c @ weight.T                      matmul 1
    row kernel      : lse pass over the row (read), logp, the GRPO token terms, then
                      dlogits = w * dl/dlogp * (onehot - p) / T  written in place (read + write)
    grad_hidden_c   = dlogits_c @ weight                       matmul 2
    grad_weight    += dlogits_c.T @ hidden_c                   matmul 3

and the backward only multiplies the stashed gradients by grad_output: 3 matmuls in all, no
recompute, peak extra memory O(C x V) plus the stashed grads.

Trade-offs (chosen, documented):
* The stash costs a [V, H] grad_weight buffer (weight.dtype, accumulated with addmm: fp32 inside
  each chunk's GEMM, one rounding per chunk) and an [N, H] grad_hidden from the forward until
  backward. Calling the loss on several micro-batches before one backward keeps one stash per
  call; the usual accumulation loop (forward, backward, forward, backward...) keeps one at a time.
  Autograd then adds each micro-batch's grad_weight into weight.grad as usual.
* The gradients are computed in the forward. They are skipped (forward only: 1 matmul per chunk)
  under torch.no_grad() or when neither hidden nor weight requires grad.
* backward scales the stash in place and frees it, so it can run once (retain_graph=True and a
  second backward raise a clear error).
* On the torch backend (CPU) padding tokens (mask == 0) are dropped before the matmuls (one
  nonzero(), a host sync: free on CPU); the Triton path keeps them (zero gradient rows) to stay
  free of host syncs.

hidden: [B, T, H] (matching targets and mask [B, T]) or already flat [B*T, H] in the same order.
"""

from __future__ import annotations

import torch

from ._common import check_index, check_same_device, check_temperature, interpreting, pick_backend, tl, triton
from .grpo_loss import check_grpo_args, grpo_token_terms, grpo_token_terms_torch, loss_weights, stats_dict
from .linear_token_logprobs import check_linear_args, pick_chunk_size
from .token_logprobs import _block_v

N_TOK_STATS = 5  # per token: w * loss, kl, ratio, clipped_low, clipped_high

# ----------------------------------------------------------------------------- Triton kernel


@triton.jit
def _fused_grpo_rows_kernel(x_ptr, stride_row, tgt_ptr, old_ptr, ref_ptr, adv_ptr, w_ptr, stats_ptr, row0, T, V,
                            inv_t, clip_low, clip_high, beta, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
                            WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    # One program per token of the chunk; n is its index among all B*T tokens.
    r = tl.program_id(0).to(tl.int64)
    n = row0 + r
    x_row = x_ptr + r * stride_row
    cols = tl.arange(0, BLOCK_V)
    # Pass 1: online logsumexp of z = x / T (read the row once).
    m = -float("inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        z = tl.load(x_row + start + cols, mask=start + cols < V, other=-float("inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref), axis=0)
        m = m_new
    # Keep the max and log(s) apart: logp = (z_y - m) - log(s) rounds once per small term, where
    # z_y - (m + log s) would first round lse to the ulp of a large number (up to a few 1e-7
    # relative), an error that the target's p (near 1, in g * (1 - p)) turns into a gradient error.
    m = tl.where(m == -float("inf"), 0.0, m)
    log_s = tl.log(s)
    tgt = tl.load(tgt_ptr + n)
    logp = (tl.load(x_row + tgt).to(tl.float32) * inv_t - m) - log_s

    # The GRPO terms of this token. Padding (w == 0) may hold garbage old/ref: never used.
    w = tl.load(w_ptr + n)
    real = w != 0.0
    old = logp
    if HAS_OLD:
        old = tl.where(real, tl.load(old_ptr + n), logp)
    ref = logp
    if HAS_REF:
        ref = tl.where(real, tl.load(ref_ptr + n), logp)
    adv = tl.load(adv_ptr + n // T)
    loss, dloss, kl, ratio, lo, hi = grpo_token_terms(logp, old, ref, adv, clip_low, clip_high, beta, HAS_REF)
    out = stats_ptr + r * 5
    tl.store(out + 0, tl.where(real, w * loss, 0.0))
    tl.store(out + 1, tl.where(real, kl, 0.0))
    tl.store(out + 2, tl.where(real, ratio, 0.0))
    tl.store(out + 3, tl.where(real, lo, 0.0))
    tl.store(out + 4, tl.where(real, hi, 0.0))

    # Pass 2: dL/dx = w * dl/dlogp * (onehot - p) / T, over the logits in place (read + write).
    if WRITE_GRAD:
        g = tl.where(real, w * dloss, 0.0)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            ok = idx < V
            z = tl.load(x_row + idx, mask=ok, other=0.0).to(tl.float32) * inv_t
            dz = tl.where(idx == tgt, g, 0.0) - g * tl.exp((z - m) - log_s)
            tl.store(x_row + idx, (dz * inv_t).to(x_ptr.dtype.element_ty), mask=ok)


def _chunk_triton(logits, row0, T, targets, old, ref, adv, tok_w, inv_t, clip_low, clip_high, beta, write_grad):
    """logits [C, V] (fresh, overwritten by dL/dlogits when write_grad) -> per-token stats [C, 5]."""
    c, v = logits.shape
    assert logits.stride(1) == 1 and all(x is None or x.is_contiguous() for x in (targets, old, ref, adv, tok_w))
    stats = torch.empty(c, N_TOK_STATS, device=logits.device, dtype=torch.float32)
    block, warps = _block_v(v)
    _fused_grpo_rows_kernel[(c,)](logits, logits.stride(0), targets, old if old is not None else tok_w,
                                  ref if ref is not None else tok_w, adv, tok_w, stats, row0, T, v, inv_t,
                                  clip_low, clip_high, beta, HAS_OLD=old is not None, HAS_REF=ref is not None,
                                  WRITE_GRAD=write_grad, BLOCK_V=block, num_warps=warps)
    return stats


# ----------------------------------------------------------------------------- PyTorch path (CPU)


def _chunk_torch(logits, inv_t, targets, old, ref, adv, tok_w, clip_low, clip_high, beta, write_grad):
    """Same as _chunk_triton on gathered per-token inputs (all real tokens); returns (stats [C, 5], dlogits)."""
    z = logits.float()
    z = z.mul_(inv_t) if inv_t != 1.0 else z
    logp_all = torch.log_softmax(z, dim=-1)
    del z
    tgt = targets.unsqueeze(1)
    logp = logp_all.gather(1, tgt).squeeze(1)
    loss, dloss, kl, ratio, lo, hi = grpo_token_terms_torch(logp, logp if old is None else old, ref, adv,
                                                            clip_low, clip_high, beta)
    stats = torch.stack([tok_w * loss, kl, ratio, lo, hi], dim=1)
    if not write_grad:
        return stats, None
    g = (tok_w * dloss).unsqueeze(1)
    dz = logp_all.exp_().mul_(g.neg())  # -g * p, in place over the log-probs
    dz.scatter_add_(1, tgt, g)
    dz = dz.mul_(inv_t) if inv_t != 1.0 else dz
    return stats, dz.to(logits.dtype)


# ----------------------------------------------------------------------------- autograd


class FusedLinearGRPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, old, ref, adv, tok_w, T: int, inv_t: float, clip_low: float,
                clip_high: float, beta: float, need_h: bool, need_w: bool, chunk: int, backend: str):
        # hidden [N, H]; targets, old, ref, tok_w: [N]; adv [B] (token n belongs to completion n // T).
        n = hidden.shape[0]
        write_grad = need_h or need_w
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        if backend == "triton":
            stats = torch.empty(n, N_TOK_STATS, device=hidden.device, dtype=torch.float32)
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                h = hidden[s:e]
                logits = h @ weight.T
                stats[s:e] = _chunk_triton(logits, s, T, targets, old, ref, adv, tok_w, inv_t, clip_low,
                                           clip_high, beta, write_grad)
                if need_h:
                    torch.mm(logits, weight, out=grad_h[s:e])  # logits now hold dL/dlogits
                if need_w:
                    grad_w.addmm_(logits.T, h)
        else:
            real = (tok_w != 0).nonzero().squeeze(1)  # drop padding before any matmul
            stats = torch.zeros(real.numel(), N_TOK_STATS, device=hidden.device, dtype=torch.float32)
            adv_tok = adv.float().repeat_interleave(T)
            for s in range(0, real.numel(), chunk):
                idx = real[s:s + chunk]
                h = hidden.index_select(0, idx)
                pick = lambda x: None if x is None else x.index_select(0, idx).float()  # noqa: E731
                st, dlogits = _chunk_torch(h @ weight.T, inv_t, targets.index_select(0, idx), pick(old), pick(ref),
                                           pick(adv_tok), pick(tok_w), clip_low, clip_high, beta, write_grad)
                stats[s:s + idx.numel()] = st
                if need_h:
                    grad_h.index_copy_(0, idx, dlogits @ weight)
                if need_w:
                    grad_w.addmm_(dlogits.T, h)
        ctx.grads = (grad_h, grad_w)
        sums = stats.sum(0)
        ctx.mark_non_differentiable(sums)
        return sums[0].clone(), sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_grpo_loss: backward can run only once per forward (the gradients "
                               "are computed in the forward and scaled in place); retain_graph=True is not "
                               "supported, call the loss again instead")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is not None:
            grad_h.mul_(grad_loss)
        if grad_w is not None:
            grad_w.mul_(grad_loss)
        return (grad_h, grad_w) + (None,) * 14


def fused_linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
                           advantages: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0,
                           clip_low: float = 0.2, clip_high: float = 0.2, beta: float = 0.04,
                           loss_type: str = "grpo", max_completion_len: int | None = None,
                           chunk_size: int | None = None, backend: str = "auto"):
    """grpo_loss(linear_token_logprobs(hidden, weight, targets, temperature), ...) in one fused pass.

    Args:
        hidden: [B, T, H] hidden states predicting the completion tokens (or flat [B*T, H]).
        weight: [V, H] lm_head weight, same dtype/device as hidden.
        targets: [B, T] int64 completion token ids (any valid id at padding).
        old_logprobs, ref_logprobs, advantages, mask, clip_low, clip_high, beta, loss_type,
            max_completion_len: as in `grpo_loss` (old/ref [B, T], advantages [B], mask [B, T]).
        temperature: the sampling temperature; log-probs are those of softmax(logits / T).
        chunk_size: tokens per chunk (default: from a memory budget, see linear_token_logprobs).
        backend: "auto" | "triton" | "torch".

    Returns:
        (loss, stats) exactly like `grpo_loss`. Gradients for hidden and weight are computed in
        the forward (see the module docstring for the memory trade-off) and skipped under no_grad.
    """
    op = "fused_linear_grpo_loss"
    check_linear_args(op, hidden, weight)
    check_index(op, "targets", targets)
    if targets.dim() != 2:
        raise ValueError(f"{op}: targets must be [B, T] (completion token ids), got shape {list(targets.shape)}")
    b, t = targets.shape
    if tuple(hidden.shape[:-1]) not in ((b, t), (b * t,)):
        raise ValueError(f"{op}: hidden must be [B, T, H] = [{b}, {t}, H] (or [B*T, H]) to match targets, "
                         f"got {list(hidden.shape)}")
    check_grpo_args(op, {"hidden": hidden, "weight": weight, "targets": targets}, old_logprobs, ref_logprobs,
                    advantages, mask, (b, t), clip_low=clip_low, clip_high=clip_high, beta=beta,
                    loss_type=loss_type, max_completion_len=max_completion_len)
    inv_t = 1.0 / check_temperature(op, temperature)
    device = hidden.device
    backend = pick_backend(op, backend, device)

    row_w, count = loss_weights(mask, loss_type, max_completion_len)
    tok_w = (row_w[:, None] * (mask != 0)).reshape(-1).contiguous()       # [N] weight of each token in L
    flat = lambda x: None if x is None else x.reshape(-1).float().contiguous()  # noqa: E731
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    chunk = pick_chunk_size(b * t, weight.shape[0], device, weight.dtype, chunk_size)
    loss, sums = FusedLinearGRPOFunction.apply(
        hidden.reshape(b * t, -1).contiguous(), weight, targets.reshape(-1).contiguous(), flat(old_logprobs),
        flat(ref_logprobs), advantages.float().contiguous(), tok_w, t, inv_t, float(clip_low), float(clip_high),
        float(beta), need_h, need_w, chunk, backend)
    return loss, stats_dict(sums, count)
