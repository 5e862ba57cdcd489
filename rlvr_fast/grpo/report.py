"""What the user sees: a progress line per step, metrics.jsonl (the record), samples.jsonl, plot.png
(matplotlib), and with --report-to the same metrics in TensorBoard or wandb."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonlWriter:
    """One JSON record per line. enabled=False (ranks other than 0): writes nothing, reads nothing."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.enabled or not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """On resume, drop records the killed run wrote after its last checkpoint."""
        if self.enabled and self.path.is_file():
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.read() if r.get("step", 0) <= step))


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(m: dict[str, Any], total_steps: int, eta_s: float) -> str:
    if m.get("method") == "sft":  # a supervised step (--method sft): no rollout
        return (f"step {m['step']:>4}/{total_steps} | supervised | nll {m['nll']:.3f} | grad norm {m['grad_norm']:.2f} | "
                f"{m['tokens']} tokens | {m['step_time_s']:.1f}s/step | eta {format_duration(eta_s)}")
    # None: every group had equal rewards, no update
    kl = "-" if m["kl"] is None else f"{m['kl']:.4f}"
    ent = "-" if m.get("entropy") is None else f"{m['entropy']:.2f}"
    groups = f"groups {m['groups_kept']}/{m['groups_drawn']}" if "groups_kept" in m else ""
    return (f"step {m['step']:>4}/{total_steps} | reward {m['reward_mean']:.3f} | acc {m['accuracy']:.3f} | "
            f"fmt {m['format_rate']:.2f} | len {m['completion_len_mean']:.0f} | {groups} | ent {ent} | kl {kl} | "
            f"{m['rollout_tokens_per_s']:.0f} tok/s | {m['step_time_s']:.1f}s/step | eta {format_duration(eta_s)}")


PANELS = (
    # (y label, [(metric key, legend label)], y limits or None)
    ("fraction (0-1); reward", [("reward_mean", "reward (train, mean)"), ("accuracy", "accuracy (train samples)"),
                        ("format_rate", "format (train samples)"), ("signal_frac", "groups with signal")], (-0.03, 1.05)),
    ("nats/token", [("entropy", "policy entropy\n(trained tokens)"), ("nll", "supervised NLL\n(--method sft)")], None),
    ("KL (nats/token)", [("kl", "KL to reference")], None),
    ("tokens", [("completion_len_mean", "completion length\n(mean)")], None),
)


def write_plot(path: Path, metrics: list[dict[str, Any]], evals: list[dict[str, Any]], title: str = "GRPO run") -> None:
    """The run on one page: training curves per step and held-out accuracy at each evaluation (step 0: before
    training, and a star for the model after the cold start)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 9), dpi=72, layout="constrained")
    axes = fig.subplots(len(PANELS), 1, sharex=True, height_ratios=[2.2, 1, 1, 1])
    fig.suptitle(title)
    for ax, (ylabel, series, ylim) in zip(axes, PANELS):
        for key, label in series:
            pts = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, linewidth=1.2)
        if not ax.lines:  # e.g. KL with --beta 0: say so rather than draw a flat 0
            ax.text(0.5, 0.5, "not measured in this run", transform=ax.transAxes, ha="center", va="center")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ylim:  # fractions fill [0, 1]; a weighted reward may pass 1 (e.g. correct + format credit)
            ax.set_ylim(ylim[0], max(ylim[1], ax.get_ylim()[1]))
    before = [e for e in evals if e["step"] == 0 and not e.get("after_cold_start")][:1]
    cold = [e for e in evals if e.get("after_cold_start")]
    # the GRPO curve starts from the model GRPO started with: the cold start's, or the initial one
    later = (cold[-1:] or before) + [e for e in evals if e["step"] > 0]
    size = f"{evals[0]['size']} problems, greedy" if evals else ""
    if before:
        axes[0].plot([0], [before[0]["accuracy"]], "o", color="black", fillstyle="none", markersize=8,
                     label=f"held-out accuracy before\n({size})")
    if cold:
        axes[0].plot([0], [cold[-1]["accuracy"]], "*", color="red", markersize=13, label="held-out accuracy after\nthe cold start")
    if later:
        axes[0].plot([e["step"] for e in later], [e["accuracy"] for e in later], "o-", color="black",
                     label="held-out accuracy\nduring the steps")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1].set_xlabel("step (optimizer updates)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)


class Reporters:
    """--report-to: the step metrics and evaluations also go to TensorBoard (OUTPUT/tensorboard) and/or wandb.
    metrics.jsonl stays the record; these are views of it."""

    def __init__(self, names: tuple[str, ...], output: Path, config: dict[str, Any]):
        check_reporters(names)
        self.tb = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(output / "tensorboard"))
        if "wandb" in names:
            import wandb
            self.wandb = wandb.init(project="rlvr_fast", dir=str(output), config=config)

    def log(self, values: dict[str, Any], step: int, prefix: str = "") -> None:
        scalars = {prefix + k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def check_reporters(names: tuple[str, ...]) -> None:
    """A clear error before any work when a --report-to package is missing."""
    import importlib.util
    need = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in names:
        if importlib.util.find_spec(need[name]) is None:
            raise ValueError(f"--report-to {name} needs the {need[name]} package, which is not installed: "
                             f"pip install {need[name]} (or drop --report-to {name}; metrics.jsonl has every metric)")
