"""The GRPO loss's options (`LossConfig`: values, defaults, checks) and statistic names, defined once.

The loss functions (grpo_loss.py, fused_linear_grpo_loss.py) and their PyTorch references take a
`LossConfig`, or its fields as keyword arguments; the trainer's TrainConfig declares the same fields
as command-line flags (same defaults, help and choices) and builds one with `TrainConfig.loss()`.
Standard library only: the kernels stay torch-only and the reference plain PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from numbers import Real
from typing import Any

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # how per-token losses are aggregated (grpo_loss.py docstring)
RATIO_LEVELS = ("token", "sequence")  # sequence: GSPO, one importance ratio per completion

# The statistics a loss call returns besides "loss": means over the real tokens.
STAT_NAMES = ("kl", "ratio", "clip_low_frac", "clip_high_frac")  # always
TIS_STAT_NAMES = ("tis_weight_mean", "tis_capped_frac")  # with rollout_logprobs (truncated importance sampling)
ENTROPY_STAT = "entropy"  # fused_linear_grpo_loss, with entropy_coef != 0 or return_entropy
ALL_STAT_NAMES = STAT_NAMES + TIS_STAT_NAMES + (ENTROPY_STAT,)


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


class LossOptionError(ValueError):
    """A LossConfig value out of range; `option` names the field (the command line turns it into its flag)."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem


@dataclass(frozen=True, slots=True, kw_only=True)
class LossConfig:
    """The GRPO objective's options (grpo_loss.py's docstring has the math), checked when built."""
    loss_type: str = _opt("grpo", "loss aggregation over tokens: grpo (mean per completion, then over completions), "
                          "bnpo (mean over a micro-batch's tokens), dr_grpo (token sum / (completions x "
                          "max_completion_len; the trainer's --max-new-tokens)), dapo (token sum / all completion "
                          "tokens of the step: num_tokens)", choices=LOSS_TYPES)
    clip_low: float = _opt(0.2, "PPO clip: ratio lower bound 1 - clip_low")
    clip_high: float = _opt(0.2, "PPO clip: ratio upper bound 1 + clip_high (DAPO raises it)")
    beta: float = _opt(0.04, "KL penalty weight towards the frozen reference (0 = no reference model)")
    ratio_level: str = _opt("token", "importance ratio per token (GRPO) or per completion (sequence: GSPO, the exp "
                            "of the completion's mean log-ratio)", choices=RATIO_LEVELS)
    delta: float | None = _opt(None, "dual clip: the unclipped ratio term is capped at delta (> 1 + clip_high)")
    tis_cap: float | None = _opt(None, "truncated importance sampling: weight each token's loss by min(exp(trainer - "
                                 "rollout log-prob), tis_cap), correcting the sampler/trainer gap")
    entropy_coef: float = _opt(0.0, "entropy bonus: subtract this times the completion tokens' entropy, averaged "
                               "with the loss_type's token weights (fused_linear_grpo_loss only)")
    max_completion_len: int | None = _opt(None, "dr_grpo's L, the completion length limit (None: T)")

    def __post_init__(self) -> None:
        for name in ("clip_low", "clip_high", "beta", "delta", "tis_cap", "entropy_coef"):
            value = getattr(self, name)
            if value is not None or name not in ("delta", "tis_cap"):  # None turns delta and tis_cap off
                if isinstance(value, bool) or not isinstance(value, Real):  # e.g. a tensor: a host sync per call
                    raise LossOptionError(name, f"must be a Python float, got {value!r}")
                object.__setattr__(self, name, float(value))  # one Triton specialization (ints get their own)
        n = self.max_completion_len
        checks = (
            ("loss_type", self.loss_type in LOSS_TYPES, f"must be one of {LOSS_TYPES}, got {self.loss_type!r}"),
            ("ratio_level", self.ratio_level in RATIO_LEVELS,
             f"must be one of {RATIO_LEVELS}, got {self.ratio_level!r}"),
            ("clip_low", 0.0 <= self.clip_low < 1.0, f"must be in [0, 1), got {self.clip_low!r}"),
            ("clip_high", self.clip_high >= 0.0, f"must be >= 0, got {self.clip_high!r}"),
            ("beta", 0.0 <= self.beta < math.inf, f"must be >= 0, got {self.beta!r}"),
            ("delta", self.delta is None or self.delta > 1.0 + self.clip_high,
             f"(dual clip) must be a float > 1 + clip_high = {1.0 + self.clip_high}, got {self.delta!r}"),
            ("tis_cap", self.tis_cap is None or self.tis_cap > 0.0,
             f"must be a positive float (e.g. 2.0) or None, got {self.tis_cap!r}"),
            ("entropy_coef", math.isfinite(self.entropy_coef), f"must be finite, got {self.entropy_coef!r}"),
            ("max_completion_len", n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 1),
             f"must be a positive int or None, got {n!r}"),
        )
        for name, ok, problem in checks:
            if not ok:
                raise LossOptionError(name, problem)

    @property
    def sequence(self) -> bool:
        """GSPO: one importance ratio per completion."""
        return self.ratio_level == "sequence"


OPTION_NAMES = tuple(f.name for f in fields(LossConfig))


def loss_config(op: str, config: LossConfig | None, options: dict[str, Any]) -> LossConfig:
    """`config` (default: LossConfig()) with `options`, LossConfig fields given as keyword arguments, replacing
    its values: how the loss functions read their options. Errors name `op`."""
    if config is not None and not isinstance(config, LossConfig):
        raise TypeError(f"{op}: config must be a LossConfig, got {type(config).__name__}")
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"{op}: unknown option(s) {', '.join(unknown)}; the loss options are {', '.join(OPTION_NAMES)}")
    try:
        return replace(config or LossConfig(), **options)
    except LossOptionError as e:
        raise ValueError(f"{op}: {e}") from None
