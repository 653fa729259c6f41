"""Grouped matmuls on NVIDIA Hopper: JAX's Mosaic GPU kernels, with padding and masking around them.

Wraps `jax.experimental.pallas.ops.gpu.ragged_dot_mgpu.ragged_dot` (forward and, with
`transpose_rhs`, the input gradient) and `transposed_ragged_dot_mgpu.transposed_ragged_dot` (the
weight gradient). Those kernels need K (and N) to be multiples of their blocks and leave rows that
belong to no group unwritten; this module pads with zeros and masks so that the contract of
`api.grouped_matmul` holds for any M, K, N and empty groups. Letters as in `api.py`.
Imports are guarded: `AVAILABLE` is False when the installed JAX lacks the kernels.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp

from pallas_kernels.moe.padding import mask_rows, pad_to

try:  # present in JAX >= 0.6 as example kernels; their signatures move between versions
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as _rd
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as _trd

    AVAILABLE = True
    _HAS_TRANSPOSE_RHS = "transpose_rhs" in inspect.signature(_rd.ragged_dot).parameters
except ImportError:  # pragma: no cover - depends on the installed JAX
    _rd = _trd = None
    AVAILABLE = False
    _HAS_TRANSPOSE_RHS = False


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of one Mosaic GPU grouped matmul (block_k also pads the ragged dim of tgmm)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    max_concurrent_steps: int = 4
    grid_block_n: int = 4

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"BlockSizes.{f.name} must be a positive int, got {v!r}")
        if self.block_k % 16 or self.block_n % 8 or self.block_m % 64:
            raise ValueError(f"BlockSizes need block_m % 64 == block_k % 16 == block_n % 8: {self}")


# Best measured config for 32768x2048x4096 bf16 on H200; tgmm: a safe default.
GMM_BLOCKS = BlockSizes()
TGMM_BLOCKS = BlockSizes(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
                         grid_block_n=1)  # fmt: skip


def fit_blocks(blocks: BlockSizes, n: int) -> BlockSizes:
    """blocks with grid_block_n lowered to the largest value that divides N's block count.

    The kernels need N to be a multiple of block_n * grid_block_n; padding the weights up to it
    copies the whole [E,K,N] weight on every call (e.g. 2816 -> 3072 columns, measured at ~100 MB
    per layer and decode step), while a smaller grid_block_n (a tile-order swizzle) only changes
    which tiles run together.
    """
    tiles = -(-n // blocks.block_n)
    g = blocks.grid_block_n
    while tiles % g:
        g -= 1
    return blocks if g == blocks.grid_block_n else dataclasses.replace(blocks, grid_block_n=g)


def gmm(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    blocks: BlockSizes | None = None,
) -> jax.Array:
    """x [M,K], w [E,K,N] (or [E,N,K] with transpose_rhs) -> [M,N] in x's dtype.

    blocks: None reads the module default `GMM_BLOCKS` at trace time (benchmarks may set it).
    """
    blocks = blocks or GMM_BLOCKS
    if not AVAILABLE:
        raise RuntimeError("this JAX has no jax.experimental.pallas.ops.gpu.ragged_dot_mgpu")
    if transpose_rhs and not _HAS_TRANSPOSE_RHS:
        w, transpose_rhs = w.swapaxes(1, 2), False  # older kernels: materialise w^T
    w = w.astype(x.dtype)
    m, n = x.shape[0], (w.shape[1] if transpose_rhs else w.shape[2])
    blocks = fit_blocks(blocks, n)
    k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
    xp = pad_to(pad_to(x, 1, blocks.block_k), 0, blocks.block_m)
    wp = pad_to(pad_to(w, k_axis, blocks.block_k), n_axis, blocks.block_n * blocks.grid_block_n)
    kwargs = _kernel_args(blocks, group_sizes)
    if transpose_rhs:
        kwargs["transpose_rhs"] = True
    y = _rd.ragged_dot(xp, wp, **kwargs)
    return mask_rows(y[:m, :n], group_sizes)


def _kernel_args(blocks: BlockSizes, group_sizes: jax.Array) -> dict:
    """The Mosaic ragged-dot kernels' keyword arguments: group sizes and block shape."""
    return dict(
        group_sizes=group_sizes.astype(jnp.int32),
        block_m=blocks.block_m,
        block_n=blocks.block_n,
        block_k=blocks.block_k,
        max_concurrent_steps=blocks.max_concurrent_steps,
        grid_block_n=blocks.grid_block_n,
    )


def tgmm(
    x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *, blocks: BlockSizes | None = None
) -> jax.Array:
    """x [M,K], dy [M,N] -> [E,K,N] = per group x_e^T dy_e in x's dtype; empty groups give 0."""
    blocks = blocks or TGMM_BLOCKS
    if not AVAILABLE:
        raise RuntimeError("this JAX has no transposed_ragged_dot_mgpu")
    k, n = x.shape[1], dy.shape[1]
    blocks = fit_blocks(blocks, n)
    # Rows past sum(group_sizes) may hold anything: zero them so padding blocks add nothing.
    xp = pad_to(pad_to(mask_rows(x, group_sizes), 0, blocks.block_k), 1, blocks.block_m)
    dyp = pad_to(pad_to(mask_rows(dy.astype(x.dtype), group_sizes), 0, blocks.block_k),
                  1, blocks.block_n * blocks.grid_block_n)  # fmt: skip
    out = _trd.transposed_ragged_dot(xp, dyp, **_kernel_args(blocks, group_sizes))[:, :k, :n]
    # No masking pass for empty groups: the kernel stores every group's tiles, and an empty
    # group's accumulator stays at its zero initialisation (its K loop is skipped). A
    # jnp.where here cost a read and a write of the whole [E,K,N] gradient (~7 ms of a 32 ms
    # forward+backward at 4K tokens, experiments/RESULTS.md); tests check the zeros.
    return out
