"""Lightning attention as Pallas Mosaic TPU kernels (forward and backward), with a custom_vjp.

Same block math as `xla.py` (see its docstring for the formulas). Layout: q, k, v are moved to
[B, N, T, H] so a (b, n, block) grid step reads contiguous (C, H) tiles.

Forward kernel, grid (B, N, nb) with the block axis sequential ("arbitrary"): the fp32 state of
head (b, n) lives in a VMEM scratch [H, H] across the block axis; each step writes its (C, H)
output tile, optionally the state it started from (the backward's only residual besides the
inputs), and the final state at the last block.
Backward kernel, same grid walked in reverse through the index maps (block nb-1-i): dS lives in
VMEM scratch, starts at d final_state, and ends as d initial_state; each step writes dq, dk, dv.

Slopes sit in SMEM (one scalar per head). Segment ids arrive as per-token run ids (column and row
layouts for the pairwise mask) plus two precomputed 0/1 masks (`xla.block_masks`).

Tested on CPU in TPU interpret mode (`interpret=True`: `pltpu.InterpretParams()`); not yet run on
TPU hardware. Block sizes must be multiples of 8 (use multiples of 128 on TPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.lightning.xla import DEFAULT_BLOCK_SIZE, block_masks, pad_and_prepare
from pallas_kernels.platform import match_vma

__all__ = ["lightning_attention_tpu"]

_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def _dot(a, b, dims=_NN):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _decays(slope, blk, block, length, seg):
    """Block decay factors: M (C, C), qd (C, 1), kd (C, 1), sd (1, 1); all fp32."""
    n_valid = jnp.minimum(length - blk * block, block)
    col = lax.broadcasted_iota(jnp.int32, (block, 1), 0)
    row = lax.broadcasted_iota(jnp.int32, (1, block), 1)
    l_col = -slope * jnp.minimum(col + 1, n_valid).astype(jnp.float32)
    l_row = -slope * jnp.minimum(row + 1, n_valid).astype(jnp.float32)
    l_last = -slope * n_valid.astype(jnp.float32)
    j = lax.broadcasted_iota(jnp.int32, (block, block), 0)
    causal = j >= lax.broadcasted_iota(jnp.int32, (block, block), 1)
    if seg is not None:
        runs_col, runs_row, sees_prev, in_last = seg
        causal = causal & (runs_col == runs_row)
    m = jnp.where(causal, jnp.exp(jnp.where(causal, l_col - l_row, 0.0)), 0.0)
    qd = jnp.exp(l_col)
    kd = jnp.exp(l_last - l_col)
    sd = jnp.exp(jnp.full((1, 1), l_last, jnp.float32))
    if seg is not None:
        qd, kd = qd * sees_prev, kd * in_last
        sd = sd * sees_prev[block - 1 :, :]  # last token still in the carried segment
    return m, qd, kd, sd


def _fwd_kernel(slopes_ref, *refs, block, length, has_seg, save_states):
    q_ref, k_ref, v_ref = refs[:3]
    seg_refs, refs = (refs[3:7], refs[7:]) if has_seg else ((), refs[3:])
    s0_ref, o_ref, final_ref, *refs = refs
    starts_ref = refs[0] if save_states else None
    state_ref = refs[-1]
    blk = pl.program_id(2)

    @pl.when(blk == 0)
    def _():
        state_ref[...] = s0_ref[...]

    seg = tuple(r[...] for r in seg_refs) if has_seg else None
    m, qd, kd, sd = _decays(slopes_ref[pl.program_id(1)], blk, block, length, seg)
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    state = state_ref[...]
    if save_states:
        starts_ref[...] = state
    scores = (_dot(q, k, _NT) * m).astype(v.dtype)
    o = _dot(scores, v) + _dot(q.astype(jnp.float32) * qd, state)
    o_ref[...] = o.astype(o_ref.dtype)
    new_state = sd * state + _dot(k.astype(jnp.float32) * kd, v.astype(jnp.float32), _TN)
    state_ref[...] = new_state

    @pl.when(blk == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = new_state


def _bwd_kernel(slopes_ref, *refs, block, length, has_seg):
    q_ref, k_ref, v_ref, do_ref = refs[:4]
    seg_refs, refs = (refs[4:8], refs[8:]) if has_seg else ((), refs[4:])
    starts_ref, dfinal_ref, dq_ref, dk_ref, dv_ref, dinit_ref, ds_ref = refs
    i = pl.program_id(2)
    blk = pl.num_programs(2) - 1 - i

    @pl.when(i == 0)
    def _():
        ds_ref[...] = dfinal_ref[...]

    seg = tuple(r[...] for r in seg_refs) if has_seg else None
    m, qd, kd, sd = _decays(slopes_ref[pl.program_id(1)], blk, block, length, seg)
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    f32 = jnp.float32
    q32, k32, v32, do32 = q.astype(f32), k.astype(f32), v.astype(f32), do.astype(f32)
    d_state, state = ds_ref[...], starts_ref[...]
    dp = (_dot(do, v, _NT) * m).astype(q.dtype)
    p = (_dot(q, k, _NT) * m).astype(do.dtype)
    dq = _dot(dp, k) + _dot(do32, state, _NT) * qd
    dk = _dot(dp, q, _TN) + _dot(v32, d_state, _NT) * kd
    dv = _dot(p, do, _TN) + _dot(k32 * kd, d_state)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    ds_ref[...] = sd * d_state + _dot(q32 * qd, do32, _TN)

    @pl.when(i == pl.num_programs(2) - 1)
    def _():
        dinit_ref[...] = ds_ref[...]


def _specs(b, n, nb, block, h, has_seg, reverse):
    """BlockSpecs for (slopes, q, k, v[, do], seg...) on grid (B, N, nb)."""
    idx = (lambda i: nb - 1 - i) if reverse else (lambda i: i)
    tile = pl.BlockSpec((None, None, block, h), lambda bi, ni, i: (bi, ni, idx(i), 0))
    seg = []
    if has_seg:
        col = pl.BlockSpec((None, block, 1), lambda bi, ni, i: (bi, idx(i), 0))
        row = pl.BlockSpec((None, 1, block), lambda bi, ni, i: (bi, 0, idx(i)))
        seg = [col, row, col, col]
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    state = pl.BlockSpec((None, None, h, h), lambda bi, ni, i: (bi, ni, 0, 0))
    start = pl.BlockSpec((None, None, None, h, h), lambda bi, ni, i: (bi, ni, idx(i), 0, 0))
    return smem, tile, seg, state, start


def _params(interpret):
    return dict(
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=pltpu.InterpretParams() if interpret else False,
    )


def _forward(q, k, v, slopes, s0, seg, block, length, interpret, save_states):
    b, n, tp, h = q.shape
    nb = tp // block
    has_seg = seg is not None
    smem, tile, seg_specs, state, start = _specs(b, n, nb, block, h, has_seg, reverse=False)
    out_specs = [tile, state] + ([start] if save_states else [])
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, n, h, h), jnp.float32),
    ]
    if save_states:
        out_shape.append(jax.ShapeDtypeStruct((b, n, nb, h, h), jnp.float32))
    kernel = functools.partial(
        _fwd_kernel, block=block, length=length, has_seg=has_seg, save_states=save_states
    )
    outs = pl.pallas_call(
        kernel,
        grid=(b, n, nb),
        in_specs=[smem, tile, tile, tile, *seg_specs, state],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((h, h), jnp.float32)],
        name="lightning_fwd",
        **_params(interpret),
    )(slopes, q, k, v, *(seg or ()), s0)
    return outs if save_states else (*outs, None)


def _backward(q, k, v, do, slopes, starts, d_final, seg, block, length, interpret):
    b, n, tp, h = q.shape
    nb = tp // block
    has_seg = seg is not None
    smem, tile, seg_specs, state, start = _specs(b, n, nb, block, h, has_seg, reverse=True)
    kernel = functools.partial(_bwd_kernel, block=block, length=length, has_seg=has_seg)
    return pl.pallas_call(
        kernel,
        grid=(b, n, nb),
        in_specs=[smem, tile, tile, tile, tile, *seg_specs, start, state],
        out_specs=[tile, tile, tile, state],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((b, n, h, h), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((h, h), jnp.float32)],
        name="lightning_bwd",
        **_params(interpret),
    )(slopes, q, k, v, do, *(seg or ()), starts, d_final)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _lightning(q, k, v, slopes, s0, seg, block, length, interpret):
    o, final, _ = _forward(q, k, v, slopes, s0, seg, block, length, interpret, False)
    return o, final


def _lightning_fwd(q, k, v, slopes, s0, seg, block, length, interpret):
    o, final, starts = _forward(q, k, v, slopes, s0, seg, block, length, interpret, True)
    return (o, final), (q, k, v, slopes, seg, starts)


def _lightning_bwd(block, length, interpret, res, cts):
    q, k, v, slopes, seg, starts = res
    do, d_final = cts
    dq, dk, dv, d_init = _backward(
        q, k, v, do.astype(q.dtype), slopes, starts, d_final.astype(jnp.float32), seg,
        block, length, interpret,
    )  # fmt: skip
    d_seg = jax.tree.map(
        lambda x: jnp.zeros(x.shape, jax.dtypes.float0 if x.dtype == jnp.int32 else x.dtype), seg
    )
    return dq, dk, dv, jnp.zeros_like(slopes), d_init, d_seg


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def _segment_inputs(runs, block):
    """Kernel segment inputs from padded run ids [B, Tp]: (runs col, runs row, masks col)."""
    masks = block_masks(runs, block)
    b, tp = runs.shape
    to_col = lambda x: jnp.swapaxes(x, 0, 1).reshape(b, tp, 1)  # noqa: E731  [nb,B,C]->[B,Tp,1]
    return (runs[:, :, None], runs[:, None, :], to_col(masks.sees_prev), to_col(masks.in_last))


def lightning_attention_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    block_size: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Pallas TPU lightning attention. q, k, v [B, T, N, H] -> (o q.dtype, final S [B,N,H,H] f32).

    block_size (default 256, a multiple of 8) is capped at T rounded up to 8. k and v are cast to
    q's dtype. `interpret=True` runs the kernels on CPU in TPU interpret mode.
    """
    block = DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
    if block < 8 or block % 8:
        raise ValueError(f"tpu block_size must be a positive multiple of 8, got {block_size}")
    block = min(block, -(-q.shape[1] // 8) * 8)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    p = pad_and_prepare(q, k, v, slopes, initial_state, segment_ids, block)
    seg = None if p.runs is None else _segment_inputs(p.runs, block)
    to_bnth = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, T, N, H] <-> [B, N, T, H]
    state = match_vma(p.state, p.q, p.k, p.v, p.runs)  # see xla.lightning_attention_xla
    o, final = _lightning(
        to_bnth(p.q), to_bnth(p.k), to_bnth(p.v), slopes.astype(jnp.float32), state, seg,
        block, p.length, bool(interpret),
    )  # fmt: skip
    return to_bnth(o)[:, : p.length], final
