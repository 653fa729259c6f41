"""Reference lightning attention: the fp32 token recurrence and the quadratic masked form.

Both define the semantics every fast path is tested against (letters as in `api.py`):

    S_t = [t not a segment start] * exp(-s) * S_{t-1} + k_t^T v_t ;   o_t = q_t S_t

with S_{-1} = initial_state. A token starts a new segment when its segment id differs from the
previous token's id; the state is then reset to zero, so `initial_state` only reaches the tokens
before the first change of id. Segments are identified by "run ids" (cumulative count of id
changes), so ids that reappear later (e.g. 0 0 1 1 0 0) still start a fresh segment.

Also holds the small helpers that every implementation shares (input checks, run ids).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.platform import match_vma

__all__ = [
    "check_inputs",
    "lightning_attention_quadratic",
    "lightning_attention_reference",
    "segment_runs",
]


def check_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array | None,
    segment_ids: jax.Array | None,
) -> None:
    """Raise ValueError naming the offending argument when shapes do not match the API."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, N, H], got shape {q.shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {q.shape}, {k.shape}, {v.shape}")
    b, t, n, h = q.shape
    if t == 0:
        raise ValueError("sequence length T must be >= 1")
    if slopes.shape != (n,):
        raise ValueError(f"slopes must be [N]={n}, got shape {slopes.shape}")
    if initial_state is not None and initial_state.shape != (b, n, h, h):
        raise ValueError(
            f"initial_state must be [B, N, H, H]={(b, n, h, h)}, got {initial_state.shape}"
        )
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T]={(b, t)}, got {segment_ids.shape}")


def segment_runs(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Run ids [B, T] int32: 0 for the tokens before the first id change, +1 at every change."""
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate(
        [jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(change, axis=1, dtype=jnp.int32)], axis=1
    )


def _zero_state(q: jax.Array, initial_state: jax.Array | None) -> jax.Array:
    b, _, n, h = q.shape
    if initial_state is None:
        return jnp.zeros((b, n, h, h), jnp.float32)
    return initial_state.astype(jnp.float32)


def lightning_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token fp32 recurrence (`lax.scan` over T). q, k, v [B, T, N, H] -> o, S [B,N,H,H].

    Differentiable by plain autodiff (stores one state per token: tests only).
    """
    check_inputs(q, k, v, slopes, initial_state, segment_ids)
    b, t, _, _ = q.shape
    runs = segment_runs(segment_ids, b, t)
    reset = jnp.concatenate([jnp.zeros((b, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)
    decay = jnp.exp(-slopes.astype(jnp.float32))[None, :, None, None]  # [1, N, 1, 1]

    def step(state, xs):
        qt, kt, vt, rt = xs  # [B, N, H] x3, [B]
        state = jnp.where(rt[:, None, None, None], 0.0, decay * state)
        state = state + jnp.einsum("bnh,bne->bnhe", kt, vt)
        return state, jnp.einsum("bnh,bnhe->bne", qt, state)

    f32 = lambda x: jnp.swapaxes(x.astype(jnp.float32), 0, 1)  # noqa: E731  [T, B, ...]
    s0 = match_vma(_zero_state(q, initial_state), q, k, v, reset, slopes)
    state, o = jax.lax.scan(step, s0, (f32(q), f32(k), f32(v), reset.T))
    return jnp.swapaxes(o, 0, 1).astype(q.dtype), state


def lightning_attention_quadratic(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Quadratic masked form o = ((Q K^T) * D) V + decayed initial-state term (O(T^2) memory).

    D[j, i] = exp(-s (j - i)) when i <= j and i, j are in the same segment, else 0.
    """
    check_inputs(q, k, v, slopes, initial_state, segment_ids)
    b, t, _, _ = q.shape
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    s = slopes.astype(jnp.float32)
    runs = segment_runs(segment_ids, b, t)
    pos = jnp.arange(t, dtype=jnp.float32)
    diff = pos[:, None] - pos[None, :]  # [T(j), T(i)]
    causal = diff >= 0
    mask = causal[None] & (runs[:, :, None] == runs[:, None, :])  # [B, T, T]
    decay = jnp.exp(-s[:, None, None] * jnp.where(causal, diff, 0.0)[None])  # [N, T, T]
    d = jnp.where(mask[:, None], decay[None], 0.0)  # [B, N, T, T]
    scores = jnp.einsum("bjnh,binh->bnji", q32, k32) * d
    o = jnp.einsum("bnji,bine->bjne", scores, v32)

    s0 = _zero_state(q, initial_state)
    first = (runs == 0).astype(jnp.float32)  # tokens that still see the initial state
    q_decay = jnp.exp(-s[None, :] * (pos[:, None] + 1.0))  # [T, N]
    o = o + jnp.einsum("bjnh,bnhe->bjne", q32 * (first[:, :, None] * q_decay)[..., None], s0)

    last = runs[:, -1:]
    k_w = (runs == last).astype(jnp.float32)[:, :, None] * jnp.exp(
        -s[None, :] * (t - 1.0 - pos[:, None])
    )  # [B, T, N]
    state = jnp.einsum("bin,binh,bine->bnhe", k_w, k32, v32)
    keep = (last[:, 0] == 0).astype(jnp.float32)[:, None] * jnp.exp(-s * t)[None]  # [B, N]
    state = state + keep[:, :, None, None] * s0
    return o.astype(q.dtype), state
