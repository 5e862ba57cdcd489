"""Shared plumbing for the kernels: the guarded Triton import, backend choice, logging, checks.

Nothing here does math. Every public function takes ``backend="auto" | "triton" | "torch"``, and
the rollout ops (write_kv, paged_attention, sample) also ``"native"``:

* ``"auto"``: the compiled Triton kernels for CUDA tensors (when Triton is installed); on CPU the
  native C++ op when the op has one and the extension is built (kernels/native.py), else the
  PyTorch path. The Triton interpreter is for tests, never picked automatically.
* ``"triton"``: the Triton kernels; on CPU tensors only under ``TRITON_INTERPRET=1`` (tests).
* ``"native"``: ``torch.ops.rlvr_fast.<op>``, the C++ kernel, for CPU tensors only. Raises with
  build instructions when the extension is not built.
* ``"torch"``: the PyTorch path on any device.

``cpu_backend("torch")`` (a context manager) makes "auto" pick the PyTorch path on CPU for its
duration, ``cpu_backend("native")`` the native ops: one process can time both (bench_rollout.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from collections.abc import Iterator

import torch

from .native import HAS_NATIVE, WHY_NOT

try:  # Triton is optional: without it the package imports and runs its PyTorch paths.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by a subprocess test
    HAS_TRITON = False

    def _jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    # Just enough for the `@triton.jit` definitions (and their `tl.constexpr` annotations) to
    # be evaluated at import time; they are never called without Triton.
    triton = types.SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=object)

log = logging.getLogger("rlvr_fast.kernels")
_LOGGED: set[tuple[str, str]] = set()
BACKENDS = ("auto", "triton", "native", "torch")
CPU_BACKENDS = ("native", "torch")
_cpu_default: str | None = None  # what "auto" means on CPU for ops with a native kernel; None: native if built


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (set before triton was imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- launch configurations
# One named function per kind of kernel. The GPU compile test (tests/test_gpu_compile.py) reaches them
# through the launchers, so what it compiles is what a GPU runs.

_gpu_configs_in_interpreter = False


def gpu_configs() -> bool:
    """Launchers pick their GPU configurations: always on a GPU, and under the interpreter inside
    `cuda_launch_configs()`. Otherwise the interpreter gets small blocks: it runs each block as numpy
    ops, and small blocks keep odd sizes exercising the masked tails."""
    return not interpreting() or _gpu_configs_in_interpreter


@contextlib.contextmanager
def cuda_launch_configs() -> Iterator[None]:
    """Within the block the interpreter runs the kernels at their GPU block sizes (tests: the wide
    blocks, loops and masked tails a GPU executes)."""
    global _gpu_configs_in_interpreter
    saved, _gpu_configs_in_interpreter = _gpu_configs_in_interpreter, True
    try:
        yield
    finally:
        _gpu_configs_in_interpreter = saved


def row_config(V: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the kernels that stream one row of V logits per program (log-probs, the
    fused GRPO loss, sampling): 4096-wide blocks with 8 warps on a GPU."""
    if not gpu_configs():
        return min(128, triton.next_power_of_2(V)), 1
    block = min(4096, triton.next_power_of_2(V))
    return block, 8 if block >= 2048 else 4


def token_config(T: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps) of the GRPO loss kernel: one program per BLOCK_T tokens of a completion."""
    return min(1024 if gpu_configs() else 64, triton.next_power_of_2(max(T, 1))), 4


@contextlib.contextmanager
def cpu_backend(name: str | None) -> Iterator[None]:
    """Within the block, backend="auto" on CPU tensors picks `name` ("native" or "torch") for the ops
    that have a native kernel (None: the default, native when built). Not thread-safe: it sets a
    module-level default, for benchmarks and tests that compare both in one process."""
    global _cpu_default
    if name is not None and name not in CPU_BACKENDS:
        raise ValueError(f"cpu_backend: name must be one of {CPU_BACKENDS} or None, got {name!r}")
    if name == "native" and not HAS_NATIVE:
        raise RuntimeError(f"cpu_backend('native'): the native CPU ops are {WHY_NOT}")
    saved, _cpu_default = _cpu_default, name
    try:
        yield
    finally:
        _cpu_default = saved


def pick_backend(op: str, backend: str, device: torch.device, has_native: bool = False,
                 has_triton: bool = True) -> str:
    """Resolve `backend` for tensors on `device` and log once per (op, backend) which one runs.

    has_native: the op is one of torch.ops.rlvr_fast.* (csrc/), so "native" is valid for it.
    has_triton: the op has a Triton kernel (False: "auto" on CUDA means the PyTorch path).
    """
    allowed = tuple(b for b in BACKENDS if (b != "native" or has_native) and (b != "triton" or has_triton))
    if backend not in allowed:
        raise ValueError(f"{op}: backend must be one of {allowed}, got {backend!r}")
    if backend == "auto":
        if has_triton and HAS_TRITON and device.type == "cuda":
            backend = "triton"
        elif has_native and device.type == "cpu":
            backend = _cpu_default or ("native" if HAS_NATIVE else "torch")
        else:
            backend = "torch"
    elif backend == "native":
        if not HAS_NATIVE:
            raise RuntimeError(f"{op}: backend='native' but the native CPU ops are {WHY_NOT}; "
                               "or use backend='auto' / 'torch'")
        if device.type != "cpu":
            raise RuntimeError(f"{op}: backend='native' has a kernel for CPU tensors only; got {device} tensors "
                               "(use backend='auto')")
    elif backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{op}: backend='triton' but triton is not installed; use backend='torch' "
                               "or 'auto' (pip install triton on a CUDA machine)")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"{op}: backend='triton' needs CUDA tensors (got {device}); on CPU use "
                               "backend='torch', or set TRITON_INTERPRET=1 before importing triton (tests only)")
    if (op, backend) not in _LOGGED:
        _LOGGED.add((op, backend))
        log.info("%s: using the %s backend (%s tensors)", op, backend, device.type)
    return backend


def log_path(op: str, path: str, why: str) -> None:
    """Log once per (op, path) which code path of an op runs and why, like the backend choice
    (for options that take a different, possibly slower, path than the default)."""
    if (op, path) not in _LOGGED:
        _LOGGED.add((op, path))
        log.info("%s: %s path (%s)", op, path, why)


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(op: str, name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_index(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: {name} must be an int64 (or int32) tensor of token ids, got {t.dtype}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {str(v.device) for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")
    return next(iter(present.values())).device


def check_shape(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...], hint: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}{hint}")


def check_temperature(op: str, temperature: float) -> float:
    if isinstance(temperature, torch.Tensor) or not float(temperature) > 0:
        raise ValueError(f"{op}: temperature must be a positive Python float, got {temperature!r}")
    return float(temperature)


def as_rows(op: str, name: str, x: torch.Tensor) -> torch.Tensor:
    """View x [..., V] as [A, B, V] (rows = A * B) without copying; raise if that needs a copy.

    Two row levels cover a contiguous tensor (A = 1) and the common slice ``logits[:, :-1]`` of
    a [batch, time, V] tensor. A silent .contiguous() would allocate a second [.., V] tensor,
    the very thing these kernels exist to avoid, so anything else is the caller's decision.
    """
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: {name} must have a non-empty last (vocabulary) dimension, got {list(x.shape)}")
    if x.stride(-1) != 1 and x.numel() > x.shape[-1]:
        raise ValueError(f"{op}: {name} must have a contiguous last dimension (stride 1), got strides "
                         f"{tuple(x.stride())}; pass {name}.contiguous()")
    v = x.shape[-1]
    try:
        return x.view(1, -1, v)
    except RuntimeError:
        pass
    try:
        return x.view(-1, x.shape[-2], v)
    except RuntimeError:
        raise ValueError(f"{op}: {name} with shape {list(x.shape)} and strides {tuple(x.stride())} cannot be "
                         f"viewed as [A, B, V] rows without a copy; pass {name}.contiguous()") from None
