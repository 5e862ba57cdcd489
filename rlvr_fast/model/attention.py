"""Causal self-attention over a packed batch of variable-length sequences.

Training and prefill see many sequences of different lengths. They travel packed: tokens of all
sequences concatenated into one [N, heads, head_dim] tensor, with `cu_seqlens` ([B + 1] int32,
cumulative lengths) marking where each sequence starts. The linear layers then do no work on
padding at all. Only attention needs to know the sequence boundaries:

* CUDA: `flash_attn` (optional extra) takes the packed layout directly (`flash_attn_varlen_func`)
  in fp16/bf16; without it (or in fp32) the project's own Triton FlashAttention kernel
  (`rlvr_fast.kernels.flash_attention`, the same varlen interface) does.
* CPU: PyTorch's `scaled_dot_product_attention` runs on a padded [B, heads, L, head_dim] view,
  built by one scatter and undone by one gather. With right padding, the causal mask already keeps
  every real query away from the padding keys, so no extra mask is needed.

The backend is chosen per call from the tensors, and logged once.

Shared-prompt batches (GRPO training, `PackedBatch.shared_prompt`): the G completions of one prompt
need the prompt's keys and values, and computing the prompt once instead of G times saves most of
the work when prompts are long. Tokens are laid out prompts first, then completions:

    [p_1 | p_2 | ... | p_M | c_11 c_12 ... (prompt 1's completions) | c_21 ... | ...]

Each prompt and each completion is a causal sequence of its own, and completion c_mj additionally
sees every token of its prompt p_m. So the attention of a completion query over [p_m; c_mj] splits
into two parts with disjoint keys:

  pass 1, causal over each sequence (prompts and completions alike: plain varlen attention);
  pass 2, all of prompt m's completion tokens over prompt m's keys, no mask (every completion of a
          group reads the one copy of the prompt's keys and values).

For a completion query, pass 1 gives (o_1, lse_1) and pass 2 gives (o_2, lse_2); the exact result
over the union of keys is the log-sum-exp merge

  lse = log(exp(lse_1) + exp(lse_2)),   o = exp(lse_1 - lse) o_1 + exp(lse_2 - lse) o_2.

Memory is O(tokens) (no [L, L] mask, no copy of the prompt per completion) and the work is the
attended pairs: P^2/2 + sum_j (P C_j + C_j^2/2) per group. The backward of each pass is the usual
flash backward run with the MERGED output and lse: it recomputes P = exp(s - lse), the true
probabilities, and D = rowsum(dO * O), so each pass yields exactly its share of dQ, dK, dV, and the
prompt's dK/dV collect the sum over its completions. On the CPU both passes run PyTorch's fused
flash kernel (`_scaled_dot_product_flash_attention_for_cpu`, which returns the lse, and its
backward), under a small autograd.Function. On CUDA each completion's keys are gathered as
[prompt; own] and one varlen call with the causal diagonal aligned bottom-right does the
completions (flash-attn's convention, which the Triton kernel shares); the gather's backward sums
the prompt's gradients over the group.

Generation adds a paged KV cache (`KVCacheContext`): every layer writes the keys/values of the new
tokens into cache blocks, then either attends among the new tokens with the varlen path above
(prefill: the new tokens are whole sequences) or reads each sequence's cached blocks (decode: one
new token per sequence, `paged_attention`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger("rlvr_fast")

try:  # optional: pip install flash-attn (CUDA only)
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

# enable_gqa appeared in torch 2.5; older versions get K/V repeated per query head.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
_logged_backends: set[str] = set()
# CPU shared-prompt path: rows per kernel call. Each call's results are copied into the output buffers
# (the kernels have no out= form), so this bounds the extra memory; 4096 rows of 9 heads still keep
# both cores busy (measured: P=128, G=16 x C=1024 peak 1.2x plain packing's, 2.2x with whole runs).
CPU_MAX_ROWS = 4096


def _log_backend_once(name: str) -> None:
    if name not in _logged_backends:
        _logged_backends.add(name)
        log.info("attention backend: %s", name)


@dataclass
class SharedPrompts:
    """The prompt-sharing part of a PackedBatch (see the module doc for the token layout). Host ints:
    the CPU path loops over them and the CUDA path builds its gather index from them once."""

    num_prompt_tokens: int
    prompt_bounds: list[int]      # [M + 1] token boundaries of the prompts, from 0
    block_bounds: list[int]       # [M + 1] boundaries of each prompt's completion block, from num_prompt_tokens
    completion_lens: list[list[int]]  # per prompt, its completions' token counts (0 allowed)
    _gather: tuple | None = field(default=None, repr=False)  # CUDA: (kv index, cu_k, max_k), built by the first layer

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_bounds) - 1

    def gather_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Keys of every non-empty completion as rows of the packed k/v: [its prompt; itself], and their
        cu_seqlens [C + 1] int32 and max length."""
        if self._gather is None:
            rows, lens = [], []
            start = self.num_prompt_tokens
            for m, comps in enumerate(self.completion_lens):
                prompt = torch.arange(self.prompt_bounds[m], self.prompt_bounds[m + 1])
                for c in comps:
                    if c:
                        rows += [prompt, torch.arange(start, start + c)]
                        lens.append(prompt.numel() + c)
                        start += c
            cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            self._gather = (torch.cat(rows).to(device), cu.to(device), max(lens))
        return self._gather


@dataclass
class PackedBatch:
    """Where each token of a packed batch sits. Built once per forward, shared by every layer."""

    cu_seqlens: torch.Tensor  # [B + 1] int32, cumulative sequence lengths
    max_seqlen: int
    positions: torch.Tensor   # [N] int64, rotary position of each token
    seq_ids: torch.Tensor     # [N] int64, which sequence each token belongs to
    equal_lengths: bool       # every sequence is max_seqlen long: padding-free reshape suffices
    offsets: torch.Tensor | None = None     # [N] int64, slot of each token in its sequence (default: positions)
    shared: SharedPrompts | None = None     # shared-prompt batches only (see the module doc)
    _runs: list[tuple[int, int, int]] | None = field(default=None, repr=False)  # CPU: see runs()

    def __post_init__(self) -> None:
        if self.offsets is None:
            self.offsets = self.positions

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def longest_sequence(self) -> int:
        """Tokens in the longest sequence attention sees, a shared prompt counted with its completions (host int)."""
        if self.shared is None:
            return self.max_seqlen
        sp = self.shared
        return max(b - a + max(comps, default=0)
                   for a, b, comps in zip(sp.prompt_bounds, sp.prompt_bounds[1:], sp.completion_lens))

    def runs(self) -> list[tuple[int, int, int]]:
        """(first token, count, length) of runs of consecutive sequences of equal length: one run is a
        [count, length] block of the packed tokens, one batched kernel call without any copy. A run never
        spans the end of a shared-prompt batch's prompts, and holds at most CPU_MAX_ROWS tokens unless one
        sequence is longer: the CPU path copies each call's results into the output buffers, so only one
        call's worth of them is alive at a time (the peak memory of plain packing, plus that)."""
        if self._runs is None:
            bounds, self._runs = self.cu_seqlens.tolist(), []
            split = self.shared.num_prompt_tokens if self.shared is not None else -1
            for a, b in zip(bounds, bounds[1:]):
                last = self._runs[-1] if self._runs else None
                if last is not None and last[2] == b - a and a != split and (last[1] + 1) * last[2] <= CPU_MAX_ROWS:
                    self._runs[-1] = (last[0], last[1] + 1, last[2])
                else:
                    self._runs.append((a, 1, b - a))
        return self._runs

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> "PackedBatch":
        cu_seqlens = cu_seqlens.to(torch.int32)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        if lengths.numel() == 0 or bool((lengths <= 0).any()):
            raise ValueError(f"cu_seqlens must describe at least one non-empty sequence, got {cu_seqlens.tolist()}")
        if max_seqlen is None:
            max_seqlen = int(lengths.max())
        n = int(cu_seqlens[-1])
        seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
        positions = torch.arange(n, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq_ids]
        equal = bool((lengths == max_seqlen).all())
        return cls(cu_seqlens, max_seqlen, positions, seq_ids, equal)

    @classmethod
    def shared_prompt(cls, prompt_lens: list[int], completion_lens: list[list[int]],
                      device: torch.device | str = "cpu") -> "PackedBatch":
        """Prompts first, then each prompt's completions (module doc). prompt_lens [M] (each >= 1);
        completion_lens[m]: token counts of prompt m's completions as fed to the model (0 = nothing fed)."""
        if len(prompt_lens) != len(completion_lens) or not prompt_lens or min(prompt_lens) < 1:
            raise ValueError("shared_prompt needs one list of completion lengths per prompt and prompts of at least "
                             f"1 token; got prompt_lens {prompt_lens} and {len(completion_lens)} completion lists")
        if any(c < 0 for comps in completion_lens for c in comps):
            raise ValueError(f"completion lengths must be >= 0, got {completion_lens}")
        seq_lens = list(prompt_lens) + [c for comps in completion_lens for c in comps if c]
        positions = [range(p) for p in prompt_lens]
        positions += [range(p, p + c) for p, comps in zip(prompt_lens, completion_lens) for c in comps if c]
        cu = torch.tensor([0] + seq_lens).cumsum(0).to(device=device, dtype=torch.int32)
        batch = cls.from_cu_seqlens(cu, max(seq_lens))
        rotary = torch.tensor([i for r in positions for i in r], dtype=torch.long, device=device)
        num_prompt = sum(prompt_lens)
        prompt_bounds = torch.tensor([0] + list(prompt_lens)).cumsum(0).tolist()
        block_bounds = torch.tensor([0] + [sum(c) for c in completion_lens]).cumsum(0).tolist()
        batch.offsets, batch.positions, batch.equal_lengths = batch.positions, rotary, False
        batch.shared = SharedPrompts(num_prompt, prompt_bounds, block_bounds, [list(c) for c in completion_lens])
        return batch

    @classmethod
    def equal_length(cls, batch: int, seqlen: int, device: torch.device) -> "PackedBatch":
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        return cls.from_cu_seqlens(cu, seqlen)


@dataclass
class KVCacheContext:
    """Where one forward pass reads and writes the paged KV cache; built by the rollout engine.

    Cache tensors hold every layer: [num_layers, num_blocks, block_size, kv_heads, head_dim].
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor          # [N] int64: cache slot (block * block_size + offset) of each new token
    positions: torch.Tensor             # [N] int64: rotary position of each new token
    prefill: PackedBatch | None = None  # prefill: new tokens are whole sequences, attend among themselves
    block_tables: torch.Tensor | None = None  # decode: [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # decode: [B] int32, cached tokens incl. the new one
    max_context_len: int | None = None  # decode: host copy of context_lens.max() (None: read it when needed)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this layer's new k/v [N, Hkv, D] into the cache, then attention for q [N, Hq, D]."""
        # Imported here: the kernels package imports torch only, but keeps model import light.
        from rlvr_fast.kernels.paged_attention import paged_attention
        from rlvr_fast.kernels.paged_kv import write_kv

        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        write_kv(k, v, k_cache, v_cache, self.slot_mapping)
        if self.prefill is not None:
            return varlen_causal_attention(q, k, v, self.prefill)
        return paged_attention(q, k_cache, v_cache, self.block_tables, self.context_lens,
                               max_context_len=self.max_context_len)


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """q [N, Hq, D], k/v [N, Hkv, D] (Hq a multiple of Hkv) -> [N, Hq, D], causal within each sequence;
    with `batch.shared`, completions also see their whole prompt (module doc)."""
    if batch.shared is not None:
        return shared_prompt_attention(q, k, v, batch)
    if q.is_cuda:
        name, varlen = _cuda_varlen(q.dtype)
        _log_backend_once(f"{name} (varlen)")
        return varlen(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_seqlen, batch.max_seqlen, causal=True)
    _log_backend_once("torch sdpa (padded per sequence)")
    return _sdpa_padded(q, k, v, batch)


def shared_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Attention of a shared-prompt batch: q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D]. Exact, O(N) memory."""
    if batch.shared is None:
        raise ValueError("shared_prompt_attention needs a batch built by PackedBatch.shared_prompt")
    if q.is_cuda:
        name, varlen = _cuda_varlen(q.dtype)
        _log_backend_once(f"{name} (shared-prompt: prompts varlen causal, completions over gathered [prompt; own])")
        return shared_prompt_gathered(q, k, v, batch, varlen)
    _log_backend_once("torch cpu flash (shared-prompt: two passes merged by log-sum-exp)")
    return _SharedPromptCPU.apply(q.contiguous(), k.contiguous(), v.contiguous(), batch)


def _cuda_varlen(dtype: torch.dtype):
    """(name, varlen function) for CUDA tensors: flash-attn where it applies, else the project's Triton kernel."""
    if flash_attn_varlen_func is not None and dtype in (torch.float16, torch.bfloat16):
        return "flash_attn", flash_attn_varlen_func
    try:  # imported here: the Triton kernel is needed on CUDA only
        from rlvr_fast.kernels.flash_attention import flash_attention
    except ImportError as e:
        raise RuntimeError("attention on CUDA needs flash-attn (fp16/bf16) or triton for the project's FlashAttention "
                           f"kernel: pip install triton (import failed: {e})") from e
    # PackedBatch built cu_seqlens from host lengths: no host read (a device sync) in every layer's call.
    return "triton flash_attention", functools.partial(flash_attention, check_seqlens=False)


def shared_prompt_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch, varlen) -> torch.Tensor:
    """The shared-prompt attention as two varlen calls (flash-attn's interface and causal convention):
    prompts causal among themselves; each completion over the rows [its prompt; itself], causal with the
    diagonal aligned bottom-right. The gather copies the prompt's K/V once per completion (O(tokens));
    its backward sums their gradients over the group."""
    sp = batch.shared
    n_p, m = sp.num_prompt_tokens, sp.num_prompts
    cu_p = batch.cu_seqlens[:m + 1]
    max_p = max(b - a for a, b in zip(sp.prompt_bounds, sp.prompt_bounds[1:]))
    out_p = varlen(q[:n_p], k[:n_p], v[:n_p], cu_p, cu_p, max_p, max_p, causal=True)
    if q.shape[0] == n_p:  # every completion empty
        return out_p
    rows, cu_k, max_k = sp.gather_index(q.device)
    cu_q = batch.cu_seqlens[m:] - n_p
    max_q = max(c for comps in sp.completion_lens for c in comps)
    out_c = varlen(q[n_p:], k.index_select(0, rows), v.index_select(0, rows), cu_q, cu_k, max_q, max_k, causal=True)
    return torch.cat([out_p, out_c])


# ---- CPU: PyTorch's fused flash kernels, two passes merged by log-sum-exp ----------------------------

def _cpu_flash(q, k, v, causal):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)


def _cpu_flash_bwd(dout, q, k, v, out, lse, causal):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal)


def _rows(x: torch.Tensor, start: int, count: int, length: int) -> torch.Tensor:
    """Packed rows [start, start + count * length) of x [N, H, ...] as [count, H, length, ...] (a view)."""
    return x[start:start + count * length].unflatten(0, (count, length)).transpose(1, 2)


def _packed(x: torch.Tensor) -> torch.Tensor:
    """[count, H, length, ...] (the CPU kernels' outputs, token-major in memory) -> packed rows [count * length, H, ...]."""
    return x.transpose(1, 2).flatten(0, 1)


def _split(length: int, heads: int) -> int:
    """Into how many batch entries the rows of one pass-2 call are cut (the prompt's keys broadcast to
    each, no copy). The CPU backward parallelises over batch x heads only (9 heads on 2 threads would
    leave one idle a ninth of the time), and ~1k-row entries run the kernel's tiles faster than one long
    entry (measured: 16 x 1024 rows over 128 keys ~10% less CPU time than 1 x 16384)."""
    threads = torch.get_num_threads()
    fits = [d for d in range(1, 65) if length % d == 0 and (d == 1 or length // d >= 768)]
    balanced = [d for d in fits if d * heads % threads == 0]
    balanced = balanced or [d for d in range(2, threads + 1) if length % d == 0 and d * heads % threads == 0]
    return max(balanced or fits)


def _cross(sp: SharedPrompts, heads: int) -> list[tuple[slice, slice, int]]:
    """Pass-2 calls: (completion rows, their prompt's rows, batch split), at most CPU_MAX_ROWS completion rows
    per call (for the same reason as PackedBatch.runs)."""
    calls = []
    for m in range(sp.num_prompts):
        qa, qb = sp.num_prompt_tokens + sp.block_bounds[m], sp.num_prompt_tokens + sp.block_bounds[m + 1]
        for a in range(qa, qb, CPU_MAX_ROWS):
            b = min(a + CPU_MAX_ROWS, qb)
            calls.append((slice(a, b), slice(sp.prompt_bounds[m], sp.prompt_bounds[m + 1]), _split(b - a, heads)))
    return calls


def _queries(x: torch.Tensor, rows: slice, nb: int) -> torch.Tensor:  # -> [nb, H, L / nb, ...]
    return x[rows].unflatten(0, (nb, -1)).transpose(1, 2)


def _keys(x: torch.Tensor, rows: slice, nb: int) -> torch.Tensor:  # -> [nb, H, P, D], one copy broadcast
    return x[rows].unsqueeze(0).transpose(1, 2).expand(nb, -1, -1, -1)


class _SharedPromptCPU(torch.autograd.Function):
    """Both passes of the module doc with the CPU flash kernel; saves q, k, v, the merged out and lse.
    Each kernel result is folded into the one output buffer (forward) or dq/dk/dv (backward) as soon as
    it exists, so at most one call's results are alive besides them: the peak memory stays a few
    [N, H, D] tensors."""

    @staticmethod
    def forward(ctx, q, k, v, batch: PackedBatch):
        sp = batch.shared
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:2], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)  # [N, Hq]
        for start, count, length in batch.runs():  # pass 1: every prompt and completion, causal
            o, l = _cpu_flash(*(_rows(x, start, count, length) for x in (q, k, v)), True)
            _rows(out, start, count, length).copy_(o)
            _rows(lse, start, count, length).copy_(l)
            del o, l
        for qs, ks, nb in _cross(sp, q.shape[1]):  # pass 2: each prompt's completion tokens over its keys
            o2, l2 = _cpu_flash(_queries(q, qs, nb), _keys(k, ks, nb), _keys(v, ks, nb), False)
            o1, l1 = out[qs], lse[qs]
            d = _packed(l2) - l1  # merge: o = o1 + sigmoid(l2 - l1) (o2 - o1), lse = l1 + softplus(l2 - l1)
            w = torch.sigmoid(d).unsqueeze(-1)
            if o1.dtype == w.dtype:
                o1.lerp_(_packed(o2), w)
            else:  # bf16/fp16: blend in fp32, round once
                o1.copy_(torch.lerp(o1.float(), _packed(o2).float(), w))
            l1.add_(F.softplus(d))
            del o2, l2
        ctx.batch = batch
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        batch = ctx.batch
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for start, count, length in batch.runs():  # every token is in exactly one pass-1 sequence: write
            r = lambda x: _rows(x, start, count, length)  # noqa: E731
            gq, gk, gv = _cpu_flash_bwd(r(dout), r(q), r(k), r(v), r(out), r(lse), True)
            r(dq).copy_(gq), r(dk).copy_(gk), r(dv).copy_(gv)
            del gq, gk, gv
        for qs, ks, nb in _cross(batch.shared, q.shape[1]):  # pass 2 adds to the completions' dq, the prompts' dk, dv
            gq, gk, gv = _cpu_flash_bwd(_queries(dout, qs, nb), _queries(q, qs, nb), _keys(k, ks, nb), _keys(v, ks, nb),
                                        _queries(out, qs, nb), _queries(lse, qs, nb), False)
            dq[qs] += _packed(gq)
            dk[ks] += _packed(gk.sum(0, keepdim=True)) if nb > 1 else _packed(gk)
            dv[ks] += _packed(gv.sum(0, keepdim=True)) if nb > 1 else _packed(gv)
            del gq, gk, gv
        return dq, dk, dv, None


def _sdpa_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    n, hq, d = q.shape
    b, length = batch.num_seqs, batch.max_seqlen
    offsets = batch.offsets  # slot of each token in its padded row
    if batch.equal_lengths:  # a plain [B, T] batch: reshape, no copy
        pad = lambda x: x.view(b, length, x.shape[1], d)
    else:
        def pad(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros(b, length, x.shape[1], d)
            out[batch.seq_ids, offsets] = x
            return out
    # [B, L, H, D] -> [B, H, L, D]
    qp, kp, vp = (pad(x).transpose(1, 2) for x in (q, k, v))
    if hq != k.shape[1]:
        if _SDPA_HAS_GQA:
            out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
        else:
            groups = hq // k.shape[1]
            out = F.scaled_dot_product_attention(qp, kp.repeat_interleave(groups, 1),
                                                 vp.repeat_interleave(groups, 1), is_causal=True)
    else:
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
    out = out.transpose(1, 2)  # [B, L, Hq, D]
    if batch.equal_lengths:
        return out.reshape(n, hq, d)
    return out[batch.seq_ids, offsets]
