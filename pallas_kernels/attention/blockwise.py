"""Masked softmax attention in memory linear in length: plain XLA, any backend, custom VJP.

Letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query heads
per kv head, H head dim; C_q, C_k the query / key block sizes.

    blockwise_attention(q, k, v, *, scale, q_index, kv_index, kv_valid=None, q_segment=None,
                        kv_segment=None, block_q=512, block_k=512) -> out

q [B,T,N,H], k/v [B,S,K,H] (query head n reads kv head n // G), out [B,T,N,H] in q's dtype.
Key s is visible to query t iff

    kv_index[b,s] <= q_index[b,t]  and  kv_valid[b,s]  and  q_segment[b,t] == kv_segment[b,s]

(the segment test only when segments are given): positions or cache slots, left padding and
unwritten cache slots, packed documents. The mask is never built: no array has both a T-sized
and an S-sized axis beyond one [B,K,G,C_q,C_k] tile, forward or backward.

Numerics are those of the dense reference (`minimax_jax.model.attention.dot_product_attention`):
logits q.k in fp32 times scale, masked logits at the finite -0.7 * finfo(float32).max, so a query
that sees no key gets the uniform average of v over all S keys (masked ones included), which is
computed here directly; probabilities cast to v's dtype for the value product, fp32 accumulation.

Forward: `lax.map` over query blocks, in each a `lax.scan` over key blocks carrying the online
softmax (running max m, sum l, fp32 accumulator); saves q, k, v, the index arrays, out and
lse = m + log l [B,T,N] fp32 (+inf for a query that sees nothing). Backward (flash style): an
outer scan over key blocks carrying dq [T] fp32, an inner scan over query blocks carrying dk, dv
of the key block; each tile's probabilities are recomputed from lse, with
delta = sum(dout * out) per query. Memory is O(T + S) per head either way. A tile that no query
of the block can see (from per-block min/max summaries of the indices, validity and segments)
is skipped with `lax.cond`: a causal prefill does about half the tiles. T and S are padded
internally to block multiples (padded keys are invalid, padded queries dropped), so any
T, S >= 1 works: T == 1 decode, a prefill chunk of T queries against S cache slots.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.platform import match_vma

__all__ = ["blockwise_attention"]

# The dense reference's finite "minus infinity" (see the module doc).
_MASKED = -0.7 * float(np.finfo(np.float32).max)
_INT_MAX = int(np.iinfo(np.int32).max)
_INT_MIN = int(np.iinfo(np.int32).min)
_F32 = jnp.float32


class _Config(NamedTuple):
    """Static arguments of the custom VJP (hashable)."""

    scale: float
    block_q: int  # already clamped to T
    block_k: int  # already clamped to S


class _QBlocks(NamedTuple):
    """Query-side index arrays in blocks [n_q, B, C_q] and their per-block summaries [n_q, B]."""

    index: jax.Array
    segment: jax.Array
    index_max: jax.Array
    segment_min: jax.Array
    segment_max: jax.Array


class _KBlocks(NamedTuple):
    """Key-side index arrays in blocks [n_k, B, C_k]; summaries [n_k, B] over valid keys only."""

    index: jax.Array
    valid: jax.Array
    segment: jax.Array
    index_min: jax.Array
    segment_min: jax.Array
    segment_max: jax.Array


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    q_index: jax.Array,
    kv_index: jax.Array,
    kv_valid: jax.Array | None = None,
    q_segment: jax.Array | None = None,
    kv_segment: jax.Array | None = None,
    block_q: int = 512,
    block_k: int = 512,
) -> jax.Array:
    """Masked softmax attention without the [T,S] mask or logits (see the module doc).

    q [B,T,N,H]; k, v [B,S,K,H] with N a multiple of K; q_index [B,T] int32, kv_index [B,S]
    int32 (positions or slots); kv_valid [B,S] bool (default all True); q_segment [B,T] and
    kv_segment [B,S] int32 (both or neither). block_q / block_k: tile sizes (clamped to T / S).
    Returns [B,T,N,H] in q's dtype; differentiable in q, k, v.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if k.shape != (b, s, kh, h) or v.shape != k.shape:
        raise ValueError(f"k and v must be [B,S,K,H] = [{b},S,K,{h}], got {k.shape}, {v.shape}")
    if n % kh:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kh}")
    if (q_segment is None) != (kv_segment is None):
        raise ValueError("pass both q_segment and kv_segment, or neither")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    if kv_valid is None:
        kv_valid = jnp.ones((b, s), bool)
    if q_segment is None:  # one segment: the test is always true
        q_segment, kv_segment = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    for name, x, shape in (
        ("q_index", q_index, (b, t)),
        ("q_segment", q_segment, (b, t)),
        ("kv_index", kv_index, (b, s)),
        ("kv_valid", kv_valid, (b, s)),
        ("kv_segment", kv_segment, (b, s)),
    ):
        if x.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (B, T or S), got {x.shape}")
    cfg = _Config(float(scale), min(block_q, t), min(block_k, s))
    ints = (q_index, kv_index, q_segment, kv_segment)
    q_index, kv_index, q_segment, kv_segment = (x.astype(jnp.int32) for x in ints)
    return _attention(cfg, q, k, v, q_index, kv_index, kv_valid.astype(bool), q_segment, kv_segment)


def _pad_axis1(x: jax.Array, size: int, value=None) -> jax.Array:
    """Pads axis 1 of x up to size: with value, or repeating the last entry when value is None."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, size - x.shape[1])
    if value is None:
        return jnp.pad(x, pad, mode="edge")
    return jnp.pad(x, pad, constant_values=value)


def _blocks(x: jax.Array, c: int) -> jax.Array:
    """[B, L, ...] with L a multiple of c -> [L // c, B, c, ...] (block-major, for scans)."""
    b, length = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, length // c, c, *x.shape[2:]), 1, 0)


def _unblock(x: jax.Array) -> jax.Array:
    """[n, B, c, ...] -> [B, n * c, ...]."""
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _padded_length(length: int, c: int) -> int:
    return -(-length // c) * c


def _q_blocks(q_index: jax.Array, q_segment: jax.Array, c: int) -> _QBlocks:
    """Padded queries repeat the last query's index and segment: they stay inside the last
    block's summaries, and their rows are dropped."""
    tp = _padded_length(q_index.shape[1], c)
    index = _blocks(_pad_axis1(q_index, tp), c)
    segment = _blocks(_pad_axis1(q_segment, tp), c)
    return _QBlocks(index, segment, index.max(-1), segment.min(-1), segment.max(-1))


def _k_blocks(kv_index: jax.Array, kv_valid: jax.Array, kv_segment: jax.Array, c: int) -> _KBlocks:
    """Padded keys are invalid; the summaries cover valid keys only (none: an empty range)."""
    sp = _padded_length(kv_index.shape[1], c)
    index = _blocks(_pad_axis1(kv_index, sp), c)
    valid = _blocks(_pad_axis1(kv_valid, sp, False), c)
    segment = _blocks(_pad_axis1(kv_segment, sp), c)
    return _KBlocks(
        index,
        valid,
        segment,
        jnp.where(valid, index, _INT_MAX).min(-1),
        jnp.where(valid, segment, _INT_MAX).min(-1),
        jnp.where(valid, segment, _INT_MIN).max(-1),
    )


def _tile_visible(qb: _QBlocks, kb: _KBlocks) -> jax.Array:
    """Whether any query of the block may see any key of the block (one block each; scalar).

    Conservative: an overlap of the segment ranges does not mean a shared segment."""
    return jnp.any(
        (kb.index_min <= qb.index_max)
        & (kb.segment_min <= qb.segment_max)
        & (qb.segment_min <= kb.segment_max)
    )


def _tile_mask(qb: _QBlocks, kb: _KBlocks) -> jax.Array:
    """bool [B,1,1,C_q,C_k] (broadcast over K, G) for one query block and one key block."""
    mask = (
        (kb.index[:, None, :] <= qb.index[:, :, None])
        & kb.valid[:, None, :]
        & (qb.segment[:, :, None] == kb.segment[:, None, :])
    )
    return mask[:, None, None]


def _logits(cfg: _Config, qt: jax.Array, kt: jax.Array) -> jax.Array:
    """q tile [B,C_q,K,G,H], k tile [B,C_k,K,H] -> fp32 logits * scale [B,K,G,C_q,C_k]."""
    logits = jnp.einsum("bqkgh,bskh->bkgqs", qt, kt, preferred_element_type=_F32)
    return logits * cfg.scale


def _uniform_prob(s: int, dtype) -> jax.Array:
    """The reference's probability for a query that sees no key: 1/S, cast to v's dtype."""
    return (jnp.float32(1.0) / jnp.float32(s)).astype(dtype).astype(_F32)


def _tied_to(x: jax.Array, arrays: tuple) -> tuple:
    """`arrays`, made to depend on x for JAX's program transformations (no runtime cost).

    Inside a `lax.scan` under `jax.grad` (a decoder's block scan), JAX hoists out of the loop
    any value that depends only on loop invariants and keeps it for every iteration. The index
    arrays are such invariants, so every tile's mask ([n_q, n_k, B, K, G, C_q, C_k], quadratic
    in length) would be built up front and kept. Passing them through an optimization barrier
    together with x (which varies per block) keeps the masks inside the loop, one tile at a time.
    """
    *arrays, _ = jax.lax.optimization_barrier((*arrays, x))
    return tuple(arrays)


def _forward(cfg: _Config, q, k, v, q_index, kv_index, kv_valid, q_segment, kv_segment):
    """-> out [B,T,N,H] in q's dtype, lse [B,T,N] fp32 (+inf where a query sees no key)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    cq, ck = cfg.block_q, cfg.block_k
    q_index, kv_index, kv_valid, q_segment, kv_segment = _tied_to(
        q, (q_index, kv_index, kv_valid, q_segment, kv_segment)
    )
    qblocks = _q_blocks(q_index, q_segment, cq)
    kblocks = _k_blocks(kv_index, kv_valid, kv_segment, ck)
    qs = _blocks(_pad_axis1(q.reshape(b, t, kh, g, h), qblocks.index.shape[0] * cq, 0), cq)
    sp = kblocks.index.shape[0] * ck
    ks = _blocks(_pad_axis1(k, sp, 0), ck)
    vs = _blocks(_pad_axis1(v, sp, 0), ck)

    def query_block(xs):
        qt, qb = xs

        def key_step(carry, ys):
            kt, vt, kb = ys

            def update(carry):
                m, l, acc = carry
                mask = _tile_mask(qb, kb)
                logits = jnp.where(mask, _logits(cfg, qt, kt), _MASKED)
                m_new = jnp.maximum(m, logits.max(-1))
                p = jnp.where(mask, jnp.exp(logits - m_new[..., None]), 0.0)
                alpha = jnp.exp(m - m_new)  # 0 once a real logit replaces _MASKED
                pv = jnp.einsum(
                    "bkgqs,bskh->bkgqh", p.astype(v.dtype), vt, preferred_element_type=_F32
                )
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            visible = _tile_visible(qb, kb)
            return jax.lax.cond(visible, update, lambda c: c, carry), None

        init = (
            jnp.full((b, kh, g, cq), _MASKED, _F32),
            jnp.zeros((b, kh, g, cq), _F32),
            jnp.zeros((b, kh, g, cq, h), _F32),
        )
        # inside shard_map (sequence parallelism) the carries vary like every operand
        init = tuple(match_vma(x, qt, *jax.tree.leaves(qb), ks, vs, *kblocks) for x in init)
        (m, l, acc), _ = jax.lax.scan(key_step, init, (ks, vs, kblocks))
        empty = l == 0.0
        safe_l = jnp.where(empty, 1.0, l)
        out = acc / safe_l[..., None]
        lse = jnp.where(empty, jnp.inf, m + jnp.log(safe_l))
        return jnp.moveaxis(out, 3, 1), jnp.moveaxis(lse, 3, 1)  # [B,C_q,K,G,(H)]

    out, lse = jax.lax.map(query_block, (qs, qblocks))
    out, lse = _unblock(out)[:, :t], _unblock(lse)[:, :t]  # [B,T,K,G,H], [B,T,K,G]
    # A query that sees no key: the reference's uniform softmax over all S real keys.
    mean_v = _uniform_prob(s, v.dtype) * v.astype(_F32).sum(1)  # [B,K,H]
    out = jnp.where(jnp.isinf(lse)[..., None], mean_v[:, None, :, None, :], out)
    return out.reshape(b, t, n, h).astype(q.dtype), lse.reshape(b, t, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q, k, v, q_index, kv_index, kv_valid, q_segment, kv_segment):
    return _forward(cfg, q, k, v, q_index, kv_index, kv_valid, q_segment, kv_segment)[0]


def _attention_fwd(cfg, q, k, v, q_index, kv_index, kv_valid, q_segment, kv_segment):
    out, lse = _forward(cfg, q, k, v, q_index, kv_index, kv_valid, q_segment, kv_segment)
    return out, (q, k, v, q_index, kv_index, kv_valid, q_segment, kv_segment, out, lse)


def _attention_bwd(cfg, res, dout):
    q, k, v, q_index, kv_index, kv_valid, q_segment, kv_segment, out, lse = res
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    cq, ck = cfg.block_q, cfg.block_k
    q_index, kv_index, kv_valid, q_segment, kv_segment = _tied_to(
        dout, (q_index, kv_index, kv_valid, q_segment, kv_segment)
    )
    qblocks = _q_blocks(q_index, q_segment, cq)
    kblocks = _k_blocks(kv_index, kv_valid, kv_segment, ck)
    nq, tp = qblocks.index.shape[0], qblocks.index.shape[0] * cq
    sp = kblocks.index.shape[0] * ck
    delta = jnp.sum(dout.astype(_F32) * out.astype(_F32), -1)  # [B,T,N]

    def to_q_blocks(x, value):  # [B,T,N,...] -> [n_q,B,C_q,K,G,...]; padded queries: value
        return _blocks(_pad_axis1(x.reshape(b, t, kh, g, *x.shape[3:]), tp, value), cq)

    # Padded queries get lse = +inf (probabilities 0) and dout = 0: they contribute nothing.
    q_side = (
        to_q_blocks(q, 0),
        to_q_blocks(dout, 0),
        jnp.moveaxis(to_q_blocks(lse, jnp.inf), 2, -1),  # [n_q,B,K,G,C_q]
        jnp.moveaxis(to_q_blocks(delta, 0), 2, -1),
        qblocks,
    )
    ks = _blocks(_pad_axis1(k, sp, 0), ck)
    vs = _blocks(_pad_axis1(v, sp, 0), ck)

    def key_block(dq_acc, ys):
        kt, vt, kb = ys

        def query_step(carry, xs):
            qt, dot, lset, deltat, qb = xs

            def tile(carry):
                dk, dv = carry
                mask = _tile_mask(qb, kb)
                # Masked entries may overflow exp (logit above lse): `where` drops them.
                p = jnp.where(mask, jnp.exp(_logits(cfg, qt, kt) - lset[..., None]), 0.0)
                dv = dv + jnp.einsum(
                    "bkgqs,bqkgh->bskh",
                    p.astype(v.dtype),
                    dot.astype(v.dtype),
                    preferred_element_type=_F32,
                )
                dp = jnp.einsum(
                    "bqkgh,bskh->bkgqs", dot.astype(v.dtype), vt, preferred_element_type=_F32
                )
                ds = p * (dp - deltat[..., None]) * cfg.scale  # d(logits before scale)
                dk = dk + jnp.einsum(
                    "bkgqs,bqkgh->bskh", ds.astype(q.dtype), qt, preferred_element_type=_F32
                )
                dq = jnp.einsum(
                    "bkgqs,bskh->bqkgh", ds.astype(k.dtype), kt, preferred_element_type=_F32
                )
                return (dk, dv), dq

            def skip(carry):
                zeros = jnp.zeros((b, cq, kh, g, h), _F32)
                return carry, match_vma(zeros, qt, dot, lset, deltat, *qb, kt, vt, *kb)

            return jax.lax.cond(_tile_visible(qb, kb), tile, skip, carry)

        zeros = match_vma(jnp.zeros((b, ck, kh, h), _F32), kt, vt, *kb, *jax.tree.leaves(q_side))
        (dk, dv), dq = jax.lax.scan(query_step, (zeros, zeros), q_side)
        return dq_acc + dq, (dk, dv)

    dq0 = match_vma(jnp.zeros((nq, b, cq, kh, g, h), _F32), *jax.tree.leaves(q_side), ks, vs,
                    *kblocks)  # fmt: skip
    dq, (dk, dv) = jax.lax.scan(key_block, dq0, (ks, vs, kblocks))
    dq = _unblock(dq)[:, :t].reshape(b, t, n, h)
    dk, dv = _unblock(dk)[:, :s], _unblock(dv)[:, :s]
    # Queries that see no key averaged v uniformly: each real key gets 1/S of their dout.
    empty = jnp.isinf(lse).reshape(b, t, kh, g, 1)
    d_empty = jnp.where(empty, dout.reshape(b, t, kh, g, h).astype(_F32), 0.0).sum((1, 3))
    dv = dv + (_uniform_prob(s, v.dtype) * d_empty)[:, None]
    return (
        dq.astype(q.dtype),
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        None,
        None,
        None,
        None,
        None,
    )


_attention.defvjp(_attention_fwd, _attention_bwd)
