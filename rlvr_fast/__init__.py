"""rlvr_fast: a small, fast GRPO (reinforcement learning from verifiable rewards) trainer for Llama models.

    model, tokenizer = rlvr_fast.load_pretrained()          # the embedded SmolLM2-135M-Instruct
    model, tokenizer = rlvr_fast.load_pretrained("path/to/hf-llama", device="cuda", dtype=torch.bfloat16)
    rlvr_fast.save_pretrained(model, tokenizer, "out/")    # transformers loads it unchanged

The names below are imported on first use (PEP 562), not here: `import rlvr_fast.kernels` from
another trainer must cost torch alone, not our model, tokenizer, safetensors, jinja2 and numpy.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "CheckpointError": "rlvr_fast.checkpoint",
    "load_model": "rlvr_fast.checkpoint",
    "save_pretrained": "rlvr_fast.checkpoint",
    "LlamaConfig": "rlvr_fast.model",
    "LlamaForCausalLM": "rlvr_fast.model",
    "RolloutEngine": "rlvr_fast.rollout",
    "SamplingParams": "rlvr_fast.rollout",
    "Tokenizer": "rlvr_fast.tokenizer",
    "TokenizerError": "rlvr_fast.tokenizer",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from rlvr_fast.checkpoint import CheckpointError, load_model, save_pretrained
    from rlvr_fast.model import LlamaConfig, LlamaForCausalLM
    from rlvr_fast.rollout import RolloutEngine, SamplingParams
    from rlvr_fast.tokenizer import Tokenizer, TokenizerError


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'rlvr_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def load_pretrained(path: str | Path | None = None, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, Tokenizer]:
    """Load (model, tokenizer) from an HF-layout Llama, Mistral, Qwen2 or Qwen3 directory; path=None means the
    embedded default model."""
    from rlvr_fast.checkpoint import load_model
    from rlvr_fast.tokenizer import Tokenizer
    if path is None:
        from rlvr_fast.checkpoint.default_model import default_model_dir
        path = default_model_dir()
    path = Path(path).expanduser()
    model = load_model(path, device=device, dtype=dtype)
    return model, Tokenizer.from_dir(path)


__all__ = sorted([*_LAZY, "load_pretrained"])
