"""Rollout kernels (paged KV write, paged decode attention, sampling): Triton (interpreter on CPU) and the
PyTorch paths against naive references; sampling distributions by chi-square."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlvr_fast.kernels.paged_attention import paged_attention
from rlvr_fast.kernels.paged_kv import write_kv
from rlvr_fast.kernels.paged_reference import log_softmax_at, paged_attention_naive, top_k_top_p_mask
from rlvr_fast.kernels.sampling import sample

triton = pytest.importorskip("triton")
BACKENDS = ["torch", "triton"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def shared_prefix_tables(lengths: list[int], block_size: int, num_blocks: int, shared_blocks: int, seed: int = 0):
    """Block tables where every sequence starts with the same `shared_blocks` blocks (a GRPO group)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    shared, rest = perm[:shared_blocks], perm[shared_blocks:]
    width = max(-(-n // block_size) for n in lengths)
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    for i, n in enumerate(lengths):
        own = -(-n // block_size) - shared_blocks
        row = shared + [rest.pop() for _ in range(own)]
        tables[i, :len(row)] = torch.tensor(row)
    return tables


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hq, hkv, d, block_size", [(6, 2, 16, 4), (4, 4, 8, 8), (9, 3, 24, 16)])
def test_paged_attention_matches_naive(backend, hq, hkv, d, block_size):
    lengths = [1 * 0 + 3 * block_size + 1, 5, 17, 3 * block_size, 33]  # odd lengths; 3 shared prefix blocks
    lengths = [max(n, 3 * block_size + 1) if i != 1 else n for i, n in enumerate(lengths)]
    num_blocks = 48
    g = torch.Generator().manual_seed(1)
    tables = shared_prefix_tables(lengths, block_size, num_blocks, shared_blocks=0)
    tables[[0, 2, 3, 4], :3] = tables[0, :3]  # four sequences share their first three blocks
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(DEVICE)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(DEVICE)
    q = torch.randn(len(lengths), hq, d, generator=g).to(DEVICE)
    lens = torch.tensor(lengths, dtype=torch.int32)
    got = paged_attention(q, k_cache, v_cache, tables.to(DEVICE), lens.to(DEVICE), backend=backend)
    want = paged_attention_naive(q.cpu(), k_cache.cpu(), v_cache.cpu(), tables, lens)
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-5, rtol=2e-5)


def test_paged_attention_zero_length_rows_are_zero():
    """CUDA-graph padding rows (context length 0) must produce zeros, not NaN (Triton path)."""
    k_cache = torch.randn(4, 4, 1, 8, device=DEVICE)
    q = torch.randn(2, 2, 8, device=DEVICE)
    tables = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    out = paged_attention(q, k_cache, k_cache, tables, torch.tensor([3, 0], dtype=torch.int32, device=DEVICE),
                          backend="triton")
    assert torch.isfinite(out).all() and (out[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_kv_matches_reference(backend):
    num_blocks, block_size, hkv, d = 9, 4, 3, 12
    g = torch.Generator().manual_seed(2)
    k = torch.randn(11, hkv, d, generator=g)
    v = torch.randn(11, hkv, d, generator=g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:11]
    slots[3] = -1  # skipped
    k_cache = torch.zeros(num_blocks, block_size, hkv, d)
    v_cache = torch.zeros(num_blocks, block_size, hkv, d)
    kc, vc = k_cache.to(DEVICE), v_cache.to(DEVICE)
    write_kv(k.to(DEVICE), v.to(DEVICE), kc, vc, slots.to(DEVICE), backend=backend)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            k_cache[s // block_size, s % block_size] = k[i]
            v_cache[s // block_size, s % block_size] = v[i]
    assert torch.equal(kc.cpu(), k_cache) and torch.equal(vc.cpu(), v_cache)


# ------------------------------------------------------------------------------------------ sampling

def keys(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("backend, temperature, draws", [("torch", 1.0, 20000), ("torch", 0.5, 20000),
                                                          ("triton", 0.7, 1500)])  # the interpreter is slow
def test_sampling_frequencies_chi_square(backend, temperature, draws):
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.25])
    logits = row.repeat(draws, 1).to(DEVICE)
    tokens, logprobs = sample(logits, keys(draws), temperature, backend=backend)
    observed = torch.bincount(tokens.cpu(), minlength=row.numel()).double()
    expected = torch.softmax(row.double() / temperature, 0) * draws
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(row.numel() - 1.0, dtype=torch.float64)
    p_value = float(torch.special.gammaincc(dof / 2, statistic / 2))  # chi-square survival function
    assert p_value > 1e-3, f"sampled frequencies {observed.tolist()} vs expected {expected.tolist()}"
    torch.testing.assert_close(logprobs.cpu(), log_softmax_at(row.repeat(draws, 1), tokens.cpu(), temperature))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_logprobs_greedy_and_keys(backend):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(7, 1000, generator=g) * 3).to(DEVICE)  # vocab spans several Triton blocks
    tok, lp = sample(logits, keys(7), 0.0, backend=backend)
    assert torch.equal(tok.cpu(), logits.cpu().argmax(-1))
    torch.testing.assert_close(lp.cpu(), log_softmax_at(logits.cpu(), tok.cpu(), 0.0))
    assert (lp <= 0).all()
    tok1, lp1 = sample(logits, keys(7, seed=5), 0.9, backend=backend)
    tok2, _ = sample(logits, keys(7, seed=5), 0.9, backend=backend)
    assert torch.equal(tok1, tok2)  # same keys, same draw
    torch.testing.assert_close(lp1.cpu(), log_softmax_at(logits.cpu(), tok1.cpu(), 0.9))
    # A row's draw depends on its key and logits only, not on the rest of the batch.
    tok3, _ = sample(logits[2:5], keys(7, seed=5)[2:5], 0.9, backend=backend)
    assert torch.equal(tok3, tok1[2:5])


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.6), (5, 0.8), (1, 1.0)])
def test_top_k_top_p_never_emit_excluded_tokens(top_k, top_p):
    g = torch.Generator().manual_seed(4)
    row = torch.randn(40, generator=g) * 2
    draws = 5000
    tokens, logprobs = sample(row.repeat(draws, 1), keys(draws, seed=6).cpu(), 1.0, top_k, top_p, backend="torch")
    allowed = torch.isfinite(top_k_top_p_mask(row[None], top_k, top_p))[0]
    probs = torch.softmax(row, 0)
    order = probs.argsort(descending=True)
    # Independent statement of the rule: the top-k, then the shortest head of the sorted list reaching top_p.
    keep = torch.zeros(40, dtype=torch.bool)
    head = order[:top_k] if top_k else order
    mass = torch.cumsum(probs[head] / probs[head].sum(), 0)
    keep[head[:int((mass < top_p).sum()) + 1]] = True
    assert torch.equal(allowed, keep)
    used = torch.bincount(tokens, minlength=40) > 0
    assert not (used & ~keep).any(), "an excluded token was sampled"
    assert used[keep].sum() >= min(int(keep.sum()), 2)  # the allowed set is actually explored
    torch.testing.assert_close(logprobs, F.log_softmax(row, 0)[tokens])  # full-distribution log-probs
