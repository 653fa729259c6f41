"""Plain-XLA gathered matvec: the reference and the always-working fallback."""

import jax
import jax.numpy as jnp


def gathered_matvec_reference(x: jax.Array, w: jax.Array, index: jax.Array) -> jax.Array:
    """x [A,K], w [E,K,N], index [A] -> [A,N] fp32, row a = x[a] @ w[index[a]] (fp32 math)."""
    wa = jnp.take(w, index, axis=0).astype(jnp.float32)
    return jnp.einsum("ak,akn->an", x.astype(jnp.float32), wa, precision=jax.lax.Precision.HIGHEST)
