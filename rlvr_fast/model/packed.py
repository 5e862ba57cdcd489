"""Rollout-time weights for the CPU: fused, pre-packed copies of the projection matrices.

At decode batch sizes (16-64 rows) a CPU matmul is bound by reading the weight, and the BLAS
libraries first reorder a plain row-major weight into their blocked layout on every call. Packing
each weight once per rollout into that layout (oneDNN for bf16, MKL for fp32, the same packed
GEMMs torch.compile's CPU backend uses), and fusing q/k/v and gate/up into one matrix each, makes
the projections of a decode step ~1.7x faster on a 2-core Xeon (bench/bench_rollout.py).

The packed copies are built when a rollout starts and dropped when it ends
(`LlamaForCausalLM.packed_for_rollout`), so they never go stale after an optimizer step and cost
memory only while generating. MKL's packed fp32 GEMM gives bit-identical results to the plain
one; oneDNN's bf16 GEMM accumulates in fp32 like the plain bf16 path. Where these ops are missing
(non-x86 builds) the fused weight runs through a plain F.linear, and one log line says so.

LoRA adapters: with fp32 weights each adapter is merged into the packed copy when it is built
(W + s B A, exact to fp32 rounding; the copy is rebuilt for every rollout, so it never goes stale):
the decode steps then cost what the base model's do. Added per call instead, the two thin adapter
matmuls per projection took one layer's decode projections to 1.56x the base's time, merged 1.14x
(batch 16, SmolLM2-135M, r = 16, a noisy shared CPU; bench/RESULTS.md). With bf16 weights the adapters stay unmerged, their low-rank terms added to
their slices of the output per call: a merged copy would be rounded to bf16, losing the small
adapter updates (lora.py). The packed copy reflects the adapters as they are when it is built.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from rlvr_fast.model.lora import LoRALinear

log = logging.getLogger("rlvr_fast")
_BACKEND: dict[torch.dtype, str] = {}


def _probe(dtype: torch.dtype) -> str:
    """Which packed GEMM works for this dtype on this torch build (checked once, on tiny tensors)."""
    if dtype not in _BACKEND:
        w, x = torch.randn(8, 16).to(dtype), torch.randn(3, 16).to(dtype)
        backend = "plain"
        try:
            if dtype == torch.float32:
                out = torch.ops.mkl._mkl_linear(x, torch.ops.mkl._mkl_reorder_linear_weight(w, 3), w, None, 3)
                backend = "mkl"
            else:
                out = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 3),
                                                         None, "none", [], "")
                backend = "mkldnn"
            if not torch.allclose(out.float(), F.linear(x, w).float(), atol=1e-2):
                backend = "plain"
        except (RuntimeError, AttributeError):
            backend = "plain"
        _BACKEND[dtype] = backend
        log.info("rollout projections (%s, cpu): %s", dtype, {"mkl": "MKL packed GEMM", "mkldnn": "oneDNN packed GEMM",
                                                             "plain": "fused weights, plain F.linear (no packed GEMM in this torch build)"}[backend])
    return _BACKEND[dtype]


class PackedLinear:
    """y = x @ cat(weights).T + cat(biases), with the concatenated weight pre-packed for the CPU."""

    def __init__(self, linears: list[torch.nn.Linear], batch_hint: int = 16, merge_fp32_adapters: bool = True):
        active = [isinstance(m, LoRALinear) and m.enabled for m in linears]
        merge = merge_fp32_adapters and linears[0].weight.dtype == torch.float32
        with torch.no_grad():
            weights = [m.merged_weight() if on and merge else m.weight.detach() for m, on in zip(linears, active)]
            weight = torch.cat(weights) if len(weights) > 1 else weights[0]
            has_bias = linears[0].bias is not None
            self.bias = torch.cat([m.bias for m in linears]) if has_bias else None
        self.sizes = [m.out_features for m in linears]
        self.adapters = [m if on and not merge else None for m, on in zip(linears, active)]  # added per call
        self.backend = _probe(weight.dtype) if weight.device.type == "cpu" else "plain"
        self.weight = weight  # kept for plain, and MKL's op takes the original too
        if self.backend == "mkl":
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, batch_hint)
        elif self.backend == "mkldnn":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
            self.weight = None  # the packed copy is all oneDNN needs

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.backend == "mkl":
            y = torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, x.shape[0])
        elif self.backend == "mkldnn":
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        else:
            y = F.linear(x, self.weight, self.bias)
        parts = list(y.split(self.sizes, dim=-1)) if len(self.sizes) > 1 else [y]
        for i, m in enumerate(self.adapters):
            if m is not None:
                parts[i] = parts[i] + m.lora_delta(x)
        return tuple(parts) if len(parts) > 1 else parts[0]
