"""Plain-XLA gathered matvec: the reference and the always-working fallback."""

import jax
import jax.numpy as jnp


def gathered_matvec_reference(
    x: jax.Array, w: jax.Array, index: jax.Array, scale: jax.Array | None = None
) -> jax.Array:
    """x [A,K], w [E,K,N], index [A] -> [A,N] fp32, row a = x[a] @ w[index[a]] (fp32 math).

    scale: for int8 w, [E,N]: row a = (x[a] @ w[index[a]]) * scale[index[a]], which is x[a] @
    dequantize(w, scale)[index[a]] (only the A selected weights are converted)."""
    wa = jnp.take(w, index, axis=0).astype(jnp.float32)
    y = jnp.einsum("ak,akn->an", x.astype(jnp.float32), wa, precision=jax.lax.Precision.HIGHEST)
    if scale is not None:
        y = y * jnp.take(scale, index, axis=0).astype(jnp.float32)
    return y
