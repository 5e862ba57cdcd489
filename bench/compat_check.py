"""Which torch / triton pair the kernels and the model were tested with: runs their test modules under
this interpreter and records the versions and pytest's summary in bench/RESULTS.md.

    python bench/compat_check.py                # from a virtual environment holding the pair to check

setup.py's lower bounds for torch and triton are the oldest pair this has passed with. (A CUDA build of
torch runs these tests on the CPU too: without a GPU, the Triton kernels run in the interpreter, and the
GPU-compile tests build them for sm_80/sm_90/sm_100.)
"""

from __future__ import annotations

import platform
import sys
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import append_results, markdown_table, run_pytest  # noqa: E402

TESTS = ["tests/test_kernels_token_logprobs.py", "tests/test_kernels_linear.py", "tests/test_kernels_grpo_loss.py",
         "tests/test_kernels_loss_variants.py", "tests/test_kernels_cuda_configs.py", "tests/test_kernels_api.py",
         "tests/test_rollout_kernels.py", "tests/test_flash_attention.py", "tests/test_gpu_compile.py",
         "tests/test_native_ops.py", "tests/test_model.py", "tests/test_shared_prompt_attention.py"]


def compat_title(torch_version: str, triton_version: str) -> str:
    """One section per torch / triton minor pair (RESULTS.md keeps the latest run of each title)."""
    def minor(v: str) -> str:
        return ".".join(v.split("+")[0].split(".")[:2])
    return f"Compatibility: kernel and model tests with torch {minor(torch_version)} + triton {minor(triton_version)}"


def main() -> int:
    rc, failed, summary = run_pytest(TESTS)
    rows = [[f"python {platform.python_version()}", f"torch {version('torch')}", f"triton {version('triton')}",
             f"numpy {version('numpy')}", summary.strip("= ")]]
    body = markdown_table(["python", "torch", "triton", "numpy", "kernel and model tests"], rows)
    body += "\n\nTest modules: " + ", ".join(f"`{t}`" for t in TESTS) + "."
    if failed:
        body += "\n\n```\n" + "\n".join(failed[:20]) + "\n```"
    print(body)
    append_results(compat_title(version("torch"), version("triton")), body, "cpu",
                   method="pytest on this interpreter's packages; CPU only (Triton interpreter, GPU compile "
                          "without a GPU)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
