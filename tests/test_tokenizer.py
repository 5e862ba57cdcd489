"""The tokenizer against transformers' tokenizer for the same files: ids, decoding, chat template text."""

from __future__ import annotations

import json

import pytest

from rlvr_fast import Tokenizer, TokenizerError
from tests.tiny import write_tokenizer_files

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Please answer the following question. 1497 * 63",
    "Final Answer: the final answer is 94311. I hope it is correct.",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "unicode: café, naïve, 数学, emoji 🙂",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 * 34?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "1497 * 63"},
     {"role": "assistant", "content": "94311"}, {"role": "user", "content": "Sure? 🙂"}],
]
# Exercises what real templates use: bos_token, tojson on non-ASCII, loop controls, raise_exception.
LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role') }}{% endif %}{% if m['content'] == 'skip' %}{% continue %}{% endif %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if tools is not none %}{{ tools | tojson(indent=2) }}{% endif %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture
def tiny_dir(tmp_path):
    write_tokenizer_files(tmp_path)
    return tmp_path


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_and_decoding_match_transformers(tiny_dir, add_special_tokens):
    ours = Tokenizer.from_dir(tiny_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=add_special_tokens)
        assert ids == theirs.encode(text, add_special_tokens=add_special_tokens), text
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_special_token_ids(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")
    assert tok.stop_token_ids == [tok.eos_token_id]
    assert tok.bos_token_id is None


@pytest.mark.parametrize("gen_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chatml_template_matches_transformers(tiny_dir, conversation, gen_prompt):
    ours = Tokenizer.from_dir(tiny_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    expected = theirs.apply_chat_template(conversation, add_generation_prompt=gen_prompt, tokenize=False)
    assert ours.apply_chat_template(conversation, add_generation_prompt=gen_prompt) == expected


def test_llama3_style_template_matches_transformers(tiny_dir):
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    cfg.update(chat_template=LLAMA3_STYLE_TEMPLATE, bos_token="<|endoftext|>")
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tiny_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    ours = Tokenizer.from_dir(tiny_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    conv = CONVERSATIONS[1] + [{"role": "user", "content": "skip"}]
    tools = [{"name": "météo", "parameters": {"city": "Zürich"}}]
    expected = theirs.apply_chat_template(conv, tools=tools, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(conv, tools=tools) == expected
    assert "Zürich" in expected
    assert ours.bos_token_id == ours.token_to_id("<|endoftext|>")
    assert ours.stop_token_ids == [1, 2]  # generation_config's list, with the tokenizer's eos
    with pytest.raises(Exception, match="bad role"):
        ours.apply_chat_template([{"role": "robot", "content": "x"}])
    # Older checkpoints store special tokens as AddedToken dicts.
    cfg["bos_token"] = {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(tiny_dir).apply_chat_template(conv, tools=tools) == expected


def test_no_template_is_a_clear_error(tiny_dir):
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tiny_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="no chat_template"):
        Tokenizer.from_dir(tiny_dir).apply_chat_template(CONVERSATIONS[0])


def test_corrupt_tokenizer_json(tiny_dir):
    (tiny_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be read"):
        Tokenizer.from_dir(tiny_dir)
