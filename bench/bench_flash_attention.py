"""flash_attention (varlen, causal, GQA) against dense SDPA and flash-attn, forward and forward+backward.

    python bench/bench_flash_attention.py      # CUDA: 1B and 8B heads, 16k tokens as 16x1k .. 2x8k, bf16
                                               # CPU: SmolLM2 heads, 2k tokens as 8x256 and 2x1024, fp32

Every variant attends the same B sequences of L tokens each (total tokens fixed, L varied):

* ours: `rlvr_fast.kernels.flash_attention` on the packed [B*L, H, D] layout with cu_seqlens. On CUDA
  that is the project's Triton kernel. On CPU it is the torch backend, SDPA per run of equal-length
  sequences (here one batched call, like sdpa's, plus the cu_seqlens checks): the CPU table
  measures that dispatch path, NOT a kernel (the Triton kernel only runs on a GPU).
* sdpa: `F.scaled_dot_product_attention` on the dense [B, H, L, D] layout (is_causal, enable_gqa),
  which needs no varlen bookkeeping: the peer a kernel should match at equal lengths.
* flash_attn: `flash_attn_varlen_func` on the same packed inputs (CUDA, when installed).

TFLOPS counts the attended pairs only, flash-attn's convention: forward 4 * B * Hq * L^2 * D / 2
(causal), forward+backward 3.5x that. fwd runs under no_grad; fwd+bwd is the gradient of q, k and v.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (Wall, bench_parser, default_device, fmt_mib, fmt_ms, main_or_child, markdown_table,  # noqa: E402
                      publish, ratio, run_all)
from shapes import shape  # noqa: E402

VARIANTS = ["sdpa", "ours", "flash_attn"]
# --shapes name -> its model's (query heads, KV heads, head_dim), from bench/shapes.py
SHAPES = {name: (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) for name, cfg in
          [("smollm2-135m", shape("smollm2-135m")), ("llama-1b", shape("llama-3.2-1b")),
           ("llama-8b", shape("llama-3.1-8b"))]}


def parse():
    cuda = torch.cuda.is_available()
    p = bench_parser(__doc__, VARIANTS)
    p.add_argument("--shapes", default="llama-1b,llama-8b" if cuda else "smollm2-135m",
                   help=f"comma-separated, from {list(SHAPES)}")
    p.add_argument("--lengths", default="1024,2048,4096,8192" if cuda else "256,1024")
    p.add_argument("--tokens", type=int, default=16384 if cuda else 2048, help="total tokens per call (B * L)")
    return p.parse_known_args()[0]


def make(variant: str, mode: str, device: str):
    """mode = 'SHAPE:L:fwd' or 'SHAPE:L:fwdbwd'."""
    from rlvr_fast.kernels import flash_attention as fa

    a = parse()
    shape, length, what = mode.split(":")
    hq, hkv, d = SHAPES[shape]
    length = int(length)
    b = max(1, a.tokens // length)
    dtype = getattr(torch, a.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b * length, hq, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(b * length, hkv, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(b * length, hkv, d, device=device, dtype=dtype, generator=g)
    cu = torch.arange(0, (b + 1) * length, length, dtype=torch.int32, device=device)
    if variant == "ours":
        def op(q, k, v):
            return fa.flash_attention(q, k, v, cu, cu, length, length, causal=True)
    elif variant == "sdpa":
        def op(q, k, v):  # dense [B, H, L, D] views of the packed tensors
            dense = [t.view(b, length, -1, d).transpose(1, 2) for t in (q, k, v)]
            return F.scaled_dot_product_attention(*dense, is_causal=True, enable_gqa=hq != hkv).transpose(1, 2)
    elif variant == "flash_attn":
        if device != "cuda":
            return None, {"skip": "needs CUDA"}
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            return None, {"skip": "not installed"}

        def op(q, k, v):
            return flash_attn_varlen_func(q, k, v, cu, cu, length, length, causal=True)
    else:
        raise ValueError(variant)
    if what == "fwd":
        def run():
            with torch.no_grad():
                return op(q, k, v)
    else:
        for t in (q, k, v):
            t.requires_grad_()
        do = torch.randn(b * length, hq, d, device=device, dtype=dtype, generator=g)

        def run():
            out = op(q, k, v)
            return torch.autograd.grad(out, (q, k, v), do.view(out.shape))
    return run, {"batch": b}


def main():
    a = parse()
    device = default_device()
    variants = a.variants.split(",")
    shapes, lengths = a.shapes.split(","), [int(x) for x in a.lengths.split(",")]
    modes = [f"{s}:{n}:{w}" for s in shapes for n in lengths for w in ("fwd", "fwdbwd")]
    print(f"bench_flash_attention on {device}: {shapes} L={lengths} {a.tokens} tokens {a.dtype}", file=sys.stderr)
    wall = Wall()
    res = run_all(os.path.abspath(__file__), variants, modes, device, a.reps, sys.argv[1:])
    get = res.of
    header = ["heads (Hq/Hkv x D)", "B x L", "variant", "fwd ms", "fwd+bwd ms", "fwd TFLOPS", "fwd+bwd TFLOPS",
              "fwd+bwd / sdpa", "fwd+bwd peak extra MiB"]
    rows = []
    for s in shapes:
        hq, hkv, d = SHAPES[s]
        for n in lengths:
            b = max(1, a.tokens // n)
            fwd_flops = 4 * b * hq * n * n * d / 2
            for v in variants:
                mf, mb = f"{s}:{n}:fwd", f"{s}:{n}:fwdbwd"
                skip = get(v, mf, "skip")
                if skip:
                    rows.append([f"{s} ({hq}/{hkv} x {d})", f"{b} x {n}", v, skip] + ["-"] * (len(header) - 4))
                    continue
                tf, tb = get(v, mf, "time"), get(v, mb, "time")
                rows.append([f"{s} ({hq}/{hkv} x {d})", f"{b} x {n}", v, fmt_ms(tf), fmt_ms(tb),
                             f"{fwd_flops / tf / 1e12:.3g}" if tf else "-",
                             f"{3.5 * fwd_flops / tb / 1e12:.3g}" if tb else "-",
                             ratio(tb, get("sdpa", mb, "time")), fmt_mib(get(v, mb, "mem"))])
    if device == "cuda":
        what = ("ours = the Triton kernels (kernels/flash_attention.py); sdpa = torch's dense SDPA (its flash "
                "backend at these dtypes); flash_attn = flash_attn_varlen_func.")
    else:
        what = ("CPU: ours = flash_attention's torch backend (one SDPA call per run of equal-length sequences, so "
                "here the same call as sdpa plus its checks), NOT a kernel measurement: the Triton kernel needs a "
                "GPU. sdpa = torch's dense SDPA on [B, H, L, D].")
    body = (f"flash_attention, causal, {a.tokens} tokens per call as B sequences of L, {a.dtype} on {device}. "
            f"{what} TFLOPS count attended pairs (forward 2 matmuls over L^2/2 pairs; forward+backward 3.5x). "
            f"{wall.note()}\n\n"
            + markdown_table(header, rows))
    publish("flash_attention", body, device, not a.no_write)


if __name__ == "__main__":
    main_or_child(main, make)
