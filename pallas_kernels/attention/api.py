"""Softmax attention without a mask (a ViT's): dispatcher.

Letters: B batch, S sequence length (queries and keys), N heads, H head dim.

    attention(q, k, v, implementation="xla", *, scale=None) -> o
    auto_candidates(dtype, head_dim) -> what "auto" tries, in order
    cudnn_unsupported(q) -> why cuDNN flash attention cannot run q here, or None

o = softmax(q k^T * scale) v for q, k, v, o [B, S, N, H] in q's dtype (scale default H**-0.5);
logits and softmax statistics in fp32, probabilities cast to v's dtype for the value product.

Implementations:
    "xla"     jax.nn.dot_product_attention(implementation="xla"): the [B, N, S, S] logits are
              materialised (exact in fp32, any backend: the always-working path)
    "cudnn"   jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention (CUDA
              GPUs, bf16/fp16, head dim a multiple of 8 and at most 128: `cudnn_unsupported`)
    "pallas"  `gpu.flash_attention_gpu`: a Pallas (Triton) flash kernel, sequence zero-padded to
              a multiple of 128 with the padded keys masked (GPU; interpret mode elsewhere)
    "auto"    the first of `auto_candidates(dtype, H)` that traces: on a GPU with bf16/fp16
              cudnn, then pallas, then xla; xla otherwise. A failure that shows only at compile
              or run time is the caller's to catch (the VL model's `encode_tiles` does).
`reference.attention_reference` is the fp32 reference the tests hold these to.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.attention import gpu as _gpu

__all__ = ["IMPLEMENTATIONS", "attention", "auto_candidates", "cudnn_unsupported"]

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "pallas")
_16_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def cudnn_unsupported(q: Any) -> str | None:
    """Why cuDNN flash attention cannot run q [..., H] (anything with .dtype and .shape) here,
    or None when it can."""
    if not platform.on_gpu():
        return f"needs a CUDA GPU (the default backend is {platform.backend()})"
    if jnp.dtype(q.dtype) not in _16_BIT:
        return f"needs bfloat16 or float16 activations (got {q.dtype})"
    h = q.shape[-1]
    if h % 8 or h > 128:
        return f"needs a head dim that is a multiple of 8 and at most 128 (got {h})"
    return None


def _pallas_supported(dtype: Any, head_dim: int) -> bool:
    """The flash kernel on a GPU, 16-bit operands, head dim 16..256 and a multiple of 16
    (Triton's dot needs >= 16); fp32 keeps the exact XLA path."""
    return (
        platform.on_gpu()
        and jnp.dtype(dtype) in _16_BIT
        and head_dim % 16 == 0
        and 16 <= head_dim <= 256
    )


def auto_candidates(dtype: Any, head_dim: int) -> tuple[str, ...]:
    """What ``implementation="auto"`` tries, in order (the last one, ``"xla"``, always works).

    Fused kernels only on a GPU and only for bf16 / fp16 (fp32 keeps the exact XLA path):
    cuDNN flash attention, then the Pallas kernel.
    """
    out = []
    if cudnn_unsupported(jax.ShapeDtypeStruct((head_dim,), dtype)) is None:
        out.append("cudnn")
    if _pallas_supported(dtype, head_dim):
        out.append("pallas")
    return (*out, "xla")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    implementation: str = "xla",
    *,
    scale: float | None = None,
) -> jax.Array:
    """softmax(q k^T * scale) v for q, k, v [B, S, N, H] (no mask) -> [B, S, N, H].

    ``implementation`` in IMPLEMENTATIONS (module docstring). "auto" falls back at trace time
    only.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if implementation == "auto":
        for cand in auto_candidates(q.dtype, q.shape[-1])[:-1]:
            try:
                return attention(q, k, v, cand, scale=scale)
            except Exception:  # noqa: BLE001 - unsupported here: try the next one
                continue
        implementation = "xla"
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    if implementation == "pallas":
        return _gpu.flash_attention_gpu(q, k, v, scale=scale)
    raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {implementation!r}")
