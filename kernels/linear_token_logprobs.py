"""Per-token log-probs from hidden states and the lm_head, never materializing [N, V] logits.

Math: logits = hidden @ weight.T, then exactly `token_logprobs` (see token_logprobs.py):

    logp_n = z_{n, y_n} - lse_n,   z = logits / T

Algorithm: walk the N tokens in chunks of C rows. Per chunk:

    forward   logits_c = hidden_c @ weight.T          (matmul in the inputs' dtype; cuBLAS / MKL)
              logp_c, state_c = row kernel(logits_c)   (reads the chunk once; saves max, log-sum)
    backward  logits_c = hidden_c @ weight.T          (recomputed: 1 extra matmul, no [N, V] kept)
              dlogits_c = row kernel, in place         (g * (onehot - p) / T; reads + writes once)
              grad_hidden_c  = dlogits_c @ weight
              grad_weight   += dlogits_c.T @ hidden_c

So forward + backward costs 4 matmuls of 2*N*H*V flops (the naive path: 3, plus several full
fp32 [N, V] passes) and the peak extra memory is O(C x V) plus the [V, H] weight gradient.
The upstream gradient of each token is unknown until backward, so unlike the fused GRPO loss
this op cannot compute its gradients in the forward; it recomputes.

grad_weight accumulates in weight.dtype with addmm: each chunk's product is summed in fp32 inside
the GEMM and rounded once when added (for bf16 weights: one bf16 rounding per chunk).

The row kernel is the shared row routine of `_rows.py` (Triton on CUDA, its PyTorch twin on the
fp32 chunk on CPU). The chunk size comes from a memory budget: 512 MiB of logits on a GPU, 32 MiB
of fp32 logits on a CPU.
"""

from __future__ import annotations

import torch

from ._common import check_float, check_index, check_same_device, check_temperature, pick_backend
from ._rows import chunk_fwd, chunk_grad, grad_buffer

_CHUNK_BYTES = {"cuda": 512 << 20, "cpu": 32 << 20}


def pick_chunk_size(n: int, vocab: int, device: torch.device, dtype: torch.dtype, chunk_size: int | None) -> int:
    """Tokens per chunk: `chunk_size` if given, else what fits the device's logits budget."""
    if chunk_size is not None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        return max(1, min(chunk_size, n))
    # The GPU keeps the logits chunk in the matmul dtype; the CPU works on an fp32 copy of it.
    bytes_per_row = vocab * (dtype.itemsize if device.type == "cuda" else 4)
    rows = max(1, _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cuda"]) // bytes_per_row)
    # GEMM-friendly multiples (of 128 for big chunks, else of 16).
    rows = rows // 128 * 128 if rows >= 256 else (rows // 16 * 16 if rows >= 32 else rows)
    return max(1, min(rows, n))


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t: float, entropy: bool, chunk: int, backend: str):
        n = hidden.shape[0]
        logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
        state = torch.empty(n, 2, device=hidden.device, dtype=torch.float32)
        ent = torch.empty_like(logp) if entropy else None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            lp, st, en = chunk_fwd(backend, hidden[s:e] @ weight.T, targets[s:e], inv_t, entropy)[:3]
            logp[s:e], state[s:e] = lp, st
            if entropy:
                ent[s:e] = en
        ctx.save_for_backward(hidden, weight, targets, state, ent)
        ctx.inv_t, ctx.chunk, ctx.backend = inv_t, chunk, backend
        return (logp, ent) if entropy else logp

    @staticmethod
    def backward(ctx, g, g_ent=None):
        hidden, weight, targets, state, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = g.float().contiguous()
        g_ent = None if ent is None else g_ent.float().contiguous()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        n = hidden.shape[0]
        for s in range(0, n, ctx.chunk):
            e = min(s + ctx.chunk, n)
            h = hidden[s:e]
            buf = grad_buffer(ctx.backend, h @ weight.T, state[s:e], ctx.inv_t)
            dlogits = chunk_grad(ctx.backend, buf, targets[s:e], state[s:e], g[s:e],
                                 None if ent is None else g_ent[s:e], None if ent is None else ent[s:e], ctx.inv_t,
                                 weight.dtype)
            if need_h:
                torch.mm(dlogits, weight, out=grad_h[s:e])
            if need_w:
                grad_w.addmm_(dlogits.T, h)
        return grad_h, grad_w, None, None, None, None, None


def check_linear_args(op: str, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    check_float(op, "hidden", hidden)
    check_float(op, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be the lm_head weight [V, H], got shape {list(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: hidden size mismatch: hidden is {list(hidden.shape)} but weight is "
                         f"{list(weight.shape)} ([V, H]); the last dims must agree")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{op}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype; "
                        "cast one of them (e.g. under autocast, pass hidden.to(weight.dtype))")


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, chunk_size: int | None = None, return_entropy: bool = False,
                          *, backend: str = "auto"):
    """log_softmax(hidden @ weight.T / temperature)[target] per token, without the [N, V] logits.

    Args:
        hidden: [N, H] final hidden states (after the last norm), float32 / bfloat16 / float16;
            or [..., H] with targets [...] (e.g. [B, T, H] and [B, T]): results come back as [...].
        weight: [V, H] the lm_head weight, same dtype and device as hidden.
        targets: [N] int64 (or int32) token ids in [0, V).
        temperature: positive float (log-probs of softmax(logits / T)).
        chunk_size: tokens per chunk; default from a memory budget (512 MiB of logits on CUDA,
            32 MiB of fp32 logits on CPU). Peak extra memory is O(chunk_size x V).
        return_entropy: also return the per-token entropy (float32 [N]).
        backend: "auto" (Triton row kernels on CUDA, PyTorch on CPU), "triton" or "torch".

    Returns:
        float32 [N] (or [...]) log-probs (and entropies). Differentiable w.r.t. hidden and weight; the
        backward recomputes each chunk's logits (one extra matmul) instead of storing them.
        hidden is made contiguous if it is not (an [N, H] copy, small next to [N, V]).
    """
    op = "linear_token_logprobs"
    check_linear_args(op, hidden, weight)
    check_index(op, "targets", targets)
    if hidden.dim() < 2 or tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{op}: hidden [..., H] and targets [...] must agree on the leading dims, got hidden "
                         f"{list(hidden.shape)} and targets {list(targets.shape)}")
    lead = hidden.shape[:-1]
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    device = check_same_device(op, hidden=hidden, weight=weight, targets=targets)
    inv_t = 1.0 / check_temperature(op, temperature)
    backend = pick_backend(op, backend, device)
    chunk = pick_chunk_size(hidden.shape[0], weight.shape[0], device, weight.dtype, chunk_size)
    out = LinearTokenLogprobsFunction.apply(hidden.contiguous(), weight, targets.contiguous(), inv_t,
                                            bool(return_entropy), chunk, backend)
    return tuple(o.view(lead) for o in out) if return_entropy else out.view(lead)
