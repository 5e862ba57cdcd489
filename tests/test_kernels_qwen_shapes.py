"""The kernels at Qwen's shapes against their references: the 151,936-token vocabulary and head_dim 128.

What depends on the shape: the vocabulary is the row length of every log-prob op (token_logprobs,
linear_token_logprobs, fused_linear_grpo_loss) and of the sampler; grpo_loss works on [B, T] log-probs and
never sees it. head_dim and the query heads per kv head are the tile widths of flash_attention (training,
prefill), paged decode attention and the KV-cache write. Qwen2/2.5/3 share V = 151,936 (Qwen2.5-7B pads
to 152,064); Qwen3 has head_dim 128 at every size, with 2 query heads per kv head at 0.6B (16 / 8) and 4
at 8B (32 / 8); Qwen2.5-7B has 7 (28 / 4).

The vocabulary cases run the Triton kernels at their GPU launch configuration (`cuda_launch_configs`:
BLOCK_V 4096, so 37 full blocks and a masked tail of 448): the tiles a GPU runs, and about 30x faster in
the interpreter than its default 128-wide blocks. Rows are few and the hidden size small (64): the
file takes about 20 s on 2 busy CPU cores, each case at most 2-3 s. Tolerances and the low-precision rule (error <= 2 x that of a
plain PyTorch run in the same dtype + a floor) are those of the other kernel tests. The GPU compile
test (tests/test_gpu_compile.py) builds the same kernels at these shapes for sm_80 / sm_90 / sm_100.
"""

from __future__ import annotations

import pytest
import torch

from rlvr_fast.kernels import fused_linear_grpo_loss, linear_token_logprobs, token_logprobs
from rlvr_fast.kernels._common import HAS_TRITON, cuda_launch_configs, interpreting
from rlvr_fast.kernels.flash_attention import FP32_MAX_HEAD_DIM, flash_attention
from rlvr_fast.kernels.paged_attention import paged_attention
from rlvr_fast.kernels.paged_kv import write_kv
from rlvr_fast.kernels.paged_reference import log_softmax_at, paged_attention_naive
from rlvr_fast.kernels.reference import (flash_attention_ref, fused_linear_grpo_loss_ref, linear_token_logprobs_ref,
                                         token_logprobs_ref)
from rlvr_fast.kernels.sampling import sample
from tests.test_kernels_linear import check_lowp, err, make_grpo, make_linear
from tests.test_kernels_token_logprobs import naive_lowp

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
QWEN_VOCAB = 151936
# (query heads, kv heads) per kv head group at head_dim 128: Qwen3-0.6B (2 per kv head), Qwen2.5-7B (7: not a
# power of two, so the paged kernel's group block is masked), both cut to one or two kv heads.
QWEN_HEADS = {"qwen3-0.6b": (4, 2), "qwen2.5-7b": (7, 1)}
HEAD_DIM = 128


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_at_qwen_vocab(backend, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, QWEN_VOCAB, generator=g) * 3).to(dtype).to(DEVICE)
    y = torch.tensor([0, 77777, QWEN_VOCAB - 1], device=DEVICE)  # the first id, one mid-block, the masked tail
    xk = x.clone().requires_grad_()
    with cuda_launch_configs():
        lp, ent = token_logprobs(xk, y, 0.7, return_entropy=True, backend=backend)
    g_lp, g_ent = torch.randn(3, generator=g).to(DEVICE), torch.randn(3, generator=g).to(DEVICE)
    with cuda_launch_configs():
        (lp * g_lp + ent * g_ent).sum().backward()
    assert (lp <= 0).all() and xk.grad.dtype == dtype

    xr = x.double().requires_grad_()
    lp_r, ent_r = token_logprobs_ref(xr, y, 0.7, return_entropy=True)
    (lp_r * g_lp.double() + ent_r * g_ent.double()).sum().backward()
    if dtype == torch.float32:
        for got, want in ((lp, lp_r), (ent, ent_r), (xk.grad, xr.grad)):
            torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    else:
        lp_n, ent_n, xn = naive_lowp(x, y, 0.7)  # the plain PyTorch expression in bf16: the error budget
        (lp_n.float() * g_lp + ent_n.float() * g_ent).sum().backward()
        check_lowp(lp, lp_r, lp_n, 1e-5)
        check_lowp(ent, ent_r, ent_n, 1e-5)
        # The interpreter's fp32 -> bf16 store truncates: up to one bf16 ulp more (test_kernels_token_logprobs.py).
        ulp = 2.0 ** -7 * xr.grad.abs().max().item() if backend == "triton" and interpreting() else 0.0
        assert err(xk.grad, xr.grad) <= 2 * err(xn.grad, xr.grad) + 1e-3 + ulp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_token_logprobs_at_qwen_vocab(backend, dtype):
    n, hidden = 8, 64
    h, w, y = make_linear(n, hidden, QWEN_VOCAB, dtype, seed=1)
    w = w * 0.25  # logits of a few units, as a trained head gives, not a one-hot softmax
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.Generator().manual_seed(11)
    g_lp, g_ent = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    with cuda_launch_configs():
        # Two chunks. (Chunks of 1-3 rows would loosen the check: CPU BLAS sums a matmul with so few rows over
        # the 151,936 vocabulary terms about 15x less accurately than one with 4.)
        lp, ent = linear_token_logprobs(hk, wk, y, 0.7, chunk_size=4, return_entropy=True, backend=backend)
        (lp * g_lp + ent * g_ent).sum().backward()
    assert (lp <= 0).all() and hk.grad.dtype == wk.grad.dtype == dtype

    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    lp_r, ent_r = linear_token_logprobs_ref(hr, wr, y, 0.7, return_entropy=True)
    (lp_r * g_lp.double() + ent_r * g_ent.double()).sum().backward()
    if dtype == torch.float32:
        for got, want in ((lp, lp_r), (ent, ent_r), (hk.grad, hr.grad), (wk.grad, wr.grad)):
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    else:
        hn, wn = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp_n, ent_n = linear_token_logprobs_ref(hn, wn, y, 0.7, return_entropy=True)  # matmuls in bf16
        (lp_n * g_lp + ent_n * g_ent).sum().backward()
        check_lowp(lp, lp_r, lp_n, 1e-5)
        check_lowp(ent, ent_r, ent_n, 1e-5)
        check_lowp(hk.grad, hr.grad, hn.grad, 2e-2)
        check_lowp(wk.grad, wr.grad, wn.grad, 2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_grpo_loss_at_qwen_vocab(backend, dtype):
    """Token-level loss with KL, clipping and the entropy bonus (every term of the row kernel), in chunks."""
    b, t, hidden = 4, 2, 64  # two chunks of 4 tokens
    h, w, y, old, ref, adv, mask = make_grpo(b, t, hidden, QWEN_VOCAB, dtype, seed=2)
    kw = dict(beta=0.04, temperature=0.8, entropy_coef=0.01)
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    with cuda_launch_configs():
        loss, stats = fused_linear_grpo_loss(hk, wk, y, old, ref, adv, mask, chunk_size=4, backend=backend, **kw)
        (2.5 * loss).backward()
    assert hk.grad.dtype == wk.grad.dtype == dtype

    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    loss_r, stats_r = fused_linear_grpo_loss_ref(hr, wr, y, old.double(), ref.double(), adv.double(), mask, **kw)
    (2.5 * loss_r).backward()
    if dtype == torch.float32:
        # Looser than test_kernels_linear.py's 1e-6 at V = 131: the log-probs and the hidden gradient are fp32
        # sums over 151,936 vocabulary terms, whose rounding grows with V. A plain fp32 PyTorch run is off by
        # ~1e-5 in the loss and gradients here, and 1.3e-5 relative in the KL (~39: logits at T = 0.8).
        for got, want in ((loss, loss_r), (hk.grad, hr.grad), (wk.grad, wr.grad)):
            torch.testing.assert_close(got.double(), want, atol=4e-5, rtol=1e-5)
        for name in stats_r:
            torch.testing.assert_close(stats[name].double(), stats_r[name].double(), atol=4e-5, rtol=4e-5, msg=name)
    else:
        hn, wn = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss_n, stats_n = fused_linear_grpo_loss_ref(hn, wn, y, old, ref, adv, mask, **kw)  # plain bf16 PyTorch
        (2.5 * loss_n).backward()
        check_lowp(loss, loss_r, loss_n, 1e-5)
        check_lowp(hk.grad, hr.grad, hn.grad, 1e-3)
        check_lowp(wk.grad, wr.grad, wn.grad, 1e-3)
        check_lowp(stats["entropy"], stats_r["entropy"], stats_n["entropy"], 1e-5)
    assert (hk.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_at_qwen_vocab(dtype):
    """The Triton sampler (the torch one is sample_ref itself): greedy finds a winner in the masked tail block,
    and a tempered draw returns its token's log-prob over the whole row."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, QWEN_VOCAB, generator=g) * 2).to(dtype).to(DEVICE)
    logits[0, QWEN_VOCAB - 5] = 40.0
    keys = torch.randint(0, 2**62, (2,), generator=g).to(DEVICE)
    with cuda_launch_configs():
        tok, lp = sample(logits, None, 0.0, backend="triton")
        drawn, drawn_lp = sample(logits, keys, 0.9, backend="triton")
    assert torch.equal(tok.cpu(), logits.float().cpu().argmax(-1)) and tok[0] == QWEN_VOCAB - 5
    torch.testing.assert_close(lp.cpu(), log_softmax_at(logits.float().cpu(), tok.cpu(), 0.0), atol=2e-5, rtol=2e-5)
    assert ((0 <= drawn) & (drawn < QWEN_VOCAB)).all()
    torch.testing.assert_close(drawn_lp.cpu(), log_softmax_at(logits.float().cpu(), drawn.cpu(), 0.9),
                               atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- head_dim 128


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("model", list(QWEN_HEADS))
def test_flash_attention_head_dim_128(backend, dtype, model):
    """Values and dq, dk, dv: a prefill-like Lq == Lk sequence, a completion after a prompt (Lq < Lk), one
    token. fp32 on CUDA is refused by the Triton path at head_dim 128 (FP32_MAX_HEAD_DIM), so there the fp32
    case runs bf16 instead; the interpreter has no bf16 dots, hence fp16 as the low-precision case."""
    if DEVICE == "cuda" and backend == "triton" and dtype == torch.float32 and HEAD_DIM > FP32_MAX_HEAD_DIM:
        dtype = torch.bfloat16
    hq, hkv = QWEN_HEADS[model]
    lens_q, lens_k = [21, 6, 1], [21, 35, 1]
    g = torch.Generator().manual_seed(4)
    q64, do64 = (torch.randn(sum(lens_q), hq, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
    k64, v64 = (torch.randn(sum(lens_k), hkv, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(2))
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)

    def run(fn, dt):
        leaves = [t.detach().to(dt).to(DEVICE).requires_grad_() for t in (q64, k64, v64)]
        out = fn(*leaves)
        out.backward(do64.to(out.dtype).to(DEVICE))
        return [out.detach().double()] + [t.grad.double() for t in leaves]

    got = run(lambda q, k, v: flash_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), backend=backend), dtype)
    if dtype == torch.float32:
        want = run(lambda q, k, v: flash_attention_ref(q, k, v, cu_q, cu_k), torch.float64)
        for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")
        return
    # Compare with the reference on the same rounded inputs, in float64 and in the low precision itself.
    q64, k64, v64, do64 = (t.to(dtype).double() for t in (q64, k64, v64, do64))
    want = run(lambda q, k, v: flash_attention_ref(q, k, v, cu_q, cu_k), torch.float64)
    lowp = run(lambda q, k, v: flash_attention_ref(q, k, v, cu_q, cu_k, upcast=False), dtype)
    for what, a, b, n in zip(("out", "dq", "dk", "dv"), got, want, lowp):
        assert err(a, b) <= 2 * err(n, b) + 1e-3, f"{what}: {err(a, b):.3g} vs PyTorch in {dtype}: {err(n, b):.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", list(QWEN_HEADS))
def test_paged_decode_and_kv_write_head_dim_128(backend, model):
    """A decode step as the rollout engine runs it: write the new token's k/v into the paged cache, then
    attend over each sequence's blocks (block size 16, a shared first block, a context of 1)."""
    hq, hkv = QWEN_HEADS[model]
    block_size, num_blocks, lengths = 16, 8, [33, 17, 1]
    g = torch.Generator().manual_seed(5)
    kc = torch.randn(num_blocks, block_size, hkv, HEAD_DIM, generator=g)
    vc = torch.randn(num_blocks, block_size, hkv, HEAD_DIM, generator=g)
    tables = torch.tensor([[0, 3, 5], [0, 2, 0], [7, 0, 0]], dtype=torch.int32)
    new_k, new_v = (torch.randn(3, hkv, HEAD_DIM, generator=g) for _ in range(2))
    slots = torch.tensor([5 * block_size + 0, 2 * block_size + 0, 7 * block_size + 0])  # each one's last position
    q = torch.randn(3, hq, HEAD_DIM, generator=g)
    kd, vd = kc.clone().to(DEVICE), vc.clone().to(DEVICE)
    write_kv(new_k.to(DEVICE), new_v.to(DEVICE), kd, vd, slots.to(DEVICE), backend=backend)
    kc.view(-1, hkv, HEAD_DIM)[slots], vc.view(-1, hkv, HEAD_DIM)[slots] = new_k, new_v
    assert torch.equal(kd.cpu(), kc) and torch.equal(vd.cpu(), vc)
    lens = torch.tensor(lengths, dtype=torch.int32)
    got = paged_attention(q.to(DEVICE), kd, vd, tables.to(DEVICE), lens.to(DEVICE), backend=backend)
    want = paged_attention_naive(q, kc, vc, tables, lens)
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-5, rtol=2e-5)
