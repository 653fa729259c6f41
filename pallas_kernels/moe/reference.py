"""Dense per-expert references for the grouped matmuls (tests only: loops over experts).

Letters: M rows (token-expert assignments sorted by expert), K contracting dim, N output dim,
E experts (groups). Rows past sum(group_sizes) belong to no group: output zero.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.quant import dequantize


def group_ids(group_sizes: jax.Array, m: int) -> jax.Array:
    """group_sizes [E] int32 -> group id of every row [M] int32 (E for rows past the last group)."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(m, dtype=ends.dtype), side="right").astype(jnp.int32)


def grouped_matmul_reference(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, scale: jax.Array | None = None
) -> jax.Array:
    """x [M,K], w [E,K,N], group_sizes [E] -> [M,N]: rows of group e times w[e] (fp32 math).

    With scale [E,N]: w is int8 and is dequantised first (w * scale in fp32, `quant.py`)."""
    if scale is not None:
        w = dequantize(w, scale, axis=1)
    ids = group_ids(group_sizes, x.shape[0])
    out = jnp.zeros((x.shape[0], w.shape[2]), jnp.float32)
    for e in range(w.shape[0]):
        y = jnp.dot(x, w[e], preferred_element_type=jnp.float32)
        out = jnp.where((ids == e)[:, None], y, out)
    return out.astype(x.dtype)


def tgmm_reference(x: jax.Array, dy: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M,K], dy [M,N], group_sizes [E] -> [E,K,N]: per group e, x_e^T dy_e (fp32 math)."""
    ids = group_ids(group_sizes, x.shape[0])
    outs = []
    for e in range(group_sizes.shape[0]):
        xe = jnp.where((ids == e)[:, None], x, 0).astype(jnp.float32)
        outs.append(xe.T @ dy.astype(jnp.float32))
    return jnp.stack(outs).astype(x.dtype)
