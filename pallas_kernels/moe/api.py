"""Grouped matmul for dropless MoE: dispatcher with a custom VJP.

Letters: M rows (token-expert assignments, sorted so that group e's rows are contiguous), K
contracting dim, N output dim, E groups (experts).

    grouped_matmul(x [M,K], w [E,K,N], group_sizes [E] int32, *, implementation="auto") -> [M,N]
    tgmm(x [M,K], dy [M,N], group_sizes [E]) -> [E,K,N]      (per group x_e^T dy_e)

Rows 0..g0-1 use w[0], the next g1 rows w[1], ...; rows past sum(group_sizes) belong to no group:
their output is zero and they get zero gradient. Empty groups are fine (their w gradient is 0).
The output has x's dtype (fp32 accumulation inside every backend).
Backward: dx = grouped_matmul(dy, w^T) (the transposed-RHS kernel), dw = tgmm(x, dy); no
gradient to group_sizes.

Implementations: "xla" (`jax.lax.ragged_dot` / `ragged_dot_general`: CPU path and fallback),
"gpu" (Mosaic GPU kernels, `gpu.py`), "tpu" (megablox, `tpu.py`), "tpu_interpret" (megablox in
Pallas interpret mode, for CPU tests), "reference" (dense loop over experts, tests only),
"padded" (batched GEMM over groups padded to a capacity that holds the largest group,
`padded.py`; a `lax.switch` over a static ladder of capacities, falling back to the
platform's kernel when the groups are too uneven for the ladder).
"auto" (`resolve_implementation`): tpu on TPU, gpu on GPU when the kernels import (16-bit
inputs; fp32 goes to xla), else xla.
`group_rows` (padded only): the expected rows per group the capacity ladder is built around
(default ceil(M / E); callers whose buffers are mostly unused tail rows pass the real load).

Int8 weights (weight-only quantisation, `pallas_kernels.quant`):

    grouped_matmul(x [M,K], q [E,K,N] int8, group_sizes [E], scale=s [E,N]) -> [M,N] x's dtype

equals grouped_matmul(x, dequantize(q, s, axis=1)) with s fp32 or bf16 (symmetric, one scale
per expert and output column). x's dtype is the compute dtype: the kernels load int8 weight
tiles, convert them to x's dtype tile by tile, accumulate in fp32 and multiply the accumulator
by the scale before the output cast (no dequantised weight is written to HBM). Backends:
"tpu" / "tpu_interpret" (`tpu_int8.py`, megablox-style Pallas TPU kernel), "gpu" /
"gpu_interpret" (`gpu_int8.py`, Pallas Triton kernel, K and N multiples of 16: JAX's Mosaic GPU
kernels take 16-bit operands only; "gpu_interpret" exists for int8 weights only), "xla" and
"padded" (the int8 -> x dtype convert is an operand of XLA's dot, for XLA to fuse), "reference".
"auto": tpu on TPU, gpu on GPU when K, N are multiples of 16, else xla; "padded" falls back to
that. The weights are frozen: the gradient flows to x only (dx = dy @ dequant(q)^T, the same
kernels with transpose_rhs dequantising each weight tile along the contraction); q and scale
get no gradient (None from `grouped_matmul_vjp`, zero cotangents under jax.grad).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.moe import gpu as _gpu
from pallas_kernels.moe import gpu_int8 as _gpu_int8
from pallas_kernels.moe import padded as _padded
from pallas_kernels.moe import reference as _reference
from pallas_kernels.moe import tpu as _tpu
from pallas_kernels.moe import tpu_int8 as _tpu_int8
from pallas_kernels.moe import xla as _xla
from pallas_kernels.platform import match_vma, on_gpu, on_tpu
from pallas_kernels.quant import check_scale, dequantize, is_int8

__all__ = [
    "IMPLEMENTATIONS",
    "grouped_matmul",
    "gpu_takes",
    "grouped_matmul_vjp",
    "resolve_implementation",
    "resolve_int8_implementation",
    "tgmm",
]

IMPLEMENTATIONS = ("auto", "xla", "gpu", "tpu", "tpu_interpret", "reference", "padded",
                   "gpu_interpret")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Padded:
    """The resolved "padded" implementation: capacities to try, then the fallback backend."""

    caps: tuple[int, ...]
    fallback: str


def gpu_takes(dtype) -> bool:
    """Whether the Mosaic GPU kernels take operands of this dtype (16-bit only: wgmma)."""
    return jnp.dtype(dtype).itemsize == 2


def resolve_implementation(implementation: str, dtype=None) -> str:
    """'auto' -> the backend for the default platform (and, given the operands' dtype, xla
    where the GPU kernels cannot take it); other names are checked and returned."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"grouped_matmul implementation must be one of {IMPLEMENTATIONS}, "
            f"got {implementation!r}"
        )
    if implementation != "auto":
        return implementation
    if on_tpu() and _tpu.AVAILABLE:
        return "tpu"
    if on_gpu() and _gpu.AVAILABLE and (dtype is None or gpu_takes(dtype)):
        return "gpu"
    return "xla"


def resolve_int8_implementation(implementation: str, k: int, n: int) -> str:
    """The backend for int8 weights [E,K,N]: 'auto' -> tpu on TPU, gpu on GPU when K and N are
    multiples of 16 (the Triton kernel's tiles), else xla; other names are checked."""
    if implementation not in IMPLEMENTATIONS:
        resolve_implementation(implementation)  # raises
    if implementation != "auto":
        return implementation
    if on_tpu() and _tpu_int8.AVAILABLE:
        return "tpu"
    if on_gpu() and _gpu_int8.AVAILABLE and _gpu_int8.supported(k, n):
        return "gpu"
    return "xla"


def _resolve(
    implementation: str, x: jax.Array, e: int, group_rows: int | None, w: jax.Array | None = None
):  # fmt: skip
    """The backend for these operands: a name, or `Padded` for "padded"."""
    quantised = w is not None and is_int8(w)

    def name(implementation):
        if quantised:
            return resolve_int8_implementation(implementation, w.shape[1], w.shape[2])
        return resolve_implementation(implementation, x.dtype)

    if implementation != "padded":
        return name(implementation)
    fallback = name("auto")
    rows = group_rows if group_rows is not None else -(-x.shape[0] // e)
    return Padded(_padded.capacities(max(1, rows)), fallback)


def _switch(impl: Padded, group_sizes, padded_fn, fallback_fn, *args):
    """Run padded_fn(c, *args) with the smallest capacity c that holds every group, else
    fallback_fn(*args); every branch is typed like its first operand inside shard_map."""
    branches = [functools.partial(padded_fn, c) for c in impl.caps] + [fallback_fn]
    branches = [lambda *a, f=f: match_vma(f(*a), a[0]) for f in branches]
    return jax.lax.switch(_padded.choose(group_sizes, impl.caps), branches, *args)


def _gmm(x, w, group_sizes, impl, transpose_rhs: bool = False, scale=None):
    # Inside shard_map a Pallas call's result may be typed as not varying over the manual axes;
    # give it x's (the custom VJPs below must return their primals' types).
    if isinstance(impl, Padded):
        return _switch(
            impl, group_sizes,
            lambda c, x, w, g, s: _padded.gmm(x, w, g, c, transpose_rhs=transpose_rhs, scale=s),
            lambda x, w, g, s: _gmm(x, w, g, impl.fallback, transpose_rhs, s),
            x, w, group_sizes, scale,
        )  # fmt: skip
    if scale is not None:
        return match_vma(_gmm_int8(x, w, scale, group_sizes, impl, transpose_rhs), x)
    return match_vma(_gmm_impl(x, w, group_sizes, impl, transpose_rhs), x)


def _gmm_int8(x, q, scale, group_sizes, impl: str, transpose_rhs: bool):
    """q int8 [E,K,N] (the forward's layout also with transpose_rhs), scale [E,N]."""
    if impl in ("gpu", "gpu_interpret"):
        return _gpu_int8.gmm(x, q, scale, group_sizes, transpose_rhs=transpose_rhs,
                             interpret=impl == "gpu_interpret")  # fmt: skip
    if impl in ("tpu", "tpu_interpret"):
        return _tpu_int8.gmm(x, q, scale, group_sizes, transpose_rhs=transpose_rhs,
                             interpret=impl == "tpu_interpret")  # fmt: skip
    if impl == "reference":
        w = dequantize(q, scale, axis=1)
        w = w.swapaxes(1, 2) if transpose_rhs else w
        return _reference.grouped_matmul_reference(x, w, group_sizes)
    return _xla.gmm(x, q, group_sizes, transpose_rhs=transpose_rhs, scale=scale)


def _float_only(impl: str) -> None:
    if impl == "gpu_interpret":
        raise ValueError(
            "implementation 'gpu_interpret' runs the int8 Triton kernel only "
            "(int8 weights with scale=); float weights take 'gpu' on a GPU"
        )


def _gmm_impl(x, w, group_sizes, impl: str, transpose_rhs: bool):
    _float_only(impl)
    if impl == "gpu":
        return _gpu.gmm(x, w, group_sizes, transpose_rhs=transpose_rhs)
    if impl in ("tpu", "tpu_interpret"):
        return _tpu.gmm(
            x, w, group_sizes, transpose_rhs=transpose_rhs, interpret=impl == "tpu_interpret"
        )
    if impl == "reference":
        w = w.swapaxes(1, 2) if transpose_rhs else w
        return _reference.grouped_matmul_reference(x, w, group_sizes)
    return _xla.gmm(x, w, group_sizes, transpose_rhs=transpose_rhs)


def _tgmm(x, dy, group_sizes, impl):
    if isinstance(impl, Padded):
        return _switch(
            impl, group_sizes, lambda c, x, dy, g: _padded.tgmm(x, dy, g, c),
            lambda x, dy, g: _tgmm(x, dy, g, impl.fallback), x, dy, group_sizes,
        )  # fmt: skip
    return match_vma(_tgmm_impl(x, dy, group_sizes, impl), x)


def _tgmm_impl(x, dy, group_sizes, impl: str):
    _float_only(impl)
    if impl == "gpu":
        return _gpu.tgmm(x, dy, group_sizes)
    if impl in ("tpu", "tpu_interpret"):
        return _tpu.tgmm(x, dy, group_sizes, interpret=impl == "tpu_interpret")
    if impl == "reference":
        return _reference.tgmm_reference(x, dy, group_sizes)
    return _xla.tgmm(x, dy, group_sizes)


def tgmm(
    x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *, implementation: str = "auto",
    group_rows: int | None = None,
) -> jax.Array:  # fmt: skip
    """x [M,K], dy [M,N], group_sizes [E] -> [E,K,N] (per group x_e^T dy_e), x's dtype."""
    impl = _resolve(implementation, x, group_sizes.shape[0], group_rows)
    return _tgmm(x, dy, group_sizes.astype(jnp.int32), impl)


def _check(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, scale: jax.Array | None = None
) -> None:  # fmt: skip
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_matmul needs x [M,K], w [E,K,N]; got {x.shape}, {w.shape}")
    if group_sizes.shape != (w.shape[0],):
        raise ValueError(f"group_sizes must be [E={w.shape[0]}], got {group_sizes.shape}")
    check_scale(w, scale, axis=1)


def grouped_matmul(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, scale: jax.Array | None = None,
    implementation: str = "auto", group_rows: int | None = None,
) -> jax.Array:  # fmt: skip
    """x [M,K], w [E,K,N], group_sizes [E] int32 -> [M,N] in x's dtype (see module doc).

    scale: for int8 w only (required then), [E,N] fp32 or bf16: the result equals
    grouped_matmul(x, dequantize(w, scale, axis=1)); differentiable in x only."""
    _check(x, w, group_sizes, scale)
    impl = _resolve(implementation, x, w.shape[0], group_rows, w)
    if scale is not None:
        x = match_vma(x, w, scale)
        q, s = match_vma(w, x), match_vma(scale, x)
        return _grouped_matmul_int8(impl, x, q, s, match_vma(group_sizes.astype("int32"), x))
    # Inside shard_map: give x and w the same varying axes, so the custom VJP's cotangents have
    # the primal types (the pcast outside transposes to the psum of dw over the data axes).
    x, w = match_vma(x, w), match_vma(w.astype(x.dtype), x)
    return _grouped_matmul(impl, x, w, match_vma(group_sizes.astype("int32"), x))


def grouped_matmul_vjp(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, dy: jax.Array, *,
    scale: jax.Array | None = None, implementation: str = "auto", group_rows: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:  # fmt: skip
    """The backward of `grouped_matmul(x, w, group_sizes)` for cotangent dy [M,N], without its
    forward: (dx [M,K] in x's dtype, dw [E,K,N] in w's dtype). For fused custom VJPs.

    With int8 w and scale [E,N]: (dx, None), the weights being frozen."""
    _check(x, w, group_sizes, scale)
    impl = _resolve(implementation, x, w.shape[0], group_rows, w)
    if scale is not None:
        x = match_vma(x, w, scale)
        q, s = match_vma(w, x), match_vma(scale, x)
        gs = match_vma(group_sizes.astype("int32"), x)
        return _gmm(dy.astype(x.dtype), q, gs, impl, transpose_rhs=True, scale=s), None
    x, wc = match_vma(x, w), match_vma(w.astype(x.dtype), x)
    dx, dw, _ = _bwd(impl, (x, wc, match_vma(group_sizes.astype("int32"), x)), dy)
    return dx, dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grouped_matmul(impl, x, w, group_sizes):
    return _gmm(x, w, group_sizes, impl)


def _fwd(impl, x, w, group_sizes):
    return _gmm(x, w, group_sizes, impl), (x, w, group_sizes)


def _bwd(impl, res, dy):
    x, w, group_sizes = res
    dy = dy.astype(x.dtype)
    dx = _gmm(dy, w, group_sizes, impl, transpose_rhs=True)
    dw = _tgmm(x, dy, group_sizes, impl).astype(w.dtype)
    return dx, dw, None


_grouped_matmul.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grouped_matmul_int8(impl, x, q, scale, group_sizes):
    return _gmm(x, q, group_sizes, impl, scale=scale)


def _fwd_int8(impl, x, q, scale, group_sizes):
    return _gmm(x, q, group_sizes, impl, scale=scale), (q, scale, group_sizes)


def _bwd_int8(impl, res, dy):
    # Frozen int8 weights: only x gets a gradient (None: zero cotangents for q and scale).
    q, scale, group_sizes = res
    dx = _gmm(dy, q, group_sizes, impl, transpose_rhs=True, scale=scale)
    return dx, None, None, None


_grouped_matmul_int8.defvjp(_fwd_int8, _bwd_int8)
