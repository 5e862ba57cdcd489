"""TRL's GRPOTrainer with its training loss computed by `fused_linear_grpo_loss`.

    from rlvr_fast.integrations.trl import FusedGRPOTrainer       # a GRPOTrainer subclass
    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    # or, on a trainer you already built:  use_fused_grpo_loss(trainer)

What changes: `GRPOTrainer._compute_loss` (the training/eval loss of a micro-batch). Instead of
TRL's chunked LM head (log-probs + entropy per token, then the GRPO loss in PyTorch on [B, T]
tensors), the policy runs its decoder body only, and the last hidden states of the positions that
predict completion tokens go with the lm_head weight into one `fused_linear_grpo_loss` call:
log-probs, clipped ratio objective, k3 KL against `ref_per_token_logps`, entropy (for the metric),
gradients for the hidden states and the lm_head, chunk by chunk. The old and reference log-probs
(computed once per generation batch under no_grad in `_generate_and_score_completions`) are still
TRL's own, from its chunked head; only the loss pass, the one with a backward, is replaced, so
TRL's head and ours never both run on it.

Matched exactly (tests/test_trl_integration.py compares loss, every parameter's gradient and the
metrics with TRL's own `_compute_loss`): loss_type grpo / bnpo / dr_grpo / dapo (with TRL's
`num_items_in_batch` normalisation per accumulation window and process), importance_sampling_level
token / sequence, beta 0 or not (non-zero needs use_bias_correction_kl=False, see below), epsilon /
epsilon_high, delta (> 1 + epsilon_high), temperature, old_per_token_logps present or None,
tool_mask, gradient accumulation, LoRA-style PEFT models. Metrics: the names TRL logs in
`_compute_loss` (kl, entropy, clip_ratio/...), same reductions. Under autocast both heads compute
the logits in the autocast dtype (close to TRL, not bit-equal).

Refused with a ValueError naming the option (at construction / patch time): every other loss_type,
top_entropy_quantile < 1, entropy_coef / use_adaptive_entropy, off_policy_mask_threshold,
use_bias_correction_kl=True with beta != 0 (TRL's default for that flag: it multiplies the KL by
the importance ratio, which the kernel does not), vLLM importance-sampling correction, the MoE
router aux loss, use_liger_kernel, delta <= 1 + epsilon_high, vision-language models,
prompt-learning PEFT, an lm_head with a bias, logit softcapping or scaling; at call time:
multimodal inputs and per-token [B, T] advantages.
"""

from __future__ import annotations

import logging
import types
from contextlib import nullcontext

import torch
import trl
from accelerate.utils import is_peft_model
from packaging.version import Version
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from rlvr_fast.kernels import fused_linear_grpo_loss
from rlvr_fast.kernels.loss_options import LossConfig, LossOptionError

log = logging.getLogger("rlvr_fast.integrations.trl")

# Written against and tested with TRL 1.16 (its _compute_loss, config fields and metric names).
TESTED_TRL = "1.16"
if Version(trl.__version__).release[:2] < (1, 16):
    raise ImportError(f"rlvr_fast.integrations.trl needs trl>=1.16 (found {trl.__version__}): pip install 'trl>=1.16'")
if Version(trl.__version__).release[:2] != (1, 16):
    log.warning("rlvr_fast.integrations.trl was tested with trl %s.x; this is trl %s: re-run "
                "tests/test_trl_integration.py before trusting it", TESTED_TRL, trl.__version__)

# Inputs of vision-language batches (see GRPOTrainer._compute_loss); the fused loss reads text only.
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                   "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
_FIX = " Use TRL's own GRPOTrainer for this option, or change it."


def _refuse(option: str, value, why: str) -> None:
    raise ValueError(f"rlvr_fast.integrations.trl: {option}={value!r} is not supported by the fused GRPO loss: "
                     f"{why}.{_FIX}")


def check_config(args) -> None:
    """Refuse every GRPOConfig option that changes the loss in a way fused_linear_grpo_loss does not reproduce."""
    try:  # the options fused_compute_loss passes on: LossConfig checks their values
        LossConfig(loss_type=args.loss_type, clip_low=args.epsilon, beta=args.beta, delta=args.delta,
                   clip_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
                   ratio_level=args.importance_sampling_level)
    except LossOptionError as e:
        name = {"clip_low": "epsilon", "clip_high": "epsilon_high", "ratio_level": "importance_sampling_level"}.get(
            e.option, e.option)
        _refuse(name, getattr(args, name), f"the fused loss's {e}")
    if args.top_entropy_quantile < 1.0:
        _refuse("top_entropy_quantile", args.top_entropy_quantile, "high-entropy token masking needs every "
                "token's entropy before the loss; set it to 1.0")
    if args.entropy_coef != 0.0:
        _refuse("entropy_coef", args.entropy_coef, "TRL's entropy bonus is a plain token mean per micro-batch, "
                "not the loss_type's token weights the fused bonus uses; set it to 0.0")
    if args.use_adaptive_entropy:
        _refuse("use_adaptive_entropy", True, "the adaptive entropy bonus is not implemented")
    if args.off_policy_mask_threshold is not None:
        _refuse("off_policy_mask_threshold", args.off_policy_mask_threshold, "the off-policy sequence mask is not "
                "implemented; set it to None")
    if args.use_bias_correction_kl and args.beta != 0.0:  # TRL's default is True; it only matters with a KL term
        _refuse("use_bias_correction_kl", True, f"with beta={args.beta} TRL multiplies the KL by the importance "
                "ratio, which the fused loss does not; set use_bias_correction_kl=False (or beta=0.0)")
    if args.use_vllm and args.vllm_importance_sampling_correction:
        _refuse("vllm_importance_sampling_correction", True, "TRL weights the policy term but not the KL by the "
                "vLLM ratio (the fused loss's rollout correction weights both); set it to False")
    if args.use_liger_kernel:
        _refuse("use_liger_kernel", True, "Liger's layers would replace the model's forward; set it to False")


def check_trainer(trainer: GRPOTrainer) -> None:
    """check_config on the trainer's args and live attributes, plus the model: everything checkable before a step."""
    check_config(trainer.args)
    for attr in ("loss_type", "importance_sampling_level", "top_entropy_quantile", "off_policy_mask_threshold", "beta"):
        if getattr(trainer, attr) != getattr(trainer.args, attr):  # TRL's loss reads the trainer's copy
            _refuse(f"trainer.{attr}", getattr(trainer, attr), f"it differs from args.{attr}; set the config instead")
    if trainer._entropy_bonus_enabled:
        _refuse("entropy_coef", trainer.entropy_coef, "the entropy bonus is not implemented")
    if trainer.aux_loss_enabled:
        _refuse("router_aux_loss_coef", trainer.router_aux_loss_coef, "the MoE load-balancing loss needs the router "
                "logits, which the fused path does not request; set router_aux_loss_coef=0.0")
    if getattr(trainer, "_is_vlm", False):
        _refuse("model", type(trainer.model).__name__, "vision-language models are not supported (text only)")
    model = trainer.model
    if is_peft_model(model):
        if getattr(model.active_peft_config, "is_prompt_learning", False):
            _refuse("peft_config", type(model.active_peft_config).__name__, "prompt-learning adapters change the "
                    "inputs; use an adapter on the weights (LoRA)")
        model = model.get_base_model()
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        _refuse("lm_head.bias", "present", "the fused loss takes the lm_head weight only")
    text = model.config.get_text_config()
    if getattr(text, "final_logit_softcapping", None) is not None:
        _refuse("final_logit_softcapping", text.final_logit_softcapping, "softcapped logits are not implemented")
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text, name, None) not in (None, 1, 1.0):
            _refuse(name, getattr(text, name), "scaled logits are not implemented")


def use_fused_grpo_loss(trainer: GRPOTrainer, chunk_size: int | None = None, backend: str = "auto") -> GRPOTrainer:
    """Make `trainer` (a built TRL GRPOTrainer) compute its loss with fused_linear_grpo_loss; returns it.

    chunk_size / backend go to fused_linear_grpo_loss (defaults: its memory budget, Triton on CUDA)."""
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"use_fused_grpo_loss expects a trl.GRPOTrainer, got {type(trainer).__name__}")
    check_trainer(trainer)
    trainer._rlvr_fast_loss_kwargs = {"chunk_size": chunk_size, "backend": backend}
    if not isinstance(trainer, FusedGRPOTrainer):
        trainer._compute_loss = types.MethodType(fused_compute_loss, trainer)
    log.info("GRPOTrainer's loss is computed by rlvr_fast fused_linear_grpo_loss (loss_type=%s, "
             "importance_sampling_level=%s); old/ref log-probs still come from TRL's head under no_grad",
             trainer.loss_type, trainer.importance_sampling_level)
    return trainer


class FusedGRPOTrainer(GRPOTrainer):
    """trl.GRPOTrainer whose loss is fused_linear_grpo_loss (see the module docstring).

    Extra keyword arguments: fused_chunk_size, fused_backend (passed to the kernel)."""

    def __init__(self, *args, fused_chunk_size: int | None = None, fused_backend: str = "auto", **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:
            check_config(config)  # refuse before the models are loaded
        super().__init__(*args, **kwargs)
        use_fused_grpo_loss(self, fused_chunk_size, fused_backend)

    def _compute_loss(self, model, inputs):
        return fused_compute_loss(self, model, inputs)


def _completion_hidden(trainer: GRPOTrainer, model, input_ids, attention_mask, n_completion: int) -> torch.Tensor:
    """The decoder's last hidden states [B, C, H] at the positions that predict the C completion tokens.

    The model is called as usual (through DDP / PEFT wrappers, so gradient sync and adapters work) with
    logits_to_keep=1, so its own head projects one position; a hook on the decoder body keeps its output."""
    unwrapped = trainer.accelerator.unwrap_model(model)
    base = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
    captured = []

    def keep(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = base.get_decoder().register_forward_hook(keep)
    try:
        with trainer.accelerator.autocast():
            model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"rlvr_fast.integrations.trl: the decoder body ran {len(captured)} times in one forward "
                           "(expected once); this model's layout is not supported")
    # Position p predicts token p + 1: the completion tokens are predicted by the C positions before the last.
    return captured[0][:, -n_completion - 1:-1]


def fused_compute_loss(self: GRPOTrainer, model, inputs) -> torch.Tensor:
    """GRPOTrainer._compute_loss, with the log-probs and loss from one fused_linear_grpo_loss call."""
    for key in MULTIMODAL_KEYS:
        if inputs.get(key) is not None:
            _refuse(f"inputs[{key!r}]", "present", "multimodal inputs are not supported")
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    advantages = inputs["advantages"]
    if advantages.dim() != 1:
        _refuse("advantages.shape", list(advantages.shape), "the fused loss takes one advantage per completion [B]")

    mode = "train" if self.model.training else "eval"
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0  # no accumulation in eval
    num_tokens = None
    if self.loss_type == "dapo":
        # TRL: `num_items_in_batch` spans the generation batch (all processes), rescaled to one accumulation window.
        num_tokens = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            num_tokens = num_tokens * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        num_tokens = num_tokens.to(torch.float32)

    hidden = _completion_hidden(self, model, input_ids, attention_mask, completion_ids.size(1))
    unwrapped = self.accelerator.unwrap_model(model)
    weight = (unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped).get_output_embeddings().weight
    # Run the head in the dtype TRL's would: the autocast dtype when autocast is on, else the weight's
    # (cast_lm_head_to_fp32 made the weight fp32, and TRL then upcasts the hidden states).
    device_type = hidden.device.type
    no_autocast = nullcontext()
    if torch.is_autocast_enabled(device_type) and not self.args.cast_lm_head_to_fp32:
        dtype = torch.get_autocast_dtype(device_type)
        no_autocast = torch.autocast(device_type, enabled=False)
    else:
        dtype = weight.dtype
    beta = self.beta
    with no_autocast:
        loss, stats, logp = fused_linear_grpo_loss(
            hidden.to(dtype), weight.to(dtype), completion_ids, inputs.get("old_per_token_logps"),
            inputs["ref_per_token_logps"] if beta != 0.0 else None, advantages, mask,
            clip_low=self.epsilon_low, clip_high=self.epsilon_high, beta=beta, loss_type=self.loss_type,
            max_completion_len=self.max_completion_length, ratio_level=self.importance_sampling_level,
            delta=self.args.delta, num_tokens=num_tokens,
            temperature=self.temperature, return_logprobs=True, return_entropy=True,
            **getattr(self, "_rlvr_fast_loss_kwargs", {}))
    if self.loss_type != "dapo":  # dapo's normaliser above already covers the accumulation window
        loss = loss / accumulation
    _log_metrics(self, mode, mask, logp, inputs.get("old_per_token_logps"), advantages[:, None], stats)
    return loss


@torch.no_grad()
def _log_metrics(self: GRPOTrainer, mode: str, mask, logp, old, advantages, stats) -> None:
    """The metrics GRPOTrainer._compute_loss logs, same names, same reductions: KL and entropy from the fused
    pass's statistics (means over this process's real tokens), the clip fractions from its log-probs (TRL counts
    them per sequence at sequence level, the kernel per token)."""
    mask = mask.to(torch.float32)
    real = mask != 0
    old = logp if old is None else torch.where(real, old.float(), logp)
    log_ratio = logp - old
    if self.importance_sampling_level == "sequence":
        coef_1 = torch.exp((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    else:
        coef_1 = torch.exp(log_ratio)
    if self.args.delta is not None:
        coef_1 = coef_1.clamp(max=self.args.delta)  # TRL counts clipping on the dual-clipped ratio

    def global_masked_mean(x):
        if x.shape[1] == 1:  # sequence level: one value per completion
            local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
        else:
            local = torch.stack([(x * mask).sum(), mask.sum()])
        totals = self.accelerator.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def masked_seq_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    count = mask.sum()

    def global_token_mean(local_mean):  # a kernel statistic -> its mean over every process's real tokens
        totals = self.accelerator.reduce(torch.stack([local_mean * count.clamp(min=1.0), count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    metrics = self._metrics[mode]
    if self.beta != 0.0:
        metrics["kl"].append(global_token_mean(stats["kl"]))
    metrics["entropy"].append(global_token_mean(stats["entropy"]))
    is_low = ((coef_1 < 1 - self.epsilon_low) & (advantages < 0)).float()
    is_high = ((coef_1 > 1 + self.epsilon_high) & (advantages > 0)).float()
    metrics["clip_ratio/low_mean"].append(global_masked_mean(is_low))
    metrics["clip_ratio/high_mean"].append(global_masked_mean(is_high))
    metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(is_low, is_high)))
    metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(is_low))).item())
    metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(is_high))).item())
