"""SamplingParams: how completions are drawn, checked when built."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class SamplingParams:
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 switches the filter off."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches top_p; 1 = off."""
    max_new_tokens: int = 256
    """At most this many completion tokens (fewer if the model's context ends first: finish_reason "length")."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra ids that end a completion (finish_reason "stop"); the tokenizer's EOS ids end one too unless ignore_eos."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion (finish_reason "stop"); the text is cut before the stop string."""
    ignore_eos: bool = False
    """Generate past EOS (benchmarks: every completion max_new_tokens long); stop / stop_token_ids still apply."""
    seed: int | None = None
    """Same seed and inputs -> same completions on the same device type; None draws a seed from torch's RNG."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"SamplingParams: temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams: top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams: top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams: max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams: stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
