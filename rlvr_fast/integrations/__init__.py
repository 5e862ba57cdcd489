"""Adapters that put rlvr_fast's fused kernels inside other trainers.

Each submodule imports its trainer library (an optional extra); nothing here is imported by
`rlvr_fast` itself. `rlvr_fast.integrations.trl`: TRL's GRPOTrainer with `fused_linear_grpo_loss`.
"""
