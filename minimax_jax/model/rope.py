"""NeoX-style (rotate_half) rotary embedding on the first `rotary_dim` dims of each head.

MiniMax rotates only the first 64 of 128 head dims (partial RoPE); `rotary_dim == head_dim`
gives the full rotation that transformers' native MiniMax applies. Tables are computed in fp32.
"""

import jax
import jax.numpy as jnp


def rope_tables(positions: jax.Array, rotary_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rotary_dim] fp32 for integer positions [B, T]."""
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    inv_freq = 1.0 / (jnp.float32(theta) ** exponents)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first cos.shape[-1] dims of x [B, T, heads, H]; the rest pass through.

    cos, sin: [B, T, R] with R <= H even. Computed in fp32, returned in x's dtype.
    """
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r].astype(jnp.float32), x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = (x_rot * c + rotated * s).astype(x.dtype)
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out
