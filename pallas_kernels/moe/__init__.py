"""Grouped matmul for dropless MoE (standalone: imports nothing from minimax_jax). See `api.py`."""

from pallas_kernels.moe.api import IMPLEMENTATIONS, grouped_matmul, resolve_implementation, tgmm

__all__ = ["IMPLEMENTATIONS", "grouped_matmul", "resolve_implementation", "tgmm"]
