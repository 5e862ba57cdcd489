"""Shared-prompt training attention (model/attention.py): exact against dense references, O(tokens) memory.

References (model/attention_reference.py): the dense [N, N] mask in float64 (ground truth), the former
tree-mask SDPA path, and plain packing (every completion with its own copy of the prompt).
"""

from __future__ import annotations

import functools
import logging
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlvr_fast import LlamaConfig, LlamaForCausalLM
from rlvr_fast.grpo.batching import Sample, make_micro_batch
from rlvr_fast.kernels._common import interpreting
from rlvr_fast.kernels.flash_attention import flash_attention
from rlvr_fast.model import attention as attn
from rlvr_fast.model.attention import PackedBatch, shared_prompt_attention, shared_prompt_gathered
from rlvr_fast.model.attention_reference import (masked_attention, shared_prompt_mask, tree_mask_attention,
                                                 varlen_attention_reference)
from tests.tiny import TINY_CONFIG

# (prompt lengths, completion lengths per prompt): several groups per micro-batch, G from 1 to 16, lengths
# that differ within a group, 1-token prompts and completions, empty completions (a 1-token completion
# feeds nothing), a prompt whose completions are all empty, equal lengths (one batched kernel call).
LAYOUTS = [
    ([5], [[3]]),
    ([1], [[1, 4, 2]]),
    ([7, 1, 4], [[5, 0, 2], [3], [0, 0]]),
    ([3, 9], [[1] * 16, [6, 2, 11, 1, 4, 7, 3, 9, 2, 5, 8, 1, 6, 2, 3, 10]]),
    ([6, 6], [[6, 6, 6, 6], [6, 6]]),  # prompts and completions of one length: runs never mix the two
    ([33], [[40, 17, 64, 1, 29, 50, 8, 33]]),
]
HEADS = [(4, 2), (3, 3)]  # (query heads, KV heads): GQA and MHA


def qkv(batch: PackedBatch, heads: tuple[int, int], dtype: torch.dtype, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = batch.positions.numel()
    return [torch.randn(n, h, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for h in (heads[0], heads[1], heads[1])]


def outputs_and_grads(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))
    return [out.detach().double(), *(g.double() for g in grads)]


def paths(batch: PackedBatch, triton: bool = True) -> dict:
    found = {
        "cpu two-pass": lambda q, k, v: shared_prompt_attention(q, k, v, batch),
        "gathered (CUDA formulation)": lambda q, k, v: shared_prompt_gathered(q, k, v, batch, varlen_attention_reference),
        "tree mask": lambda q, k, v: tree_mask_attention(q, k, v, batch),
    }
    if triton and interpreting():  # the CUDA formulation on the Triton kernel it runs with on a GPU without flash-attn
        triton_varlen = functools.partial(flash_attention, backend="triton")
        found["gathered + Triton flash_attention"] = lambda q, k, v: shared_prompt_gathered(q, k, v, batch,
                                                                                             triton_varlen)
    return found


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp32_outputs_and_grads_equal_the_dense_reference(layout, heads):
    batch = PackedBatch.shared_prompt(*layout)
    q, k, v = qkv(batch, heads, torch.float64)
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = shared_prompt_mask(batch)
    want = outputs_and_grads(lambda q, k, v: masked_attention(q, k, v, mask), q, k, v, grad_out)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    for name, fn in paths(batch).items():
        got = outputs_and_grads(fn, q32, k32, v32, grad_out)
        for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m: f"{name} {what}: {m}")


def test_calls_cut_at_max_rows_stay_exact(monkeypatch):
    """Runs and pass-2 blocks cut into calls of at most CPU_MAX_ROWS rows (4096 in use; 5 here)."""
    monkeypatch.setattr(attn, "CPU_MAX_ROWS", 5)
    test_float64_path_is_exact(LAYOUTS[3])
    test_float64_path_is_exact(LAYOUTS[4])
    batch = PackedBatch.shared_prompt(*LAYOUTS[4])
    assert max(count * length for _, count, length in batch.runs()) <= 6  # one 6-token sequence per call
    assert max(qs.stop - qs.start for qs, _, _ in attn._cross(batch.shared, 4)) == 5


@pytest.mark.parametrize("layout", LAYOUTS[2:5])
def test_float64_path_is_exact(layout):
    """The kernels run in float64 too: the merge and the backward on the merged lse add no error of their own."""
    batch = PackedBatch.shared_prompt(*layout)
    q, k, v = qkv(batch, HEADS[0], torch.float64)
    grad_out = torch.randn(q.shape, dtype=torch.float64)
    want = outputs_and_grads(lambda q, k, v: masked_attention(q, k, v, shared_prompt_mask(batch)), q, k, v, grad_out)
    got = outputs_and_grads(lambda q, k, v: shared_prompt_attention(q, k, v, batch), q, k, v, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("layout", [LAYOUTS[2], LAYOUTS[3], LAYOUTS[5]])
def test_bf16_error_at_most_twice_pytorch_bf16(layout, heads):
    """flash-attn's rule: error against a float64 reference at most 2x that of PyTorch's own bf16 SDPA
    (the tree-mask path in bf16), for the output and every gradient."""
    batch = PackedBatch.shared_prompt(*layout)
    q, k, v = qkv(batch, heads, torch.float64, d=64)
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = outputs_and_grads(lambda q, k, v: masked_attention(q, k, v, shared_prompt_mask(batch)), q, k, v, grad_out)
    bf = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    baseline = outputs_and_grads(lambda q, k, v: tree_mask_attention(q, k, v, batch), *bf, grad_out)
    for name, fn in paths(batch, triton=False).items():  # no bf16 dots in the interpreter
        if name == "tree mask":
            continue
        got = outputs_and_grads(fn, *bf, grad_out)
        for what, a, base, ref in zip(("out", "dq", "dk", "dv"), got, baseline, want):
            err, base_err = (a - ref).abs().max().item(), (base - ref).abs().max().item()
            assert err <= 2 * base_err, f"{name} {what}: bf16 error {err:.3g} > 2 x PyTorch bf16's {base_err:.3g}"


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates (bytes)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_memory_is_linear_in_tokens():
    """One layer, G = 16 completions of 2048 tokens after a 128-token prompt (fwd + bwd): no tensor larger
    than plain packing's largest. An [L, L] mask alone would be L^2 = 1.1e9 elements here, against
    ~1e6 for q (1 head of 32 dims keeps the test quick)."""
    p, g, c = 128, 16, 2048
    shared = PackedBatch.shared_prompt([p], [[c] * g])
    plain = PackedBatch.from_cu_seqlens(torch.arange(g + 1, dtype=torch.int32) * (p + c))
    largest = {}
    for name, batch in (("shared", shared), ("plain", plain)):
        q, k, v = qkv(batch, (1, 1), torch.float32, d=32)
        with LargestTensor() as mode:
            attn.varlen_causal_attention(q, k, v, batch).sum().backward()
        largest[name] = mode.largest
    assert largest["shared"] <= largest["plain"], largest
    assert largest["shared"] <= 4 * (p + g * c) * 32 * 4, largest  # a few [N, heads, head_dim] fp32 tensors at most


def tiny_model(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig.from_dict({**TINY_CONFIG, "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.to(dtype)


def group_samples() -> list[Sample]:
    """Three groups (G = 5, 1 and 16, completions of 1 to 23 tokens, one 1-token prompt) and a lone sample."""
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()  # noqa: E731
    out, specs = [], [(9, (5, 1, 12, 3, 23)), (1, (7,)), (4, tuple(int(x) for x in torch.randint(1, 15, (16,), generator=g)))]
    for group, (plen, lens) in enumerate(specs):
        prompt = rand(plen)
        out += [Sample(prompt, rand(n), 0.1 * j - 0.3, 0, group=group) for j, n in enumerate(lens)]
    out.append(Sample(rand(6), rand(5), 0.2, 0))
    for i, s in enumerate(out):
        s.index = i
    return out


def model_outputs_and_grads(model: LlamaForCausalLM, share: bool) -> list[torch.Tensor]:
    mb = make_micro_batch(group_samples(), share_prompts=share)
    model.zero_grad()
    hidden = mb.gather(model.forward_packed(mb.input_ids, mb.packed_batch())).float() * mb.mask[..., None]
    (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
    return [hidden.detach()] + [p.grad.float().clone() for p in model.parameters()]


def test_whole_model_fp32_equals_plain_packing_and_the_tree_mask(monkeypatch):
    model = tiny_model()
    plain = model_outputs_and_grads(model, share=False)
    shared = model_outputs_and_grads(model, share=True)
    monkeypatch.setattr(attn, "shared_prompt_attention", tree_mask_attention)
    tree = model_outputs_and_grads(model, share=True)
    names = ["hidden"] + [n for n, _ in model.named_parameters()]
    for name, a, b, t in zip(names, shared, plain, tree):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name} vs plain: {m}")
        torch.testing.assert_close(a, t, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name} vs tree mask: {m}")


def test_whole_model_bf16_error_at_most_twice_plain_packing():
    """bf16 hidden states and every parameter's gradient, against the fp32 model packed plainly: the shared
    path's error at most 2x plain packing's (PyTorch's bf16 SDPA). Sharing changes rounding (a prompt's
    gradients are summed over its group inside the bf16 matmuls), not the math."""
    ref = model_outputs_and_grads(tiny_model(torch.float32), share=False)
    model = tiny_model(torch.bfloat16)
    plain = model_outputs_and_grads(model, share=False)
    shared = model_outputs_and_grads(model, share=True)
    names = ["hidden"] + [n for n, _ in model.named_parameters()]
    for name, a, b, r in zip(names, shared, plain, ref):
        err, base = (a - r).abs().max().item(), (b - r).abs().max().item()
        assert err <= 2 * base, f"{name}: bf16 error {err:.3g} > 2 x plain packing's {base:.3g}"


def test_backend_is_logged(caplog):
    attn._logged_backends.clear()
    batch = PackedBatch.shared_prompt([3], [[2, 2]])
    with caplog.at_level(logging.INFO, logger="rlvr_fast"):
        shared_prompt_attention(*qkv(batch, (2, 1), torch.float32), batch)
    assert "attention backend: torch cpu flash (shared-prompt" in caplog.text


def test_cuda_dispatch_takes_the_triton_kernel_without_flash_attn(monkeypatch):
    """Without flash-attn (or in fp32) CUDA tensors go to rlvr_fast.kernels.flash_attention (imported lazily)."""
    fake = types.ModuleType("rlvr_fast.kernels.flash_attention")
    fake.flash_attention = varlen_attention_reference
    monkeypatch.setitem(sys.modules, "rlvr_fast.kernels.flash_attention", fake)
    monkeypatch.setattr(attn, "flash_attn_varlen_func", None)
    name, fn = attn._cuda_varlen(torch.bfloat16)
    # the model's batches are built from host lengths: no per-call host read (device sync) of cu_seqlens
    assert name == "triton flash_attention" and fn.func is varlen_attention_reference
    assert fn.keywords == {"check_seqlens": False}
    monkeypatch.setattr(attn, "flash_attn_varlen_func", "flash-attn")
    assert attn._cuda_varlen(torch.bfloat16)[0] == "flash_attn"
    assert attn._cuda_varlen(torch.float32)[0] == "triton flash_attention"  # flash-attn has no fp32


@pytest.mark.parametrize("prompts,completions", [([], []), ([0], [[2]]), ([3], [[1], [2]]), ([3], [[-1]])])
def test_bad_layouts_are_refused(prompts, completions):
    with pytest.raises(ValueError, match="prompt|completion"):
        PackedBatch.shared_prompt(prompts, completions)
