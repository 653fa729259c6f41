"""XLA grouped matmuls: `jax.lax.ragged_dot` and `ragged_dot_general` (CPU path, fallback).

On GPU these lower to a dense-materialised product (slow); use `gpu.py` there.
Rows past sum(group_sizes) give zero output and take no part in the weight gradient.
"""

import jax
from jax import lax

_TGMM_DIMS = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False):
    """x [M,K], w [E,K,N] (or [E,N,K] with transpose_rhs) -> [M,N] in x's dtype."""
    if transpose_rhs:
        w = w.swapaxes(1, 2)
    return lax.ragged_dot(x, w, group_sizes, preferred_element_type=x.dtype)


def tgmm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M,K], dy [M,N] -> [E,K,N] = per group x_e^T dy_e, in x's dtype (fp32 accumulation)."""
    out = lax.ragged_dot_general(
        x, dy, group_sizes, _TGMM_DIMS, preferred_element_type=jax.numpy.float32
    )
    return out.astype(x.dtype)
