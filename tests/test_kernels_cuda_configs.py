"""Every Triton kernel once at the launch configuration a GPU runs, in the interpreter.

The other kernel tests run the interpreter at small blocks (fast, and odd sizes hit the masked tail).
Here `cuda_launch_configs()` makes the launchers pick their GPU configurations (BLOCK_V 4096, BLOCK_T
1024, ...), and the sizes are chosen so those wide blocks loop and end in a masked tail. Results are
compared with the PyTorch paths, which the other tests hold to float64 references. The paged
attention and KV-write kernels take their block sizes from the tensor shapes alone, so their usual
tests already run the GPU configuration.
"""

import pytest
import torch

from rlvr_fast.kernels import fused_linear_grpo_loss, grpo_loss, linear_token_logprobs, token_logprobs
from rlvr_fast.kernels._common import HAS_TRITON, cuda_launch_configs, row_config, token_config
from rlvr_fast.kernels.paged_reference import sample_ref
from rlvr_fast.kernels.sampling import sample

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V = 4096 + 904    # two vocabulary blocks of 4096, the second masked
T = 1024 + 476    # two token blocks of 1024, the second masked


def test_the_configs_are_the_gpu_ones():
    with cuda_launch_configs():
        assert row_config(V) == (4096, 8) and token_config(T) == (1024, 4)
    if DEVICE == "cpu":
        assert row_config(V)[0] == 128  # the interpreter's default: small blocks


def run_both(fn, *leaves):
    """fn(backend) -> loss-like tensor or tuple; returns (value, grads) for triton (at GPU configs) and torch."""
    out = {}
    for backend in ("triton", "torch"):
        for x in leaves:
            x.grad = None
        with cuda_launch_configs():
            res = fn(backend)
        value = res[0] if isinstance(res, tuple) else res
        value.float().sum().backward()
        out[backend] = (value.detach(), [x.grad.clone() for x in leaves], res)
    return out["triton"], out["torch"]


@pytest.mark.parametrize("entropy", [False, True])
def test_token_logprobs(entropy):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, V, generator=g) * 3).to(DEVICE).requires_grad_()
    y = torch.randint(0, V, (3,), generator=g).to(DEVICE)

    def fn(backend):
        out = token_logprobs(x, y, temperature=0.7, return_entropy=entropy, backend=backend)
        return (out[0] + out[1], out) if entropy else out
    tri, ref = run_both(fn, x)
    torch.testing.assert_close(tri[0], ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(tri[1][0], ref[1][0], atol=2e-6, rtol=1e-5)


def test_linear_token_logprobs():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 16, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(V, 16, generator=g) * 0.3).to(DEVICE).requires_grad_()
    y = torch.randint(0, V, (4,), generator=g).to(DEVICE)
    tri, ref = run_both(lambda b: linear_token_logprobs(h, w, y, backend=b), h, w)
    torch.testing.assert_close(tri[0], ref[0], atol=2e-5, rtol=2e-5)
    for a, b in zip(tri[1], ref[1]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)


def grpo_inputs(b: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    ref = old + 0.1 * torch.randn(b, t, generator=g)
    roll = old + 0.05 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.1).float()
    return [x.to(DEVICE) for x in (old, ref, roll, adv, mask)]


@pytest.mark.parametrize("kw", [{}, {"ratio_level": "sequence", "delta": 3.0},
                                {"loss_type": "dapo", "rollout_logprobs": True, "tis_cap": 2.0}])
def test_grpo_loss(kw):
    old, ref, roll, adv, mask = grpo_inputs(2, T, 2)
    lp = (old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)).requires_grad_()
    kw = {**kw, "rollout_logprobs": roll} if kw.get("rollout_logprobs") else kw
    tri, ref_ = run_both(lambda b: grpo_loss(lp, old, ref, adv, mask, backend=b, **kw), lp)
    torch.testing.assert_close(tri[0], ref_[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tri[1][0], ref_[1][0], atol=1e-8, rtol=1e-5)
    for name, value in ref_[2][1].items():
        torch.testing.assert_close(tri[2][1][name], value, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kw", [{"entropy_coef": 0.01}, {"ratio_level": "sequence", "entropy_coef": 0.01},
                                {"rollout_logprobs": True, "tis_cap": 2.0, "delta": 3.0}])
def test_fused_linear_grpo_loss(kw):
    b, t, hdim = 2, 3, 16
    old, ref, roll, adv, mask = grpo_inputs(b, t, 4)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(b, t, hdim, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(V, hdim, generator=g) * 0.3).to(DEVICE).requires_grad_()
    y = torch.randint(0, V, (b, t), generator=g).to(DEVICE)
    kw = {**kw, "rollout_logprobs": roll} if kw.get("rollout_logprobs") else kw
    tri, ref_ = run_both(lambda bk: fused_linear_grpo_loss(h, w, y, old, ref, adv, mask, backend=bk, **kw), h, w)
    torch.testing.assert_close(tri[0], ref_[0], atol=2e-6, rtol=1e-5)
    for a, c in zip(tri[1], ref_[1]):
        torch.testing.assert_close(a, c, atol=2e-6, rtol=1e-4)


def test_sample_greedy():
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(6)).to(DEVICE) * 2
    logits[0, V - 3] = 50.0  # the winner of one row sits in the masked tail block
    with cuda_launch_configs():
        tok, lp = sample(logits, None, 0.0, backend="triton")
    want_tok, want_lp = sample_ref(logits, None, 0.0)
    assert torch.equal(tok, want_tok) and tok[0] == V - 3
    torch.testing.assert_close(lp, want_lp, atol=2e-5, rtol=2e-5)


def test_sample_with_temperature():
    """The Triton sampler draws by Gumbel-max, the reference by inverse CDF: the same distribution, not the same
    draws. Three likely tokens, one per block and one in the masked tail, the rest negligible."""
    rows, temperature = 300, 0.8
    logits = torch.full((rows, V), -30.0)
    likely = torch.tensor([5, 4100, V - 1])
    logits[:, likely] = (torch.tensor([0.5, 0.3, 0.2]).log() * temperature)  # softmax(z / T) = 0.5, 0.3, 0.2
    logits = logits.to(DEVICE)
    keys = torch.randint(0, 2**62, (rows,), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    with cuda_launch_configs():
        tok, lp = sample(logits, keys, temperature, backend="triton")
        again, _ = sample(logits[:7], keys[:7], temperature, backend="triton")
    assert torch.equal(again, tok[:7])  # a row's draw depends on its key and logits only
    freq = torch.stack([(tok == t).float().mean() for t in likely.to(DEVICE)]).cpu()
    assert freq.sum() == 1.0
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.1, rtol=0)
    torch.testing.assert_close(lp, torch.log_softmax(logits.float() / temperature, -1).gather(1, tok[:, None])[:, 0],
                               atol=2e-5, rtol=2e-5)


def test_sample_without_keys_needs_greedy():
    with pytest.raises(ValueError, match="keys .* are needed for temperature > 0"):
        sample(torch.randn(2, 10, device=DEVICE), None, 0.7)
