"""XLA grouped matmuls: `jax.lax.ragged_dot` and `ragged_dot_general` (CPU path, fallback).

On GPU these lower to a dense-materialised product (slow); use `gpu.py` there.
Rows past sum(group_sizes) give zero output and take no part in the weight gradient.

Int8 weights (`scale=`): the int8 -> x dtype convert is handed to XLA inside the dot's operand
(XLA decides whether it fuses into the GEMM; on CPU it does not, which is fine for a fallback);
the per-column scale multiplies the fp32 result rows (forward) or, for transpose_rhs, where it
runs along the contraction, the rows of x (each row times its group's scale).
"""

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.moe.reference import group_ids

_TGMM_DIMS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


def _row_scales(scale: jax.Array, group_sizes: jax.Array, m: int) -> jax.Array:
    """scale [E,C] -> [M,C] fp32: row m gets its group's scale (rows past the groups: the last
    group's, harmless since those rows are zero or masked)."""
    ids = jnp.minimum(group_ids(group_sizes, m), scale.shape[0] - 1)
    return jnp.take(scale.astype(jnp.float32), ids, axis=0)


def gmm(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
    scale: jax.Array | None = None,
) -> jax.Array:  # fmt: skip
    """x [M,K], w [E,K,N] (or [E,N,K] with transpose_rhs) -> [M,N] in x's dtype.

    scale: for int8 w, [E, w.shape[2]] (the scale of w's last axis: the output columns, or the
    contraction with transpose_rhs)."""
    if transpose_rhs:
        w = w.swapaxes(1, 2)
    if scale is None:
        return lax.ragged_dot(x, w, group_sizes, preferred_element_type=x.dtype)
    if transpose_rhs:  # the scale runs along the contraction: scale the rows of x
        xs = x.astype(jnp.float32) * _row_scales(scale, group_sizes, x.shape[0])
        return lax.ragged_dot(xs.astype(x.dtype), w.astype(x.dtype), group_sizes,
                              preferred_element_type=x.dtype)  # fmt: skip
    y = lax.ragged_dot(x, w.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32)
    return (y * _row_scales(scale, group_sizes, x.shape[0])).astype(x.dtype)


def tgmm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M,K], dy [M,N] -> [E,K,N] = per group x_e^T dy_e, in x's dtype (fp32 accumulation)."""
    out = lax.ragged_dot_general(
        x, dy, group_sizes, _TGMM_DIMS, preferred_element_type=jax.numpy.float32
    )
    return out.astype(x.dtype)
