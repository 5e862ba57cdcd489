"""Save the model and tokenizer as an HF-layout directory that `transformers` loads unchanged.

The directory is written next to its destination under a temporary name and renamed into
place at the end, so a run killed while saving never leaves a half-written checkpoint that looks
complete: `path` holds either the old checkpoint or the new one. The files are flushed to disk
before the rename, and the rename after it (durable.py), so this holds after a power loss too. A model with LoRA adapters is
saved merged (W + s B A in the weights' dtype): a plain Llama checkpoint. Adapters alone: adapters.py.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlvr_fast.checkpoint.durable import fsync_dir, sync_tree
from rlvr_fast.checkpoint.load import SAFETENSORS_FILE, SAFETENSORS_INDEX
from rlvr_fast.model.llama import LlamaForCausalLM
from rlvr_fast.model.lora import has_lora, merged_state_dict
from rlvr_fast.tokenizer import Tokenizer

MAX_SHARD_BYTES = 5 * 1024**3  # HF's default shard size


def save_pretrained(model: LlamaForCausalLM, tokenizer: Tokenizer | None, path: str | Path,
                    max_shard_bytes: int = MAX_SHARD_BYTES, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json, safetensors weights (sharded above max_shard_bytes) and tokenizer files.
    state_dict: the weights to write, if not model.state_dict() (e.g. gathered from FSDP shards)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write(model, tokenizer, tmp, max_shard_bytes, state_dict)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write(model: LlamaForCausalLM, tokenizer: Tokenizer | None, out: Path, max_shard_bytes: int,
           state_dict: dict[str, torch.Tensor] | None = None) -> None:
    if state_dict is None:
        state_dict = merged_state_dict(model) if has_lora(model) else model.state_dict()
    state = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # one tensor on disk, as transformers writes tied weights
    shards = _split(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / SAFETENSORS_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        tokenizer.save(out)
    (out / "config.json").write_text(json.dumps(model.config.to_dict(dtype=model.dtype), indent=2) + "\n")


def _split(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _replace_dir(new: Path, path: Path) -> None:
    """Swap `new` into `path`, durably; the old directory is removed only after the new one is in place."""
    os.chmod(new, 0o755)  # mkdtemp makes it 0700
    sync_tree(new)  # its files' data on disk before the rename publishes them
    if not path.exists():
        new.rename(path)
    else:
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        new.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)
