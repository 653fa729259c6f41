"""Grouped matmuls as batched GEMMs over capacity-padded groups (XLA dot_general; cuBLAS on GPU).

Group e's rows are gathered into row block e of an [E, C, K] operand (zeros after the group),
one batched matmul runs, and the result rows are gathered back into the sorted layout. Exact
(no token is dropped) as long as C >= the largest group: C is static, so the dispatcher in
`api.py` picks the smallest capacity of a static ladder (`capacities`) that holds the largest
group with a `lax.switch`, and falls back to the grouped-matmul kernel when none does.

Why: the Mosaic GPU grouped kernel computes cdiv(M, 128) + E - 1 row tiles whatever the group
sizes (a group of ~256 rows straddles up to 3 tiles), and its weight gradient runs a short K
loop per output tile; at a few thousand tokens per layer a batched GEMM over groups padded to
the largest one does less work (experiments/RESULTS.md). Letters as in `api.py`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Capacities as multiples of the expected group size ceil(M / E) (or a caller's hint), each
# rounded up to MULTIPLE rows. Balanced routing at 4K tokens and 32 experts puts the largest
# group ~1.1x the mean; past 2x the grouped kernel is the better deal.
LADDER = (1.0, 1.03125, 1.0625, 1.09375, 1.125, 1.15625, 1.1875, 1.21875, 1.25, 1.375, 1.5, 1.75,
          2.0)  # fmt: skip
MULTIPLE = 32
# The Mosaic GPU grouped kernel computes cdiv(A, 128) + E - 1 row tiles of 128 rows at about
# this fraction of a dense matmul's speed per tile (0.83-0.85 at 64K tokens; see
# experiments/RESULTS.md).
GPU_TILE = 128
GPU_TILE_EFFICIENCY = 0.85


def capacities(expected: int, *, ladder=LADDER, multiple: int = MULTIPLE) -> tuple[int, ...]:
    """Static capacities (rows per group) for an expected group size, smallest first."""
    if expected < 1:
        raise ValueError(f"expected rows per group must be >= 1, got {expected}")
    return tuple(sorted({-(-math.ceil(expected * r) // multiple) * multiple for r in ladder}))


def break_even(caps: tuple[int, ...], rows: int, e: int) -> tuple[int, ...]:
    """The capacities whose padded work (E*C rows of dense-speed GEMM) beats the Mosaic GPU
    grouped kernel's on `rows` used rows (always keeps the smallest)."""
    tiles = -(-rows // GPU_TILE) + e - 1
    limit = tiles * GPU_TILE / (GPU_TILE_EFFICIENCY * e)
    return tuple(c for i, c in enumerate(caps) if i == 0 or c <= limit)


def choose(group_sizes: jax.Array, caps: tuple[int, ...]) -> jax.Array:
    """Index of the smallest capacity >= the largest group; len(caps) when none holds it."""
    big = jnp.max(group_sizes)
    return jnp.searchsorted(jnp.asarray(caps, big.dtype), big, side="left").astype(jnp.int32)


def _starts(group_sizes: jax.Array) -> jax.Array:
    return jnp.cumsum(group_sizes) - group_sizes


def to_padded(x: jax.Array, group_sizes: jax.Array, c: int) -> jax.Array:
    """Sorted rows x [M,K] -> [E,C,K]: block e holds group e's rows, then zeros (needs C >= max
    group size; rows past C would be lost)."""
    m = x.shape[0]
    r = jnp.arange(c, dtype=group_sizes.dtype)
    src = _starts(group_sizes)[:, None] + r[None]  # [E,C]
    valid = r[None] < group_sizes[:, None]
    rows = jnp.take(x, jnp.clip(src, 0, m - 1).reshape(-1), axis=0).reshape(*src.shape, -1)
    return jnp.where(valid[..., None], rows, jnp.zeros((), x.dtype))


def from_padded(y: jax.Array, group_sizes: jax.Array, m: int) -> jax.Array:
    """[E,C,N] -> sorted rows [M,N] (the inverse of `to_padded`); rows past sum(group_sizes)
    are zero."""
    e, c, n = y.shape
    a = jnp.arange(m, dtype=group_sizes.dtype)
    group = jnp.searchsorted(jnp.cumsum(group_sizes), a, side="right")  # E past the end
    inside = group < e
    g = jnp.minimum(group, e - 1)
    slot = g * c + jnp.clip(a - _starts(group_sizes)[g], 0, c - 1)
    rows = jnp.take(y.reshape(e * c, n), slot, axis=0)
    return jnp.where(inside[:, None], rows, jnp.zeros((), y.dtype))


def gmm(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, c: int, *, transpose_rhs: bool = False,
    scale: jax.Array | None = None,
) -> jax.Array:  # fmt: skip
    """x [M,K], w [E,K,N] (or [E,N,K] with transpose_rhs) -> [M,N] in x's dtype, with every group
    padded to C rows (C >= the largest group).

    scale: for int8 w, [E, w.shape[2]] (w's last axis). The int8 -> x dtype convert sits in the
    einsum's operand for XLA to fuse into the batched GEMM; the scale multiplies the fp32
    [E,C,N] result (forward) or, with transpose_rhs (scale along the contraction), the padded
    rows of x."""
    spec = "eck,enk->ecn" if transpose_rhs else "eck,ekn->ecn"
    xp = to_padded(x, group_sizes, c)
    if scale is None:
        # In x's dtype: XLA's 16-bit GEMMs accumulate in fp32 and round once on store.
        y = jnp.einsum(spec, xp, w.astype(x.dtype))
    elif transpose_rhs:
        xs = (xp.astype(jnp.float32) * scale.astype(jnp.float32)[:, None, :]).astype(x.dtype)
        y = jnp.einsum(spec, xs, w.astype(x.dtype))
    else:
        y = jnp.einsum(spec, xp, w.astype(x.dtype), preferred_element_type=jnp.float32)
        y = (y * scale.astype(jnp.float32)[:, None, :]).astype(x.dtype)
    return from_padded(y, group_sizes, x.shape[0])


def tgmm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, c: int) -> jax.Array:
    """x [M,K], dy [M,N] -> [E,K,N] = per group x_e^T dy_e in x's dtype (empty groups give 0)."""
    xp = to_padded(x, group_sizes, c)
    dp = to_padded(dy.astype(x.dtype), group_sizes, c)
    return jnp.einsum("eck,ecn->ekn", xp, dp)
