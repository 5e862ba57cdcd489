"""Tokenizer: the Rust `tokenizers` library for text <-> ids, Jinja for the chat template.

Reads what a Hugging Face checkpoint ships: `tokenizer.json` (vocabulary, merges, normalizer,
pre-tokenizer, post-processor that may add BOS), `tokenizer_config.json` (special tokens, chat
template) and `generation_config.json` (the ids that end a turn, often several for Llama 3).
The chat template is rendered the way transformers renders it (sandboxed Jinja, trim_blocks,
lstrip_blocks, a `tojson` filter that keeps non-ASCII text, `raise_exception`,
`strftime_now`), so prompts come out byte-identical.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as RustTokenizer

# Files that travel with a checkpoint and are copied unchanged when it is saved again.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(ValueError):
    """Tokenizer files that cannot be used, with the reason and the fix."""


class Tokenizer:
    def __init__(self, tokenizer: RustTokenizer, config: dict[str, Any] | None = None,
                 generation_config: dict[str, Any] | None = None, files: dict[str, bytes] | None = None):
        self._tok = tokenizer
        self.config = config or {}
        self.files = files or {}
        self.chat_template = _pick_template(self.config.get("chat_template"))
        self.special_tokens = {k: _token_content(self.config.get(k)) for k in _SPECIAL_TOKEN_KEYS}
        self.eos_token_id = self._id_of(self.special_tokens["eos_token"])
        self.bos_token_id = self._id_of(self.special_tokens["bos_token"])
        self.pad_token_id = self._id_of(self.special_tokens["pad_token"])
        gen_eos = (generation_config or {}).get("eos_token_id")
        if self.eos_token_id is None and gen_eos is not None:
            self.eos_token_id = gen_eos[0] if isinstance(gen_eos, list) else gen_eos
        # Every id that ends a completion (Llama 3 instruct models stop on several).
        stops = [self.eos_token_id] + (gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.stop_token_ids: list[int] = sorted({i for i in stops if i is not None})
        self._template: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path).expanduser()
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(
                f"{path} has no tokenizer.json. rlvr_fast reads the fast-tokenizer file only; make one with "
                "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
        try:
            tok = RustTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:
            raise TokenizerError(f"{path / 'tokenizer.json'} cannot be read by the tokenizers library ({exc})") from None
        files = {name: (path / name).read_bytes() for name in TOKENIZER_FILES if (path / name).is_file()}
        config = _read_json(path / "tokenizer_config.json")
        # Some checkpoints keep the template in its own file.
        if "chat_template" not in config and (path / "chat_template.jinja").is_file():
            config["chat_template"] = (path / "chat_template.jinja").read_text()
            files["chat_template.jinja"] = (path / "chat_template.jinja").read_bytes()
        return cls(tok, config, _read_json(path / "generation_config.json"), files)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. add_special_tokens adds what tokenizer.json's post-processor adds (BOS for
        Llama); pass False for text that already holds them, such as a rendered chat template."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render messages ([{"role": ..., "content": ...}, ...]) with the checkpoint's chat template."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat_template in tokenizer_config.json; use a chat/instruct "
                                 "model, or give prompts as plain text")
        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template)
        context = {k: v for k, v in self.special_tokens.items() if v is not None}
        context.update(kwargs)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer files this tokenizer was read from, byte for byte."""
        path = Path(path)
        if "tokenizer.json" not in self.files:
            self._tok.save(str(path / "tokenizer.json"))
        for name, data in self.files.items():
            (path / name).write_bytes(data)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{file} is not valid JSON ({exc})") from None


def _token_content(value: Any) -> str | None:
    """Special tokens are stored as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _pick_template(template: Any) -> str | None:
    """A template is a string, or a list of named templates of which "default" is the chat one."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _jinja_env() -> jinja2.Environment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
