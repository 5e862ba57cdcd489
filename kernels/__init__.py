"""Fused per-token log-probs and GRPO loss (importable as rlvr_fast.kernels).

Triton kernels on CUDA tensors, chunked PyTorch paths on CPU (and whenever triton is missing);
each op sits in its own file beside a plain PyTorch reference in `reference.py`. See README.md.
"""

if __name__ == "kernels":
    # This folder is installed as `rlvr_fast.kernels` (setup.py maps it). Anything started from the
    # repository root (pytest, `python -c`, a script) has the root on sys.path, so a plain
    # `import kernels` lands here instead of the installed distribution of that name (Hugging Face's
    # `kernels`, which transformers imports). Hand the name over to that distribution, or fail the
    # way a missing module fails: this project never exposes a top-level `kernels`.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _installed  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_installed)
else:
    from ._common import HAS_TRITON
    from .fused_linear_grpo_loss import fused_linear_grpo_loss
    from .grpo_loss import grpo_loss
    from .linear_token_logprobs import linear_token_logprobs
    from .loss_options import LOSS_TYPES, LossConfig
    from .token_logprobs import token_logprobs

    __all__ = ["HAS_TRITON", "LOSS_TYPES", "LossConfig", "fused_linear_grpo_loss", "grpo_loss", "linear_token_logprobs",
               "token_logprobs"]
