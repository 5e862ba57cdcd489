"""Triton kernels: fused per-token log-probs and the GRPO loss (importable as rlvr_fast.kernels)."""
