"""Writes that survive a crash, and manifests that tell a complete checkpoint from a damaged one.

`os.replace` makes a rename atomic, but not durable: after a power loss the renamed file can be
empty if its data never reached the disk. So every file is flushed (`fsync`) before the rename
that publishes it, and the directory is flushed after, so the rename itself is on disk.

A manifest (`manifest.json`) lists every file of a checkpoint directory with its size and
SHA-256. It is written last: a directory without one was never finished. `verify_manifest` says
which file is missing, truncated or changed. The manifest guards against accidents (a crash, a
full disk, a copy cut short), not against an attacker, who can rewrite it too: what keeps a
checkpoint from running code is that nothing in it is loaded by a reader that can
(rlvr_fast/grpo/checkpointing.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from rlvr_fast.checkpoint.load import CheckpointError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "rlvr_fast checkpoint manifest"
_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new, renamed or removed names) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(file: Path, sync: bool = False) -> tuple[int, str]:
    """(size, sha256 hex) of a file; sync: also flush its data to disk (one read, one fsync)."""
    digest = hashlib.sha256()
    size = 0
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def sync_tree(path: Path) -> None:
    """Flush every file directly in `path`, then the directory itself."""
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


def write_text_durably(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically and durably: a temporary file, flushed, renamed over it,
    and the directory flushed. A crash leaves the old content or the new, never an empty file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(directory: Path) -> dict:
    """Hash and flush every file of `directory` (flat: checkpoints have no subdirectories), then write
    manifest.json, flushed, and flush the directory. Call it once everything else is written."""
    files = {}
    for file in sorted(directory.iterdir()):
        if file.name == MANIFEST:
            continue
        if not file.is_file():
            raise CheckpointError(f"{file}: a checkpoint holds files only, found something else")
        size, sha = file_digest(file, sync=True)
        files[file.name] = {"bytes": size, "sha256": sha}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "files": files}
    with open(directory / MANIFEST, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(directory)
    return manifest


def verify_manifest(directory: Path, required: tuple[str, ...] = ()) -> None:
    """Check every file the manifest lists (present, same size, same SHA-256) and that the `required`
    names are among them. Raises CheckpointError naming the first file that is wrong and how."""
    file = directory / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}: the save did not finish (a crash or a full disk), "
                              "or an older rlvr_fast wrote it")
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not an rlvr_fast manifest")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file} cannot be read ({exc}): it is damaged") from None
    for name in required:
        if name not in files:
            raise CheckpointError(f"{directory}: {name} is not in {MANIFEST}: the checkpoint is incomplete")
    for name, entry in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{file} names {name!r}, not a file of the checkpoint directory: it is damaged")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST}): the checkpoint is incomplete")
        size, expected = path.stat().st_size, entry.get("bytes")
        if size != expected:
            how = "truncated" if isinstance(expected, int) and size < expected else "changed"
            raise CheckpointError(f"{path} is {size} bytes, {MANIFEST} says {expected}: {how} after saving")
        if file_digest(path)[1] != entry.get("sha256"):
            raise CheckpointError(f"{path} does not match its SHA-256 in {MANIFEST}: the file is corrupt or was "
                                  "changed after saving")
