"""minimax_jax: the MiniMax-01 family (Text-01, M1, VL-01) in JAX / Flax NNX."""

from minimax_jax.config import ModelConfig
from minimax_jax.hf.pretrained import from_pretrained, save_pretrained
from minimax_jax.hf.vl_pretrained import from_pretrained_vl, save_pretrained_vl
from minimax_jax.model.causal_lm import MiniMaxForCausalLM
from minimax_jax.version import __version__
from minimax_jax.vl.model import MiniMaxVLForConditionalGeneration

__all__ = [
    "ModelConfig",
    "MiniMaxForCausalLM",
    "MiniMaxVLForConditionalGeneration",
    "from_pretrained",
    "from_pretrained_vl",
    "save_pretrained",
    "save_pretrained_vl",
    "__version__",
]
