"""Plain PyTorch references for model/attention.py, for tests and benchmarks only.

They materialise masks of size [L, L] and are quadratic in memory: never use them in training.

* `shared_prompt_mask(batch)`: [N, N] bool over the packed tokens of a shared-prompt batch, True where
  a query may attend a key; `masked_attention(q, k, v, mask)` applies it densely (any dtype, float64
  for ground truth).
* `tree_mask_attention(q, k, v, batch)`: the shared-prompt attention as the project first computed it:
  each prompt and its completions as one segment [prompt, c1, c2, ...], padded, one SDPA call with a
  [segments, 1, L, L] "tree" mask (causal, never across two completions). Kept as the benchmark's
  baseline: quadratic in the whole group's length, and a masked SDPA leaves the fused causal kernels.
* `varlen_attention_reference(...)`: flash-attn's varlen interface (causal aligned bottom-right when a
  sequence has fewer queries than keys), one dense softmax per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlvr_fast.model.attention import PackedBatch


def _segments(batch: PackedBatch) -> list[tuple[list[int], torch.Tensor]]:
    """Per prompt: its tokens then its completions' tokens (packed rows, in order), and the branch of each
    row (0 = prompt, j = its j-th completion)."""
    sp = batch.shared
    out, start = [], sp.num_prompt_tokens
    for m, comps in enumerate(sp.completion_lens):
        rows = list(range(sp.prompt_bounds[m], sp.prompt_bounds[m + 1]))
        branch = [0] * len(rows)
        for j, c in enumerate(comps, start=1):
            rows += range(start, start + c)
            branch += [j] * c
            start += c
        out.append((rows, torch.tensor(branch)))
    return out


def shared_prompt_mask(batch: PackedBatch) -> torch.Tensor:
    """[N, N] bool: query i may attend key j (causal within each prompt, each completion over its prompt and
    itself). For a plain batch: causal within each sequence."""
    n = batch.positions.numel()
    mask = torch.zeros(n, n, dtype=torch.bool)
    bounds = batch.cu_seqlens.tolist()
    for a, b in zip(bounds, bounds[1:]):
        mask[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    if batch.shared is not None:
        sp = batch.shared
        for m in range(sp.num_prompts):
            qa, qb = sp.num_prompt_tokens + sp.block_bounds[m], sp.num_prompt_tokens + sp.block_bounds[m + 1]
            mask[qa:qb, sp.prompt_bounds[m]:sp.prompt_bounds[m + 1]] = True
    return mask


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """q [N, Hq, D], k/v [M, Hkv, D], mask [N, M] bool -> [N, Hq, D]; dense softmax in q's dtype."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("nhd,mhd->hnm", q, k) * scale
    probs = torch.softmax(scores.masked_fill(~mask.to(q.device), float("-inf")), dim=-1)
    return torch.einsum("hnm,mhd->nhd", probs, v)


def tree_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """The shared-prompt attention through per-segment [L, L] tree masks and SDPA (module doc)."""
    segments = _segments(batch)
    s, length, d = len(segments), max(len(rows) for rows, _ in segments), q.shape[-1]
    index = torch.full((s, length), -1, dtype=torch.long)
    branch = torch.full((s, length), -1, dtype=torch.long)
    for i, (rows, br) in enumerate(segments):
        index[i, :len(rows)], branch[i, :len(rows)] = torch.tensor(rows), br
    valid = index >= 0
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    # [S, 1, L, L]: causal, and a key is the prompt's or the query's own branch (padding keys unseen).
    mask = causal & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])) & valid[:, None, :]
    mask = (mask | torch.eye(length, dtype=torch.bool))[:, None].to(q.device)  # padding queries see themselves
    seg_ids, slots = valid.nonzero(as_tuple=True)
    rows = index[valid].to(q.device)

    def pad(x: torch.Tensor) -> torch.Tensor:  # [N, H, D] -> [S, H, L, D]
        out = x.new_zeros(s, length, x.shape[1], d)
        out[seg_ids, slots] = x[rows]
        return out.transpose(1, 2)
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask,
                                         enable_gqa=q.shape[1] != k.shape[1])
    result = torch.empty_like(q)
    result[rows] = out.transpose(1, 2)[seg_ids, slots]
    return result


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                               causal: bool = True, softmax_scale: float | None = None) -> torch.Tensor:
    """flash_attn_varlen_func's math: sequence b's queries attend its keys; causal aligned bottom-right."""
    out = []
    for (qa, qb), (ka, kb) in zip(zip(cu_seqlens_q.tolist(), cu_seqlens_q.tolist()[1:]),
                                  zip(cu_seqlens_k.tolist(), cu_seqlens_k.tolist()[1:])):
        lq, lk = qb - qa, kb - ka
        mask = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            mask = mask.tril(lk - lq)
        out.append(masked_attention(q[qa:qb], k[ka:kb], v[ka:kb], mask, softmax_scale))
    return torch.cat(out)
