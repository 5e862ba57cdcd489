"""Checkpoints of a run: HF-layout weights plus the trainer state needed to continue bit for bit.

OUTPUT/checkpoint-STEP/ holds the model (config.json, safetensors, tokenizer files: loadable by
transformers and by --model; with LoRA: the adapters alone, in PEFT's layout) and trainer_state.pt (optimizer, schedule, RNG states, step, task
state such as the curriculum level and the data position). Each checkpoint is written under a
temporary name and renamed into place, then OUTPUT/latest is replaced atomically; a run killed at
any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from rlvr_fast.checkpoint import save_pretrained
from rlvr_fast.checkpoint.adapters import save_adapters
from rlvr_fast.model.lora import has_lora

STATE_FILE = "trainer_state.pt"
LATEST = "latest"


def save_checkpoint(output: Path, step: int, model, tokenizer, state: dict[str, Any], keep: int = 2,
                    model_state: dict[str, torch.Tensor] | None = None,
                    before_state: Callable[[Path], None] | None = None) -> Path:
    """model_state: the weights to write when not model.state_dict() (FSDP: gathered from the ranks);
    before_state(path): runs once the weights are in place, before the trainer state (FSDP: the
    ranks write their optimizer shards)."""
    path = output / f"checkpoint-{step}"
    if has_lora(model):  # the frozen base is --model itself: only the adapters change
        save_adapters(model, path, tokenizer=tokenizer)
    else:
        save_pretrained(model, tokenizer, path, state_dict=model_state)  # atomic on its own
    if before_state is not None:
        before_state(path)
    tmp_state = path / (STATE_FILE + ".tmp")
    torch.save(state, tmp_state)
    os.replace(tmp_state, path / STATE_FILE)
    tmp_latest = output / (LATEST + ".tmp")
    tmp_latest.write_text(path.name + "\n")
    os.replace(tmp_latest, output / LATEST)
    _prune(output, keep, current=path)
    return path


def latest_checkpoint(output: Path) -> Path | None:
    pointer = output / LATEST
    if not pointer.is_file():
        return None
    path = output / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def load_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)


def save_rank_state(checkpoint: Path, rank: int, state: dict[str, Any]) -> None:
    """One rank's part of a sharded trainer state (FSDP: its optimizer shard)."""
    tmp = checkpoint / f"rank-{rank}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, checkpoint / f"rank-{rank}.pt")


def load_rank_state(checkpoint: Path, rank: int) -> dict[str, Any]:
    path = checkpoint / f"rank-{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this checkpoint's trainer state is sharded, one file per rank")
    return torch.load(path, map_location="cpu", weights_only=False)


def _prune(output: Path, keep: int, current: Path) -> None:
    checkpoints = sorted((p for p in output.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()),
                         key=lambda p: int(p.name.split("-", 1)[1]))
    for old in checkpoints[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
