"""The GRPO loss's option values, defaults and statistic names, defined once.

Imported by the kernels (grpo_loss.py, fused_linear_grpo_loss.py), their PyTorch reference
(reference.py) and the trainer (rlvr_fast/grpo/config.py, trainer.py). Nothing else here: this
module imports nothing, so the reference stays plain PyTorch.
"""

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # how per-token losses are aggregated (grpo_loss.py docstring)
RATIO_LEVELS = ("token", "sequence")  # sequence: GSPO, one importance ratio per completion

# Defaults of the kernels' keyword arguments and of the trainer's options (--clip-low, --clip-high, --beta, ...).
DEFAULT_CLIP_LOW = 0.2
DEFAULT_CLIP_HIGH = 0.2
DEFAULT_BETA = 0.04
DEFAULT_LOSS_TYPE = "grpo"
DEFAULT_RATIO_LEVEL = "token"

# The statistics a loss call returns besides "loss": means over the real tokens.
STAT_NAMES = ("kl", "ratio", "clip_low_frac", "clip_high_frac")  # always
TIS_STAT_NAMES = ("tis_weight_mean", "tis_capped_frac")  # with rollout_logprobs (truncated importance sampling)
ENTROPY_STAT = "entropy"  # fused_linear_grpo_loss, with entropy_coef != 0 or return_entropy
ALL_STAT_NAMES = STAT_NAMES + TIS_STAT_NAMES + (ENTROPY_STAT,)
