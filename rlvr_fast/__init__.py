"""rlvr_fast: a small, fast GRPO (reinforcement learning from verifiable rewards) trainer for Llama models.

    model, tokenizer = rlvr_fast.load_pretrained()          # the embedded SmolLM2-135M-Instruct
    model, tokenizer = rlvr_fast.load_pretrained("path/to/hf-llama", device="cuda", dtype=torch.bfloat16)
    rlvr_fast.save_pretrained(model, tokenizer, "out/")    # transformers loads it unchanged
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlvr_fast.checkpoint import CheckpointError, load_model, save_pretrained
from rlvr_fast.model import LlamaConfig, LlamaForCausalLM
from rlvr_fast.rollout import RolloutEngine, SamplingParams
from rlvr_fast.tokenizer import Tokenizer, TokenizerError

__version__ = "0.1.0"


def load_pretrained(path: str | Path | None = None, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, Tokenizer]:
    """Load (model, tokenizer) from an HF-layout Llama directory; path=None means the embedded default model."""
    if path is None:
        from rlvr_fast.checkpoint.default_model import default_model_dir
        path = default_model_dir()
    path = Path(path).expanduser()
    model = load_model(path, device=device, dtype=dtype)
    return model, Tokenizer.from_dir(path)


__all__ = ["CheckpointError", "LlamaConfig", "LlamaForCausalLM", "RolloutEngine", "SamplingParams", "Tokenizer",
           "TokenizerError", "load_pretrained", "save_pretrained"]
