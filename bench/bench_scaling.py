"""Throughput scaling of `torchrun --nproc-per-node N -m rlvr_fast.train`: one global batch on 1, 2, ... devices.

    python bench/bench_scaling.py                                   # N = 1, 2, 4, ... up to all visible GPUs
    python bench/bench_scaling.py --nprocs 1 2 4 8 --shard fsdp --model /path/to/llama --prompts 32
    python bench/bench_scaling.py --cpu --nprocs 1 2 --model DIR    # checks the mechanics on a CPU; writes nothing

For each N, a fresh `torchrun --standalone --nproc-per-node N -m rlvr_fast.train` run with the same
options and seed (so the same problems, completions and update math whatever N: see
rlvr_fast/grpo/distributed.py): --steps S of P prompts x G completions, no evaluation in between.
Times come from the trainer's own metrics.jsonl (step_time_s, time_rollout_s, time_update_s, rank
0's clock; every step ends with collectives, so rank 0 waits for the slowest rank). The first W
steps are warm-up and dropped; the median of the others is reported. Throughput = P x G
completions per second; speed-up = step time at the first N / step time at N; efficiency =
speed-up / (N / first N).

A scaling figure needs several devices: without --cpu the script refuses to run on fewer than 2
CUDA devices, and --cpu results (processes sharing one CPU) are printed but never written to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import markdown_table, publish  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_once(nprocs: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nprocs),
           "-m", "rlvr_fast.train", "--task", args.task, "--output", str(out), "--steps", str(args.steps),
           "--prompts-per-step", str(args.prompts), "--group-size", str(args.group), "--max-new-tokens",
           str(args.new_tokens), "--dtype", args.dtype, "--shard", args.shard, "--eval-every", "0",
           "--eval-size", str(args.eval_size), "--save-every", "0", "--sample-every", "0", "--seed", "0",
           "--device", "cpu" if args.cpu else "cuda"]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if args.cpu else "4")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"N={nprocs} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][args.warmup:]
    med = lambda key: statistics.median(m[key] for m in steps)
    return {"step": med("step_time_s"), "rollout": med("time_rollout_s"), "update": med("time_update_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nprocs", type=int, nargs="+", help="process counts (default: 1, 2, 4, ... up to all GPUs)")
    p.add_argument("--shard", default="none", choices=("none", "fsdp"))
    p.add_argument("--model", help="HF-layout Llama directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--task", default="multiply")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (the global batch; a multiple of every N)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="first steps dropped")
    p.add_argument("--eval-size", type=int, default=8)
    p.add_argument("--cpu", action="store_true", help="run the ranks on the CPU (mechanics only; nothing written)")
    args = p.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")

    import torch
    devices = torch.cuda.device_count()
    if not args.cpu and devices < 2:
        raise SystemExit(f"{devices} CUDA device(s) visible: a scaling figure needs at least 2 (or --cpu to check "
                         "the mechanics)")
    nprocs = args.nprocs or [n for n in (1, 2, 4, 8, 16, 32) if n <= devices]
    if bad := [n for n in nprocs if args.prompts % n]:
        raise SystemExit(f"--prompts {args.prompts} does not split over {bad} processes")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in nprocs:
            results[n] = run_once(n, args, Path(tmp) / f"n{n}")
            print(f"N={n}: {results[n]['step']:.2f} s/step", flush=True)
    n0, t0 = nprocs[0], results[nprocs[0]]["step"]
    rows = [[str(n), f"{r['step']:.2f}", f"{r['rollout']:.2f}", f"{r['update']:.2f}",
             f"{args.prompts * args.group / r['step']:.1f}", f"{t0 / r['step']:.2f}x",
             f"{t0 / r['step'] * n0 / n:.0%}"] for n, r in results.items()]
    header = ["processes", "s/step", "rollout s", "update s", "completions/s", "speed-up", "efficiency"]
    body = (f"{args.prompts} prompts x {args.group} completions x <= {args.new_tokens} new tokens per step, "
            f"{args.dtype}, --shard {args.shard}, model {args.model or 'SmolLM2-135M-Instruct (embedded)'}, "
            f"median of steps {args.warmup + 1}..{args.steps}; speed-up and efficiency against {n0} "
            f"process(es).\n\n" + markdown_table(header, rows))
    publish("training throughput scaling (torchrun)", body, "cuda", not args.cpu,
            method="rank 0's step times from metrics.jsonl, median after warm-up, one torchrun run per N")


if __name__ == "__main__":
    main()
