"""TrainConfig: every option of a GRPO run, with its default and its command-line help.

The options come in groups, one small dataclass each, in the order a step uses them: the task, the
rollout, the cold start, the policy update, the loss, LoRA, the model and machine, and the run's
evaluation and output. Each group checks its own values. TrainConfig is all of them at once, by
inheritance: its fields stay flat, so one name serves as attribute (`cfg.group_size`), flag
(`--group-size`), config-file key and saved option (config.json), and old runs and files keep working.
A new option goes into its group, with its help and its check; nothing else needs to know of it.

The defaults are sized for the README's main command: the embedded 135M model on a 2-core CPU,
learning the multiply task's answer format and 1-digit products in about ten minutes. For larger
models and harder settings (the blog's --digits 4 2), raise --max-new-tokens and lower --lr.

The command line (`python -m rlvr_fast.train`, rlvr_fast/train.py) is generated from these fields, one
help section per group: a field `max_new_tokens` is the flag `--max-new-tokens`, its `help` metadata the
help text. A TOML or YAML file (`--config`) holds the same names (either spelling); flags given on the
command line override it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from rlvr_fast.grpo.advantages import SCALE_REWARDS
from rlvr_fast.kernels.loss_options import LossConfig, LossOptionError
from rlvr_fast.model.lora import ALL_TARGETS, LoRAConfig

SCHEDULES = ("constant", "cosine", "linear")
METHODS = ("grpo", "sft")
SHARDS = ("none", "fsdp")
REPORTERS = ("tensorboard", "wandb")


def opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


def loss_opt(name: str) -> Any:
    """A field for one of LossConfig's options, with its default, help and choices (defined there, once)."""
    f = LossConfig.__dataclass_fields__[name]
    return field(default=f.default, metadata=f.metadata)


def _require(cfg: Any, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
             checks: tuple[tuple[bool, str], ...] = ()) -> None:
    """Raise ValueError, naming the flag, for the first option out of range."""
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass(kw_only=True)
class TaskOptions:
    """Task: what to train on and how completions are scored (rlvr_fast/tasks/)."""

    task: str = opt("multiply", "task name (multiply, or one registered with rlvr_fast.tasks.register_task)")
    digits: tuple[int, int] = opt((1, 1), "multiply: operand sizes A B of the target (the blog used 4 2)", nargs=2)
    curriculum: bool = opt(True, "multiply: start at 1x1 digits and grow towards --digits as accuracy rises")
    promote_at: float = opt(0.6, "multiply: rolling training accuracy that moves the curriculum up a level")
    demote_after: int = opt(8, "multiply: steps in a row without one right completion at a level that move the "
                               "curriculum back down (0 = never)")
    format_weight: float = opt(0.3, "weight of the format reward (multiply: answer line present, any number; "
                                    "function-pick: graded credit for the choice markers, 0 = the blog's reward)")
    data: str | None = opt(None, "function-pick: a Glaive function-calling v2 JSON file (default: synthetic); "
                                 "jsonl: the JSONL file of prompt/answer lines")
    reward: tuple[str, ...] = opt((), "jsonl: a reward NAME[:WEIGHT] (exact, number, format) or package.module:function"
                                      "[:WEIGHT]; repeat for several (default: exact:1 format:0.1)", repeat=True)
    reward_timeout: float = opt(10.0, "seconds a user reward may take per completion before it scores 0 (counted)")
    reward_workers: int = opt(2, "worker processes that run user rewards")

    def check(self) -> None:
        self.digits = tuple(int(d) for d in self.digits)
        if isinstance(self.reward, str):  # a config file may give one reward as a plain string
            self.reward = (self.reward,)
        self.reward = tuple(self.reward or ())
        _require(self, positive=("reward_workers",), non_negative=("demote_after",),
                 checks=((self.reward_timeout > 0, "--reward-timeout must be > 0 seconds"),))


@dataclass(kw_only=True)
class RolloutOptions:
    """Rollout: how completions are sampled (rlvr_fast/rollout/)."""

    prompts_per_step: int = opt(4, "prompts sampled per step (P)")
    group_size: int = opt(8, "completions per prompt (G)")
    max_new_tokens: int = opt(48, "completion length limit")
    temperature: float = opt(0.8, "sampling temperature for rollouts")
    top_p: float = opt(1.0, "nucleus sampling for rollouts")
    max_oversample: int = opt(3, "dynamic sampling (DAPO): draw up to this many rounds of P prompts per step until P "
                                 "groups have rewards that differ; groups with equal rewards are skipped and "
                                 "counted (1 = plain GRPO, one round)")

    def check(self) -> None:
        _require(self, positive=("prompts_per_step", "group_size", "max_new_tokens", "max_oversample"), checks=(
            (self.group_size >= 2, "--group-size must be >= 2: advantages compare completions within a group"),
            (self.temperature > 0, "--temperature must be > 0 for GRPO rollouts (sampling needs a spread)"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
        ))


@dataclass(kw_only=True)
class ColdStartOptions:
    """Cold start: supervised steps on the task's demonstrations before GRPO (trainer.py: cold_start)."""

    cold_start_steps: int = opt(0, "supervised steps on the task's demonstrations before GRPO (DeepSeek-R1's "
                                   "cold start); the KL reference is the model after them")
    cold_start_lr: float = opt(1e-4, "peak learning rate of the cold-start steps (their own AdamW, no warm-up)")
    cold_start_schedule: str = opt("constant", "learning-rate schedule of the cold-start steps, from --cold-start-lr "
                                               "towards 0 at the last one (cosine or linear), or constant",
                                   choices=SCHEDULES)
    cold_start_batch: int | None = opt(None, "problems demonstrated per cold-start step (default: --prompts-per-step); "
                                             "apart from GRPO's batch, so a cheaper GRPO step keeps its cold start")

    def check(self) -> None:
        _require(self, non_negative=("cold_start_steps",), checks=(
            (self.cold_start_lr > 0 and math.isfinite(self.cold_start_lr), "--cold-start-lr must be a positive number"),
            (self.cold_start_batch is None or self.cold_start_batch >= 1,
             f"--cold-start-batch must be >= 1, got {self.cold_start_batch}"),
        ))


@dataclass(kw_only=True)
class UpdateOptions:
    """Policy update: advantages, optimizer, schedule, micro-batches (trainer.py, batching.py)."""

    steps: int = opt(30, "GRPO optimizer steps (0 = only the cold start and the evaluations)")
    method: str = opt("grpo", "what a step does: grpo (sample, score, update), or sft: one more supervised step on "
                              "the task's demonstrations, as the cold start's but at --lr and its schedule (the "
                              "control a GRPO run is measured against: bench/bench_learning.py --control)",
                      choices=METHODS)
    max_train_minutes: float = opt(0.0, "stop after this many minutes of steps (their summed step time: evaluations "
                                        "and checkpoints excluded), or at --steps, whichever comes first (0 = no limit)")
    lr: float = opt(3e-5, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(2, "linear warm-up steps")
    schedule: str = opt("constant", "learning-rate schedule after warm-up", choices=SCHEDULES)
    max_grad_norm: float = opt(1.0, "gradient clipping (0 = off)")
    scale_rewards: str = opt("none", "advantage scaling: group std, batch std, or none (Dr. GRPO). none by default: "
                                     "dividing by a group's std turns a 0.1 format-credit difference into a full-size "
                                     "advantage when correctness never varies (bench/bench_tasks.py); multiply and "
                                     "function-pick keep their tuned group", choices=SCALE_REWARDS)
    num_iterations: int = opt(1, "policy updates per rollout batch (>1 uses old log-probs and the clip)")
    micro_batch_tokens: int = opt(2048, "token budget of one forward/backward micro-batch")
    share_prompts: bool = opt(True, "train each group's prompt once per micro-batch, its completions attending to "
                                    "that one copy (exact; O(tokens) memory; measured never slower than a prompt "
                                    "copy per completion: bench/bench_shared_prompt.py)")
    grad_checkpoint: bool = opt(False, "recompute each decoder layer's activations in backward")

    def check(self) -> None:
        _require(self, positive=("num_iterations", "micro_batch_tokens"),
                 non_negative=("steps", "warmup_steps", "max_train_minutes"), checks=(
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be a positive number"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
        ))


@dataclass(kw_only=True)
class LossOptions:
    """Loss: its options are defined once, as LossConfig (rlvr_fast/kernels/loss_options.py)."""

    beta: float = loss_opt("beta")
    clip_low: float = loss_opt("clip_low")
    clip_high: float = loss_opt("clip_high")
    loss_type: str = loss_opt("loss_type")
    ratio_level: str = loss_opt("ratio_level")
    delta: float | None = loss_opt("delta")
    tis_cap: float | None = loss_opt("tis_cap")
    entropy_coef: float = loss_opt("entropy_coef")

    def check(self) -> None:
        try:
            LossConfig(**{f.name: getattr(self, f.name) for f in fields(LossOptions)})
        except LossOptionError as e:
            raise ValueError(f"--{e.option.replace('_', '-')} {e.problem}") from None
        if self.entropy_coef < 0:
            raise ValueError("--entropy-coef must be >= 0 (a negative one would reward certainty)")


@dataclass(kw_only=True)
class LoRAOptions:
    """LoRA adapters instead of full fine-tuning (rlvr_fast/model/lora.py)."""

    lora_rank: int = opt(0, "train LoRA adapters of this rank on --lora-targets, base weights frozen; the KL "
                            "reference is the model with adapters off, no copy (0 = full fine-tuning)")
    lora_alpha: float = opt(32.0, "LoRA: the low-rank update is scaled by alpha / rank")
    lora_targets: str = opt(",".join(ALL_TARGETS), "LoRA: decoder projections that get adapters (comma-separated)")
    merge: bool = opt(False, "LoRA: also write the merged model (HF layout) to OUTPUT/merged at the end")

    def check(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if self.lora_rank:
            self.lora()  # checks alpha and targets
        elif self.merge:
            raise ValueError("--merge needs LoRA (--lora-rank R): full fine-tuning checkpoints are already merged models")

    def lora(self) -> LoRAConfig | None:
        """The LoRA settings, or None for full fine-tuning."""
        if not self.lora_rank:
            return None
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=LoRAConfig.parse_targets(self.lora_targets))


@dataclass(kw_only=True)
class MachineOptions:
    """Model, precision, device and processes."""

    model: str | None = opt(None, "HF-layout Llama directory; default: the embedded SmolLM2-135M-Instruct")
    dtype: str = opt("auto", "weights dtype: auto (bf16 on GPU and on CPUs with AMX/AVX512-BF16, else fp32), "
                     "float32, bfloat16 (bf16 trains fp32 master weights)", choices=("auto", "float32", "bfloat16"))
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    seed: int = opt(0, "seed for data, sampling and initialisation")
    shard: str = opt("none", "with torchrun: none (every rank holds the whole model, data parallel) or fsdp "
                     "(FSDP2 shards parameters, gradients and optimizer states)", choices=SHARDS)
    dist_timeout: int = opt(300, "with torchrun: seconds a collective waits for the other ranks before the run stops")

    def check(self) -> None:
        _require(self, positive=("dist_timeout",))


@dataclass(kw_only=True)
class RunOptions:
    """Evaluation, output, checkpoints and faults."""

    eval_every: int = opt(10, "evaluate every N steps (0 = only before and after)")
    eval_size: int = opt(32, "held-out problems per evaluation")
    save_every: int = opt(20, "checkpoint every N steps (0 = only at the end)")
    sample_every: int = opt(5, "write a few completions to samples.jsonl every N steps")
    output: str = opt("runs/multiply", "output directory (metrics, samples, checkpoints, plot)")
    resume: str | None = opt(None, "continue a run: its output directory (the newest checkpoint that verifies) or "
                                   "one checkpoint-STEP directory (that one or an error)")
    resume_fallback: bool = opt(True, "--resume RUN: when the newest checkpoint is damaged, resume from the newest "
                                      "one that verifies, saying what was skipped (--no-resume-fallback: stop instead)")
    strict_rewards: bool = opt(False, "stop when a reward function raises (default: score 0 and count it)")
    max_bad_steps: int = opt(3, "stop after this many consecutive steps with NaN/Inf loss or gradients")
    keep_best: bool = opt(True, "keep the model of the best held-out accuracy in OUTPUT/best; OUTPUT/best.json says "
                                "which step (or names the starting model when no step beat it)")
    stop_on: tuple[str, ...] = opt((), "end the run (final evaluation and checkpoint, exit code 3) when this warning "
                                       "is raised: collapse, hacking, repetition, no-signal, or any; repeat for several "
                                       "(the warnings are printed either way: rlvr_fast/grpo/safeguards.py)", repeat=True)
    no_signal_steps: int = opt(5, "the no-signal warning: this many steps in a row with no group whose rewards differ")
    report_to: tuple[str, ...] = opt((), "also log metrics to tensorboard (OUTPUT/tensorboard) or wandb; repeat for "
                                         "both (metrics.jsonl is always written)", repeat=True)

    def check(self) -> None:
        _require(self, positive=("eval_size", "max_bad_steps", "no_signal_steps"),
                 non_negative=("eval_every", "save_every", "sample_every"))
        from rlvr_fast.grpo.safeguards import WARNINGS
        self.stop_on, self.report_to = _as_tuple(self.stop_on), _as_tuple(self.report_to)
        unknown = [w for w in self.stop_on if w not in (*WARNINGS, "any")]
        if unknown:
            raise ValueError(f"--stop-on takes {', '.join(WARNINGS)} or any, got {', '.join(map(repr, unknown))}")
        unknown = [r for r in self.report_to if r not in REPORTERS]
        if unknown:
            raise ValueError(f"--report-to takes {' or '.join(REPORTERS)}, got {', '.join(map(repr, unknown))}")
        from rlvr_fast.grpo.report import check_reporters
        check_reporters(self.report_to)


def _as_tuple(value: Any) -> tuple:
    """A repeatable option's value: one string (from a config file) or a sequence, as a tuple."""
    return (value,) if isinstance(value, str) else tuple(value or ())


# In the order of --help. A dataclass lists inherited fields from the last base to the first, hence reversed below
# (tests/test_config.py checks that the two orders agree).
GROUPS = (TaskOptions, RolloutOptions, ColdStartOptions, UpdateOptions, LossOptions, LoRAOptions, MachineOptions,
          RunOptions)


@dataclass(kw_only=True)
class TrainConfig(RunOptions, MachineOptions, LoRAOptions, LossOptions, UpdateOptions, ColdStartOptions,
                  RolloutOptions, TaskOptions):
    """Every option of a run: the groups above, flattened."""

    def __post_init__(self) -> None:
        for group in GROUPS:
            group.check(self)
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}, "
                                 f"got {getattr(self, f.name)!r}")
        # Checks across groups.
        if self.lora_rank and self.cold_start_steps and self.beta > 0:
            raise ValueError("--cold-start-steps with --lora-rank and --beta > 0: the KL reference of LoRA is the base "
                             "model with its adapters off, which would pull the run back from what the cold start "
                             "taught; use --beta 0 or full fine-tuning")

    def loss(self) -> LossConfig:
        """The loss's options, as the loss kernels take them (dr_grpo's length: --max-new-tokens)."""
        options = {f.name: getattr(self, f.name) for f in fields(LossOptions)}
        return LossConfig(**options, max_completion_len=self.max_new_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


assert {f.name for f in fields(LossOptions)} == {f.name for f in fields(LossConfig)} - {"max_completion_len"}, \
    "LossOptions must declare every LossConfig option"
