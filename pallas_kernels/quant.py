"""Int8 weight-only quantisation with symmetric per-output-channel scales (standalone helpers).

    q, scale = quantize_int8(w, axis=contraction_axis)   # q int8, w's shape; scale: w's shape
                                                        # without `axis`
    w ~= dequantize(q, scale, axis=contraction_axis)     # q * scale, broadcast over `axis`

scale = max |w| / 127 over the contraction axis (one per output channel, and per expert for a
grouped [E,K,N] weight: axis=1 gives scale [E,N]); q = round(w / scale) in [-127, 127]. A
channel that is all zero gets scale 1 and q 0 (no division by zero). Round-trip error per
element is at most scale / 2 (half a quantisation step), before the scale's own rounding.

Because each scale multiplies one output column, x @ dequantize(q, scale) equals
(x @ q.astype(compute)) * scale: the kernels take q and scale as they are, convert int8 tiles
to the compute dtype inside the kernel, and scale the fp32 accumulator before the output cast.

The int8 argument contract of the ops (scale fp32 or bf16; a float weight takes no scale):

    pallas_kernels.moe.grouped_matmul(x [M,K], q [E,K,N] int8, group_sizes [E], scale=[E,N])
        -> [M,N] in x's dtype (the compute dtype); differentiable in x only (frozen weights)
    pallas_kernels.moe.api.grouped_matmul_vjp(x, q, group_sizes, dy, scale=[E,N]) -> (dx, None)
    pallas_kernels.matvec.gathered_matvec(x [A,K], q [E,K,N] int8, index [A], scale=[E,N])
        -> [A,N] fp32 (a plain [K,N] projection is E = 1: q[None], scale[None])

i.e. q, scale = quantize_int8(w, axis=1) for a stacked [E,K,N] weight. Backends: grouped
matmul "tpu"/"tpu_interpret" (`moe/tpu_int8.py`), "gpu"/"gpu_interpret" (`moe/gpu_int8.py`,
Triton), "xla", "padded", "reference"; matvec "gpu"/"gpu_interpret" (Triton) and "xla".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["QMAX", "check_scale", "dequantize", "is_int8", "quantize_int8"]

QMAX = 127  # symmetric: -128 is never produced


def _axis(ndim: int, axis: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-d weight")
    return axis % ndim


def quantize_int8(
    w: jax.Array, axis: int = -2, scale_dtype=jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """w (any float dtype) -> (q int8 like w, scale [w.shape without axis] in scale_dtype).

    axis: the contraction axis (-2: K of a [..., K, N] weight). The scale is rounded to
    scale_dtype first and q is computed against the rounded scale, so dequantize(q, scale)
    is the best int8 fit for the scale actually stored.
    """
    axis = _axis(w.ndim, axis)
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=axis)
    scale = jnp.where(amax > 0, amax / QMAX, 1.0).astype(scale_dtype)
    s = jnp.expand_dims(scale.astype(jnp.float32), axis)
    q = jnp.clip(jnp.round(w32 / s), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array, axis: int = -2, dtype=jnp.float32) -> jax.Array:
    """q int8, scale [q.shape without axis] -> q * scale in dtype (fp32 math). For references
    and tests: the kernels never build this whole array."""
    axis = _axis(q.ndim, axis)
    check_scale(q, scale, axis)
    s = jnp.expand_dims(scale.astype(jnp.float32), axis)
    return (q.astype(jnp.float32) * s).astype(dtype)


def is_int8(w: jax.Array) -> bool:
    """Whether w is an int8 (quantised) weight."""
    return jnp.dtype(w.dtype) == jnp.int8


def check_scale(q: jax.Array, scale: jax.Array | None, axis: int) -> None:
    """Raise ValueError unless (q, scale) follow the int8 contract: q int8 with scale of
    q's shape without `axis` in a float dtype; or q not int8 and scale None."""
    axis = _axis(q.ndim, axis)
    if scale is None:
        if is_int8(q):
            raise ValueError("int8 weights need scale= (per output channel, see quant.py)")
        return
    if not is_int8(q):
        raise ValueError(f"scale= is only for int8 weights, got weights of dtype {q.dtype}")
    want = q.shape[:axis] + q.shape[axis + 1 :]
    if scale.shape != want or not jnp.issubdtype(scale.dtype, jnp.floating):
        raise ValueError(
            f"scale for an int8 weight {q.shape} (contraction axis {axis}) must be a float "
            f"array of shape {want}, got {scale.dtype}{list(scale.shape)}"
        )
