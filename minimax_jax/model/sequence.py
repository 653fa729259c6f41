"""Sequence (context) parallelism: the attention cores on tokens split over the `sequence` axis.

With a mesh whose rules map the `length` logical axis to the `sequence` mesh axis (every preset
does; a size-1 axis changes nothing), each device holds one contiguous shard of every row's
tokens. Everything token-wise (projections, norms, the MoE, RoPE) runs on the shards as it is;
only the two attention cores need the other shards, and they run here inside `jax.shard_map`:

- lightning: each shard runs the recurrence from a zero state, the shards' fp32 final states
  [B,N,H,H] are all-gathered, a P-step scan gives each shard the state it really starts from and
  a query-side correction adds it (`pallas_kernels.lightning.sharded`). Sent per device and layer:
  (P - 1) x B x N x H x H x 4 bytes, independent of the length (forward; the same back).
- softmax: K, V and the key-side visibility (indices, validity, segments) are all-gathered over
  the axis and each shard's queries attend over all keys with the blockwise online softmax (or
  the dense "xla" reference); the gradient of the gather is a reduce-scatter of dK, dV. Sent per
  device and layer: (P - 1) / P x B x T x K x H x 2 x 2 bytes in bf16 (K and V), e.g. 3.5 GiB
  for MiniMax-Text-01 (K = 8, H = 128) at 1M tokens over P = 8; the queries never move. An
  all-gather, not a ring: with 8 kv heads against 64 query heads the gathered K/V are an
  eighth of the query shards' size, and one collective per layer is simpler to overlap than
  P ring steps.

Causal load balance: contiguous shards leave the last shard the most visible key tiles (the
blockwise kernel skips invisible tiles, so shard p does ~(2p + 1) / P^2 of the work). Zig-zag
order is not applied: the lightning recurrence needs contiguous shards in global order, and a
zig-zag permutation would make every lightning layer exchange states twice per shard pair.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from minimax_jax.model.attention import Visibility, attention, dot_product_attention
from pallas_kernels.attention.blockwise import blockwise_attention
from pallas_kernels.lightning.sharded import lightning_attention_seq_sharded

SEQUENCE = "sequence"
_QKV = ("batch", "length", "act_heads", None)


def sequence_size(mesh) -> int:
    """Size of the mesh's sequence axis (1 without a mesh or without the axis)."""
    if mesh is None or SEQUENCE not in mesh.shape:
        return 1
    return mesh.shape[SEQUENCE]


def check_length(mesh, rules, t: int, what: str = "the sequence length") -> None:
    """Raises a one-line ValueError unless the sequence axis divides t (before compiling)."""
    p = sequence_size(mesh)
    if p > 1 and rules is not None and SEQUENCE in rules.mesh_axes("length") and t % p:
        raise ValueError(
            f"mesh axis sequence={p} does not divide {what} ({t} tokens): pad or pack rows to "
            f"a multiple of {p}, or use a sequence size that divides {t}"
        )


def _length_entry(mesh, rules, shape) -> str | tuple | None:
    """The mesh axes the token axis of an activation [B,T,...] is split over (None: not split)."""
    if sequence_size(mesh) == 1 or rules is None:
        return None
    spec = rules.spec(("batch", "length"), mesh, shape[:2])
    entry = spec[1] if len(spec) > 1 else None
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return entry if SEQUENCE in axes else None


def is_sequence_sharded(mesh, rules, x: jax.Array) -> bool:
    """Whether the token axis of x [B,T,...] is split over the sequence axis."""
    return _length_entry(mesh, rules, x.shape) is not None


def lightning_core(
    q, k, v, slopes, segment_ids, initial_state=None, *, mesh, rules, implementation, block_size
):
    """q, k, v [B,T,N,H] (global, token axis split over sequence), initial_state [B,N,H,H] fp32
    or None (a cached prefill chunk: the cache's state, replicated over sequence) ->
    (o [B,T,N,H], final state [B,N,H,H] fp32 of the whole chunk, replicated over sequence)."""
    qs = rules.spec(_QKV, mesh, q.shape)
    axis, heads, tok = qs[1], P(qs[2]), P(qs[0], qs[1])
    state = P(qs[0], qs[2], None, None)
    given = initial_state is not None

    def body(q, k, v, slopes, *rest):
        init = rest[0] if given else None
        seg = rest[-1] if segment_ids is not None else None
        return lightning_attention_seq_sharded(
            q, k, v, slopes, axis_name=axis, initial_state=init, segment_ids=seg,
            implementation=implementation, block_size=block_size,
        )  # fmt: skip

    args, specs = (q, k, v, slopes), (qs, qs, qs, heads)
    if given:
        args, specs = args + (initial_state,), specs + (state,)
    if segment_ids is not None:
        args, specs = args + (segment_ids,), specs + (tok,)
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(qs, state))(*args)


def softmax_core(q, k, v, vis: Visibility, scale: float, impl: str, *, mesh, rules, block):
    """q [B,T,N,H], k/v [B,T,K,H] (token axis split over sequence), vis over the T positions
    -> [B,T,N,H]. impl "xla": the dense reference per shard; anything else: blockwise."""
    qs, ks = rules.spec(_QKV, mesh, q.shape), rules.spec(_QKV, mesh, k.shape)
    tok = P(qs[0], qs[1])
    # each device's query heads must read its own kv heads
    if ks[2] != qs[2]:  # kv heads cannot split like the query heads: give each query its own
        g = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        ks = qs
    axis = qs[1]
    segments = vis.q_segment is not None

    def body(q, k, v, q_index, kv_index, kv_valid, *seg):
        gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)  # noqa: E731
        k, v, kv_index, kv_valid = gather(k), gather(v), gather(kv_index), gather(kv_valid)
        q_seg, kv_seg = (seg[0], gather(seg[1])) if segments else (None, None)
        if impl == "xla":
            full = Visibility(q_index, kv_index, kv_valid, q_seg, kv_seg)
            return dot_product_attention(q, k, v, full.mask(), scale)
        return blockwise_attention(
            q, k, v, scale=scale, q_index=q_index, kv_index=kv_index, kv_valid=kv_valid,
            q_segment=q_seg, kv_segment=kv_seg, block_q=block, block_k=block,
        )  # fmt: skip

    args = (q, k, v, vis.q_index, vis.kv_index, vis.kv_valid)
    specs = (qs, ks, ks, tok, tok, tok)
    if segments:
        args += (vis.q_segment, vis.kv_segment)
        specs += (tok, tok)
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=qs)(*args)


def cached_softmax_core(
    q, k, v, vis: Visibility, scale: float, index, impl: str, *, mesh, rules, runs: bool
):
    """A prefill chunk against the KV cache with the chunk's queries split over sequence.

    q [B,T,N,H] (token axis split over sequence); k, v [B,S,K,H]: the whole cache with the
    chunk's K, V already written (slots not split over sequence: every device holds all S
    slots, so writing the chunk is the K/V all-gather); vis: q_index [B,T] split like q,
    kv_index / kv_valid [B,S] whole; index: int32 slot of the chunk's first token. Each device
    runs `attention` for its T/P queries over all S slots, as a chunk starting at slot
    index + p * T/P, so every implementation (cuDNN's chunk path included) sees its own
    queries' slots. -> [B,T,N,H] split like q.
    """
    qs = rules.spec(_QKV, mesh, q.shape)
    ks = rules.spec(("batch", None, "act_heads", None), mesh, k.shape)
    if ks[2] != qs[2]:  # kv heads cannot split like the query heads: give each query its own
        g = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        ks = rules.spec(("batch", None, "act_heads", None), mesh, k.shape)
    axis, tok, row = qs[1], P(qs[0], qs[1]), P(qs[0], None)

    def body(q, k, v, q_index, kv_index, kv_valid, index):
        start = index + jax.lax.axis_index(axis).astype(jnp.int32) * q.shape[1]
        local = Visibility(q_index, kv_index, kv_valid)
        return attention(q, k, v, local, scale, impl, chunk_start=start, runs=runs)

    args = (q, k, v, vis.q_index, vis.kv_index, vis.kv_valid, index)
    specs = (qs, ks, ks, tok, row, row, P())
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=qs)(*args)


def gathered_kv_bytes(config, batch: int, t: int, p: int, kv_bytes: int = 2) -> int:
    """Bytes one device receives per softmax layer in the K/V all-gather (forward)."""
    return math.ceil((p - 1) / p * batch * t * config.num_kv_heads * config.head_dim * 2 * kv_bytes)
