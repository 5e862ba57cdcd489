"""The fused GRPO loss embedded in someone else's trainer: what it costs to import, the loss alone
against what a TRL user has today, and a whole TRL GRPO step with TRL's own head vs ours.

    python bench/bench_embed.py                        # all three parts, into RESULTS.md
    python bench/bench_embed.py --parts import,loss --sizes 4096x49152 --reps 1 --no-write   # smoke run

import: wall time of `import rlvr_fast.kernels` in a fresh interpreter (torch included, then
    without it: torch imported first), and which heavy modules it loaded.
loss: forward + backward of the GRPO loss from hidden states [N, H] and an lm_head [V, H] (beta 0.04
    with reference log-probs, old log-probs given, loss_type grpo, ~10% padding), per size NxV:
    - ours:    rlvr_fast.kernels.fused_linear_grpo_loss (one pass, gradients in the forward; entropy
               reported too, as TRL logs it);
    - trl:     TRL's ChunkedLogProbFunction (its fused LM head: log-probs + entropy, as GRPOTrainer
               asks for them) followed by the GRPO loss in PyTorch on the [B, T] log-probs
               (kernels/reference.py grpo_loss_ref: the same math as TRL's _compute_loss);
    - liger:   LigerFusedLinearGRPOLoss, where it is installed and runs;
    - naive:   log_softmax of the full fp32 logits, then the same loss (skipped when its logits
               would not fit in memory);
    - matmuls: the 3 GEMMs any method needs (h @ W.T, its two gradients), the floor (skipped like naive).
    Time: median over --reps calls, variants interleaved in one process; memory: peak extra RSS
    (CPU) / allocated (CUDA) of one call in a fresh process, gradients included.
step: one TRL GRPOTrainer step on the default model (bench_e2e.py's TRL child: 2 prompts x 8 x 64
    tokens, multiply prompt), with TRL's own head and with ours (rlvr_fast.integrations.trl), same run:
    time split and peak memory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_grpo_loss import batch  # noqa: E402
from benchlib import (bench_parser, default_device, fmt_mib, fmt_ms, lm_head_matmuls, main_or_child,  # noqa: E402
                      markdown_table, publish, ratio, run_all)

LOSS_VARIANTS = ["naive", "trl", "liger", "ours", "matmuls"]
BETA = 0.04


def parse():
    cuda = torch.cuda.is_available()
    p = bench_parser(__doc__, LOSS_VARIANTS, reps=(10, 2))
    p.add_argument("--parts", default="import,loss,step")
    p.add_argument("--sizes", default="16384x128256,4096x128256,16384x49152,4096x49152" if cuda
                   else "4096x49152,16384x49152,4096x128256,16384x128256", help="comma-separated NxV")
    p.add_argument("--h", type=int, default=4096 if cuda else 576, help="hidden size")
    p.add_argument("--t", type=int, default=256, help="tokens per completion (N = B x T)")
    p.add_argument("--memory-budget-gb", type=float, default=None,
                   help="skip a variant whose [N, V] tensors would pass this (default: 60%% of RAM / GPU memory)")
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)  # set per size for the children
    p.add_argument("--v", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--step-steps", type=int, default=3, help="timed TRL steps per process (step part)")
    p.add_argument("--step-dtype", default="float32", choices=["float32", "bfloat16"], help="step part precision")
    return p.parse_known_args()[0]


# ----------------------------------------------------------------------------- import


IMPORT_CHILD = """
import sys, time
{pre}
t0 = time.perf_counter()
import rlvr_fast.kernels
dt = time.perf_counter() - t0
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {{'numpy', 'safetensors', 'tokenizers', 'jinja2', 'gguf',
                                                         'transformers', 'triton'}})
ours = sorted(m for m in sys.modules if m.startswith('rlvr_fast') and not m.startswith('rlvr_fast.kernels'))
print(f"{{dt:.3f}}|{{','.join(heavy) or '-'}}|{{','.join(ours) or '-'}}")
"""


def import_part() -> str:
    rows = []
    for label, pre in (("fresh interpreter (torch included)", ""), ("torch already imported", "import torch")):
        times, heavy, ours = [], "", ""
        for _ in range(3):
            out = subprocess.run([sys.executable, "-c", IMPORT_CHILD.format(pre=pre)], capture_output=True,
                                 text=True, check=True, cwd="/").stdout.strip().splitlines()[-1]
            t, heavy, ours = out.split("|")
            times.append(float(t))
        rows.append([label, f"{sorted(times)[1] * 1e3:.0f}", heavy, ours])
    return ("`import rlvr_fast.kernels` in a fresh process, median of 3 (run from `/`, so the installed package is "
            "what loads).\n\n" + markdown_table(["", "ms", "other heavy packages loaded", "rlvr_fast modules "
                                                 "outside kernels"], rows))


# ----------------------------------------------------------------------------- loss


def budget_bytes(a, device: str) -> float:
    if a.memory_budget_gb is not None:
        return a.memory_budget_gb * 1e9
    if device == "cuda":
        return 0.6 * torch.cuda.get_device_properties(0).total_memory
    return 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def make(variant: str, mode: str, device: str):
    from rlvr_fast.kernels import fused_linear_grpo_loss
    from rlvr_fast.kernels.reference import fused_linear_grpo_loss_ref, grpo_loss_ref

    a = parse()
    dtype = getattr(torch, a.dtype)
    n, v, h_dim = a.n, a.v, a.h
    b, t = n // a.t, a.t
    if variant in ("naive", "matmuls"):
        # naive: fp32 logits, their softmax and its gradient; matmuls: the logits and their gradient operand
        need = n * v * (12 if variant == "naive" else 2 * dtype.itemsize)
        if need > budget_bytes(a, device):
            return None, {"skip": f"its [N, V] tensors need ~{need / 1e9:.0f} GB"}
    g = torch.Generator(device=device).manual_seed(0)
    hid = torch.randn(b, t, h_dim, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, h_dim, device=device, generator=g) * h_dim ** -0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (b, t), device=device, generator=g)
    _, old, ref, adv, mask = batch(b, t, device)  # bench_grpo_loss's: log-probs near each other, ~10% padding

    if variant == "matmuls":
        return lm_head_matmuls(hid, w), {}
    if variant == "ours":
        call = lambda: fused_linear_grpo_loss(hid, w, y, old, ref, adv, mask, beta=BETA, return_entropy=True)[0]  # noqa: E731
    elif variant == "naive":
        call = lambda: fused_linear_grpo_loss_ref(hid, w, y, old, ref, adv, mask, beta=BETA)[0]  # noqa: E731
    elif variant == "trl":
        try:
            from trl.kernels import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
        except ImportError as exc:
            return None, {"skip": f"trl not importable ({exc})"}

        def call():
            logp, _entropy, *_ = ChunkedLogProbFunction.apply(hid.view(n, h_dim), w, None, y.view(n), 1.0,
                                                              _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("entropy",))
            return grpo_loss_ref(logp.view(b, t), old, ref, adv, mask, beta=BETA)[0]
    else:  # liger
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError:
            return None, {"skip": "not installed"}
        if device != "cuda":
            return None, {"skip": "needs CUDA (Triton kernels)"}
        loss_fn = LigerFusedLinearGRPOLoss(beta=BETA, use_ref_model=False, loss_type="grpo")
        call = lambda: loss_fn(hid, w, y, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0]  # noqa: E731
    return (lambda: torch.autograd.grad(call(), [hid, w])), {}


def loss_part(a, device: str) -> str:
    variants = a.variants.split(",")
    sections = []
    for size in a.sizes.split(","):
        n, v = (int(x) for x in size.lower().split("x"))
        print(f"bench_embed loss on {device}: N={n} H={a.h} V={v} {a.dtype}", file=sys.stderr, flush=True)
        extra = [*sys.argv[1:], "--n", str(n), "--v", str(v)]
        res = run_all(os.path.abspath(__file__), variants, ["fwdbwd"], device, a.reps, extra)
        get = lambda var, k: res.of(var, "fwdbwd", k)  # noqa: E731
        rows = []
        for var in variants:
            skip = get(var, "skip")
            if skip:
                rows.append([var, skip, "-", "-", "-", "-"])
                continue
            row = [var, fmt_ms(get(var, "time")), fmt_mib(get(var, "mem")),
                   ratio(get(var, "time"), get("trl", "time")), ratio(get(var, "mem"), get("trl", "mem"), 3),
                   ratio(get(var, "time"), get("matmuls", "time"))]
            if device == "cuda" and get(var, "time"):
                row.append(f"{6 * n * v * a.h / get(var, 'time') / 1e12:.0f}")
            rows.append(row)
        header = ["variant", "fwd+bwd ms", "peak extra MiB", "time / trl", "memory / trl", "time / 3 matmuls"]
        if device == "cuda":
            header.append("TFLOPS (3 matmuls' flops)")
        sections.append(f"N={n} tokens (B={n // a.t} x T={a.t}), H={a.h}, V={v}, {a.dtype}:\n\n"
                        + markdown_table(header, rows))
    return ("GRPO loss from hidden states, forward + backward (gradients of hidden and lm_head), beta 0.04 with "
            "reference and old log-probs, ~10% padding. trl = TRL's ChunkedLogProbFunction (log-probs + entropy) "
            "+ the GRPO loss in PyTorch; naive = fp32 log_softmax of the full logits; matmuls = the 3 GEMMs alone. "
            f"Median of {a.reps} (variants interleaved), memory from one call in a fresh process.\n\n"
            + "\n\n".join(sections))


# ----------------------------------------------------------------------------- step


def step_part(a) -> str:
    """TRL's GRPOTrainer, one step at a time, with its own head and with ours: each in a fresh process, twice,
    alternating (trl, ours, trl, ours), so a drift in machine load hits both."""
    import statistics

    import bench_e2e

    e2e = argparse.Namespace(prompts=2, group=8, new_tokens=64, steps=a.step_steps, dtype=a.step_dtype)
    missing = bench_e2e.trl_available()
    if missing:
        return f"Not measured: TRL does not import ({missing})."
    runs: dict[str, list[dict]] = {"trl": [], "ours": []}
    for _ in range(2):
        for head in ("trl", "ours"):
            print(f"bench_embed step: TRL GRPOTrainer with {head} head ...", file=sys.stderr, flush=True)
            res = bench_e2e.run_variant("trl", e2e, extra=("--trl-head", head, "--no-kl-bias-correction"))
            if "error" in res:
                return f"The {head} run failed: {res['error']}"
            runs[head].append(res)
    rows, med = [], {}
    for head, results in runs.items():
        timed = [st for res in results for st in res["steps"][1:]]  # the first step of each process is a warm-up
        m = {k: statistics.median(st[k] for st in timed) for k in ("seconds", "generate_s", "loss_forward_s")}
        m["peak"] = max(res["peak_rss_gb"] for res in results)
        med[head] = m
    for head, m in med.items():
        rest = m["seconds"] - m["generate_s"] - m["loss_forward_s"]
        rows.append([{"trl": "TRL as shipped (its chunked head)", "ours": "TRL + rlvr_fast.integrations.trl"}[head],
                     f"{m['seconds']:.2f}", f"{m['generate_s']:.2f}", f"{m['loss_forward_s']:.2f}", f"{rest:.2f}",
                     f"{m['peak']:.2f}", ratio(med["trl"]["seconds"], m["seconds"]),
                     ratio(m["peak"], med["trl"]["peak"], 3)])
    header = ["loss", "s/step median", "generate + score + ref s", "loss forward s", "backward + optimizer s",
              "peak RSS GB", "speedup vs TRL", "peak memory vs TRL"]
    return (f"One TRL GRPOTrainer step on CPU: the default model (SmolLM2-135M-Instruct), {a.step_dtype}, the multiply "
            f"prompt (1x1 digits), 2 prompts x G=8 x <= 64 new tokens, beta {bench_e2e.BETA} with "
            f"use_bias_correction_kl=False on both sides (the KL the fused loss implements), every other GRPOConfig "
            f"option as in bench_e2e.py. Each head in 2 fresh processes, alternating; per process 1 warm-up step "
            f"then {a.step_steps} timed steps; medians over the timed steps of both processes; peak RSS = the larger "
            f"of the two processes' (model loading included). 'loss forward' is GRPOTrainer.compute_loss (ours "
            f"computes the gradients there too, so its backward is only the decoder's).\n\n"
            + markdown_table(header, rows))


# ----------------------------------------------------------------------------- main


def main():
    a = parse()
    device = default_device()
    parts = a.parts.split(",")
    t0 = time.perf_counter()
    if "import" in parts:
        publish("Embedding: import rlvr_fast.kernels", import_part(), device, not a.no_write)
    # the TRL version goes into the headers of the sections that compare against it
    if "loss" in parts:
        publish(f"Embedding: GRPO loss from hidden states vs TRL's fused head, {a.dtype}", loss_part(a, device),
                device, not a.no_write, packages=("trl",))
    if "step" in parts:
        publish("Embedding: one TRL GRPOTrainer step, TRL's head vs ours", step_part(a), device, not a.no_write,
                packages=("trl",))
    print(f"bench_embed: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main_or_child(main, make)
