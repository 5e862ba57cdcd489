"""GRPO: advantages and the training loop."""
