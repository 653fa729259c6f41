"""Sequence-sharded lightning attention: each device holds one contiguous T shard.

Call `lightning_attention_seq_sharded` inside `jax.shard_map` with T split over `axis_name`.
The recurrence is linear in its initial state, so every shard runs the op once from a zero state
and is then corrected with the state it really starts from:

    o_p   = o_p(0) + (Q_p * exp(-s (j + 1)) [token j still in the shard's first segment]) S_in(p)
    S_out(p) = S_p(0) + exp(-s T_p) [no segment starts inside shard p] S_in(p)
    S_in(p)  = [shard p continues shard p-1's segment] S_out(p-1),   S_in(0) = initial_state

The shards' local final states (P x [B, N, H, H] fp32) are all-gathered and the short sequential
scan over P shards runs redundantly on every device. Gradients flow through the local op's
custom_vjp and the collectives. Letters as in `api.py`; P = number of shards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.lightning.api import lightning_attention
from pallas_kernels.lightning.reference import segment_runs
from pallas_kernels.platform import match_vma

__all__ = ["lightning_attention_seq_sharded"]


def lightning_attention_seq_sharded(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    *,
    axis_name: str,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    implementation: str = "auto",
    block_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-shard view: q, k, v [B, T/P, N, H] local shards; initial_state [B, N, H, H] (the same
    on every shard: the state before the whole sequence); segment_ids [B, T/P] local shard.

    Returns (o [B, T/P, N, H] local, final_state [B, N, H, H] fp32 of the whole sequence, equal
    on every shard).
    """
    b, t, n, h = q.shape
    o_local, s_local = lightning_attention(
        q, k, v, slopes, segment_ids=segment_ids,
        implementation=implementation, block_size=block_size,
    )  # fmt: skip
    s = jax.lax.stop_gradient(slopes.astype(jnp.float32))
    runs = segment_runs(segment_ids, b, t)
    keep = jnp.exp(-s * t)[None] * (runs[:, -1:] == 0).astype(jnp.float32)  # [B, N]
    if segment_ids is None:
        cont = jnp.ones((b,), jnp.float32)  # shard p continues shard p-1
    else:
        prev_last = jax.lax.ppermute(
            segment_ids[:, -1], axis_name, [(i, i + 1) for i in range(_axis_size(axis_name) - 1)]
        )
        cont = (segment_ids[:, 0] == prev_last).astype(jnp.float32)

    all_s = jax.lax.all_gather(s_local, axis_name)  # [P, B, N, H, H]
    all_keep = jax.lax.all_gather(keep, axis_name)  # [P, B, N]
    all_cont = jax.lax.all_gather(cont, axis_name)  # [P, B]
    if initial_state is None:
        initial_state = jnp.zeros((b, n, h, h), jnp.float32)

    def step(carry, xs):
        s_p, keep_p, cont_p = xs
        s_in = carry * cont_p[:, None, None, None]
        return s_p + keep_p[:, :, None, None] * s_in, s_in

    # Shard 0's "continues" flag is meaningless: it starts from initial_state.
    all_cont = all_cont.at[0].set(1.0)
    init = match_vma(initial_state.astype(jnp.float32), all_s, all_keep, all_cont)
    final, s_ins = jax.lax.scan(step, init, (all_s, all_keep, all_cont))
    me = jax.lax.axis_index(axis_name)
    s_in = s_ins[me]  # [B, N, H, H]
    # Every shard holds the same `final`; one psum makes it replicated (invariant) for out_specs.
    final = jax.lax.psum(jnp.where(me == 0, final, 0.0), axis_name)

    pos = jnp.arange(1, t + 1, dtype=jnp.float32)
    q_decay = jnp.exp(-pos[:, None] * s[None, :])[None] * (runs == 0)[:, :, None]  # [B, T, N]
    corr = jnp.einsum("btnh,bnhe->btne", q.astype(jnp.float32) * q_decay[..., None], s_in)
    return (o_local.astype(jnp.float32) + corr).astype(q.dtype), final


def _axis_size(axis_name: str) -> int:
    return jax.lax.axis_size(axis_name)
