"""linear_token_logprobs vs the naive expression, torch.compile of it, and the bare matmuls.

    python bench/bench_linear_logprobs.py                 # CPU: N=4096 H=576 V=49152 fp32 (the trainer's model)
    python bench/bench_linear_logprobs.py                 # CUDA: N=16384 H=4096 V=128256 bf16

forward = under torch.no_grad() (how the trainer computes reference / old log-probs);
forward+backward = grads for hidden and weight from sum(logp).backward().
"matmuls" times only the GEMMs any method needs: 1 in forward (h @ W.T), 3 in forward+backward.
Liger-Kernel has no per-token log-prob op on hidden states, so it has no row here (see
bench_grpo_loss.py for its fused GRPO loss).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (bench_parser, default_device, fwd_bwd_table, lm_head_matmuls, main_or_child,  # noqa: E402
                      publish, ratio, run_all)

VARIANTS = ["naive", "compiled", "ours", "matmuls"]
MODES = ["fwd", "fwdbwd"]


def parse():
    cuda = torch.cuda.is_available()
    p = bench_parser(__doc__, VARIANTS)
    p.add_argument("--n", type=int, default=16384 if cuda else 4096)
    p.add_argument("--h", type=int, default=4096 if cuda else 576)
    p.add_argument("--v", type=int, default=128256 if cuda else 49152)
    return p.parse_known_args()[0]


def make(variant: str, mode: str, device: str):
    from rlvr_fast.kernels import linear_token_logprobs
    from rlvr_fast.kernels.reference import linear_token_logprobs_ref

    a = parse()
    dtype = getattr(torch, a.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(a.n, a.h, device=device, generator=g).to(dtype)
    w = (torch.randn(a.v, a.h, device=device, generator=g) * a.h ** -0.5).to(dtype)
    y = torch.randint(0, a.v, (a.n,), device=device, generator=g)
    fwd_only = mode == "fwd"
    h.requires_grad_(not fwd_only)
    w.requires_grad_(not fwd_only)
    if variant == "matmuls":
        return lm_head_matmuls(h, w, backward=not fwd_only), {}
    op = {"naive": linear_token_logprobs_ref, "ours": linear_token_logprobs,
          "compiled": torch.compile(linear_token_logprobs_ref)}[variant]

    def run():
        if fwd_only:
            with torch.no_grad():
                return op(h, w, y)
        return torch.autograd.grad(op(h, w, y).sum(), [h, w])  # the grads count in the peak
    return run, {}


def main():
    a = parse()
    device = default_device()
    variants = a.variants.split(",")
    print(f"bench_linear_logprobs on {device}: N={a.n} H={a.h} V={a.v} {a.dtype}", file=sys.stderr)
    res = run_all(os.path.abspath(__file__), variants, MODES, device, a.reps, sys.argv[1:])
    table = fwd_bwd_table(res, variants, ["fwd+bwd time / 3 matmuls"],
                          lambda v: [ratio(res.of(v, "fwdbwd", "time"), res.of("matmuls", "fwdbwd", "time"))])
    body = (f"linear_token_logprobs, N={a.n} H={a.h} V={a.v} {a.dtype} on {device}. naive = "
            f"log_softmax((h @ W.T).float() / T).gather (kernels/reference.py); compiled = torch.compile of it; "
            f"matmuls = the GEMMs alone (1 fwd, 3 fwd+bwd); fwd runs under no_grad.\n\n{table}")
    publish("linear_token_logprobs", body, device, not a.no_write)


if __name__ == "__main__":
    main_or_child(main, make)
