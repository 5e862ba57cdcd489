"""Shared test setup.

Triton kernels run in the interpreter on machines without a GPU. The variable must be set
before triton is first imported, so it is set here, before any test module imports the
project. On a GPU machine the compiled kernels are tested instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
