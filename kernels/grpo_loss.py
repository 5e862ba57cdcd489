"""The GRPO loss on per-token log-probs: value, gradient and statistics in one pass.

Math, per token t of completion i with advantage A_i (all log-probs at the sampling temperature):

    ratio  = exp(logp - old)                     old = logp.detach() when not given -> ratio == 1
    surr   = min(u * A, clamp(ratio, 1 - clip_low, 1 + clip_high) * A)
             u = ratio, or min(ratio, delta) with the dual clip (delta > 1 + clip_high)
    kl     = exp(ref - logp) - (ref - logp) - 1  (k3 estimator, >= 0)
    l      = c * -(surr - beta * kl)             c = 1, or the TIS weight below

    dl/dlogp = c * (-ratio * A * [not clipped] + beta * (1 - exp(ref - logp)))

"clipped" is exactly where the min() picks a constant branch, so the surrogate's gradient is
zero there:  clipped-low  = ratio < 1 - clip_low  and A < 0,
             clipped-high = ratio > 1 + clip_high and A > 0,
             dual-clipped = ratio > delta         and A < 0   (only with delta; not a statistic).
The statistics clip_low_frac / clip_high_frac count the first two (over real tokens).

Variants (each behind a tl.constexpr flag, so the default kernel reads and computes nothing more):

* Rollout-mismatch correction (truncated importance sampling, `rollout_logprobs`, `tis_cap`):
  c_t = min(exp(old_t - rollout_t), tis_cap), a constant (no gradient through it), multiplies the
  whole token loss, KL included. Statistics tis_weight_mean and tis_capped_frac (c was capped).
* GSPO (`ratio_level="sequence"`): every real token of completion i uses one ratio
      s_i = exp(sum_t m_t (logp_t - old_t) / max(1, n_i)),  ds_i/dlogp_t = s_i m_t / max(1, n_i),
  clipped (and counted, per token) at sequence level; the KL stays per token. The chain rule
  through s_i gives
      dL/dlogp_t = w_t * (-A_i * [not clipped_i] * s_i * f_i + c_t * beta * (1 - exp(ref_t - logp_t)))
      f_i = sum_t' m_t' c_t' / max(1, n_i)   (1 without TIS)
  s_i and f_i need the whole row first: a [B, T] torch reduction (`seq_ratio`, the same for
  both backends) runs before the kernel. It is a few elementwise [B, T] passes, small next to
  the log-prob computation that produced logp, and it keeps the kernel one program per block
  of tokens (a Triton row reduction would need one program per row or a second launch anyway).

The loss is a weighted token sum L = sum_t w_t * l_t, with weights from the mask (m = mask != 0):

    grpo    w_t = m_t / (B * max(1, n_i))   mean over each completion's n_i tokens, then over the B
                                            completions; a fully masked row adds 0 and still counts
                                            in B (as TRL does), never NaN.
    bnpo    w_t = m_t / max(1, sum_i n_i)   mean over all real tokens of the batch.
    dr_grpo w_t = m_t / (B * L)             L = max_completion_len (default T), a constant.
    dapo    w_t = m_t / num_tokens          num_tokens = the completion-token count of the whole
                                            generation batch (all micro-batches, all ranks), so
                                            summing the micro-batch losses gives the batch loss;
                                            None: this batch's own count (then equal to bnpo).

Values at masked positions are never used (they may hold anything: padding, -inf, garbage).
Because dL/dlogp_t = w_t * dl/dlogp is known in the forward, the kernel writes it there and the
backward is one multiply by grad_output. Statistics (token means over real tokens of kl and
ratio, the clip fractions, the TIS weights, and the loss) come out of the same kernel as
per-block partial sums, reduced by one torch sum; no host sync, no launch per statistic.

Note: with old = logp.detach() the ratio is 1 and, with group-centred advantages, the loss value
is ~0 by construction; the gradient (sum_t -w_t * A_i) is what trains. That is not a bug.

Memory traffic per token (fp32 inputs): forward reads logp, old, ref, mask (16 B) and writes
dL/dlogp (4 B); backward reads it and writes the gradient (8 B). TIS adds a read of rollout
(4 B). Only logprobs gets a gradient; old_logprobs, ref_logprobs, rollout_logprobs and
advantages are treated as constants.
"""

from __future__ import annotations

import torch

from ._common import FLOAT_DTYPES, check_float, check_same_device, check_shape, pick_backend, tl, token_config, triton
from .loss_options import STAT_NAMES, TIS_STAT_NAMES, LossConfig, loss_config


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def grpo_token_terms(ratio, dratio, logp, ref, adv, tis_w, clip_low, clip_high, beta, delta,
                     HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_TIS: tl.constexpr, SEQ: tl.constexpr):
    """Per-token (loss, dloss/dlogp, kl, clipped_low, clipped_high); shared with the fused linear kernel.

    dratio = dratio/dlogp of this token: the ratio itself at token level, s_i * f_i for GSPO
    (where the TIS weights are already folded into f_i)."""
    clamped = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    unclipped = ratio
    if HAS_DELTA:
        unclipped = tl.minimum(ratio, delta)
    surr = tl.minimum(unclipped * adv, clamped * adv)
    # 0/1 floats rather than `&` of booleans: works for scalars and blocks alike (and the
    # interpreter cannot `&` a scalar boolean with a block).
    clip_lo = tl.where(ratio < 1.0 - clip_low, 1.0, 0.0) * tl.where(adv < 0.0, 1.0, 0.0)
    clip_hi = tl.where(ratio > 1.0 + clip_high, 1.0, 0.0) * tl.where(adv > 0.0, 1.0, 0.0)
    frozen = clip_lo + clip_hi
    if HAS_DELTA:
        frozen += tl.where(ratio > delta, 1.0, 0.0) * tl.where(adv < 0.0, 1.0, 0.0)
    dloss = tl.where(frozen > 0.0, 0.0, -dratio * adv)
    loss = -surr
    if HAS_TIS:
        loss = loss * tis_w
        if not SEQ:  # GSPO carries the weights of the whole row in dratio
            dloss = dloss * tis_w
    if HAS_REF:
        d = ref - logp
        e = tl.exp(d)
        kl = e - d - 1.0
        if HAS_TIS:
            loss += tis_w * (beta * kl)
            dloss += tis_w * (beta * (1.0 - e))
        else:
            loss += beta * kl
            dloss += beta * (1.0 - e)
    else:
        kl = tl.zeros_like(logp)
    return loss, dloss, kl, clip_lo, clip_hi


@triton.jit
def tis_weight(old, roll, tis_cap):
    """(min(exp(old - rollout), tis_cap), 1.0 where the cap bit)."""
    raw = tl.exp(old - roll)
    return tl.minimum(raw, tis_cap), tl.where(raw > tis_cap, 1.0, 0.0)


@triton.jit
def _grpo_loss_kernel(logp_ptr, old_ptr, ref_ptr, roll_ptr, adv_ptr, mask_ptr, row_w_ptr, seq_ptr, dlogp_ptr,
                      partial_ptr, T, clip_low, clip_high, beta, delta, tis_cap, HAS_OLD: tl.constexpr,
                      HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_TIS: tl.constexpr, SEQ: tl.constexpr,
                      WRITE_GRAD: tl.constexpr, NS: tl.constexpr, BLOCK_T: tl.constexpr):
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
    tis_w = logp
    if HAS_TIS:
        roll = tl.load(roll_ptr + offs, mask=real, other=0.0).to(tl.float32)
        tis_w, capped = tis_weight(old, roll, tis_cap)
    if SEQ:  # the row's (s_i, f_i), from seq_ratio
        ratio = tl.load(seq_ptr + 2 * i) + tl.zeros_like(logp)
        dratio = ratio * tl.load(seq_ptr + 2 * i + 1)
    else:
        ratio = tl.exp(logp - old)
        dratio = ratio
    adv = tl.load(adv_ptr + i).to(tl.float32)
    w = tl.load(row_w_ptr + i)
    loss, dloss, kl, lo, hi = grpo_token_terms(ratio, dratio, logp, ref, adv, tis_w, clip_low, clip_high, beta,
                                               delta, HAS_REF, HAS_DELTA, HAS_TIS, SEQ)
    if WRITE_GRAD:
        tl.store(dlogp_ptr + offs, tl.where(real, w * dloss, 0.0), mask=cols < T)
    out = partial_ptr + (i * tl.num_programs(1) + j) * NS
    tl.store(out + 0, tl.sum(tl.where(real, w * loss, 0.0), axis=0))
    tl.store(out + 1, tl.sum(tl.where(real, kl, 0.0), axis=0))
    tl.store(out + 2, tl.sum(tl.where(real, ratio, 0.0), axis=0))
    tl.store(out + 3, tl.sum(tl.where(real, lo, 0.0), axis=0))
    tl.store(out + 4, tl.sum(tl.where(real, hi, 0.0), axis=0))
    if HAS_TIS:
        tl.store(out + 5, tl.sum(tl.where(real, tis_w, 0.0), axis=0))
        tl.store(out + 6, tl.sum(tl.where(real, capped, 0.0), axis=0))


# ----------------------------------------------------------------------------- GSPO row pass


def seq_ratio(logp, old, roll, real, tis_cap: float | None) -> torch.Tensor:
    """GSPO's per-row (s_i, f_i) as fp32 [B, 2] (see the module docstring); [B, T] inputs, real = mask != 0.

    A plain torch reduction on the already computed log-probs, shared by both backends and by the
    fused linear loss: old=None gives s_i = 1 exactly (and the right gradient through f_i = 1)."""
    n = real.sum(-1, dtype=torch.float32).clamp(min=1.0)
    logp32 = torch.where(real, logp.float(), 0.0)
    old32 = logp32 if old is None else torch.where(real, old.float(), 0.0)
    s = torch.exp((logp32 - old32).sum(-1) / n)
    if roll is None:
        f = torch.ones_like(s)
    else:
        c = torch.exp(old32 - torch.where(real, roll.float(), 0.0))
        c = c if tis_cap is None else c.clamp(max=tis_cap)
        f = torch.where(real, c, 0.0).sum(-1) / n
    return torch.stack([s, f], dim=-1).contiguous()


# ----------------------------------------------------------------------------- launcher


def scalar_args(o: LossConfig) -> tuple[float, ...]:
    """The float arguments of the Triton kernels (unused ones as harmless placeholders)."""
    return (o.clip_low, o.clip_high, o.beta, o.delta if o.delta is not None else 0.0,
            o.tis_cap if o.tis_cap is not None else float("inf"))


def _grpo_triton(logp, old, ref, roll, adv, mask, row_w, o: LossConfig, write_grad):
    """All [B, T] inputs contiguous, mask float32, row_w fp32 [B] -> (dlogp [B, T] or None, partial sums [NS])."""
    b, t = logp.shape
    assert all(x is None or x.is_contiguous() for x in (logp, old, ref, roll, adv, mask, row_w))
    has_tis = roll is not None
    ns = 7 if has_tis else 5
    block, warps = token_config(t)
    grid = (b, triton.cdiv(t, block))
    partial = torch.empty(grid[0] * grid[1], ns, device=logp.device, dtype=torch.float32)
    dlogp = torch.empty(b, t, device=logp.device, dtype=torch.float32) if write_grad else None
    seq = seq_ratio(logp, old, roll, mask != 0, o.tis_cap) if o.sequence else None
    if b * t:
        _grpo_loss_kernel[grid](logp, old if old is not None else logp, ref if ref is not None else logp,
                                roll if has_tis else logp, adv, mask, row_w, seq if o.sequence else row_w,
                                dlogp if write_grad else logp, partial, t, *scalar_args(o),
                                HAS_OLD=old is not None and (has_tis or not o.sequence), HAS_REF=ref is not None,
                                HAS_DELTA=o.delta is not None, HAS_TIS=has_tis, SEQ=o.sequence,
                                WRITE_GRAD=write_grad, NS=ns, BLOCK_T=block, num_warps=warps)
    else:
        partial.zero_()
    return dlogp, partial.sum(0)


# ----------------------------------------------------------------------------- PyTorch path


def grpo_token_terms_torch(ratio, dratio, logp, ref, adv, tis_w, o: LossConfig):
    """Vectorized twin of `grpo_token_terms` (fp32 tensors, adv broadcastable to logp; tis_w None without TIS)."""
    unclipped = ratio if o.delta is None else ratio.clamp(max=o.delta)
    surr = torch.minimum(unclipped * adv, ratio.clamp(1.0 - o.clip_low, 1.0 + o.clip_high) * adv)
    clip_lo = (ratio < 1.0 - o.clip_low) & (adv < 0)
    clip_hi = (ratio > 1.0 + o.clip_high) & (adv > 0)
    frozen = clip_lo | clip_hi
    if o.delta is not None:
        frozen = frozen | ((ratio > o.delta) & (adv < 0))
    dloss = torch.where(frozen, 0.0, -dratio * adv)
    loss = -surr
    if tis_w is not None:
        loss = loss * tis_w
        if not o.sequence:
            dloss = dloss * tis_w
    if ref is not None:
        d = ref - logp
        e = torch.exp(d)
        kl = e - d - 1.0
        kl_loss, kl_d = o.beta * kl, o.beta * (1.0 - e)
        if tis_w is not None:
            kl_loss, kl_d = tis_w * kl_loss, tis_w * kl_d
        loss, dloss = loss + kl_loss, dloss + kl_d
    else:
        kl = torch.zeros_like(logp)
    return loss, dloss, kl, clip_lo.float(), clip_hi.float()


def tis_weight_torch(old, roll, tis_cap: float | None):
    raw = torch.exp(old - roll)
    if tis_cap is None:
        return raw, torch.zeros_like(raw)
    return raw.clamp(max=tis_cap), (raw > tis_cap).float()


def _grpo_torch(logp, old, ref, roll, adv, mask, row_w, o: LossConfig, write_grad):
    """Same contract as _grpo_triton."""
    real = mask != 0
    zero = lambda x: None if x is None else torch.where(real, x.float(), 0.0)  # noqa: E731 - garbage never used
    logp32 = zero(logp)
    old32 = logp32 if old is None else zero(old)
    tis_w = capped = None
    if roll is not None:
        tis_w, capped = tis_weight_torch(old32, zero(roll), o.tis_cap)
    if o.sequence:
        sf = seq_ratio(logp, old, roll, real, o.tis_cap)
        ratio = sf[:, :1].expand_as(logp32)
        dratio = ratio * sf[:, 1:]
    else:
        ratio = dratio = torch.exp(logp32 - old32)
    loss, dloss, kl, lo, hi = grpo_token_terms_torch(ratio, dratio, logp32, zero(ref), adv.float()[:, None], tis_w, o)
    w = torch.where(real, row_w[:, None], 0.0)
    per_token = (kl, ratio, lo, hi) + ((tis_w, capped) if roll is not None else ())
    sums = torch.stack([(w * loss).sum(), *(torch.where(real, x, 0.0).sum() for x in per_token)])
    return (w * dloss if write_grad else None), sums


def grpo_core(backend: str, *args):
    """(dL/dlogp [B, T] fp32 or None, sums [5 or 7]); args as in _grpo_triton. Also used by the fused GSPO path."""
    return (_grpo_triton if backend == "triton" else _grpo_torch)(*args)


# ----------------------------------------------------------------------------- shared argument handling


def check_grpo_args(op: str, main: dict[str, torch.Tensor], old_logprobs, ref_logprobs, advantages, mask, shape,
                    o: LossConfig, num_tokens=None, rollout_logprobs=None) -> None:
    """The per-call checks shared by grpo_loss and fused_linear_grpo_loss (LossConfig checked its own values)."""
    b, t = shape
    if ref_logprobs is None and o.beta != 0.0:
        raise ValueError(f"{op}: ref_logprobs is None but beta={o.beta} > 0; pass ref_logprobs (the reference "
                         "model's per-token log-probs, [B, T]) or set beta=0.0 to drop the KL term")
    if num_tokens is not None:
        if o.loss_type != "dapo":
            raise ValueError(f"{op}: num_tokens is only used by loss_type='dapo' (got loss_type={o.loss_type!r}); "
                             "drop num_tokens or set loss_type='dapo'")
        if isinstance(num_tokens, torch.Tensor):
            if num_tokens.dim() != 0 or num_tokens.dtype == torch.bool or num_tokens.is_complex():
                raise ValueError(f"{op}: num_tokens must be a positive int or a 0-dim real tensor, got a "
                                 f"{num_tokens.dtype} tensor of shape {list(num_tokens.shape)}")
        elif isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"{op}: num_tokens must be a positive int (the generation batch's completion-token "
                             f"count) or a 0-dim tensor, got {num_tokens!r}")
    if o.tis_cap is not None and rollout_logprobs is None:
        raise ValueError(f"{op}: tis_cap is set but rollout_logprobs is None; pass the sampler's per-token "
                         "log-probs as rollout_logprobs (or drop tis_cap)")
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("rollout_logprobs", rollout_logprobs)):
        if x is not None:
            check_float(op, name, x)
            check_shape(op, name, x, (b, t), " (completion tokens, like the mask)")
    check_float(op, "advantages", advantages)
    check_shape(op, "advantages", advantages, (b,), " (one advantage per completion)")
    if not isinstance(mask, torch.Tensor) or not (mask.dtype in FLOAT_DTYPES or mask.dtype in (torch.bool, torch.int64, torch.int32, torch.uint8)):
        raise TypeError(f"{op}: mask must be a bool, integer or float tensor, got {getattr(mask, 'dtype', type(mask))}")
    check_shape(op, "mask", mask, (b, t), " (1 for real completion tokens, 0 for padding)")
    check_same_device(op, **main, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                      rollout_logprobs=rollout_logprobs, advantages=advantages, mask=mask)


def loss_weights(mask: torch.Tensor, o: LossConfig, num_tokens=None):
    """(row weight [B] fp32 so that L = sum_t row_w[i] * m_t * l_t, real-token count clamped to >= 1)."""
    b, t = mask.shape
    n_i = (mask != 0).sum(-1, dtype=torch.float32)           # [B]
    count = n_i.sum().clamp(min=1.0)
    if o.loss_type == "grpo":
        row_w = 1.0 / (b * n_i.clamp(min=1.0))
    elif o.loss_type == "bnpo" or (o.loss_type == "dapo" and num_tokens is None):
        row_w = (1.0 / count).expand(b).contiguous()
    elif o.loss_type == "dapo":  # a tensor stays on the device (no host sync)
        total = torch.as_tensor(num_tokens, device=mask.device).to(torch.float32)
        row_w = (1.0 / total).expand(b).contiguous()
    else:  # dr_grpo
        row_w = torch.full((b,), 1.0 / (b * (o.max_completion_len or t)), device=mask.device)
    return row_w, count


def stats_dict(sums: torch.Tensor, count: torch.Tensor, names=STAT_NAMES) -> dict[str, torch.Tensor]:
    """sums = [loss, then one sum per name] -> dict of 0-dim tensors, the means over real tokens (no host sync)."""
    means = sums[1:] / count
    return {"loss": sums[0], **{name: means[k] for k, name in enumerate(names)}}


# ----------------------------------------------------------------------------- autograd


class GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, roll, adv, mask, row_w, o: LossConfig, write_grad, backend):
        dlogp, sums = grpo_core(backend, logp, old, ref, roll, adv, mask, row_w, o, write_grad)
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
        return ((dlogp * grad_loss).to(ctx.dtype),) + (None,) * 9


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, config: LossConfig | None = None,
              num_tokens: int | torch.Tensor | None = None, rollout_logprobs: torch.Tensor | None = None,
              backend: str = "auto", **options):
    """GRPO / DAPO / GSPO-style clipped surrogate loss with a k3 KL penalty, fused with its statistics.

    Args:
        logprobs: [B, T] per-token log-probs of the completions under the policy (differentiable).
        old_logprobs: [B, T] log-probs at sampling time, or None for ``logprobs.detach()`` (one
            update per rollout: ratio == 1).
        ref_logprobs: [B, T] log-probs under the reference model; None only with ``beta=0``.
        advantages: [B] one advantage per completion (e.g. group-normalised rewards).
        mask: [B, T] bool / int / float, nonzero for real completion tokens. Masked positions of
            the other inputs are never read into the math (they may hold anything).
        config: the loss's options, a `LossConfig` (loss_options.py: loss_type, clip_low, clip_high,
            beta, ratio_level, delta, tis_cap, max_completion_len; default LossConfig()).
        **options: LossConfig fields as keyword arguments (``beta=0.0``), replacing config's values.
            entropy_coef needs the logits: use fused_linear_grpo_loss.
        num_tokens: dapo only: the completion-token count of the whole generation batch (an int or
            a 0-dim tensor, > 0; a tensor is not checked, to avoid a host sync). Pass the same value
            to every micro-batch and sum their losses: that is the batch loss. None: mask.sum().
        rollout_logprobs: [B, T] the sampler's log-probs (e.g. from the inference engine); each
            token's loss is multiplied by the constant min(exp(old - rollout), tis_cap).
        backend: "auto" | "triton" | "torch".

    Returns:
        (loss, stats): loss a 0-dim float32 tensor; stats a dict of 0-dim float32 tensors
        ``loss, kl, ratio, clip_low_frac, clip_high_frac`` (means over real tokens; kl is 0
        without ref_logprobs; with GSPO the sequence ratio is counted once per token), plus
        ``tis_weight_mean, tis_capped_frac`` when rollout_logprobs is given, computed in the
        same pass, without a host sync. Inputs are made contiguous / float32 where needed
        (cheap [B, T] copies).
    """
    op = "grpo_loss"
    o = loss_config(op, config, options)
    if o.entropy_coef != 0.0:
        raise ValueError(f"{op}: entropy_coef={o.entropy_coef} needs the logits; use fused_linear_grpo_loss "
                         "(or entropy_coef=0.0)")
    check_float(op, "logprobs", logprobs)
    if logprobs.dim() != 2:
        raise ValueError(f"{op}: logprobs must be [B, T] (completions x tokens), got shape {list(logprobs.shape)}")
    check_grpo_args(op, {"logprobs": logprobs}, old_logprobs, ref_logprobs, advantages, mask, logprobs.shape, o,
                    num_tokens, rollout_logprobs)
    backend = pick_backend(op, backend, logprobs.device)
    row_w, count = loss_weights(mask, o, num_tokens)
    write_grad = torch.is_grad_enabled() and logprobs.requires_grad
    c = lambda x: None if x is None else x.contiguous()  # noqa: E731
    loss, sums = GRPOLossFunction.apply(c(logprobs), c(old_logprobs), c(ref_logprobs), c(rollout_logprobs),
                                        c(advantages), mask.to(torch.float32).contiguous(), row_w, o,
                                        write_grad, backend)
    names = STAT_NAMES + (TIS_STAT_NAMES if rollout_logprobs is not None else ())
    return loss, stats_dict(sums, count, names)
