"""Checkpoints of a run: HF-layout weights plus the trainer state needed to continue bit for bit.

OUTPUT/checkpoint-STEP/ holds

    config.json, model.safetensors, tokenizer files   the model, loadable by transformers and --model
                                                      (with LoRA: the adapters alone, in PEFT's layout)
    trainer_state.json   step, data position (the Python RNG state of the problem stream, a list of
                         ints), task state (curriculum level), bad-step count, cold-start progress,
                         the run's options, how many ranks saved it and how
    trainer_state.pt     tensors only: optimizer state, fp32 master weights, torch's RNG state (a uint8
                         tensor; training draws no NumPy random numbers, so there is no NumPy state)
    rank-R.pt            --shard fsdp: rank R's optimizer shard, tensors only
    manifest.json        every file above with its size and SHA-256, written last

**Nothing read from a checkpoint can run code.** A pickle can: unpickling calls whatever its
`__reduce__` names. So metadata is JSON, and the tensor files are read with
`torch.load(weights_only=True)`, whose unpickler accepts tensors (DTensors too), numbers, strings,
None and dicts/lists/tuples of them, and refuses any other object before calling anything: a planted
payload is an error (CheckpointError, naming the file), not a program. We keep torch.save for the
optimizer state rather than safetensors because that state is nested (per-parameter dicts, hyper-
parameters in param_groups, DTensors under FSDP): weights_only reads it as it is, as safely, with no
flattening code to get wrong.

**A damaged checkpoint costs one checkpoint.** Saving writes everything into a hidden staging
directory (`.checkpoint-STEP.partial`), flushes every file to disk, writes the manifest, renames the
directory into place, flushes OUTPUT, then replaces OUTPUT/latest (flushed, renamed, flushed): a crash
or a full disk at any moment leaves the previous checkpoint and `latest` as they were, and a failed
save says so (CheckpointSaveError). `find_checkpoint` (--resume) verifies the manifest of the
checkpoint it picks; given a run directory it falls back to the newest older checkpoint that verifies
and reports what it skipped, given a checkpoint directory it never falls back.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from rlvr_fast.checkpoint import save_pretrained
from rlvr_fast.checkpoint.adapters import save_adapters
from rlvr_fast.checkpoint.durable import MANIFEST, fsync_dir, verify_manifest, write_manifest, write_text_durably
from rlvr_fast.checkpoint.load import CheckpointError
from rlvr_fast.checkpoint.save import _replace_dir
from rlvr_fast.grpo.distributed import Dist
from rlvr_fast.grpo.fsdp import full_state_dict, is_sharded
from rlvr_fast.model.lora import has_lora

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.pt"
LATEST = "latest"
FORMAT = 2  # 1: one pickled trainer_state.pt (before manifests); refused, see load_state
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (a full disk, a file-size limit, ...); nothing older was touched."""


# ---- saving ---------------------------------------------------------------------------------


def staging_dir(output: Path, step: int) -> Path:
    return output / f".checkpoint-{step}.partial"


def save_checkpoint(output: Path, step: int, model, tokenizer, state: dict[str, Any], keep: int = 2,
                    dist: Dist | None = None) -> Path:
    """Write OUTPUT/checkpoint-STEP and point OUTPUT/latest to it (module docstring: how, and why it is safe).
    Several ranks (dist): rank 0 writes the model and the trainer state, which are the same on every rank; a
    sharded model (fsdp.py) is gathered to rank 0's CPU first, and every rank adds its optimizer shard to the
    staging directory before the manifest. No rank returns before the checkpoint is complete."""
    dist = dist or Dist()
    path, staging = output / f"checkpoint-{step}", staging_dir(output, step)
    sharded = is_sharded(model)
    weights = full_state_dict(model)  # sharded: gathered (every rank takes part); otherwise None, the model's own
    state = {**state, "world_size": dist.world_size, "shard": "fsdp" if sharded else "none"}
    rank_state = {"optimizer": state.pop("optimizer"), "world_size": dist.world_size} if sharded else None

    def add_rank_state() -> None:
        if sharded:
            dist.barrier()  # rank 0 has written the weights into the staging directory
            torch.save(rank_state, staging / f"rank-{dist.rank}.pt")
            dist.barrier()

    if not dist.is_main:
        add_rank_state()
        dist.barrier()
        return path
    try:
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that crashed
        if has_lora(model):  # the frozen base is --model itself: only the adapters change
            save_adapters(model, staging, tokenizer=tokenizer)
        else:
            save_pretrained(model, tokenizer, staging, state_dict=weights)
        write_state(staging, state)
        add_rank_state()
        write_manifest(staging)  # flushes every file; the checkpoint is complete from here on
        _replace_dir(staging, path)
        write_text_durably(output / LATEST, path.name + "\n")
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, TypeError):  # a bug (e.g. a task state that is not JSON), not a fault of the disk
            raise
        latest = output / LATEST
        kept = f"{latest} still points to {latest.read_text().strip()}" if latest.is_file() else "no earlier checkpoint"
        raise CheckpointSaveError(f"could not write {path.name}: {type(exc).__name__}: {exc}. Is the disk full, or a "
                                  f"file-size limit reached? Nothing older was changed ({kept}).") from exc
    except BaseException:  # Ctrl-C while saving: the staging directory is not a checkpoint
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _prune(output, keep, current=path)
    dist.barrier()
    return path


def save_model(model, tokenizer, path: Path, dist: Dist | None = None) -> Path:
    """The HF-layout model alone (the cold start's, a merged LoRA model), written by rank 0; a sharded
    model is gathered first. No rank returns before it is written."""
    dist = dist or Dist()
    weights = full_state_dict(model)
    if dist.is_main:
        save_pretrained(model, tokenizer, path, state_dict=weights)  # atomic on its own
    dist.barrier()
    return path


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Split the trainer state: entries holding tensors go to trainer_state.pt, the rest to trainer_state.json."""
    tensors = {k: v for k, v in state.items() if _holds_tensor(v)}
    meta = {k: v for k, v in state.items() if k not in tensors}
    try:  # one line per entry: readable, and the RNG state's 625 numbers stay on one
        lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in {"format": FORMAT, **meta}.items()]
    except TypeError as exc:  # e.g. a task's state_dict() with a set or an object in it
        raise TypeError(f"trainer state must be JSON values and tensors ({exc}); a task's state_dict() must return "
                        "numbers, strings, lists and dicts") from None
    torch.save(tensors, directory / STATE_TENSORS)
    (directory / STATE_JSON).write_text("{\n" + ",\n".join(lines) + "\n}\n")


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return False


def _prune(output: Path, keep: int, current: Path) -> None:
    """Remove all but the `keep` newest checkpoints up to the current step, and staging directories of
    crashed saves. Later checkpoints (from before a resume from an older one, or damaged ones a resume
    skipped) are left alone: not ours to judge."""
    step = checkpoint_step(current)
    older = [p for p in list_checkpoints(output) if checkpoint_step(p) <= step]
    for old in older[keep:]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in output.glob(".checkpoint-*.partial*"):  # left by saves that crashed: never checkpoints
        shutil.rmtree(stale, ignore_errors=True)
    fsync_dir(output)


# ---- loading --------------------------------------------------------------------------------


def load_state(checkpoint: Path, dist: Dist | None = None, sharded: bool = False) -> dict[str, Any]:
    """This rank's trainer state of a checkpoint: trainer_state.json, the tensors of trainer_state.pt and,
    when sharded (--shard fsdp), the rank's optimizer shard."""
    dist = dist or Dist()
    state = {**load_state_json(checkpoint), **load_tensors(checkpoint / STATE_TENSORS)}
    saved_shard, saved_world = state.get("shard", "none"), state.get("world_size", 1)
    if saved_shard == "fsdp" and (not sharded or saved_world != dist.world_size):
        raise ValueError(f"{checkpoint} holds optimizer states sharded over {saved_world} ranks (--shard fsdp): "
                         f"resume it with --shard fsdp on {saved_world} ranks in all, not {dist.world_size}")
    if saved_shard == "none" and sharded:
        raise ValueError(f"{checkpoint} was saved with --shard none: resume it with --shard none")
    if sharded:
        shard = checkpoint / f"rank-{dist.rank}.pt"
        if not shard.is_file():
            raise CheckpointError(f"{shard} is missing: this checkpoint's trainer state is sharded, one file per rank")
        state["optimizer"] = load_tensors(shard)["optimizer"]
    return state


def load_state_json(checkpoint: Path) -> dict[str, Any]:
    """trainer_state.json: everything but the tensors (the run's options are under "config")."""
    file = checkpoint / STATE_JSON
    if not file.is_file():
        old = " (an rlvr_fast from before manifests wrote it: resume it with that version)" \
            if (checkpoint / STATE_TENSORS).is_file() else ""
        raise CheckpointError(f"{checkpoint} has no {STATE_JSON}{old}")
    try:
        meta = json.loads(file.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.pop("format", None) != FORMAT:
        raise CheckpointError(f"{file}: not a checkpoint format this rlvr_fast reads (format {FORMAT})")
    return meta


def load_tensors(file: Path) -> dict[str, Any]:
    """A torch.save file of tensors and plain values, read without running code (weights_only)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{file} was refused: it holds Python objects other than tensors and plain values, and loading it "
            f"could run code. rlvr_fast writes none there; this file was changed or written by something else. "
            f"Do not load it with weights_only=False unless you trust its source. ({reason[0] if reason else exc})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{file} cannot be read ({type(exc).__name__}: {exc}): truncated or corrupt") from None


def python_rng_state(saved: list) -> tuple:
    """random.getstate() as JSON gave it back (lists): the tuples random.setstate() takes."""
    version, internal, gauss_next = saved
    return version, tuple(internal), gauss_next


# ---- which checkpoint to resume -------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    return int(_CHECKPOINT_NAME.fullmatch(path.name).group(1))


def list_checkpoints(output: Path) -> list[Path]:
    """OUTPUT/checkpoint-STEP directories, newest (highest step) first."""
    found = [p for p in output.iterdir() if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=checkpoint_step, reverse=True)


def is_checkpoint_dir(path: Path) -> bool:
    return bool(_CHECKPOINT_NAME.fullmatch(path.name)) or any((path / f).exists() for f in (MANIFEST, STATE_JSON))


def verify_checkpoint(path: Path) -> None:
    """Raises CheckpointError unless every file of the checkpoint is as its manifest says."""
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist")
    verify_manifest(path, required=(STATE_JSON, STATE_TENSORS))


def find_checkpoint(path: Path, fallback: bool = True) -> tuple[Path, list[str]]:
    """The checkpoint --resume PATH continues from, verified, and what was skipped (one line each).

    PATH a checkpoint directory: that one, or a CheckpointError. PATH a run directory: the checkpoint
    OUTPUT/latest names, or if it does not verify the newest older one that does (fallback=False: an
    error instead). Checkpoints newer than `latest` are not considered: `latest` moves last, so they
    are leftovers (of a run resumed from an earlier checkpoint, say)."""
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such directory")
    if is_checkpoint_dir(path):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            raise CheckpointError(f"--resume {path}: {exc}. This checkpoint was named explicitly, so no other is "
                                  f"tried; to resume from the newest checkpoint that verifies, give the run "
                                  f"directory: --resume {path.parent}") from None
        return path, []
    candidates = list_checkpoints(path)
    skipped: list[str] = []
    pointer = path / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _CHECKPOINT_NAME.fullmatch(name):
            newest = checkpoint_step(path / name)
            candidates = [path / name] + [p for p in candidates if checkpoint_step(p) < newest]
        else:
            skipped.append(f"{pointer} is damaged ({name[:40]!r}); trying every checkpoint, newest first")
    elif candidates:
        skipped.append(f"{pointer} is missing; trying every checkpoint, newest first")
    if not candidates:
        raise CheckpointError(f"--resume {path}: no checkpoint found there (expected {pointer} pointing to a "
                              "checkpoint-STEP directory)")
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
            return ckpt, skipped
        except CheckpointError as exc:
            if not fallback:
                raise CheckpointError(f"--resume {path}: {exc}. --no-resume-fallback is set, so no older checkpoint "
                                      "is tried") from None
            skipped.append(f"skipped {ckpt.name}: {exc}")
    raise CheckpointError(f"--resume {path}: no checkpoint verifies:\n  " + "\n  ".join(skipped))
