"""RMSNorm as MiniMax computes it: normalise in fp32, cast back, then multiply by the weight."""

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis.

    x: [..., D] any float dtype; weight: [D]. Returns x's dtype. The variance is taken in fp32 and
    the normalised value is cast back to x's dtype *before* the weight multiply, as in the HF code.
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    normed = (xf * jax.lax.rsqrt(var + eps)).astype(dtype)
    return (weight.astype(dtype) * normed).astype(dtype)
