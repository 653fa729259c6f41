"""Padding helpers shared by the Pallas grouped-matmul wrappers (gpu.py, tpu.py)."""

import jax
import jax.numpy as jnp


def pad_to(a: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pad ``axis`` of ``a`` up to a multiple of ``multiple``."""
    extra = -a.shape[axis] % multiple
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def mask_rows(y: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Zero rows past sum(group_sizes) (the kernels leave them unwritten)."""
    rows = jnp.arange(y.shape[0], dtype=jnp.int32)[:, None]
    return jnp.where(rows < jnp.sum(group_sizes), y, jnp.zeros((), y.dtype))
