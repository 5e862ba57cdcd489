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

# Printed at the top of every run (CI included), so a red run caused by a new upstream release is
# recognisable at a glance.
VERSIONS_OF = ("torch", "triton", "transformers", "peft", "kernels", "trl", "safetensors", "tokenizers")


def pytest_sessionstart(session):
    from importlib.metadata import PackageNotFoundError, version

    def of(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"
    line = "versions: " + ", ".join(f"{name} {of(name)}" for name in VERSIONS_OF)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:  # written in -q mode too, unlike a report header
        reporter.write_line(line)


@pytest.fixture(scope="session")
def default_model_path():
    """The embedded default model, converted once into the normal cache (~/.cache/rlvr_fast or $RLVR_FAST_CACHE)."""
    from rlvr_fast.checkpoint.default_model import DefaultModelNotInstalledError, default_model_dir
    try:
        return default_model_dir()
    except DefaultModelNotInstalledError as exc:
        pytest.skip(str(exc))
