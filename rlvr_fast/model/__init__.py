"""The Llama model: config, layers, attention backends."""

from rlvr_fast.model.config import ConfigError, LlamaConfig
from rlvr_fast.model.llama import LlamaForCausalLM

__all__ = ["ConfigError", "LlamaConfig", "LlamaForCausalLM"]
