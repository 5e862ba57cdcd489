"""The GRPO loop. One step:

1. Sample P problems; the rollout engine draws G completions each with the current weights
   (the engine holds the same model object: nothing is copied or synced).
2. Score every completion with the task's rule (components kept apart, e.g. correct / format).
3. Advantages within each group; groups whose rewards are all equal carry no signal and are
   dropped before any training compute is spent on them.
4. Reference log-probs (beta > 0) from a frozen copy of the initial weights (with LoRA: the same
   model with its adapters switched off, no copy), and old log-probs (num_iterations > 1), both
   under no_grad with the fused kernels.
5. Policy update: packed micro-batches under a token budget, each group's prompt fed once for
   all its completions (batching.py), `fused_linear_grpo_loss` on the hidden states (the
   [tokens, vocab] logits never exist), gradient accumulation weighted so the result equals one
   big batch, clipping, AdamW with warm-up; with bf16 weights the optimizer steps fp32 masters
   (precision.py).

Before step 1, --cold-start-steps supervised steps on the task's demonstrations (the cold start of
DeepSeek-R1) can teach a small model the answer's form and a way to reason towards it, so that GRPO
has rewarded samples to compare; the KL reference is then the model after them (`cold_start`).

--method sft makes every step one more such supervised step instead (`sft_step`): the control that
shows whether GRPO's gain is more than what simply training the cold start longer gives. With
--max-train-minutes both kinds of run stop after the same summed step time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlvr_fast.checkpoint.adapters import load_adapters
from rlvr_fast.checkpoint.durable import write_text_durably
from rlvr_fast.grpo.advantages import group_advantages
from rlvr_fast.grpo.batching import MicroBatch, Sample, make_micro_batch, split_by_tokens
from rlvr_fast.grpo.checkpointing import load_state, python_rng_state, save_checkpoint, save_model
from rlvr_fast.grpo.config import TrainConfig
from rlvr_fast.grpo.distributed import Dist
from rlvr_fast.grpo.fsdp import FSDP, full_tensor, full_weights
from rlvr_fast.grpo.memory import estimate_memory, peak_memory_bytes, peak_memory_scope, reset_peak_memory
from rlvr_fast.grpo.precision import MasterWeights
from rlvr_fast.grpo.report import JsonlWriter, Reporters, format_duration, progress_line, write_plot
from rlvr_fast.grpo.safeguards import BEST_DIR, BEST_JSON, Safeguards, is_repetitive, read_best
from rlvr_fast.kernels import fused_linear_grpo_loss, linear_token_logprobs
from rlvr_fast.kernels.loss_options import ALL_STAT_NAMES, ENTROPY_STAT, TIS_STAT_NAMES, LossConfig
from rlvr_fast.model.lora import apply_lora, has_lora, lora_disabled
from rlvr_fast.rollout import RolloutEngine, SamplingParams
from rlvr_fast.tasks.base import CORRECT, FORMAT, Problem, accuracy_by_kind, summarize
from rlvr_fast.tasks.scoring import Scorer

log = logging.getLogger("rlvr_fast")


COLD_START_DIR = "cold-start"
"""OUTPUT/cold-start: the model after the cold start (the KL reference a resumed run loads)."""


class TrainingError(RuntimeError):
    """The run cannot go on (repeated NaN/Inf updates, a strict reward failure)."""


@dataclass
class Rollout:
    problems: list[Problem]
    prompt_ids: list[list[int]]
    completions: list[list[Any]]  # [P][G] engine completions
    components: list[list[dict[str, float]]]  # [P][G]
    rewards: torch.Tensor  # [P, G]
    reward_errors: int
    reward_timeouts: int
    seconds: float


def join_rollouts(parts: list[Rollout], parallel: bool = False) -> Rollout:
    """Several rollouts as one, groups in order: the rounds of a dynamically sampled step, whose times add
    up, or (parallel) the ranks' shares of one round, which took the slowest rank's time."""
    return Rollout([p for r in parts for p in r.problems], [p for r in parts for p in r.prompt_ids],
                   [g for r in parts for g in r.completions], [c for r in parts for c in r.components],
                   torch.cat([r.rewards for r in parts]), sum(r.reward_errors for r in parts),
                   sum(r.reward_timeouts for r in parts), (max if parallel else sum)(r.seconds for r in parts))


def rollout_metrics(ro: Rollout, keep: list[int], zero_std: torch.Tensor) -> dict[str, Any]:
    """A step's metrics that its rollout gives: rewards and their components, the groups drawn, kept and skipped
    (dynamic sampling), completion lengths, and the sampler's own entropy estimate."""
    outcome = summarize([c for row in ro.components for c in row])
    skipped = [i for i in range(len(zero_std)) if zero_std[i]]
    all_right = sum(all(c.get(CORRECT, 0.0) for c in ro.components[i]) for i in skipped)
    completions = [c for group in ro.completions for c in group]
    lengths = [len(c.token_ids) for c in completions]
    sampled_lp = [lp for c in completions for lp in c.logprobs]
    return {
        "reward_mean": float(ro.rewards.mean()),
        "reward_std": float(ro.rewards.std()) if ro.rewards.numel() > 1 else 0.0,
        **{f"reward_{k}": v for k, v in outcome["components"].items()},
        "accuracy": outcome["accuracy"], "format_rate": outcome["format_rate"],
        "reward_errors": ro.reward_errors, "reward_timeouts": ro.reward_timeouts,
        "zero_std_groups": int(zero_std.sum()),
        # dynamic sampling: groups drawn, trained, and skipped because every completion scored the same
        "groups_drawn": len(zero_std), "groups_kept": len(keep),
        "skipped_all_right": all_right, "skipped_all_wrong": len(skipped) - all_right,
        "signal_frac": 1 - len(skipped) / len(zero_std),
        "completion_len_mean": sum(lengths) / len(lengths), "completion_len_max": max(lengths),
        "truncated_frac": sum(c.finish_reason == "length" for c in completions) / len(lengths),
        "repetitive_truncated_frac": sum(c.finish_reason == "length" and is_repetitive(c.token_ids)
                                         for c in completions) / len(lengths),
        "entropy_sampled": -sum(sampled_lp) / max(1, len(sampled_lp)),  # estimate over all drawn: mean -log p
        "rollout_tokens_per_s": sum(lengths) / max(ro.seconds, 1e-9), "time_rollout_s": ro.seconds,
    }


def scheduled_lr(peak: float, schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """The learning rate of 0-based `step` of `total`: a linear warm-up over `warmup` steps, then `peak` held
    (constant) or decayed towards 0 at the last step (linear, cosine). Shared by GRPO's steps and the cold start's."""
    if step < warmup:
        return peak * ((step + 1) / (warmup + 1))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (1 - progress if schedule == "linear" else 1.0)


def check_cold_start(cfg: TrainConfig, task, tokenizer) -> None:
    """Supervised steps (the cold start, or --method sft) need demonstrations that fit the completion limit."""
    flag = "--cold-start-steps" if cfg.cold_start_steps else "--method sft" if cfg.method == "sft" else None
    if flag is None:
        return
    if not hasattr(task, "demonstrations"):
        raise ValueError(f"{flag} needs a task with demonstrations (a method demonstrations(rng, n), "
                         f"see FunctionPickTask); task {task.name!r} has none: drop {flag}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{flag}: the tokenizer has no EOS token to end the demonstrations with; "
                         f"give the model's tokenizer_config.json an eos_token, or drop {flag}")
    # A model taught completions longer than --max-new-tokens would be cut off before its answer in every rollout.
    longest = max(len(tokenizer.encode(text, add_special_tokens=False)) + 1
                  for _, texts in task.demonstrations(random.Random(0), 16) for text in texts)
    if longest > cfg.max_new_tokens:
        raise ValueError(f"{flag}: the task's demonstrations take up to {longest} tokens, more than "
                         f"--max-new-tokens {cfg.max_new_tokens}: raise --max-new-tokens to at least {longest + 8}")


def nll_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
             temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The cold start's loss: (a loss whose gradient is that of the masked tokens' mean negative log-likelihood
    under softmax(hidden @ weight.T / temperature), the NLL summed over those tokens, no grad). hidden [B, T, H],
    targets and mask [B, T]. It is the fused GRPO loss with every advantage 1, no KL, no old log-probs and a
    token mean: each ratio exp(logp - logp.detach()) is exactly 1, inside the clip, so the [tokens, vocab]
    logits never exist here either; its value is -1, not the NLL, which comes from the same pass's log-probs."""
    loss, _, logp = fused_linear_grpo_loss(hidden, weight, targets, None, None, mask.new_ones(mask.shape[0]), mask,
                                           config=LossConfig(beta=0.0, loss_type="bnpo"), temperature=temperature,
                                           return_logprobs=True)
    return loss, -(logp * mask).sum()


class GRPOTrainer:
    def __init__(self, cfg: TrainConfig, model, tokenizer, task, output: Path, device: torch.device,
                 ref_model=None, engine: RolloutEngine | None = None, dist: Dist | None = None,
                 fsdp: FSDP | None = None):
        self.cfg, self.model, self.tokenizer, self.task, self.output, self.device = cfg, model, tokenizer, task, output, device
        self.dist = dist or Dist()  # several ranks: see distributed.py for what is split and what is shared
        self.fsdp = fsdp  # --shard fsdp under torchrun: see fsdp.py
        if cfg.lora() is not None and not has_lora(model):
            if fsdp is not None:
                raise ValueError("--lora-rank with --shard fsdp is not supported: train LoRA with --shard none "
                                 "(the adapters are small; each rank holds the frozen base)")
            lora = dataclasses.replace(cfg.lora(), base_model=self.base_model_path())
            apply_lora(model, lora, cfg.seed)  # base frozen; only the adapters train
        self.ref_model = None
        if cfg.beta > 0 and cfg.method == "grpo" and not has_lora(model):  # frozen initial weights; a resumed run passes them in, loaded from --model
            self.ref_model = (ref_model or copy.deepcopy(model)).eval().requires_grad_(False)
        if fsdp is not None:
            fsdp.shard(model, self.ref_model)
        model.gradient_checkpointing = cfg.grad_checkpoint
        # FSDP frees the gathered weights after each rollout and gathers them anew (new addresses): no CUDA graphs.
        self.engine = engine or RolloutEngine(model, tokenizer, num_blocks=self._cache_blocks(),
                                              use_cuda_graphs=fsdp is None)
        self.memory_estimate = estimate_memory(model, beta=cfg.beta, grad_checkpoint=cfg.grad_checkpoint,
                                               micro_batch_tokens=cfg.micro_batch_tokens,
                                               kv_cache_bytes=self.engine.kv_cache_bytes)
        print(self.memory_estimate.table())
        self.master = MasterWeights(model, cfg.seed)  # bf16 weights: the optimizer steps fp32 copies
        self.optimizer = self._adamw(cfg.lr)
        self.rng = random.Random(cfg.seed)  # training problems; checkpointed with the run
        self.step = 0
        self.cold_start_done = 0  # cold-start steps taken
        self.train_seconds = 0.0  # the steps' summed time, for --max-train-minutes and the evaluations' time axis
        check_cold_start(cfg, task, tokenizer)
        self.bad_steps = 0
        self.scorer = Scorer(task, cfg.reward_workers, cfg.reward_timeout, strict=cfg.strict_rewards)
        self.metrics, self.samples, self.evals, self.cold_start_log, self.warnings = (  # rank 0 writes, the others not
            JsonlWriter(output / f"{name}.jsonl", self.dist.is_main)
            for name in ("metrics", "samples", "eval", "cold_start", "warnings"))
        weights = dict(getattr(task, "reward_weights", {}))
        self.safeguards = Safeguards(cfg.no_signal_steps, weights=weights,  # the first reward is the correctness
                                     correct_names=(CORRECT, *list(weights)[:1]))
        self.best: dict[str, Any] | None = None  # best.json: the best target evaluation and where its model is
        self.stop_reason: str | None = None  # a warning named by --stop-on
        self.latest_evals: list[dict[str, Any]] = []
        self.reporters = Reporters(cfg.report_to, output, cfg.to_dict()) if cfg.report_to and self.dist.is_main else None

    def _adamw(self, lr: float) -> torch.optim.AdamW:
        return torch.optim.AdamW(self.master.master_params, lr=lr, weight_decay=self.cfg.weight_decay,
                                 betas=(0.9, 0.99), eps=1e-8)

    def _cache_blocks(self, block_size: int = 16) -> int:
        """KV blocks for one step's rollout (or one evaluation) at once, with a margin: the pool is
        held through training, so it is sized for the job rather than from free memory. Longer
        prompts than estimated only cost preemption (recompute), never correctness."""
        cfg = self.cfg
        prompt_len = max(len(self.encode_prompt(p)) for p in self.task.eval_problems()[:8]) + 32
        n = self.dist.world_size  # each rank generates its share
        sequences = max(cfg.prompts_per_step // n * cfg.group_size, -(-cfg.eval_size // n))
        return int(1.25 * sequences * (-(-(prompt_len + cfg.max_new_tokens) // block_size) + 1))

    # ---- schedule -------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        return scheduled_lr(cfg.lr, cfg.schedule, step, cfg.steps, cfg.warmup_steps)

    # ---- rollout and rewards -------------------------------------------------------------

    def encode_prompt(self, problem: Problem) -> list[int]:
        text = self.tokenizer.apply_chat_template(problem.messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def rollout(self, problems: list[Problem], params: SamplingParams, n: int, first_prompt_index: int = 0) -> Rollout:
        """n completions of each problem, scored. Each rank generates and scores its share of the problems (their
        sampling keyed on the global prompt index), then the shares are gathered: every rank gets all of them."""
        start = time.perf_counter()
        mine = self.dist.local_slice(len(problems))
        problems = problems[mine]
        prompt_ids = [self.encode_prompt(p) for p in problems]
        self.model.eval()
        with torch.no_grad(), full_weights(self.model):  # FSDP: gathered for the rollout, freed after
            completions = self.engine.generate(prompt_ids, params, n=n, first_prompt_index=first_prompt_index + mine.start)
        scores = self.scorer.score([(p, c.text) for p, group in zip(problems, completions) for c in group])
        components = [scores.components[i * n:(i + 1) * n] for i in range(len(problems))]
        rewards = torch.tensor(scores.totals, dtype=torch.float32).view(len(problems), n)
        ro = Rollout(problems, prompt_ids, completions, components, rewards, scores.errors, scores.timeouts,
                     time.perf_counter() - start)
        return join_rollouts(self.dist.all_gather_objects(ro), parallel=True)

    # ---- log-probs and the update --------------------------------------------------------

    def _hidden(self, model, mb: MicroBatch) -> torch.Tensor:
        hidden = model.forward_packed(mb.input_ids, mb.packed_batch())
        return mb.gather(hidden)  # [B, T, H]

    def reference_logprobs(self, micro_batches: list[MicroBatch], total: int) -> torch.Tensor | None:
        """Log-probs under the KL reference: the frozen copy, or with LoRA the model with adapters off."""
        if self.cfg.beta <= 0:
            return None
        if self.ref_model is not None:
            return self.token_logprobs(self.ref_model, micro_batches, total)
        with lora_disabled(self.model):
            return self.token_logprobs(self.model, micro_batches, total)

    @torch.no_grad()
    def token_logprobs(self, model, micro_batches: list[MicroBatch], total: int) -> torch.Tensor:
        """Per-token log-probs [num_samples, T_max] of the step's completions under `model`."""
        t_max = max((mb.targets.shape[1] for mb in micro_batches), default=1)  # a rank may have no samples
        out = torch.zeros(total, t_max, device=self.device)
        for mb in micro_batches:
            hidden = self._hidden(model, mb)
            b, t, h = hidden.shape
            lp = linear_token_logprobs(hidden.reshape(b * t, h), model.lm_head.weight, mb.targets.reshape(-1),
                                       temperature=self.cfg.temperature).view(b, t)
            rows = torch.tensor([s.index for s in mb.samples], device=self.device)
            out[rows, :t] = lp * mb.mask
        if self.fsdp is not None:
            self.fsdp.even_passes(model, len(micro_batches), train=False)
        return out

    def rollout_logprobs(self, samples: list[Sample], micro_batches: list[MicroBatch]) -> torch.Tensor:
        """The sampler's log-probs of the completion tokens, laid out like token_logprobs' [num_samples, T_max]."""
        t_max = max((mb.targets.shape[1] for mb in micro_batches), default=1)  # a rank may have no samples
        out = torch.zeros(len(samples), t_max)
        for s in samples:
            out[s.index, :len(s.rollout_logprobs)] = torch.tensor(s.rollout_logprobs)
        return out.to(self.device)

    def pack(self, samples: list[Sample]) -> tuple[list[MicroBatch], int, int]:
        """This rank's samples as micro-batches under the token budget, and the completions and completion
        tokens of all ranks together (the loss weights are global)."""
        cfg = self.cfg
        micro_batches = [make_micro_batch(b, cfg.share_prompts).to(self.device)
                         for b in split_by_tokens(samples, cfg.micro_batch_tokens, cfg.share_prompts)]
        if self.fsdp is not None:
            self.fsdp.plan_passes(len(micro_batches))
        local = [len(samples), sum(mb.num_tokens for mb in micro_batches)]
        num_samples, num_tokens = map(int, self.dist.all_reduce(local))
        return micro_batches, num_samples, num_tokens

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, lr: float, micro_batches: list[MicroBatch],
                        sum_names: tuple[str, ...], loss_fn, noise_key: int) -> dict[str, Any]:
        """One optimizer step. loss_fn(mb, hidden): the micro-batch's loss, weighted so the accumulated gradient is
        the full batch's, and its 0-dim parts of the step's `sum_names` (summed over ranks, read once at the end:
        no host sync per micro-batch). A non-finite loss or gradient skips the step, counted in bad_steps."""
        cfg = self.cfg
        self.model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.master.zero_grad()
        sums = {k: torch.zeros((), device=self.device) for k in sum_names}
        for mb in micro_batches:
            loss, parts = loss_fn(mb, self._hidden(self.model, mb))
            loss.backward()
            for k, v in parts.items():
                sums[k] += v
        if self.fsdp is not None:
            self.fsdp.even_passes(self.model, len(micro_batches), train=True)
        t_opt = time.perf_counter()  # from here: gradient reduction, clipping and the optimizer step
        self.master.grads_to_master()
        if self.fsdp is None:  # (FSDP reduce-scattered them in backward) the weights above are global: sum over ranks
            self.dist.all_reduce_grads(self.master.master_params)
        sums = dict(zip(sums, self.dist.all_reduce(torch.stack(list(sums.values())).tolist())))
        params = [p for p in self.master.master_params if p.grad is not None]
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(  # FSDP: a DTensor
            params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
        finite = math.isfinite(sums["loss"]) and bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
            self.master.master_to_model(noise_key)
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped (%d in a row)",
                        self.step + 1, sums["loss"], float(grad_norm), self.bad_steps)
        self.master.zero_grad()  # gradients are not needed past the step: free them before the next rollout
        grad_norm = float(grad_norm)  # waits for the device
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {**sums, "grad_norm": grad_norm, "skipped_update": not finite,
                "time_optimizer_s": time.perf_counter() - t_opt}

    def update(self, micro_batches: list[MicroBatch], ref_lp: torch.Tensor | None, old_lp: torch.Tensor | None,
               rollout_lp: torch.Tensor | None, num_samples: int, num_tokens: int,
               measure_gap: bool = True) -> dict[str, Any]:
        """One GRPO optimizer step; measure_gap (the first pass over a rollout): also the sampler's log-probs
        against the trainer's and the exact entropy, from the same loss pass."""
        cfg, loss_config = self.cfg, self.cfg.loss()

        def loss_fn(mb: MicroBatch, hidden: torch.Tensor):
            rows = torch.tensor([s.index for s in mb.samples], device=self.device)
            pick = lambda lp: None if lp is None else lp[rows, :mb.targets.shape[1]].contiguous()
            loss, stats, *logp = fused_linear_grpo_loss(
                hidden, self.model.lm_head.weight, mb.targets, pick(old_lp), pick(ref_lp), mb.advantages, mb.mask,
                config=loss_config, temperature=cfg.temperature,
                num_tokens=num_tokens if cfg.loss_type == "dapo" else None,
                rollout_logprobs=pick(rollout_lp) if cfg.tis_cap is not None else None,
                return_logprobs=measure_gap, return_entropy=measure_gap)
            # Per-completion means (grpo, dr_grpo) are weighted by completions, token sums (bnpo) by tokens;
            # dapo's loss is already divided by the step's token count. Statistics are token means.
            share = {"bnpo": mb.num_tokens / num_tokens, "dapo": 1.0}.get(cfg.loss_type, len(mb.samples) / num_samples)
            token_share = mb.num_tokens / num_tokens
            parts = {"loss": loss.detach() * share, **{k: stats[k] * token_share for k in ALL_STAT_NAMES if k in stats}}
            if measure_gap:  # how far rollout numerics (bf16, packed GEMMs, fused ops) are from training ones
                parts["rollout_gap"] = ((logp[0] - pick(rollout_lp)).abs() * mb.mask).sum() / max(1, mb.num_tokens) * token_share
            return loss * share, parts

        out = self._optimizer_step(self.optimizer, self.lr_at(self.step), micro_batches,
                                   ("loss", *ALL_STAT_NAMES, "rollout_gap"), loss_fn, noise_key=self.step)
        measured = {**dict.fromkeys(TIS_STAT_NAMES, cfg.tis_cap is not None),
                    ENTROPY_STAT: measure_gap or cfg.entropy_coef != 0, "rollout_gap": measure_gap,
                    "kl": ref_lp is not None}  # --beta 0: no KL
        return {k: None if not measured.get(k, True) else v for k, v in out.items()}  # off: None, not a misleading 0

    def draw_groups(self) -> tuple[Rollout, list[int]]:
        """Dynamic sampling (DAPO): rounds of P prompts with G completions each until P groups hold rewards that
        are not all equal, or --max-oversample rounds are drawn. Returns every group drawn (metrics and the
        curriculum see them all) and the indices of the groups to train on: the first P with signal. A group
        whose completions all score the same has advantage 0 everywhere; training on it would cost a full
        forward and backward for no gradient, while its rollout is already paid for."""
        cfg = self.cfg
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                seed=cfg.seed * 1_000_003 + self.step)
        rounds, signal = [], 0
        for r in range(cfg.max_oversample):
            problems = self.task.sample(self.rng, cfg.prompts_per_step)  # the same P problems on every rank
            # Each round's prompts get their own sampling streams; round 0's are those of plain GRPO.
            rounds.append(self.rollout(problems, params, cfg.group_size, first_prompt_index=r * len(problems)))
            signal += int((~group_advantages(rounds[-1].rewards, cfg.scale_rewards)[1]).sum())
            if signal >= cfg.prompts_per_step:
                break
        ro = join_rollouts(rounds)
        zero_std = group_advantages(ro.rewards, cfg.scale_rewards)[1]
        keep = [i for i in range(len(zero_std)) if not zero_std[i]][:cfg.prompts_per_step]
        return ro, keep

    def train_on(self, ro: Rollout, keep: list[int], adv: torch.Tensor) -> dict[str, Any]:
        """Reference and old log-probs, then --num-iterations updates on this rank's share of the kept groups;
        the update's metrics (None where nothing trained: every group drawn had equal rewards)."""
        cfg = self.cfg
        mine = self.dist.local_slice(len(keep))
        samples = [Sample(ro.prompt_ids[i], list(c.token_ids), float(adv[i, j]), 0, group=i, rollout_logprobs=c.logprobs)
                   for i in keep[mine] for j, c in enumerate(ro.completions[i])]
        for k, s in enumerate(samples):
            s.index = k
        micro_batches, num_samples, num_tokens = self.pack(samples)
        passes = [{**dict.fromkeys(("loss", *ALL_STAT_NAMES, "rollout_gap", "grad_norm")), "skipped_update": False,
                   "time_optimizer_s": 0.0}]  # no group with signal: no update, no statistics (None, not 0)
        t_ref = t_policy = t_update = 0.0
        if num_samples:
            t1 = time.perf_counter()
            ref_lp = self.reference_logprobs(micro_batches, len(samples))
            t_ref = time.perf_counter() - t1
            old_lp = None
            if cfg.num_iterations > 1:
                self.model.eval()
                old_lp = self.token_logprobs(self.model, micro_batches, len(samples))
            t_policy = time.perf_counter() - t1 - t_ref
            t1 = time.perf_counter()
            rollout_lp = self.rollout_logprobs(samples, micro_batches)
            passes = [self.update(micro_batches, ref_lp, old_lp, rollout_lp, num_samples, num_tokens, measure_gap=i == 0)
                      for i in range(cfg.num_iterations)]
            t_update = time.perf_counter() - t1
        first, last = passes[0], passes[-1]
        return {
            "kl": last["kl"], "loss": last["loss"], "ratio_mean": last["ratio"],
            "clip_low_frac": last["clip_low_frac"], "clip_high_frac": last["clip_high_frac"],
            # the rollout policy's (the first pass): its exact mean token entropy and the sampler/trainer gap
            "entropy": first[ENTROPY_STAT], "rollout_logprob_gap": first["rollout_gap"],
            "entropy_train": last[ENTROPY_STAT],  # the same, from the last of --num-iterations loss passes
            **{k: last[k] for k in TIS_STAT_NAMES},  # tis_weight_mean, tis_capped_frac
            "grad_norm": last["grad_norm"], "skipped_update": last["skipped_update"],
            "train_tokens_per_s": num_tokens * cfg.num_iterations / max(t_update, 1e-9) if num_samples else 0.0,
            "time_reference_s": t_ref, "time_update_s": t_update,
            "time_old_logprobs_s": t_policy,
            "time_optimizer_s": sum(p["time_optimizer_s"] for p in passes),  # part of time_update_s
        }

    def train_step(self) -> dict[str, Any]:
        """rollout -> score -> advantages -> update -> log (--method sft: a supervised step instead)."""
        cfg = self.cfg
        if cfg.method == "sft":
            return self.sft_step()
        reset_peak_memory(self.device)
        t0 = time.perf_counter()
        self.dist.step = self.step
        ro, keep = self.draw_groups()
        # Advantages over every group drawn (so one round is exactly plain GRPO), trained on the kept ones.
        adv, zero_std = group_advantages(ro.rewards, cfg.scale_rewards)
        trained = self.train_on(ro, keep, adv)
        self.step += 1
        # e.g. a curriculum: its metrics of the step, and a line when it moves
        task_metrics, note = self.task.observe(ro.problems, ro.components) if hasattr(self.task, "observe") else ({}, None)
        m = {"step": self.step, **rollout_metrics(ro, keep, zero_std), **trained, "lr": self.lr_at(self.step - 1),
             "step_time_s": time.perf_counter() - t0,
             "peak_memory_gb": peak_memory_bytes(self.device) / 1e9,  # this step's peak (see grpo/memory.py)
             "peak_memory_scope": peak_memory_scope(self.device), **task_metrics}
        self.log_step(m)
        if note:
            print(note)
        self.check_bad_steps()
        self.warn(self.safeguards.after_step(m))
        if cfg.sample_every and self.step % cfg.sample_every == 0:
            for problem, group, comps, rewards in list(zip(ro.problems, ro.completions, ro.components, ro.rewards))[:2]:
                for c, comp, reward in list(zip(group, comps, rewards.tolist()))[:2]:
                    self.samples.write({"step": self.step, "prompt": problem.messages[-1]["content"], "answer": problem.answer,
                                        "completion": c.text, "reward": reward, **comp})
        return m

    # ---- cold start ----------------------------------------------------------------------

    def log_step(self, m: dict[str, Any]) -> None:
        self.train_seconds += m["step_time_s"]
        self.metrics.write(m)
        if self.reporters is not None:
            self.reporters.log(m, self.step, "train/")

    def check_bad_steps(self) -> None:
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise TrainingError(f"{self.bad_steps} consecutive updates had NaN/Inf loss or gradients; stopping. "
                                "The last good checkpoint is untouched; try a lower --lr or --dtype float32.")

    def out_of_time(self) -> bool:
        return bool(self.cfg.max_train_minutes) and self.train_seconds >= 60 * self.cfg.max_train_minutes

    # ---- supervised steps: the cold start, and --method sft ----------------------------

    def supervised_step(self, optimizer: torch.optim.Optimizer, lr: float, rng: random.Random,
                        noise_key: int) -> dict[str, Any]:
        """One supervised step: `task.demonstrations(rng, n)` gives n training problems, each with completions in
        the expected form, trained as one group (the prompt fed once) with `nll_loss`: the completion tokens'
        mean negative log-likelihood, the end token included."""
        cfg = self.cfg
        eos = self.tokenizer.eos_token_id  # check_cold_start refused a tokenizer without one
        demos = self.task.demonstrations(rng, cfg.cold_start_batch or cfg.prompts_per_step)  # the same on every rank
        samples = []
        for i, (problem, texts) in enumerate(demos[self.dist.local_slice(len(demos))]):
            prompt = self.encode_prompt(problem)
            for text in texts:
                ids = self.tokenizer.encode(text, add_special_tokens=False) + [eos]
                samples.append(Sample(prompt, ids, 1.0, len(samples), group=i))
        micro_batches, num_samples, num_tokens = self.pack(samples)

        def loss_fn(mb: MicroBatch, hidden: torch.Tensor):
            loss, nll = nll_loss(hidden, self.model.lm_head.weight, mb.targets, mb.mask, cfg.temperature)
            share = mb.num_tokens / num_tokens  # token means of the micro-batches -> the step's token mean
            return loss * share, {"loss": loss.detach() * share, "nll": nll / num_tokens}
        upd = self._optimizer_step(optimizer, lr, micro_batches, ("loss", "nll"), loss_fn, noise_key=noise_key)
        return {"nll": upd["nll"], "grad_norm": upd["grad_norm"], "skipped_update": upd["skipped_update"],
                "demonstrations": num_samples, "tokens": num_tokens, "lr": lr}

    def sft_step(self) -> dict[str, Any]:
        """--method sft: a supervised step where a GRPO step would be, with GRPO's optimizer, --lr and its schedule,
        and the problem stream (self.rng, checkpointed) so a resumed run continues it."""
        reset_peak_memory(self.device)
        t0 = time.perf_counter()
        self.dist.step = self.step
        m = self.supervised_step(self.optimizer, self.lr_at(self.step), self.rng, noise_key=self.step)
        self.step += 1
        m = {"step": self.step, "method": "sft", **m, "step_time_s": time.perf_counter() - t0,
             "peak_memory_gb": peak_memory_bytes(self.device) / 1e9, "peak_memory_scope": peak_memory_scope(self.device)}
        self.log_step(m)
        self.check_bad_steps()
        return m

    def cold_start(self) -> None:
        """--cold-start-steps supervised steps (`supervised_step`) with an AdamW of their own, discarded after, so
        GRPO's optimizer starts fresh. The KL reference then becomes the model as it is now; a copy goes to
        OUTPUT/cold-start, where a resumed run reads its reference."""
        cfg = self.cfg
        rng = random.Random(cfg.seed * 7919 + 1)  # apart from the GRPO problem stream
        optimizer = self._adamw(cfg.cold_start_lr)
        while self.cold_start_done < cfg.cold_start_steps:
            t0 = time.perf_counter()
            # Cold-start steps draw their rounding noise apart from the GRPO steps'.
            lr = scheduled_lr(cfg.cold_start_lr, cfg.cold_start_schedule, self.cold_start_done, cfg.cold_start_steps)
            m = self.supervised_step(optimizer, lr, rng, noise_key=-1 - self.cold_start_done)
            self.cold_start_done += 1
            m = {"cold_start_step": self.cold_start_done, **m, "step_time_s": time.perf_counter() - t0}
            self.cold_start_log.write(m)
            print(f"cold start {self.cold_start_done}/{cfg.cold_start_steps}: nll {m['nll']:.3f}, "
                  f"grad norm {m['grad_norm']:.2f}, {m['step_time_s']:.1f} s")
            if self.bad_steps >= cfg.max_bad_steps:
                raise TrainingError(f"{self.bad_steps} consecutive cold-start updates had NaN/Inf loss or gradients; "
                                    "try a lower --cold-start-lr or --dtype float32.")
        if self.ref_model is not None:
            with torch.no_grad():  # same structure (a deep copy), same sharding: copy parameter by parameter
                for ref, p in zip(self.ref_model.parameters(), self.model.parameters()):
                    ref.copy_(p)
        # Kept with or without a reference: GRPO's gain over the cold start alone is measured from it.
        save_model(self.model, self.tokenizer, self.output / COLD_START_DIR, self.dist)

    # ---- evaluation ----------------------------------------------------------------------

    def evaluate(self, problems: list[Problem], label: str) -> dict[str, Any]:
        params = SamplingParams(temperature=0.0, max_new_tokens=self.cfg.max_new_tokens)
        ro = self.rollout(problems, params, 1)
        comps = [row[0] for row in ro.components]
        outcome = summarize(comps)
        result = {"step": self.step, "train_seconds": round(self.train_seconds, 3), "set": label,
                  "size": len(problems), "accuracy": outcome["accuracy"],
                  "format_rate": outcome["format_rate"], "reward_mean": float(ro.rewards.mean()),
                  "components": outcome["components"],  # every component's mean, e.g. function-pick's confusion cells
                  "reward_errors": ro.reward_errors, "reward_timeouts": ro.reward_timeouts}
        by_kind = accuracy_by_kind(ro.problems, comps)
        if by_kind:
            result["by_kind"] = by_kind
        if self.step == 0 and self.cold_start_done:
            result["after_cold_start"] = True
        self.evals.write(result)
        if self.reporters is not None:
            stage = "after_cold_start/" if result.get("after_cold_start") else ""
            self.reporters.log({**result, **result["components"]}, self.step, f"eval/{label}/{stage}")
        return result

    def run_evals(self) -> list[dict[str, Any]]:
        sets = self.task.eval_sets() if hasattr(self.task, "eval_sets") else [("target", self.task.eval_problems())]
        results = [self.evaluate(problems, label) for label, problems in sets]
        self.latest_evals = results
        for r in results:
            where = "the cold start" if r.get("after_cold_start") else f"step {r['step']}"
            print(f"eval @ {where} [{r['set']}, {r['size']} problems]: accuracy {r['accuracy']:.3f}, "
                  f"format {r['format_rate']:.3f}, reward {r['reward_mean']:.3f}")
            others = {k: v for k, v in r["components"].items() if k not in (CORRECT, FORMAT)}
            if others:
                print("  " + ", ".join(f"{k} {v:.3f}" for k, v in others.items()))
            if "by_kind" in r:
                print("  accuracy by kind: " + ", ".join(f"{k} {v['accuracy']:.3f} ({v['size']})"
                                                         for k, v in r["by_kind"].items()))
        if self.dist.is_main:
            write_plot(self.output / "plot.png", self.metrics.read(), [e for e in self.evals.read() if e["set"] == "target"],
                       title=self.plot_title())
        target = next((r for r in results if r["set"] == "target"), results[0])
        self.keep_best(target)
        self.warn(self.safeguards.after_eval(target))
        return results

    def keep_best(self, result: dict[str, Any]) -> None:
        """OUTPUT/best and best.json when this target evaluation beats every earlier one (safeguards.py)."""
        if not self.cfg.keep_best or (self.best is not None and result["accuracy"] <= self.best["accuracy"]):
            return
        if result["step"] == 0:  # the starting model: named, not copied
            model = str(self.output / COLD_START_DIR) if self.cold_start_done else self.base_model_path()
        else:
            model = str(save_model(self.model, self.tokenizer, self.output / BEST_DIR, self.dist))
        self.best = {"step": result["step"], "accuracy": result["accuracy"], "size": result["size"],
                     "train_seconds": result["train_seconds"], "model": model}
        if self.dist.is_main:
            write_text_durably(self.output / BEST_JSON, json.dumps(self.best, indent=2) + "\n")

    def warn(self, found: list[tuple[str, str]]) -> None:
        """Print each new warning once, record it, and end the run after this step if --stop-on names it."""
        for name, message in found:
            print(f"WARNING ({name}): {message}", flush=True)
            self.warnings.write({"step": self.step, "warning": name, "message": message})
            if name in self.cfg.stop_on or "any" in self.cfg.stop_on:
                self.stop_reason = self.stop_reason or name

    def plot_title(self) -> str:
        cfg = self.cfg
        model = Path(cfg.model).name if cfg.model else "SmolLM2-135M-Instruct"
        cold = f", {cfg.cold_start_steps} cold-start steps" if cfg.cold_start_steps else ""
        if cfg.method == "sft":
            return (f"Supervised steps (--method sft): {getattr(self.task, 'title', cfg.task)}, {model}{cold}\n"
                    f"{cfg.cold_start_batch or cfg.prompts_per_step} demonstrated problems per step, lr {cfg.lr:g}")
        return (f"GRPO: {getattr(self.task, 'title', cfg.task)}, {model}{cold}\n{cfg.prompts_per_step} prompts x "
                f"{cfg.group_size} completions per step, lr {cfg.lr:g}, temperature {cfg.temperature:g}")

    # ---- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "master_weights": self.master.state_dict(),
                "data_rng": self.rng.getstate(), "torch_rng": torch.get_rng_state(),
                "task": self.task.state_dict() if hasattr(self.task, "state_dict") else None,
                "config": self.cfg.to_dict(), "bad_steps": self.bad_steps, "cold_start_done": self.cold_start_done,
                "train_seconds": self.train_seconds, "safeguards": self.safeguards.state_dict()}

    def save(self) -> Path:
        path = save_checkpoint(self.output, self.step, self.model, self.tokenizer, self.state_dict(), dist=self.dist)
        log.info("checkpoint written: %s", path)
        return path

    def base_model_path(self) -> str:
        if self.cfg.model is not None:
            return str(Path(self.cfg.model).expanduser().resolve())
        from rlvr_fast.checkpoint.default_model import default_model_dir
        return str(default_model_dir())

    def load(self, checkpoint: Path) -> None:
        """Continue from a checkpoint: trainer state, and with LoRA the adapters (the model passed in
        holds the checkpoint's weights otherwise)."""
        state = load_state(checkpoint, self.dist, sharded=self.fsdp is not None)
        if has_lora(self.model):
            load_adapters(self.model, checkpoint)
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.master.load_state_dict(state.get("master_weights"))
        self.rng.setstate(python_rng_state(state["data_rng"]))  # JSON lists -> random's tuples
        torch.set_rng_state(state["torch_rng"])
        self.bad_steps = state["bad_steps"]
        self.cold_start_done = state.get("cold_start_done", 0)
        self.train_seconds = state.get("train_seconds", 0.0)
        self.safeguards.load_state_dict(state.get("safeguards"))
        self.best = read_best(self.output)
        if state["task"] is not None:
            self.task.load_state_dict(state["task"])
        for writer in (self.metrics, self.samples, self.evals, self.warnings):
            writer.truncate_after(self.step)

    # ---- the run -------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        fresh = self.step == 0 and not self.cold_start_done
        earlier = [e for e in self.evals.read() if e["step"] == 0]
        before = self.run_evals() if fresh else [e for e in earlier if not e.get("after_cold_start")]
        cold = [e for e in earlier if e.get("after_cold_start")]
        start, first_step = time.perf_counter(), self.step
        if self.cold_start_done < cfg.cold_start_steps and self.step == 0:  # never between GRPO steps
            self.cold_start()
            cold = self.run_evals()
        grpo_start = time.perf_counter()  # the ETA is that of the GRPO steps, the cold start excluded
        try:
            while self.step < cfg.steps and not self.out_of_time() and not self.stop_reason:
                m = self.train_step()
                done = self.step - first_step
                eta = (time.perf_counter() - grpo_start) / done * (cfg.steps - self.step)
                if cfg.max_train_minutes:
                    eta = min(eta, max(0.0, 60 * cfg.max_train_minutes - self.train_seconds))
                print(progress_line(m, cfg.steps, eta))
                last = self.step >= cfg.steps or self.out_of_time()  # the final evaluation follows the loop
                if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                    self.run_evals()  # may raise a warning that --stop-on names
                if self.stop_reason:
                    break  # the final evaluation (or this one) and the final save follow the loop
                if cfg.save_every and self.step % cfg.save_every == 0 and not last:  # the final save follows too
                    self.save()
        except KeyboardInterrupt:
            print(f"\ninterrupted: saving a checkpoint at step {self.step} (continue with --resume {self.output})")
            self.save()
            raise
        if self.stop_reason:
            print(f"stopping at step {self.step}: the {self.stop_reason} warning was raised (--stop-on)")
        # The final evaluation, unless this step was just evaluated (--steps 0 after a cold start, a --stop-on stop).
        latest = self.latest_evals
        after = latest if latest and latest[0]["step"] == self.step else self.run_evals()
        self.scorer.close()
        if self.reporters is not None:
            self.reporters.close()
        self.save()
        if cfg.merge:
            merged = save_model(self.model, self.tokenizer, self.output / "merged", self.dist)
            print(f"merged model (base + adapters, HF layout) written to {merged}")
        summary = {"before": before, "cold_start": cold, "after": after, "seconds": time.perf_counter() - start,
                   "best": self.best, "warnings": list(self.safeguards.raised)}
        print_summary(summary)
        return summary


def print_summary(summary: dict[str, Any]) -> None:
    earlier = [("before", {e["set"]: e for e in summary["before"]}),
               ("cold st.", {e["set"]: e for e in summary.get("cold_start", [])})]
    print(f"\nsummary ({format_duration(summary['seconds'])} of training)")
    print(f"{'eval set':<10} {'':<8} {'accuracy':>9} {'format':>7} {'reward':>7}")
    for e in summary["after"]:
        for stage, e_then in [(stage, evals[e["set"]]) for stage, evals in earlier if e["set"] in evals] + [("after", e)]:
            print(f"{e['set']:<10} {stage:<8} {e_then['accuracy']:>9.3f} {e_then['format_rate']:>7.3f} "
                  f"{e_then['reward_mean']:>7.3f}")
    best = summary.get("best")
    if best:
        print(f"best held-out accuracy {best['accuracy']:.3f} at step {best['step']}: {best['model']}")
    if summary.get("warnings"):
        print(f"warnings raised: {', '.join(summary['warnings'])} (OUTPUT/warnings.jsonl)")

