"""Weight projections that stay bandwidth-bound at decode size.

With a single activation row (B*T == 1: a batch-1 decode step) XLA:GPU rewrites some einsums
with a weight into an elementwise multiply that materialises a weight-sized product, then a
reduce: e.g. a [1,16,128,2048] temporary for a 2048x2048 projection, written and read back on
every step. `experiments/bench_matvec.py` measured such a 1-row projection at 23-25 us against
12 us when the row is paired with a zero row (then XLA calls a GEMM that reads the weight once);
see experiments/README.md, round 7. `proj` does that pairing (matvec="xla"), or with
matvec="gpu" runs the row through `pallas_kernels.matvec` (a split-K kernel that streams the
weight once). Either way the real row's result is the einsum's, up to summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.matvec import gathered_matvec
from pallas_kernels.matvec.api import supported


def _split_spec(spec: str, x_ndim: int) -> int | None:
    """For 'bt<in>,<in><out>->bt<out>' the number of contracted dims, else None."""
    lhs, out = spec.split("->")
    xs, ws = lhs.split(",")
    c = x_ndim - 2
    if len(xs) != x_ndim or xs[:2] != "bt" or ws[:c] != xs[2:] or out != "bt" + ws[c:]:
        return None
    return c


def proj(spec: str, x: jax.Array, w: jax.Array, *, matvec: str = "xla", **kwargs) -> jax.Array:
    """jnp.einsum(spec, x, w, **kwargs) for x [B,T,...]. With B*T == 1: matvec="xla" computes on
    [2,T,...] (x and a zero row) and slices back, so the product is never a vector-matrix one;
    another matvec implementation (`pallas_kernels.matvec`) takes the row alone, for specs of
    the form 'bt<in>,<in><out>->bt<out>'."""
    if x.shape[0] * x.shape[1] != 1:
        return jnp.einsum(spec, x, w, **kwargs)
    c = _split_spec(spec, x.ndim)
    if matvec != "xla" and c is not None and not kwargs and supported(x.size, w.size // x.size):
        k = x.size
        y = gathered_matvec(
            x.reshape(1, k), w.reshape(1, k, -1), jnp.zeros((1,), jnp.int32),
            implementation=matvec,
        )  # fmt: skip
        return y.astype(jnp.result_type(x.dtype, w.dtype)).reshape(1, 1, *w.shape[c:])
    pair = jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
    return jnp.einsum(spec, pair, w, **kwargs)[:1]
