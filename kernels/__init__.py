"""Fused per-token log-probs and GRPO loss (importable as rlvr_fast.kernels).

Triton kernels on CUDA tensors, chunked PyTorch paths on CPU (and whenever triton is missing);
each op sits in its own file beside a plain PyTorch reference in `reference.py`. See README.md.
"""

from ._common import HAS_TRITON
from .fused_linear_grpo_loss import fused_linear_grpo_loss
from .grpo_loss import LOSS_TYPES, grpo_loss
from .linear_token_logprobs import linear_token_logprobs
from .token_logprobs import token_logprobs

__all__ = ["HAS_TRITON", "LOSS_TYPES", "fused_linear_grpo_loss", "grpo_loss", "linear_token_logprobs",
           "token_logprobs"]
