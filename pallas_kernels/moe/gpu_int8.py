"""Int8-weight grouped matmul for NVIDIA GPUs: a Pallas (Triton backend) kernel.

    gmm(x [M,K], q [E,K,N] int8, scale [E,N], group_sizes [E]) -> [M,N] in x's dtype
    gmm(x [M,K], q [E,N,K] int8, scale [E,K], group_sizes, transpose_rhs=True) -> [M,N]

JAX's Mosaic GPU grouped kernels (`gpu.py`) take 16-bit operands only, so int8 weights run
here. Grid ((group, row tile) visits, N tiles), scheduled by `tiles.schedule`: program (v, j)
walks K in [bk] steps, loading a [bm,bk] tile of x and the visited group's int8 [bk,bn] weight
tile, converting the weight tile to x's dtype in registers and accumulating x @ w in fp32.
Forward: the scale is per output column, so the accumulator is multiplied by the group's
[bn] scale once, then cast and stored with a row mask (only the group's rows of the tile; other
groups' programs store the other rows). transpose_rhs (dx = dy @ dequant(w)^T, the scale runs
along the contraction): each [bn,bk] weight tile is dequantised in registers (int8 -> fp32
times the group's [bk] scale, then x's dtype) before its dot. The weight stays int8 in HBM.
Rows past sum(group_sizes) are zeroed afterwards (`mask_rows`).

Shapes: K and N multiples of 16 (`supported`; Triton tiles are powers of two of at least 16);
x is padded to a multiple of bm rows; tiles narrow (down to 16) to divide K and N. Runs in
Pallas interpret mode on CPU (tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.moe.padding import mask_rows, pad_to
from pallas_kernels.moe.tiles import num_visits, schedule

try:  # pure Python: importable on CPU too (interpret mode)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed JAX
    AVAILABLE = False


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile of one program ([block_m, block_n] of the output), its K step (powers of two, at
    least 16), Triton warps and pipeline stages."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"BlockSizes.{f.name} must be a positive int, got {v!r}")
            if f.name != "num_stages" and v & (v - 1):
                raise ValueError(f"BlockSizes.{f.name} must be a power of two, got {v!r}")
        if min(self.block_m, self.block_n, self.block_k) < 16:
            raise ValueError(f"BlockSizes need tiles of at least 16: {self}")


# Measured on an H100 (bf16 x, balanced groups; a sweep of 8 configs): 128x128x64 ran
# 8192x2048x4096 / 32 groups at 309 TFLOP/s (JAX's bf16 Mosaic kernel: 287); with 64-row
# groups (2048x6144x9216 / 32) 64-row tiles won (270 vs 212 TFLOP/s): `pick_blocks`.
BLOCKS = BlockSizes()
SMALL_GROUP_BLOCKS = BlockSizes(block_m=64, num_stages=4)


def pick_blocks(m: int, e: int) -> BlockSizes:
    """Default tiles for M rows over E groups: 64-row tiles when the mean group is under 128
    rows (a 128-row tile would mostly straddle groups and be visited twice)."""
    return SMALL_GROUP_BLOCKS if m < 128 * e else BLOCKS


def supported(k: int, n: int) -> bool:
    """Whether the kernel tiles a weight with contraction K and output N (multiples of 16)."""
    return k % 16 == 0 and n % 16 == 0


def _fit(dim: int, cap: int) -> int:
    b = cap
    while b > 16 and dim % b:
        b //= 2
    return b


def _kernel(
    vgroup, vtile, starts, ends, count, x_ref, q_ref, s_ref, o_ref,
    *, bm: int, bn: int, bk: int, k_steps: int, transpose_rhs: bool,
):  # fmt: skip
    v, j = pl.program_id(0), pl.program_id(1)

    @pl.when(v < count[0])
    def _():
        g, t = vgroup[v], vtile[v]
        rows = pl.ds(pl.multiple_of(t * bm, bm), bm)
        cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

        def body(i, acc):
            ks = pl.ds(pl.multiple_of(i * bk, bk), bk)
            xv = x_ref[rows, ks]
            if transpose_rhs:  # [bn, bk] tile, dequantised along the contraction
                w = q_ref[g, cols, ks].astype(jnp.float32) * s_ref[g, ks].astype(jnp.float32)
                w = w.astype(xv.dtype).T
            else:
                w = q_ref[g, ks, cols].astype(xv.dtype)
            return acc + jnp.dot(xv, w, preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, k_steps, body, jnp.zeros((bm, bn), jnp.float32))
        if not transpose_rhs:
            acc = acc * s_ref[g, cols].astype(jnp.float32)[None, :]
        r = t * bm + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
        mine = jnp.logical_and(r >= starts[g], r < ends[g])
        pltriton.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=mine)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "blocks", "interpret"))
def gmm(
    x, q, scale, group_sizes, *, transpose_rhs: bool = False, blocks: BlockSizes | None = None,
    interpret: bool = False,
):  # fmt: skip
    """x [M,K], q int8 [E,K,N] (or [E,N,K] with transpose_rhs), scale [E,N] (or [E,K]: q's
    last axis either way) -> [M,N] in x's dtype (see the module docstring).

    blocks: None takes `pick_blocks(M, E)`."""
    if not AVAILABLE:
        raise RuntimeError("this JAX has no Pallas Triton backend")
    m, k = x.shape
    e = q.shape[0]
    blocks = blocks or pick_blocks(m, e)
    n = q.shape[1] if transpose_rhs else q.shape[2]
    if not supported(k, n):
        raise ValueError(f"the int8 grouped-matmul kernel needs K, N multiples of 16: {k}, {n}")
    if m == 0:
        return jnp.zeros((0, n), x.dtype)
    bm, bn, bk = blocks.block_m, _fit(n, blocks.block_n), _fit(k, blocks.block_k)
    xp = pad_to(x, 0, bm)
    tiles = xp.shape[0] // bm
    vgroup, vtile, starts, ends, count = schedule(group_sizes, tiles, bm)
    kern = functools.partial(
        _kernel, bm=bm, bn=bn, bk=bk, k_steps=k // bk, transpose_rhs=transpose_rhs
    )
    whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)  # noqa: E731
    args = (vgroup, vtile, starts, ends, count, xp, q, scale)
    y = pl.pallas_call(
        kern,
        grid=(num_visits(tiles, e), n // bn),
        in_specs=[whole(a) for a in args],
        out_specs=whole(jax.ShapeDtypeStruct((xp.shape[0], n), x.dtype)),
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], n), x.dtype),
        compiler_params=pltriton.CompilerParams(
            num_warps=blocks.num_warps, num_stages=blocks.num_stages
        ),
        interpret=interpret,
        name="gmm_int8",
    )(*args)
    return mask_rows(y[:m], group_sizes)
