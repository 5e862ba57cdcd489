"""grpo_loss (on [B, T] log-probs) and fused_linear_grpo_loss (on hidden states) vs the naive
PyTorch expressions, torch.compile of them, Liger-Kernel's fused GRPO loss, and the bare matmuls.

    python bench/bench_grpo_loss.py                   # both tables
    python bench/bench_grpo_loss.py --ops fused       # one of them
    python bench/bench_grpo_loss.py --variant gspo    # a loss variant (dapo, gspo, dual, tis, entropy, all)
    python bench/bench_grpo_loss.py --b 2 --t 8 --h 16 --v 64 --reps 1 --impls naive,ours --no-write  # smoke run

Shapes: grpo_loss on B x T = 1024 x 1024 (1M tokens); fused on CPU B=8 T=256 H=576 V=49152
fp32 (the trainer's model), on CUDA B=64 T=256 H=4096 V=128256 bf16. beta=0.04 with a
reference, old log-probs given, loss_type grpo, ~10% padding. forward under no_grad.
--variant adds one loss variant's options to naive, compiled and ours (liger is timed for the
default only): dapo (num_tokens = the batch's tokens), gspo (ratio_level="sequence"), dual
(delta=1.5), tis (rollout log-probs, tis_cap=2), entropy (fused only: entropy_coef=0.01), all.
On CUDA grpo_loss also reports GB/s: minimal traffic is 16 B/token read in forward (logp, old,
ref, mask) and 16 B/token more with the backward (write + read dL/dlogp, write the gradient).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (bench_parser, default_device, fwd_bwd_table, lm_head_matmuls, main_or_child,  # noqa: E402
                      publish, ratio, run_all)

VARIANTS = {"grpo": ["naive", "compiled", "ours"], "fused": ["naive", "compiled", "liger", "ours", "matmuls"]}
MODES = ["fwd", "fwdbwd"]
LOSS_VARIANTS = ("grpo", "dapo", "gspo", "dual", "tis", "entropy", "all")


def variant_kwargs(variant: str, op: str, old, mask) -> dict:
    """The loss options of a --variant (shared by naive, compiled and ours)."""
    g = torch.Generator(device=old.device).manual_seed(2)
    roll = old + torch.randn(old.shape, device=old.device, generator=g) * 0.1
    kw = {"grpo": {}, "dapo": {"loss_type": "dapo", "num_tokens": int(mask.sum())},
          "gspo": {"ratio_level": "sequence"}, "dual": {"delta": 1.5},
          "tis": {"rollout_logprobs": roll, "tis_cap": 2.0}, "entropy": {"entropy_coef": 0.01},
          "all": {"loss_type": "dapo", "num_tokens": int(mask.sum()), "ratio_level": "sequence", "delta": 1.5,
                  "rollout_logprobs": roll, "tis_cap": 2.0, "entropy_coef": 0.01}}[variant]
    if op == "grpo":
        kw.pop("entropy_coef", None)  # an option of the fused loss only
    return kw


def parse():
    cuda = torch.cuda.is_available()
    p = bench_parser(__doc__)
    p.add_argument("--ops", default="grpo,fused")
    p.add_argument("--b", type=int, default=None, help="completions (default 1024 for grpo, 8 / 64 for fused)")
    p.add_argument("--t", type=int, default=None, help="tokens per completion (default 1024 / 256)")
    p.add_argument("--h", type=int, default=4096 if cuda else 576)
    p.add_argument("--v", type=int, default=128256 if cuda else 49152)
    p.add_argument("--variant", default="grpo", choices=LOSS_VARIANTS, help="loss variant to time (default: grpo)")
    p.add_argument("--impls", default=None, help="comma-separated subset of the implementations (default: all)")
    return p.parse_known_args()[0]


def shape(op: str, a) -> tuple[int, int]:
    cuda = torch.cuda.is_available()
    b = a.b or (1024 if op == "grpo" else (64 if cuda else 8))
    t = a.t or (1024 if op == "grpo" else 256)
    return b, t


def batch(b: int, t: int, device: str, logp: torch.Tensor | None = None):
    g = torch.Generator(device=device).manual_seed(0)
    if logp is None:
        logp = -torch.rand(b, t, device=device, generator=g) * 3
    old = logp + torch.randn(b, t, device=device, generator=g) * 0.1
    ref = logp + torch.randn(b, t, device=device, generator=g) * 0.1
    adv = torch.randn(b, device=device, generator=g)
    lengths = torch.randint(int(0.8 * t), t + 1, (b,), device=device, generator=g)
    mask = (torch.arange(t, device=device)[None, :] < lengths[:, None]).float()
    return logp, old, ref, adv, mask


def make(variant: str, mode: str, device: str):
    from rlvr_fast.kernels import fused_linear_grpo_loss, grpo_loss
    from rlvr_fast.kernels.reference import fused_linear_grpo_loss_ref, grpo_loss_ref

    a = parse()
    op_name = sys.argv[sys.argv.index("--op") + 1]
    b, t = shape(op_name, a)
    fwd_only = mode == "fwd"
    if op_name == "grpo":
        logp, old, ref, adv, mask = batch(b, t, device)
        logp.requires_grad_(not fwd_only)
        inputs = [logp]
        op = {"naive": grpo_loss_ref, "ours": grpo_loss, "compiled": torch.compile(grpo_loss_ref)}[variant]
        kw = variant_kwargs(a.variant, op_name, old, mask)
        call = lambda: op(logp, old, ref, adv, mask, beta=0.04, **kw)[0]  # noqa: E731
    else:
        dtype = getattr(torch, a.dtype)
        g = torch.Generator(device=device).manual_seed(1)
        h = torch.randn(b, t, a.h, device=device, generator=g).to(dtype)
        w = (torch.randn(a.v, a.h, device=device, generator=g) * a.h ** -0.5).to(dtype)
        y = torch.randint(0, a.v, (b, t), device=device, generator=g)
        _, old, ref, adv, mask = batch(b, t, device, logp=-torch.rand(b, t, device=device) * 3)
        h.requires_grad_(not fwd_only)
        w.requires_grad_(not fwd_only)
        inputs = [h, w]
        if variant == "matmuls":
            return lm_head_matmuls(h, w, backward=not fwd_only), {}
        if variant == "liger":
            if a.variant != "grpo":
                return None, {"skip": "default loss only"}
            try:
                from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
            except ImportError:
                return None, {"skip": "not installed"}
            loss_fn = LigerFusedLinearGRPOLoss(beta=0.04, use_ref_model=False, loss_type="grpo")
            call = lambda: loss_fn(h, w, y, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]  # noqa: E731
        else:
            op = {"naive": fused_linear_grpo_loss_ref, "ours": fused_linear_grpo_loss,
                  "compiled": torch.compile(fused_linear_grpo_loss_ref)}[variant]
            kw = variant_kwargs(a.variant, op_name, old, mask)
            call = lambda: op(h, w, y, old, ref, adv, mask, beta=0.04, **kw)[0]  # noqa: E731

    def run():
        if fwd_only:
            with torch.no_grad():
                return call()
        return torch.autograd.grad(call(), inputs)
    return run, {}


def main():
    a = parse()
    device = default_device()
    for op in a.ops.split(","):
        if op == "grpo" and a.variant == "entropy":
            print("bench_grpo_loss: skipping grpo (entropy_coef is an option of fused_linear_grpo_loss only)",
                  file=sys.stderr)
            continue
        b, t = shape(op, a)
        variants = [v for v in VARIANTS[op] if a.impls is None or v in a.impls.split(",")]
        print(f"bench_grpo_loss [{op}, {a.variant}] on {device}: B={b} T={t}", file=sys.stderr)
        res = run_all(os.path.abspath(__file__), variants, MODES, device, a.reps, ["--op", op, *sys.argv[1:]])
        header, extra = [], None
        if op == "fused":
            header = ["fwd+bwd time / 3 matmuls"]
            extra = lambda v: [ratio(res.of(v, "fwdbwd", "time"), res.of("matmuls", "fwdbwd", "time"))]  # noqa: E731
        elif device == "cuda":
            header = ["fwd GB/s", "fwd+bwd GB/s"]
            extra = lambda v: [f"{16 * b * t / res.of(v, 'fwd', 'time') / 1e9:.0f}",  # noqa: E731
                               f"{32 * b * t / res.of(v, 'fwdbwd', 'time') / 1e9:.0f}"]
        if op == "grpo":
            title, what = "grpo_loss", f"grpo_loss on [B, T] = [{b}, {t}] fp32 log-probs"
        else:
            title, what = "fused_linear_grpo_loss", f"fused_linear_grpo_loss, B={b} T={t} H={a.h} V={a.v} {a.dtype}"
        if a.variant != "grpo":
            title, what = f"{title} ({a.variant})", f"{what}, loss variant {a.variant}"
        body = (f"{what} on {device}. naive = kernels/reference.py (log_softmax of the full logits for the fused "
                f"op); compiled = torch.compile of it; liger = LigerFusedLinearGRPOLoss; fwd under no_grad.\n\n"
                + fwd_bwd_table(res, variants, header, extra))
        publish(title, body, device, not a.no_write)


if __name__ == "__main__":
    main_or_child(main, make)
