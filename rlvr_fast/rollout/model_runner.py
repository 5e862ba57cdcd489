"""ModelRunner: owns the paged KV cache and runs the model for one scheduled batch.

The model is the trainer's own module (same parameters, no copy); this class only adds the KV
cache tensors [num_layers, num_blocks, block_size, kv_heads, head_dim] for K and V, turns a
ScheduledBatch into tensors (token ids, positions, cache slots, block tables), runs the forward
and samples. On CUDA, decode steps replay CUDA graphs captured once per batch-size bucket: the
graph reads its inputs from static buffers, padded rows write to slot -1 (skipped) and attend to
nothing (context length 0).
"""

from __future__ import annotations

import logging
import math

import torch

from rlvr_fast.kernels import HAS_TRITON
from rlvr_fast.kernels.sampling import sample
from rlvr_fast.model.attention import KVCacheContext, PackedBatch
from rlvr_fast.model.llama import LlamaForCausalLM
from rlvr_fast.rollout.sampling_params import SamplingParams
from rlvr_fast.rollout.scheduler import ScheduledBatch

log = logging.getLogger("rlvr_fast")

def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype | None = None) -> int:
    cfg = model.config
    itemsize = torch.empty((), dtype=dtype or model.dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * itemsize


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, max_batch_size: int,
                 max_model_len: int, use_cuda_graphs: bool):
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = model.device
        shape = (cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        # Zeros, not empty: padded block-table entries point at real blocks whose values are masked
        # out, and 0 * NaN from uninitialized memory would still poison the output.
        self.k_cache = torch.zeros(shape, dtype=model.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=model.dtype, device=self.device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_io: dict[str, torch.Tensor] = {}
        # Graphs need the Triton decode kernels: the PyTorch paths read lengths back to the host.
        self._use_graphs = use_cuda_graphs and self.device.type == "cuda" and HAS_TRITON
        self._max_batch_size = max_batch_size

    # ------------------------------------------------------------------ steps

    def run(self, batch: ScheduledBatch, params: SamplingParams) -> tuple[list[int], list[float]]:
        """Forward one scheduled batch and sample a token for each of batch.seqs."""
        logits = self._prefill(batch) if batch.is_prefill else self._decode(batch)
        keys = None
        if not params.greedy:
            keys = torch.tensor([s.rng_key() for s in batch.seqs], dtype=torch.int64, device=self.device)
        elif self.device.type == "cuda":
            keys = torch.zeros(len(batch.seqs), dtype=torch.int64, device=self.device)
        tokens, logprobs = sample(logits, keys, params.temperature, params.top_k, params.top_p)
        return tokens.tolist(), logprobs.tolist()

    def _prefill(self, batch: ScheduledBatch) -> torch.Tensor:
        """One packed forward over each group's tokens; logits [num_seqs, V] (a group's row repeated)."""
        bs, dev = self.block_size, self.device
        ids, slots, lengths = [], [], []
        for group in batch.groups:
            seq = group[0]  # every sequence of a group has the same tokens; the first one's blocks get written
            tokens = seq.all_token_ids()
            pos = torch.arange(len(tokens))
            table = torch.tensor(seq.block_table, dtype=torch.int64)
            ids.append(torch.tensor(tokens, dtype=torch.int64))
            slots.append(table[pos // bs] * bs + pos % bs)
            lengths.append(len(tokens))
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        packed = PackedBatch.from_cu_seqlens(cu.to(dev), max(lengths))
        ctx = KVCacheContext(self.k_cache, self.v_cache, torch.cat(slots).to(dev), packed.positions, prefill=packed)
        hidden = self.model.forward_cached(torch.cat(ids).to(dev), ctx)
        if batch.copy_src:  # give every other sample its own copy of the partial last prompt block
            src = torch.tensor(batch.copy_src, device=dev)
            dst = torch.tensor(batch.copy_dst, device=dev)
            self.k_cache[:, dst] = self.k_cache[:, src]
            self.v_cache[:, dst] = self.v_cache[:, src]
        last = cu[1:].long().to(dev) - 1
        logits = self.model.logits(hidden[last])  # [num_groups, V]
        sizes = torch.tensor([len(g) for g in batch.groups], device=dev)
        return logits.repeat_interleave(sizes, dim=0) if len(batch.seqs) > len(batch.groups) else logits

    def _decode(self, batch: ScheduledBatch) -> torch.Tensor:
        bs = self.block_size
        seqs = batch.seqs
        positions = [s.num_tokens - 1 for s in seqs]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
        ids = [s.last_token for s in seqs]
        if self._use_graphs and len(seqs) <= self._max_graph_batch():
            return self._decode_graph(ids, positions, slots, [s.block_table for s in seqs])
        dev = self.device
        width = max(len(s.block_table) for s in seqs)
        ctx = KVCacheContext(
            self.k_cache, self.v_cache,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            block_tables=torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                                      dtype=torch.int32, device=dev),
            context_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=dev),
            max_context_len=max(positions) + 1,
        )
        hidden = self.model.forward_cached(torch.tensor(ids, dtype=torch.int64, device=dev), ctx)
        return self.model.logits(hidden)

    # ------------------------------------------------------------------ CUDA graphs (untested on CPU)

    def _max_graph_batch(self) -> int:
        return min(self._max_batch_size, 256)

    def _graph_sizes(self) -> list[int]:
        top = self._max_graph_batch()
        sizes = [1, 2, 4, 8] + list(range(16, top + 1, 16))
        return sorted({s for s in sizes if s <= top} | {top})

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        """Capture one decode graph per batch-size bucket (largest first, sharing one memory pool)."""
        dev, top = self.device, self._max_graph_batch()
        # Host-to-device copies are not allowed inside a capture: keep the rotary table on the device.
        self.model._inv_freq = self.model._inv_freq.to(dev)
        max_blocks = math.ceil(self.max_model_len / self.block_size)
        io = self._graph_io = dict(
            ids=torch.zeros(top, dtype=torch.int64, device=dev),
            positions=torch.zeros(top, dtype=torch.int64, device=dev),
            slots=torch.full((top,), -1, dtype=torch.int64, device=dev),
            tables=torch.zeros(top, max_blocks, dtype=torch.int32, device=dev),
            lens=torch.zeros(top, dtype=torch.int32, device=dev),
        )
        pool = None
        for size in reversed(self._graph_sizes()):
            ctx = KVCacheContext(self.k_cache, self.v_cache, io["slots"][:size], io["positions"][:size],
                                 block_tables=io["tables"][:size], context_lens=io["lens"][:size])
            run = lambda: self.model.forward_cached(io["ids"][:size], ctx)  # noqa: E731
            run()  # warm-up: compiles the Triton kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                io[f"hidden{size}"] = run()
            pool = graph.pool() if pool is None else pool
            self._graphs[size] = graph
        torch.cuda.synchronize()
        log.info("captured %d CUDA decode graphs (batch sizes %s)", len(self._graphs), self._graph_sizes())

    def _decode_graph(self, ids: list[int], positions: list[int], slots: list[int],
                      tables: list[list[int]]) -> torch.Tensor:
        if not self._graphs:
            self.capture_cuda_graphs()
        b = len(ids)
        size = next(s for s in self._graph_sizes() if s >= b)
        io = self._graph_io
        io["slots"].fill_(-1)
        io["lens"].zero_()
        io["ids"][:b] = torch.tensor(ids, dtype=torch.int64)
        io["positions"][:b] = torch.tensor(positions, dtype=torch.int64)
        io["slots"][:b] = torch.tensor(slots, dtype=torch.int64)
        io["lens"][:b] = torch.tensor([p + 1 for p in positions], dtype=torch.int32)
        width = max(map(len, tables))
        io["tables"][:b, :width] = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        self._graphs[size].replay()
        return self.model.logits(io[f"hidden{size}"][:b])
