"""Learning benchmark: does GRPO on the embedded model learn the blog's multiplication, and how fast?

    python bench/bench_learning.py                     # 1x1, 2x2 and 4x2, one after another
    python bench/bench_learning.py --sizes 1x1 2x2     # some of them
    python bench/bench_learning.py --sizes 2x2 --extra --steps 10   # options added to every run
    python bench/bench_learning.py --compare RUN_DIR RUN_DIR ... --title "GRPO settings from one cold start"
    python bench/bench_learning.py --sizes 4x2 --control --seeds 0 1 2   # GRPO against supervised steps

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

--control answers whether GRPO does the learning, or whether training the cold start longer would do as well. Per
seed it runs the recipe, then the control: the same cold-start model (`--model RUN/cold-start`) continued with
supervised steps on the same demonstrations at the cold start's learning rate (`--method sft`) until their summed
step time equals that of the recipe's GRPO steps (`--max-train-minutes`), evaluated on the same held-out problems
about as often. The table gives each seed's figures and their mean with its standard error over seeds; the plot
(bench/learning/<size>-control.png) has held-out accuracy against training minutes after the cold start for both,
and GRPO's sampled training accuracy and entropy per step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import markdown_table, publish, read_jsonl, timed  # noqa: E402

PLOTS = Path(__file__).resolve().parent / "learning"

# The README's recommendation per size (its "Multiplication at the blog's sizes" section): a cold start on
# target-size demonstrations, then GRPO without a KL reference; 4x2 scales the cold start to its longer
# demonstrations. Their runs, and GRPO settings compared from one cold start: bench/RESULTS.md, "Learning
# multiplication ...".
COLD_START_RECIPE = ["--no-curriculum", "--cold-start-lr", "1.5e-4", "--cold-start-schedule", "cosine",
                     "--cold-start-batch", "8", "--prompts-per-step",
                     "4", "--temperature", "1.0", "--clip-high", "0.28", "--beta", "0", "--lr", "1e-6"]
# GRPO's lr: after a constant-lr cold start 1e-5 added +0.1 and 3e-5 undid it; after the decayed one 1e-5 lost
# 0.18 at 4x2 in 5 steps, 3e-6 a little, 1e-6 held it (docs/multiply-history.md).
RUNS: dict[str, list[str]] = {
    "1x1": [],  # the main command's defaults
    "2x2": ["--digits", "2", "2", *COLD_START_RECIPE, "--cold-start-steps", "150", "--max-new-tokens", "128",
            "--steps", "14", "--eval-every", "7", "--eval-size", "128"],
    "4x2": ["--digits", "4", "2", *COLD_START_RECIPE, "--cold-start-steps", "210", "--max-new-tokens", "200",
            "--steps", "10", "--eval-every", "5", "--eval-size", "128"],
}


def held_out(evals: list[dict]) -> tuple[float | None, float | None, float | None]:
    """Target-size accuracy before training, after the cold start, and at the end."""
    target = [e for e in evals if e["set"] == "target"]
    before = next((e["accuracy"] for e in target if e["step"] == 0 and not e.get("after_cold_start")), None)
    cold = next((e["accuracy"] for e in target if e.get("after_cold_start")), None)
    after = target[-1]["accuracy"] if target and target[-1]["step"] > 0 else None
    return before, cold, after


def train(options: list[str], out: Path) -> tuple[float, float, float]:
    """Run the main command with these options into `out`: (wall seconds, load average before, after)."""
    # --save-every 0: a bench run needs only its final checkpoint (written always); the options still win.
    cmd = [sys.executable, "-m", "rlvr_fast.train", "--task", "multiply", "--save-every", "0", *options,
           "--output", str(out)]
    print("running:", " ".join(cmd), flush=True)
    load_before, seconds = os.getloadavg()[0], []
    with timed(seconds):
        proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"the run failed (exit {proc.returncode}); its output is in {out}")
    return seconds[0], load_before, os.getloadavg()[0]


def run(size: str, extra: list[str]) -> list[str]:
    options = RUNS[size] + extra
    out = Path(tempfile.mkdtemp(prefix=f"bench_learning_{size}_")) / "run"
    wall, load_before, load_after = train(options, out)
    evals = read_jsonl(out / "eval.jsonl")
    before, cold, after = held_out(evals)
    PLOTS.mkdir(exist_ok=True)
    shutil.copy(out / "plot.png", PLOTS / f"{size}.png")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    return [size, "`" + (" ".join(options) or "(defaults)") + "`", f"{wall / 60:.1f} min",
            f"{load_before:.1f} / {load_after:.1f}", f"{evals[0]['size']}", fmt(before), fmt(cold), fmt(after),
            f"[plot](learning/{size}.png)"]


def config_options(config: dict) -> list[str]:
    """A run's config.json as the command-line options that give it (every one, since a task may suggest defaults
    of its own for options not given; not --output or --resume)."""
    from dataclasses import fields

    from rlvr_fast.grpo.config import TrainConfig
    default = TrainConfig().to_dict()
    options = []
    for f in fields(TrainConfig):
        value = config.get(f.name, default[f.name])
        if f.name in ("output", "resume"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            options.append(flag if value else "--no-" + flag[2:])
        elif f.metadata.get("repeat"):
            options += [x for v in value for x in (flag, str(v))]
        elif isinstance(value, (list, tuple)):
            options += [flag, *map(str, value)]
        elif value is not None:
            options += [flag, str(value)]
    return options


def parent_run(run: Path) -> Path | None:
    """The run that wrote this run's --model (OTHER/cold-start or OTHER/checkpoint-N), if it is a run directory."""
    model = json.loads((run / "config.json").read_text()).get("model")
    parent = Path(model).parent if model else None
    return parent if parent is not None and (parent / "config.json").exists() else None


def supervised_source(run: Path) -> tuple[float, int, float, str]:
    """The supervised steps the model of this run's GRPO steps came from, to continue as its control: (learning
    rate, problems per step, mean seconds per step, lr schedule). Its own cold start; else the run that wrote its
    --model: a cold start (OTHER/cold-start) or a --method sft run (OTHER/checkpoint-N)."""
    for source in (run, parent_run(run)):
        if source is None:
            continue
        config = json.loads((source / "config.json").read_text())
        batch = config["cold_start_batch"] or config["prompts_per_step"]
        cold = read_jsonl(source / "cold_start.jsonl")
        if cold and (source == run or Path(config.get("model") or "").name != "cold-start"):
            return (config["cold_start_lr"], batch, sum(m["step_time_s"] for m in cold) / len(cold),
                    config.get("cold_start_schedule", "constant"))
        steps = read_jsonl(source / "metrics.jsonl")
        if source != run and config.get("method") == "sft" and steps:
            return config["lr"], batch, sum(m["step_time_s"] for m in steps) / len(steps), config["schedule"]
    raise SystemExit(f"{run}: a control needs a GRPO run that started from supervised steps: its own cold start, "
                     "or --model OTHER/cold-start or OTHER/checkpoint-N of a --method sft run")


def first_model_accuracy(run: Path) -> float:
    """Held-out accuracy of the model the chain of runs started from (following --model back to the first run)."""
    seen = [run]
    while (parent := parent_run(seen[-1])) is not None and parent not in seen:
        seen.append(parent)
    return [e for e in read_jsonl(seen[-1] / "eval.jsonl") if e["set"] == "target"][0]["accuracy"]


CONTROL_WARMUP = 10
"""The control's optimizer starts fresh (the cold start's is not kept); without a warm-up its first AdamW steps move
every weight by the full learning rate and undo part of the cold start (measured: the NLL went 0.03 -> 0.21)."""


def control_options(grpo_run: Path) -> list[str]:
    """The control of a finished GRPO run (its own cold start, or one from a cold-start model): the model its GRPO
    steps started from, continued with supervised steps on the same demonstrations at the cold start's learning
    rate and batch, for the summed time of the GRPO steps, evaluated about as often (in minutes) as GRPO was.
    A cold start that decayed its lr (--cold-start-schedule) is continued the same way, warm-up and decay again
    over the steps that fit GRPO's time: restarting at the peak with no decay would end the control on a
    high-lr model, a weaker control than the recipe that made GRPO's start."""
    config = json.loads((grpo_run / "config.json").read_text())
    steps = read_jsonl(grpo_run / "metrics.jsonl")
    if not steps or config.get("method") == "sft":
        raise SystemExit(f"{grpo_run}: a control needs a finished GRPO run (its metrics.jsonl has no GRPO step)")
    lr, batch, sft_step_s, schedule = supervised_source(grpo_run)
    grpo_minutes = sum(m["step_time_s"] for m in steps) / 60
    # A decaying schedule needs its length in steps: as many as fit GRPO's time at the source's step time.
    sft_steps = 1_000_000 if schedule == "constant" else max(CONTROL_WARMUP + 1, round(60 * grpo_minutes / sft_step_s))
    grpo_eval_every = config["eval_every"] or len(steps)
    eval_every = max(1, round(grpo_eval_every * (60 * grpo_minutes / len(steps)) / sft_step_s))
    model = grpo_run / "cold-start" if read_jsonl(grpo_run / "cold_start.jsonl") else Path(config["model"])
    # Later options win: the run's task, sizes, seed and evaluation stay; its GRPO settings do not apply.
    return [*config_options(config), "--model", str(model), "--cold-start-steps", "0", "--method", "sft",
            "--lr", str(lr), "--cold-start-batch", str(batch),
            "--warmup-steps", str(CONTROL_WARMUP), "--schedule", schedule, "--steps", str(sft_steps),
            "--max-train-minutes", f"{grpo_minutes:.4f}", "--eval-every", str(eval_every), "--save-every", "0"]


def curve(run_dir: Path) -> list[tuple[float, float]]:
    """(training minutes, held-out accuracy) from the model the steps started with to the end."""
    evals = [e for e in read_jsonl(run_dir / "eval.jsonl") if e["set"] == "target"]
    cold = [e for e in evals if e.get("after_cold_start")]
    start = cold[-1:] or evals[:1]  # a recipe run: after its cold start; a control run: its model as loaded
    return [(e.get("train_seconds", 0.0) / 60, e["accuracy"]) for e in start + [e for e in evals if e["step"] > 0]]


def mean_gap(grpo: list[tuple[float, float]], control: list[tuple[float, float]]) -> float:
    """GRPO - control averaged over GRPO's evaluations after its start, the control's accuracy interpolated
    linearly between its own evaluations at the same minutes of steps: what a run stopped at one of those times
    would have gained, rather than at the one end time only."""
    xs, ys = zip(*control)
    return statistics.mean(acc - float(np.interp(t, xs, ys)) for t, acc in grpo[1:])


def mean_se(xs: list[float]) -> str:
    """Mean ± standard error of the mean (sample standard deviation / sqrt(n))."""
    if len(xs) < 2:
        return f"{xs[0]:.3f}" if xs else "-"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) / math.sqrt(len(xs)):.3f}"


def control_table(size: str, pairs: list[tuple[int, Path, Path, float]]) -> str:
    """One row per seed (recipe run, control run, the recipe command's wall seconds) and their means."""
    header = ["run", "first model", "GRPO's start", "GRPO (end)", "supervised control (end)", "GRPO - control",
              "GRPO - control, mean over GRPO's evaluations", "GRPO - cold start", "GRPO steps, their time", "control steps, their time", "recipe command wall time"]
    rows, cols = [], {k: [] for k in ("before", "cold", "grpo", "sft", "diff", "gap", "gain")}
    for seed, grpo_run, sft_run, wall in pairs:
        before = first_model_accuracy(grpo_run)
        grpo_curve = curve(grpo_run)
        sft_curve = curve(sft_run)
        cold, grpo, sft = grpo_curve[0][1], grpo_curve[-1][1], sft_curve[-1][1]
        gap = mean_gap(grpo_curve, sft_curve)
        g_steps, s_steps = read_jsonl(grpo_run / "metrics.jsonl"), read_jsonl(sft_run / "metrics.jsonl")
        vals = {"before": before, "cold": cold, "grpo": grpo, "sft": sft, "diff": grpo - sft, "gap": gap,
                "gain": grpo - cold}
        for k, v in vals.items():
            cols[k].append(v)
        rows.append([str(seed), f"{before:.3f}", f"{cold:.3f}", f"{grpo:.3f}", f"{sft:.3f}", f"{grpo - sft:+.3f}",
                     f"{gap:+.3f}", f"{grpo - cold:+.3f}", f"{len(g_steps)}, {sum(m['step_time_s'] for m in g_steps) / 60:.1f} min",
                     f"{len(s_steps)}, {sum(m['step_time_s'] for m in s_steps) / 60:.1f} min",
                     f"{wall / 60:.1f} min" if wall else "-"])
    if len(pairs) > 1:
        rows.append([f"mean ± s.e. ({len(pairs)} runs)", *(mean_se(cols[k]) for k in cols), "", "", ""])
    evals = read_jsonl(pairs[0][1] / "eval.jsonl")
    options = json.loads((pairs[0][2] / "config.json").read_text())
    grpo_options = non_default(json.loads((pairs[0][1] / "config.json").read_text()))
    return (markdown_table(header, rows) + f"\n\nHeld-out problems: {evals[0]['size']} per evaluation (greedy, the same "
            f"problems in every run). First model: the model the chain of runs started from (before any cold start). The "
            f"control continues the model each GRPO run started from with supervised steps on the task's demonstrations "
            f"(`--method sft`, lr {options['lr']:g}, {options['cold_start_batch']} problems per step, {CONTROL_WARMUP} "
            f"warm-up steps) until their summed step time reaches that of the GRPO steps. The first GRPO run's options (config.json, where not the default): "
            f"`{grpo_options}`. [plot](learning/{size}-control.png)")


def control_plot(size: str, pairs: list[tuple[int, Path, Path, float]], path: Path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 8), dpi=72, layout="constrained")
    held, sampled, entropy = fig.subplots(3, 1, sharex=True, height_ratios=[2, 1, 1])
    fig.suptitle(f"{size}: GRPO against supervised steps of the same time from the same start\n(solid: GRPO; "
                 f"dashed: supervised control)")
    for i, (seed, grpo_run, sft_run, _) in enumerate(pairs):
        color = f"C{i}"
        for run_dir, style, name in ((grpo_run, "o-", "GRPO"), (sft_run, "s--", "supervised control")):
            xs, ys = zip(*curve(run_dir))
            held.plot(xs, ys, style, color=color, label=f"{name}, {seed}")
        steps = read_jsonl(grpo_run / "metrics.jsonl")
        minutes = [s / 60 for s in itertools.accumulate(m["step_time_s"] for m in steps)]
        sampled.plot(minutes, [m["accuracy"] for m in steps], color=color, label=str(seed))
        entropy.plot(minutes, [m["entropy"] if m.get("entropy") is not None else float("nan") for m in steps],
                     color=color, label=str(seed))
    held.set_ylabel("held-out accuracy (greedy)")
    sampled.set_ylabel("GRPO: sampled\ntraining accuracy")
    entropy.set_ylabel("GRPO: entropy\n(nats/token)")
    entropy.set_xlabel("minutes of training steps after the cold start (evaluations excluded)")
    for ax in (held, sampled, entropy):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path)


def finished_run(out: Path, options: list[str]) -> bool:
    """Whether `out` holds a finished run of these options (OUTPUT/latest is written after the final checkpoint),
    so a stopped `--control --keep DIR` resumes where it stopped. A finished run of other options is refused
    rather than tabulated as this recipe's."""
    if not (out / "latest").is_file():
        return False
    from rlvr_fast.train import parse_config
    ours = {**parse_config(["--task", "multiply", *options, "--output", str(out)]).to_dict(), "save_every": None}
    theirs = {**json.loads((out / "config.json").read_text()), "output": str(out), "save_every": None}
    if json.dumps(ours, sort_keys=True) != json.dumps(theirs, sort_keys=True):
        differ = sorted(k for k in ours if json.dumps(ours[k]) != json.dumps(theirs.get(k)))
        raise SystemExit(f"{out} holds a finished run of other options ({', '.join(differ)}): move it away or "
                         "give another --keep directory")
    print(f"{out}: finished earlier, not run again", flush=True)
    return True


def train_once(options: list[str], out: Path) -> float | None:
    """`train` unless `out` already holds this finished run; the run's wall seconds (kept in OUTPUT/bench.json,
    None for a run adopted without one)."""
    record = out / "bench.json"
    if finished_run(out, options):
        return json.loads(record.read_text())["seconds"] if record.is_file() else None
    wall = train(options, out)[0]
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"seconds": wall}))
    return wall


def run_control(size: str, extra: list[str], seeds: list[int], keep: Path | None) -> None:
    root = keep or Path(tempfile.mkdtemp(prefix=f"bench_learning_{size}_control_"))
    pairs = []
    for seed in seeds:
        options = RUNS[size] + extra + ["--seed", str(seed)]
        grpo_run, sft_run = root / f"{size}-seed{seed}-grpo", root / f"{size}-seed{seed}-control"
        wall = train_once(options, grpo_run)
        train_once(control_options(grpo_run), sft_run)
        pairs.append((f"seed {seed}", grpo_run, sft_run, wall))
    publish_control(size, pairs, f"per seed: the recipe (`{' '.join(RUNS[size] + extra)}`), then its control; "
                                 f"runs kept in {root}")


def run_control_of(name: str, runs: list[Path], title: str) -> None:
    """The control of GRPO runs already finished (e.g. settings tried from one cold-start model)."""
    pairs = []
    for grpo_run in runs:
        sft_run = grpo_run.with_name(grpo_run.name + "-control")
        # Finished earlier: a control saves only its final checkpoint (--save-every 0), so OUTPUT/latest exists only
        # then, and it stays when the checkpoint itself is deleted to free the disk.
        if (sft_run / "latest").is_file():
            print(f"{sft_run}: finished earlier, not run again")
        else:
            train(control_options(grpo_run), sft_run)
        pairs.append((grpo_run.name, grpo_run, sft_run, None))  # no recipe command: no wall time of one
    publish_control(name, pairs, f"the control of each finished GRPO run, beside it (RUN-control)", title)


def publish_control(name: str, pairs: list, method: str, title: str | None = None) -> None:
    control_plot(name, pairs, PLOTS / f"{name}-control.png")
    title = title or f"Learning multiplication {name}: GRPO against supervised steps of the same time (bench_learning --control)"
    publish(title, control_table(name, pairs), "cpu", method=f"{method}; {os.cpu_count()} cores")


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
    parser.add_argument("--control", action="store_true",
                        help="per seed, the recipe and its supervised control of the same time (see above)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="--control: the seeds to run")
    parser.add_argument("--keep", type=Path, help="--control: keep the runs in this directory (default: a temporary one)")
    parser.add_argument("--control-of", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run the control of these finished GRPO runs (each beside it, RUN_DIR-control) and "
                             "tabulate the pairs; --name names the plot (bench/learning/NAME-control.png)")
    parser.add_argument("--name", default="runs", help="--control-of: the plot's name")
    args = parser.parse_args()
    if args.compare:
        return compare(args.compare, args.title)
    if args.control_of:
        title = None if args.title == parser.get_default("title") else args.title
        return run_control_of(args.name, args.control_of, title)
    if args.control:
        for size in args.sizes:
            run_control(size, args.extra, args.seeds, args.keep)
        return
    header = ["size", "options (after `python -m rlvr_fast.train --task multiply`)", "wall time",
              "load avg before / after", "held-out problems", "accuracy before", "after cold start", "after GRPO",
              "plot"]
    for size in args.sizes:  # one section per size: a new run of one size replaces only that size's section
        publish(f"Learning multiplication {size}: held-out accuracy (bench_learning)",
                markdown_table(header, [run(size, args.extra)]), "cpu",
                method=f"one run, wall time of the whole command; {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
