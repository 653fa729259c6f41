"""Grouped matmuls on TPU: megablox `gmm` / `tgmm` (Pallas Mosaic TPU), runnable in interpret mode.

Megablox handles any M and empty groups; K and N are padded here to the 128 tiles. Rows past
sum(group_sizes) are masked to zero to keep the `api.grouped_matmul` contract.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.moe.padding import mask_rows, pad_to

try:
    from jax.experimental.pallas.ops.tpu.megablox.gmm import gmm as _gmm
    from jax.experimental.pallas.ops.tpu.megablox.gmm import tgmm as _tgmm

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installed JAX
    _gmm = _tgmm = None
    AVAILABLE = False

TILE = 128


def gmm(x, w, group_sizes, *, transpose_rhs: bool = False, interpret: bool = False):
    """x [M,K], w [E,K,N] (or [E,N,K] with transpose_rhs) -> [M,N] in x's dtype."""
    if not AVAILABLE:
        raise RuntimeError("this JAX has no megablox gmm")
    m = x.shape[0]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    k_axis, n_axis = (2, 1) if transpose_rhs else (1, 2)
    xp = pad_to(pad_to(x, 1, TILE), 0, TILE)
    wp = pad_to(pad_to(w.astype(x.dtype), k_axis, TILE), n_axis, TILE)
    tm = min(TILE, xp.shape[0])
    y = _gmm(xp, wp, group_sizes.astype(jnp.int32), preferred_element_type=x.dtype,
             tiling=(tm, TILE, TILE), transpose_rhs=transpose_rhs, interpret=interpret)  # fmt: skip
    return mask_rows(y[:m, :n], group_sizes)


def tgmm(x, dy, group_sizes, *, interpret: bool = False):
    """x [M,K], dy [M,N] -> [E,K,N] per group x_e^T dy_e, in x's dtype."""
    if not AVAILABLE:
        raise RuntimeError("this JAX has no megablox tgmm")
    k, n = x.shape[1], dy.shape[1]
    xp = pad_to(pad_to(mask_rows(x, group_sizes), 0, TILE), 1, TILE)
    dyp = pad_to(pad_to(mask_rows(dy.astype(x.dtype), group_sizes), 0, TILE), 1, TILE)
    out = _tgmm(xp.T, dyp, group_sizes.astype(jnp.int32), preferred_element_type=x.dtype,
                tiling=(TILE, TILE, TILE), interpret=interpret)  # fmt: skip
    return out[:, :k, :n]
