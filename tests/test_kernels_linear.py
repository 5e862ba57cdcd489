"""linear_token_logprobs and fused_linear_grpo_loss vs the float64 references (values and grads).

On CPU the "triton" backend runs the row kernels in the interpreter after torch matmuls; the
"torch" backend is the chunked CPU path the trainer uses. Chunk sizes are forced small so that
several chunks (and a ragged last one) are exercised on tiny shapes. bf16 follows the 2x rule of
test_kernels_token_logprobs.py; the floors also cover the interpreter's truncating bf16 stores and
the per-chunk bf16 rounding of the grad_weight accumulator.
"""

import pytest
import torch

from rlvr_fast.kernels import fused_linear_grpo_loss, grpo_loss, linear_token_logprobs
from rlvr_fast.kernels.linear_token_logprobs import pick_chunk_size
from rlvr_fast.kernels.reference import fused_linear_grpo_loss_ref, linear_token_logprobs_ref
from tests.grpo_cases import ragged_advantages_and_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def make_linear(N, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype).to(DEVICE)
    y = torch.randint(0, V, (N,), generator=g)
    y[0], y[-1] = 0, V - 1
    return h, w, y.to(DEVICE)


def check_lowp(got, ref64, naive, floor):
    """flash-attention's rule: error <= 2x that of a plain PyTorch run in the same dtype (+ floor)."""
    assert err(got, ref64) <= 2 * err(naive, ref64) + floor, (err(got, ref64), err(naive, ref64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,V,chunk", [(1, 7, None), (5, 131, 2), (37, 131, 8), (9, 1000, 4)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_linear_token_logprobs(backend, dtype, N, V, chunk, temperature):
    H = 16
    torch.manual_seed(0)
    h, w, y = make_linear(N, H, V, dtype)
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = linear_token_logprobs(hk, wk, y, temperature, chunk_size=chunk, return_entropy=True, backend=backend)
    g_lp, g_ent = torch.randn(N, device=DEVICE), torch.randn(N, device=DEVICE)
    (lp * g_lp + ent * g_ent).sum().backward()
    assert lp.dtype == torch.float32 and (lp <= 0).all()
    assert hk.grad.dtype == wk.grad.dtype == dtype

    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    lp_r, ent_r = linear_token_logprobs_ref(hr, wr, y, temperature, return_entropy=True)
    (lp_r * g_lp.double() + ent_r * g_ent.double()).sum().backward()
    if dtype == torch.float32:
        for got, ref in ((lp, lp_r), (ent, ent_r), (hk.grad, hr.grad), (wk.grad, wr.grad)):
            torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)
    else:
        hn, wn = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp_n, ent_n = linear_token_logprobs_ref(hn, wn, y, temperature, return_entropy=True)  # matmuls in dtype
        (lp_n * g_lp + ent_n * g_ent).sum().backward()
        check_lowp(lp, lp_r, lp_n, 1e-5)
        check_lowp(ent, ent_r, ent_n, 1e-5)
        check_lowp(hk.grad, hr.grad, hn.grad, 2e-2)
        check_lowp(wk.grad, wr.grad, wn.grad, 2e-2)


def make_grpo(B, T, H, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w, y = make_linear(B * T, H, V, dtype, seed)
    with torch.no_grad():
        base = linear_token_logprobs_ref(h, w, y).view(B, T).cpu()
    old = base + torch.randn(B, T, generator=g) * 1.5     # ratios far outside the clip
    ref = base + torch.randn(B, T, generator=g) * 0.5
    adv, mask = ragged_advantages_and_mask(B, T, g)
    old[mask == 0], ref[mask == 0] = 1e4, float("nan")  # garbage at padding: never used
    return h.view(B, T, H), w, y.view(B, T), *(x.to(DEVICE) for x in (old, ref, adv, mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta,with_old", [(0.0, True), (0.04, True), (0.04, False)])
@pytest.mark.parametrize("B,T,V", [(4, 5, 131), (1, 1, 7)])
def test_fused_linear_grpo_loss_fp32(backend, loss_type, beta, with_old, B, T, V):
    h, w, y, old, ref, adv, mask = make_grpo(B, T, 16, V, torch.float32)
    old = old if with_old else None
    kw = dict(beta=beta, loss_type=loss_type, clip_low=0.2, clip_high=0.28, temperature=0.8,
              max_completion_len=T + 2 if loss_type == "dr_grpo" else None)
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, stats = fused_linear_grpo_loss(hk, wk, y, old, ref, adv, mask, chunk_size=3, backend=backend, **kw)
    (2.5 * loss).backward()  # the stash is scaled by grad_output
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    loss_r, stats_r = fused_linear_grpo_loss_ref(hr, wr, y, None if old is None else old.double(), ref.double(),
                                                 adv.double(), mask, **kw)
    (2.5 * loss_r).backward()
    torch.testing.assert_close(loss.double(), loss_r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(hk.grad.double(), hr.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wk.grad.double(), wr.grad, atol=1e-6, rtol=1e-5)
    for k in stats_r:
        torch.testing.assert_close(stats[k].double(), stats_r[k].double(), atol=1e-6, rtol=1e-5, msg=k)
    assert (hk.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_bf16_flat_hidden_and_composition(backend):
    """bf16, hidden given flat [B*T, H]; equals grpo_loss(linear_token_logprobs(...)) in fp32."""
    B, T, H, V = 3, 6, 16, 131
    h, w, y, old, ref, adv, mask = make_grpo(B, T, H, V, torch.bfloat16, seed=1)
    hk, wk = h.reshape(B * T, H).clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = fused_linear_grpo_loss(hk, wk, y, old, ref, adv, mask, chunk_size=4, backend=backend)
    loss.backward()
    assert hk.grad.shape == (B * T, H) and hk.grad.dtype == torch.bfloat16

    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    loss_r, _ = fused_linear_grpo_loss_ref(hr, wr, y, old.double(), ref.double(), adv.double(), mask)
    loss_r.backward()
    hn, wn = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss_n, _ = fused_linear_grpo_loss_ref(hn, wn, y, old, ref, adv, mask)  # plain bf16 PyTorch run
    loss_n.backward()
    check_lowp(loss, loss_r, loss_n, 1e-5)
    check_lowp(hk.grad.view(B, T, H), hr.grad, hn.grad, 1e-3)
    check_lowp(wk.grad, wr.grad, wn.grad, 1e-3)

    # The composition of the two unfused ops gives the same loss and gradients (fp32).
    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    lp = linear_token_logprobs(h32.reshape(B * T, H), w32, y.reshape(-1), backend=backend).view(B, T)
    loss_c, _ = grpo_loss(lp, old, ref, adv, mask, backend=backend)
    loss_c.backward()
    hf, wf = h.float().requires_grad_(), w.float().requires_grad_()
    loss_f, _ = fused_linear_grpo_loss(hf, wf, y, old, ref, adv, mask, backend=backend)
    loss_f.backward()
    torch.testing.assert_close(loss_f, loss_c, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(hf.grad, h32.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wf.grad, w32.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_accumulation_no_grad_and_single_backward(backend):
    h, w, y, old, ref, adv, mask = make_grpo(4, 5, 16, 131, torch.float32)
    wk = w.clone().requires_grad_()
    # Gradient accumulation over two micro-batches equals the sum of their gradients.
    for sl in (slice(0, 2), slice(2, 4)):
        loss, _ = fused_linear_grpo_loss(h[sl], wk, y[sl], old[sl], ref[sl], adv[sl], mask[sl], backend=backend)
        loss.backward()
    wr = w.double().requires_grad_()
    for sl in (slice(0, 2), slice(2, 4)):
        fused_linear_grpo_loss_ref(h[sl].double(), wr, y[sl], old[sl].double(), ref[sl].double(),
                                   adv[sl].double(), mask[sl])[0].backward()
    torch.testing.assert_close(wk.grad.double(), wr.grad, atol=1e-6, rtol=1e-5)

    with torch.no_grad():  # forward only: no gradient work, no graph
        loss, stats = fused_linear_grpo_loss(h, wk, y, old, ref, adv, mask, backend=backend)
    assert not loss.requires_grad and torch.isfinite(stats["kl"])

    loss, _ = fused_linear_grpo_loss(h, wk, y, old, ref, adv, mask, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward can run only once"):
        loss.backward()


def test_chunk_size_budget():
    cpu = torch.device("cpu")
    assert pick_chunk_size(4096, 49152, cpu, torch.float32, None) == 160   # 32 MiB of fp32 logits
    assert pick_chunk_size(16384, 128256, torch.device("cuda"), torch.bfloat16, None) == 2048  # 512 MiB bf16
    assert pick_chunk_size(5, 49152, cpu, torch.float32, None) == 5
    assert pick_chunk_size(100, 7, cpu, torch.float32, 8) == 8
    with pytest.raises(ValueError, match="chunk_size"):
        pick_chunk_size(100, 7, cpu, torch.float32, 0)


def test_linear_token_logprobs_keeps_leading_dims():
    """[B, T, H] hidden with [B, T] targets gives [B, T] results, the same numbers as the flat call."""
    h, w, y, *_ = make_grpo(3, 4, 16, 131, torch.float32)
    lp, ent = linear_token_logprobs(h, w, y, 0.7, return_entropy=True)
    lp_flat, ent_flat = linear_token_logprobs(h.reshape(12, 16), w, y.reshape(-1), 0.7, return_entropy=True)
    assert lp.shape == ent.shape == y.shape
    torch.testing.assert_close(lp, lp_flat.view(3, 4), rtol=0, atol=0)
    torch.testing.assert_close(ent, ent_flat.view(3, 4), rtol=0, atol=0)


def test_errors():
    h, w, y, old, ref, adv, mask = make_grpo(3, 4, 16, 131, torch.float32)
    hf = h.reshape(12, 16)
    with pytest.raises(TypeError, match="same dtype"):
        linear_token_logprobs(hf, w.bfloat16(), y.reshape(-1))
    with pytest.raises(ValueError, match="hidden size mismatch"):
        linear_token_logprobs(hf[:, :8], w, y.reshape(-1))
    with pytest.raises(ValueError, match="must agree on the leading dims"):
        linear_token_logprobs(hf, w, y)
    with pytest.raises(ValueError, match="must agree on the leading dims"):
        linear_token_logprobs(h, w, y.reshape(-1))
    with pytest.raises(ValueError, match="hidden must be \\[B, T, H\\]"):
        fused_linear_grpo_loss(h[:, :3], w, y, old, ref, adv, mask)
    with pytest.raises(ValueError, match="targets must be \\[B, T\\]"):
        fused_linear_grpo_loss(h, w, y.reshape(-1), old, ref, adv, mask)
    with pytest.raises(ValueError, match="ref_logprobs is None but beta"):
        fused_linear_grpo_loss(h, w, y, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="one device"):
        fused_linear_grpo_loss(h, w, y, old, ref, adv, mask.to("meta"))
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_grpo_loss(h, w, y, old, ref, adv, mask, temperature=-1.0)
