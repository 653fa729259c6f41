"""Chunked lightning attention in plain XLA: `lax.scan` over blocks of C tokens, fp32 state.

Per block (local index j, i in [0, C); L_j = -s * min(j + 1, n_valid) is the log decay from the
block start through token j, so padded tail tokens are identity steps):

    M[j, i] = exp(L_j - L_i) [i <= j] [same segment]          (intra-block decay mask)
    O       = ((Q K^T) * M) V + (Q * qd) S_prev                qd_j = exp(L_j) [j sees S_prev]
    S_new   = sd S_prev + (K * kd)^T V                         kd_i = exp(L_last - L_i) [i in the
                                                               last token's segment], sd = exp(
                                                               L_last) [no reset in the block]

Backward (custom_vjp; residuals are the inputs plus one fp32 state per block start, nothing
else per block): a reverse scan over blocks carrying dS,

    dP  = (dO V^T) * M ;  dQ = dP K + (dO S_prev^T) * qd
    dK  = dP^T Q + (V dS_new^T) * kd ;  dV = ((Q K^T) * M)^T dO + (K * kd) dS_new
    dS_prev = sd dS_new + (Q * qd)^T dO

Dtypes: the C x C matmuls (Q K^T, P V and their backward twins) take the input dtype with fp32
accumulation; decays, masks, the state and every matmul touching it are fp32.
The helpers `pad_and_prepare` / `block_masks` are shared with the Pallas TPU wrapper.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.lightning.reference import check_inputs, segment_runs
from pallas_kernels.platform import match_vma

__all__ = ["DEFAULT_BLOCK_SIZE", "lightning_attention_xla", "pad_and_prepare"]

DEFAULT_BLOCK_SIZE = 256


class Prepared(NamedTuple):
    """Inputs padded to a multiple of the block size (zeros for q/k/v, edge value for runs)."""

    q: jax.Array  # [B, nb*C, N, H]
    k: jax.Array
    v: jax.Array
    state: jax.Array  # [B, N, H, H] fp32
    runs: jax.Array | None  # [B, nb*C] int32 run ids, None without segment ids
    block: int  # C
    length: int  # T (valid tokens)


def pad_and_prepare(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array | None,
    segment_ids: jax.Array | None,
    block: int,
) -> Prepared:
    """Check shapes, compute run ids and pad T up to a multiple of `block`."""
    check_inputs(q, k, v, slopes, initial_state, segment_ids)
    b, t, n, h = q.shape
    pad = -t % block
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    runs = None
    if segment_ids is not None:
        runs = jnp.pad(segment_runs(segment_ids, b, t), ((0, 0), (0, pad)), mode="edge")
    if initial_state is None:
        state = jnp.zeros((b, n, h, h), jnp.float32)
    else:
        state = initial_state.astype(jnp.float32)
    return Prepared(q, k, v, state, runs, block, t)


def block_log_decays(slopes: jax.Array, length: int, block: int) -> jax.Array:
    """L [nb, C, N] fp32: -s * min(j + 1, n_valid(block)); constant over the padded tail."""
    nb = -(-length // block)
    n_valid = jnp.clip(length - block * jnp.arange(nb), 0, block)  # [nb]
    pos = jnp.minimum(jnp.arange(block)[None, :] + 1, n_valid[:, None]).astype(jnp.float32)
    return -pos[:, :, None] * slopes.astype(jnp.float32)[None, None, :]


class SegmentMasks(NamedTuple):
    """Per block segment masks (float 0/1), all with a leading block axis nb."""

    runs: jax.Array  # [nb, B, C] int32 (the pairwise mask is built per block)
    sees_prev: jax.Array  # [nb, B, C]: token is in the segment of the carried state
    in_last: jax.Array  # [nb, B, C]: token is in the segment of the block's last token
    keep: jax.Array  # [nb, B]: no segment starts inside the block (carried state survives)


def block_masks(runs: jax.Array, block: int) -> SegmentMasks:
    """Segment masks from padded run ids [B, nb*C]."""
    b, tp = runs.shape
    rb = runs.reshape(b, tp // block, block).transpose(1, 0, 2)  # [nb, B, C]
    # Run id of the token before each block (the carried state's segment); 0 before block 0.
    prev = jnp.concatenate([jnp.zeros((1, b), jnp.int32), rb[:-1, :, -1]], axis=0)
    sees_prev = (rb == prev[:, :, None]).astype(jnp.float32)
    in_last = (rb == rb[:, :, -1:]).astype(jnp.float32)
    return SegmentMasks(rb, sees_prev, in_last, sees_prev[:, :, -1])


def intra_decay_mask(slopes: jax.Array, block: int) -> jax.Array:
    """M [N, C, C] fp32: exp(-s (j - i)) for i <= j else 0. The same for every block: entries
    that touch padded tokens multiply zero q/k/v (or a zero cotangent), so they never count."""
    pos = jnp.arange(block, dtype=jnp.float32)
    diff = pos[:, None] - pos[None, :]
    causal = diff >= 0
    decay = jnp.exp(-slopes.astype(jnp.float32)[:, None, None] * jnp.where(causal, diff, 0.0))
    return jnp.where(causal[None], decay, 0.0)


def _block_terms(mask, log_decay, seg):
    """Decay factors of one block: M [B|1, N, C, C], qd/kd [B|1, C, N], sd [B|1, N]."""
    m = mask[None]
    last = log_decay[-1]
    qd = jnp.exp(log_decay)[None]
    kd = jnp.exp(last[None, :] - log_decay)[None]
    sd = jnp.exp(last)[None]
    if seg is not None:
        runs, sees_prev, in_last, keep = seg  # [B, C] x3, [B]
        same = (runs[:, :, None] == runs[:, None, :]).astype(jnp.float32)
        m = m * same[:, None]
        qd = qd * sees_prev[:, :, None]
        kd = kd * in_last[:, :, None]
        sd = sd * keep[:, None]
    return m, qd, kd, sd


# Intra-block (C x C) matmuls take the input dtype with fp32 accumulation (bf16 on the hot
# path); everything touching the state is fp32.
_F32 = jnp.float32


def _mm(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=_F32)


def _fwd_block(state, q, k, v, terms):
    """One block forward. q, k, v [B, C, N, H]; state [B, N, H, H] fp32 -> (o f32, new_state)."""
    m, qd, kd, sd = terms
    scores = (_mm("bjnh,binh->bnji", q, k) * m).astype(v.dtype)
    o = _mm("bnji,bine->bjne", scores, v)
    o = o + _mm("bjnh,bnhe->bjne", q.astype(_F32) * qd[..., None], state)
    kv = _mm("binh,bine->bnhe", k.astype(_F32) * kd[..., None], v.astype(_F32))
    return o, sd[:, :, None, None] * state + kv


def _bwd_block(d_state, q, k, v, do, state, terms):
    """One block backward given dS_new; returns (dS_prev, dq, dk, dv), all fp32."""
    m, qd, kd, sd = terms
    dp = (_mm("bjne,bine->bnji", do, v) * m).astype(q.dtype)
    p = (_mm("bjnh,binh->bnji", q, k) * m).astype(do.dtype)
    do32 = do.astype(_F32)
    dq = _mm("bnji,binh->bjnh", dp, k) + _mm("bjne,bnhe->bjnh", do32, state) * qd[..., None]
    dk = _mm("bnji,bjnh->binh", dp, q)
    dk = dk + _mm("bine,bnhe->binh", v.astype(_F32), d_state) * kd[..., None]
    dv = _mm("bnji,bjne->bine", p, do)
    dv = dv + _mm("binh,bnhe->bine", k.astype(_F32) * kd[..., None], d_state)
    d_prev = sd[:, :, None, None] * d_state
    d_prev = d_prev + _mm("bjnh,bjne->bnhe", q.astype(_F32) * qd[..., None], do32)
    return d_prev, dq, dk, dv


def _blocks(x, block):
    """[B, nb*C, ...] -> [nb, B, C, ...]."""
    b, tp = x.shape[:2]
    x = x.reshape(b, tp // block, block, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1)


def _unblocks(x):
    """[nb, B, C, ...] -> [B, nb*C, ...]."""
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _forward_scan(q, k, v, slopes, state, runs, block, length):
    log_decay = block_log_decays(slopes, length, block)
    seg = None if runs is None else block_masks(runs, block)
    mask = intra_decay_mask(slopes, block)

    @jax.checkpoint  # keep only the carried states if someone differentiates this directly
    def body(carry, xs):
        qb, kb, vb, ld, sg = xs
        o, new = _fwd_block(carry, qb, kb, vb, _block_terms(mask, ld, sg))
        return new, (o.astype(qb.dtype), carry)

    xs = (_blocks(q, block), _blocks(k, block), _blocks(v, block), log_decay, seg)
    state = match_vma(state, q, k, v, slopes, runs)
    final, (o, starts) = jax.lax.scan(body, state, xs)
    return _unblocks(o), final, starts


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _chunked(q, k, v, slopes, state, runs, block, length):
    o, final, _ = _forward_scan(q, k, v, slopes, state, runs, block, length)
    return o, final


def _chunked_fwd(q, k, v, slopes, state, runs, block, length):
    o, final, starts = _forward_scan(q, k, v, slopes, state, runs, block, length)
    return (o, final), (q, k, v, slopes, runs, starts)


def _chunked_bwd(block, length, res, cts):
    q, k, v, slopes, runs, starts = res
    do, d_final = cts
    log_decay = block_log_decays(slopes, length, block)
    seg = None if runs is None else block_masks(runs, block)
    mask = intra_decay_mask(slopes, block)

    def body(d_state, xs):
        qb, kb, vb, dob, sb, ld, sg = xs
        d_prev, dq, dk, dv = _bwd_block(d_state, qb, kb, vb, dob, sb, _block_terms(mask, ld, sg))
        return d_prev, (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype))

    do = do.astype(q.dtype)
    xs = (*(_blocks(x, block) for x in (q, k, v, do)), starts, log_decay, seg)
    d_final = match_vma(d_final.astype(jnp.float32), q, k, v, do, starts, slopes, runs)
    d_init, (dq, dk, dv) = jax.lax.scan(body, d_final, xs, reverse=True)
    dq, dk, dv = _unblocks(dq), _unblocks(dk), _unblocks(dv)
    d_runs = None if runs is None else jnp.zeros(runs.shape, jax.dtypes.float0)
    return dq, dk, dv, jnp.zeros_like(slopes), d_init, d_runs


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def lightning_attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    block_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked lightning attention. q, k, v [B, T, N, H] -> o [B, T, N, H] (q.dtype), S fp32.

    `block_size` (default 256) is capped at T, so short inputs are not padded to a full block.
    """
    block = DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
    if block < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    block = min(block, q.shape[1])
    p = pad_and_prepare(q, k, v, slopes, initial_state, segment_ids, block)
    # Inside shard_map: make the state vary like the inputs before custom_vjp (its transpose
    # then sums the state's gradient over those axes).
    state = match_vma(p.state, p.q, p.k, p.v, p.runs)
    o, final = _chunked(p.q, p.k, p.v, slopes.astype(jnp.float32), state, p.runs, block, p.length)
    return o[:, : p.length], final
