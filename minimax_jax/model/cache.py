"""Generation caches: explicit pytrees passed into the forward and returned updated.

Layout (one entry per position p of the repeating block, stacked over the block repeats like the
parameters, so the decoder scan slices them together):
  blocks[p] = {"state": [NB,B,N,H,H] fp32}                 lightning position
  blocks[p] = {"k": [NB,B,S,K,H], "v": [NB,B,S,K,H]}       softmax position (post-RoPE K, V)
  valid     [B,S] bool     slots holding real tokens (False: left padding, not yet written)
  index     int32 scalar   next slot to write (the same for every row: rows are left-aligned)
  positions [B] int32      RoPE position of each row's next token (= real tokens seen)
"""

from typing import Any

import jax
import jax.numpy as jnp

from minimax_jax.config import LINEAR, ModelConfig


def _block_shapes(config: ModelConfig, batch: int, max_len: int, kv_dtype: Any) -> list[dict]:
    nb, n, h, k = config.num_blocks, config.num_heads, config.head_dim, config.num_kv_heads
    out = []
    for kind in config.block_pattern:
        if kind == LINEAR:
            out.append({"state": jax.ShapeDtypeStruct((nb, batch, n, h, h), jnp.float32)})
        else:
            kv = jax.ShapeDtypeStruct((nb, batch, max_len, k, h), kv_dtype)
            out.append({"k": kv, "v": kv})
    return out


def cache_shapes(config: ModelConfig, batch: int, max_len: int, kv_dtype: Any = jnp.float32):
    """The cache as a pytree of ShapeDtypeStructs (nothing allocated)."""
    return {
        "blocks": _block_shapes(config, batch, max_len, kv_dtype),
        "valid": jax.ShapeDtypeStruct((batch, max_len), jnp.bool_),
        "index": jax.ShapeDtypeStruct((), jnp.int32),
        "positions": jax.ShapeDtypeStruct((batch,), jnp.int32),
    }


# Logical axes of the cache leaves (mapped to the mesh by the same rules as the parameters).
STATE_AXES = ("layers", "batch", "heads", None, None)
KV_AXES = ("layers", "batch", None, "kv_heads", None)


def cache_shardings(config: ModelConfig, batch: int, max_len: int, mesh, rules) -> dict:
    """NamedShardings for every cache leaf: states split by heads, K/V by kv heads, rows by the
    rules' batch axes (the same per-device sizes `inference.memory.cache_bytes` plans)."""
    shapes = cache_shapes(config, batch, max_len)

    def leaf(axes, s):
        return rules.sharding(mesh, axes, s.shape)

    blocks = [
        {k: leaf(STATE_AXES if k == "state" else KV_AXES, s) for k, s in b.items()}
        for b in shapes["blocks"]
    ]
    return {
        "blocks": blocks,
        "valid": leaf(("batch", None), shapes["valid"]),
        "index": leaf((), shapes["index"]),
        "positions": leaf(("batch",), shapes["positions"]),
    }


def init_cache(
    config: ModelConfig,
    batch: int,
    max_len: int,
    kv_dtype: Any = jnp.float32,
    *,
    mesh=None,
    rules=None,
) -> dict:
    """An empty cache for `batch` rows and `max_len` slots (prompt + new tokens); with a mesh and
    rules it is created directly in its shards (never whole on one device)."""
    shapes = cache_shapes(config, batch, max_len, kv_dtype)

    def zeros():
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    if mesh is None:
        return zeros()
    return jax.jit(zeros, out_shardings=cache_shardings(config, batch, max_len, mesh, rules))()
