"""End-to-end GRPO step: our GRPOTrainer vs TRL's GRPOTrainer, same CPU, model, batch and lengths.

    python bench/bench_e2e.py                            # 2 prompts x G=8 x 64 new tokens, fp32, K=3 timed steps
    python bench/bench_e2e.py --dtype bfloat16 --no-second-ours   # both sides in bf16
    python bench/bench_e2e.py --prompts 2 --group 8 --new-tokens 64 --steps 3 --no-ignore-eos --no-write
    python bench/bench_e2e.py --model DIR                # any supported HF-layout checkpoint, both sides
    python bench/bench_e2e.py --random-model qwen3-0.6b --dtype bfloat16 --no-second-ours --no-write
                                                         # random weights, Qwen3-0.6B's shapes, built on the spot

Both trainers: the embedded default model (SmolLM2-135M-Instruct, the HF-layout directory of
rlvr_fast.checkpoint.default_model.default_model_dir()), or the checkpoint of --model DIR, or a random-weight
checkpoint of bench/shapes.py's SHAPE that --random-model SHAPE builds (bf16, small test tokenizer; its
completions are noise, so every reward is 0 and only the "all groups" and TRL rows do update work), on CPU in one precision (--dtype: fp32, or bf16:
ours bf16 weights with fp32 master weights, TRL bf16 weights with bf16=True autocast), multiply-task prompts
(MultiplyTask(digits=(1, 1), curriculum=False), chat-templated by each side's tokenizer from the
same messages), P prompts x G completions x at most N new tokens, temperature 1.0 (no top-k/top-p),
beta 0.04 (both keep a frozen reference model), one update per rollout, lr 1e-6, per-completion
mean loss ("grpo"), group-std advantage scaling, clip 0.2, grad-norm clip 1.0, no gradient
checkpointing, no torch.compile, one optimizer step per P*G completions. Rewards: the multiply
rule (correct + 0.1 x format) on the completion text, the same function on both sides.

Each variant runs in its own fresh subprocess, one after another: 1 warm-up step, then K timed
steps (ours: wall time of GRPOTrainer.train_step(); TRL: on_step_begin -> on_step_end of a
TrainerCallback, which covers generation, scoring, reference log-probs, forward/backward and the
optimizer step). Peak memory is the peak RSS of that process (getrusage ru_maxrss), loading
included; "RSS after load" is the RSS once the trainer (policy + reference) is built.

Variants: "ours" is the trainer as shipped: groups whose rewards are all equal carry no signal and
are dropped before any reference/update compute. TRL still runs forward/backward over them (zero
advantage), so "ours, all groups" disables that drop (monkeypatched in the child) to do the same
work as TRL. With EOS ignored (ours: SamplingParams.ignore_eos, monkeypatched in the child; TRL:
generation_kwargs min_new_tokens = max_new_tokens) every completion is exactly N tokens on both
sides, so the generated and trained token counts are equal by construction.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import (Wall, add_model_options, add_no_write, bench_model, emit, fixed_work, markdown_table,  # noqa: E402
                      memory_now, publish, ratio, run_child)

SEED = 0
LR = 1e-6
BETA = 0.04
TEMPERATURE = 1.0


def rss_gb() -> float:
    return memory_now("cpu") / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def checkpoint(args: argparse.Namespace) -> Path:
    """The child's model directory: the parent's --model, else the embedded default model."""
    from rlvr_fast.checkpoint.default_model import default_model_dir
    return args.model or default_model_dir()


def make_task():
    from rlvr_fast.tasks.multiply import MultiplyTask
    return MultiplyTask(digits=(1, 1), curriculum=False)


# ----------------------------------------------------------------------------- children


def child_ours(args: argparse.Namespace) -> dict:
    import random

    import torch

    import rlvr_fast
    import rlvr_fast.grpo.trainer as trainer_mod
    from rlvr_fast.grpo.config import TrainConfig

    notes = fixed_work(trainer_mod, args.all_groups, args.child_ignore_eos)  # like TRL: trains tied groups too
    rss_imports = rss_gb()
    torch.manual_seed(SEED)
    out_dir = Path(tempfile.mkdtemp(prefix="bench_e2e_ours_"))
    cfg = TrainConfig(task="multiply", digits=(1, 1), curriculum=False, prompts_per_step=args.prompts,
                      group_size=args.group, max_new_tokens=args.new_tokens, temperature=TEMPERATURE, beta=BETA,
                      lr=LR, dtype=args.dtype, device="cpu", steps=1 + args.steps, seed=SEED, eval_every=0,
                      save_every=0, sample_every=0, max_oversample=1, output=str(out_dir))  # one round, as TRL
    device = torch.device("cpu")
    model, tok = rlvr_fast.load_pretrained(checkpoint(args), device=device, dtype=getattr(torch, args.dtype))
    trainer = trainer_mod.GRPOTrainer(cfg, model, tok, make_task(), out_dir, device)
    rss_load = rss_gb()
    steps = []
    for i in range(1 + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        m = trainer.train_step()
        dt = time.perf_counter() - t0
        steps.append({"seconds": dt, "cpu_util": (time.process_time() - c0) / dt, "completion_tokens": m["completion_len_mean"] * args.prompts * args.group,
                      "zero_std_groups": m["zero_std_groups"], "rollout_s": m["time_rollout_s"],
                      "reference_s": m["time_reference_s"], "update_s": m["time_update_s"],
                      "reward_mean": m["reward_mean"], "truncated_frac": m["truncated_frac"]})
        print(f"ours step {i}: {dt:.2f} s {steps[-1]}", file=sys.stderr, flush=True)
    prompt_lens = [len(trainer.encode_prompt(p)) for p in make_task().sample(random.Random(1), 4)]
    from rlvr_fast.rollout.model_runner import kv_bytes_per_block
    kv_gb = trainer.engine.num_blocks * kv_bytes_per_block(model, trainer.engine.block_size) / 1e9
    notes.append(f"KV cache {trainer.engine.num_blocks} blocks x {trainer.engine.block_size} tokens = {kv_gb:.2f} GB")
    return {"steps": steps, "rss_imports_gb": rss_imports, "rss_load_gb": rss_load, "peak_rss_gb": peak_rss_gb(),
            "prompt_tokens_sample": prompt_lens, "notes": notes, "threads": torch.get_num_threads()}


def child_trl(args: argparse.Namespace) -> dict:
    import random

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlvr_fast.tasks.base import total_reward
    from rlvr_fast.tasks.multiply import multiply_reward

    rss_imports = rss_gb()
    torch.manual_seed(SEED)
    task = make_task()
    problems = task.sample(random.Random(SEED), 64)
    ds = Dataset.from_list([{"prompt": p.messages, "product": int(p.answer)} for p in problems])

    def multiply(prompts, completions, product, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [total_reward(multiply_reward(t, int(a)), task.reward_weights) for t, a in zip(texts, product)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0, self.c0, self.times, self.cpu, self.logs = None, None, [], [], []

        def on_step_begin(self, args_, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args_, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append((time.process_time() - self.c0) / self.times[-1])
            print(f"trl step {len(self.times) - 1}: {self.times[-1]:.2f} s", file=sys.stderr, flush=True)

        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs))

    n = args.prompts * args.group
    out_dir = tempfile.mkdtemp(prefix="bench_e2e_trl_")
    gen_kwargs = {"min_new_tokens": args.new_tokens} if args.child_ignore_eos else None
    config = GRPOConfig(
        output_dir=out_dir, seed=SEED, use_cpu=True, bf16=args.dtype == "bfloat16", fp16=False, torch_compile=False,
        model_init_kwargs={"dtype": getattr(torch, args.dtype)},
        # one generation batch of P*G completions = one optimizer step, one forward/backward over all of them
        per_device_train_batch_size=n, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=args.group, num_iterations=1, max_steps=1 + args.steps,
        max_completion_length=args.new_tokens, temperature=TEMPERATURE, top_p=1.0, top_k=0,
        generation_kwargs=gen_kwargs, use_vllm=False, use_transformers_continuous_batching=False,
        beta=BETA, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, loss_type="grpo", scale_rewards="group", epsilon=0.2,
        gradient_checkpointing=False, use_liger_kernel=False,
        logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0,
    )
    if args.trl_head == "ours":  # bench_embed.py: TRL's trainer with its loss from rlvr_fast's fused kernel
        from rlvr_fast.integrations.trl import FusedGRPOTrainer as GRPOTrainer  # noqa: N814
    if args.no_kl_bias_correction:  # the KL form the fused loss implements (TRL 1.16 defaults to the ratio-weighted one)
        config.use_bias_correction_kl = False
    timer = Timer()
    trainer = GRPOTrainer(model=str(checkpoint(args)), reward_funcs=multiply, args=config, train_dataset=ds,
                          callbacks=[timer])
    split: dict[str, list[float]] = {"generate_s": [], "loss_forward_s": []}

    def timed(name, fn):  # per-call wall time of one phase of TRL's step
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            split[name].append(time.perf_counter() - t0)
            return out
        return wrapper
    # generation + rewards + reference log-probs, and the loss forward (TRL's head, or ours with its gradients)
    trainer._generate_and_score_completions = timed("generate_s", trainer._generate_and_score_completions)
    trainer.compute_loss = timed("loss_forward_s", trainer.compute_loss)
    rss_load = rss_gb()
    trainer.train()
    steps = []
    for i, dt in enumerate(timer.times):
        log = timer.logs[i] if i < len(timer.logs) else {}
        num = lambda key: float(log[key]) if key in log else float("nan")  # noqa: E731
        steps.append({"seconds": dt, "cpu_util": timer.cpu[i], "completion_tokens": num("completions/mean_length") * n,
                      "reward_mean": num("reward"), "truncated_frac": num("completions/clipped_ratio"),
                      "zero_std_frac": num("frac_reward_zero_std"), "step_time_metric": num("step_time"),
                      **{k: v[i] if i < len(v) else float("nan") for k, v in split.items()}})
    tok = trainer.processing_class
    prompt_lens = [len(tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
                   for p in task.sample(random.Random(1), 4)]
    return {"steps": steps, "rss_imports_gb": rss_imports, "rss_load_gb": rss_load, "peak_rss_gb": peak_rss_gb(),
            "prompt_tokens_sample": prompt_lens,
            "notes": (["EOS ignored"] if args.child_ignore_eos else [])
            + [f"gradient_checkpointing={trainer.args.gradient_checkpointing}, ref model {type(trainer.ref_model).__name__}"],
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- parent


def trl_available() -> str | None:
    try:
        import trl  # noqa: F401
        import datasets  # noqa: F401
        import accelerate  # noqa: F401
        return None
    except Exception as exc:  # ImportError, or a broken dependency
        return f"{type(exc).__name__}: {exc}"


def run_variant(kind: str, args: argparse.Namespace, all_groups: bool = False, ignore_eos: bool = False,
                extra: tuple[str, ...] = ()) -> dict:
    model = getattr(args, "model", None)  # bench_embed.py's namespace has none: the default model
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *(["--model", str(model)] if model else []),
           "--prompts", str(args.prompts),
           "--group", str(args.group), "--new-tokens", str(args.new_tokens), "--steps", str(args.steps),
           "--dtype", args.dtype, *extra, *(["--all-groups"] if all_groups else []),
           *(["--child-ignore-eos"] if ignore_eos else [])]
    return run_child(cmd, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                     label=kind)


def summarize(res: dict) -> dict:
    timed = res["steps"][1:]  # the first step is the warm-up
    secs = [s["seconds"] for s in timed]
    return {"median": statistics.median(secs), "mean": statistics.mean(secs),
            "tokens": statistics.mean(s["completion_tokens"] for s in timed), "peak": res["peak_rss_gb"],
            "load": res["rss_load_gb"], "times": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step (P)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--new-tokens", type=int, default=64, help="max new tokens per completion")
    ap.add_argument("--steps", type=int, default=3, help="timed steps K (after 1 warm-up step)")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="also run 'ours, all groups' and TRL with EOS ignored (every completion N tokens)")
    ap.add_argument("--second-ours", action=argparse.BooleanOptionalAction, default=True,
                    help="run ours again after TRL")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="precision of both sides")
    add_model_options(ap)
    add_no_write(ap)
    ap.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--all-groups", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-ignore-eos", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trl-head", choices=["trl", "ours"], default="trl", help=argparse.SUPPRESS)
    ap.add_argument("--no-kl-bias-correction", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:  # the parent passes --model: the directory it resolved
        emit((child_ours if args.child == "ours" else child_trl)(args))
        return
    # A model other than the default gets its own RESULTS.md section, named after it.
    args.title_model = args.random_model or (Path(args.model).name if args.model else None)
    with bench_model(args) as (args.model, model_name):
        args.random_model = None  # built: the children read the directory
        compare(args, model_name)


def compare(args: argparse.Namespace, model_name: str) -> None:
    """Every variant of the plan in its own child process on the checkpoint args.model; the table."""
    wall = Wall()
    missing = trl_available()
    if missing:
        print(f"NOTE: trl is not installed or does not import ({missing}); measuring ours only. "
              "Install it without a second torch: pip install --no-deps trl accelerate datasets, then the "
              "pure-Python deps it reports missing (pandas, pyarrow, dill, multiprocess, xxhash, psutil).",
              file=sys.stderr, flush=True)

    plan = [("ours", "ours", False, False, "EOS"), ("ours, all groups", "ours", True, False, "EOS")]
    if not missing:
        plan.append(("TRL", "trl", False, False, "EOS"))
    if args.second_ours:
        plan += [("ours (2nd run)", "ours", False, False, "EOS"),
                 ("ours, all groups (2nd run)", "ours", True, False, "EOS")]
    if args.ignore_eos:
        plan.append(("ours, all groups, EOS ignored", "ours", True, True, "noeos"))
        if not missing:
            plan.append(("TRL, EOS ignored", "trl", False, True, "noeos"))

    results: dict[str, dict] = {}
    for name, kind, all_groups, ignore_eos, _ in plan:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_variant(kind, args, all_groups=all_groups, ignore_eos=ignore_eos)
        if "error" not in results[name]:
            s = summarize(results[name])
            print(f"  {name}: median {s['median']:.2f} s/step, mean {s['mean']:.2f}, {s['tokens']:.0f} completion "
                  f"tokens/step, peak RSS {s['peak']:.2f} GB (child wall {results[name]['wall_s']:.0f} s)",
                  file=sys.stderr, flush=True)
    load_end = os.getloadavg()

    baselines = {"EOS": results.get("TRL"), "noeos": results.get("TRL, EOS ignored")}
    rows, details = [], []
    for name, kind, _, _, mode in plan:
        res = results[name]
        if "error" in res:
            rows.append([name, "failed", "-", "-", "-", "-", "-", "-"])
            details.append(f"- {name}: failed: {res['error']}")
            continue
        s = summarize(res)
        base = baselines[mode]
        b = summarize(base) if base and "error" not in base else None
        speed = "-" if kind == "trl" else ratio(b["median"], s["median"]) if b else "-"
        mem = "-" if kind == "trl" else ratio(s["peak"], b["peak"]) if b else "-"
        rows.append([name, f"{s['median']:.2f}", f"{s['mean']:.2f}", f"{s['tokens']:.0f}", f"{s['peak']:.2f}",
                     f"{s['load']:.2f}", speed, mem])
        extra = ""
        if kind == "ours":
            timed = res["steps"][1:]
            extra = (f"; zero-signal groups per timed step {[st['zero_std_groups'] for st in timed]}"
                     f"; rollout / reference / update s per timed step "
                     f"{[(round(st['rollout_s'], 2), round(st['reference_s'], 2), round(st['update_s'], 2)) for st in timed]}")
        details.append(f"- {name}: timed steps s {[round(t, 2) for t in s['times']]} (warm-up "
                       f"{res['steps'][0]['seconds']:.2f}); completion tokens per timed step "
                       f"{[round(st['completion_tokens']) for st in res['steps'][1:]]}; truncated fraction "
                       f"{[st['truncated_frac'] for st in res['steps'][1:]]}; prompt tokens (4 sample prompts) "
                       f"{res['prompt_tokens_sample']}; RSS after imports {res['rss_imports_gb']:.2f} GB; "
                       f"torch threads {res['threads']}; process CPU time / wall per timed step "
                       f"{[round(st['cpu_util'], 2) for st in res['steps'][1:]]}; child wall {res['wall_s']:.0f} s; "
                       f"{'; '.join(res['notes'])}{extra}")

    table = markdown_table(["variant", "s/step median", "s/step mean", "completion tokens/step", "peak RSS GB",
                            "RSS after load GB", "speedup vs TRL", "peak memory vs TRL"], rows)
    p, g, n = args.prompts, args.group, args.new_tokens
    precision = ("fp32" if args.dtype == "float32" else
                 "bf16 (ours: bf16 weights, fp32 master weights and AdamW states; TRL: bf16 weights and bf16 autocast)")
    body = (f"One GRPO step (rollout + rewards + reference log-probs + forward/backward + AdamW), "
            f"{model_name}, {precision}, CPU, {p} prompts x G={g} x <= {n} new tokens, "
            f"temperature {TEMPERATURE}, beta {BETA} (reference model on both sides), lr {LR}, one update per "
            f"rollout, loss 'grpo', no gradient checkpointing, no torch.compile; multiply task 1x1 digits. "
            f"TRL: GRPOConfig(per_device_train_batch_size={p * g}, gradient_accumulation_steps=1, "
            f"steps_per_generation=1, num_generations={g}, max_completion_length={n}, top_k=0, top_p=1.0, "
            f"use_vllm=False, bf16={args.dtype == 'bfloat16'}, model_init_kwargs dtype {args.dtype}, gradient_checkpointing=False, loss_type='grpo', beta={BETA}) = one "
            f"optimizer step per {p * g} completions; 'EOS ignored' = generation_kwargs min_new_tokens={n}. "
            f"Ours: GRPOTrainer.train_step() with the matching TrainConfig (dtype {args.dtype}, other options at their "
            f"defaults: micro_batch_tokens 2048, share_prompts on). "
            f"'ours' drops zero-signal groups before reference/update (as shipped); 'ours, all groups' keeps "
            f"them (zero advantage) like TRL does; 'EOS ignored' rows generate and train exactly "
            f"{p * g * n} completion tokens per step on both sides. Speedup = TRL median / variant median against "
            f"the TRL row with the same EOS setting; peak memory vs TRL = variant peak RSS / TRL peak RSS. "
            f"RSS after load: TRL's weights are memory-mapped by transformers and count only once touched (the "
            f"first forward), so its figure is low; ours includes the deep-copied reference. Ours' peak includes the "
            f"rollout engine's KV cache, sized by default from available RAM (at most 2 GiB; see the notes). "
            f"'process CPU time / wall' of 2.0 means both cores worked for this process all step long; lower values "
            f"mean waiting or other load on the machine.\n\n"
            + table + "\n\nPer variant:\n" + "\n".join(details)
            + "\n\n" + wall.note())
    if missing:
        body += f"\n\nTRL not measured: {missing}."
    method = (f"median of timed steps, not interleaved: each variant in its own fresh process, run one after another "
              f"in the order of the table; 1 warm-up step then {args.steps} timed steps (ours: train_step() wall time; "
              f"TRL: TrainerCallback on_step_begin -> on_step_end); peak memory = peak RSS of that process (getrusage "
              f"ru_maxrss, model loading included); load average at start {wall.load[0]:.2f}, at end "
              f"{load_end[0]:.2f} (machine possibly shared)")
    model = f", {args.title_model}" if args.title_model else ""
    publish(f"GRPO step: ours vs TRL GRPOTrainer, {args.new_tokens} new tokens, {args.dtype}{model}", body, "cpu",
            not args.no_write, method=method, packages=("transformers", "trl", "accelerate", "datasets"))


if __name__ == "__main__":
    main()
