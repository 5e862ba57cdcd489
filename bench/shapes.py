"""Model shapes the benches build with random weights: one definition, as the LlamaConfig the model reads.

Real models' widths (their config.json values that matter for speed and memory); `shape(name, **changes)` gives
a copy with some fields changed (fewer layers, say); `random_model(cfg, ...)` builds one with random weights, and
`write_random_checkpoint(cfg, path)` saves one as an HF-layout directory that our loader and transformers read
(the benches' --random-model). From the command line:

    python bench/shapes.py qwen3-0.6b /tmp/qwen3-0.6b           # bf16 random weights, config.json, tokenizer
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.tiny (the tokenizer), run as a script

from rlvr_fast.model.config import LlamaConfig  # noqa: E402

LLAMA3_VOCAB = 128256
QWEN_VOCAB = 151936     # Qwen2-0.5B/1.5B, Qwen2.5 up to 3B, every Qwen3
QWEN25_7B_VOCAB = 152064


def _llama(h: int, i: int, layers: int, heads: int, kv: int, head_dim: int, vocab: int, tied: bool,
           rope_theta: float = 500000.0) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=rope_theta,
                       tie_word_embeddings=tied, bos_token_id=0, eos_token_id=2)


def _qwen(family: str, h: int, i: int, layers: int, heads: int, kv: int, head_dim: int, vocab: int,
          tied: bool) -> LlamaConfig:
    """Qwen2 (q/k/v biases) or Qwen3 (q/k RMSNorm), with their rope theta and norm eps. Token ids 0-2 are the
    test tokenizer's specials (<|endoftext|>, <|im_start|>, <|im_end|>), as in _llama."""
    return LlamaConfig(model_type=family, qkv_bias=family == "qwen2", qk_norm=family == "qwen3", vocab_size=vocab,
                       hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=4096, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=2)


SHAPES: dict[str, LlamaConfig] = {
    "tiny": _llama(64, 128, 2, 4, 2, 16, 320, True),
    "smollm2-135m": _llama(576, 1536, 30, 9, 3, 64, 49152, True, rope_theta=100000.0),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 64, LLAMA3_VOCAB, True),
    "llama-3.2-3b": _llama(3072, 8192, 28, 24, 8, 128, LLAMA3_VOCAB, True),
    "llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, 128, LLAMA3_VOCAB, False),
    "llama-13b-gqa": _llama(5120, 13824, 40, 40, 8, 128, LLAMA3_VOCAB, False),
    "llama-34b-gqa": _llama(8192, 22016, 48, 64, 8, 128, LLAMA3_VOCAB, False),
    "llama-3.1-70b": _llama(8192, 28672, 80, 64, 8, 128, LLAMA3_VOCAB, False),
    "qwen3-tiny": _qwen("qwen3", 64, 128, 2, 4, 2, 32, 320, True),   # smoke runs: Qwen3's code paths, tiny
    "qwen3-0.6b": _qwen("qwen3", 1024, 3072, 28, 16, 8, 128, QWEN_VOCAB, True),
    "qwen3-8b": _qwen("qwen3", 4096, 12288, 36, 32, 8, 128, QWEN_VOCAB, False),
    "qwen2.5-7b": _qwen("qwen2", 3584, 18944, 28, 28, 4, 128, QWEN25_7B_VOCAB, False),
}


def shape(name: str, **changes) -> LlamaConfig:
    """SHAPES[name], with `changes` applied to a copy."""
    return dataclasses.replace(SHAPES[name], **changes)


def describe(cfg: LlamaConfig) -> str:
    """One line for a results table."""
    family = "" if cfg.model_type == "llama" else f"{cfg.model_type}, "
    return (f"{family}h {cfg.hidden_size}, i {cfg.intermediate_size}, {cfg.num_hidden_layers} layers, "
            f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads x {cfg.head_dim}, vocab {cfg.vocab_size}"
            f"{', tied' if cfg.tie_word_embeddings else ''}")


def random_model(cfg: LlamaConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """Our LlamaForCausalLM of shape cfg with random weights, allocated once on `device` in `dtype` (no fp32 copy
    of a large model first): norms 1, other weights N(0, 1 / in_features), wide enough that greedy choices
    are not near-ties. Drawn in fp32 whatever the dtype, so a model in another dtype holds the same weights
    rounded. In eval mode."""
    from rlvr_fast import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gave the head its own storage
        model.lm_head.weight = model.model.embed_tokens.weight
    model._inv_freq = cfg.rope_inv_freq()  # not a buffer (kept fp32): to_empty left it on the meta device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights (q_norm and k_norm included) 1, Qwen2's q/k/v biases 0
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.copy_(torch.empty(p.shape, device=device).normal_(0, p.shape[-1] ** -0.5, generator=gen))
    return model.eval()


def write_random_checkpoint(cfg: LlamaConfig | str, path: str | Path, dtype: torch.dtype = torch.bfloat16,
                            seed: int = 0) -> Path:
    """Save random_model(cfg) as an HF-layout directory (config.json of cfg's family, safetensors in `dtype`)
    with tests/tiny.py's small byte-level BPE tokenizer and ChatML template. Its vocabulary (a few hundred
    tokens) is far smaller than the model's: prompts encode to ids the model has, and sampled ids past the
    tokenizer decode to ''. Built on the CPU (Qwen3-0.6B: 1.2 GB in bf16, a few seconds)."""
    from rlvr_fast import Tokenizer, save_pretrained
    from tests.tiny import write_tokenizer_files

    cfg = SHAPES[cfg] if isinstance(cfg, str) else cfg
    with tempfile.TemporaryDirectory() as tok_dir:
        write_tokenizer_files(Path(tok_dir))
        return save_pretrained(random_model(cfg, "cpu", dtype, seed), Tokenizer.from_dir(tok_dir), path)


def main() -> None:
    ap = argparse.ArgumentParser(description="Write a random-weight checkpoint of one of bench/shapes.py's shapes.")
    ap.add_argument("shape", choices=list(SHAPES))
    ap.add_argument("out", type=Path, help="the directory to write (replaced if it exists)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--layers", type=int, help="fewer decoder layers than the real model (same widths)")
    args = ap.parse_args()
    cfg = shape(args.shape, **({"num_hidden_layers": args.layers} if args.layers else {}))
    print(write_random_checkpoint(cfg, args.out, getattr(torch, args.dtype)), describe(cfg))


if __name__ == "__main__":
    main()
