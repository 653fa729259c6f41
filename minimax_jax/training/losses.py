"""Training losses as pure functions: masked next-token cross-entropy and the MoE router losses.

Einsum letters: L layers, B batch, T length, V vocab, E experts. Every function returns a *sum*
and a *count* (or a mean over valid tokens), so gradient accumulation and packed batches can
combine microbatches exactly: the loss of a batch is sum(nll) / sum(count) over all of them.
"""

import jax
import jax.numpy as jnp


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed token NLL and the number of weighted tokens.

    logits [B,T,V] (any float, computed in fp32), targets [B,T] int (any value where the weight
    is 0), weights [B,T] (1 for a predicted token, 0 for padding / document ends).
    Returns (sum of weight * nll, sum of weights), both fp32 scalars.
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    safe = jnp.where(weights > 0, targets, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - picked) * weights), jnp.sum(weights)


def load_balancing_loss(router_logits: jax.Array, top_k: int, mask: jax.Array | None) -> jax.Array:
    """Switch-Transformer load-balancing loss, averaged over layers.

    router_logits [L,B,T,E] fp32, mask [B,T] (1 real token) or None. Per layer,
    E * sum_e f_e * P_e with f_e the fraction of the top-k assignments sent to expert e and P_e
    the mean router probability of e over real tokens. Uniform routing gives exactly 1.0 (the
    minimum); HF's Mixtral/MiniMax ``load_balancing_loss_func`` equals ``top_k`` times this.
    """
    e = router_logits.shape[-1]
    logits = router_logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)  # [L,B,T,E]
    _, top_i = jax.lax.top_k(probs, top_k)
    assigned = jnp.sum(jax.nn.one_hot(top_i, e, dtype=jnp.float32), axis=-2)  # [L,B,T,E]
    w = jnp.ones(logits.shape[1:3], jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    frac = jnp.einsum("lbte,bt->le", assigned, w) / (n * top_k)
    prob = jnp.einsum("lbte,bt->le", probs, w) / n
    return jnp.mean(e * jnp.sum(frac * prob, axis=-1))


def router_z_loss(router_logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """ST-MoE router z-loss: mean over layers and real tokens of logsumexp(router logits)^2.

    router_logits [L,B,T,E], mask [B,T] or None -> fp32 scalar.
    """
    z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1) ** 2  # [L,B,T]
    if mask is None:
        return jnp.mean(z)
    w = mask.astype(jnp.float32)
    return jnp.sum(z * w[None]) / jnp.maximum(jnp.sum(w) * z.shape[0], 1.0)


def shifted_targets(
    tokens: jax.Array, segment_ids: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Next-token targets inside each packed document.

    tokens [B,T] int32, segment_ids [B,T] int32 (0 = padding) -> (targets [B,T], weights [B,T]
    fp32, token mask [B,T] fp32). Position t predicts tokens[t+1] only when both belong to the
    same (non-padding) segment; the last token of a segment and the row's last token get weight 0.
    """
    nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    nxt_seg = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    real = segment_ids > 0
    weights = (real & (nxt_seg == segment_ids)).astype(jnp.float32)
    return nxt, weights, real.astype(jnp.float32)
