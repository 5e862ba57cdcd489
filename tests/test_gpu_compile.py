"""Every Triton kernel the project ships, compiled for real GPU targets without a GPU.

Each target gets one child process (tests/gpu_compile.py) in which a stand-in driver reports a CUDA
target and every launch only compiles. The launchers are called as production calls them, so the
launch configuration (BLOCK_*, num_warps) is the one their own config functions pick on CUDA, and
the constexpr variants are the ones production reaches. A kernel fails the test when it does not
compile, spills (cuobjdump LOCAL or STACK above 0) or needs more shared memory than the target has.
The FlashAttention kernels have their own compile test in tests/test_flash_attention.py.

By default a covering set is compiled: every constexpr flag on and off, every dtype, every head shape,
at least once per target (about a minute of CPU from a cold Triton cache). RLVR_FAST_GPU_COMPILE_ALL=1
compiles the full product of flags and dtypes instead.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
from pathlib import Path

import pytest

ALL = os.environ.get("RLVR_FAST_GPU_COMPILE_ALL") == "1"
TARGETS = (80, 90, 100)
VOCABS = (32000, 49152, 128256, 151936)  # Llama 2, SmolLM2, Llama 3, Qwen2/2.5/3 (Qwen2.5-7B's 152064 compiles the same)
DTYPES = ("float32", "bfloat16", "float16")
# (query heads, kv heads, head_dim): SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B (= Qwen3-8B); Qwen3-0.6B (2 query
# heads per kv head at head_dim 128); Qwen2.5-0.5B and Qwen2.5-7B (7 per kv head: the paged kernel's group block
# of 8, masked, which spilled at 4 warps on sm_90: see decode_warps). Only the paged decode kernel and the KV
# write compile per head shape; flash_attention per head_dim (tests/test_flash_attention.py: 64 and 128).
HEAD_SHAPES = ((9, 3, 64), (32, 8, 64), (32, 8, 128), (16, 8, 128), (14, 2, 64), (28, 4, 128))
GRPO_FLAGS = ("old", "ref", "delta", "tis", "seq")          # grpo_loss: each an option of the loss
FUSED_FLAGS = ("old", "ref", "delta", "tis", "entropy", "logp")  # fused_linear_grpo_loss (token level)
TRITON = 'backend="triton"'


def flag_sets(flags: tuple[str, ...]) -> list[dict[str, bool]]:
    """All combinations (ALL), or a covering set: all off, all on, and each flag alone."""
    if ALL:
        return [dict(zip(flags, bits)) for bits in itertools.product((False, True), repeat=len(flags))]
    return [dict.fromkeys(flags, False), dict.fromkeys(flags, True)] + [{f: f == g for f in flags} for g in flags]


PRELUDE = """
import torch
from rlvr_fast.kernels import _common, fused_linear_grpo_loss, grpo_loss
from rlvr_fast.kernels._rows import rows_bwd_triton, rows_fwd_triton
from rlvr_fast.kernels.sampling import _sample_triton
from rlvr_fast.kernels.paged_attention import _paged_attention_triton
from rlvr_fast.kernels.paged_kv import _write_kv_triton
# Launches only compile here, so CPU tensors stand in for CUDA ones: let backend="triton" take them,
# and pick the GPU launch configurations (as on a GPU) rather than the interpreter's.
_common.interpreting = lambda: True
gpu_configs = _common.cuda_launch_configs()  # held: the block ends when this object goes away
gpu_configs.__enter__()

def grpo_inputs(b, t, dtype=torch.float32):
    old = -torch.rand(b, t); adv = torch.randn(b); mask = torch.ones(b, t)
    return old.to(dtype), old.to(dtype), old.to(dtype), adv, mask
"""


def compile_code() -> tuple[list[str], list[list[tuple[str, dict]]]]:
    """The child's program as a list of cases, and per case the kernels it must compile with their
    expected launch configuration (the launchers' own config functions, on CUDA)."""
    import triton

    from rlvr_fast.kernels._common import row_config
    from rlvr_fast.kernels.paged_attention import decode_warps

    lines, expect = [PRELUDE], [[]]

    def case(source: str) -> None:  # a new case; the expectations added next belong to it
        lines.append(source)
        expect.append([])

    def row(name, dtype, vocab, **extra):
        block, warps = _gpu_row_config(row_config, vocab)
        expect[-1].append((name, {"BLOCK_V": block, "num_warps": warps, "dtype": dtype, "V": vocab, **extra}))

    # The shared row kernels (kernels/_rows.py) as token_logprobs launches them: forward and backward, with and without entropy, every dtype and vocabulary.
    for dtype, vocab in itertools.product(DTYPES, VOCABS if ALL else VOCABS[:1] + VOCABS[-1:]):
        for entropy in (False, True):
            case(f"x = torch.randn(1, 2, {vocab}).to(torch.{dtype}); y = torch.zeros(2, dtype=torch.long)\n"
                         f"lp, state, ent = rows_fwd_triton(x, y, 1.0, {entropy})\n"
                         f"g = torch.ones(2); rows_bwd_triton(x, x, y, state, g, {'g' if entropy else 'None'}, ent, 1.0)")
            row("_rows_fwd_kernel", dtype, vocab, ENTROPY=entropy)
            row("_rows_bwd_kernel", dtype, vocab, ENTROPY=entropy)

    # GRPO loss on [B, T] log-probs: forward+backward (WRITE_GRAD) for each option set.
    for flags, dtype in itertools.product(flag_sets(GRPO_FLAGS), ("float32", "bfloat16") if ALL else ("float32",)):
        kw = [] if flags["ref"] else ["beta=0.0"]
        kw += ["delta=3.0"] if flags["delta"] else []
        kw += ["rollout_logprobs=roll, tis_cap=2.0"] if flags["tis"] else []
        kw += ["ratio_level='sequence'"] if flags["seq"] else []
        case(f"old, ref, roll, adv, mask = grpo_inputs(4, 3000, torch.{dtype})\n"
                     f"lp = old.clone().requires_grad_()\n"
                     f"loss, _ = grpo_loss(lp, {'old' if flags['old'] else 'None'}, "
                     f"{'ref' if flags['ref'] else 'None'}, adv, mask, {', '.join(kw + [TRITON])})\n"
                     f"loss.backward()")
        expect[-1].append(("_grpo_loss_kernel", {"BLOCK_T": 1024, "num_warps": 4, **flags}))

    # The fused lm-head GRPO loss: the token-level row kernel, and GSPO's two passes (the shared row kernels).
    for flags in flag_sets(FUSED_FLAGS):
        dtype = "bfloat16"
        kw = [] if flags["ref"] else ["beta=0.0"]
        kw += ["delta=3.0"] if flags["delta"] else []
        kw += ["rollout_logprobs=roll, tis_cap=2.0"] if flags["tis"] else []
        kw += ["entropy_coef=0.01"] if flags["entropy"] else []
        kw += ["return_logprobs=True"] if flags["logp"] else []
        case(_fused_call(dtype, VOCABS[-1], flags, kw))
        row("_fused_grpo_rows_kernel", dtype, VOCABS[-1], **flags)
    for dtype, entropy in itertools.product(DTYPES, (False, True)):
        kw = ["ratio_level='sequence'"] + (["entropy_coef=0.01"] if entropy else [])
        case(_fused_call(dtype, VOCABS[1], {"old": True, "ref": True, "tis": False}, kw))
        row("_rows_fwd_kernel", dtype, VOCABS[1], ENTROPY=entropy)
        row("_rows_bwd_kernel", dtype, VOCABS[1], ENTROPY=entropy)

    # Sampling: temperature and greedy rows, at Llama 3's and Qwen's vocabularies.
    for dtype, greedy, vocab in itertools.product(DTYPES, (False, True), VOCABS[2:]):
        case(f"_sample_triton(torch.randn(4, {vocab}).to(torch.{dtype}), torch.arange(4), "
                     f"{0.0 if greedy else 0.8})")
        row("_sample_kernel", dtype, vocab, GREEDY=greedy)

    # Rollout attention: the KV-cache write and paged decode attention, per model's head shape.
    for (hq, hkv, d), dtype in itertools.product(HEAD_SHAPES, ("bfloat16", "float16", "float32")):
        case(f"kc = torch.zeros(8, 16, {hkv}, {d}, dtype=torch.{dtype}); vc = torch.zeros_like(kc)\n"
                     f"_write_kv_triton(torch.randn(5, {hkv}, {d}).to(torch.{dtype}), "
                     f"torch.randn(5, {hkv}, {d}).to(torch.{dtype}), kc, vc, torch.arange(5))\n"
                     f"_paged_attention_triton(torch.randn(3, {hq}, {d}).to(torch.{dtype}), kc, vc, "
                     f"torch.arange(6, dtype=torch.int32).view(3, 2), torch.tensor([20, 9, 32], dtype=torch.int32), "
                     f"{d ** -0.5})")
        expect[-1].append(("_write_kv_kernel", {"heads": (hq, hkv, d), "dtype": dtype}))
        expect[-1].append(("_paged_attention_kernel", {"heads": (hq, hkv, d), "dtype": dtype,
                                                        "num_warps": decode_warps(triton.next_power_of_2(hq // hkv))}))
    return lines, expect


def _gpu_row_config(row_config, vocab: int) -> tuple[int, int]:
    from rlvr_fast.kernels._common import cuda_launch_configs
    with cuda_launch_configs():
        return row_config(vocab)


def _fused_call(dtype: str, vocab: int, flags: dict[str, bool], kw: list[str]) -> str:
    return (f"old, ref, roll, adv, mask = grpo_inputs(2, 3)\n"
            f"h = torch.randn(2, 3, 64).to(torch.{dtype}).requires_grad_()\n"
            f"w = torch.randn({vocab}, 64).to(torch.{dtype}).requires_grad_()\n"
            f"out = fused_linear_grpo_loss(h, w, torch.zeros(2, 3, dtype=torch.long), "
            f"{'old' if flags['old'] else 'None'}, {'ref' if flags['ref'] else 'None'}, adv, mask, "
            f"{', '.join(kw + [TRITON])})\n"
            f"out[0].backward()")


def supported_targets() -> list[int]:
    import triton
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists():
        return []
    return [t for t in TARGETS if t < 100 or (bin_dir / "ptxas-blackwell").exists()]


def test_every_kernel_compiles_for_gpu_targets_without_spills():
    from tests.gpu_compile import SHARED_LIMIT, compile_in_subprocess

    targets = supported_targets()
    if not targets:
        pytest.skip("this triton build ships no NVIDIA backend (ptxas)")
    code, expect = compile_code()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # one child process per target, two at a time
        results = dict(zip(targets, pool.map(lambda arch: compile_in_subprocess(code, arch, timeout=600), targets)))
    for arch, records in results.items():
        for case, wanted in enumerate(expect):
            got = [r for r in records if r["case"] == case]
            for name, want in wanted:  # each expected kernel, in launch order, among what the case compiled
                match = next((r for r in got if r["name"] == name and not r.get("checked")), None)
                assert match is not None, f"sm_{arch}: case {case} did not compile {name} {want}"
                match["checked"] = True
                check_config(arch, match, name, want)
        for r in records:  # every compiled kernel, also those a case launched on the way (e.g. GSPO's loss)
            where = f"sm_{arch} {r['name']} ({r['constants']}, {r['num_warps']} warps)"
            assert r["local"] == 0 and r["stack"] == 0, f"{where}: spills ({r['local']} local + {r['stack']} stack B)"
            assert r["shared"] + r["shared_static"] <= SHARED_LIMIT[arch], f"{where}: shared memory {r['shared']}"


def check_config(arch: int, r: dict, name: str, want: dict) -> None:
    where = f"sm_{arch} {name} {want} ({r['constants']}, {r['num_warps']} warps)"
    for key in ("BLOCK_V", "BLOCK_T"):
        if key in want:
            assert r["constants"][key] == want[key], f"{where}: {key} is not the launcher's CUDA config"
    if "num_warps" in want:
        assert r["num_warps"] == want["num_warps"], where
    for flag in ("ENTROPY", "GREEDY"):
        if flag in want:
            assert r["constants"][flag] == want[flag], where
