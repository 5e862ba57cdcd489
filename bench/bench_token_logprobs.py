"""token_logprobs on materialized logits vs the naive expression, torch.compile of it, and Liger.

    python bench/bench_token_logprobs.py        # CPU: logits [2048, 49152] fp32; CUDA: [16384, 128256] bf16

forward under torch.no_grad(); forward+backward = grad of the logits from sum(logp). On CUDA the
table adds the achieved bandwidth: the minimal traffic is one read of the logits in forward and
one read + one write in backward (3 x N x V x bytes for forward+backward), against the device's
peak (memory clock x bus width) and a measured device-to-device copy.
Liger-Kernel's row: -liger_cross_entropy(logits, targets, reduction="none") (CUDA only).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import bench_parser, default_device, fwd_bwd_table, main_or_child, publish, run_all  # noqa: E402

VARIANTS = ["naive", "compiled", "liger", "ours"]
MODES = ["fwd", "fwdbwd"]


def parse():
    cuda = torch.cuda.is_available()
    p = bench_parser(__doc__, VARIANTS)
    p.add_argument("--n", type=int, default=16384 if cuda else 2048)
    p.add_argument("--v", type=int, default=128256 if cuda else 49152)
    return p.parse_known_args()[0]


def make(variant: str, mode: str, device: str):
    from rlvr_fast.kernels import token_logprobs
    from rlvr_fast.kernels.reference import token_logprobs_ref

    a = parse()
    x = torch.randn(a.n, a.v, device=device).mul_(2).to(getattr(torch, a.dtype))
    y = torch.randint(0, a.v, (a.n,), device=device)
    if variant == "liger":
        if device != "cuda":
            return None, {"skip": "needs CUDA"}
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy
        except ImportError:
            return None, {"skip": "not installed"}
        op = lambda x, y: -liger_cross_entropy(x, y, reduction="none")  # noqa: E731
    else:
        op = {"naive": token_logprobs_ref, "ours": token_logprobs,
              "compiled": torch.compile(token_logprobs_ref)}[variant]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return op(x, y)
    else:
        x.requires_grad_()

        def run():
            return torch.autograd.grad(op(x, y).sum(), [x])
    return run, {}


def device_bandwidth() -> tuple[float | None, float]:
    """(peak GB/s from the device properties if torch exposes them, measured copy GB/s)."""
    props = torch.cuda.get_device_properties(0)
    clock, width = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    peak = 2 * clock * 1e3 * width / 8 / 1e9 if clock and width else None
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    copy = 10 * 2 * src.numel() / (start.elapsed_time(end) / 1e3) / 1e9
    return peak, copy


def main():
    a = parse()
    device = default_device()
    variants = a.variants.split(",")
    print(f"bench_token_logprobs on {device}: N={a.n} V={a.v} {a.dtype}", file=sys.stderr)
    res = run_all(os.path.abspath(__file__), variants, MODES, device, a.reps, sys.argv[1:])
    nbytes = a.n * a.v * getattr(torch, a.dtype).itemsize
    header, bw_note, peak = [], "", None
    if device == "cuda":
        peak, copy = device_bandwidth()
        header = ["fwd GB/s", "fwd+bwd GB/s", "fwd+bwd % of peak"]
        bw_note = (f" Device bandwidth: peak {peak:.0f} GB/s (memory clock x bus width), " if peak else
                   " Device bandwidth: peak unknown, ") + f"measured copy {copy:.0f} GB/s."

    def bandwidth(v: str) -> list[str]:  # CUDA only
        gbf = nbytes / res.of(v, "fwd", "time") / 1e9
        gbb = 3 * nbytes / res.of(v, "fwdbwd", "time") / 1e9
        return [f"{gbf:.0f}", f"{gbb:.0f}", f"{100 * gbb / peak:.0f}%" if peak else "-"]
    body = (f"token_logprobs, logits [{a.n}, {a.v}] {a.dtype} on {device}. naive = log_softmax(x.float() / T)"
            f".gather (kernels/reference.py); compiled = torch.compile of it; fwd under no_grad.{bw_note}\n\n"
            + fwd_bwd_table(res, variants, header, bandwidth if device == "cuda" else None))
    publish("token_logprobs", body, device, not a.no_write)


if __name__ == "__main__":
    main_or_child(main, make)
