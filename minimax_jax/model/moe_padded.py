"""Expert FFN on capacity-padded groups: batched GEMMs from token rows to assignment rows.

Letters as in `moe.py` (M token rows, D, E experts, F, A assignments, k = A / M rows per token);
C = rows per expert after padding.

    expert_ffn_padded(x [M,D], expert [A] int32, wi [E,D,2,F], wo [E,F,D], *, k) -> [A,D]

Assignment a reads token row a // k and runs expert[a]'s SwiGLU FFN; expert[a] == E marks an
unused row (output 0; the expert-parallel receive buffer has many). The rows are gathered
straight from x into an [E,C,D] operand (group e in block e, zeros after it), both matmuls are
batched GEMMs (cuBLAS on GPU) and the outputs are gathered straight back to assignment order:
no sorted copy of the rows, and no [A,2F] round trip between the two matmuls (the grouped
path's `pallas_kernels.moe` "padded" backend pays both). Exact (dropless) because C is chosen at
run time from a static ladder (`pallas_kernels.moe.padded.capacities`) as the smallest that
holds the largest group, by a `lax.switch`; when none does, the sorted grouped-matmul path
runs instead (`fallback`, a `pallas_kernels.moe` implementation name).

The custom VJP keeps one residual of the grouped path's size whatever the branch (the h
product in assignment order, [A,2F]); a plain switch under autodiff would keep every branch's.
Rounding matches the grouped path: products accumulate in fp32 and are stored in x's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from minimax_jax.model import quant
from pallas_kernels.moe import padded as _padded
from pallas_kernels.moe.api import grouped_matmul_vjp, resolve_implementation
from pallas_kernels.platform import match_vma


def swiglu(h: jax.Array) -> jax.Array:
    """h [..., 2, F] (gate, up) -> silu(gate) * up [..., F] (the experts' activation)."""
    return jax.nn.silu(h[..., 0, :]) * h[..., 1, :]


def _layout(expert: jax.Array, e: int):
    """Sorted order of the assignments and rows per expert (unused rows, expert == E, last)."""
    order = jnp.argsort(expert, stable=True).astype(jnp.int32)
    gs = jnp.zeros((e,), jnp.int32).at[expert].add(1, mode="drop")
    return order, gs


def _slots(expert: jax.Array, order: jax.Array, gs: jax.Array, c: int):
    """(slot [A]: assignment -> row of the flat [E*C] layout (E*C for unused rows),
    source [E*C]: layout row -> assignment, valid [E*C])."""
    e = gs.shape[0]
    a = expert.shape[0]
    starts = jnp.cumsum(gs) - gs
    r = jnp.arange(c, dtype=jnp.int32)
    sorted_idx = starts[:, None] + r[None]  # [E,C]
    valid = (r[None] < gs[:, None]).reshape(-1)
    source = order[jnp.clip(sorted_idx, 0, a - 1)].reshape(-1)
    ranked = jnp.arange(a, dtype=jnp.int32) - starts[jnp.clip(expert[order], 0, e - 1)]
    slot_sorted = jnp.where(expert[order] < e, expert[order] * c + ranked, e * c)
    slot = jnp.zeros((a,), jnp.int32).at[order].set(slot_sorted)
    return slot, source, valid


def _take_rows(y: jax.Array, idx: jax.Array, valid: jax.Array) -> jax.Array:
    """y[idx] with rows where not valid set to zero (idx may be out of range there)."""
    rows = jnp.take(y, jnp.clip(idx, 0, y.shape[0] - 1), axis=0)
    return jnp.where(valid[:, None], rows, jnp.zeros((), y.dtype))


def _einsum(spec, a, b, dtype):
    """A GEMM in the operands' dtype (XLA's 16-bit GEMMs accumulate in fp32 and round once on
    store), then cast. An fp32 result (preferred_element_type) made XLA write the [E,D,2F]
    weight gradient in fp32 and convert it afterwards: ~30 GB of traffic per MiniMax layer."""
    return jnp.einsum(spec, a, b).astype(dtype)


def _padded_fwd_branch(c, k, x, expert, wi, wo):
    e, d, _, f = wi.shape
    order, gs = _layout(expert, e)
    slot, source, valid = _slots(expert, order, gs, c)
    xp = _take_rows(x, source // k, valid).reshape(e, c, d)
    wi2 = quant.as_dtype(quant.reshape(wi, (e, d, 2 * f)), x.dtype)
    h = quant.einsum("ecd,edn->ecn", xp, wi2).astype(x.dtype)  # as `_einsum`, int8 or not
    act = swiglu(h.reshape(e, c, 2, f))
    y = quant.einsum("ecf,efd->ecd", act, quant.as_dtype(wo, x.dtype)).astype(x.dtype)
    used = slot < e * c
    return _take_rows(y.reshape(e * c, d), slot, used), _take_rows(h.reshape(e * c, -1), slot, used)


def _sorted_fwd_branch(impl, k, x, expert, wi, wo):
    e, d, _, f = wi.shape
    order, gs = _layout(expert, e)
    xs = jnp.take(x, order // k, axis=0)  # rows past sum(gs) are unused: their output is 0
    h = quant.grouped_matmul(xs, quant.reshape(wi, (e, d, 2 * f)), gs, implementation=impl)
    y = quant.grouped_matmul(swiglu(h.reshape(-1, 2, f)), wo, gs, implementation=impl)
    inv = _inverse(order)
    return jnp.take(y, inv, axis=0), jnp.take(h, inv, axis=0)


def _inverse(order: jax.Array) -> jax.Array:
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _branches(caps, fallback, k, fn_padded, fn_sorted):
    return [functools.partial(fn_padded, c, k) for c in caps] + [
        functools.partial(fn_sorted, fallback, k)
    ]


def _which(expert, e, caps):
    return _padded.choose(_layout(expert, e)[1], caps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ffn(caps, fallback, k, x, expert, wi, wo):
    return _ffn_fwd(caps, fallback, k, x, expert, wi, wo)[0]


def _ffn_fwd(caps, fallback, k, x, expert, wi, wo):
    branches = _branches(caps, fallback, k, _padded_fwd_branch, _sorted_fwd_branch)
    branches = [lambda *a, b=b: tuple(match_vma(t, a[0]) for t in b(*a)) for b in branches]
    which = _which(expert, wi.shape[0], caps)
    y, h = jax.lax.switch(which, branches, x, expert, wi, wo)
    return y, (x, expert, wi, wo, h, which)


def _padded_bwd_branch(c, k, x, expert, wi, wo, h, dy):
    e, d, _, f = wi.shape
    m = x.shape[0]
    order, gs = _layout(expert, e)
    slot, source, valid = _slots(expert, order, gs, c)
    dyp = _take_rows(dy.astype(x.dtype), source, valid).reshape(e, c, d)
    hp = _take_rows(h, source, valid).reshape(e, c, 2, f)
    act, act_vjp = jax.vjp(swiglu, hp)
    dact = _einsum("ecd,efd->ecf", dyp, wo.astype(x.dtype), x.dtype)
    dwo = _einsum("ecf,ecd->efd", act, dyp, wo.dtype)
    (dh,) = act_vjp(dact)
    dh = dh.reshape(e, c, 2 * f)
    wi2 = wi.reshape(e, d, 2 * f).astype(x.dtype)
    dxp = _einsum("ecn,edn->ecd", dh, wi2, x.dtype).reshape(e * c, d)
    xp = _take_rows(x, source // k, valid).reshape(e, c, d)
    dwi = _einsum("ecd,ecn->edn", xp, dh, wi.dtype)
    used = slot < e * c
    da = _take_rows(dxp, slot, used).astype(jnp.float32)  # [A,D] per assignment
    dx = jnp.sum(da.reshape(m, k, d), axis=1)
    return dx, dwi, dwo


def _sorted_bwd_branch(impl, k, x, expert, wi, wo, h, dy):
    e, d, _, f = wi.shape
    m = x.shape[0]
    order, gs = _layout(expert, e)
    xs = jnp.take(x, order // k, axis=0)
    hs = jnp.take(h, order, axis=0).reshape(-1, 2, f)
    dys = jnp.take(dy.astype(x.dtype), order, axis=0)
    act, act_vjp = jax.vjp(swiglu, hs)
    dact, dwo = grouped_matmul_vjp(act, wo, gs, dys, implementation=impl)
    (dh,) = act_vjp(dact)
    dxs, dwi = grouped_matmul_vjp(xs, wi.reshape(e, d, 2 * f), gs, dh.reshape(-1, 2 * f),
                                  implementation=impl)  # fmt: skip
    used = jnp.arange(order.shape[0]) < jnp.sum(gs)
    dxs = jnp.where(used[:, None], dxs, 0).astype(jnp.float32)
    dx = jnp.take(dxs, _inverse(order), axis=0)  # back to assignment order
    return jnp.sum(dx.reshape(m, k, d), axis=1), dwi.astype(wi.dtype), dwo.astype(wo.dtype)


def _ffn_bwd(caps, fallback, k, res, dy):
    x, expert, wi, wo, h, which = res
    branches = _branches(caps, fallback, k, _padded_bwd_branch, _sorted_bwd_branch)
    branches = [lambda *a, b=b: tuple(match_vma(t, a[0]) for t in b(*a)) for b in branches]
    dx, dwi, dwo = jax.lax.switch(which, branches, x, expert, wi, wo, h, dy)
    return dx.astype(x.dtype), None, dwi.reshape(wi.shape).astype(wi.dtype), dwo.astype(wo.dtype)


_ffn.defvjp(_ffn_fwd, _ffn_bwd)


def expert_ffn_padded(
    x: jax.Array,
    expert: jax.Array,
    wi: jax.Array,
    wo: jax.Array,
    *,
    k: int,
    group_rows: int | None = None,
    fallback: str = "auto",
) -> jax.Array:
    """x [M,D] token rows, expert [A=M*k] int32 in [0, E] (E = unused) -> [A,D] in x's dtype.

    wi, wo: float arrays or int8 `quant.QArray`s (forward only: no gradient to int8 weights).

    group_rows: the expected rows per expert the capacity ladder is built around (default
    ceil(A / E)); fallback: the grouped-matmul implementation for groups the ladder cannot hold.
    """
    e = wi.shape[0]
    a = expert.shape[0]
    if a != x.shape[0] * k:
        raise ValueError(f"expert has {a} rows, expected M*k = {x.shape[0]}*{k}")
    rows = max(1, group_rows if group_rows is not None else -(-a // e))
    caps = _padded.capacities(rows)
    if resolve_implementation(fallback, x.dtype) == "gpu":
        caps = _padded.break_even(caps, rows * e, e)
    # Inside shard_map every operand varies like the rows (custom VJP cotangent types).
    wi, wo, expert = (
        jax.tree.map(lambda a: match_vma(a, x), t) for t in (wi, wo, expert.astype(jnp.int32))
    )
    x = match_vma(x, *jax.tree.leaves(wi))
    return _ffn(caps, fallback, k, x, expert, wi, wo)
