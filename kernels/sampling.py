"""Fused sampling: one pass over each row of logits returns the sampled token and its log-prob.

For a row of logits x [V], temperature T and a per-row random key:

    z = x / T                                  (T = 0: greedy, z = x)
    token   = argmax_i (z_i + g_i),  g_i = -log(-log u_i),  u_i ~ U(0, 1) from Philox(key, i)
    logprob = z[token] - logsumexp(z)

Gumbel-max is exact sampling from softmax(z) and needs no sort and no normalization first, so the
kernel reads the row once, block by block, keeping a running (max, sum) for logsumexp and a
running best (value, index) for the argmax. Greedy is the same loop without noise (first index on
ties, like torch.argmax). Because the noise depends only on (key, i), a row's sample does not
depend on the other rows of the batch.

Top-k / top-p need the k largest values or a sorted cumulative sum; that path is PyTorch
(torch.topk / torch.sort in paged_reference.top_k_top_p_mask), documented rather than fused.
The PyTorch path (CPU) samples by inverse CDF with one uniform per row instead of Gumbel noise:
also exact, but cheaper on a CPU (one uniform per row instead of V). The two backends therefore
draw different (equally distributed) samples for the same key: seeds reproduce on one device type.

On CPU the native op torch.ops.rlvr_fast.sample (csrc/cpu/sampling.cpp, when the extension is
built) implements the PyTorch path's method exactly -- same uniform per key, same two-level float64
search, top-k/top-p included -- so native and PyTorch draw the same tokens for the same keys (up to
float rounding at a CDF boundary, ~1e-7 of draws).

Backends: CUDA tensors and plain temperature/greedy -> Triton; CPU -> native if built, else
PyTorch; CUDA with top-k/top-p -> PyTorch.

The one statement of the math is the PyTorch path, `paged_reference.sample_ref`; the other two are
tested against it: the native op draws the same tokens for the same keys (tests/test_native_ops.py), the
Triton kernel draws from the same distribution (chi-square, tests/test_rollout_kernels.py) and the same
greedy tokens and log-probs (tests/test_kernels_cuda_configs.py). A new sampling option is written there
first; until a fast path implements it, `sample` routes calls that use it to that path.
"""

from __future__ import annotations

import torch

from .paged_reference import sample_ref

from ._common import HAS_TRITON, pick_backend, row_config, tl, triton


if HAS_TRITON:

    @triton.jit
    def _sample_kernel(logits_ptr, keys_ptr, tok_ptr, lp_ptr, stride_row, vocab, inv_temp,
                       GREEDY: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride_row
        key = tl.load(keys_ptr + row)
        offs0 = tl.arange(0, BLOCK_V)
        run_max = tl.full((), float("-inf"), tl.float32)
        run_sum = tl.full((), 0.0, tl.float32)
        best = tl.full((), float("-inf"), tl.float32)
        best_z = tl.full((), 0.0, tl.float32)
        best_i = tl.full((), 0, tl.int32)
        for start in range(0, vocab, BLOCK_V):
            offs = start + offs0
            mask = offs < vocab
            z = tl.load(base + offs, mask=mask, other=-float("inf")).to(tl.float32) * inv_temp
            # Online logsumexp of z.
            blk_max = tl.max(z, axis=0)
            new_max = tl.maximum(run_max, blk_max)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            run_max = new_max
            # Running argmax of z (+ Gumbel noise when sampling).
            if GREEDY:
                score = z
            else:
                u = tl.rand(key, offs)
                u = tl.maximum(u, 1e-20)  # u == 0 would give -inf noise: harmless, but keep logs finite
                score = z - tl.log(-tl.log(u))
            score = tl.where(mask, score, -float("inf"))
            blk_best = tl.max(score, axis=0)
            blk_i = tl.argmax(score, axis=0)
            blk_z = tl.sum(tl.where(offs0 == blk_i, z, 0.0), axis=0)
            take = blk_best > best  # strict: earlier blocks win ties
            best_i = tl.where(take, start + blk_i, best_i)
            best_z = tl.where(take, blk_z, best_z)
            best = tl.where(take, blk_best, best)
        tl.store(tok_ptr + row, best_i.to(tl.int64))
        tl.store(lp_ptr + row, best_z - run_max - tl.log(run_sum))


def _sample_triton(logits: torch.Tensor, keys: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, v = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    assert keys.shape == (b,) and keys.dtype == torch.int64
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    greedy = temperature == 0
    block, warps = row_config(v)
    _sample_kernel[(b,)](logits, keys, tokens, logprobs, logits.stride(0), v,
                         1.0 if greedy else 1.0 / temperature, GREEDY=greedy, BLOCK_V=block, num_warps=warps)
    return tokens, logprobs


def sample(logits: torch.Tensor, keys: torch.Tensor | None, temperature: float, top_k: int = 0, top_p: float = 1.0,
           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of logits [B, V] -> (tokens [B] int64, logprobs [B] float32).

    keys [B] int64 (>= 0): the per-row randomness; the same key and logits give the same token on
    the same device type. temperature 0 = greedy (keys may be None on CPU). logprobs are
    log_softmax(logits / T) at the token (T = 1 for greedy), over the full vocabulary even when
    top-k / top-p filtered the draw.
    backend: "auto" (CUDA: Triton when no top-k/top-p, else PyTorch; CPU: native if built, else
    PyTorch), "triton", "native" (torch.ops.rlvr_fast.sample), "torch".
    """
    if keys is None and temperature != 0:
        raise ValueError("sample: keys (one random int64 per row) are needed for temperature > 0; only greedy "
                         "(temperature 0) may pass keys=None")
    filtered = bool(top_k) or top_p < 1.0
    if filtered and backend == "triton":
        raise ValueError("the Triton sampler handles temperature/greedy only; use backend='torch' for top-k/top-p")
    if filtered and backend == "auto" and logits.device.type == "cuda":
        backend = "torch"  # the sort path
    op = "sample (top-k/top-p)" if filtered else "sample"
    picked = pick_backend(op, backend, logits.device, has_native=True)
    if picked == "triton":
        if keys is None:  # greedy reads no key, but the kernel takes a tensor
            keys = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
        return _sample_triton(logits, keys, temperature)
    if picked == "native":
        return torch.ops.rlvr_fast.sample(logits, keys, float(temperature), int(top_k), float(top_p))
    return sample_ref(logits, keys, temperature, top_k, top_p)
