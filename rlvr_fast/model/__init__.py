"""The Llama-family model (Llama, Mistral, Qwen2, Qwen3 as config switches): config, layers, attention backends."""

from rlvr_fast.model.config import ConfigError, LlamaConfig
from rlvr_fast.model.llama import LlamaForCausalLM

__all__ = ["ConfigError", "LlamaConfig", "LlamaForCausalLM"]
