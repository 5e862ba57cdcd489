"""Compile Triton kernels for a GPU on a machine without one, and read their resource usage.

Interpreter tests check the math; they cannot see register spills, shared-memory overflow or a
kernel that does not compile for a real target. This helper runs the project's own launchers with
CPU tensors under a stand-in driver that reports a CUDA target, and with every launch turned
into a compile-only warm-up, so exactly the kernels and launch configurations a GPU would run are
built by Triton's real backend (ptxas included; Triton ships it) and inspected with cuobjdump.

Use from a test (the child needs the real JIT, so it runs without TRITON_INTERPRET):

    kernels = compile_in_subprocess("from x import launcher; launcher(torch.randn(...), ...)", arch=90)
    # -> [{"name", "arch", "constants", "num_warps", "num_stages", "regs", "local", "shared"}, ...]

`shared` is the kernel's shared memory (Triton's metadata: dynamic shared memory) in bytes,
`local` and `stack` the local-memory bytes per thread (ptxas puts register spills in the stack
frame: both should be 0), `regs` the registers per thread.
SHARED_LIMIT gives the per-block shared-memory limit of each target.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Max dynamic shared memory per block (opt-in), bytes: A100 (sm_80) 163 KiB, H100 (sm_90) and B200 (sm_100) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448, 100: 232448}


def compile_in_subprocess(code: str | list[str], arch: int, timeout: float = 300) -> list[dict]:
    """Run `code` (Python source; it may import the project and torch) in a child process whose
    Triton compiles for sm_`arch` instead of launching; return one record per kernel launch.
    A list of sources runs one after the other in one namespace, and each record gets "case": the
    index of the source that launched it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cases = json.dumps(code if isinstance(code, list) else [code])
    proc = subprocess.run([sys.executable, "-m", "tests.gpu_compile", str(arch)], input=cases, text=True,
                          capture_output=True, cwd=ROOT, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"GPU compile for sm_{arch} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fake_driver(arch: int):
    """The driver interface Triton's JIT asks for a target and a device; nothing here touches a GPU."""
    import torch
    from triton.backends.compiler import GPUTarget

    class CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

    return CompileOnlyDriver()


def _resource_usage(cubin: bytes) -> dict:
    """cuobjdump --dump-resource-usage of one kernel's cubin -> {"regs", "local", "stack", "shared_static"}."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    field = lambda name: int(re.search(rf"\b{name}:(\d+)", out).group(1))  # noqa: E731
    return {"regs": field("REG"), "local": field("LOCAL"), "stack": field("STACK"), "shared_static": field("SHARED")}


def _main(arch: int) -> None:
    import triton  # noqa: F401  (the real JIT: TRITON_INTERPRET is unset in this process)
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(_fake_driver(arch))
    records = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        meta = kernel.metadata
        constants = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("BLOCK")}
        records.append({"name": self.__name__, "arch": arch, "constants": constants,
                        "num_warps": meta.num_warps, "num_stages": meta.num_stages, "shared": meta.shared,
                        **_resource_usage(kernel.asm["cubin"])})
        return kernel

    JITFunction.run = compile_only
    namespace = {"__name__": "__gpu_compile__"}
    for case, source in enumerate(json.loads(sys.stdin.read())):
        start = len(records)
        exec(compile(source, f"<gpu_compile case {case}>", "exec"), namespace)
        for record in records[start:]:
            record["case"] = case
    print(json.dumps(records, default=str))


if __name__ == "__main__":
    _main(int(sys.argv[1]))
