"""LlamaConfig: the few numbers that define a Llama-family model, read from an HF config.json.

Hugging Face has written the rotary settings two ways over time: `rope_theta` + `rope_scaling`
(transformers 4.x, and most checkpoints on disk) and a single `rope_parameters` dict
(transformers 5.x). Both are read; both are written back, so either version loads what we save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config.json that this project cannot run, with the reason and what to do."""


@dataclass(kw_only=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    """Per-head width. Usually hidden_size // num_attention_heads, but some checkpoints set it."""
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """None for plain RoPE, else {"rope_type": "linear" | "llama3", "factor": ..., ...}."""
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields of config.json this project does not use, kept so that saving loses nothing."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even for rotary embeddings, got {self.head_dim}")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"config.json: rope scaling type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LlamaConfig":
        """Build from a parsed config.json, checking that it describes a Llama causal LM."""
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if model_type != "llama" or (archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs)):
            raise ConfigError(
                f"config.json describes model_type={model_type!r}, architectures={archs!r}; "
                f"rlvr_fast runs Llama-family causal LMs only (model_type 'llama', "
                f"architectures {list(SUPPORTED_ARCHITECTURES)})")
        raw = dict(raw)
        # transformers 5 folds theta and scaling into rope_parameters.
        rope_params = dict(raw.pop("rope_parameters", None) or {})
        rope_scaling = dict(raw.pop("rope_scaling", None) or {}) or None
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        rope_theta = raw.pop("rope_theta", None) or rope_params.get("rope_theta") or 10000.0
        if rope_scaling is not None:
            rope_scaling = {k: v for k, v in rope_scaling.items() if k != "rope_theta"}
        try:
            heads = raw.pop("num_attention_heads")
            hidden = raw.pop("hidden_size")
            kwargs = dict(
                vocab_size=raw.pop("vocab_size"),
                hidden_size=hidden,
                intermediate_size=raw.pop("intermediate_size"),
                num_hidden_layers=raw.pop("num_hidden_layers"),
                num_attention_heads=heads,
            )
        except KeyError as exc:
            raise ConfigError(f"config.json is missing the required field {exc.args[0]!r}") from None
        kwargs["num_key_value_heads"] = raw.pop("num_key_value_heads", None) or heads
        head_dim = raw.pop("head_dim", None)
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"config.json: hidden_size {hidden} is not divisible by "
                                  f"num_attention_heads {heads} and no head_dim is given")
            head_dim = hidden // heads
        kwargs["head_dim"] = head_dim
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act {raw['hidden_act']!r} is not supported (Llama uses 'silu')")
        for name in ("max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                     "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id"):
            if name in raw and raw[name] is not None:
                kwargs[name] = raw.pop(name)
            else:
                raw.pop(name, None)
        for name in ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version"):
            raw.pop(name, None)
        return cls(rope_theta=float(rope_theta), rope_scaling=rope_scaling, extra=raw, **kwargs)

    def to_dict(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """An HF config.json dict that transformers 4.x and 5.x both load."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        if dtype is not None:
            out["torch_dtype"] = str(dtype).removeprefix("torch.")
        return out

    def rope_inv_freq(self) -> torch.Tensor:
        """Rotary inverse frequencies [head_dim // 2] in float32, with the configured scaling."""
        dim = self.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        inv_freq = 1.0 / (self.rope_theta ** exponents)
        scaling = self.rope_scaling or {}
        if self.rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif self.rope_type == "llama3":
            inv_freq = _llama3_scaled(inv_freq, scaling)
        return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 long-context scaling: slow down low frequencies, keep high ones, blend between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)
