"""Weight projections that stay matrix products at decode size.

With a single activation row (B*T == 1: a batch-1 decode step) XLA:GPU rewrites some einsums
with a weight into an elementwise multiply that materialises a weight-sized product, then a
reduce: e.g. a [1,16,128,2048] temporary for a 2048x2048 projection, written and read back on
every step. `experiments/bench_matvec.py` measured such a 1-row projection at 23-25 us against
12 us when the row is paired with a zero row (then XLA calls a GEMM that reads the weight once);
see experiments/README.md, round 7. `proj` does that pairing; the extra row costs nothing
measurable (the weight read dominates) and the real row's result is unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def proj(spec: str, x: jax.Array, w: jax.Array, **kwargs) -> jax.Array:
    """jnp.einsum(spec, x, w, **kwargs) for x [B,T,...]; with B*T == 1, computed on [2,T,...]
    (x and a zero row) and sliced back, so the product is never a vector-matrix one."""
    if x.shape[0] * x.shape[1] != 1:
        return jnp.einsum(spec, x, w, **kwargs)
    pair = jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
    return jnp.einsum(spec, pair, w, **kwargs)[:1]
