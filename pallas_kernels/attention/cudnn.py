"""cuDNN flash attention that also returns the log-sum-exp, for merging partial attentions.

Letters: B batch, T query length, S key length, N query heads, K kv heads (N % K == 0), H head
dim.

    cudnn_attention_lse(q, k, v, *, scale, q_len=None, kv_len=None, causal=False,
                        emulate=False) -> (out [B,T,N,H] in q's dtype, lse [B,T,N] fp32)

Query t of row b sees key s iff t < q_len[b], s < kv_len[b] and (causal) s <= t: cuDNN's
padding mask (valid tokens first in each row) and its top-left causal mask. lse is the natural
log of sum_s exp(scale * q.k) over the visible keys, in fp32. A query that sees no key (t past
q_len, or kv_len == 0) gets out = 0 and lse = -inf whatever the kernel left there, so partial
results merge exactly:

    lse = logaddexp(lse1, lse2);  out = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse)

JAX's public `jax.nn.dot_product_attention(return_residual=True)` casts the log-sum-exp to the
output dtype (bf16 spacing is 0.125 at 16-32: up to 3% error in the merge weights), so this calls
the cuDNN primitive of `jax._src.cudnn.fused_attention_stablehlo`, whose statistics are fp32.
That module is private: `cudnn_lse_unsupported()` says why it cannot be used here (no GPU, or an
API this code does not know), and callers fall back. Lengths of q and k must be even (JAX's
cuDNN training-mode kernels, which return the statistics, take even lengths only).

``emulate=True`` computes the same contract in plain XLA with the [B,K,G,T,S] logits
materialised: the CPU tests of the merging logic run on it, and the GPU tests hold the cuDNN
path to it.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from pallas_kernels.attention.api import cudnn_unsupported

__all__ = ["cudnn_attention_lse", "cudnn_lse_unsupported"]


def _private_api():
    """(dot_product_attention, MaskType) of JAX's cuDNN module, or a reason string."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError as e:  # pragma: no cover - depends on the JAX build
        return f"JAX's cuDNN attention module is not importable ({e})"
    fn = getattr(fa, "dot_product_attention", None)
    mask_type = getattr(fa, "MaskType", None)
    if fn is None or mask_type is None:
        return "JAX's cuDNN attention module has no dot_product_attention / MaskType"
    params = inspect.signature(fn).parameters
    need = ("q_seqlen", "kv_seqlen", "mask_type", "scale", "return_residual")
    missing = [p for p in need if p not in params]
    if missing:
        return f"JAX's cuDNN dot_product_attention lacks {missing}"
    return fn, mask_type


def cudnn_lse_unsupported(q, k=None) -> str | None:
    """Why `cudnn_attention_lse` cannot run q [B,T,N,H] (and k [B,S,K,H]) here, or None."""
    why = cudnn_unsupported(q)
    if why is not None:
        return why
    if q.shape[1] % 2 or (k is not None and k.shape[1] % 2):
        return "needs even query and key lengths"
    api = _private_api()
    return api if isinstance(api, str) else None


def _visible_any(b: int, t: int, q_len, kv_len) -> jax.Array:
    """bool [B,T]: query t sees at least one key (key 0 when kv_len > 0, also when causal)."""
    qi = jnp.arange(t, dtype=jnp.int32)[None]
    ok = jnp.ones((b, t), bool)
    if q_len is not None:
        ok &= qi < q_len[:, None]
    if kv_len is not None:
        ok &= (kv_len > 0)[:, None]
    return ok


def _emulated(q, k, v, scale, q_len, kv_len, causal):
    """The contract in plain XLA (logits materialised)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    ti = jnp.arange(t, dtype=jnp.int32)[:, None]
    si = jnp.arange(s, dtype=jnp.int32)[None, :]
    vis = jnp.ones((b, t, s), bool)
    if q_len is not None:
        vis &= ti < q_len[:, None, None]
    if kv_len is not None:
        vis &= si < kv_len[:, None, None]
    if causal:
        vis &= (si <= ti)[None]
    logits = jnp.where(vis[:, None, None], logits, -jnp.inf)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B,K,G,T], -inf where nothing is visible
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    probs = jnp.exp(logits - safe[..., None]).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    out = out.reshape(b, t, n, h).astype(q.dtype)
    lse = jnp.moveaxis(lse.reshape(b, n, t), 1, 2)
    return out, lse


def cudnn_attention_lse(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    q_len: jax.Array | None = None,
    kv_len: jax.Array | None = None,
    causal: bool = False,
    emulate: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(out [B,T,N,H], lse [B,T,N] fp32) of softmax attention under cuDNN's masks (module doc).

    q [B,T,N,H], k/v [B,S,K,H]; q_len, kv_len int32 [B] (both or neither: the valid queries and
    keys come first in each row); causal: key s visible to query t only when s <= t.
    """
    b, t = q.shape[:2]
    if (q_len is None) != (kv_len is None):
        raise ValueError("q_len and kv_len go together (cuDNN's padding mask takes both)")
    if q_len is not None:
        q_len, kv_len = q_len.astype(jnp.int32), kv_len.astype(jnp.int32)
    if emulate:
        out, lse = _emulated(q, k, v, scale, q_len, kv_len, causal)
    else:
        why = cudnn_lse_unsupported(q, k)
        if why is not None:
            raise ValueError(f"cudnn_attention_lse {why}")
        fn, mask_type = _private_api()
        if q_len is None:
            kind = mask_type.CAUSAL if causal else mask_type.NO_MASK
        else:
            kind = mask_type.PADDING_CAUSAL if causal else mask_type.PADDING
        out, lse = fn(
            q, k.astype(q.dtype), v.astype(q.dtype), q_seqlen=q_len, kv_seqlen=kv_len,
            scale=float(scale), mask_type=kind, return_residual=True,
        )  # fmt: skip
        lse = jnp.swapaxes(lse.astype(jnp.float32), 1, 2)  # cuDNN gives [B,N,T]
    ok = _visible_any(b, t, q_len, kv_len)
    out = jnp.where(ok[:, :, None, None], out, jnp.zeros((), out.dtype))
    lse = jnp.where(ok[:, :, None], lse, -jnp.inf)
    return out, lse
