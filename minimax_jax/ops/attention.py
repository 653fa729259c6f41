"""Softmax attention (GQA) for the full-attention layers, and the masks it uses.

Einsum letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query
heads per kv head, H head dim, D model dim.
"""

import jax
import jax.numpy as jnp

from minimax_jax.ops.proj import proj
from minimax_jax.ops.rope import apply_rope

# A finite "minus infinity": a fully masked row (a padding query) gives a uniform softmax instead of
# NaN; its output is never used.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def causal_padding_mask(q_index: jax.Array, kv_index: jax.Array, kv_valid: jax.Array) -> jax.Array:
    """bool [B, T, S]: key s is visible to query t when kv_index[s] <= q_index[t] and it is valid.

    q_index [T] or [B, T], kv_index [S] or [B, S]: slot indices in the sequence/cache;
    kv_valid [B, S] bool (False for left padding and unwritten cache slots).
    """
    qi = q_index if q_index.ndim == 2 else q_index[None]
    ki = kv_index if kv_index.ndim == 2 else kv_index[None]
    return (ki[:, None, :] <= qi[:, :, None]) & kv_valid[:, None, :]


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
) -> jax.Array:
    """q [B,T,N,H], k/v [B,S,K,H], mask bool [B,T,S] -> [B,T,N,H] in q's dtype.

    Logits and softmax in fp32; probabilities cast to v's dtype for the value product (as HF).
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None], logits * scale, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def softmax_attention_layer(
    params: dict,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    mask: jax.Array,
    matvec: str = "xla",
) -> jax.Array:
    """A full-attention layer without cache.

    params: q [D,N,H], k [D,K,H], v [D,K,H], o [N,H,D]; x [B,T,D]; cos/sin [B,T,R]; mask [B,T,T].
    matvec: `proj`'s implementation for one-row (batch-1 decode) projections. Returns [B,T,D].
    """
    q = proj("btd,dnh->btnh", x, params["q"], matvec=matvec)
    k = proj("btd,dkh->btkh", x, params["k"], matvec=matvec)
    v = proj("btd,dkh->btkh", x, params["v"], matvec=matvec)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = dot_product_attention(q, k, v, mask, q.shape[-1] ** -0.5)
    return proj("btnh,nhd->btd", out, params["o"], matvec=matvec)


def softmax_attention_cached(
    params: dict,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    mask: jax.Array,
    cache: dict,
    index: jax.Array,
    matvec: str = "xla",
) -> tuple[jax.Array, dict]:
    """A full-attention layer that writes its post-RoPE K, V into a preallocated cache.

    x [B,T,D]; cache {"k", "v"} [B,S,K,H]; index: int32 slot of the first new token; mask
    [B,T,S] over cache slots. Returns (y [B,T,D], updated cache).
    """
    q = proj("btd,dnh->btnh", x, params["q"], matvec=matvec)
    k = proj("btd,dkh->btkh", x, params["k"], matvec=matvec)
    v = proj("btd,dkh->btkh", x, params["v"], matvec=matvec)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, 1)
    v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, 1)
    out = dot_product_attention(
        q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, q.shape[-1] ** -0.5
    )
    return proj("btnh,nhd->btd", out, params["o"], matvec=matvec), {"k": k_all, "v": v_all}
