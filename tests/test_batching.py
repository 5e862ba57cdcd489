"""Training micro-batches: shared-prompt segments give the hidden states of plain packed sequences."""

from __future__ import annotations

import pytest
import torch

from rlvr_fast import LlamaConfig, LlamaForCausalLM
from rlvr_fast.grpo.batching import Sample, make_micro_batch, split_by_tokens
from tests.tiny import TINY_CONFIG


def samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()  # noqa: E731
    p0, p1 = rand(7), rand(4)
    out = [Sample(p0, rand(n), 0.5 - k, 0, group=0) for k, n in enumerate((5, 1, 3))]
    out += [Sample(p1, rand(n), 1.0 * k, 0, group=1) for k, n in enumerate((2, 6))]
    out += [Sample(rand(3), rand(4), 0.1, 0)]  # group -1: never shared
    for i, s in enumerate(out):
        s.index = i
    return out


def test_layouts_and_token_counts():
    s = samples()
    plain, shared = make_micro_batch(s, share_prompts=False), make_micro_batch(s)
    assert plain.prompt_lens is None and plain.cu_seqlens.numel() == len(s) + 1
    assert plain.num_input_tokens == sum(x.length for x in s)
    # Prompts first (group 0: 7, group 1: 4, the lone sample: 3), then the completions' fed tokens
    # (4, 0, 2 | 1, 5 | 3); the empty one is no sequence.
    assert shared.prompt_lens == [7, 4, 3] and shared.completion_lens == [[4, 0, 2], [1, 5], [3]]
    assert shared.cu_seqlens.tolist() == [0, 7, 11, 14, 18, 20, 21, 26, 29]
    assert shared.positions.tolist() == [*range(7), *range(4), *range(3), *range(7, 11), 7, 8, 4, *range(4, 9), 3, 4, 5]
    assert shared.input_ids[:7].tolist() == s[0].prompt_ids and shared.input_ids[14:18].tolist() == s[0].completion_ids[:-1]
    assert shared.predictor_index[0, :5].tolist() == [6, 14, 15, 16, 17] and shared.predictor_index[1, 0] == 6
    assert torch.equal(plain.targets, shared.targets) and torch.equal(plain.mask, shared.mask)
    # The budget counts a continuing completion without its prompt.
    assert split_by_tokens(s, 13) == [s[:3], s[3:5], s[5:]]
    # A completion longer than its prompt shares it too (group 1: 5 fed tokens, 4-token prompt).
    assert make_micro_batch(s).completion_lens == [[4, 0, 2], [1, 5], [3]]
    assert split_by_tokens(s, 13, share_prompts=False) == [[x] for x in s]  # 11, 7, 9, 5, 9, 6 tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prompt_hidden_states_and_gradients_equal_plain(dtype):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_dict({**TINY_CONFIG, "architectures": ["LlamaForCausalLM"],
                                                    "model_type": "llama"})).to(dtype)
    results = []
    for share in (False, True):
        mb = make_micro_batch(samples(), share_prompts=share)
        model.zero_grad()
        hidden = mb.gather(model.forward_packed(mb.input_ids, mb.packed_batch()))  # [B, T, H]
        (hidden.float() * mb.mask[..., None]).pow(2).sum().backward()
        results.append((hidden.float() * mb.mask[..., None], model.model.layers[0].self_attn.q_proj.weight.grad.float()))
    (h_plain, g_plain), (h_shared, g_shared) = results
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(h_shared, h_plain, atol=tol, rtol=tol)
    torch.testing.assert_close(g_shared, g_plain, atol=tol * 10, rtol=tol)
