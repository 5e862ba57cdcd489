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
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import shapes  # noqa: E402  (bench/shapes.py)

MARK = "BENCH_MEMORY_RESULT "
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


def _patch_trainer(trainer_mod) -> None:
    """Train every group (zero advantage where rewards tie) and ignore EOS: fixed work per step."""
    import torch

    orig_adv, orig_sp = trainer_mod.group_advantages, trainer_mod.SamplingParams
    trainer_mod.group_advantages = lambda rewards, scale: (orig_adv(rewards, scale)[0],
                                                           torch.zeros(rewards.shape[0], dtype=torch.bool))
    trainer_mod.SamplingParams = lambda *a, **kw: orig_sp(*a, **{**kw, "ignore_eos": True})


def _memory_now(device) -> int:
    import torch

    from rlvr_fast.grpo.memory import status_kib
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else status_kib("VmRSS") * 1024


def _random_llama(shape: str, device, dtype):
    import torch

    from rlvr_fast import LlamaForCausalLM
    cfg = SHAPES[shape]
    tied = cfg.tie_word_embeddings
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)  # the dtype before allocating: no fp32 copy of a 70B model
    model = model.to_empty(device=device)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=gen)
    model._inv_freq = cfg.rope_inv_freq().to(device)
    return model.eval()


def child(args: argparse.Namespace) -> dict:
    import torch

    import rlvr_fast
    import rlvr_fast.grpo.trainer as trainer_mod
    from rlvr_fast.checkpoint.default_model import default_model_dir
    from rlvr_fast.grpo.config import TrainConfig
    from rlvr_fast.grpo.memory import peak_memory_bytes, reset_peak_memory
    from rlvr_fast.tasks.multiply import MultiplyTask

    _patch_trainer(trainer_mod)
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
            model = _random_llama(args.child_shape, device, getattr(torch, dtype))
            tok = rlvr_fast.Tokenizer.from_dir(default_model_dir())
        else:
            model, tok = rlvr_fast.load_pretrained(default_model_dir(), device=device, dtype=getattr(torch, dtype))
        params = sum(p.numel() for p in model.parameters())
        trainer = trainer_mod.GRPOTrainer(cfg, model, tok, task, out_dir, device)
        est = trainer.memory_estimate
        t0 = time.perf_counter()
        warm = trainer.train_step()
        warm_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.synchronize()
        before = _memory_now(device)
        reset_peak_memory(device)
        t0 = time.perf_counter()
        m = trainer.train_step()
        step_s = time.perf_counter() - t0
        peak = peak_memory_bytes(device)
    except torch.cuda.OutOfMemoryError as exc:
        return {"oom": str(exc).splitlines()[0][:160]}
    return {"params": params, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "before": before, "peak": peak, "estimate": {k: v for k, v in vars(est).items()},
            "estimate_total": est.total, "step_s": step_s, "warm_s": warm_s, "dtype": dtype,
            "tokens": m["completion_len_mean"] * args.prompts * args.group, "warm_tokens": warm["completion_len_mean"],
            "phases": [round(m[k], 2) for k in ("time_rollout_s", "time_reference_s", "time_update_s")],
            "kv_blocks": trainer.engine.num_blocks, "threads": torch.get_num_threads()}


def run_child(args: argparse.Namespace, variant: str | None = None, shape: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--prompts", str(args.prompts),
           "--group", str(args.group), "--new-tokens", str(args.new_tokens), "--dtype", args.dtype]
    cmd += ["--child-variant", variant] if variant else ["--child-shape", shape]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
        print(f"  {variant or shape} failed (rc {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    res = json.loads(lines[-1][len(MARK):])
    res["wall_s"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- parent


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def compare(args: argparse.Namespace) -> tuple[str, str, str]:
    from benchlib import markdown_table, ratio

    results = {}
    for v in args.variants.split(","):
        print(f"running {v} ...", file=sys.stderr, flush=True)
        results[v] = run_child(args, variant=v)
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
    table = markdown_table(["variant", "trainable params", f"{unit} before step GB", f"peak during step GB",
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
    from benchlib import markdown_table

    rows, largest = [], None
    for shape in args.shapes.split(","):
        print(f"running {shape} ...", file=sys.stderr, flush=True)
        r = run_child(args, shape=shape)
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
    import statistics

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
        times = {v: [] for v in packs}
        for _ in range(rounds):
            for v, ps in packs.items():
                t0 = time.perf_counter()
                for _ in range(20):
                    for p, x in zip(ps, xs):
                        p(x)
                times[v].append((time.perf_counter() - t0) / 20)
    return {v: statistics.median(t) for v, t in times.items()}


def rollout(args: argparse.Namespace) -> tuple[str, str, str]:
    import functools
    import random
    import statistics

    import torch

    import rlvr_fast
    import rlvr_fast.model.llama as llama_mod
    from benchlib import markdown_table
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

    def run(variant: str) -> float:
        t0 = time.perf_counter()
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
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    variants = ["as shipped", "unmerged", "adapters off"]
    for v in variants:
        run(v)  # warm-up
    times = {v: [] for v in variants}
    for _ in range(args.reps):
        for v in variants:
            times[v].append(run(v))
            print(f"  {v}: {times[v][-1]:.2f} s", file=sys.stderr, flush=True)
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
    ap.add_argument("--no-append", action="store_true", help="print the section only")
    ap.add_argument("--child-variant", help=argparse.SUPPRESS)
    ap.add_argument("--child-shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    grow_mode = args.grow if args.grow is not None else args.device.startswith("cuda") and not args.rollout
    if args.new_tokens is None:
        args.new_tokens = 64 if grow_mode else 32
    if args.child_variant or args.child_shape:
        print(MARK + json.dumps(child(args)), flush=True)
        return

    load_start = os.getloadavg()
    t0 = time.perf_counter()
    title, body, method = rollout(args) if args.rollout else grow(args) if grow_mode else compare(args)
    load_end = os.getloadavg()
    body += (f"\n\nLoad average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f} (machine shared); "
             f"total {(time.perf_counter() - t0) / 60:.1f} min.")
    import benchlib
    if args.no_append:
        print(body)
    else:
        print(benchlib.append_results(title, body, args.device.split(":")[0], method=method))


if __name__ == "__main__":
    main()
