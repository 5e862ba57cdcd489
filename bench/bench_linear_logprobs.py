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

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import append_results, fmt_mib, fmt_ms, markdown_table, ratio, run_all  # noqa: E402

VARIANTS = ["naive", "compiled", "ours", "matmuls"]
MODES = ["fwd", "fwdbwd"]


def parse():
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384 if cuda else 4096)
    p.add_argument("--h", type=int, default=4096 if cuda else 576)
    p.add_argument("--v", type=int, default=128256 if cuda else 49152)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--reps", type=int, default=10 if cuda else 3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--no-write", action="store_true", help="print the table without appending to RESULTS.md")
    args, _ = p.parse_known_args()
    return args


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
        logits = h.detach() @ w.detach().T
        hd, wd = h.detach(), w.detach()
        if fwd_only:
            return (lambda: hd @ wd.T), {}
        return (lambda: (hd @ wd.T, logits @ wd, logits.T @ hd)), {}  # memory: includes the [N, V] operand
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = a.variants.split(",")
    print(f"bench_linear_logprobs on {device}: N={a.n} H={a.h} V={a.v} {a.dtype}", file=sys.stderr)
    res = run_all(os.path.abspath(__file__), variants, MODES, device, a.reps, sys.argv[1:])
    get = lambda v, m, k: res.get((v, m), {}).get(k)  # noqa: E731
    rows = []
    for v in variants:
        skip = res[v, "fwd"].get("skip")
        if skip:
            rows.append([v, skip] + ["-"] * 7)
            continue
        rows.append([v, fmt_ms(get(v, "fwd", "time")), fmt_mib(get(v, "fwd", "mem")),
                     fmt_ms(get(v, "fwdbwd", "time")), fmt_mib(get(v, "fwdbwd", "mem")),
                     ratio(get(v, "fwd", "time"), get("naive", "fwd", "time")),
                     ratio(get(v, "fwdbwd", "time"), get("naive", "fwdbwd", "time")),
                     ratio(get(v, "fwdbwd", "mem"), get("naive", "fwdbwd", "mem"), 3),
                     ratio(get(v, "fwdbwd", "time"), get("matmuls", "fwdbwd", "time"))])
    header = ["variant", "fwd ms", "fwd peak extra MiB", "fwd+bwd ms", "fwd+bwd peak extra MiB",
              "fwd time / naive", "fwd+bwd time / naive", "fwd+bwd memory / naive", "fwd+bwd time / 3 matmuls"]
    table = markdown_table(header, rows)
    body = (f"linear_token_logprobs, N={a.n} H={a.h} V={a.v} {a.dtype} on {device}. naive = "
            f"log_softmax((h @ W.T).float() / T).gather (kernels/reference.py); compiled = torch.compile of it; "
            f"matmuls = the GEMMs alone (1 fwd, 3 fwd+bwd); fwd runs under no_grad.\n\n{table}")
    print(body)
    if not a.no_write:
        append_results("linear_token_logprobs", body, device)


if __name__ == "__main__":
    if "--child" in sys.argv:
        from benchlib import child
        child(make)
    else:
        main()
