"""Softmax attention (GQA) for the full-attention layers, and which keys each query sees.

Einsum letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query
heads per kv head, H head dim, D model dim.

Which keys a query sees is a `Visibility`: per-row query and key indices (positions or cache
slots), key validity (left padding, unwritten cache slots) and optional segment ids (packed
documents). Key s is visible to query t iff kv_index[s] <= q_index[t], kv_valid[s] and (with
segments) q_segment[t] == kv_segment[s]. Only the "xla" reference builds the [B,T,S] mask.

Implementations (``RunOptions.attention_impl``; all compute softmax(q k^T * scale) v with fp32
logits, probabilities in v's dtype for the value product):
- "xla": logits materialised as [B,K,G,T,S] fp32 (any backend, any dtype): the reference.
- "blockwise": `pallas_kernels.attention.blockwise_attention`, an online softmax over key blocks
  in plain XLA with a flash-style custom VJP: no array with both a T and an S axis beyond one
  [B,K,G,C_q,C_k] tile, forward or backward; tiles no query can see are skipped. Any backend.
- "cudnn": cuDNN flash attention through ``jax.nn.dot_product_attention``: CUDA GPUs,
  bfloat16/float16 activations, head dim a multiple of 8 and at most 128
  (``pallas_kernels.attention.cudnn_unsupported``). A plain causal call (no padding, no packed
  segments) uses cuDNN's causal mask, which skips the masked half. A prefill chunk against the
  cache (even lengths) runs `_cudnn_chunk`: the cached prefix without a mask plus the chunk
  itself causal, cuDNN's padding mask for left padding, merged exactly through fp32
  log-sum-exps. Otherwise (padded or packed training rows) the [B,T,S] mask goes in as an
  additive bias (quadratic memory: kept for comparison, not chosen by "auto"). Odd lengths are
  padded by one slot (JAX's cuDNN training kernels take even lengths only).
- "auto" (`resolve_attention_impl` is the one place that decides): one-row decode steps take
  "xla" (their [B,1,S] logits are linear in S); on a GPU where cuDNN can run, a plain causal
  call and a prefill chunk against the cache take "cudnn"; everything else takes "blockwise".
  So no default path holds a [T,S] array.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from minimax_jax.model.proj import proj
from minimax_jax.model.rope import apply_rope
from pallas_kernels.attention import cudnn_unsupported
from pallas_kernels.attention.blockwise import blockwise_attention
from pallas_kernels.attention.cudnn import cudnn_attention_lse, cudnn_lse_unsupported

# A finite "minus infinity": a fully masked row (a padding query) gives a uniform softmax instead of
# NaN; its output is never used.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)

# Query and key tile of "blockwise": 512 x 512 fp32 logits per (batch, head) are 1 MiB.
BLOCK = 512
# Cache slots per cuDNN call of a prefill chunk against its cached prefix (`_cudnn_chunk`).
PIECE = 32768


class Visibility(NamedTuple):
    """Which keys each query sees (see the module doc), in O(T + S) memory.

    q_index [B,T] int32, kv_index [B,S] int32, kv_valid [B,S] bool; q_segment [B,T] and
    kv_segment [B,S] int32, both or neither.
    """

    q_index: jax.Array
    kv_index: jax.Array
    kv_valid: jax.Array
    q_segment: jax.Array | None = None
    kv_segment: jax.Array | None = None

    def mask(self) -> jax.Array:
        """The dense bool mask [B,T,S] (the "xla" reference and cuDNN's bias only)."""
        mask = causal_padding_mask(self.q_index, self.kv_index, self.kv_valid)
        if self.q_segment is not None:
            mask &= self.q_segment[:, :, None] == self.kv_segment[:, None, :]
        return mask


def causal_padding_mask(q_index: jax.Array, kv_index: jax.Array, kv_valid: jax.Array) -> jax.Array:
    """bool [B, T, S]: key s is visible to query t when kv_index[s] <= q_index[t] and it is valid.

    q_index [T] or [B, T], kv_index [S] or [B, S]: slot indices in the sequence/cache;
    kv_valid [B, S] bool (False for left padding and unwritten cache slots).
    """
    qi = q_index if q_index.ndim == 2 else q_index[None]
    ki = kv_index if kv_index.ndim == 2 else kv_index[None]
    return (ki[:, None, :] <= qi[:, :, None]) & kv_valid[:, None, :]


ATTENTION_IMPLS = ("auto", "xla", "blockwise", "cudnn")
# What "cudnn" passes to jax.nn.dot_product_attention; CPU tests set it to "xla" to check the
# arguments (mask layout, causal flag, GQA grouping) against `dot_product_attention` itself.
_CUDNN = "cudnn"


def resolve_attention_impl(
    impl: str, q: jax.Array, causal: bool = False, chunk: jax.ShapeDtypeStruct | None = None
) -> str:
    """The implementation a softmax layer runs for ``impl`` on q [B,T,N,H] (see the module doc);
    ``causal``: the call's visibility is the plain causal mask over T == S positions; ``chunk``:
    the call is a prefill chunk against a cache of this shape [B,S,K,H] (`_cudnn_chunk`)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if q.shape[1] == 1 and impl in ("auto", "cudnn"):
        return "xla"  # a decode step
    if impl == "cudnn":
        why = cudnn_unsupported(q)
        if why is not None:
            raise ValueError(f'attention_impl="cudnn" {why}; use "blockwise", "xla" or "auto"')
        return "cudnn"
    if impl == "auto":
        if causal and cudnn_unsupported(q) is None:
            return "cudnn"
        if chunk is not None and cudnn_lse_unsupported(q, chunk) is None:
            return "cudnn"
        return "blockwise"
    return impl


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    vis: Visibility,
    scale: float,
    impl: str = "xla",
    causal: bool = False,
    chunk_start: jax.Array | None = None,
    runs: bool = False,
) -> jax.Array:
    """Softmax attention with the implementation ``impl`` resolves to (`resolve_attention_impl`).

    q [B,T,N,H], k/v [B,S,K,H], vis: which keys each query sees -> [B,T,N,H] in q's dtype.
    ``causal`` (static) promises that vis is exactly the causal mask over T == S positions (no
    padding, one segment); the cuDNN path then uses its built-in causal mask instead of a bias.
    ``chunk_start`` (int32 scalar): the call is a prefill chunk whose queries sit in cache slots
    chunk_start..chunk_start+T-1 of k/v (vis.kv_index the slot numbers, no segments); the cuDNN
    path then runs `_cudnn_chunk` instead of a bias; ``runs`` (static): the caller promises
    each row's valid slots are one run (`_cudnn_chunk` then compiles no fallback).
    """
    shape = None if chunk_start is None else jax.ShapeDtypeStruct(k.shape, k.dtype)
    resolved = resolve_attention_impl(impl, q, causal, shape)
    if (
        resolved == "cudnn"
        and chunk_start is not None
        and vis.q_segment is None
        and cudnn_lse_unsupported(q, k) is None
    ):
        return _cudnn_chunk(q, k, v, vis, scale, chunk_start, runs)
    if resolved == "xla":
        return dot_product_attention(q, k, v, vis.mask(), scale)
    if resolved == "blockwise":
        return blockwise_attention(
            q, k, v, scale=scale, q_index=vis.q_index, kv_index=vis.kv_index,
            kv_valid=vis.kv_valid, q_segment=vis.q_segment, kv_segment=vis.kv_segment,
            block_q=BLOCK, block_k=BLOCK,
        )  # fmt: skip
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
        mask = jnp.pad(vis.mask(), ((0, 0), (0, pt), (0, ps)))  # padded slots: False
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], scale=scale, implementation=_CUDNN
        )
    return out[:, :t]


def _roll_rows(x: jax.Array, shift: jax.Array) -> jax.Array:
    """x [B,L,...] with row b rotated left by shift[b]: out[b, i] = x[b, (i + shift[b]) % L]."""
    n = x.shape[1]
    idx = (jnp.arange(n, dtype=jnp.int32)[None] + shift[:, None]) % n
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _merge(acc: tuple[jax.Array, jax.Array], part: tuple[jax.Array, jax.Array]):
    """Two partial attentions (out fp32 [B,T,N,H], lse [B,T,N]) over disjoint key sets -> one."""
    (o1, l1), (o2, l2) = acc, part
    lse = jnp.logaddexp(l1, l2)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w1, w2 = jnp.exp(l1 - safe)[..., None], jnp.exp(l2 - safe)[..., None]
    return o1 * w1 + o2.astype(jnp.float32) * w2, lse


def _cudnn_chunk(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    vis: Visibility,
    scale: float,
    start: jax.Array,
    runs: bool = False,
) -> jax.Array:
    """A prefill chunk q [B,T,N,H] (cache slots start..start+T-1) against the cache k/v
    [B,S,K,H] with cuDNN flash attention, never building a [T,S] array.

    When each row's valid slots are one run [first_b, start + T) (left padding, then tokens:
    what the engine writes), the keys split into the cached prefix [first_b, start), seen by
    every query without a mask, and the chunk itself, causal. Both go to cuDNN with its padding
    mask (valid tokens first) after rotating each row so its run starts at 0: the prefix in
    pieces of `PIECE` slots (a while loop over the pieces that hold written slots), the chunk in
    one causal call. The parts merge exactly through their fp32 log-sum-exps. Rows of any other
    shape (valid slots with holes) take "blockwise" instead (a `lax.cond`, so both compile),
    unless ``runs`` promises there are none (`RunOptions.cache_runs`, set by the engine).
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    slots = jnp.arange(s, dtype=jnp.int32)
    end = start + t
    first = jnp.where(vis.kv_valid.any(axis=1), jnp.argmax(vis.kv_valid, axis=1), end)
    first = first.astype(jnp.int32)
    run = (slots[None] >= first[:, None]) & (slots[None] < end)
    expected_q = start + jnp.arange(t, dtype=jnp.int32)
    simple = (
        jnp.all(run == vis.kv_valid)
        & jnp.all(vis.kv_index == slots[None])
        & jnp.all(vis.q_index == expected_q[None])
    )

    def split(q, k, v):
        # the chunk against itself, causal: rows rotated so their first valid token is at 0
        lo = jnp.clip(first - start, 0, t)
        kc = jax.lax.dynamic_slice_in_dim(k, start, t, 1)
        vc = jax.lax.dynamic_slice_in_dim(v, start, t, 1)
        o, lse = cudnn_attention_lse(
            _roll_rows(q, lo), _roll_rows(kc, lo), _roll_rows(vc, lo), scale=scale,
            q_len=t - lo, kv_len=t - lo, causal=True, emulate=_CUDNN != "cudnn",
        )  # fmt: skip
        acc = (_roll_rows(o, -lo).astype(jnp.float32), _roll_rows(lse, -lo))
        # the cached prefix [first, start), PIECE slots at a time (the last piece clamped to S)
        p = min(PIECE, s - s % 2)

        def piece(j, acc):
            lo_slot = jnp.minimum(j * p, s - p)
            kp = jax.lax.dynamic_slice_in_dim(k, lo_slot, p, 1)
            vp = jax.lax.dynamic_slice_in_dim(v, lo_slot, p, 1)
            a = jnp.maximum(first, j * p) - lo_slot  # valid slots of the piece: [a, z)
            z = jnp.minimum(start, (j + 1) * p) - lo_slot
            shift = jnp.clip(a, 0, p)
            o, lse = cudnn_attention_lse(
                q, _roll_rows(kp, shift), _roll_rows(vp, shift), scale=scale,
                q_len=jnp.full((b,), t, jnp.int32), kv_len=jnp.maximum(z - a, 0),
                emulate=_CUDNN != "cudnn",
            )  # fmt: skip
            return _merge(acc, (o, lse))

        out, _ = jax.lax.fori_loop(0, (start + p - 1) // p, piece, acc)
        return out.astype(q.dtype)

    def fallback(q, k, v):
        return blockwise_attention(
            q, k, v, scale=scale, q_index=vis.q_index, kv_index=vis.kv_index,
            kv_valid=vis.kv_valid, block_q=BLOCK, block_k=BLOCK,
        )  # fmt: skip

    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if runs:
        return split(q, k, v)
    return jax.lax.cond(simple, split, fallback, q, k, v)


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
    vis: Visibility,
    matvec: str = "xla",
    impl: str = "xla",
    causal: bool = False,
    core=None,
) -> jax.Array:
    """A full-attention layer without cache.

    params: q [D,N,H], k [D,K,H], v [D,K,H], o [N,H,D]; x [B,T,D]; cos/sin [B,T,R]; vis: over
    the T positions.
    matvec: `proj`'s implementation for one-row (batch-1 decode) projections; impl, causal: see
    `attention`; core: replaces `attention` as core(q, k, v, vis, scale) (sequence parallelism,
    `minimax_jax.model.sequence`). Returns [B,T,D].
    """
    q = proj("btd,dnh->btnh", x, params["q"], matvec=matvec)
    k = proj("btd,dkh->btkh", x, params["k"], matvec=matvec)
    v = proj("btd,dkh->btkh", x, params["v"], matvec=matvec)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if core is not None:
        out = core(q, k, v, vis, q.shape[-1] ** -0.5)
    else:
        out = attention(q, k, v, vis, q.shape[-1] ** -0.5, impl, causal)
    return proj("btnh,nhd->btd", out, params["o"], matvec=matvec)


def softmax_attention_cached(
    params: dict,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    vis: Visibility,
    cache: dict,
    index: jax.Array,
    matvec: str = "xla",
    impl: str = "xla",
    runs: bool = False,
    core=None,
) -> tuple[jax.Array, dict]:
    """A full-attention layer that writes its post-RoPE K, V into a preallocated cache.

    x [B,T,D]; cache {"k", "v"} [B,S,K,H]; index: int32 slot of the first new token; vis
    over the S cache slots; impl: see `attention` (prefill chunks; one-row steps take "xla");
    runs: see `RunOptions.cache_runs`; core: replaces `attention` as
    core(q, k_all, v_all, vis, scale, index) (a chunk split over the `sequence` axis,
    `minimax_jax.model.sequence.cached_softmax_core`).
    Returns (y [B,T,D], updated cache).
    """
    q = proj("btd,dnh->btnh", x, params["q"], matvec=matvec)
    k = proj("btd,dkh->btkh", x, params["k"], matvec=matvec)
    v = proj("btd,dkh->btkh", x, params["v"], matvec=matvec)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), index, 1)
    v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), index, 1)
    ka, va, scale = k_all.astype(q.dtype), v_all.astype(q.dtype), q.shape[-1] ** -0.5
    if core is not None:
        out = core(q, ka, va, vis, scale, index)
    else:
        out = attention(q, ka, va, vis, scale, impl, chunk_start=index, runs=runs)
    return proj("btnh,nhd->btd", out, params["o"], matvec=matvec), {"k": k_all, "v": v_all}
