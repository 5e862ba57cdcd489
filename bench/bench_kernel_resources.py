"""What each Triton kernel costs a GPU, read from the compiled code on a machine without one.

    python bench/bench_kernel_resources.py            # sm_80, sm_90, sm_100 (where Triton can build it)
    python bench/bench_kernel_resources.py --no-write # print only

Compiles the same launches as tests/test_gpu_compile.py and tests/test_flash_attention.py (the
launchers' own CUDA configurations, see tests/gpu_compile.py) and tabulates, per kernel, launch
configuration and target: registers per thread, spills (cuobjdump LOCAL + STACK bytes per thread),
shared memory per block, and the occupancy those allow (resident warps per SM out of 64, limited by
registers, shared memory or the 2048-thread cap). Identical rows (same kernel, constants, warps and
resources) are shown once.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from benchlib import add_no_write, markdown_table, publish  # noqa: E402

# Per-SM limits (CUDA programming guide, compute capabilities 8.0 / 9.0 / 10.0).
SM = {80: {"regs": 65536, "shared": 167936, "warps": 64}, 90: {"regs": 65536, "shared": 233472, "warps": 64},
      100: {"regs": 65536, "shared": 233472, "warps": 64}}


def occupancy(arch: int, regs: int, shared: int, warps: int) -> tuple[int, str]:
    """(resident warps per SM, what limits it). Registers are allocated per warp in units of 256."""
    sm = SM[arch]
    per_warp = math.ceil(regs * 32 / 256) * 256
    limits = {"registers": sm["regs"] // (per_warp * warps) if regs else 99,
              "shared memory": sm["shared"] // shared if shared else 99,
              "threads": sm["warps"] // warps}
    why = min(limits, key=limits.get)
    return min(limits[why], 32) * warps, why


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_no_write(ap)
    args = ap.parse_args()
    from tests import test_flash_attention, test_gpu_compile
    from tests.gpu_compile import compile_in_subprocess

    code, expect = test_gpu_compile.compile_code()
    flash_cases = test_flash_attention.TARGET_CASES
    flash = test_flash_attention.compile_code(flash_cases)
    rows, seen = [], set()
    for arch in test_gpu_compile.supported_targets():
        ours = compile_in_subprocess(code, arch, timeout=900)
        for r in ours:  # what the case was about: dtype, vocabulary or head shape
            want = expect[r["case"]][0][1] if expect[r["case"]] else {}
            r["shape"] = " ".join(str(want[k]) for k in ("dtype", "V", "heads") if k in want)
        # FlashAttention in a child of its own: the prelude above patches what the interpreter check returns.
        attention = compile_in_subprocess(flash, arch, timeout=900)
        for i, r in enumerate(attention):
            dtype, head_dim = flash_cases[i // 3]
            r["shape"] = f"{dtype} head_dim {head_dim}"
        for r in ours + attention:
            constants = ", ".join(f"{k}={v}" for k, v in sorted(r["constants"].items()))
            key = (arch, r["name"], r["shape"], constants, r["num_warps"], r["regs"], r["shared"])
            if key in seen:
                continue
            seen.add(key)
            warps, why = occupancy(arch, r["regs"], r["shared"] + r["shared_static"], r["num_warps"])
            rows.append([r["name"], r["shape"], constants, str(r["num_warps"]), str(r["num_stages"]), f"sm_{arch}",
                         str(r["regs"]), str(r["local"] + r["stack"]),
                         f"{(r['shared'] + r['shared_static']) / 1024:.1f}", f"{warps}/64 ({why})"])
    body = markdown_table(["kernel", "dtype / shape", "constants", "warps", "stages", "target", "registers", "spill B",
                           "shared KiB", "occupancy"], rows)
    publish("Triton kernels: registers, spills, shared memory and occupancy per GPU target", body, "cpu",
            not args.no_write, method="compiled for each target on a CPU-only machine (tests/gpu_compile.py: Triton's "
                                      "own ptxas, resources from cuobjdump --dump-resource-usage); no GPU ran anything")


if __name__ == "__main__":
    main()
