"""The optional C++ extension `rlvr_fast._C` (csrc/): its rollout ops as `torch.ops.rlvr_fast.*`.

Importing `rlvr_fast._C` registers the ops, their schemas and CPU kernels:

    torch.ops.rlvr_fast.write_kv(k, v, k_cache, v_cache, slot_mapping) -> None    (caches mutated)
    torch.ops.rlvr_fast.paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale) -> out
    torch.ops.rlvr_fast.sample(logits, keys, temperature, top_k=0, top_p=1.0) -> (tokens, logprobs)
    torch.ops.rlvr_fast.rms_norm(x, weight, eps) -> out
    torch.ops.rlvr_fast.rotary_embedding(q, k, cos, sin) -> (q_out, k_out)

The ops have CPU kernels only: on CUDA tensors the public functions of paged_kv.py,
paged_attention.py and sampling.py (write_kv, paged_attention, sample: the entry points the model
code calls) launch their Triton kernels directly. The last two ops fuse a decoder layer's small ops
for the CPU decode path (a few microseconds of dispatch each is what they cost there); their entry
points, `rms_norm` and `rotary_embedding`, are at the bottom of this file, their references in
paged_reference.py. Nothing traces the ops (no torch.compile of the rollout), so they have no fake
kernels; add them with torch.library.register_fake before compiling code that calls them.

HAS_NATIVE is False when the extension was not built (no compiler at install time,
RLVR_FAST_NO_EXT=1) or when RLVR_FAST_NO_NATIVE=1 is set (for A/B runs and tests); one log line
then says that the PyTorch reference ops run. Build it with a C++ compiler and
`pip install --no-build-isolation -e .`.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

log = logging.getLogger("rlvr_fast.kernels")

BUILD_HINT = "build them with: pip install --no-build-isolation -e . (needs a C++ compiler, g++ or clang++)"

HAS_NATIVE = False
WHY_NOT = ""
if os.environ.get("RLVR_FAST_NO_NATIVE", "0") == "1":
    WHY_NOT = "disabled by RLVR_FAST_NO_NATIVE=1"
else:
    try:
        importlib.import_module("rlvr_fast._C")  # loading the .so registers torch.ops.rlvr_fast.*
        HAS_NATIVE = True
    except (ImportError, OSError) as exc:  # not built, or built against another torch
        WHY_NOT = f"not built ({exc}; {BUILD_HINT})"

if not HAS_NATIVE:
    log.log(logging.INFO if WHY_NOT.startswith("disabled") else logging.WARNING,
            "rlvr_fast: native CPU ops %s; using the PyTorch reference ops", WHY_NOT)


# ------------------------------------------------------------------ decoder-layer ops (CPU only)

from . import _common  # noqa: E402  (a module reference: _common imports this module)
from .paged_reference import rms_norm_ref, rotary_embedding_ref  # noqa: E402


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x [..., H] exactly as rlvr_fast.model.llama.RMSNorm computes it, in one op on CPU.

    backend: "auto" (native on CPU when built, else PyTorch), "native", "torch". The native op has
    no backward: when autograd needs one (grad mode and an input requiring grad), "auto" runs the
    PyTorch path.
    """
    picked = _common.pick_backend("rms_norm", backend, x.device, has_native=True, has_triton=False)
    if picked == "native" and not (backend == "auto" and _needs_grad(x, weight)):
        return torch.ops.rlvr_fast.rms_norm(x, weight, float(eps))
    return rms_norm_ref(x, weight, eps)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [N, Hq, D] and k [N, Hkv, D] with cos, sin [N, D], bit-identical to
    rlvr_fast.model.llama.apply_rotary on each; one op on CPU for both. New tensors; q, k may be
    strided views (e.g. of a fused qkv projection) with unit stride along D.

    backend: "auto" (native on CPU when built, else PyTorch), "native", "torch". The native op has
    no backward: when autograd needs one, "auto" runs the PyTorch path.
    """
    picked = _common.pick_backend("rotary_embedding", backend, q.device, has_native=True, has_triton=False)
    if picked == "native" and not (backend == "auto" and _needs_grad(q, k, cos, sin)):
        return torch.ops.rlvr_fast.rotary_embedding(q, k, cos, sin)
    return rotary_embedding_ref(q, k, cos, sin)
