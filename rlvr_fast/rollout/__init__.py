"""Rollout engine: paged-KV, continuous-batching generation for GRPO groups (see engine.py)."""

from rlvr_fast.rollout.engine import Completion, EngineStats, RolloutEngine
from rlvr_fast.rollout.sampling_params import SamplingParams

__all__ = ["Completion", "EngineStats", "RolloutEngine", "SamplingParams"]
