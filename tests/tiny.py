"""Tiny random Llama-family checkpoints for tests, built with the project's own code (no hub, no transformers).

`make_tiny_checkpoint(path, family="llama", **config_overrides)` writes an HF-layout directory: config.json,
model.safetensors and a small byte-level BPE tokenizer (trained here, deterministically) with a
ChatML chat template, like SmolLM2's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlvr_fast import LlamaConfig, LlamaForCausalLM, Tokenizer, save_pretrained
from rlvr_fast.model.config import FAMILIES

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "Please answer the following question. You may write out your argument before stating your final answer X "
    "in a new line, following the format \"Final Answer: the final answer is X. I hope it is correct.\" 1497 * 63",
    "Final Answer: the final answer is 94311. I hope it is correct.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 99 100 12345 * + - = The quick brown fox jumps over the lazy dog.",
    "user assistant system function call <functioncall> <no_functioncall> provide your thought process",
]

TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=True, bos_token_id=0, eos_token_id=2,
)


def tiny_tokenizer(vocab_size: int = 320) -> RustTokenizer:
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def write_tokenizer_files(path: Path, vocab_size: int = 320) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(vocab_size).save(str(path / "tokenizer.json"))
    config = {"bos_token": None, "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>",
              "chat_template": CHATML_TEMPLATE, "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast",
              "add_bos_token": False}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_tiny_checkpoint(path: str | Path, seed: int = 0, family: str = "llama", **overrides: Any) -> Path:
    """Write a random-weight tiny checkpoint of `family` (a model_type of FAMILIES) with a tokenizer to
    `path` and return it."""
    path = Path(path)
    raw = {**TINY_CONFIG, **overrides, "architectures": [FAMILIES[family]], "model_type": family}
    cfg = LlamaConfig.from_dict(raw)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # large enough that logits are far from uniform
    tok_dir = path.with_name(path.name + ".tok")
    write_tokenizer_files(tok_dir, cfg.vocab_size)
    save_pretrained(model, Tokenizer.from_dir(tok_dir), path)
    return path
