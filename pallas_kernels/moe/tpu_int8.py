"""Int8-weight grouped matmul for TPU (Pallas Mosaic TPU, megablox-style; interpret mode on CPU).

    gmm(x [M,K], q [E,K,N] int8, scale [E,N], group_sizes [E]) -> [M,N] in x's dtype
    gmm(x [M,K], q [E,N,K] int8, scale [E,K], group_sizes, transpose_rhs=True) -> [M,N]

The weight stays int8 in HBM. Grid (N tiles, (group, row tile) visits, K tiles), scheduled by
`tiles.schedule` through scalar prefetch: each step loads a [tm,tk] tile of x and the visited
group's int8 [tk,tn] weight tile, converts the weight tile to x's dtype in VMEM and accumulates
x @ w in an fp32 scratch. Forward: the scale is per output column, so the fp32 accumulator is
multiplied by the group's [1,tn] scale once, after the last K step, then cast and stored into
the group's rows of the tile (a select keeps the rows other groups wrote). transpose_rhs (the
input gradient dx = dy @ dequant(w)^T, where the scale runs along the contraction): each
[tn,tk] weight tile is dequantised in VMEM (int8 -> fp32 times the group's [1,tk] scale, then
x's dtype) before its dot. Rows past sum(group_sizes) are zeroed afterwards (`mask_rows`).

Tiles: tm 128 rows (x is padded to a multiple), tk and tn the largest of 512/256/128 dividing
K and N, else the whole dimension (the weight is never padded: that would copy it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.moe.padding import mask_rows, pad_to
from pallas_kernels.moe.tiles import num_visits, pick_tile, schedule

try:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed JAX
    AVAILABLE = False

TM = 128
TILE_CHOICES = (512, 256, 128)


def _kernel(
    vgroup, vtile, starts, ends, count, x_ref, q_ref, s_ref, o_ref, acc_ref,
    *, tm: int, k_steps: int, transpose_rhs: bool,
):  # fmt: skip
    v, k_i = pl.program_id(1), pl.program_id(2)
    active = v < count[0]

    @pl.when(k_i == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active)
    def _accumulate():
        xv = x_ref[...]
        if transpose_rhs:  # q tile [tn, tk]: dequantise along the contraction
            w = (q_ref[...].astype(jnp.float32) * s_ref[...].astype(jnp.float32)).astype(xv.dtype)
            dims = (((1,), (1,)), ((), ()))
        else:  # q tile [tk, tn]: int8 -> compute dtype (exact); scale after the K loop
            w = q_ref[...].astype(xv.dtype)
            dims = (((1,), (0,)), ((), ()))
        acc_ref[...] += lax.dot_general(xv, w, dims, preferred_element_type=jnp.float32)

    @pl.when(jnp.logical_and(active, k_i == k_steps - 1))
    def _store():
        y = acc_ref[...]
        if not transpose_rhs:
            y = y * s_ref[...].astype(jnp.float32)
        g = vgroup[v]
        rows = vtile[v] * tm + lax.broadcasted_iota(jnp.int32, y.shape, 0)
        mine = jnp.logical_and(rows >= starts[g], rows < ends[g])
        o_ref[...] = jnp.where(mine, y.astype(o_ref.dtype), o_ref[...])


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "interpret"))
def gmm(x, q, scale, group_sizes, *, transpose_rhs: bool = False, interpret: bool = False):
    """x [M,K], q int8 [E,K,N] (or [E,N,K] with transpose_rhs), scale [E,N] (or [E,K]: q's
    last axis either way) -> [M,N] in x's dtype (see the module docstring)."""
    if not AVAILABLE:
        raise RuntimeError("this JAX has no Pallas TPU")
    m, k = x.shape
    e = q.shape[0]
    n = q.shape[1] if transpose_rhs else q.shape[2]
    if m == 0:
        return jnp.zeros((0, n), x.dtype)
    tm = TM if m >= TM else -(-m // 16) * 16
    tk, tn = pick_tile(k, TILE_CHOICES), pick_tile(n, TILE_CHOICES)
    xp = pad_to(x, 0, tm)
    tiles = xp.shape[0] // tm
    vgroup, vtile, starts, ends, count = schedule(group_sizes, tiles, tm)
    s3 = scale.reshape(e, 1, scale.shape[-1])

    if transpose_rhs:
        q_spec = pl.BlockSpec((None, tn, tk), lambda j, v, kk, g, t, *_: (g[v], j, kk))
        s_spec = pl.BlockSpec((None, 1, tk), lambda j, v, kk, g, t, *_: (g[v], 0, kk))
    else:
        q_spec = pl.BlockSpec((None, tk, tn), lambda j, v, kk, g, t, *_: (g[v], kk, j))
        s_spec = pl.BlockSpec((None, 1, tn), lambda j, v, kk, g, t, *_: (g[v], 0, j))
    x_spec = pl.BlockSpec((tm, tk), lambda j, v, kk, g, t, *_: (t[v], kk))
    o_spec = pl.BlockSpec((tm, tn), lambda j, v, kk, g, t, *_: (t[v], j))
    kern = functools.partial(_kernel, tm=tm, k_steps=k // tk, transpose_rhs=transpose_rhs)
    y = pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], n), x.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(n // tn, num_visits(tiles, e), k // tk),
            in_specs=[x_spec, q_spec, s_spec],
            out_specs=o_spec,
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="gmm_int8",
    )(vgroup, vtile, starts, ends, count, xp, q, s3)
    return mask_rows(y[:m], group_sizes)
