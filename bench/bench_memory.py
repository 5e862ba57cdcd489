"""Peak memory of one GRPO train_step: full fine-tuning vs LoRA (no reference copy), with and without
gradient checkpointing; on a GPU, the largest Llama shape that trains one step with LoRA.

    python bench/bench_memory.py                       # CPU, embedded SmolLM2-135M, fp32, beta 0.04
    python bench/bench_memory.py --device cuda         # GPU: grow Llama shapes (random bf16 weights) until one fails
    python bench/bench_memory.py --device cpu --grow --shapes tiny,smollm2-135m   # dry run of the grow path
    python bench/bench_memory.py --rollout             # LoRA rollout: merged into the packed copies vs unmerged

Compare mode (default, CPU or CUDA): each variant runs in its own fresh process (CPU: with
MALLOC_MMAP_THRESHOLD_=65536, so freed buffers go back to the OS and the resident set is what is
live). It builds the trainer on the embedded default model, runs one warm-up train_step (the
optimizer's states and the rollout's KV pool are allocated there), then resets the peak
(CPU: VmHWM via /proc/self/clear_refs; CUDA: reset_peak_memory_stats) and runs the measured step.
Reported: the resident/allocated memory before the measured step (weights, reference copy, KV
pool, AdamW states, masters), the peak during it, and the start-of-run estimate of
rlvr_fast.grpo.memory for the same settings. Every group is trained (zero-std groups are kept,
with zero advantage) and EOS is ignored, so each variant trains exactly P x G x N completion tokens.

Grow mode (--grow, the default with --device cuda): Llama shapes with random bf16 weights (the
vocabulary of Llama 3, 128256; the tokenizer is the embedded model's, whose ids all fit), LoRA
r=16 on all seven projections, beta 0.04, gradient checkpointing, one GRPO step of 2 prompts x 8
completions x 64 tokens; each shape in a fresh process, smallest first, stopping at the first
that does not fit (CUDA out-of-memory).

Rollout mode (--rollout): what the rollout engine pays for LoRA. One process, the embedded model
with LoRA r=16 on all projections (B random, so the update is not zero), RolloutEngine.generate of
P prompts x G samples x N tokens (EOS ignored), timed alternately round after round: "as shipped"
(fp32 on CPU: W + s B A merged into the packed per-rollout weight copies, merge time included),
"unmerged" (base packed weights + s (x A^T) B^T per call, what bf16 and CUDA run), "adapters off"
(the base model alone: the floor). Medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import shapes  # noqa: E402  (bench/shapes.py)
from benchlib import (Wall, add_no_write, emit, fixed_work, interleaved, markdown_table, memory_now,  # noqa: E402
                      publish, ratio, run_child, timed)

BETA = 0.04
VARIANTS = {  # name -> (lora_rank, grad_checkpoint)
    "full fine-tuning": (0, False),
    "full fine-tuning + grad checkpoint": (0, True),
    "LoRA r=16": (16, False),
    "LoRA r=16 + grad checkpoint": (16, True),
}
# bench/shapes.py; "tiny" keeps the default tokenizer's vocabulary here (the step's prompts are real text).
SHAPES = {**shapes.SHAPES, "tiny": shapes.shape("tiny", vocab_size=49152)}
GPU_SHAPES = "llama-3.2-1b,llama-3.2-3b,llama-3.1-8b,llama-13b-gqa,llama-34b-gqa,llama-3.1-70b"


# ----------------------------------------------------------------------------- children


def child(args: argparse.Namespace) -> dict:
    import torch

    import rlvr_fast
    import rlvr_fast.grpo.trainer as trainer_mod
    from rlvr_fast.checkpoint.default_model import default_model_dir
    from rlvr_fast.grpo.config import TrainConfig
    from rlvr_fast.grpo.memory import peak_memory_bytes, reset_peak_memory
    from rlvr_fast.tasks.multiply import MultiplyTask

    fixed_work(trainer_mod)  # train every group and ignore EOS: the same work in every variant
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.child_shape:
        lora, ckpt, dtype = 16, True, "bfloat16" if device.type == "cuda" else "float32"
    else:
        lora, ckpt = VARIANTS[args.child_variant]
        dtype = args.dtype
    out_dir = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    cfg = TrainConfig(task="multiply", digits=(1, 1), curriculum=False, prompts_per_step=args.prompts,
                      group_size=args.group, max_new_tokens=args.new_tokens, temperature=1.0, beta=BETA, lr=1e-6,
                      dtype=dtype, device=args.device, eval_size=args.prompts * args.group, eval_every=0,
                      save_every=0, sample_every=0, output=str(out_dir), lora_rank=lora, lora_alpha=32.0,
                      grad_checkpoint=ckpt)
    task = MultiplyTask(digits=(1, 1), curriculum=False)
    try:
        if args.child_shape:
            model = shapes.random_model(SHAPES[args.child_shape], device, getattr(torch, dtype))
            tok = rlvr_fast.Tokenizer.from_dir(default_model_dir())
        else:
            model, tok = rlvr_fast.load_pretrained(default_model_dir(), device=device, dtype=getattr(torch, dtype))
        params = sum(p.numel() for p in model.parameters())
        trainer = trainer_mod.GRPOTrainer(cfg, model, tok, task, out_dir, device)
        est = trainer.memory_estimate
        seconds: list[float] = []
        with timed(seconds, device):
            warm = trainer.train_step()
        before = memory_now(device)
        reset_peak_memory(device)
        with timed(seconds, device):
            m = trainer.train_step()
        peak = peak_memory_bytes(device)
        warm_s, step_s = seconds
    except torch.cuda.OutOfMemoryError as exc:
        return {"oom": str(exc).splitlines()[0][:160]}
    return {"params": params, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "before": before, "peak": peak, "estimate": {k: v for k, v in vars(est).items()},
            "estimate_total": est.total, "step_s": step_s, "warm_s": warm_s, "dtype": dtype,
            "tokens": m["completion_len_mean"] * args.prompts * args.group, "warm_tokens": warm["completion_len_mean"],
            "phases": [round(m[k], 2) for k in ("time_rollout_s", "time_reference_s", "time_update_s")],
            "kv_blocks": trainer.engine.num_blocks, "threads": torch.get_num_threads()}


def run_variant(args: argparse.Namespace, variant: str | None = None, shape: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--prompts", str(args.prompts),
           "--group", str(args.group), "--new-tokens", str(args.new_tokens), "--dtype", args.dtype,
           *(["--child-variant", variant] if variant else ["--child-shape", shape])]
    env = {"TOKENIZERS_PARALLELISM": "false", **({"MALLOC_MMAP_THRESHOLD_": "65536"} if args.device == "cpu" else {})}
    return run_child(cmd, env, label=variant or shape)


# ----------------------------------------------------------------------------- parent


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def compare(args: argparse.Namespace) -> tuple[str, str, str]:
    results = {}
    for v in args.variants.split(","):
        print(f"running {v} ...", file=sys.stderr, flush=True)
        results[v] = run_variant(args, variant=v)
        print(f"  {v}: {results[v]}", file=sys.stderr, flush=True)
    base = results.get("full fine-tuning", {})
    rows, notes = [], []
    for v, r in results.items():
        if "error" in r or "oom" in r:
            rows.append([v, "failed: " + r.get("error", r.get("oom", "")), *["-"] * 6])
            continue
        e = r["estimate"]
        rows.append([v, f"{r['trainable'] / 1e6:.2f} M", gb(r["before"]), gb(r["peak"]), gb(r["peak"] - r["before"]),
                     ratio(r["peak"], base.get("peak")), gb(e["reference"]), gb(r["estimate_total"])])
        notes.append(f"- {v}: estimate weights {gb(e['weights'])}, gradients {gb(e['gradients'])}, masters "
                     f"{gb(e['master_weights'])}, AdamW {gb(e['optimizer_states'])}, reference {gb(e['reference'])}, "
                     f"KV pool {gb(e['kv_cache'])} ({r['kv_blocks']} blocks), activations "
                     f"{e['activations_per_token']:,} B/token x {e['micro_batch_tokens']} tokens = "
                     f"{gb(e['activations_per_token'] * e['micro_batch_tokens'])}; completion tokens in the measured "
                     f"step {r['tokens']:.0f}; rollout / reference / update s {r['phases']} (warm-up step "
                     f"{r['warm_s']:.1f} s, measured step {r['step_s']:.1f} s, {r['threads']} threads; rough, shared CPU)")
    unit = "allocated" if args.device == "cuda" else "RSS"
    table = markdown_table(["variant", "trainable params", f"{unit} before step GB", "peak during step GB",
                            "peak - before GB", "peak vs full", "estimate: reference GB", "estimate: total GB"], rows)
    p, g, n = args.prompts, args.group, args.new_tokens
    body = (f"One GRPO train_step (rollout + rewards + reference log-probs + forward/backward + AdamW) after one "
            f"warm-up step, SmolLM2-135M-Instruct (embedded default model), {args.dtype}, {args.device}, "
            f"{p} prompts x G={g} x {n} new tokens (EOS ignored, every group trained), beta {BETA}, "
            f"micro_batch_tokens 2048, share_prompts on. LoRA: rank 16, alpha 32, all seven projections "
            f"(q,k,v,o,gate,up,down), fp32 adapters; the KL reference is the model with adapters off, so "
            f"no reference copy. 'before step' = weights + reference copy + KV pool + AdamW states (+ process "
            f"overhead on CPU: Python, torch, the tokenizer); 'peak' = highest during the measured step; the "
            f"estimate is the table rlvr_fast prints at start (grpo/memory.py).\n\n"
            + table + "\n\nPer variant:\n" + "\n".join(notes))
    method = ("each variant in a fresh process" + (" with MALLOC_MMAP_THRESHOLD_=65536" if args.device == "cpu" else "")
              + "; " + ("peak = VmHWM after resetting it via /proc/self/clear_refs just before the measured step, "
                        "before = VmRSS then" if args.device == "cpu" else
                        "peak = torch.cuda.max_memory_allocated() after reset_peak_memory_stats() just before the "
                        "measured step, before = memory_allocated() then")
              + "; memory figures do not depend on CPU load (timings do)")
    return f"GRPO step memory: full fine-tuning vs LoRA ({args.device})", body, method


def grow(args: argparse.Namespace) -> tuple[str, str, str]:
    rows, largest = [], None
    for shape in args.shapes.split(","):
        print(f"running {shape} ...", file=sys.stderr, flush=True)
        r = run_variant(args, shape=shape)
        print(f"  {shape}: {r}", file=sys.stderr, flush=True)
        desc = shapes.describe(SHAPES[shape])
        if "params" not in r:
            rows.append([shape, desc, "-", "no: " + r.get("oom", r.get("error", "?")), "-", "-", "-"])
            break
        largest = shape
        rows.append([shape, desc, f"{r['params'] / 1e9:.2f} B", "yes", gb(r["peak"]), gb(r["estimate_total"]),
                     f"{r['step_s']:.1f}"])
    table = markdown_table(["shape", "config", "params", "one GRPO step fits", "peak GB", "estimate GB", "step s"], rows)
    body = (f"Largest Llama shape that trains one GRPO step on one {args.device} device with LoRA (rank 16, alpha 32, "
            f"all seven projections, fp32 adapters, base weights "
            f"{'bf16' if args.device == 'cuda' else 'fp32'} and random), beta {BETA} (reference = adapters off), "
            f"gradient checkpointing, {args.prompts} prompts x G={args.group} x {args.new_tokens} new tokens "
            f"(EOS ignored), micro_batch_tokens 2048; each shape in a fresh process, stopping at the first that "
            f"fails. Largest that fits: {largest or 'none'}.\n\n" + table)
    method = ("peak = torch.cuda.max_memory_allocated() during the measured (second) step" if args.device == "cuda"
              else "peak = VmHWM during the measured (second) step, fresh process per shape")
    return f"Largest Llama shape with LoRA, one GRPO step ({args.device})", body, method


def _time_projections(model, rounds: int) -> dict[str, float]:
    """Seconds per decode step of one layer's packed projections: adapters merged, unmerged, none."""
    import torch

    from rlvr_fast.model.lora import lora_disabled
    from rlvr_fast.model.packed import PackedLinear

    layer = model.model.layers[len(model.model.layers) // 2]
    a, m = layer.self_attn, layer.mlp
    groups = [[a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj, m.up_proj], [m.down_proj]]
    gen = torch.Generator(device=model.device).manual_seed(0)
    xs = [torch.randn(16, g[0].in_features, generator=gen, device=model.device).to(model.dtype) for g in groups]
    with torch.no_grad():
        packs = {"merged into packed copies": [PackedLinear(g) for g in groups],
                 "unmerged": [PackedLinear(g, merge_fp32_adapters=False) for g in groups]}
        with lora_disabled(model):
            packs["adapters off"] = [PackedLinear(g) for g in groups]
        def calls(ps):
            def decode_steps():
                for _ in range(20):
                    for p, x in zip(ps, xs):
                        p(x)
            return decode_steps
        times = interleaved({v: calls(ps) for v, ps in packs.items()}, rounds)
    return {v: statistics.median(t) / 20 for v, t in times.items()}


def rollout(args: argparse.Namespace) -> tuple[str, str, str]:
    import functools
    import random

    import torch

    import rlvr_fast
    import rlvr_fast.model.llama as llama_mod
    from rlvr_fast.checkpoint.default_model import default_model_dir
    from rlvr_fast.model.lora import LoRAConfig, apply_lora, lora_disabled, lora_modules
    from rlvr_fast.tasks.multiply import MultiplyTask

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, tok = rlvr_fast.load_pretrained(default_model_dir(), device=device, dtype=dtype)
    apply_lora(model, LoRAConfig(rank=16, alpha=32.0))
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.normal_(0, 1e-3, generator=gen)
    problems = MultiplyTask(digits=(1, 1), curriculum=False).sample(random.Random(0), args.prompts)
    prompts = [tok.encode(tok.apply_chat_template(p.messages, add_generation_prompt=True), add_special_tokens=False)
               for p in problems]
    params = rlvr_fast.SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=True, seed=0)
    engine = rlvr_fast.RolloutEngine(model, tok, num_blocks=256)
    shipped = llama_mod.PackedLinear

    def run(variant: str):
        def generate() -> None:
            if variant == "unmerged":  # the bf16 policy, forced: adapters added per call
                llama_mod.PackedLinear = functools.partial(shipped, merge_fp32_adapters=False)
            try:
                if variant == "adapters off":
                    with lora_disabled(model):
                        engine.generate(prompts, params, n=args.group)
                else:
                    engine.generate(prompts, params, n=args.group)
            finally:
                llama_mod.PackedLinear = shipped
        return generate

    variants = ["as shipped", "unmerged", "adapters off"]
    fns = {v: run(v) for v in variants}
    for fn in fns.values():
        fn()  # warm-up
    times = interleaved(fns, args.reps, device)
    print(f"  rollout seconds per round: {times}", file=sys.stderr, flush=True)
    proj = _time_projections(model, args.reps * 10)
    tokens = args.prompts * args.group * args.new_tokens
    floor = statistics.median(times["adapters off"])
    rows = [[v, f"{statistics.median(times[v]):.2f}", f"{tokens / statistics.median(times[v]):.0f}",
             f"{statistics.median(times[v]) / floor:.2f}x", str([round(t, 2) for t in times[v]])] for v in variants]
    shipped_desc = ("fp32 on CPU: each adapter merged into the rollout's packed weight copies when they are built"
                    if device.type == "cpu" and dtype == torch.float32 else "unmerged (bf16 or CUDA)")
    body = (f"RolloutEngine.generate with LoRA (rank 16, all seven projections, B random), SmolLM2-135M-Instruct, "
            f"{args.dtype}, {args.device} ({torch.get_num_threads()} threads), {args.prompts} prompts x {args.group} "
            f"samples x {args.new_tokens} tokens (EOS ignored), medians of {args.reps} alternating rounds. 'as shipped' "
            f"= {shipped_desc}; 'unmerged' = base packed weights plus s (x A^T) B^T per call; 'adapters off' = the base "
            f"model alone (the floor).\n\n"
            + markdown_table(["variant", "s per rollout", "tokens/s", "vs adapters off", "rounds s"], rows)
            + f"\n\nThe projections alone (one decoder layer's packed q/k/v, o, gate/up, down on a decode batch of 16 "
            f"rows, {args.reps * 10} alternating rounds of 20 calls, medians; less exposed to background load than whole "
            f"rollouts):\n\n"
            + markdown_table(["variant", "ms per layer and decode step", "vs adapters off"],
                             [[v, f"{t * 1e3:.3f}", f"{t / proj['adapters off']:.2f}x"] for v, t in proj.items()]))
    return f"LoRA rollout: adapters merged into the packed weights vs unmerged ({args.device})", body, (
        "timed alternately in one process after one warm-up each; shared machine, so the ratios matter more "
        "than the absolute times")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--grow", action=argparse.BooleanOptionalAction, default=None,
                    help="grow Llama shapes with LoRA until one does not fit (default: on for cuda, off for cpu)")
    ap.add_argument("--shapes", default=GPU_SHAPES, help=f"grow mode: comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"compare mode: comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 32 (compare), 64 (grow)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compare mode precision")
    ap.add_argument("--rollout", action="store_true", help="time LoRA rollouts: merged into packed copies vs unmerged vs base")
    ap.add_argument("--reps", type=int, default=3, help="rollout mode: alternating rounds")
    add_no_write(ap)
    ap.add_argument("--child-variant", help=argparse.SUPPRESS)
    ap.add_argument("--child-shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    grow_mode = args.grow if args.grow is not None else args.device.startswith("cuda") and not args.rollout
    if args.new_tokens is None:
        args.new_tokens = 64 if grow_mode else 32
    if args.child_variant or args.child_shape:
        emit(child(args))
        return

    wall = Wall()
    title, body, method = rollout(args) if args.rollout else grow(args) if grow_mode else compare(args)
    publish(title, body + "\n\n" + wall.note(), args.device.split(":")[0], not args.no_write, method=method)


if __name__ == "__main__":
    main()
