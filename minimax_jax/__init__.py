"""minimax_jax: the MiniMax-01 family (Text-01, M1, VL-01) in JAX / Flax NNX."""

from minimax_jax.config import ModelConfig
from minimax_jax.model import MiniMaxForCausalLM
from minimax_jax.pretrained import from_pretrained, save_pretrained

__all__ = ["ModelConfig", "MiniMaxForCausalLM", "from_pretrained", "save_pretrained"]
