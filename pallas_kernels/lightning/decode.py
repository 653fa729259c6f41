"""Single-token lightning attention step (generation): S' = exp(-s) S + k^T v ; o = q S'.

Two implementations with identical numerics (fp32 state, fp32 math):
- `lightning_decode_xla`: one fused jnp expression (XLA fuses it into a single pass over S).
- `lightning_decode_pallas`: a Pallas TPU kernel tiling the B*N rows, G rows per grid step;
  runs on CPU with `interpret=True` (TPU interpret mode).

Shapes: q, k, v [B, N, H]; slopes [N] fp32; state [B, N, H, H] fp32 -> o [B, N, H] (q.dtype),
new state [B, N, H, H] fp32. Plain autodiff works through both (no custom_vjp needed for the
xla one; the Pallas one is inference only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = ["check_decode_inputs", "lightning_decode_pallas", "lightning_decode_xla"]


def check_decode_inputs(
    q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array, state: jax.Array
) -> None:
    """Raise ValueError naming the argument when shapes do not match the decode API."""
    if q.ndim != 3:
        raise ValueError(f"decode q must be [B, N, H] (one token per sequence), got {q.shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {q.shape}, {k.shape}, {v.shape}")
    b, n, h = q.shape
    if slopes.shape != (n,):
        raise ValueError(f"slopes must be [N]={n}, got shape {slopes.shape}")
    if state.shape != (b, n, h, h):
        raise ValueError(f"state must be [B, N, H, H]={(b, n, h, h)}, got {state.shape}")


def lightning_decode_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array, state: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One recurrence step for every (b, n). See the module docstring for shapes."""
    check_decode_inputs(q, k, v, slopes, state)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    decay = jnp.exp(-slopes.astype(jnp.float32))[None, :, None, None]
    new_state = decay * state.astype(jnp.float32) + jnp.einsum("bnh,bne->bnhe", k32, v32)
    o = jnp.einsum("bnh,bnhe->bne", q32, new_state)
    return o.astype(q.dtype), new_state


def _decode_kernel(decay_ref, q_ref, k_ref, v_ref, s_ref, o_ref, s_out_ref):
    # Refs: decay [G, 1, 1]; q, k as columns [G, H, 1]; v as a row [G, 1, H]; state [G, H, H];
    # o [G, 1, H]. Broadcasts and a sublane reduction only: no matmul with a unit dimension.
    f32 = jnp.float32
    new_state = decay_ref[...] * s_ref[...] + k_ref[...].astype(f32) * v_ref[...].astype(f32)
    s_out_ref[...] = new_state
    o = jnp.sum(q_ref[...].astype(f32) * new_state, axis=1, keepdims=True)
    o_ref[...] = o.astype(o_ref.dtype)


def _rows_per_step(rows: int, head_dim: int) -> int:
    # Keep in + out state tiles around 4 MiB of VMEM (2 x G x H x H x 4 bytes, double-buffered).
    budget = max(1, (4 << 20) // (4 * 4 * head_dim * head_dim))
    g = min(rows, budget)
    while rows % g:
        g -= 1
    return g


@functools.partial(jax.jit, static_argnames=("interpret",))
def lightning_decode_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    state: jax.Array,
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Pallas TPU decode step over B*N rows. `interpret=True` runs it on CPU."""
    check_decode_inputs(q, k, v, slopes, state)
    b, n, h = q.shape
    rows = b * n
    g = _rows_per_step(rows, h)
    decay = jnp.broadcast_to(jnp.exp(-slopes.astype(jnp.float32))[None], (b, n))
    decay = decay.reshape(rows, 1, 1)
    q_col, k_col = q.reshape(rows, h, 1), k.reshape(rows, h, 1)
    v_row = v.reshape(rows, 1, h)
    row = pl.BlockSpec((g, 1, h), lambda i: (i, 0, 0))
    col = pl.BlockSpec((g, h, 1), lambda i: (i, 0, 0))
    mat = pl.BlockSpec((g, h, h), lambda i: (i, 0, 0))
    o, new_state = pl.pallas_call(
        _decode_kernel,
        grid=(rows // g,),
        in_specs=[pl.BlockSpec((g, 1, 1), lambda i: (i, 0, 0)), col, col, row, mat],
        out_specs=[row, mat],
        out_shape=[
            jax.ShapeDtypeStruct((rows, 1, h), q.dtype),
            jax.ShapeDtypeStruct((rows, h, h), jnp.float32),
        ],
        input_output_aliases={4: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(decay, q_col, k_col, v_row, state.astype(jnp.float32).reshape(rows, h, h))
    return o.reshape(b, n, h), new_state.reshape(b, n, h, h)
