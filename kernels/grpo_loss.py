"""The GRPO loss on per-token log-probs: value, gradient and statistics in one pass.

Math, per token t of completion i with advantage A_i (all log-probs at the sampling temperature):

    ratio  = exp(logp - old)                     old = logp.detach() when not given -> ratio == 1
    surr   = min(ratio * A, clamp(ratio, 1 - clip_low, 1 + clip_high) * A)
    kl     = exp(ref - logp) - (ref - logp) - 1  (k3 estimator, >= 0)
    l      = -(surr - beta * kl)

    dl/dlogp = -ratio * A * [not clipped] + beta * (1 - exp(ref - logp))

"clipped" is exactly where the min() picks the clamped, constant branch, so the surrogate's
gradient is zero there:  clipped-low  = ratio < 1 - clip_low  and A < 0,
                         clipped-high = ratio > 1 + clip_high and A > 0.
The statistics clip_low_frac / clip_high_frac count those tokens (over real tokens).

The loss is a weighted token sum L = sum_t w_t * l_t, with weights from the mask (m = mask != 0):

    grpo    w_t = m_t / (B * max(1, n_i))   mean over each completion's n_i tokens, then over the B
                                            completions; a fully masked row adds 0 and still counts
                                            in B (as TRL does), never NaN.
    bnpo    w_t = m_t / max(1, sum_i n_i)   mean over all real tokens of the batch.
    dr_grpo w_t = m_t / (B * L)             L = max_completion_len (default T), a constant.

Values at masked positions are never used (they may hold anything: padding, -inf, garbage).
Because dL/dlogp_t = w_t * dl/dlogp is known in the forward, the kernel writes it there and the
backward is one multiply by grad_output. Statistics (token means over real tokens of kl and
ratio, the clip fractions, and the loss) come out of the same kernel as per-block partial sums,
reduced by one torch sum; no host sync, no launch per statistic.

Note: with old = logp.detach() the ratio is 1 and, with group-centred advantages, the loss value
is ~0 by construction; the gradient (sum_t -w_t * A_i) is what trains. That is not a bug.

Memory traffic per token (fp32 inputs): forward reads logp, old, ref, mask (16 B) and writes
dL/dlogp (4 B); backward reads it and writes the gradient (8 B). Only logprobs gets a gradient;
old_logprobs, ref_logprobs and advantages are treated as constants.
"""

from __future__ import annotations

import torch

from ._common import FLOAT_DTYPES, check_float, check_same_device, check_shape, interpreting, pick_backend, tl, triton

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
STAT_NAMES = ("kl", "ratio", "clip_low_frac", "clip_high_frac")

# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def grpo_token_terms(logp, old, ref, adv, clip_low, clip_high, beta, HAS_REF: tl.constexpr):
    """Per-token (loss, dloss/dlogp, kl, ratio, clipped_low, clipped_high); shared with the fused linear kernel."""
    ratio = tl.exp(logp - old)
    clamped = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    surr = tl.minimum(ratio * adv, clamped * adv)
    # 0/1 floats rather than `&` of booleans: works for scalars and blocks alike (and the
    # interpreter cannot `&` a scalar boolean with a block).
    clip_lo = tl.where(ratio < 1.0 - clip_low, 1.0, 0.0) * tl.where(adv < 0.0, 1.0, 0.0)
    clip_hi = tl.where(ratio > 1.0 + clip_high, 1.0, 0.0) * tl.where(adv > 0.0, 1.0, 0.0)
    dloss = tl.where(clip_lo + clip_hi > 0.0, 0.0, -ratio * adv)
    if HAS_REF:
        d = ref - logp
        e = tl.exp(d)
        kl = e - d - 1.0
        dloss += beta * (1.0 - e)
    else:
        kl = tl.zeros_like(logp)
    loss = beta * kl - surr
    return loss, dloss, kl, ratio, clip_lo, clip_hi


@triton.jit
def _grpo_loss_kernel(logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, row_w_ptr, dlogp_ptr, partial_ptr,
                      T, clip_low, clip_high, beta, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
                      WRITE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr):
    # Program (i, j) handles tokens [j * BLOCK_T, (j + 1) * BLOCK_T) of completion i.
    i = tl.program_id(0)
    j = tl.program_id(1)
    cols = j * BLOCK_T + tl.arange(0, BLOCK_T)
    offs = i.to(tl.int64) * T + cols
    real = (tl.load(mask_ptr + offs, mask=cols < T, other=0.0) != 0.0)
    logp = tl.load(logp_ptr + offs, mask=real, other=0.0).to(tl.float32)
    old = logp
    if HAS_OLD:
        old = tl.load(old_ptr + offs, mask=real, other=0.0).to(tl.float32)
    ref = logp
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=real, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + i).to(tl.float32)
    w = tl.load(row_w_ptr + i)
    loss, dloss, kl, ratio, lo, hi = grpo_token_terms(logp, old, ref, adv, clip_low, clip_high, beta, HAS_REF)
    if WRITE_GRAD:
        tl.store(dlogp_ptr + offs, tl.where(real, w * dloss, 0.0), mask=cols < T)
    out = partial_ptr + (i * tl.num_programs(1) + j) * 5
    tl.store(out + 0, tl.sum(tl.where(real, w * loss, 0.0), axis=0))
    tl.store(out + 1, tl.sum(tl.where(real, kl, 0.0), axis=0))
    tl.store(out + 2, tl.sum(tl.where(real, ratio, 0.0), axis=0))
    tl.store(out + 3, tl.sum(tl.where(real, lo, 0.0), axis=0))
    tl.store(out + 4, tl.sum(tl.where(real, hi, 0.0), axis=0))


# ----------------------------------------------------------------------------- launcher


def _grpo_triton(logp, old, ref, adv, mask, row_w, clip_low, clip_high, beta, write_grad):
    """All [B, T] inputs contiguous, mask float32, row_w fp32 [B] -> (dlogp [B, T] or None, partial sums [5])."""
    b, t = logp.shape
    assert all(x is None or x.is_contiguous() for x in (logp, old, ref, adv, mask, row_w))
    block = min(64 if interpreting() else 1024, triton.next_power_of_2(max(t, 1)))
    grid = (b, triton.cdiv(t, block))
    partial = torch.empty(grid[0] * grid[1], 5, device=logp.device, dtype=torch.float32)
    dlogp = torch.empty(b, t, device=logp.device, dtype=torch.float32) if write_grad else None
    if b * t:
        _grpo_loss_kernel[grid](logp, old if old is not None else logp, ref if ref is not None else logp, adv, mask,
                                row_w, dlogp if write_grad else logp, partial, t, clip_low, clip_high, beta,
                                HAS_OLD=old is not None, HAS_REF=ref is not None, WRITE_GRAD=write_grad,
                                BLOCK_T=block, num_warps=4)
    else:
        partial.zero_()
    return dlogp, partial.sum(0)


# ----------------------------------------------------------------------------- PyTorch path


def grpo_token_terms_torch(logp, old, ref, adv, clip_low: float, clip_high: float, beta: float):
    """Vectorized twin of `grpo_token_terms` (fp32 tensors, adv broadcastable to logp)."""
    ratio = torch.exp(logp - old)
    surr = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv)
    clip_lo = (ratio < 1.0 - clip_low) & (adv < 0)
    clip_hi = (ratio > 1.0 + clip_high) & (adv > 0)
    dloss = torch.where(clip_lo | clip_hi, 0.0, -ratio * adv)
    if ref is not None:
        d = ref - logp
        e = torch.exp(d)
        kl = e - d - 1.0
        dloss = dloss + beta * (1.0 - e)
    else:
        kl = torch.zeros_like(logp)
    loss = beta * kl - surr
    return loss, dloss, kl, ratio, clip_lo.float(), clip_hi.float()


def _grpo_torch(logp, old, ref, adv, mask, row_w, clip_low, clip_high, beta, write_grad):
    """Same contract as _grpo_triton."""
    real = mask != 0
    zero = lambda x: None if x is None else torch.where(real, x.float(), 0.0)  # noqa: E731 - garbage never used
    logp32 = zero(logp)
    old32 = logp32 if old is None else zero(old)
    loss, dloss, kl, ratio, lo, hi = grpo_token_terms_torch(logp32, old32, zero(ref), adv.float()[:, None],
                                                            clip_low, clip_high, beta)
    w = torch.where(real, row_w[:, None], 0.0)
    sums = torch.stack([(w * loss).sum(), *(torch.where(real, x, 0.0).sum() for x in (kl, ratio, lo, hi))])
    return (w * dloss if write_grad else None), sums


# ----------------------------------------------------------------------------- shared argument handling


def check_grpo_args(op: str, main: dict[str, torch.Tensor], old_logprobs, ref_logprobs, advantages, mask,
                    shape, *, clip_low, clip_high, beta, loss_type, max_completion_len) -> None:
    """Shapes, dtypes and hyper-parameters shared by grpo_loss and fused_linear_grpo_loss."""
    b, t = shape
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{op}: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"{op}: clip_low must be in [0, 1), got {clip_low!r}")
    if not clip_high >= 0.0:
        raise ValueError(f"{op}: clip_high must be >= 0, got {clip_high!r}")
    if not beta >= 0.0:
        raise ValueError(f"{op}: beta must be >= 0, got {beta!r}")
    if ref_logprobs is None and beta != 0.0:
        raise ValueError(f"{op}: ref_logprobs is None but beta={beta} > 0; pass ref_logprobs (the reference "
                         "model's per-token log-probs, [B, T]) or set beta=0.0 to drop the KL term")
    if max_completion_len is not None and (not isinstance(max_completion_len, int) or max_completion_len < 1):
        raise ValueError(f"{op}: max_completion_len must be a positive int or None, got {max_completion_len!r}")
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if x is not None:
            check_float(op, name, x)
            check_shape(op, name, x, (b, t), " (completion tokens, like the mask)")
    check_float(op, "advantages", advantages)
    check_shape(op, "advantages", advantages, (b,), " (one advantage per completion)")
    if not isinstance(mask, torch.Tensor) or not (mask.dtype in FLOAT_DTYPES or mask.dtype in (torch.bool, torch.int64, torch.int32, torch.uint8)):
        raise TypeError(f"{op}: mask must be a bool, integer or float tensor, got {getattr(mask, 'dtype', type(mask))}")
    check_shape(op, "mask", mask, (b, t), " (1 for real completion tokens, 0 for padding)")
    check_same_device(op, **main, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages,
                      mask=mask)


def loss_weights(mask: torch.Tensor, loss_type: str, max_completion_len: int | None):
    """(row weight [B] fp32 so that L = sum_t row_w[i] * m_t * l_t, real-token count clamped to >= 1)."""
    b, t = mask.shape
    n_i = (mask != 0).sum(-1, dtype=torch.float32)           # [B]
    count = n_i.sum().clamp(min=1.0)
    if loss_type == "grpo":
        row_w = 1.0 / (b * n_i.clamp(min=1.0))
    elif loss_type == "bnpo":
        row_w = (1.0 / count).expand(b).contiguous()
    else:  # dr_grpo
        row_w = torch.full((b,), 1.0 / (b * (max_completion_len or t)), device=mask.device)
    return row_w, count


def stats_dict(sums: torch.Tensor, count: torch.Tensor) -> dict[str, torch.Tensor]:
    """sums = [loss, kl, ratio, clipped_low, clipped_high] -> dict of 0-dim tensors (no host sync)."""
    means = sums[1:] / count
    return {"loss": sums[0], **{name: means[k] for k, name in enumerate(STAT_NAMES)}}


# ----------------------------------------------------------------------------- autograd


class GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, adv, mask, row_w, clip_low, clip_high, beta, write_grad, backend):
        fn = _grpo_triton if backend == "triton" else _grpo_torch
        dlogp, sums = fn(logp, old, ref, adv, mask, row_w, clip_low, clip_high, beta, write_grad)
        ctx.save_for_backward(dlogp)
        ctx.dtype = logp.dtype
        ctx.mark_non_differentiable(sums)
        return sums[0].clone(), sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        (dlogp,) = ctx.saved_tensors
        if dlogp is None:
            raise RuntimeError("grpo_loss: the gradient was not computed in the forward (logprobs did not "
                               "require grad or grad mode was off)")
        return (dlogp * grad_loss).to(ctx.dtype), None, None, None, None, None, None, None, None, None, None


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
              beta: float = 0.04, loss_type: str = "grpo", max_completion_len: int | None = None,
              backend: str = "auto"):
    """GRPO / DAPO-style clipped surrogate loss with a k3 KL penalty, fused with its statistics.

    Args:
        logprobs: [B, T] per-token log-probs of the completions under the policy (differentiable).
        old_logprobs: [B, T] log-probs at sampling time, or None for ``logprobs.detach()`` (one
            update per rollout: ratio == 1).
        ref_logprobs: [B, T] log-probs under the reference model; None only with ``beta=0``.
        advantages: [B] one advantage per completion (e.g. group-normalised rewards).
        mask: [B, T] bool / int / float, nonzero for real completion tokens. Masked positions of
            the other inputs are never read into the math (they may hold anything).
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        beta: KL penalty weight. loss_type: "grpo" | "bnpo" | "dr_grpo" (see the module docstring).
        max_completion_len: the L of dr_grpo (default T); ignored by the other loss types.
        backend: "auto" | "triton" | "torch".

    Returns:
        (loss, stats): loss a 0-dim float32 tensor; stats a dict of 0-dim float32 tensors
        ``loss, kl, ratio, clip_low_frac, clip_high_frac`` (means over real tokens; kl is 0
        without ref_logprobs), computed in the same pass, without a host sync.
        Inputs are made contiguous / float32 where needed (cheap [B, T] copies).
    """
    op = "grpo_loss"
    check_float(op, "logprobs", logprobs)
    if logprobs.dim() != 2:
        raise ValueError(f"{op}: logprobs must be [B, T] (completions x tokens), got shape {list(logprobs.shape)}")
    device = logprobs.device
    check_grpo_args(op, {"logprobs": logprobs}, old_logprobs, ref_logprobs, advantages, mask, logprobs.shape,
                    clip_low=clip_low,
                    clip_high=clip_high, beta=beta, loss_type=loss_type, max_completion_len=max_completion_len)
    backend = pick_backend(op, backend, device)
    row_w, count = loss_weights(mask, loss_type, max_completion_len)
    write_grad = torch.is_grad_enabled() and logprobs.requires_grad
    c = lambda x: None if x is None else x.contiguous()  # noqa: E731
    loss, sums = GRPOLossFunction.apply(c(logprobs), c(old_logprobs), c(ref_logprobs), c(advantages),
                                        mask.to(torch.float32).contiguous(), row_w, float(clip_low),
                                        float(clip_high), float(beta), write_grad, backend)
    return loss, stats_dict(sums, count)
