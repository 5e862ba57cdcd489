"""Shared test setup.

Triton kernels run in the interpreter on machines without a GPU. The variable must be set
before triton is first imported, so it is set here, before any test module imports the
project. On a GPU machine the compiled kernels are tested instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_model_path():
    """The embedded default model, converted once into the normal cache (~/.cache/rlvr_fast or $RLVR_FAST_CACHE)."""
    from rlvr_fast.checkpoint.default_model import DefaultModelNotInstalledError, default_model_dir
    try:
        return default_model_dir()
    except DefaultModelNotInstalledError as exc:
        pytest.skip(str(exc))
