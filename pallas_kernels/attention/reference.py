"""Reference softmax attention: every step in fp32 (the semantics the fast paths are tested
against). Letters as in `api.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None
) -> jax.Array:
    """softmax(q k^T * scale) v for q, k, v [B,S,N,H] (no mask) -> [B,S,N,H] fp32.

    scale defaults to H**-0.5; inputs are cast to fp32 and both products run at full precision.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k, precision=hi) * scale
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bnqk,bknh->bqnh", probs, v, precision=hi)
