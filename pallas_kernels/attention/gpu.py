"""Flash attention on NVIDIA GPUs: a Pallas (Triton backend) kernel, no mask (the ViT's).

Letters as in `api.py`. One program per (q block, batch, head) keeps a [bq, H] fp32 accumulator
and online-softmax statistics (running max and sum, base 2) while it walks the key blocks, so
the [S, S] logits never reach memory. Off a GPU the same kernel runs in Pallas interpret mode.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import platform

__all__ = ["flash_attention_gpu"]


def _flash_kernel(q_ref, k_ref, v_ref, o_ref, *, scale, seq_len, block_k):
    """One (q block, batch, head): online softmax over the key blocks (exp2, fp32 statistics).

    q_ref, o_ref [bq, H]; k_ref, v_ref [Sp, H] (zero-padded past ``seq_len``; those keys are
    masked, in the last block only)."""

    def dot(a, b, trans_b=False):
        dims = (((1,), (1 if trans_b else 0,)), ((), ()))
        return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

    q = q_ref[...]
    bq = q.shape[0]
    c = scale * math.log2(math.e)  # softmax in base 2: exp(x) = exp2(x * log2 e)

    def step(start, carry, masked):
        acc, m, l = carry
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = dot(q, k, trans_b=True) * c  # [bq, bk] fp32
        if masked:
            col = start + lax.broadcasted_iota(jnp.int32, (bq, block_k), 1)
            s = jnp.where(col < seq_len, s, -1e30)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_new[:, None])
        alpha = jnp.exp2(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
        return acc, m_new, l

    full = seq_len // block_k  # key blocks with no padding
    carry = (
        jnp.zeros((bq, q.shape[1]), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    carry = lax.fori_loop(
        0,
        full,
        lambda j, cr: step(pl.multiple_of(j * block_k, block_k), cr, False),
        carry,
    )
    if seq_len % block_k:
        carry = step(full * block_k, carry, True)
    acc, _, l = carry
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("scale", "block_q", "block_k", "num_warps", "num_stages", "interpret")
)
def flash_attention_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    block_q: int = 128,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
) -> jax.Array:
    """Non-causal attention, q/k/v/out [B, S, N, H], fp32 softmax statistics (Pallas, Triton).

    The sequence is zero-padded to a multiple of ``max(block_q, block_k)`` (577 -> 640): the
    padded keys are masked, the padded queries dropped. Grid (q blocks, B, N), q blocks fastest
    so programs that share one head's keys run together. ``interpret`` (default: off a GPU) runs
    the same kernel through Pallas' interpreter.
    """
    b, s, n, h = q.shape
    if interpret is None:
        interpret = not platform.on_gpu()
    step = max(block_q, block_k)
    if step % block_q or step % block_k:
        raise ValueError(f"block_q {block_q} and block_k {block_k} must divide each other")
    sp = -(-s // step) * step
    if sp != s:
        q, k, v = (jnp.pad(t, ((0, 0), (0, sp - s), (0, 0), (0, 0))) for t in (q, k, v))
    kern = functools.partial(_flash_kernel, scale=float(scale), seq_len=s, block_k=block_k)
    q_spec = pl.BlockSpec((None, block_q, None, h), lambda i, bi, ni: (bi, i, ni, 0))
    kv_spec = pl.BlockSpec((None, sp, None, h), lambda i, bi, ni: (bi, 0, ni, 0))
    out = pl.pallas_call(
        kern,
        grid=(sp // block_q, b, n),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct((b, sp, n, h), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_attention",
    )(q, k, v)
    return out[:, :s] if sp != s else out
