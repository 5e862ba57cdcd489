"""Checkpoints on disk: HF-layout safetensors directories in and out, durable writes and manifests
(durable.py), the embedded default model."""

from rlvr_fast.checkpoint.load import CheckpointError, load_model
from rlvr_fast.checkpoint.save import save_pretrained

__all__ = ["CheckpointError", "load_model", "save_pretrained"]
