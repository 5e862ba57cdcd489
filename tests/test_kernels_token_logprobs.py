"""token_logprobs: Triton kernels (interpreted on CPU, compiled on a GPU) and the torch path vs the
float64 reference, values and gradients.

bf16/fp16 inputs go through the kernels unchanged: Triton 3.9's interpreter loads and stores them
(the kernels compute in fp32 either way). The low-precision pass rule is flash-attention's: the
kernel's error against the float64 reference is at most twice that of a plain PyTorch run in the
same dtype (plus a small floor). One measured interpreter artifact: its fp32 -> bf16 store
truncates (rounds toward zero) where a GPU rounds to nearest, up to one bf16 ulp (2^-7 relative)
instead of half of one; under the interpreter the bf16 gradient floor adds that ulp.
"""

import pytest
import torch

from rlvr_fast.kernels import token_logprobs
from rlvr_fast.kernels._common import interpreting
from rlvr_fast.kernels.reference import token_logprobs_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]


def make_inputs(shape, V, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, V, generator=g) * scale).to(dtype)
    y = torch.randint(0, V, shape, generator=g)
    flat = y.view(-1)
    flat[0] = 0                  # first and last vocabulary ids
    flat[-1] = V - 1
    return x.to(DEVICE), y.to(DEVICE)


def naive_lowp(x, y, temperature):
    """The plain PyTorch expression run in x's own dtype: the error budget for bf16/fp16."""
    x = x.detach().requires_grad_()
    lp_all = torch.log_softmax(x / temperature, dim=-1)
    lp = lp_all.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    ent = -(lp_all.exp() * lp_all).sum(-1)
    return lp, ent, x


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


CASES = [((1,), 7), ((5,), 131), ((37,), 7), ((3, 4), 1000), ((1,), 1000)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,V", CASES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_grads_match_float64_reference(backend, dtype, shape, V, temperature):
    torch.manual_seed(0)
    x, y = make_inputs(shape, V, dtype)
    xk = x.clone().requires_grad_()
    lp, ent = token_logprobs(xk, y, temperature, return_entropy=True, backend=backend)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == y.shape
    g_lp, g_ent = torch.randn_like(lp), torch.randn_like(ent)
    (lp * g_lp + ent * g_ent).sum().backward()
    assert xk.grad.dtype == dtype and xk.grad.shape == x.shape

    xr = x.detach().double().requires_grad_()
    lp_r, ent_r = token_logprobs_ref(xr, y, temperature, return_entropy=True)
    (lp_r * g_lp.double() + ent_r * g_ent.double()).sum().backward()

    if dtype == torch.float32:
        torch.testing.assert_close(lp.double(), lp_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent.double(), ent_r, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xk.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)
    else:
        lp_n, ent_n, xn = naive_lowp(x, y, temperature)
        (lp_n.float() * g_lp + ent_n.float() * g_ent).sum().backward()
        assert err(lp, lp_r) <= 2 * err(lp_n, lp_r) + 1e-5
        assert err(ent, ent_r) <= 2 * err(ent_n, ent_r) + 1e-5
        truncation_ulp = 2.0 ** -7 * xr.grad.abs().max().item() if backend == "triton" and interpreting() else 0.0
        assert err(xk.grad, xr.grad) <= 2 * err(xn.grad, xr.grad) + 1e-3 + truncation_ulp


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_only_gradient_and_fp16(backend):
    x, y = make_inputs((6,), 131, torch.float16, scale=2.0)
    xk = x.clone().requires_grad_()
    lp = token_logprobs(xk, y, backend=backend)
    lp.sum().backward()
    xr = x.detach().double().requires_grad_()
    token_logprobs_ref(xr, y).sum().backward()
    torch.testing.assert_close(lp.double(), token_logprobs_ref(x.double(), y), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xk.grad.double(), xr.grad, atol=1e-3, rtol=1e-2)  # fp16 grad rounding


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_slice_without_copy(backend):
    """logits[:, :-1] of a [B, T, V] tensor is taken as is (two row strides)."""
    x, y = make_inputs((3, 6), 131, torch.float32)
    full = x.clone().requires_grad_()
    view = full[:, :-1]
    assert not view.is_contiguous()
    lp = token_logprobs(view, y[:, :-1], 0.9, backend=backend)
    lp.sum().backward()
    xr = x.detach().double().requires_grad_()
    token_logprobs_ref(xr[:, :-1], y[:, :-1], 0.9).sum().backward()
    torch.testing.assert_close(lp.double(), token_logprobs_ref(x.double()[:, :-1], y[:, :-1], 0.9), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: both where() arms
@pytest.mark.parametrize("backend", BACKENDS)
def test_invariants_extreme_logits(backend):
    """log-probs <= 0 (equivalently lse >= the row max), finite for huge and -inf logits."""
    x, y = make_inputs((4,), 131, torch.float32, scale=1e4)
    x[1, 5:] = -float("inf")                 # a top-k style row: target inside the finite part
    y[1] = 2
    x[2] = 0.0                               # uniform row: logp = -log V exactly
    xk = x.clone().requires_grad_()
    lp, ent = token_logprobs(xk, y, return_entropy=True, backend=backend)
    (lp + ent).sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and torch.isfinite(xk.grad).all()
    assert (lp <= 0).all()
    assert lp[2].item() == pytest.approx(-torch.log(torch.tensor(131.0)).item(), abs=1e-5)
    assert ent[2].item() == pytest.approx(torch.log(torch.tensor(131.0)).item(), abs=1e-5)
    torch.testing.assert_close(lp.double(), token_logprobs_ref(x.double(), y), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_without_cancellation_at_a_large_offset(backend):
    """Logits around 2000: the entropy (and the Triton gradient) stay as exact as at 0 (the row routine sums
    p * (z - max); lse - sum p z would lose ~1e-4 to the rounding of two numbers near 2000). T = 1:
    scaling by 1/T in fp32 rounds z itself by that much."""
    x, y = make_inputs((6,), 1000, torch.float32)
    x = x + 2000.0
    xk = x.clone().requires_grad_()
    lp, ent = token_logprobs(xk, y, return_entropy=True, backend=backend)
    ent.sum().backward()
    xr = x.detach().double().requires_grad_()
    lp_r, ent_r = token_logprobs_ref(xr, y, return_entropy=True)
    ent_r.sum().backward()
    torch.testing.assert_close(ent.double(), ent_r, atol=1e-5, rtol=1e-5)
    # The torch path recomputes log p as z - lse with lse rounded to fp32 (kernels/_rows.py): 1e-4 here.
    tol = 1e-5 if backend == "triton" else 2e-4
    torch.testing.assert_close(xk.grad.double(), xr.grad, atol=tol, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_empty(backend):
    x, y = make_inputs((5,), 7, torch.float32)
    with torch.no_grad():
        lp = token_logprobs(x.requires_grad_(), y, backend=backend)
    assert not lp.requires_grad
    empty = token_logprobs(torch.zeros(0, 7, device=DEVICE), torch.zeros(0, dtype=torch.long, device=DEVICE),
                           backend=backend)
    assert empty.shape == (0,)


def test_errors():
    x, y = make_inputs((5,), 7, torch.float32)
    with pytest.raises(ValueError, match="targets must have shape"):
        token_logprobs(x, y[:4])
    with pytest.raises(TypeError, match="targets must be an int64"):
        token_logprobs(x, y.float())
    with pytest.raises(TypeError, match="logits must have dtype"):
        token_logprobs(x.double(), y)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        token_logprobs(torch.randn(7, 5, device=DEVICE).T, y)
    with pytest.raises(ValueError, match="cannot be viewed"):
        token_logprobs(torch.randn(2, 3, 4, 7, device=DEVICE).transpose(0, 1),
                       torch.zeros(3, 2, 4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(x, y, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        token_logprobs(x, y, backend="cuda")
    with pytest.raises(ValueError, match="one device"):
        token_logprobs(torch.empty(5, 7, device="meta"), y.cpu())
