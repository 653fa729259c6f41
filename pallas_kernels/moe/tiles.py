"""Row-tile / group schedule shared by the int8 grouped-matmul kernels (`tpu_int8`, `gpu_int8`).

Rows are sorted by group and cut into row tiles of `tm`. A tile that straddles a group border
is visited once per group it holds rows of; every visit multiplies the whole tile by that
group's weight and stores only the group's rows. `schedule` lists the (group, tile) visits in
order (group-major, so tiles never decrease: a TPU output block stays resident while the groups
of its tile are visited one after the other). There are at most T + E - 1 visits for T tiles
and E groups; that static count is the kernels' grid, and the visits past the real number
repeat the last real one and are skipped in the kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_visits(tiles: int, groups: int) -> int:
    """The static bound on (group, tile) visits: every tile once plus one per group border."""
    return tiles + groups - 1


def schedule(group_sizes: jax.Array, tiles: int, tm: int):
    """group_sizes [E] int32 -> (visit_group [V], visit_tile [V], starts [E], ends [E],
    count [1]), all int32, V = num_visits(tiles, E). Groups must fit in tiles * tm rows."""
    gs = group_sizes.astype(jnp.int32)
    e = gs.shape[0]
    ends = jnp.cumsum(gs)
    starts = ends - gs
    first = starts // tm
    last = jnp.maximum(ends - 1, 0) // tm
    per_group = jnp.where(gs > 0, last - first + 1, 0)
    bounds = jnp.cumsum(per_group)  # visits of groups 0..g
    count = bounds[-1]
    v = num_visits(tiles, e)
    # Past the real visits: repeat the last one (no new block loads; skipped in the kernel).
    idx = jnp.minimum(jnp.arange(v, dtype=jnp.int32), jnp.maximum(count - 1, 0))
    group = jnp.minimum(jnp.searchsorted(bounds, idx, side="right"), e - 1).astype(jnp.int32)
    tile = first[group] + idx - (bounds[group] - per_group[group])
    tile = jnp.clip(tile, 0, tiles - 1).astype(jnp.int32)
    return group, tile, starts, ends, count.reshape(1).astype(jnp.int32)


def pick_tile(dim: int, choices: tuple[int, ...]) -> int:
    """The largest of `choices` that divides dim, else dim itself (one whole block)."""
    for c in choices:
        if c <= dim and dim % c == 0:
            return c
    return dim
