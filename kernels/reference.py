"""Plain PyTorch references for every kernel: the math, written to be read, not to be fast.

They materialize everything (the full [N, V] logits in float32 or float64) and lean on autograd
for gradients. The tests compare the kernels' values and gradients to these (in float64), and
the benches time them as the "naive" baseline. Inputs keep their dtype when it is float64;
anything narrower is computed in float32, like the kernels.
"""

from __future__ import annotations

import torch


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def token_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                       return_entropy: bool = False):
    """log_softmax(logits / T)[target] per position; optionally the entropy of softmax(logits / T)."""
    logp_all = torch.log_softmax(_upcast(logits) / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def linear_token_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              temperature: float = 1.0, return_entropy: bool = False):
    """token_logprobs_ref of the logits hidden @ weight.T (computed in the inputs' dtype)."""
    return token_logprobs_ref(hidden @ weight.T, targets, temperature, return_entropy)


def grpo_loss_ref(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
                  advantages: torch.Tensor, mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                  beta: float = 0.04, loss_type: str = "grpo", max_completion_len: int | None = None):
    """The GRPO loss over [B, T] completion tokens, and its statistics (see grpo_loss.py for the math)."""
    real = mask != 0
    # Masked positions may hold anything (padding, -inf): zero them before any exp, so that
    # neither the value nor autograd (0 * inf) can turn into NaN.
    clean = lambda x: torch.where(real, _upcast(x), 0.0)  # noqa: E731
    logp = clean(logprobs)
    old = logp.detach() if old_logprobs is None else clean(old_logprobs)
    mask = real.to(logp.dtype)
    adv = _upcast(advantages).unsqueeze(-1)                        # [B, 1]
    ratio = torch.exp(logp - old)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    if ref_logprobs is not None:
        d = clean(ref_logprobs) - logp
        kl = torch.exp(d) - d - 1
    else:
        kl = torch.zeros_like(logp)
    per_token = -(surrogate - beta * kl)                            # [B, T]

    b, t = logp.shape
    if loss_type == "grpo":    # mean over each completion, then over completions (empty rows count as 0)
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / b
    elif loss_type == "bnpo":  # mean over all real tokens
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":  # sum over tokens / (B * L), a constant normaliser
        loss = (per_token * mask).sum() / (b * (max_completion_len or t))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    count = mask.sum().clamp(min=1)
    clip_lo = (ratio < 1 - clip_low) & (adv < 0)
    clip_hi = (ratio > 1 + clip_high) & (adv > 0)
    stats = {
        "loss": loss.detach(),
        "kl": (kl * mask).sum().detach() / count,
        "ratio": (ratio * mask).sum().detach() / count,
        "clip_low_frac": (clip_lo * mask).sum() / count,
        "clip_high_frac": (clip_hi * mask).sum() / count,
    }
    return loss, stats


def fused_linear_grpo_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               old_logprobs, ref_logprobs, advantages, mask, *, temperature: float = 1.0, **kw):
    """grpo_loss_ref of linear_token_logprobs_ref; hidden is [B, T, H] (or [B*T, H]), targets [B, T]."""
    b, t = targets.shape
    logp = linear_token_logprobs_ref(hidden.reshape(b * t, -1), weight, targets.reshape(-1), temperature)
    return grpo_loss_ref(logp.view(b, t), old_logprobs, ref_logprobs, advantages, mask, **kw)
