"""Gathered matvec on NVIDIA GPUs: a Pallas (Triton backend) split-K kernel.

A decode step at batch 1 multiplies one activation row by each weight; the time is the weight
read. XLA:GPU compiles a 1-row dot as an elementwise multiply + reduce that materialises a
weight-sized product, and a gathered expert weight (`jnp.take(w, experts)`) as a copy followed
by a GEMM: both move the weight bytes two or three times (experiments/RESULTS.md).
This kernel streams `w[index[a]]` from HBM exactly once:

* grid (A, N / BN, S): program (a, j, s) owns output columns j*BN.. of row a and the s-th of S
  equal slices of K; it walks its slice in [BK, BN] tiles of the selected expert (a dynamic
  leading index read from `index`), accumulating x[k] * w[k, n] in fp32 registers;
* S (split-K) is chosen so that the grid has a few programs per SM: one row of a 2048-wide
  projection has only N / BN = 8-24 column tiles, far too few to keep HBM busy;
* the S partial rows [S, A, N] fp32 are summed by XLA (a few KB).

Shapes: x [A,K] (any float dtype), w [E,K,N] (any float dtype, or int8 with scale [E,N]: each
int8 tile is converted to fp32 in registers and each program's fp32 partial row is multiplied
by the expert's [BN] scale before its store), index [A] int32 in [0, E); returns [A,N] fp32.
N must be a multiple of 16 and K of 16 (`supported`); callers fall back to
`reference.gathered_matvec_reference` otherwise.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

try:  # pure Python: importable on CPU too (interpret mode)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed JAX
    AVAILABLE = False

_TARGET_PROGRAMS = 512  # ~4 per SM on an H100/H200 (132 SMs)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile of one program step ([block_k, block_n] of the weight) and the split of K."""

    block_k: int
    block_n: int
    splits: int
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"BlockSizes.{f.name} must be a positive int, got {v!r}")
        for name in ("block_k", "block_n", "num_warps"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two, got {v}")


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = cap
    while b > 1 and n % b:
        b //= 2
    return b


def supported(k: int, n: int) -> bool:
    return k % 16 == 0 and n % 16 == 0


def pick_blocks(
    a: int, k: int, n: int, *, target_programs: int = _TARGET_PROGRAMS, block_k: int = 128,
    block_n: int = 128, num_warps: int = 4, num_stages: int = 1,
) -> BlockSizes:  # fmt: skip
    """Tiles for x [a,k] @ w [.,k,n]: the widest column tile up to block_n, K steps of up to
    block_k rows, and the divisor of K's step count that brings the grid closest to
    `target_programs`. Defaults: the best of a sweep on the benchmark model's decode shapes
    (H200, experiments/results/bench_matvec.jsonl; [128,128] tiles were ~20%
    faster than [32,256] ones on average, with run-to-run noise of the same order)."""
    if not supported(k, n):
        raise ValueError(f"gathered_matvec kernel needs K and N multiples of 16, got {k}, {n}")
    block_n = _largest_pow2_divisor(n, block_n)
    block_k = _largest_pow2_divisor(k, block_k)
    steps = k // block_k
    base = a * (n // block_n)
    divisors = [s for s in range(1, steps + 1) if steps % s == 0]
    splits = min(divisors, key=lambda s: (abs(base * s - target_programs), s))
    return BlockSizes(block_k, block_n, splits, num_warps, num_stages)


def _kernel(index_ref, x_ref, w_ref, *refs, block_k: int, block_n: int, steps: int):
    s_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
    a, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = index_ref[a]
    cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)

    def body(i, acc):
        k0 = pl.multiple_of((s * steps + i) * block_k, block_k)
        xv = x_ref[a, pl.ds(k0, block_k)].astype(jnp.float32)
        wv = w_ref[e, pl.ds(k0, block_k), cols].astype(jnp.float32)
        return acc + jnp.sum(xv[:, None] * wv, axis=0)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_n,), jnp.float32))
    if s_ref is not None:  # int8 weights: the per-column scale of expert e
        acc = acc * s_ref[e, cols].astype(jnp.float32)
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("blocks", "interpret"))
def gathered_matvec_gpu(
    x: jax.Array,
    w: jax.Array,
    index: jax.Array,
    scale: jax.Array | None = None,
    *,
    blocks: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """x [A,K], w [E,K,N], index [A] int32 -> [A,N] fp32 (see the module docstring).

    scale: [E,N] for int8 w (the result rows are scaled per expert and column), else None."""
    a, k = x.shape
    e, k2, n = w.shape
    if k2 != k or index.shape != (a,):
        raise ValueError(f"gathered_matvec needs x [A,K], w [E,K,N], index [A]; got "
                         f"{x.shape}, {w.shape}, {index.shape}")  # fmt: skip
    blocks = blocks or pick_blocks(a, k, n)
    steps_total = k // blocks.block_k
    if k % blocks.block_k or n % blocks.block_n or steps_total % blocks.splits:
        raise ValueError(f"{blocks} do not tile K={k}, N={n}")
    kern = functools.partial(
        _kernel, block_k=blocks.block_k, block_n=blocks.block_n,
        steps=steps_total // blocks.splits,
    )  # fmt: skip
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))  # noqa: E731
    args = (index.astype(jnp.int32), x, w) + (() if scale is None else (scale,))
    parts = pl.pallas_call(
        kern,
        grid=(a, n // blocks.block_n, blocks.splits),
        in_specs=[whole(arg.shape) for arg in args],
        out_specs=pl.BlockSpec((None, None, blocks.block_n), lambda ai, j, s: (s, ai, j)),
        out_shape=jax.ShapeDtypeStruct((blocks.splits, a, n), jnp.float32),
        compiler_params=pltriton.CompilerParams(
            num_warps=blocks.num_warps, num_stages=blocks.num_stages
        ),
        interpret=interpret,
        name="gathered_matvec",
    )(*args)
    return jnp.sum(parts, axis=0)
