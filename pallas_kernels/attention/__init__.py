"""Softmax attention without a mask (standalone: imports nothing from minimax_jax). See `api.py`."""

from pallas_kernels.attention.api import (
    IMPLEMENTATIONS,
    attention,
    auto_candidates,
    cudnn_unsupported,
)

__all__ = ["IMPLEMENTATIONS", "attention", "auto_candidates", "cudnn_unsupported"]
