"""RolloutEngine: GRPO rollouts with the trainer's own model (no weight copy, no weight sync).

    engine = RolloutEngine(model, tokenizer)
    groups = engine.generate(prompt_token_ids, SamplingParams(temperature=1.0, max_new_tokens=256), n=8)
    groups[i][j].token_ids, .logprobs, .text, .finish_reason   # sample j of prompt i

GRPO draws G completions per prompt. The engine prefills each prompt once for its whole group and
shares the prompt's full KV blocks between the G samples (see block_manager), then decodes all
running sequences together with continuous batching (see scheduler) over a paged KV cache (see
model_runner). The step loop is: schedule -> one forward -> sample -> append / finish.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from rlvr_fast.model.llama import LlamaForCausalLM
from rlvr_fast.rollout.block_manager import BlockManager, cdiv
from rlvr_fast.rollout.model_runner import ModelRunner, kv_bytes_per_block
from rlvr_fast.rollout.sampling_params import SamplingParams
from rlvr_fast.rollout.scheduler import Scheduler
from rlvr_fast.rollout.sequence import Sequence
from rlvr_fast.tokenizer import Tokenizer

log = logging.getLogger("rlvr_fast")

Prompt = str | list[int]


@dataclass
class Completion:
    token_ids: list[int]
    """Sampled tokens, including the EOS / stop token that ended the completion (its log-prob matters for training)."""
    logprobs: list[float]
    """log_softmax(logits / T)[token] for each token, under the distribution it was sampled from (T = 1 if greedy)."""
    text: str
    """Decoded completion without special tokens, cut before a matched stop string."""
    finish_reason: str
    """"eos" (a tokenizer EOS id), "stop" (stop_token_ids or a stop string) or "length"."""


@dataclass(kw_only=True)
class EngineStats:
    prefill_steps: int = 0
    decode_steps: int = 0
    preemptions: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0


class RolloutEngine:
    def __init__(self, model: LlamaForCausalLM, tokenizer: Tokenizer | None = None, *,
                 num_blocks: int | None = None, block_size: int = 16, max_batch_size: int = 256,
                 max_model_len: int | None = None, max_prefill_tokens: int = 8192,
                 memory_fraction: float | None = None, use_cuda_graphs: bool = True):
        """
        model / tokenizer: the trainer's own objects; nothing is copied, so every generate() sees
            the current weights.
        num_blocks: KV cache blocks of block_size tokens. Default: sized from memory when the cache
            is first needed -- CUDA: memory_fraction (default 0.3) of the memory free after the model
            (the rest is left to training); CPU: memory_fraction (default 0.2) of available RAM, at
            most 2 GiB.
        max_batch_size: most sequences decoded together. max_model_len: longest prompt + completion
            (default: the model's max_position_embeddings). max_prefill_tokens: most prompt tokens
            prefilled in one step (one group is always admitted).
        use_cuda_graphs: replay captured CUDA graphs for decode steps (CUDA only).
        """
        if block_size < 1 or max_batch_size < 1 or max_prefill_tokens < 1:
            raise ValueError("block_size, max_batch_size and max_prefill_tokens must be >= 1")
        if num_blocks is not None and num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if memory_fraction is not None and not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        self.model = model
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_model_len = max_model_len or model.config.max_position_embeddings
        self.memory_fraction = memory_fraction
        self.use_cuda_graphs = use_cuda_graphs
        self._num_blocks = num_blocks
        self._runner: ModelRunner | None = None
        self.block_manager: BlockManager | None = None
        self.stats = EngineStats()
        eos = set(tokenizer.stop_token_ids) if tokenizer is not None else set()
        cfg_eos = model.config.eos_token_id
        eos |= set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
        self.eos_token_ids = frozenset(eos)
        self._next_seq_id = 0

    # ------------------------------------------------------------------ cache

    @property
    def num_blocks(self) -> int:
        if self._num_blocks is None:
            self._num_blocks = self._default_num_blocks()
        return self._num_blocks

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache pool, allocated at the first generate() and held after it."""
        return self.num_blocks * kv_bytes_per_block(self.model, self.block_size)

    def _default_num_blocks(self) -> int:
        per_block = kv_bytes_per_block(self.model, self.block_size)
        device = self.model.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = (self.memory_fraction or 0.3) * free
        else:
            budget = min((self.memory_fraction or 0.2) * _available_ram(), 2 << 30)
        # More blocks than max_batch_size full-length sequences can ever use would be wasted.
        useful = self.max_batch_size * cdiv(self.max_model_len, self.block_size)
        num = max(1, min(int(budget // per_block), useful))
        log.info("KV cache: %d blocks of %d tokens (%.0f MiB)", num, self.block_size, num * per_block / 2**20)
        return num

    def _ensure_cache(self) -> ModelRunner:
        runner = self._runner
        if runner is None or runner.k_cache.dtype != self.model.dtype or runner.device != self.model.device:
            self._runner = None  # drop the old cache before allocating the new one
            runner = self._runner = ModelRunner(self.model, self.num_blocks, self.block_size, self.max_batch_size,
                                                self.max_model_len, self.use_cuda_graphs)
        return runner

    # ------------------------------------------------------------------ generate

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | None = None,
                 n: int = 1, first_prompt_index: int = 0) -> list[list[Completion]]:
        """n completions for each prompt: result[i][j] is sample j of prompts[i].

        Sampling is keyed on (seed, first_prompt_index + i, j, step): a caller that generates a
        slice of a larger prompt list (one rank of several) passes the slice's start to draw the
        completions the whole list would get.

        A prompt is a list of token ids (used as is: the trainer passes chat-templated ids encoded
        without extra special tokens) or a string (encoded with add_special_tokens=True, i.e. with the
        BOS token the tokenizer adds to plain text). A single prompt may be passed on its own.
        """
        params = sampling_params or SamplingParams()
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (completions per prompt) must be an integer >= 1, got {n!r}")
        prompt_ids = [self._prompt_ids(p, i) for i, p in enumerate(_as_prompt_list(prompts))]
        if not prompt_ids:
            return []
        runner = self._ensure_cache()
        bm = self.block_manager = BlockManager(self.num_blocks, self.block_size)
        longest = max(min(len(p) + params.max_new_tokens, self.max_model_len) for p in prompt_ids)
        # Refuses a sequence that could outgrow a sliding attention window (not implemented, see config.py).
        self.model.config.check_length(longest)
        if cdiv(longest, self.block_size) > bm.num_blocks:
            raise ValueError(f"one sequence of {longest} tokens needs {cdiv(longest, self.block_size)} KV blocks "
                             f"but the cache has {bm.num_blocks}: raise num_blocks or lower max_new_tokens")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        scheduler = Scheduler(bm, self.max_batch_size, self.max_prefill_tokens)
        groups: list[list[Sequence]] = []
        for i, ids in enumerate(prompt_ids):
            group = [Sequence(self._next_seq_id + j, first_prompt_index + i, j, ids, seed) for j in range(n)]
            self._next_seq_id += n
            groups.append(group)
            # A group larger than the batch goes in as several groups (each prefills the prompt).
            for start in range(0, n, self.max_batch_size):
                scheduler.add_group(group[start:start + self.max_batch_size])

        stats = EngineStats()
        stop_ids = set(params.stop_token_ids)
        eos_ids = set() if params.ignore_eos else set(self.eos_token_ids) - stop_ids
        start_time = time.perf_counter()
        # On the CPU, packed_for_rollout swaps in fused, pre-packed projection weights for this call.
        with torch.inference_mode(), self.model.packed_for_rollout():
            while scheduler.has_work():
                batch = scheduler.schedule()
                tokens, logprobs = runner.run(batch, params)
                for seq, token, logprob in zip(batch.seqs, tokens, logprobs):
                    seq.token_ids.append(token)
                    seq.logprobs.append(logprob)
                    reason = self._finish_reason(seq, token, params, eos_ids, stop_ids)
                    if reason is not None:
                        scheduler.finish(seq, reason)
                scheduler.remove_finished()
                stats.prefill_steps += batch.is_prefill
                stats.decode_steps += not batch.is_prefill
                stats.generated_tokens += len(tokens)
        stats.seconds = time.perf_counter() - start_time
        stats.preemptions = scheduler.num_preemptions
        self.stats = stats
        assert bm.num_free == bm.num_blocks, "KV blocks leaked"
        return [[self._completion(seq) for seq in group] for group in groups]

    def _prompt_ids(self, prompt: Prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer; pass token ids or RolloutEngine(model, tokenizer)")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {index} is empty; every prompt needs at least one token")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt {index} holds token ids outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; the context holds {self.max_model_len} "
                             "(max_model_len), which leaves no room for a completion")
        return ids

    def _finish_reason(self, seq: Sequence, token: int, params: SamplingParams, eos_ids: set[int],
                       stop_ids: set[int]) -> str | None:
        if token in stop_ids:
            return "stop"
        if token in eos_ids:
            return "eos"
        if params.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.token_ids, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
            if hits:
                seq.stop_text_at = min(hits)
                return "stop"
        if len(seq.token_ids) >= params.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _completion(self, seq: Sequence) -> Completion:
        text = ""
        if self.tokenizer is not None:
            ids = seq.token_ids
            if seq.finish_reason in ("eos", "stop") and seq.stop_text_at is None:
                ids = ids[:-1]  # the EOS / stop token itself is not text
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if seq.stop_text_at is not None:
                text = text[:seq.stop_text_at]
        return Completion(list(seq.token_ids), list(seq.logprobs), text, seq.finish_reason or "length")


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):  # one prompt of token ids
        return [prompts]
    for p in prompts:
        if not isinstance(p, (str, list, tuple)) and not (isinstance(p, torch.Tensor) and p.dim() == 1):
            raise TypeError(f"a prompt is a string or a list of token ids, got {type(p).__name__}")
    return [p.tolist() if isinstance(p, torch.Tensor) else p for p in prompts]


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
