"""grpo_loss: Triton kernel (interpreted on CPU) and torch path vs the float64 reference."""

import pytest
import torch

from rlvr_fast.kernels import grpo_loss
from rlvr_fast.kernels.reference import grpo_loss_ref
from tests.grpo_cases import ragged_advantages_and_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]


def make_batch(B, T, seed=0, spread=2.0):
    """Log-probs, old/ref far from them (ratios e^{+-4}: well outside the clip), advantages of both
    signs, a ragged mask with one fully masked row (when B > 2), garbage at masked positions."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 4
    old = logp + torch.randn(B, T, generator=g) * spread
    ref = logp + torch.randn(B, T, generator=g) * 0.5
    adv, mask = ragged_advantages_and_mask(B, T, g)
    garbage = mask == 0
    logp[garbage], old[garbage], ref[garbage] = -1e4, 50.0, float("nan")
    return [x.to(DEVICE) for x in (logp, old, ref, adv, mask)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_old", [True, False])
@pytest.mark.parametrize("B,T", [(1, 1), (5, 37), (4, 3)])
def test_matches_float64_reference(backend, loss_type, beta, with_old, B, T):
    logp, old, ref, adv, mask = make_batch(B, T)
    old = old if with_old else None
    kw = dict(beta=beta, loss_type=loss_type, clip_low=0.2, clip_high=0.28,
              max_completion_len=T + 3 if loss_type == "dr_grpo" else None)
    lp = logp.clone().requires_grad_()
    loss, stats = grpo_loss(lp, old, ref, adv, mask, backend=backend, **kw)
    loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32
    assert all(v.shape == () and not v.requires_grad for v in stats.values())

    lr = logp.double().requires_grad_()
    loss_r, stats_r = grpo_loss_ref(lr, None if old is None else old.double(), ref.double(), adv.double(), mask, **kw)
    loss_r.backward()
    torch.testing.assert_close(loss.double(), loss_r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lp.grad.double(), lr.grad, atol=1e-7, rtol=1e-5)
    assert torch.isfinite(lp.grad).all() and (lp.grad[mask == 0] == 0).all()
    for k in stats_r:
        torch.testing.assert_close(stats[k].double(), stats_r[k].double(), atol=1e-6, rtol=1e-5, msg=k)
    if old is None:
        assert stats["ratio"].item() == 1.0 and stats["clip_low_frac"] == 0 and stats["clip_high_frac"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_zeroes_exactly_the_counted_tokens(backend):
    """One completion per case: ratio far above / below the clip, advantage of each sign."""
    logp = torch.zeros(4, 1, device=DEVICE)
    old = torch.tensor([[-1.0], [1.0], [-1.0], [1.0]], device=DEVICE)  # ratios e, 1/e, e, 1/e
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], device=DEVICE)          # clip-high, clip-low, kept, kept
    mask = torch.ones(4, 1, device=DEVICE)
    lp = logp.clone().requires_grad_()
    loss, stats = grpo_loss(lp, old, None, adv, mask, beta=0.0, loss_type="grpo", backend=backend)
    loss.backward()
    e = torch.e
    assert stats["clip_high_frac"].item() == pytest.approx(0.25) and stats["clip_low_frac"].item() == pytest.approx(0.25)
    torch.testing.assert_close(lp.grad.view(-1), torch.tensor([0.0, 0.0, e, -1 / e], device=DEVICE) / 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_update_per_rollout_loss_is_minus_mean_advantage(backend):
    """old=None: ratio == 1, and the grpo loss is -mean(A) (~0 for group-centred advantages)."""
    logp, _, _, adv, mask = make_batch(6, 9, seed=3)
    mask[2] = 1  # no empty row here
    adv = adv - adv.mean()
    lp = logp.clone().requires_grad_()
    loss, stats = grpo_loss(lp, None, None, adv, mask, beta=0.0, backend=backend)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and stats["ratio"].item() == 1.0 and stats["kl"].item() == 0.0
    n_i = mask.sum(-1, keepdim=True)
    torch.testing.assert_close(lp.grad, -adv[:, None] * mask / n_i / 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_and_no_grad(backend):
    logp, old, ref, adv, mask = make_batch(3, 4)
    loss, stats = grpo_loss(logp.requires_grad_(), old, ref, adv, torch.zeros_like(mask), backend=backend)
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in stats.values())
    with torch.no_grad():
        loss, _ = grpo_loss(logp, old, ref, adv, mask, backend=backend)
    assert not loss.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bool_mask_and_low_precision_logprobs(backend, dtype):
    logp, old, ref, adv, mask = make_batch(4, 5)
    lp = logp.to(dtype).requires_grad_()
    loss, _ = grpo_loss(lp, old, ref, adv, mask.bool(), backend=backend)
    loss.backward()
    lr = lp.detach().double().requires_grad_()
    loss_r, _ = grpo_loss_ref(lr, old.double(), ref.double(), adv.double(), mask)
    loss_r.backward()
    assert lp.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), loss_r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lp.grad.double(), lr.grad, atol=1e-4, rtol=1e-2)


def test_errors():
    logp, old, ref, adv, mask = make_batch(3, 4)
    with pytest.raises(ValueError, match="ref_logprobs is None but beta=0.04.*beta=0.0"):
        grpo_loss(logp, old, None, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match="old_logprobs must have shape \\[3, 4\\]"):
        grpo_loss(logp, old[:, :3], ref, adv, mask)
    with pytest.raises(ValueError, match="advantages must have shape \\[3\\]"):
        grpo_loss(logp, old, ref, adv[:, None], mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        grpo_loss(logp, old, ref, adv, mask.T)
    with pytest.raises(ValueError, match="logprobs must be \\[B, T\\]"):
        grpo_loss(logp.view(-1), old, ref, adv, mask)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="clip_low"):
        grpo_loss(logp, old, ref, adv, mask, clip_low=1.5)
    with pytest.raises(ValueError, match="max_completion_len"):
        grpo_loss(logp, old, ref, adv, mask, loss_type="dr_grpo", max_completion_len=0)
    with pytest.raises(TypeError, match="old_logprobs must have dtype"):
        grpo_loss(logp, old.long(), ref, adv, mask)
    with pytest.raises(ValueError, match="one device"):
        grpo_loss(logp, old, ref, adv.to("meta"), mask)
    loss, _ = grpo_loss(logp.requires_grad_(), old, ref, adv, mask)
    loss.backward()  # fine once
