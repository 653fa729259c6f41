"""minimax_jax: the MiniMax-01 family (Text-01, M1, VL-01) in JAX / Flax NNX."""

from minimax_jax.config import ModelConfig
from minimax_jax.model import MiniMaxForCausalLM

__all__ = ["ModelConfig", "MiniMaxForCausalLM"]
