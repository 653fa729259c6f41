"""Documented import path of the VL-01 processor (`minimax_jax.processor.MiniMaxVLProcessor`);
the code lives in `minimax_jax.vl.processor`."""

from minimax_jax.vl.processor import ImageInputs, MiniMaxVLProcessor

__all__ = ["ImageInputs", "MiniMaxVLProcessor"]
