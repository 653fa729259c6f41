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
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.moe import gpu as _gpu
from pallas_kernels.moe import padded as _padded
from pallas_kernels.moe import reference as _reference
from pallas_kernels.moe import tpu as _tpu
from pallas_kernels.moe import xla as _xla
from pallas_kernels.platform import match_vma, on_gpu, on_tpu

__all__ = [
    "IMPLEMENTATIONS",
    "grouped_matmul",
    "gpu_takes",
    "grouped_matmul_vjp",
    "resolve_implementation",
    "tgmm",
]

IMPLEMENTATIONS = ("auto", "xla", "gpu", "tpu", "tpu_interpret", "reference", "padded")


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


def _resolve(implementation: str, x: jax.Array, e: int, group_rows: int | None):
    """The backend for these operands: a name, or `Padded` for "padded"."""
    if implementation != "padded":
        return resolve_implementation(implementation, x.dtype)
    fallback = resolve_implementation("auto", x.dtype)
    rows = group_rows if group_rows is not None else -(-x.shape[0] // e)
    return Padded(_padded.capacities(max(1, rows)), fallback)


def _switch(impl: Padded, group_sizes, padded_fn, fallback_fn, *args):
    """Run padded_fn(c, *args) with the smallest capacity c that holds every group, else
    fallback_fn(*args); every branch is typed like its first operand inside shard_map."""
    branches = [functools.partial(padded_fn, c) for c in impl.caps] + [fallback_fn]
    branches = [lambda *a, f=f: match_vma(f(*a), a[0]) for f in branches]
    return jax.lax.switch(_padded.choose(group_sizes, impl.caps), branches, *args)


def _gmm(x, w, group_sizes, impl, transpose_rhs: bool = False):
    # Inside shard_map a Pallas call's result may be typed as not varying over the manual axes;
    # give it x's (the custom VJPs below must return their primals' types).
    if isinstance(impl, Padded):
        return _switch(
            impl, group_sizes,
            lambda c, x, w, g: _padded.gmm(x, w, g, c, transpose_rhs=transpose_rhs),
            lambda x, w, g: _gmm(x, w, g, impl.fallback, transpose_rhs),
            x, w, group_sizes,
        )  # fmt: skip
    return match_vma(_gmm_impl(x, w, group_sizes, impl, transpose_rhs), x)


def _gmm_impl(x, w, group_sizes, impl: str, transpose_rhs: bool):
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


def _check(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> None:
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_matmul needs x [M,K], w [E,K,N]; got {x.shape}, {w.shape}")
    if group_sizes.shape != (w.shape[0],):
        raise ValueError(f"group_sizes must be [E={w.shape[0]}], got {group_sizes.shape}")


def grouped_matmul(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, implementation: str = "auto",
    group_rows: int | None = None,
) -> jax.Array:  # fmt: skip
    """x [M,K], w [E,K,N], group_sizes [E] int32 -> [M,N] in x's dtype (see module doc)."""
    _check(x, w, group_sizes)
    impl = _resolve(implementation, x, w.shape[0], group_rows)
    # Inside shard_map: give x and w the same varying axes, so the custom VJP's cotangents have
    # the primal types (the pcast outside transposes to the psum of dw over the data axes).
    x, w = match_vma(x, w), match_vma(w.astype(x.dtype), x)
    return _grouped_matmul(impl, x, w, match_vma(group_sizes.astype("int32"), x))


def grouped_matmul_vjp(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, dy: jax.Array, *,
    implementation: str = "auto", group_rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """The backward of `grouped_matmul(x, w, group_sizes)` for cotangent dy [M,N], without its
    forward: (dx [M,K] in x's dtype, dw [E,K,N] in w's dtype). For fused custom VJPs."""
    _check(x, w, group_sizes)
    impl = _resolve(implementation, x, w.shape[0], group_rows)
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
