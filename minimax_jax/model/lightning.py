"""The lightning-attention layer around the recurrence kernel.

Einsum letters: B batch, T length, D model dim, N heads, H head dim, C = 3 (q, k, v).
The recurrence itself (decay exp(-slope) per token, fp32 state [B,N,H,H]) lives in
`pallas_kernels.lightning`, which picks an XLA or Pallas implementation by platform.
"""

import jax

from minimax_jax.model.norm import rms_norm
from minimax_jax.model.proj import proj
from pallas_kernels.lightning.api import lightning_attention, lightning_decode


def lightning_attention_layer(
    params: dict,
    x: jax.Array,
    slopes: jax.Array,
    *,
    token_mask: jax.Array | None,
    norm_eps: float,
    block_size: int,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    implementation: str = "auto",
    matvec: str = "xla",
    core=None,
) -> tuple[jax.Array, jax.Array | None]:
    """params: qkv [D,N,3,H], gate [D,N,H], norm [N,H], out [N,H,D]; x [B,T,D]; slopes [N] fp32.

    token_mask [B,T] (1 = token, 0 = padding) zeroes q, k, v at padded positions, so left-padded
    rows leave the state untouched until their first token. core: replaces the recurrence as
    core(q, k, v, slopes, segment_ids, initial_state) -> (o, final state) (sequence
    parallelism, `minimax_jax.model.sequence`). Returns (y [B,T,D], state [B,N,H,H] or None).
    """
    b, t, _ = x.shape
    n, h = params["norm"].shape
    qkv = jax.nn.silu(proj("btd,dnch->btnch", x, params["qkv"], matvec=matvec))
    if token_mask is not None:
        qkv = qkv * token_mask[:, :, None, None, None].astype(qkv.dtype)
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    if t == 1 and initial_state is not None and segment_ids is None:
        # One decode step: a bandwidth-bound update of the fp32 state.
        o, state = lightning_decode(
            q[:, 0], k[:, 0], v[:, 0], slopes, initial_state, implementation=implementation
        )
        o = o[:, None]
    elif core is not None:
        o, state = core(q, k, v, slopes, segment_ids, initial_state)
    else:
        o, state = lightning_attention(
            q,
            k,
            v,
            slopes,
            initial_state=initial_state,
            segment_ids=segment_ids,
            block_size=block_size,
            implementation=implementation,
        )
    o = rms_norm(o.reshape(b, t, n * h), params["norm"].reshape(n * h), norm_eps)
    gate = jax.nn.sigmoid(proj("btd,dnh->btnh", x, params["gate"], matvec=matvec))
    o = (gate * o.reshape(b, t, n, h)).astype(x.dtype)
    return proj("btnh,nhd->btd", o, params["out"], matvec=matvec), state
