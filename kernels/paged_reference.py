"""PyTorch references for the rollout kernels: paged KV writes, paged decode attention, sampling.

They are the ground truth the Triton kernels are tested against, and also the CPU path of the
rollout engine, so they are written to be fast on a CPU as well as obviously correct: whole
batches in a few tensor ops, no Python loop over sequences or blocks.

Paged KV cache layout (one layer): `k_cache`, `v_cache` [num_blocks, block_size, kv_heads, head_dim].
A token's *slot* is `block * block_size + offset`; a sequence's *block table* lists its blocks in
order, so its token at position p lives in slot `table[p // block_size] * block_size + p % block_size`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Store new keys/values k, v [N, kv_heads, D] at flat slots slot_mapping [N] (int64, all >= 0).

    Memory traffic: reads and writes N * kv_heads * D elements per tensor; one scatter each.
    """
    # [num_blocks, block_size, Hkv, D] -> [num_slots, Hkv, D]: a view, so the scatter lands in the cache.
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, scale: float | None = None,
                        max_context_len: int | None = None) -> torch.Tensor:
    """Decode attention: one query token per sequence against its cached context.

    q [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int
    (entries past a sequence's last block may hold any valid block id); context_lens [B], each >= 1,
    counting the cached tokens the query attends to (its own included). Returns [B, Hq, D]:

        out[b, h] = softmax_j(q[b, h] . K_b[j] * scale) @ V_b,   j < context_lens[b],

    with query head h reading kv head h // (Hq // Hkv) (grouped-query attention).

    How (CPU-friendly): gather every sequence's blocks with one index_select into a padded
    [B, S, Hkv, D] (S = the longest context rounded up to whole blocks), then per kv head two
    batched matmuls with the G = Hq / Hkv query heads of that kv head as rows. The per-head K/V
    slices are strided views that BLAS reads directly: K/V are never repeated per query head or
    transposed in memory. Padding columns get -inf. Traffic ~ 2 * B * S * Hkv * D elements.
    (Measured on a 2-core CPU: faster than one bmm over transposed copies, and than attending to a
    GRPO group's shared prompt blocks once per group and merging -- small-op overhead dominates.)
    """
    b, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    groups = hq // hkv
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    nblk = math.ceil(max_context_len / block_size)
    s = nblk * block_size
    table = block_tables[:, :nblk].reshape(-1).long()
    k = k_cache.index_select(0, table).view(b, s, hkv, d)  # [B, S, Hkv, D]
    v = v_cache.index_select(0, table).view(b, s, hkv, d)
    qg = (q.view(b, hkv, groups, d) * (scale if scale is not None else d ** -0.5)).to(k.dtype)
    pad = torch.arange(s, device=q.device)[None, :] >= context_lens.to(q.device)[:, None].long()  # [B, S]
    out = q.new_empty(b, hkv, groups, d)
    for h in range(hkv):
        scores = torch.bmm(qg[:, h], k[:, :, h].transpose(1, 2)).float()  # [B, G, S]
        scores.masked_fill_(pad[:, None, :], float("-inf"))
        out[:, h] = torch.bmm(torch.softmax(scores, dim=-1).to(v.dtype), v[:, :, h])  # [B, G, D]
    return out.view(b, hq, d)


def paged_attention_naive(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          context_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The same as paged_attention_ref, one sequence and one head at a time in fp32 (for tests only)."""
    b, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    scale = scale if scale is not None else d ** -0.5
    out = torch.empty(b, hq, d, dtype=torch.float32)
    for i in range(b):
        n = int(context_lens[i])
        slots = [int(block_tables[i, p // block_size]) * block_size + p % block_size for p in range(n)]
        k = k_cache.reshape(-1, hkv, d)[slots].float()
        v = v_cache.reshape(-1, hkv, d)[slots].float()
        for h in range(hq):
            kv = h // (hq // hkv)
            w = torch.softmax(k[:, kv] @ q[i, h].float() * scale, dim=0)
            out[i, h] = w @ v[:, kv]
    return out


# ----------------------------------------------------------------------------------------------
# Sampling

def uniform_from_keys(keys: torch.Tensor) -> torch.Tensor:
    """Map random keys [B] (int64, >= 0, low bits well mixed) to uniforms in the open interval (0, 1), float64."""
    return ((keys & ((1 << 52) - 1)).double() + 0.5) * (2.0 ** -52)


def top_k_top_p_mask(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """z [B, V] scaled logits -> a copy with the tokens outside top-k / top-p (nucleus) set to -inf.

    top_k = 0 and top_p = 1 switch the filters off. Top-p keeps the smallest set of most likely
    tokens whose probability reaches top_p (always at least one). Ties at the k-th value are all kept.
    Uses torch.topk / torch.sort: exact, and cheap next to the model on these vocab sizes. The sort
    is stable, so among equal logits the lower token id comes first: with ties at the nucleus
    boundary (common with bf16 logits) the kept set is then well defined, the same on every run,
    and the same as the native kernel's (csrc/cpu/sampling.cpp).
    """
    z = z.clone()
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z.masked_fill_(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        z.masked_fill_(drop, float("-inf"))
    return z


def sample_ref(logits: torch.Tensor, keys: torch.Tensor | None, temperature: float, top_k: int = 0,
               top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits [B, V]; returns (tokens [B] int64, logprobs [B] float32).

    logprobs[b] = log_softmax(logits[b] / T)[token] -- the full (unfiltered) tempered distribution,
    which is what a GRPO trainer recomputes; T = 0 means greedy (argmax, first index on ties) with
    log_softmax(logits), and keys may be None. Randomness comes only from keys [B] (one random int
    per row), so a row's sample depends on its key and its logits, never on the rest of the batch.

    Method: inverse CDF with one uniform u per row: token = first i with cumsum(e)[i] > u * sum(e),
    e = exp(z - max z) with the top-k/top-p tokens outside the filter zeroed. Exact, and no sort for
    plain temperature sampling. The search is two-level so that no full-width cumulative sum is
    needed: float64 sums of 256-token chunks, a search over their running sum, then a float64
    cumulative sum inside the one chunk that holds the token.
    """
    z = logits.float()
    if temperature == 0:
        tokens = torch.argmax(z, dim=-1)
        lse = torch.logsumexp(z, dim=-1)
    else:
        z = z * (1.0 / temperature)
        filtered = bool(top_k) or top_p < 1.0
        masked = top_k_top_p_mask(z, top_k, top_p) if filtered else z
        peak = masked.amax(dim=-1, keepdim=True)
        e = (masked - peak).exp_()
        tokens, total = _inverse_cdf(e, uniform_from_keys(keys.to(z.device)))
        lse = torch.logsumexp(z, dim=-1) if filtered else peak.squeeze(1) + total.log().float()
    chosen = z.gather(1, tokens[:, None]).squeeze(1)
    return tokens, chosen - lse


def _inverse_cdf(e: torch.Tensor, u: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of non-negative weights e [B, V] and uniforms u [B] -> (first i with cumsum(e)[i] > u * sum(e),
    sum(e) in float64). Never returns an index of zero weight."""
    b, vocab = e.shape
    nchunks = -(-vocab // chunk)
    if nchunks * chunk != vocab:
        e = F.pad(e, (0, nchunks * chunk - vocab))
    chunks = e.view(b, nchunks, chunk)
    # fp32 chunk sums (256 terms: error ~1e-7 of the chunk), float64 from there on.
    running = chunks.sum(-1).double().cumsum_(-1)  # [B, nchunks]
    total = running[:, -1]
    # Strictly below the total, so the chunk found (and then the token) has positive weight.
    target = torch.minimum(u * total, total * (1 - 2.0 ** -40))
    ci = torch.searchsorted(running, target[:, None], right=True).squeeze(1).clamp_(max=nchunks - 1)
    before = torch.where(ci > 0, running.gather(1, (ci - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    inside = chunks[torch.arange(b, device=e.device), ci].cumsum(-1, dtype=torch.float64)  # [B, chunk]
    rest = torch.minimum(target - before, inside[:, -1] * (1 - 2.0 ** -40))
    ti = torch.searchsorted(inside, rest[:, None], right=True).squeeze(1).clamp_(max=chunk - 1)
    return ci * chunk + ti, total


def log_softmax_at(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T)[token] per row (T = 0 -> T = 1), for tests."""
    z = logits.float() / (temperature if temperature > 0 else 1.0)
    return F.log_softmax(z, dim=-1).gather(1, tokens[:, None].long()).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Decoder-layer ops (native kernels in csrc/cpu/decode_layer.cpp; no Triton counterpart)

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * to_dtype(x_f32 * rsqrt(mean(x_f32^2) + eps)): rlvr_fast.model.llama.RMSNorm, op for op."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotary_embedding_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [N, Hq, D] and k [N, Hkv, D] with cos, sin [N, D] (HF's non-interleaved halves):
    x * cos + cat(-x2, x1) * sin in x's dtype -- rlvr_fast.model.llama.apply_rotary on each, op for op."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]

    return rotate(q), rotate(k)
