"""NNX modules of the decoder: they only create parameters (with logical axis names).

All math is in `minimax_jax.ops`; the model gathers the parameters into a pure dict and calls it.
Every layer parameter carries a leading `layers` axis of size `stack` (the number of repeats of
the block position it belongs to), so the stack is scanned, not unrolled.

Logical axis names (mapped to mesh axes by the rules in `minimax_jax.sharding`):
layers, vocab, embed, heads, kv_heads, head_dim, qkv, experts, mlp, gate_up.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.config import ModelConfig

LIGHTNING = "linear_attention"


def param(rngs: nnx.Rngs | None, shape, axes, dtype, *, std: float | None) -> nnx.Param:
    """A parameter drawn from N(0, std) (std None: ones, for norm weights) tagged with axes."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and logical axes {axes} differ in rank")
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class LightningAttention(nnx.Module):
    """qkv [L,D,N,3,H] (head-major q/k/v), gate [L,D,N,H], norm [L,N,H], out [L,N,H,D]."""

    def __init__(self, cfg: ModelConfig, stack: int, *, rngs: nnx.Rngs, dtype):
        d, n, h, std = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.initializer_range
        self.qkv = param(
            rngs,
            (stack, d, n, 3, h),
            ("layers", "embed", "heads", "qkv", "head_dim"),
            dtype,
            std=std,
        )
        self.gate = param(
            rngs, (stack, d, n, h), ("layers", "embed", "heads", "head_dim"), dtype, std=std
        )
        self.norm = param(rngs, (stack, n, h), ("layers", "heads", "head_dim"), dtype, std=None)
        self.out = param(
            rngs, (stack, n, h, d), ("layers", "heads", "head_dim", "embed"), dtype, std=std
        )


class SoftmaxAttention(nnx.Module):
    """q [L,D,N,H], k/v [L,D,K,H], o [L,N,H,D]."""

    def __init__(self, cfg: ModelConfig, stack: int, *, rngs: nnx.Rngs, dtype):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std = cfg.initializer_range
        self.q = param(
            rngs, (stack, d, n, h), ("layers", "embed", "heads", "head_dim"), dtype, std=std
        )
        self.k = param(
            rngs, (stack, d, k, h), ("layers", "embed", "kv_heads", "head_dim"), dtype, std=std
        )
        self.v = param(
            rngs, (stack, d, k, h), ("layers", "embed", "kv_heads", "head_dim"), dtype, std=std
        )
        self.o = param(
            rngs, (stack, n, h, d), ("layers", "heads", "head_dim", "embed"), dtype, std=std
        )


class MoE(nnx.Module):
    """router [L,D,E] (always fp32), wi [L,E,D,2,F] (gate, up), wo [L,E,F,D]."""

    def __init__(self, cfg: ModelConfig, stack: int, *, rngs: nnx.Rngs, dtype):
        d, e, f, std = (
            cfg.hidden_size,
            cfg.num_experts,
            cfg.intermediate_size,
            cfg.initializer_range,
        )
        self.router = param(
            rngs, (stack, d, e), ("layers", "embed", "experts"), jnp.float32, std=std
        )
        self.wi = param(
            rngs,
            (stack, e, d, 2, f),
            ("layers", "experts", "embed", "gate_up", "mlp"),
            dtype,
            std=std,
        )
        self.wo = param(
            rngs, (stack, e, f, d), ("layers", "experts", "mlp", "embed"), dtype, std=std
        )


class DecoderLayer(nnx.Module):
    """One position of the repeating block, stacked over the block repeats."""

    def __init__(self, cfg: ModelConfig, kind: str, stack: int, *, rngs: nnx.Rngs, dtype):
        d = cfg.hidden_size
        self.input_norm = param(rngs, (stack, d), ("layers", "embed"), dtype, std=None)
        self.post_attn_norm = param(rngs, (stack, d), ("layers", "embed"), dtype, std=None)
        attn_cls = LightningAttention if kind == LIGHTNING else SoftmaxAttention
        self.attn = attn_cls(cfg, stack, rngs=rngs, dtype=dtype)
        self.moe = MoE(cfg, stack, rngs=rngs, dtype=dtype)
