"""LlamaConfig: the few numbers that define a Llama-family model, read from an HF config.json.

One model runs four Hugging Face architectures; what sets them apart are a few switches:

| model_type | architecture        | q/k/v bias        | o bias         | q/k RMSNorm | sliding window             |
| ---------- | ------------------- | ----------------- | -------------- | ----------- | -------------------------- |
| llama      | LlamaForCausalLM    | attention_bias    | attention_bias | no          | no                         |
| mistral    | MistralForCausalLM  | no                | no             | no          | sliding_window             |
| qwen2      | Qwen2ForCausalLM    | yes               | no             | no          | if use_sliding_window      |
| qwen3      | Qwen3ForCausalLM    | attention_bias    | attention_bias | yes         | if use_sliding_window      |

The model_type is kept, and saving writes that family's own fields back, so transformers loads what
we save as the architecture it came from. Sliding-window attention is not implemented: a checkpoint
that enables it loads, and any sequence longer than the window is refused (`check_length`); up to
the window's length the window changes nothing.

Hugging Face has written the rotary settings two ways over time: `rope_theta` + `rope_scaling`
(transformers 4.x, and most checkpoints on disk) and a single `rope_parameters` dict
(transformers 5.x). Both are read; both are written back, so either version loads what we save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

# model_type -> the one architecture of that family this project runs.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES.values())
_QWEN = ("qwen2", "qwen3")
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
    model_type: str = "llama"
    """Which Hugging Face family (a key of FAMILIES); decides which fields config.json gets on save."""
    qkv_bias: bool = False
    """q_proj, k_proj and v_proj have biases (Qwen2 always; Llama and Qwen3 when attention_bias)."""
    o_bias: bool = False
    """o_proj has a bias (Llama and Qwen3 when attention_bias; never Qwen2)."""
    qk_norm: bool = False
    """An RMSNorm over head_dim on every head's queries and keys, before RoPE (Qwen3's q_norm, k_norm)."""
    mlp_bias: bool = False
    sliding_window: int | None = None
    """The attention window the checkpoint enables (None: off). Not implemented: see check_length."""
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
        if self.model_type not in FAMILIES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
        # What each family's config.json can say: a switch it cannot express would be lost on save.
        fixed = {"llama": dict(qk_norm=False, o_bias=self.qkv_bias, sliding_window=None),
                 "mistral": dict(qkv_bias=False, o_bias=False, qk_norm=False, mlp_bias=False),
                 "qwen2": dict(qkv_bias=True, o_bias=False, qk_norm=False, mlp_bias=False),
                 "qwen3": dict(qk_norm=True, o_bias=self.qkv_bias, mlp_bias=False)}[self.model_type]
        wrong = {k: getattr(self, k) for k, v in fixed.items() if getattr(self, k) != v}
        if wrong:
            raise ConfigError(f"a {self.model_type} model cannot have {wrong} ({FAMILIES[self.model_type]} "
                              f"fixes {fixed})")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError(f"config.json: sliding_window must be a positive integer or null, "
                              f"got {self.sliding_window!r}")
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
    def attention_window(self) -> int | None:
        """The sliding window that some layer actually uses; None when every layer sees the whole sequence.
        Qwen slides only the layers that layer_types marks "sliding_attention" (or, without layer_types,
        those from max_window_layers on); Mistral slides every layer."""
        if self.sliding_window is None:
            return None
        if self.model_type in _QWEN:
            layer_types = self.extra.get("layer_types")
            if layer_types is not None:
                return self.sliding_window if "sliding_attention" in layer_types else None
            first = self.extra.get("max_window_layers", 28)  # transformers' default
            return self.sliding_window if first < self.num_hidden_layers else None
        return self.sliding_window

    def check_length(self, length: int, what: str | None = None) -> None:
        """Refuse a sequence of `length` tokens (prompt + completion) that sliding-window attention would
        treat differently from full attention. Up to the window's length the two are the same, so a
        checkpoint with a window runs exactly, as long as no sequence outgrows it. `what` names the
        sequence in the message (default: "a sequence of {length} tokens")."""
        window = self.attention_window
        if window is not None and length > window:
            what = what or f"a sequence of {length} tokens"
            raise ConfigError(
                f"{what} is longer than this {self.model_type} checkpoint's sliding attention "
                f"window of {window} tokens (config.json sliding_window); rlvr_fast does not implement sliding-window "
                f"attention, which changes nothing up to {window} tokens: keep prompt + completion within {window} "
                "tokens (lower --max-new-tokens or use shorter prompts)")

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LlamaConfig":
        """Build from a parsed config.json, checking that it describes a supported family (FAMILIES)."""
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if model_type not in FAMILIES or any(a != FAMILIES[model_type] for a in archs):
            supported = ", ".join(f"{arch} (model_type {name!r})" for name, arch in FAMILIES.items())
            raise ConfigError(f"config.json describes model_type={model_type!r}, architectures={archs!r}; "
                              f"rlvr_fast runs these Llama-family causal LMs only: {supported}")
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
        kwargs.update(_read_switches(model_type, raw))
        for name in ("max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
            if name in raw and raw[name] is not None:
                kwargs[name] = raw.pop(name)
            else:
                raw.pop(name, None)
        for name in ("architectures", "torch_dtype", "dtype", "transformers_version"):
            raw.pop(name, None)
        return cls(model_type=raw.pop("model_type"), rope_theta=float(rope_theta), rope_scaling=rope_scaling,
                   extra=raw, **kwargs)

    def to_dict(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """An HF config.json dict that transformers 4.x and 5.x both load."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            architectures=[FAMILIES[self.model_type]],
            model_type=self.model_type,
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
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )
        out.update(self._switch_fields())
        if dtype is not None:
            out["torch_dtype"] = str(dtype).removeprefix("torch.")
        return out

    def _switch_fields(self) -> dict[str, Any]:
        """The switches as this family's config.json spells them (the inverse of _read_switches)."""
        if self.model_type == "llama":
            return dict(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "mistral":
            return dict(sliding_window=self.sliding_window)
        out = dict(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window)
        if self.model_type == "qwen3":
            out["attention_bias"] = self.qkv_bias
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


def _read_switches(model_type: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Pop the fields of config.json that set the model's switches (see the module doc's table)."""
    if model_type == "llama":
        bias = bool(raw.pop("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(raw.pop("mlp_bias", False)))
    if model_type == "mistral":
        return dict(sliding_window=raw.pop("sliding_window", None))
    # Qwen: transformers sets sliding_window to None unless use_sliding_window, and so do we.
    window = raw.pop("sliding_window", None)
    window = window if raw.pop("use_sliding_window", False) else None
    if model_type == "qwen2":
        return dict(qkv_bias=True, o_bias=False, sliding_window=window)
    bias = bool(raw.pop("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=window)


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
