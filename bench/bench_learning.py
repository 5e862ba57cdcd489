"""Learning benchmark: does GRPO on the embedded model learn the blog's multiplication, and how fast?

    python bench/bench_learning.py                     # 1x1, 2x2 and 4x2, one after another
    python bench/bench_learning.py --sizes 1x1 2x2     # some of them
    python bench/bench_learning.py --sizes 2x2 --extra --steps 10   # options added to every run
    python bench/bench_learning.py --compare RUN_DIR RUN_DIR ... --title "GRPO settings from one cold start"

Each size runs the main command (`python -m rlvr_fast.train --task multiply`) with the options the README
recommends for it (RUNS below), in its own process, on this machine as it is. The table it appends to
bench/RESULTS.md has: size, options, wall time of the whole command (model load and evaluations
included), the load average before and after (the machine may be shared: wall times scale with it),
and greedy held-out accuracy on the same problems of the target size before training, after the cold
start alone, and after GRPO. Each run's plot is copied to bench/learning/<size>.png, next to RESULTS.md.

--compare tabulates finished runs of the main command instead (e.g. GRPO settings tried from one
cold-start model, `--model OUT/cold-start`): the options in which their config.json differ, the
held-out accuracy at every evaluation, the GRPO steps' summed time and the gain over the first
evaluation (for a run with its own cold start: the evaluation after it). Every figure is read from the runs' own files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import markdown_table, publish, timed  # noqa: E402

PLOTS = Path(__file__).resolve().parent / "learning"

# The README's recommendation per size (its "Multiplication at the blog's sizes" section): a cold start on
# target-size demonstrations, then GRPO without a KL reference; 4x2 scales the cold start to its longer
# demonstrations. Their runs, and GRPO settings compared from one cold start: bench/RESULTS.md, "Learning
# multiplication ...".
COLD_START_RECIPE = ["--no-curriculum", "--cold-start-lr", "1.5e-4", "--cold-start-batch", "8", "--prompts-per-step",
                     "4", "--temperature", "1.0", "--clip-high", "0.28", "--beta", "0", "--lr", "1e-5"]  # 3e-5 undid its gains
RUNS: dict[str, list[str]] = {
    "1x1": [],  # the main command's defaults
    "2x2": ["--digits", "2", "2", *COLD_START_RECIPE, "--cold-start-steps", "100", "--max-new-tokens", "128",
            "--steps", "28", "--eval-every", "14", "--eval-size", "128"],
    "4x2": ["--digits", "4", "2", *COLD_START_RECIPE, "--cold-start-steps", "150", "--max-new-tokens", "200",
            "--steps", "30", "--eval-every", "10", "--eval-size", "128"],
}


def held_out(evals: list[dict]) -> tuple[float | None, float | None, float | None]:
    """Target-size accuracy before training, after the cold start, and at the end."""
    target = [e for e in evals if e["set"] == "target"]
    before = next((e["accuracy"] for e in target if e["step"] == 0 and not e.get("after_cold_start")), None)
    cold = next((e["accuracy"] for e in target if e.get("after_cold_start")), None)
    after = target[-1]["accuracy"] if target and target[-1]["step"] > 0 else None
    return before, cold, after


def run(size: str, extra: list[str]) -> list[str]:
    options = RUNS[size] + extra
    out = Path(tempfile.mkdtemp(prefix=f"bench_learning_{size}_")) / "run"
    cmd = [sys.executable, "-m", "rlvr_fast.train", "--task", "multiply", *options, "--output", str(out)]
    print("running:", " ".join(cmd), flush=True)
    load_before, seconds = os.getloadavg()[0], []
    with timed(seconds):
        proc = subprocess.run(cmd)
    load_after = os.getloadavg()[0]
    if proc.returncode != 0:
        raise SystemExit(f"{size}: the run failed (exit {proc.returncode}); its output is in {out}")
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    before, cold, after = held_out(evals)
    PLOTS.mkdir(exist_ok=True)
    shutil.copy(out / "plot.png", PLOTS / f"{size}.png")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    return [size, "`" + (" ".join(options) or "(defaults)") + "`", f"{seconds[0] / 60:.1f} min",
            f"{load_before:.1f} / {load_after:.1f}", f"{evals[0]['size']}", fmt(before), fmt(cold), fmt(after),
            f"[plot](learning/{size}.png)"]


def non_default(config: dict) -> str:
    from rlvr_fast.grpo.config import TrainConfig
    default = TrainConfig().to_dict()
    return " ".join(f"{k}={v}" for k, v in config.items()
                    if k != "output" and json.dumps(v) != json.dumps(default.get(k), default=list))


def compare(runs: list[Path], title: str) -> None:
    """One row per finished run: the options that differ, held-out accuracy at each evaluation, GRPO time."""
    configs = [json.loads((r / "config.json").read_text()) for r in runs]
    varied = [k for k in configs[0] if k != "output" and len({json.dumps(c.get(k)) for c in configs}) > 1]
    same = {k: v for k, v in configs[0].items() if k not in varied and k != "output"}
    header = ["run", *(f"--{k.replace('_', '-')}" for k in varied), "held-out accuracy by GRPO step", "gain",
              "GRPO steps' time"]
    rows = []
    for run_dir, cfg in zip(runs, configs):
        evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
        evals = [e for e in evals if e["set"] == "target"]
        if any(e.get("after_cold_start") for e in evals):  # a run with its own cold start: GRPO starts from there
            evals = [e for e in evals if e["step"] > 0 or e.get("after_cold_start")]
        metrics = run_dir / "metrics.jsonl"
        steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        trail = ", ".join(f"{e['step']}: {e['accuracy']:.3f}" for e in evals)
        rows.append([run_dir.name, *(str(cfg.get(k)) for k in varied), trail,
                     f"{evals[-1]['accuracy'] - evals[0]['accuracy']:+.3f}",
                     f"{sum(m['step_time_s'] for m in steps) / 60:.1f} min ({len(steps)} steps)"])
    body = (markdown_table(header, rows) + f"\n\nShared by all runs (config.json, where not the default): "
            f"`{non_default(same)}`. Held-out problems per evaluation: {evals[0]['size']} (greedy, the same problems "
            "in every run). A run with fewer steps than --steps was stopped early.")
    source = Path(same.get("model") or "")
    if source.name == "cold-start" and (source.parent / "config.json").exists():  # the run that made the model
        body += f" Their model is the cold start of a run with `{non_default(json.loads((source.parent / 'config.json').read_text()))}`."
    publish(title, body, "cpu", method=f"finished runs of the main command, read from their output directories; "
                                      f"{os.cpu_count()} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="options added to every run (e.g. --steps 10), after the recommended ones")
    parser.add_argument("--compare", nargs="+", type=Path, help="tabulate these finished run directories instead")
    parser.add_argument("--title", default="Learning multiplication: runs compared (bench_learning --compare)")
    args = parser.parse_args()
    if args.compare:
        return compare(args.compare, args.title)
    header = ["size", "options (after `python -m rlvr_fast.train --task multiply`)", "wall time",
              "load avg before / after", "held-out problems", "accuracy before", "after cold start", "after GRPO",
              "plot"]
    for size in args.sizes:  # one section per size: a new run of one size replaces only that size's section
        publish(f"Learning multiplication {size}: held-out accuracy (bench_learning)",
                markdown_table(header, [run(size, args.extra)]), "cpu",
                method=f"one run, wall time of the whole command; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
