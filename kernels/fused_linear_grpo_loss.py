"""The GRPO loss straight from hidden states and the lm_head: one pass, gradients included.

Math: logp = linear_token_logprobs(hidden, weight, targets, T), then exactly `grpo_loss` (see
grpo_loss.py, including its variants): L = sum_t w_t * l_t(logp_t), with w_t from the mask and
loss_type; optionally minus an entropy bonus (below).

With a token-level ratio, l_t depends on token t's own logp only, so dL/dlogp_t = w_t * dl_t/dlogp
is known as soon as logp_t is. So the forward does everything, chunk by chunk over the N = B*T
tokens:

    logits_c        = hidden_c @ weight.T                      matmul 1
    row kernel      : the row routine's statistics pass (read), logp, the GRPO token terms,
                      then its gradient pass in place (read + write):
                      dlogits = w * dl/dlogp * (onehot - p) / T
    grad_hidden_c   = dlogits_c @ weight                       matmul 2
    grad_weight    += dlogits_c.T @ hidden_c                   matmul 3

and the backward only multiplies the stashed gradients by grad_output: 3 matmuls in all, no
recompute, peak extra memory O(C x V) plus the stashed grads.

Entropy bonus (`entropy_coef`): L -= coef * sum_t w_t H_t, H_t the entropy of softmax(logits_t / T),
with the same token weights w_t as the loss_type (grpo: per-completion mean, then mean over
completions; bnpo / dapo: token mean; dr_grpo: sum / (B L)), not multiplied by TIS weights. Equal
weights keep gradient accumulation over micro-batches exact, as for the loss itself. H_t comes from
the same statistics pass (online sum of p * (z - max), so no cancellation against a large max), and
its gradient joins the in-place pass:

    H = log s - sum_j e_j (z_j - m) / s,    dL/dz_j += coef * w_t * p_j * (log p_j + H)

GSPO (`ratio_level="sequence"`): token t's gradient needs its completion's ratio s_i, known only
once every logp of that row is. The GSPO path therefore works on whole completions: chunks hold
whole rows (chunk_size // T of them), and per chunk it runs the row routine's statistics kernel
(logp, max, log s, entropy per token), the grpo_loss kernels on those rows ([rows, T], GSPO's row
pass included), then its gradient kernel in place over the same logits and the two gradient
matmuls: still 3 matmuls, one extra launch and [C, 2] floats per chunk. When one completion does not fit in a
chunk (T > chunk_size; on the torch backend: more real tokens than chunk_size), that row's logits
are computed twice (4 matmuls for it: the "recompute" path), which is logged once on the
`rlvr_fast.kernels` logger, like the backend; pass chunk_size >= T to avoid it.

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

The row math (statistics, entropy, gradient; both backends) is the shared routine of `_rows.py`.

hidden: [B, T, H] (matching targets and mask [B, T]) or already flat [B*T, H] in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import check_index, check_temperature, log_path, pick_backend, row_config, tl, triton
from ._rows import chunk_fwd, chunk_grad, grad_buffer, row_grad, row_grad_torch, row_stats
from .grpo_loss import (check_grpo_args, grpo_core, grpo_token_terms, grpo_token_terms_torch, loss_weights, scalar_args,
                        stats_dict, tis_weight, tis_weight_torch)
from .linear_token_logprobs import check_linear_args, pick_chunk_size
from .loss_options import ENTROPY_STAT, STAT_NAMES, TIS_STAT_NAMES, LossConfig, loss_config

OP = "fused_linear_grpo_loss"

# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _fused_grpo_rows_kernel(x_ptr, stride_row, tgt_ptr, old_ptr, ref_ptr, roll_ptr, adv_ptr, w_ptr, stats_ptr, logp_ptr,
                            row0, T, V, inv_t, clip_low, clip_high, beta, delta, tis_cap, ent_coef,
                            HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr,
                            HAS_TIS: tl.constexpr, ENTROPY: tl.constexpr, WRITE_GRAD: tl.constexpr,
                            WRITE_LOGP: tl.constexpr, NS: tl.constexpr, BLOCK_V: tl.constexpr):
    # One program per token of the chunk; n is its index among all B*T tokens. Token-level ratio only.
    r = tl.program_id(0).to(tl.int64)
    n = row0 + r
    x_row = x_ptr + r * stride_row
    logp, m, log_s, ent = row_stats(x_row, tgt_ptr + n, V, inv_t, BLOCK_V, ENTROPY)
    if WRITE_LOGP:
        tl.store(logp_ptr + n, logp)

    # The GRPO terms of this token. Padding (w == 0) may hold garbage old/ref/rollout: never used.
    w = tl.load(w_ptr + n)
    real = w != 0.0
    old = logp
    if HAS_OLD:
        old = tl.where(real, tl.load(old_ptr + n), logp)
    ref = logp
    if HAS_REF:
        ref = tl.where(real, tl.load(ref_ptr + n), logp)
    tis_w = logp
    if HAS_TIS:
        tis_w, capped = tis_weight(old, tl.where(real, tl.load(roll_ptr + n), old), tis_cap)
    adv = tl.load(adv_ptr + n // T)
    ratio = tl.exp(logp - old)
    loss, dloss, kl, lo, hi = grpo_token_terms(ratio, ratio, logp, ref, adv, tis_w, clip_low, clip_high, beta,
                                               delta, HAS_REF, HAS_DELTA, HAS_TIS, False)
    tok_loss = w * loss
    if ENTROPY:
        tok_loss -= ent_coef * (w * ent)
    out = stats_ptr + r * NS
    tl.store(out + 0, tl.where(real, tok_loss, 0.0))
    tl.store(out + 1, tl.where(real, kl, 0.0))
    tl.store(out + 2, tl.where(real, ratio, 0.0))
    tl.store(out + 3, tl.where(real, lo, 0.0))
    tl.store(out + 4, tl.where(real, hi, 0.0))
    if HAS_TIS:
        tl.store(out + 5, tl.where(real, tis_w, 0.0))
        tl.store(out + 6, tl.where(real, capped, 0.0))
    if ENTROPY:
        tl.store(out + NS - 1, tl.where(real, ent, 0.0))

    # Pass 2: dL/dx = w * dl/dlogp * (onehot - p) / T (+ the entropy term), over the logits in place.
    if WRITE_GRAD:
        g = tl.where(real, w * dloss, 0.0)
        h = g  # placeholder without ENTROPY (never read)
        if ENTROPY:
            h = tl.where(real, -ent_coef * w, 0.0)
        row_grad(x_row, x_row, tl.load(tgt_ptr + n), m, log_s, ent, g, h, V, inv_t, BLOCK_V, ENTROPY)


# ----------------------------------------------------------------------------- per-call constants


@dataclass(slots=True)
class Tokens:
    """The per-token constants of one call, flat over the N = B*T tokens (fp32, contiguous)."""
    targets: torch.Tensor              # [N] int
    old: torch.Tensor | None           # [N]
    ref: torch.Tensor | None           # [N]
    roll: torch.Tensor | None          # [N] rollout log-probs (TIS)
    adv: torch.Tensor                  # [B]
    tok_w: torch.Tensor                # [N] weight of each token in L (0 at padding)
    row_w: torch.Tensor                # [B]
    mask: torch.Tensor                 # [B, T] float32
    T: int
    entropy: bool                      # compute each token's entropy (the bonus, or return_entropy)
    logp_out: torch.Tensor | None = None  # [N] fp32: filled with each token's logp (return_logprobs)

    def stat_width(self) -> int:
        return 5 + (2 if self.roll is not None else 0) + (1 if self.entropy else 0)


# ----------------------------------------------------------------------------- chunk helpers, both backends


def _chunk_triton(logits, row0, tk: Tokens, inv_t, o: LossConfig, write_grad):
    """Token-level path: logits [C, V] (fresh, overwritten by dL/dlogits when write_grad) -> stats [C, NS]."""
    c, v = logits.shape
    assert logits.stride(1) == 1
    ns, entropy = tk.stat_width(), tk.entropy
    stats = torch.empty(c, ns, device=logits.device, dtype=torch.float32)
    block, warps = row_config(v)
    dummy = tk.tok_w
    _fused_grpo_rows_kernel[(c,)](logits, logits.stride(0), tk.targets, tk.old if tk.old is not None else dummy,
                                  tk.ref if tk.ref is not None else dummy, tk.roll if tk.roll is not None else dummy,
                                  tk.adv, tk.tok_w, stats, tk.logp_out if tk.logp_out is not None else dummy, row0,
                                  tk.T, v, inv_t, *scalar_args(o), o.entropy_coef,
                                  HAS_OLD=tk.old is not None, HAS_REF=tk.ref is not None,
                                  HAS_DELTA=o.delta is not None, HAS_TIS=tk.roll is not None, ENTROPY=entropy,
                                  WRITE_GRAD=write_grad, WRITE_LOGP=tk.logp_out is not None, NS=ns, BLOCK_V=block,
                                  num_warps=warps)
    return stats


def _chunk_torch(logits, inv_t, targets, old, ref, roll, adv, tok_w, o: LossConfig, entropy: bool, write_grad):
    """Same as _chunk_triton on gathered per-token inputs (all real tokens); returns (stats [C, NS], dlogits, logp)."""
    logp, _, ent, logp_all = chunk_fwd("torch", logits, targets, inv_t, entropy)
    old = logp if old is None else old
    tis_w, capped = tis_weight_torch(old, roll, o.tis_cap) if roll is not None else (None, None)
    ratio = torch.exp(logp - old)
    loss, dloss, kl, lo, hi = grpo_token_terms_torch(ratio, ratio, logp, ref, adv, tis_w, o)
    tok_loss = tok_w * loss
    if entropy:
        tok_loss = tok_loss - o.entropy_coef * (tok_w * ent)
    cols = [tok_loss, kl, ratio, lo, hi] + ([tis_w, capped] if roll is not None else []) + ([ent] if entropy else [])
    stats = torch.stack(cols, dim=1)
    if not write_grad:
        return stats, None, logp
    h = -o.entropy_coef * tok_w if entropy else None
    return stats, row_grad_torch(logp_all, targets, tok_w * dloss, h, ent, inv_t).to(logits.dtype), logp


# ----------------------------------------------------------------------------- forward loops


def _token_level(hidden, weight, tk: Tokens, inv_t, o, grad_h, grad_w, chunk, backend):
    """The default (token-level ratio) loop: one row kernel per chunk -> summed stats [NS]."""
    n = hidden.shape[0]
    write_grad = grad_h is not None or grad_w is not None
    if backend == "triton":
        stats = torch.empty(n, tk.stat_width(), device=hidden.device, dtype=torch.float32)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = hidden[s:e]
            logits = h @ weight.T
            stats[s:e] = _chunk_triton(logits, s, tk, inv_t, o, write_grad)
            if grad_h is not None:
                torch.mm(logits, weight, out=grad_h[s:e])  # logits now hold dL/dlogits
            if grad_w is not None:
                grad_w.addmm_(logits.T, h)
        return stats.sum(0)
    real = (tk.tok_w != 0).nonzero().squeeze(1)  # drop padding before any matmul
    stats = torch.zeros(real.numel(), tk.stat_width(), device=hidden.device, dtype=torch.float32)
    adv_tok = tk.adv.repeat_interleave(tk.T)
    for s in range(0, real.numel(), chunk):
        idx = real[s:s + chunk]
        h = hidden.index_select(0, idx)
        pick = lambda x: None if x is None else x.index_select(0, idx)  # noqa: E731
        st, dlogits, logp = _chunk_torch(h @ weight.T, inv_t, pick(tk.targets), pick(tk.old), pick(tk.ref),
                                         pick(tk.roll), pick(adv_tok), pick(tk.tok_w), o, tk.entropy, write_grad)
        stats[s:s + idx.numel()] = st
        if tk.logp_out is not None:
            tk.logp_out.index_copy_(0, idx, logp)
        if grad_h is not None:
            grad_h.index_copy_(0, idx, dlogits @ weight)
        if grad_w is not None:
            grad_w.addmm_(dlogits.T, h)
    return stats.sum(0)


def _row_groups(counts: list[int], chunk: int) -> list[tuple[int, int]]:
    """Greedy [r0, r1) groups of consecutive rows whose token counts sum to <= chunk (a bigger row alone)."""
    groups, r0, total = [], 0, 0
    for r, c in enumerate(counts):
        if r > r0 and total + c > chunk:
            groups.append((r0, r))
            r0, total = r, 0
        total += c
    if counts:
        groups.append((r0, len(counts)))
    return groups


def _sequence_level(hidden, weight, tk: Tokens, inv_t, o, grad_h, grad_w, chunk, backend):
    """The GSPO loop (see the module docstring): whole completions per chunk -> summed stats [NS]."""
    b, t = tk.mask.shape
    write_grad = grad_h is not None or grad_w is not None
    entropy = tk.entropy
    if backend == "triton":  # all T positions of a row (no host sync)
        counts, tokens = [t] * b, None
    else:  # real tokens only (the torch path syncs anyway)
        tokens = (tk.tok_w != 0).nonzero().squeeze(1)
        counts = (tk.mask != 0).sum(-1).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    groups = _row_groups(counts, chunk)
    if any(offsets[r1] - offsets[r0] > chunk for r0, r1 in groups):
        log_path(OP, "GSPO recompute", f"a completion has more tokens than chunk_size={chunk}: its logits are "
                                       "computed twice (4 matmuls); pass chunk_size >= T to avoid it")
    else:
        log_path(OP, "GSPO whole-completion chunks", "3 matmuls, like the token-level ratio")
    sums = 0.0
    for r0, r1 in groups:
        a, z = offsets[r0], offsets[r1]
        idx = torch.arange(r0 * t, r1 * t, device=hidden.device) if tokens is None else tokens[a:z]
        spans = [(s, min(s + chunk, z - a)) for s in range(0, z - a, chunk)]
        keep = write_grad and len(spans) == 1  # else recompute the logits in pass 2
        logp = torch.zeros(r1 * t - r0 * t, device=hidden.device, dtype=torch.float32)
        ent = torch.zeros_like(logp) if entropy else None
        states = []
        for s, e in spans:
            h_c = hidden.index_select(0, idx[s:e]) if tokens is not None else hidden[r0 * t + s:r0 * t + e]
            lp, state, en, buf = chunk_fwd(backend, h_c @ weight.T, tk.targets[idx[s:e]], inv_t, entropy)
            pos = idx[s:e] - r0 * t
            logp[pos] = lp
            if entropy:
                ent[pos] = en
            states.append((state, en, buf if keep else None))
        rows = slice(r0, r1)
        tok = slice(r0 * t, r1 * t)
        if tk.logp_out is not None:
            tk.logp_out[tok] = logp
        view = lambda x: None if x is None else x[tok].view(r1 - r0, t)  # noqa: E731
        dlogp, s_g = grpo_core(backend, logp.view(r1 - r0, t), view(tk.old), view(tk.ref), view(tk.roll),
                               tk.adv[rows], tk.mask[rows], tk.row_w[rows], o, write_grad)
        if entropy:
            w = tk.tok_w[tok]
            ent_sum = torch.where(w != 0, ent, 0.0).sum()
            s_g = torch.cat([s_g[:1] - o.entropy_coef * (w * ent).sum(), s_g[1:], ent_sum[None]])
        sums = sums + s_g
        if not write_grad:
            continue
        for (s, e), (state, en, buf) in zip(spans, states):
            sel = idx[s:e]
            h_c = hidden.index_select(0, sel) if tokens is not None else hidden[r0 * t + s:r0 * t + e]
            if buf is None:  # recompute the logits; the row state from pass 1 still holds
                buf = grad_buffer(backend, h_c @ weight.T, state, inv_t)
            pos = sel - r0 * t
            g = dlogp.view(-1)[pos].contiguous()
            hh = (-o.entropy_coef * tk.tok_w[sel]).contiguous() if entropy else None
            dlogits = chunk_grad(backend, buf, tk.targets[sel], state, g, hh, en, inv_t, hidden.dtype)
            if grad_h is not None:
                if tokens is None:
                    torch.mm(dlogits, weight, out=grad_h[r0 * t + s:r0 * t + e])
                else:
                    grad_h.index_copy_(0, sel, dlogits @ weight)
            if grad_w is not None:
                grad_w.addmm_(dlogits.T, h_c)
    if not groups:  # B == 0
        return torch.zeros(tk.stat_width(), device=hidden.device)
    return sums


# ----------------------------------------------------------------------------- autograd


class FusedLinearGRPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tk: Tokens, inv_t: float, o: LossConfig, need_h: bool, need_w: bool, chunk: int,
                backend: str):
        # hidden [N, H]; the per-token constants in tk (token n belongs to completion n // T).
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        loop = _sequence_level if o.sequence else _token_level
        sums = loop(hidden, weight, tk, inv_t, o, grad_h, grad_w, chunk, backend)
        ctx.grads = (grad_h, grad_w)
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
        return (grad_h, grad_w) + (None,) * 7


def fused_linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
                           advantages: torch.Tensor, mask: torch.Tensor, *, config: LossConfig | None = None,
                           num_tokens: int | torch.Tensor | None = None, rollout_logprobs: torch.Tensor | None = None,
                           temperature: float = 1.0, chunk_size: int | None = None, return_logprobs: bool = False,
                           return_entropy: bool = False, backend: str = "auto", **options):
    """grpo_loss(linear_token_logprobs(hidden, weight, targets, temperature), ...) in one fused pass.

    Args:
        hidden: [B, T, H] hidden states predicting the completion tokens (or flat [B*T, H]).
        weight: [V, H] lm_head weight, same dtype/device as hidden.
        targets: [B, T] int64 completion token ids (any valid id at padding).
        old_logprobs, ref_logprobs, advantages, mask, config, **options, num_tokens, rollout_logprobs: as in
            `grpo_loss` (old/ref/rollout [B, T], advantages [B], mask [B, T]); the options also take
            entropy_coef: subtract coef x the entropy of softmax(logits / T), aggregated with the
            loss_type's token weights (see the module docstring), computed in the same pass.
        temperature: the sampling temperature; log-probs are those of softmax(logits / T).
        chunk_size: tokens per chunk (default: from a memory budget, see linear_token_logprobs).
            With ratio_level="sequence" the default is at least T (whole completions per chunk);
            a given chunk_size < T computes some logits twice (logged).
        return_logprobs: also return the per-token log-probs [B, T] (fp32, no grad, 0 at padding)
            that the loss used, e.g. to compare them with the sampler's; one store per token.
        return_entropy: report the mean token entropy (stats["entropy"]) without an entropy bonus,
            from the same pass; the loss and gradients are unchanged.
        backend: "auto" | "triton" | "torch".

    Returns:
        (loss, stats) like `grpo_loss`, or (loss, stats, logprobs) with return_logprobs; stats also has ``entropy`` (mean over real tokens) when
        entropy_coef != 0 or return_entropy, and stats["loss"] includes the entropy bonus. Gradients for hidden and
        weight are computed in the forward (see the module docstring for the memory trade-off) and
        skipped under no_grad.
    """
    o = loss_config(OP, config, options)
    check_linear_args(OP, hidden, weight)
    check_index(OP, "targets", targets)
    if targets.dim() != 2:
        raise ValueError(f"{OP}: targets must be [B, T] (completion token ids), got shape {list(targets.shape)}")
    b, t = targets.shape
    if tuple(hidden.shape[:-1]) not in ((b, t), (b * t,)):
        raise ValueError(f"{OP}: hidden must be [B, T, H] = [{b}, {t}, H] (or [B*T, H]) to match targets, "
                         f"got {list(hidden.shape)}")
    check_grpo_args(OP, {"hidden": hidden, "weight": weight, "targets": targets}, old_logprobs, ref_logprobs,
                    advantages, mask, (b, t), o, num_tokens, rollout_logprobs)
    inv_t = 1.0 / check_temperature(OP, temperature)
    device = hidden.device
    backend = pick_backend(OP, backend, device)

    row_w, count = loss_weights(mask, o, num_tokens)
    mask32 = mask.to(torch.float32).contiguous()
    tok_w = (row_w[:, None] * (mask32 != 0)).reshape(-1).contiguous()       # [N] weight of each token in L
    flat = lambda x: None if x is None else x.reshape(-1).float().contiguous()  # noqa: E731
    tk = Tokens(targets.reshape(-1).contiguous(), flat(old_logprobs), flat(ref_logprobs), flat(rollout_logprobs),
                advantages.float().contiguous(), tok_w, row_w.float().contiguous(), mask32, t,
                o.entropy_coef != 0.0 or return_entropy)
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    chunk = pick_chunk_size(b * t, weight.shape[0], device, weight.dtype, chunk_size)
    if o.sequence and chunk_size is None:
        chunk = max(chunk, t)  # whole completions per chunk: one row's logits past the budget at most
    if return_logprobs:
        tk.logp_out = torch.zeros(b * t, device=device, dtype=torch.float32)
    loss, sums = FusedLinearGRPOFunction.apply(hidden.reshape(b * t, -1).contiguous(), weight, tk, inv_t, o,
                                               need_h, need_w, chunk, backend)
    names = STAT_NAMES + (TIS_STAT_NAMES if rollout_logprobs is not None else ()) + \
        ((ENTROPY_STAT,) if tk.entropy else ())
    stats = stats_dict(sums, count, names)
    if not return_logprobs:
        return loss, stats
    return loss, stats, torch.where(mask32.view(-1) != 0, tk.logp_out, 0.0).view(b, t)
