"""flash_attention: the Triton kernels (interpreted on CPU, compiled on a GPU) and the torch path
against the float64 reference (kernels/reference.py), values and gradients of q, k and v.

Shapes are awkward on purpose: several sequences, Lq < Lk (bottom-right causal diagonal), Lq == Lk,
1-token sequences, a sequence with no queries, lengths that are not multiples of the block (the
interpreter runs 16 x 16 tiles), GQA with 3 query heads per kv head, MQA and MHA, head_dim 64, 80
and 96, causal and not. One test runs the interpreter at the CUDA launch configuration's tile
sizes, so that the masked tails a GPU executes are the ones checked.

Low precision follows flash-attention's rule: the error against the float64 reference is at most
twice that of a plain PyTorch run in the same dtype, plus a small floor. fp16 runs on both
backends. bf16 runs on the torch backend only: Triton 3.9's interpreter computes garbage for bf16
dots (checked: errors of ~1e8), so the Triton path refuses bf16 on CPU and its bf16 numerics need
a GPU (on a GPU this file adds the bf16 Triton cases).

The GPU compile test builds every kernel at its CUDA launch configuration for sm_80 and sm_90
(tests/gpu_compile.py) and checks that none uses local memory (register spills or a stack frame)
and that shared memory fits the target.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from pathlib import Path

import pytest
import torch

from rlvr_fast.kernels import _common
from rlvr_fast.kernels import flash_attention as fa
from rlvr_fast.kernels.flash_attention import flash_attention
from rlvr_fast.kernels.reference import flash_attention_ref

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]

# (query lengths, key lengths, Hq, Hkv, head_dim, causal)
CASES = {
    "gqa3-d64-causal": ([5, 0, 17, 1, 33], [20, 7, 17, 1, 40], 6, 2, 64, True),
    "mha-d80-noncausal": ([5, 3, 17, 17, 1, 0], [2, 0, 17, 17, 1, 9], 2, 2, 80, False),  # Lq > Lk, no keys/queries
    "mqa-d96-causal": ([16, 31, 31, 1], [16, 47, 47, 3], 3, 1, 96, True),                 # a block multiple
}
# (Consecutive sequences of equal lengths: the torch path batches them into one SDPA call.)


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def make_case(lens_q, lens_k, hq, hkv, d, seed=0):
    """float64 q, k, v, dO on DEVICE (cast them to the dtype under test)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lens_k), hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lens_k), hkv, d, generator=g, dtype=torch.float64)
    do = torch.randn(sum(lens_q), hq, d, generator=g, dtype=torch.float64)
    return [t.to(DEVICE) for t in (q, k, v, do)]


def run(fn, q, k, v, do):
    """fn(q, k, v) and its gradients, with q, k, v as fresh leaves: [out, dq, dk, dv] in float64."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return [out.detach().double()] + [t.grad.double() for t in leaves]


def reference(case, q, k, v, do, upcast=True):
    lens_q, lens_k, *_, causal = case
    return run(lambda q, k, v: flash_attention_ref(q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), causal,
                                                   upcast=upcast), q, k, v, do)


def kernel(case, q, k, v, do, backend):
    lens_q, lens_k, *_, causal = case
    return run(lambda q, k, v: flash_attention(q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q),
                                               max(lens_k), causal=causal, backend=backend), q, k, v, do)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_fp32_values_and_grads_match_reference(backend, name):
    case = CASES[name]
    q, k, v, do = make_case(*case[:5])
    if DEVICE == "cuda" and backend == "triton" and case[4] > fa.FP32_MAX_HEAD_DIM:
        with pytest.raises(ValueError, match="float32 on CUDA only with head_dim <= 64"):
            kernel(case, q.float(), k.float(), v.float(), do.float(), backend)
        return  # these head dims run on the Triton path in fp16 below
    want = reference(case, q, k, v, do)
    got = kernel(case, q.float(), k.float(), v.float(), do.float(), backend)
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")
    lens_q, lens_k = case[0], case[1]
    if 0 in lens_k:  # a sequence with keys but no queries gets dk = dv = 0 (and one with no keys o = 0)
        i = lens_k.index(0)
        assert (got[0][sum(lens_q[:i]):sum(lens_q[:i + 1])] == 0).all()
    if 0 in lens_q:
        i = lens_q.index(0)
        rows = slice(sum(lens_k[:i]), sum(lens_k[:i + 1]))
        assert (got[2][rows] == 0).all() and (got[3][rows] == 0).all()


def lowp_rule(got, want, lowp, floor):
    """flash-attention's rule: error vs float64 <= 2 x (error of a PyTorch run in that dtype) + floor."""
    for what, g, w, n in zip(("out", "dq", "dk", "dv"), got, want, lowp):
        err, budget = (g - w).abs().max().item(), 2 * (n - w).abs().max().item() + floor
        assert err <= budget, f"{what}: error {err:.3g} > 2 x PyTorch's {budget - floor:.3g} / 2 + {floor}"


@pytest.mark.parametrize("backend, dtype, name", [("torch", torch.bfloat16, "gqa3-d64-causal"),
                                                  ("torch", torch.float16, "gqa3-d64-causal")]
                         + [("triton", torch.float16, name) for name in CASES]
                         + [("triton", torch.bfloat16, name) for name in CASES if DEVICE == "cuda"])
def test_low_precision_within_twice_pytorch_error(backend, dtype, name):
    case = CASES[name]
    q, k, v, do = make_case(*case[:5], seed=1)
    q, k, v, do = (t.to(dtype) for t in (q, k, v, do))
    got = kernel(case, q, k, v, do, backend)
    want = reference(case, q.double(), k.double(), v.double(), do.double())
    lowp_rule(got, want, reference(case, q, k, v, do, upcast=False), floor=1e-3)


def test_strided_views_of_a_packed_qkv():
    """q, k, v as head slices of one [N, Hq + 2 Hkv, D] projection (strided views, no copy), Lq == Lk."""
    lens, hq, hkv, d = [19, 1, 8], 6, 2, 64
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(sum(lens), hq + 2 * hkv, d, generator=g).to(DEVICE)
    do = torch.randn(sum(lens), hq, d, generator=g).to(DEVICE)
    cu = cu_seqlens(lens)
    results = {}
    for backend in ("ref",) + tuple(BACKENDS):
        x = qkv.clone().requires_grad_()
        q, k, v = x[:, :hq], x[:, hq:hq + hkv], x[:, hq + hkv:]
        if backend == "ref":
            out = flash_attention_ref(q, k, v, cu, cu)
        else:
            out = flash_attention(q, k, v, cu, cu, max(lens), max(lens), backend=backend)
        out.backward(do)
        results[backend] = (out.detach(), x.grad)
    for backend in BACKENDS:
        for got, want in zip(results[backend], results["ref"]):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every test already runs the CUDA configuration")
@pytest.mark.parametrize("config_dtype, d", [(torch.float32, 64), (torch.bfloat16, 64), (torch.bfloat16, 128)])
def test_interpreter_at_the_cuda_tile_sizes(monkeypatch, config_dtype, d):
    """The interpreter with the tiles launch_config picks on CUDA (fp32 inputs; the bf16 tiles too):
    sequences around the 16..128-row blocks, so the GPU's masked tails and stage boundaries run."""
    real = fa.launch_config
    monkeypatch.setattr(fa, "launch_config", lambda d, dtype, interpreter=None: real(d, config_dtype, False))
    assert real(d, config_dtype, False) != real(d, config_dtype, True)  # really the CUDA tiles
    case = ([130, 0, 1, 64], [200, 3, 1, 64], 3, 1, d, True)
    q, k, v, do = make_case(*case[:5], seed=3)
    want = reference(case, q, k, v, do)
    got = kernel(case, q.float(), k.float(), v.float(), do.float(), "triton")
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def test_auto_picks_torch_on_cpu_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(_common, "_LOGGED", set())
    case = CASES["mqa-d96-causal"]
    q, k, v, _ = (t.float().cpu() for t in make_case(*case[:5]))
    cu_q, cu_k = cu_seqlens(case[0]).cpu(), cu_seqlens(case[1]).cpu()
    with caplog.at_level(logging.INFO, logger="rlvr_fast.kernels"):
        for _ in range(2):
            flash_attention(q, k, v, cu_q, cu_k, 31, 47)
    msgs = [r.getMessage() for r in caplog.records if r.name == "rlvr_fast.kernels"]
    assert msgs == ["flash_attention: using the torch backend (cpu tensors)"]


def test_bad_inputs_raise_clear_errors():
    q, k, v = torch.randn(6, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    cu_q = torch.tensor([0, 2, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 3, 8], dtype=torch.int32)
    good = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4, max_seqlen_k=5)
    flash_attention(**good)  # the baseline is valid
    bad = [
        (dict(q=q[0]), ValueError, "q must be .tokens, heads, head_dim"),
        (dict(k=torch.randn(8, 3, 16), v=torch.randn(8, 3, 16)), ValueError, "multiple of the kv heads"),
        (dict(v=torch.randn(8, 2, 8)), ValueError, "same shape"),
        (dict(k=torch.randn(8, 2, 8), v=torch.randn(8, 2, 8)), ValueError, "same non-zero head_dim"),
        (dict(q=q.double()), TypeError, "q must have dtype"),
        (dict(q=q.half()), TypeError, "share a dtype"),
        (dict(cu_seqlens_q=cu_q.long()), TypeError, "cu_seqlens_q must be a 1-D int32"),
        (dict(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "same number of sequences"),
        (dict(cu_seqlens_q=torch.tensor([0, 4, 2], dtype=torch.int32)), ValueError, "never decrease"),
        (dict(cu_seqlens_q=torch.tensor([0, 2, 5], dtype=torch.int32)), ValueError, r"\[-1\] = 5 must equal"),
        (dict(max_seqlen_q=3), ValueError, "max_seqlen_q = 3 is less than the longest sequence"),
        (dict(max_seqlen_k=4.0), TypeError, "max_seqlen_k must be a non-negative Python int"),
        (dict(cu_seqlens_k=torch.tensor([0, 5, 8], dtype=torch.int32)), ValueError,
         "sequence 1 has 4 queries and 3 keys"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ]
    for change, exc, match in bad:
        with pytest.raises(exc, match=match):
            flash_attention(**{**good, **change})
    # Not causal, more queries than keys is fine.
    flash_attention(**{**good, "cu_seqlens_k": torch.tensor([0, 5, 8], dtype=torch.int32)}, causal=False)
    if fa.interpreting():
        with pytest.raises(TypeError, match="takes no bfloat16 on CPU"):
            flash_attention(**{**good, "q": q.bfloat16(), "k": k.bfloat16(), "v": v.bfloat16()}, backend="triton")
    big = {name: t.to(DEVICE) for name, t in good.items() if isinstance(t, torch.Tensor)}
    big.update(q=torch.randn(6, 1, 160, device=DEVICE), k=torch.randn(8, 1, 160, device=DEVICE),
               v=torch.randn(8, 1, 160, device=DEVICE))
    with pytest.raises(ValueError, match="head_dim <= 128, got 160; use backend='torch'"):
        flash_attention(**{**good, **big}, backend="triton")


# ----------------------------------------------------------------------------- GPU compile

# (dtype, head_dim) compiled per target. By default launch_config's three CUDA tile tiers (bf16/fp16
# at head_dim <= 64 and <= 128, fp32 at <= 64) on each target: 18 kernels, about a minute of CPU
# (two processes in parallel) when Triton's cache is cold, seconds when warm. fp16 shares bf16's
# tiles and code; RLVR_FAST_GPU_COMPILE_ALL=1 adds it (30 kernels).
TARGET_CASES = [("bfloat16", 64), ("bfloat16", 128), ("float32", 64)]
if os.environ.get("RLVR_FAST_GPU_COMPILE_ALL") == "1":
    TARGET_CASES += [("float16", 64), ("float16", 128)]
COMPILE_CASES = {80: TARGET_CASES, 90: TARGET_CASES}
KERNELS = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")


def compile_code(cases) -> str:
    return "\n".join(["import torch", "from rlvr_fast.kernels import flash_attention as fa",
                      "cu = torch.tensor([0, 100, 300], dtype=torch.int32)"] + [
        f"q = torch.randn(300, 6, {d}).to(torch.{dt}); k = torch.randn(300, 2, {d}).to(torch.{dt})\n"
        f"out, lse = fa._fwd_triton(q, k, k, cu, cu, 200, True, 0.1)\n"
        f"fa._bwd_triton(q, q, k, k, out, lse, cu, cu, 200, 200, True, 0.1)" for dt, d in cases])


def test_kernels_compile_for_sm80_and_sm90_without_spills():
    from tests.gpu_compile import SHARED_LIMIT, compile_in_subprocess

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton build ships no NVIDIA backend (ptxas)")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # one child process per target
        futures = {arch: pool.submit(compile_in_subprocess, compile_code(cases), arch)
                   for arch, cases in COMPILE_CASES.items()}
        results = {arch: f.result() for arch, f in futures.items()}
    for arch, records in results.items():
        expected = [(dt, d, name) for dt, d in COMPILE_CASES[arch] for name in KERNELS]
        assert [r["name"] for r in records] == [name for *_, name in expected]
        for (dt, d, name), r in zip(expected, records):
            where = f"sm_{arch} {name} {dt} head_dim {d} ({r['constants']}, {r['num_warps']} warps)"
            cfg = getattr(fa.launch_config(d, getattr(torch, dt), interpreter=False), name.split("_")[-2])
            assert (r["constants"]["BLOCK_M"], r["constants"]["BLOCK_N"], r["num_warps"], r["num_stages"]) == \
                (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages), where
            assert r["local"] == 0 and r["stack"] == 0, \
                f"{where}: spills to local memory ({r['local']} + {r['stack']} stack bytes per thread)"
            assert r["shared"] + r["shared_static"] <= SHARED_LIMIT[arch], f"{where}: shared memory {r['shared']}"


def test_check_seqlens_false_skips_only_the_host_read(monkeypatch):
    """check_seqlens=False: the Triton path reads no cu_seqlens on the host (the model's per-layer calls); the
    structural checks stay, and the torch path, which needs the bounds, still reads and checks them."""
    reads = []
    real = fa._read_bounds
    monkeypatch.setattr(fa, "_read_bounds", lambda *a: reads.append(1) or real(*a))
    q = torch.randn(6, 2, 16, device=DEVICE)
    k = torch.randn(8, 1, 16, device=DEVICE)
    cu_q = torch.tensor([0, 2, 6], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    want = flash_attention(q, k, k, cu_q, cu_k, 4, 5, backend="torch")
    assert len(reads) == 1
    if fa.interpreting() or DEVICE == "cuda":
        got = flash_attention(q, k, k, cu_q, cu_k, 4, 5, backend="triton", check_seqlens=False)
        assert len(reads) == 1
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    flash_attention(q, k, k, cu_q, cu_k, 4, 5, backend="torch", check_seqlens=False)
    assert len(reads) == 2
    with pytest.raises(TypeError, match="int32"):
        flash_attention(q, k, k, cu_q.long(), cu_k, 4, 5, backend="triton", check_seqlens=False)
