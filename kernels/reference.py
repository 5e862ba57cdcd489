"""Plain PyTorch references for every kernel: the math, written to be read, not to be fast.

They materialize everything (the full [N, V] logits in float32 or float64) and lean on autograd
for gradients. The tests compare the kernels' values and gradients to these (in float64), and
the benches time them as the "naive" baseline. Inputs keep their dtype when it is float64;
anything narrower is computed in float32, like the kernels.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .loss_options import LossConfig, loss_config


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


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, o: LossConfig, num_tokens):
    """The loss_type's weighted token sum of per_token [B, T] (mask: 0/1 in per_token's dtype)."""
    b, t = mask.shape
    if o.loss_type == "grpo":    # mean over each completion, then over completions (empty rows count as 0)
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / b
    if o.loss_type == "bnpo":    # mean over all real tokens
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if o.loss_type == "dr_grpo":  # sum over tokens / (B * L), a constant normaliser
        return (per_token * mask).sum() / (b * (o.max_completion_len or t))
    # dapo: sum over tokens / the generation batch's token count (or this batch's)
    return (per_token * mask).sum() / (mask.sum().clamp(min=1) if num_tokens is None else num_tokens)


def grpo_loss_ref(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
                  advantages: torch.Tensor, mask: torch.Tensor, *, config: LossConfig | None = None, num_tokens=None,
                  rollout_logprobs: torch.Tensor | None = None, **options):
    """The GRPO loss over [B, T] completion tokens, and its statistics (see grpo_loss.py for the math).
    The options as grpo_loss takes them: a LossConfig and/or its fields as keyword arguments."""
    o = loss_config("grpo_loss_ref", config, options)
    if o.entropy_coef != 0.0:
        raise ValueError("grpo_loss_ref: entropy_coef needs the logits; use fused_linear_grpo_loss_ref")
    clip_low, clip_high, beta, delta, tis_cap = o.clip_low, o.clip_high, o.beta, o.delta, o.tis_cap
    real = mask != 0
    # Masked positions may hold anything (padding, -inf): zero them before any exp, so that
    # neither the value nor autograd (0 * inf) can turn into NaN.
    clean = lambda x: torch.where(real, _upcast(x), 0.0)  # noqa: E731
    logp = clean(logprobs)
    old = logp.detach() if old_logprobs is None else clean(old_logprobs)
    mask = real.to(logp.dtype)
    adv = _upcast(advantages).unsqueeze(-1)                        # [B, 1]
    if o.ratio_level == "token":
        ratio = torch.exp(logp - old)
    else:  # GSPO: one ratio per completion, the exp of its mean log-ratio
        seq_log_ratio = ((logp - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        ratio = torch.exp(seq_log_ratio).expand_as(logp)
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)  # dual clip
    surrogate = torch.minimum(unclipped * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    if ref_logprobs is not None:
        d = clean(ref_logprobs) - logp
        kl = torch.exp(d) - d - 1
    else:
        kl = torch.zeros_like(logp)
    per_token = -(surrogate - beta * kl)                            # [B, T]
    if rollout_logprobs is not None:  # truncated importance sampling: a constant weight per token
        tis = torch.exp(old - clean(rollout_logprobs)).detach()
        tis_w = tis if tis_cap is None else torch.clamp(tis, max=tis_cap)
        per_token = per_token * tis_w
    loss = _aggregate(per_token, mask, o, num_tokens)

    count = mask.sum().clamp(min=1)
    clip_lo = (ratio < 1 - clip_low) & (adv < 0)
    clip_hi = (ratio > 1 + clip_high) & (adv > 0)
    # The names of loss_options.STAT_NAMES and TIS_STAT_NAMES, written out to be read; the kernel
    # tests check that the kernels return exactly these keys.
    stats = {
        "loss": loss.detach(),
        "kl": (kl * mask).sum().detach() / count,
        "ratio": (ratio * mask).sum().detach() / count,
        "clip_low_frac": (clip_lo * mask).sum() / count,
        "clip_high_frac": (clip_hi * mask).sum() / count,
    }
    if rollout_logprobs is not None:
        stats["tis_weight_mean"] = (tis_w * mask).sum() / count
        stats["tis_capped_frac"] = ((tis > tis_cap) * mask).sum() / count if tis_cap is not None else 0 * count
    return loss, stats


def fused_linear_grpo_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               old_logprobs, ref_logprobs, advantages, mask, *, config: LossConfig | None = None,
                               temperature: float = 1.0, num_tokens=None, rollout_logprobs=None, **options):
    """grpo_loss_ref of linear_token_logprobs_ref; hidden is [B, T, H] (or [B*T, H]), targets [B, T].

    entropy_coef: subtract coef x the entropy of softmax(logits / T), aggregated over the tokens
    with the loss_type's weights (the same as the loss's, without the TIS weight)."""
    o = loss_config("fused_linear_grpo_loss_ref", config, options)
    b, t = targets.shape
    logp, ent = linear_token_logprobs_ref(hidden.reshape(b * t, -1), weight, targets.reshape(-1), temperature,
                                          return_entropy=True)
    loss, stats = grpo_loss_ref(logp.view(b, t), old_logprobs, ref_logprobs, advantages, mask, num_tokens=num_tokens,
                                rollout_logprobs=rollout_logprobs, config=replace(o, entropy_coef=0.0))
    if o.entropy_coef != 0.0:
        real = mask != 0
        ent = torch.where(real, ent.view(b, t), 0.0)
        m = real.to(ent.dtype)
        loss = loss - o.entropy_coef * _aggregate(ent, m, o, num_tokens)
        stats["loss"] = loss.detach()
        stats["entropy"] = (ent * m).sum().detach() / m.sum().clamp(min=1)
    return loss, stats


def flash_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, causal: bool = True, softmax_scale: float | None = None,
                        upcast: bool = True) -> torch.Tensor:
    """Attention over packed variable-length sequences, one sequence at a time, explicit masked softmax.

    q [Nq, Hq, D], k/v [Nk, Hkv, D]; query head h reads kv head h // (Hq / Hkv). Sequence b's
    queries q[cu_q[b]:cu_q[b+1]] (Lq) attend to k/v[cu_k[b]:cu_k[b+1]] (Lk); causal: query i sees
    keys j <= i + Lk - Lq (bottom-right diagonal). A query that sees no key gets 0. Returns
    [Nq, Hq, D] in float32 (float64 for float64 inputs); upcast=False computes in the inputs' own
    dtype instead (the "PyTorch in bf16" baseline of the tests' error rule). Gradients by autograd.
    """
    dt = _upcast(q).dtype if upcast else q.dtype
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for q0, q1, k0, k1 in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]):
        lq, lk = q1 - q0, k1 - k0
        if lk == 0:
            outs.append(q.new_zeros(lq, hq, d, dtype=dt))
            continue
        qb = q[q0:q1].to(dt)                                          # [Lq, Hq, D]
        kb = k[k0:k1].to(dt).repeat_interleave(hq // hkv, dim=1)      # [Lk, Hq, D]
        vb = v[k0:k1].to(dt).repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("ihd,jhd->hij", qb, kb) * scale          # [Hq, Lq, Lk]
        if causal:
            i = torch.arange(lq, device=q.device)[:, None]
            j = torch.arange(lk, device=q.device)[None, :]
            scores = scores.masked_fill(j > i + (lk - lq), float("-inf"))
        outs.append(torch.einsum("hij,jhd->ihd", torch.softmax(scores, dim=-1), vb))
    return torch.cat(outs)
