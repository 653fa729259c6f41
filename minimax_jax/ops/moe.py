"""Mixture-of-experts FFN: fp32 router softmax, top-k, renormalise, SwiGLU experts.

Einsum letters: M tokens (B*T flattened), D model dim, E experts, F expert FFN dim, A = M*top_k
token-expert assignments.
Two paths compute the same thing: `moe_dense` runs every expert on every token (a reference
for tests and tiny models), `moe_sorted` sorts assignments by expert and runs grouped matmuls
(dropless).
"""

import jax
import jax.numpy as jnp


def route(x: jax.Array, router: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [M,D], router [D,E] -> (weights [M,k] fp32, experts [M,k] int32, logits [M,E] fp32).

    Logits and softmax are fp32 over all experts; the top-k probabilities are renormalised.
    """
    logits = jnp.einsum(
        "md,de->me",
        x.astype(jnp.float32),
        router.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, top_k)
    return top_p / jnp.sum(top_p, axis=-1, keepdims=True), top_i.astype(jnp.int32), logits


def _swiglu(h: jax.Array) -> jax.Array:
    """h [..., 2, F] (gate, up) -> silu(gate) * up [..., F]."""
    return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


def moe_dense(params: dict, x: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Every expert on every token, combined by the routing weights: x [M,D] -> ([M,D], logits)."""
    weights, experts, logits = route(x, params["router"], top_k)
    combine = jnp.sum(jax.nn.one_hot(experts, params["wi"].shape[0]) * weights[..., None], axis=1)
    h = _swiglu(jnp.einsum("md,edcf->mecf", x, params["wi"]))
    y = jnp.einsum("mef,efd->med", h, params["wo"], preferred_element_type=jnp.float32)
    return jnp.einsum("med,me->md", y, combine).astype(x.dtype), logits


def moe_sorted(params: dict, x: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Dropless sorted dispatch with grouped matmuls. x [M,D] -> ([M,D], router logits [M,E])."""
    m, d = x.shape
    wi, wo = params["wi"], params["wo"]
    e, _, _, f = wi.shape
    weights, experts, logits = route(x, params["router"], top_k)
    flat_expert = experts.reshape(-1)  # [A]
    order = jnp.argsort(flat_expert, stable=True)  # assignments grouped by expert
    token_of = order // top_k  # source token of each sorted row
    group_sizes = jnp.bincount(flat_expert, length=e).astype(jnp.int32)
    xs = jnp.take(x, token_of, axis=0)  # [A,D]
    h = jax.lax.ragged_dot(xs, wi.reshape(e, d, 2 * f), group_sizes)
    h = _swiglu(h.reshape(-1, 2, f))
    y = jax.lax.ragged_dot(h, wo, group_sizes, preferred_element_type=jnp.float32)  # [A,D]
    y = y * weights.reshape(-1)[order][:, None]
    out = jax.ops.segment_sum(y, token_of, num_segments=m)
    return out.astype(x.dtype), logits
