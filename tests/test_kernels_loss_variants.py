"""GRPO loss variants (dapo, GSPO, dual clip, truncated importance sampling, entropy bonus) of
grpo_loss and fused_linear_grpo_loss vs the float64 references, on both backends ("triton" runs
in the interpreter on CPU), plus the identities each variant promises."""

import logging

import pytest
import torch

from rlvr_fast.kernels import _common, fused_linear_grpo_loss, grpo_loss, linear_token_logprobs
from rlvr_fast.kernels.reference import fused_linear_grpo_loss_ref, grpo_loss_ref
from tests.test_kernels_grpo_loss import make_batch
from tests.test_kernels_linear import check_lowp, make_grpo

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]

# Each variant alone and a few together. "roll" stands for the rollout log-probs of the batch.
VARIANTS = {
    "dapo": dict(loss_type="dapo", num_tokens=50),
    "dapo_tensor": dict(loss_type="dapo", num_tokens=torch.tensor(37.0)),
    "dapo_own_count": dict(loss_type="dapo"),
    "gspo": dict(ratio_level="sequence"),
    "dual_clip": dict(delta=1.5),
    "tis": dict(rollout_logprobs="roll", tis_cap=2.0),
    "tis_uncapped": dict(rollout_logprobs="roll"),
    "gspo_tis_dual_bnpo": dict(ratio_level="sequence", rollout_logprobs="roll", tis_cap=1.5, delta=1.4,
                               loss_type="bnpo"),
    "dapo_tis_dual": dict(loss_type="dapo", num_tokens=40, rollout_logprobs="roll", tis_cap=3.0, delta=2.0),
}


def rollout_for(old, mask, seed=7, spread=0.7):
    """Rollout log-probs near old (TIS weights around 1, some above the cap); garbage at padding."""
    g = torch.Generator().manual_seed(seed)
    roll = old.cpu() + torch.randn(old.shape, generator=g) * spread
    roll[mask.cpu() == 0] = float("nan")
    return roll.to(DEVICE)


def resolve(kw, roll, dtype=torch.float32):
    return {k: (roll.to(dtype) if k == "rollout_logprobs" else v) for k, v in kw.items()}


def assert_stats_close(stats, stats_r, atol=1e-6, rtol=1e-5):
    assert set(stats) == set(stats_r)
    for k in stats_r:
        assert stats[k].shape == () and not stats[k].requires_grad, k
        torch.testing.assert_close(stats[k].double(), torch.as_tensor(stats_r[k]).double(), atol=atol, rtol=rtol,
                                   msg=k)


# ----------------------------------------------------------------------------- grpo_loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("with_old", [True, False])
@pytest.mark.parametrize("B,T", [(1, 1), (5, 37)])
def test_grpo_loss_variants_match_float64_reference(backend, variant, with_old, B, T):
    logp, old, ref, adv, mask = make_batch(B, T)  # ratios e^{+-4}, both advantage signs, ragged + empty row
    roll = rollout_for(old if with_old else logp, mask)
    old = old if with_old else None
    kw = dict(clip_low=0.2, clip_high=0.28, beta=0.04, **VARIANTS[variant])
    lp = logp.clone().requires_grad_()
    loss, stats = grpo_loss(lp, old, ref, adv, mask, backend=backend, **resolve(kw, roll))
    loss.backward()
    lr = logp.double().requires_grad_()
    loss_r, stats_r = grpo_loss_ref(lr, None if old is None else old.double(), ref.double(), adv.double(), mask,
                                    **resolve(kw, roll, torch.float64))
    loss_r.backward()
    torch.testing.assert_close(loss.double(), loss_r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lp.grad.double(), lr.grad, atol=1e-7, rtol=1e-5)
    assert torch.isfinite(lp.grad).all() and (lp.grad[mask == 0] == 0).all()
    assert_stats_close(stats, stats_r)
    assert ("tis_weight_mean" in stats) == ("rollout_logprobs" in kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dual_clip_hand_computed(backend):
    """A = -1 and ratio e > delta = 2: the loss is -delta * A = 2 with zero gradient (e and e without delta);
    with A > 0 or a ratio below delta nothing changes."""
    logp = torch.zeros(3, 1, device=DEVICE)
    old = torch.tensor([[-1.0], [-1.0], [-0.5]], device=DEVICE)   # ratios e, e, e^0.5 = 1.65
    adv = torch.tensor([-1.0, 1.0, -1.0], device=DEVICE)
    mask = torch.ones(3, 1, device=DEVICE)
    e = torch.e
    for delta, per_token, grad in ((2.0, [2.0, -1.2, e ** 0.5], [0.0, 0.0, e ** 0.5]),
                                   (None, [e, -1.2, e ** 0.5], [e, 0.0, e ** 0.5])):
        lp = logp.clone().requires_grad_()
        loss, stats = grpo_loss(lp, old, None, adv, mask, beta=0.0, delta=delta, loss_type="bnpo", backend=backend)
        loss.backward()
        torch.testing.assert_close(loss, torch.tensor(sum(per_token) / 3, device=DEVICE))
        torch.testing.assert_close(lp.grad.view(-1), torch.tensor(grad, device=DEVICE) / 3)
        assert stats["clip_high_frac"].item() == pytest.approx(1 / 3) and stats["clip_low_frac"].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens_as", [int, torch.tensor])
def test_dapo_micro_batches_equal_one_batch(backend, num_tokens_as):
    """4 micro-batches with the batch's num_tokens: summed losses and gradients equal one big batch."""
    logp, old, ref, adv, mask = make_batch(8, 9, seed=4)
    mask[5] = 0  # a second empty completion, in another micro-batch
    kw = dict(beta=0.04, loss_type="dapo", delta=1.5, rollout_logprobs=rollout_for(old, mask), tis_cap=2.0)
    lp = logp.clone().requires_grad_()
    full, _ = grpo_loss(lp, old, ref, adv, mask, backend=backend, **kw)  # num_tokens=None: its own count
    full.backward()
    num_tokens = num_tokens_as(int(mask.sum()))
    lm = logp.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)):
        part, _ = grpo_loss(lm[rows], old[rows], ref[rows], adv[rows], mask[rows], backend=backend,
                            num_tokens=num_tokens, **{**kw, "rollout_logprobs": kw["rollout_logprobs"][rows]})
        part.backward()
        total = total + part
    torch.testing.assert_close(total, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lm.grad, lp.grad, atol=1e-7, rtol=1e-5)
    # With its own count, dapo is bnpo.
    bnpo, _ = grpo_loss(logp, old, ref, adv, mask, backend=backend, **{**kw, "loss_type": "bnpo"})
    torch.testing.assert_close(bnpo, full)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_gspo_with_equal_token_ratios_is_token_level(backend, loss_type):
    """When every token of a completion has the same logp - old, s_i is that ratio: GSPO gives the
    token-level loss, gradient and statistics (ratios far outside the clip, both advantage signs)."""
    logp, _, ref, adv, mask = make_batch(6, 11, seed=2)
    shift = torch.tensor([-1.5, 0.9, 0.0, 0.1, -0.05, 2.0], device=DEVICE)[:, None]
    old = logp + shift
    kw = dict(beta=0.04, clip_low=0.2, clip_high=0.28, loss_type=loss_type, max_completion_len=13, delta=3.0)
    out = {}
    for level in ("token", "sequence"):
        lp = logp.clone().requires_grad_()
        loss, stats = grpo_loss(lp, old, ref, adv, mask, ratio_level=level, backend=backend, **kw)
        loss.backward()
        out[level] = loss, lp.grad, stats
    torch.testing.assert_close(out["sequence"][0], out["token"][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["sequence"][1], out["token"][1], atol=1e-7, rtol=1e-4)
    assert_stats_close(out["sequence"][2], out["token"][2])
    assert out["token"][2]["clip_low_frac"] > 0 and out["token"][2]["clip_high_frac"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("with_old", [True, False])
def test_tis_weights_of_one_leave_the_loss_unchanged(backend, ratio_level, with_old):
    logp, old, ref, adv, mask = make_batch(5, 8, seed=5)
    old = old if with_old else None
    roll = (logp if old is None else old).clone()  # rollout == old: every weight is exp(0) = 1
    out = []
    for extra in ({}, {"rollout_logprobs": roll}, {"rollout_logprobs": roll, "tis_cap": 1.0}):
        lp = logp.clone().requires_grad_()
        loss, stats = grpo_loss(lp, old, ref, adv, mask, ratio_level=ratio_level, backend=backend, **extra)
        loss.backward()
        out.append((loss, lp.grad, stats))
    for loss, grad, stats in out[1:]:
        torch.testing.assert_close(loss, out[0][0])
        torch.testing.assert_close(grad, out[0][1])
        assert stats["tis_weight_mean"].item() == 1.0 and stats["tis_capped_frac"].item() == 0.0
        assert all(torch.equal(stats[k], out[0][2][k]) for k in out[0][2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tis_cap_statistics(backend):
    """Weights e^1 (capped at 2), e^-1, 1 and a padding token: mean (2 + 1/e + 1) / 3, capped 1/3."""
    logp = torch.zeros(2, 2, device=DEVICE)
    old = torch.tensor([[0.5, -0.5], [0.0, 9.0]], device=DEVICE)
    roll = torch.tensor([[-0.5, 0.5], [0.0, -9.0]], device=DEVICE)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], device=DEVICE)
    adv = torch.tensor([1.0, -1.0], device=DEVICE)
    _, stats = grpo_loss(logp, old, None, adv, mask, beta=0.0, rollout_logprobs=roll, tis_cap=2.0, backend=backend)
    assert stats["tis_weight_mean"].item() == pytest.approx((2 + 1 / torch.e + 1) / 3, rel=1e-6)
    assert stats["tis_capped_frac"].item() == pytest.approx(1 / 3)


def test_errors():
    logp, old, ref, adv, mask = make_batch(3, 4)
    with pytest.raises(ValueError, match="num_tokens is only used by loss_type='dapo'"):
        grpo_loss(logp, old, ref, adv, mask, loss_type="bnpo", num_tokens=10)
    for bad in (0, -3, 2.5, True, torch.ones(2)):
        with pytest.raises(ValueError, match="num_tokens must be"):
            grpo_loss(logp, old, ref, adv, mask, loss_type="dapo", num_tokens=bad)
    with pytest.raises(ValueError, match="ratio_level must be one of"):
        grpo_loss(logp, old, ref, adv, mask, ratio_level="seq")
    with pytest.raises(ValueError, match="delta .* must be a float > 1 \\+ clip_high = 1.3"):
        grpo_loss(logp, old, ref, adv, mask, clip_high=0.3, delta=1.2)
    with pytest.raises(ValueError, match="tis_cap is set but rollout_logprobs is None"):
        grpo_loss(logp, old, ref, adv, mask, tis_cap=2.0)
    with pytest.raises(ValueError, match="tis_cap must be a positive float"):
        grpo_loss(logp, old, ref, adv, mask, rollout_logprobs=old, tis_cap=0.0)
    with pytest.raises(ValueError, match="rollout_logprobs must have shape \\[3, 4\\]"):
        grpo_loss(logp, old, ref, adv, mask, rollout_logprobs=old[:, :2])
    with pytest.raises(TypeError, match="rollout_logprobs must have dtype"):
        grpo_loss(logp, old, ref, adv, mask, rollout_logprobs=old.long())
    h, w, y, old, ref, adv, mask = make_grpo(3, 4, 16, 131, torch.float32)
    with pytest.raises(ValueError, match="entropy_coef must be a Python float"):
        fused_linear_grpo_loss(h, w, y, old, ref, adv, mask, entropy_coef=torch.tensor(0.1))
    with pytest.raises(ValueError, match="num_tokens is only used"):
        fused_linear_grpo_loss(h, w, y, old, ref, adv, mask, num_tokens=5)


# ----------------------------------------------------------------------------- fused_linear_grpo_loss

FUSED_VARIANTS = {
    "dapo": (dict(loss_type="dapo", num_tokens=30), 3),
    "gspo_whole_rows": (dict(ratio_level="sequence"), 11),      # chunk_size >= T: rows never split
    "gspo_recompute": (dict(ratio_level="sequence", loss_type="bnpo"), 3),  # T > chunk_size: recompute
    "entropy": (dict(entropy_coef=0.05), 3),
    "entropy_bnpo_negative": (dict(entropy_coef=-0.1, loss_type="bnpo"), 4),
    "tis_dual": (dict(rollout_logprobs="roll", tis_cap=2.0, delta=1.5), 3),
    "all": (dict(ratio_level="sequence", rollout_logprobs="roll", tis_cap=2.0, delta=1.5, entropy_coef=0.05,
                 loss_type="dapo", num_tokens=25), 5),
}


# old_logprobs=None (ratio 1, gradient only) where it changes the math: GSPO's ratio and the TIS weight.
FUSED_CASES = [(v, True) for v in FUSED_VARIANTS] + [(v, False) for v in ("gspo_recompute", "tis_dual", "all")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant,with_old", FUSED_CASES)
@pytest.mark.parametrize("B,T,V", [(4, 5, 131), (1, 1, 7)])
def test_fused_variants_match_float64_reference(backend, variant, with_old, B, T, V):
    h, w, y, old, ref, adv, mask = make_grpo(B, T, 16, V, torch.float32)
    roll = rollout_for(old, mask)
    old = old if with_old else None
    kw, chunk = FUSED_VARIANTS[variant]
    kw = dict(beta=0.04, clip_low=0.2, clip_high=0.28, temperature=0.8, **kw)
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, stats = fused_linear_grpo_loss(hk, wk, y, old, ref, adv, mask, chunk_size=chunk, backend=backend,
                                         **resolve(kw, roll))
    (2.5 * loss).backward()
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    loss_r, stats_r = fused_linear_grpo_loss_ref(hr, wr, y, None if old is None else old.double(), ref.double(),
                                                 adv.double(), mask, **resolve(kw, roll, torch.float64))
    (2.5 * loss_r).backward()
    torch.testing.assert_close(loss.double(), loss_r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(hk.grad.double(), hr.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wk.grad.double(), wr.grad, atol=1e-6, rtol=1e-5)
    assert_stats_close(stats, stats_r)
    assert (hk.grad[mask == 0] == 0).all()
    assert ("entropy" in stats) == ("entropy_coef" in kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_gspo_logs_its_path_and_no_grad(backend, caplog, monkeypatch):
    monkeypatch.setattr(_common, "_LOGGED", set())
    h, w, y, old, ref, adv, mask = make_grpo(4, 5, 16, 131, torch.float32)
    with caplog.at_level(logging.INFO, logger="rlvr_fast.kernels"):
        for chunk in (10, 3, 3):
            fused_linear_grpo_loss(h, w, y, old, ref, adv, mask, ratio_level="sequence", chunk_size=chunk,
                                   backend=backend)
    msgs = [r.getMessage() for r in caplog.records if "GSPO" in r.getMessage()]
    assert len(msgs) == 2 and "whole-completion" in msgs[0] and "recompute" in msgs[1]
    # Forward only (no_grad): same loss and statistics as with gradients.
    with torch.no_grad():
        loss, stats = fused_linear_grpo_loss(h, w, y, old, ref, adv, mask, ratio_level="sequence", chunk_size=3,
                                             entropy_coef=0.1, backend=backend)
    wk = w.clone().requires_grad_()
    loss_g, stats_g = fused_linear_grpo_loss(h, wk, y, old, ref, adv, mask, ratio_level="sequence", chunk_size=3,
                                             entropy_coef=0.1, backend=backend)
    assert not loss.requires_grad and loss_g.requires_grad
    torch.testing.assert_close(loss, loss_g.detach())
    assert_stats_close(stats, stats_g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_entropy_stat_and_dapo_micro_batches(backend):
    """stats['entropy'] is the mean entropy of linear_token_logprobs; dapo + entropy over two
    micro-batches with the batch's num_tokens sums to the one-batch loss and gradients."""
    B, T, H, V = 4, 5, 16, 131
    h, w, y, old, ref, adv, mask = make_grpo(B, T, H, V, torch.float32, seed=3)
    kw = dict(loss_type="dapo", entropy_coef=0.05, temperature=0.7, ratio_level="sequence", delta=2.0)
    wk = w.clone().requires_grad_()
    full, stats = fused_linear_grpo_loss(h, wk, y, old, ref, adv, mask, backend=backend, **kw)
    full.backward()
    _, ent = linear_token_logprobs(h.reshape(-1, H), w, y.reshape(-1), 0.7, return_entropy=True)
    torch.testing.assert_close(stats["entropy"], ent[mask.reshape(-1) != 0].mean())
    wm = w.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        part, _ = fused_linear_grpo_loss(h[rows], wm, y[rows], old[rows], ref[rows], adv[rows], mask[rows],
                                         num_tokens=int(mask.sum()), chunk_size=3, backend=backend, **kw)
        part.backward()
        total = total + part
    torch.testing.assert_close(total, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wm.grad, wk.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["all", "entropy", "gspo_recompute"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_variants_low_precision(backend, variant, dtype):
    """bf16 / fp16 hidden and weight: the 2x rule of test_kernels_linear.py against a plain PyTorch run in
    the same dtype."""
    B, T, H, V = 3, 6, 16, 131
    h, w, y, old, ref, adv, mask = make_grpo(B, T, H, V, dtype, seed=1)
    roll = rollout_for(old, mask)
    kw, chunk = FUSED_VARIANTS[variant]
    hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, stats = fused_linear_grpo_loss(hk, wk, y, old, ref, adv, mask, chunk_size=chunk, backend=backend,
                                         **resolve(kw, roll))
    loss.backward()
    assert hk.grad.dtype == wk.grad.dtype == dtype
    hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
    loss_r, stats_r = fused_linear_grpo_loss_ref(hr, wr, y, old.double(), ref.double(), adv.double(), mask,
                                                 **resolve(kw, roll, torch.float64))
    loss_r.backward()
    hn, wn = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss_n, stats_n = fused_linear_grpo_loss_ref(hn, wn, y, old, ref, adv, mask, **resolve(kw, roll))  # in dtype
    loss_n.backward()
    check_lowp(loss, loss_r, loss_n, 1e-5)
    check_lowp(hk.grad, hr.grad, hn.grad, 1e-3)
    check_lowp(wk.grad, wr.grad, wn.grad, 1e-3)
    if "entropy" in stats:
        check_lowp(stats["entropy"], stats_r["entropy"], stats_n["entropy"], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio_level,chunk", [("token", 3), ("sequence", 11), ("sequence", 3)])
@pytest.mark.parametrize("grad", [True, False])
def test_fused_return_logprobs_are_the_tokens_logprobs(backend, ratio_level, chunk, grad):
    """return_logprobs gives the log-probs the loss used (the float64 reference's, 0 at padding),
    and changes neither the loss, the statistics nor the gradients."""
    B, T, H, V = 4, 5, 16, 131
    h, w, y, old, ref, adv, mask = make_grpo(B, T, H, V, torch.float32, seed=2)
    kw = dict(ratio_level=ratio_level, chunk_size=chunk, temperature=0.8, entropy_coef=0.05, backend=backend)
    runs = []
    for want in (False, True):
        wk = w.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = fused_linear_grpo_loss(h, wk, y, old, ref, adv, mask, return_logprobs=want, **kw)
            if grad:
                out[0].backward()
        runs.append((out, wk.grad))
    (loss, stats), g0 = runs[0]
    (loss_l, stats_l, logp), g1 = runs[1]
    assert logp.shape == (B, T) and logp.dtype == torch.float32 and not logp.requires_grad
    torch.testing.assert_close(loss_l, loss)
    assert_stats_close(stats_l, stats, atol=0, rtol=0)
    if grad:
        torch.testing.assert_close(g1, g0, atol=0, rtol=0)
    from rlvr_fast.kernels.reference import linear_token_logprobs_ref
    expect = linear_token_logprobs_ref(h.double().reshape(-1, H), w.double(), y.reshape(-1), 0.8).view(B, T)
    real = mask != 0
    torch.testing.assert_close(logp[real].double(), expect[real], atol=1e-6, rtol=1e-6)
    assert (logp[~real] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_fused_return_entropy_leaves_loss_and_grads_unchanged(backend, ratio_level):
    """return_entropy reports the entropy an entropy bonus would use, from the same pass, and changes nothing else."""
    g = torch.Generator().manual_seed(11)
    b, t, hdim, v = 3, 5, 8, 37
    h = torch.randn(b, t, hdim, generator=g).to(DEVICE)
    w = torch.randn(v, hdim, generator=g).to(DEVICE)
    y = torch.randint(0, v, (b, t), generator=g).to(DEVICE)
    old = (-torch.rand(b, t, generator=g) * 3).to(DEVICE)
    adv = torch.randn(b, generator=g).to(DEVICE)
    mask = (torch.rand(b, t, generator=g) > 0.2).float().to(DEVICE)
    runs = {}
    for name, kw in (("plain", {}), ("entropy", {"return_entropy": True}), ("bonus", {"entropy_coef": 1e-30})):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, stats = fused_linear_grpo_loss(hh, ww, y, old, old, adv, mask, ratio_level=ratio_level,
                                             backend=backend, **kw)
        loss.backward()
        runs[name] = (loss.detach(), hh.grad, ww.grad, stats)
    assert "entropy" not in runs["plain"][3]
    for a, c in zip(runs["plain"][:3], runs["entropy"][:3]):
        assert torch.equal(a, c)
    torch.testing.assert_close(runs["entropy"][3]["entropy"], runs["bonus"][3]["entropy"], rtol=1e-6, atol=1e-7)
    assert runs["entropy"][3]["entropy"] > 0
