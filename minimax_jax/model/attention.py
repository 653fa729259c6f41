"""Softmax attention (GQA) for the full-attention layers, and the masks it uses.

Einsum letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query
heads per kv head, H head dim, D model dim.

Implementations (``RunOptions.attention_impl``; all compute softmax(q k^T * scale) v with fp32
logits, probabilities in v's dtype for the value product):
- "xla": logits materialised as [B,K,G,T,S] fp32 (any backend, any dtype; tests' reference).
- "cudnn": cuDNN flash attention through ``jax.nn.dot_product_attention`` (no [T,S] logits in
  memory): CUDA GPUs, bfloat16/float16 activations, head dim a multiple of 8 and at most 128
  (``pallas_kernels.attention.cudnn_unsupported``).
  A plain causal call (no padding, no packed segments) uses cuDNN's causal mask, which skips the
  masked half; otherwise the boolean mask goes in as an additive bias [B,1,T,S]. Odd lengths
  are padded by one slot (JAX's cuDNN training kernels take even lengths only).
- "auto": "xla" everywhere for now; "cudnn" is opt-in until it is measured on a GPU
  (`resolve_attention_impl` is the one place that decides).
Decode steps (one query row) always take "xla".
"""

import jax
import jax.numpy as jnp

from minimax_jax.model.proj import proj
from minimax_jax.model.rope import apply_rope
from pallas_kernels.attention import cudnn_unsupported

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


ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# What "cudnn" passes to jax.nn.dot_product_attention; CPU tests set it to "xla" to check the
# arguments (mask layout, causal flag, GQA grouping) against `dot_product_attention` itself.
_CUDNN = "cudnn"


def resolve_attention_impl(impl: str, q: jax.Array) -> str:
    """The implementation a softmax layer runs for ``impl`` on q [B,T,N,H] (see the module doc)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "cudnn" and q.shape[1] > 1:
        why = cudnn_unsupported(q)
        if why is not None:
            raise ValueError(f'attention_impl="cudnn" {why}; use "xla" or "auto"')
        return "cudnn"
    return "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    impl: str = "xla",
    causal: bool = False,
) -> jax.Array:
    """Softmax attention with the implementation ``impl`` resolves to (`resolve_attention_impl`).

    q [B,T,N,H], k/v [B,S,K,H], mask bool [B,T,S] -> [B,T,N,H] in q's dtype. ``causal`` (static)
    promises that mask is exactly the causal mask over T == S positions (no padding, one
    segment); the cuDNN path then uses its built-in causal mask instead of a bias.
    """
    if resolve_attention_impl(impl, q) == "xla":
        return dot_product_attention(q, k, v, mask, scale)
    t, s = q.shape[1], k.shape[1]
    # cuDNN's training kernels (JAX 0.11) take only even lengths: pad an odd T / S by one slot.
    # A padded key is masked out (after every real query when causal); a padded query is dropped.
    pt, ps = t % 2, s % 2
    q = jnp.pad(q, ((0, 0), (0, pt), (0, 0), (0, 0)))
    k, v = (jnp.pad(x.astype(q.dtype), ((0, 0), (0, ps), (0, 0), (0, 0))) for x in (k, v))
    if causal:
        out = jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation=_CUDNN
        )
    else:
        mask = jnp.pad(mask, ((0, 0), (0, pt), (0, ps)))  # padded slots: False
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], scale=scale, implementation=_CUDNN
        )
    return out[:, :t]


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float
) -> jax.Array:
    """q [B,T,N,H], k/v [B,S,K,H], mask bool [B,T,S] -> [B,T,N,H] in q's dtype ("xla").

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
    impl: str = "xla",
    causal: bool = False,
) -> jax.Array:
    """A full-attention layer without cache.

    params: q [D,N,H], k [D,K,H], v [D,K,H], o [N,H,D]; x [B,T,D]; cos/sin [B,T,R]; mask [B,T,T].
    matvec: `proj`'s implementation for one-row (batch-1 decode) projections; impl, causal: see
    `attention`. Returns [B,T,D].
    """
    q = proj("btd,dnh->btnh", x, params["q"], matvec=matvec)
    k = proj("btd,dkh->btkh", x, params["k"], matvec=matvec)
    v = proj("btd,dkh->btkh", x, params["v"], matvec=matvec)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = attention(q, k, v, mask, q.shape[-1] ** -0.5, impl, causal)
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
    impl: str = "xla",
) -> tuple[jax.Array, dict]:
    """A full-attention layer that writes its post-RoPE K, V into a preallocated cache.

    x [B,T,D]; cache {"k", "v"} [B,S,K,H]; index: int32 slot of the first new token; mask
    [B,T,S] over cache slots; impl: see `attention` (prefill chunks; one-row steps take "xla").
    Returns (y [B,T,D], updated cache).
    """
    q = proj("btd,dnh->btnh", x, params["q"], matvec=matvec)
    k = proj("btd,dkh->btkh", x, params["k"], matvec=matvec)
    v = proj("btd,dkh->btkh", x, params["v"], matvec=matvec)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, 1)
    v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, 1)
    out = attention(
        q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, q.shape[-1] ** -0.5, impl
    )
    return proj("btnh,nhd->btd", out, params["o"], matvec=matvec), {"k": k_all, "v": v_all}
