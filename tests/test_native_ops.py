"""The native CPU ops (csrc/, torch.ops.rlvr_fast.*) against their PyTorch references: paged KV writes,
paged decode attention, sampling (same tokens for the same keys, chi-square), the fused decoder-layer ops
(RMSNorm, rotary) against the model's own code, dispatch, and the rollout engine giving the same
completions on the native and the reference ops."""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rlvr_fast.kernels import native
from rlvr_fast.kernels.native import rms_norm, rotary_embedding
from rlvr_fast.kernels._common import cpu_backend, pick_backend
from rlvr_fast.kernels.paged_attention import paged_attention
from rlvr_fast.kernels.paged_kv import write_kv
from rlvr_fast.kernels.paged_reference import (log_softmax_at, paged_attention_naive, paged_attention_ref, sample_ref,
                                               top_k_top_p_mask, write_kv_ref)
from rlvr_fast.kernels.sampling import sample
from rlvr_fast.model.llama import RMSNorm, apply_rotary, rotary_cos_sin

pytestmark = pytest.mark.skipif(not native.HAS_NATIVE, reason=f"native CPU ops {native.WHY_NOT}")
CPU = torch.device("cpu")


def shared_prefix_tables(lengths: list[int], block_size: int, num_blocks: int, shared_blocks: int, seed: int = 0):
    """Random block tables; every sequence that is long enough starts with the same `shared_blocks` blocks
    (a GRPO group sharing its prompt). Unused trailing entries hold arbitrary valid blocks."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    shared, rest = perm[:shared_blocks], perm[shared_blocks:]
    width = max(-(-n // block_size) for n in lengths)
    tables = torch.randint(0, num_blocks, (len(lengths), width), generator=g, dtype=torch.int32)
    for i, n in enumerate(lengths):
        need = -(-n // block_size)
        row = (shared[:need] if need <= shared_blocks else shared + [rest.pop() for _ in range(need - shared_blocks)])
        tables[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
    return tables


# ------------------------------------------------------------------------------------------ write_kv

@pytest.mark.parametrize("dtype, src_dtype, slot_dtype", [(torch.float32, torch.float32, torch.int64),
                                                          (torch.bfloat16, torch.bfloat16, torch.int32),
                                                          (torch.bfloat16, torch.float32, torch.int64),
                                                          (torch.float16, torch.float16, torch.int32),
                                                          (torch.float16, torch.float32, torch.int64)])
def test_write_kv_matches_reference_and_skips_negative_slots(dtype, src_dtype, slot_dtype):
    num_blocks, block_size, hkv, d = 9, 5, 3, 12
    g = torch.Generator().manual_seed(2)
    k = torch.randn(13, hkv, d, generator=g).to(src_dtype)
    v = torch.randn(13, hkv, d, generator=g).to(src_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:13]
    slots[[3, 7]] = -1  # padding rows: written nowhere
    got_k, got_v = torch.randn(2, num_blocks, block_size, hkv, d, generator=g).to(dtype).unbind(0)
    want_k, want_v = got_k.clone(), got_v.clone()
    write_kv(k, v, got_k, got_v, slots.to(slot_dtype), backend="native")
    keep = slots >= 0
    write_kv_ref(k[keep], v[keep], want_k, want_v, slots[keep])
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_write_kv_rejects_out_of_range_slots():
    cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.rlvr_fast.write_kv(torch.ones(1, 1, 8), torch.ones(1, 1, 8), cache, cache.clone(), torch.tensor([8]))


# ------------------------------------------------------------------------------------------ paged attention

# The Triton tests' shapes, then the models' head sizes (64, 128: the vectorised path) with GQA, and odd block sizes.
ATTENTION_CASES = [(6, 2, 16, 4), (4, 4, 8, 8), (9, 3, 24, 16), (9, 3, 64, 16), (8, 2, 128, 16), (4, 1, 64, 7),
                   (6, 3, 40, 5)]


@pytest.mark.parametrize("hq, hkv, d, block_size", ATTENTION_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_paged_attention_matches_reference(hq, hkv, d, block_size, dtype):
    # Odd lengths, a context of 1, one exactly 3 blocks, one longer than a 16-token tile and a 128-token chunk.
    lengths = [3 * block_size + 1, 1, 17, 3 * block_size, 33, 150, 5]
    num_blocks = 96
    g = torch.Generator().manual_seed(1)
    tables = shared_prefix_tables(lengths, block_size, num_blocks, shared_blocks=3)
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    q = torch.randn(len(lengths), hq, d, generator=g).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    got = paged_attention(q, k_cache, v_cache, tables, lens, backend="native")
    assert got.dtype == dtype and got.shape == q.shape
    want = paged_attention_naive(q.float(), k_cache.float(), v_cache.float(), tables, lens)  # fp32 ground truth
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    else:
        # 16-bit rule (flash-attention's): no worse than 2x the PyTorch path's error in that dtype against fp32,
        # plus the output's own rounding (fp32 accumulation makes the native op the more accurate one).
        ref_err = (paged_attention_ref(q, k_cache, v_cache, tables, lens).float() - want).abs().max()
        err = (got.float() - want).abs().max()
        assert err <= 2 * ref_err + 1e-2, (err, ref_err)


@pytest.mark.parametrize("level", ["avx2", "baseline"])
def test_paged_attention_narrower_cpu_paths(level):
    """The AVX2 (8-float) and baseline (4-float) kernels, run on this machine by capping the level the
    extension detects (RLVR_FAST_CPU_LEVEL; on a CPU without AVX-512 one of them is the default path)."""
    if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        pytest.skip("per-ISA kernels exist on x86-64 only")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}",
                          "-k", "test_paged_attention_matches_reference"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "RLVR_FAST_CPU_LEVEL": level})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_paged_attention_zero_length_rows_are_zero_and_scale_is_used():
    k_cache = torch.randn(4, 4, 1, 64)
    q = torch.randn(2, 2, 64)
    tables = torch.zeros(2, 1, dtype=torch.int32)
    out = torch.ops.rlvr_fast.paged_attention(q, k_cache, k_cache, tables, torch.tensor([3, 0], dtype=torch.int32), 0.3)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    want = paged_attention_naive(q[:1], k_cache, k_cache, tables[:1], torch.tensor([3]), scale=0.3)
    torch.testing.assert_close(out[:1], want, atol=2e-5, rtol=2e-5)


def test_paged_attention_checks_block_tables():
    k_cache = torch.randn(4, 4, 1, 8)
    with pytest.raises(RuntimeError, match="not a block of the cache"):
        torch.ops.rlvr_fast.paged_attention(torch.randn(1, 1, 8), k_cache, k_cache,
                                            torch.tensor([[0, 7]], dtype=torch.int32),
                                            torch.tensor([6], dtype=torch.int32), 1.0)


# ------------------------------------------------------------------------------------------ sampling

def keys(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax_with_first_index_ties():
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(9, 1000, generator=g) * 3).round()  # many exact ties, also for the max
    logits[1, 500:] = logits[1].max()  # the max tied over half the row
    logits[2, 999] = 1e4  # the last index
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = logits.to(dtype)
        tok, lp = sample(x, None, 0.0, backend="native")
        assert torch.equal(tok, x.float().argmax(-1))
        torch.testing.assert_close(lp, log_softmax_at(x, tok, 0.0))
        assert (lp <= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 50, 1.0), (1.0, 0, 0.9),
                                                       (0.8, 20, 0.7), (1.0, 1, 1.0), (1.0, 0, 0.05)])
def test_sampled_tokens_equal_reference_for_same_keys(dtype, temperature, top_k, top_p):
    g = torch.Generator().manual_seed(4)
    for vocab in (7, 1000, 49152):  # one chunk, a partial last chunk, the default model's vocabulary
        logits = (torch.randn(48, vocab, generator=g) * 3).to(dtype)
        k = keys(48, seed=vocab)
        tok, lp = sample(logits, k, temperature, top_k, top_p, backend="native")
        want_tok, want_lp = sample_ref(logits, k, temperature, top_k, top_p)
        assert torch.equal(tok, want_tok), f"vocab {vocab}: {(tok != want_tok).sum()} of 48 draws differ"
        torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lp, log_softmax_at(logits, tok, temperature), atol=1e-5, rtol=1e-5)
    # A row's draw depends on its key and logits only, not on the rest of the batch.
    sub_tok, _ = sample(logits[5:9], k[5:9], temperature, top_k, top_p, backend="native")
    assert torch.equal(sub_tok, tok[5:9])


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.6), (5, 0.8), (1, 1.0)])
def test_top_k_top_p_never_emit_excluded_tokens(top_k, top_p):
    g = torch.Generator().manual_seed(4)
    row = torch.randn(40, generator=g) * 2
    draws = 5000
    tokens, logprobs = sample(row.repeat(draws, 1), keys(draws, seed=6), 1.0, top_k, top_p, backend="native")
    keep = torch.isfinite(top_k_top_p_mask(row[None], top_k, top_p))[0]
    used = torch.bincount(tokens, minlength=40) > 0
    assert not (used & ~keep).any(), "an excluded token was sampled"
    assert used[keep].sum() >= min(int(keep.sum()), 2)  # the allowed set is actually explored
    torch.testing.assert_close(logprobs, F.log_softmax(row, 0)[tokens])  # full-distribution log-probs


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_frequencies_chi_square(temperature):
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.25])
    draws = 20000
    tokens, logprobs = sample(row.repeat(draws, 1), keys(draws), temperature, backend="native")
    observed = torch.bincount(tokens, minlength=row.numel()).double()
    expected = torch.softmax(row.double() / temperature, 0) * draws
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(row.numel() - 1.0, dtype=torch.float64)
    p_value = float(torch.special.gammaincc(dof / 2, statistic / 2))  # chi-square survival function
    assert p_value > 1e-3, f"sampled frequencies {observed.tolist()} vs expected {expected.tolist()}"
    torch.testing.assert_close(logprobs, log_softmax_at(row.repeat(draws, 1), tokens, temperature))


def test_sample_needs_keys_when_sampling():
    with pytest.raises(RuntimeError, match="keys are required"):
        torch.ops.rlvr_fast.sample(torch.randn(2, 10), None, 1.0)


# ------------------------------------------------------------------------------------------ decoder-layer ops

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [576, 37])
def test_rms_norm_matches_the_model(dtype, hidden):
    g = torch.Generator().manual_seed(7)
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=g) * 0.2 + 1)
        x = (torch.randn(33, hidden + 5, generator=g) * 3).to(dtype)[:, :hidden]  # strided rows
        want = norm(x)
    got = rms_norm(x, norm.weight, 1e-5, backend="native")
    assert got.dtype == dtype and got.shape == want.shape
    # Same formula and roundings; only the fp32 sum of squares is taken in another order.
    torch.testing.assert_close(got, want, rtol=2e-6 if dtype == torch.float32 else 8e-3, atol=1e-6)
    if dtype != torch.float32:
        assert (got == want).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq, hkv, d", [(9, 3, 64), (4, 2, 16)])
def test_rotary_embedding_is_bit_identical_to_the_model(dtype, hq, hkv, d):
    g = torch.Generator().manual_seed(8)
    n = 21
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(dtype)  # a fused projection's output
    q, k, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.reshape(n, hq, d), k.reshape(n, hkv, d)  # strided views, as the model has them
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = rotary_cos_sin(inv_freq, torch.arange(n) * 13 + 2, dtype)
    got_q, got_k = rotary_embedding(q, k, cos, sin, backend="native")
    assert torch.equal(got_q, apply_rotary(q, cos, sin)) and torch.equal(got_k, apply_rotary(k, cos, sin))


def test_decoder_layer_ops_keep_autograd_on_the_reference_path():
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    out = rms_norm(x, w, 1e-5)  # auto: grad needed, so the differentiable PyTorch path
    out.sum().backward()
    assert x.grad is not None and w.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(x, w, 1e-5), out.detach(), rtol=2e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ dispatch

def test_ops_are_registered_and_auto_picks_native_on_cpu():
    for op in ("write_kv", "paged_attention", "sample", "rms_norm", "rotary_embedding"):
        assert hasattr(torch.ops.rlvr_fast, op)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rlvr_fast::{op}", "CPU")
    assert pick_backend("paged_attention", "auto", CPU, has_native=True) == "native"
    with cpu_backend("torch"):
        assert pick_backend("paged_attention", "auto", CPU, has_native=True) == "torch"
    assert pick_backend("paged_attention", "auto", CPU, has_native=True) == "native"
    assert pick_backend("token_logprobs", "auto", CPU) == "torch"  # ops without a native kernel
    with pytest.raises(ValueError, match="backend must be one of"):
        pick_backend("token_logprobs", "native", CPU)


def test_native_backend_is_for_cpu_tensors():
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        pick_backend("paged_attention", "native", torch.device("cuda"), has_native=True)


OPCHECK = ("test_schema", "test_autograd_registration")  # no fake kernels: nothing compiles these ops


def test_opcheck_schemas():
    """torch.library.opcheck: the schemas' mutation annotations match what the kernels do, autograd registration."""
    opcheck = functools.partial(torch.library.opcheck, test_utils=OPCHECK)
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(2, 6, 4, 2, 64, generator=g).unbind(0)
    tables = torch.tensor([[0, 1], [2, 5]], dtype=torch.int32)
    lens = torch.tensor([5, 7], dtype=torch.int32)
    opcheck(torch.ops.rlvr_fast.paged_attention.default,
            (torch.randn(2, 4, 64, generator=g), kc, vc, tables, lens, 0.125))
    opcheck(torch.ops.rlvr_fast.write_kv.default,
            (torch.randn(3, 2, 64, generator=g), torch.randn(3, 2, 64, generator=g), kc.clone(), vc.clone(),
             torch.tensor([0, -1, 9])))
    opcheck(torch.ops.rlvr_fast.sample.default, (torch.randn(3, 50, generator=g), keys(3), 0.8, 5, 0.9))
    opcheck(torch.ops.rlvr_fast.rms_norm.default, (torch.randn(3, 40, generator=g), torch.rand(40), 1e-5))
    cos, sin = torch.randn(2, 3, 16, generator=g).unbind(0)
    opcheck(torch.ops.rlvr_fast.rotary_embedding.default,
            (torch.randn(3, 4, 16, generator=g), torch.randn(3, 2, 16, generator=g), cos, sin))


def test_without_native_one_log_line_and_a_clear_error():
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
            "from rlvr_fast.kernels._common import pick_backend\n"
            "from rlvr_fast.kernels import native\n"
            "assert not native.HAS_NATIVE\n"
            "assert pick_backend('sample', 'auto', torch.device('cpu'), has_native=True) == 'torch'\n"
            "try:\n    pick_backend('sample', 'native', torch.device('cpu'), has_native=True)\n"
            "except RuntimeError as e:\n    print('ERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RLVR_FAST_NO_NATIVE": "1"})
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stderr.splitlines() if "native CPU ops" in x]
    assert len(lines) == 1 and "using the PyTorch reference ops" in lines[0], out.stderr
    assert "ERROR sample: backend='native'" in out.stdout and "RLVR_FAST_NO_NATIVE" in out.stdout


def test_native_ops_without_triton_installed():
    """Block `import triton`: the native CPU ops still load and dispatch (no CUDA kernels registered)."""
    code = ("import sys\n"
            "class NoTriton:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'triton' or name.startswith('triton.'):\n"
            "            raise ImportError('triton blocked for this test')\n"
            "sys.meta_path.insert(0, NoTriton())\n"
            "import torch\n"
            "from rlvr_fast.kernels.sampling import sample\n"
            "from rlvr_fast.kernels import native\n"
            "assert native.HAS_NATIVE and 'triton' not in sys.modules\n"
            "assert not torch._C._dispatch_has_kernel_for_dispatch_key('rlvr_fast::sample', 'CUDA')\n"
            "tok, lp = sample(torch.randn(3, 20), torch.tensor([5, 6, 7]) << 40, 1.0)\n"
            "print('ok', tok.shape[0])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok 3", out.stderr


# ------------------------------------------------------------------------------------------ engine

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rlvr_fast.checkpoint.load import load_model
    from rlvr_fast.tokenizer import Tokenizer
    from tests.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", max_position_embeddings=128,
                                head_dim=64, num_attention_heads=6, num_key_value_heads=2, hidden_size=96)
    return load_model(path).eval(), Tokenizer.from_dir(path)


@pytest.mark.parametrize("block_size", [16, 5])
def test_engine_same_completions_with_native_and_reference_ops(tiny, block_size):
    from rlvr_fast import RolloutEngine, SamplingParams

    model, tok = tiny
    rng = random.Random(0)
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(n)] for n in (1, 9, 23, 40)]
    engine = RolloutEngine(model, tok, num_blocks=128, block_size=block_size)
    for params in (SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True),
                   # Sampled too: same seed -> same keys -> same tokens (fp32; differences only within rounding).
                   SamplingParams(temperature=0.9, top_k=20, top_p=0.95, max_new_tokens=16, seed=5, ignore_eos=True)):
        out = {}
        for ops in ("native", "torch"):
            with cpu_backend(ops):
                out[ops] = engine.generate(prompts, params, n=3)
        for got, want in zip(out["native"], out["torch"]):
            for a, b in zip(got, want):
                assert a.token_ids == b.token_ids
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)
