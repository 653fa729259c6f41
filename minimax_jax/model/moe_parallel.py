"""Expert-parallel MoE: `jax.shard_map` over the mesh, tokens travel to the experts and back.

Letters as in `moe.py` (M tokens, D model dim, E experts, F expert FFN dim, A = M*k rows);
P = size of the expert mesh axes, El = E / P experts per device.

Mesh axes come from the sharding rules (`minimax_jax.sharding`): tokens are split over the
`batch` axes, experts over the `experts` axes, the expert FFN width over the `mlp` axes (tensor
parallel inside each expert: partial sums, one psum of the [M,D] output). Three cases:

* no expert axis: every device runs all experts on its own tokens (`moe_sorted`).
* tokens split over the expert axis (training, prefill): each device routes its tokens, sorts
  the assignments by expert and sends each contiguous run to the device holding those experts
  (`ragged_all_to_all`); the receiver regroups the rows by local expert, runs the grouped
  matmuls, and the results travel back the same way, landing in the sender's sorted order.
* tokens replicated over the expert axis (small decode batches): each device computes only its
  own experts' rows of every token; a psum over the expert axis adds them up.

Dropless by default: receive buffers hold the worst case (P*A rows; `capacity_factor` trades
that for token dropping). `ragged_all_to_all` has no CPU
lowering in XLA, so `dispatch="dense"` (the CPU default) emulates it with a padded `all_to_all`
of [P, A, D] chunks and a scatter; both share the offset bookkeeping, so CPU tests cover it.
Gradients: through the collectives (the transpose of a ragged all-to-all is the reverse one)
and the grouped matmul's custom VJP.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from minimax_jax.model.moe import (
    combine,
    expert_ffn,
    ffn_implementation,
    inverse_permutation,
    permute_rows,
    route,
    row_bucket_sizes,
    sort_by_expert,
)
from minimax_jax.model.moe import (
    dispatch as dispatch_rows,
)
from minimax_jax.model.moe_padded import expert_ffn_padded
from minimax_jax.model.quant import QArray
from pallas_kernels.platform import match_vma, on_tpu

DISPATCHES = ("auto", "ragged", "dense")
# The receive buffer holds up to P*A rows, about A of them used with balanced routing: the
# grouped matmuls run on the shortest static prefix (`moe.row_bucket_sizes` around A) that holds
# the used rows. The padded all-to-all likewise sends chunks of the shortest size around A/P
# that holds the largest send (each chunk can hold A rows).
EP_ROW_MULTIPLE = 128  # the GPU kernels' row tile


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _name(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else axes


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _ragged_a2a_dense(operand, output, in_off, send, out_off, recv, *, axis, chunk):
    """`lax.ragged_all_to_all` built from a padded all_to_all (works on every backend).

    operand [R,D]: rows in_off[j]..+send[j] go to device j, landing at out_off[j] of its output;
    recv[i] rows arrive from device i. chunk: an upper bound of every send size.
    """
    n, p = operand.shape[0], send.shape[0]
    cols = jnp.arange(chunk, dtype=jnp.int32)[None]
    src = jnp.clip(in_off[:, None] + cols, 0, n - 1)
    chunks = jnp.where((cols < send[:, None])[..., None], operand[src], 0)  # [P,chunk,D]
    got = jax.lax.all_to_all(chunks, axis, 0, 0)  # got[i]: the chunk device i sent me
    where = jax.lax.all_to_all(out_off, axis, 0, 0, tiled=True)  # where device i wants it
    # Each output row r takes row r - where[i] of the chunk whose range [where[i], +recv[i])
    # holds it (ranges are disjoint), else keeps output[r]: a gather, not a scatter.
    r = jnp.arange(output.shape[0], dtype=where.dtype)[:, None]
    inside = (r >= where[None]) & (r < (where + recv)[None])  # [R,P]
    src = jnp.argmax(inside, axis=1)
    col = jnp.clip(r[:, 0] - where[src], 0, chunk - 1)
    vals = got.reshape(p * chunk, -1)[src * chunk + col]
    return jnp.where(jnp.any(inside, axis=1)[:, None], vals, output)


def _ragged_a2a(dispatch, operand, output, in_off, send, out_off, recv, *, axis, chunk, need,
                expected):  # fmt: skip
    """need: the largest send size over every pair of devices (the same value on all of them):
    the padded exchange runs with the smallest of `row_bucket_sizes(chunk, expected)` that holds
    it (a `lax.switch` every device takes alike), not with the worst case `chunk`; expected:
    the typical send size (A/P with balanced routing)."""
    if dispatch == "ragged":
        return jax.lax.ragged_all_to_all(operand, output, in_off, send, out_off, recv,
                                         axis_name=axis)  # fmt: skip
    sizes = row_bucket_sizes(chunk, expected, EP_ROW_MULTIPLE)
    branches = [functools.partial(_ragged_a2a_dense, axis=axis, chunk=c) for c in sizes]
    if len(branches) == 1:
        return branches[0](operand, output, in_off, send, out_off, recv)
    which = jnp.minimum(jnp.searchsorted(jnp.asarray(sizes, need.dtype), need), len(sizes) - 1)
    return jax.lax.switch(which, branches, operand, output, in_off, send, out_off, recv)


def _local_expert_ids(recv_gs: jax.Array, rows: int) -> jax.Array:
    """recv_gs [P,El] (rows per source chunk and local expert, chunks in source order) -> the
    local expert of every received row [rows] (El for the unused tail of the buffer)."""
    p, el = recv_gs.shape
    ends = jnp.cumsum(recv_gs.reshape(-1))
    seg = jnp.searchsorted(ends, jnp.arange(rows, dtype=ends.dtype), side="right")
    return jnp.where(seg < p * el, seg % el, el).astype(jnp.int32)


def _clamp_groups(gs: jax.Array, limit: jax.Array) -> jax.Array:
    """Per-expert counts gs [P,El] of chunks truncated to limit [P] rows each."""
    ends = jnp.minimum(jnp.cumsum(gs, axis=1), limit[:, None])
    return ends - jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)


def _dispatch_a2a(xs, gs, wi, wo, *, axis, p, impl, dispatch, capacity):
    """Sorted rows xs [A,D] with per-expert counts gs [E] -> their expert outputs [A,D].

    capacity: receive-buffer rows (P*A = dropless); rows that do not fit are dropped (output 0).
    """
    a = xs.shape[0]
    el = gs.shape[0] // p
    by_dest = gs.reshape(p, el)
    in_off = _exclusive_cumsum(jnp.sum(by_dest, axis=1))  # my run for each device
    all_gs = jax.lax.all_gather(by_dest, axis)  # [P_src, P_dst, El]
    full = jnp.sum(all_gs, axis=2)  # [P_src, P_dst] rows wanted
    place = _exclusive_cumsum(full, axis=0)  # offset of src i's chunk in receiver j's buffer
    sizes = jnp.clip(capacity - place, 0, full)  # what fits
    me = jax.lax.axis_index(axis)
    send, recv, out_off = sizes[me], sizes[:, me], place[me]
    recv_off = place[:, me]
    recv_gs = _clamp_groups(all_gs[:, me, :], recv)  # [P_src, El]
    # Buffers must vary like the rows they receive (ragged_all_to_all types its result by them).
    buf = match_vma(jnp.zeros((capacity, xs.shape[1]), xs.dtype), xs)
    chunk = min(a, capacity)
    need = jnp.max(sizes)  # from the all-gathered counts: the same on every device
    exchange = functools.partial(_ragged_a2a, dispatch, axis=axis, chunk=chunk, need=need,
                                 expected=-(-a // p))  # fmt: skip
    got = exchange(xs, buf, in_off, send, out_off, recv)
    local = _local_expert_ids(recv_gs, capacity)
    if impl == "padded":  # straight from arrival order into per-expert blocks and back
        ys = expert_ffn_padded(got, local, wi, wo, k=1, group_rows=-(-min(a, capacity) // el))
    else:
        order = jnp.argsort(local, stable=True).astype(jnp.int32)
        inv = inverse_permutation(order)
        ys = expert_ffn(permute_rows(got, order, inv), wi, wo, jnp.sum(recv_gs, axis=0), impl,
                        expected_rows=a if capacity > a else None,
                        row_multiple=EP_ROW_MULTIPLE)  # fmt: skip
        ys = permute_rows(ys, inv, order)  # back to arrival order
    back_off = _exclusive_cumsum(full, axis=1)[:, me]  # where each source keeps my experts' rows
    out = match_vma(jnp.zeros((a, ys.shape[1]), ys.dtype), ys)
    return exchange(ys, out, recv_off, recv, back_off, send)


def _local_experts_only(xs, gs, wi, wo, *, axis, p, impl):
    """Tokens replicated over the expert axis: my experts' rows of xs [A,D]; the rest zero."""
    a = xs.shape[0]
    el = gs.shape[0] // p
    me = jax.lax.axis_index(axis)
    start = jnp.sum(jnp.where(jnp.arange(gs.shape[0]) < me * el, gs, 0))
    mine = jax.lax.dynamic_slice_in_dim(gs, me * el, el)
    rows = (start + jnp.arange(a)) % a  # my contiguous run first; rows past it give zero
    ys = expert_ffn(xs[rows], wi, wo, mine, impl)
    return ys[(jnp.arange(a) - start) % a]


def _a2a_moe(xf, weights, experts, wi, wo, *, e, top_k, axis, p, impl, dispatch, cf):
    """Tokens xf [M,D] routed to (weights, experts) [M,k] -> combined outputs [M,D] fp32, with
    the experts across the `axis` devices (sort, all-to-all there and back, grouped matmuls)."""
    order, gs = sort_by_expert(experts, e)
    xs = dispatch_rows(xf, order, top_k)  # [A,D] sorted by expert
    a = xs.shape[0]
    cap = p * a if cf is None else min(p * a, max(1, math.ceil(cf * a)))
    ys = _dispatch_a2a(xs, gs, wi, wo, axis=axis, p=p, impl=impl, dispatch=dispatch,
                       capacity=cap)  # fmt: skip
    return combine(ys, weights, order, xf.shape[0])


def _body(router, wi, wo, x, *, top_k, mode, e_axis, p, f_axes, impl, dispatch, cf, mb):
    """Per-device view: x [b,T,D] local tokens, wi [El,D,2,Fl], wo [El,Fl,D] local experts."""
    b, t, d = x.shape
    m = b * t
    xf = x.reshape(m, d)
    weights, experts, logits = route(xf, router, top_k)
    if mode == "a2a":
        # Micro-batches are independent chains (sort, exchange, FFN, exchange back), so the
        # scheduler can run one's all-to-all while another's grouped matmuls compute.
        n = mb if m % mb == 0 else 1
        run = functools.partial(_a2a_moe, wi=wi, wo=wo, e=router.shape[1], top_k=top_k,
                                axis=e_axis, p=p, impl=impl, dispatch=dispatch, cf=cf)  # fmt: skip
        cut = [slice(i * m // n, (i + 1) * m // n) for i in range(n)]
        parts = [run(xf[c], weights[c], experts[c]) for c in cut]
        y = jnp.concatenate(parts)
    else:
        order, gs = sort_by_expert(experts, router.shape[1])
        xs = dispatch_rows(xf, order, top_k)  # [A,D] sorted by expert
        if mode == "local":
            ys = expert_ffn(xs, wi, wo, gs, impl)
        else:
            ys = _local_experts_only(xs, gs, wi, wo, axis=e_axis, p=p, impl=impl)
        y = combine(ys, weights, order, m)  # [M,D] fp32
    if mode == "replicated":
        y = jax.lax.psum(y, e_axis)
    if f_axes:
        y = jax.lax.psum(y, _name(f_axes))  # tensor-parallel partial sums over F
    return y.astype(x.dtype).reshape(b, t, d), logits.reshape(b, t, -1)


def resolve_dispatch(dispatch: str) -> str:
    """'auto' -> 'ragged' (lax.ragged_all_to_all) on TPU, 'dense' elsewhere: XLA:CPU has no
    lowering, and on one GPU host XLA's ragged all-to-all was measured at 377 ms for a 64K-token
    EP=2 dispatch on 2 H200s (experiments/RESULTS.md; openxla/xla#33386 reports ~2% of NVLink
    bandwidth), far slower than the padded all_to_all."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"EP dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    if dispatch != "auto":
        return dispatch
    return "ragged" if on_tpu() else "dense"


def moe_ep(
    params: dict,
    x: jax.Array,
    top_k: int,
    *,
    mesh: Mesh,
    rules,
    implementation: str = "auto",
    dispatch: str = "auto",
    capacity_factor: float | None = None,
    microbatches: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Expert-parallel MoE layer. x [B,T,D] -> (y [B,T,D], router logits [B,T,E] fp32).

    params: router [D,E], wi [E,D,2,F], wo [E,F,D] (float, or int8 `quant.QArray`s; any
    sharding: shard_map gathers what it needs, e.g. FSDP shards of D, and keeps experts split
    over the `experts` mesh axes and F over the `mlp` axes). rules:
    `minimax_jax.sharding.ShardingRules`. Same math as `moe_sorted`.
    capacity_factor: None = dropless (each device's receive buffer holds P*A rows, the worst
    case); c > 0 sizes it to c*A rows (less memory and, on GPU, less padded work in the grouped
    matmul) and drops the assignments that do not fit (they contribute 0), like capacity-based
    MoE. Only the all-to-all mode uses it.
    microbatches: the all-to-all mode splits each device's tokens into this many independent
    exchanges (when they divide evenly), so that exchanges overlap other micro-batches' expert
    matmuls; the capacity then applies per micro-batch.
    """
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    e = params["wi"].shape[0]
    f = params["wi"].shape[-1]
    x_spec = rules.spec(("batch", "length", "act_embed"), mesh, x.shape)
    t_axes = _axes(x_spec[0])
    e_axes = _axes(rules.spec(("experts",), mesh, (e,))[0])
    f_axes = tuple(a for a in _axes(rules.spec(("mlp",), mesh, (f,))[0]) if a not in e_axes)
    if set(f_axes) & set(t_axes):
        raise ValueError(f"rules split both tokens and the expert FFN width over {f_axes}")
    if not e_axes:
        mode = "local"
    elif set(e_axes) <= set(t_axes):
        mode = "a2a"
    elif not set(e_axes) & set(t_axes):
        mode = "replicated"
    else:
        raise ValueError(f"expert axes {e_axes} only partly split the tokens ({t_axes})")
    p = 1
    for a in e_axes:
        p *= mesh.shape[a]
    e_name, f_name = (_name(e_axes) if e_axes else None), (_name(f_axes) if f_axes else None)
    body = functools.partial(
        _body, top_k=top_k, mode=mode, e_axis=e_name, p=p, f_axes=f_axes,
        impl=ffn_implementation(implementation, x.dtype), dispatch=resolve_dispatch(dispatch),
        cf=capacity_factor, mb=microbatches,
    )  # fmt: skip
    x_spec = PartitionSpec(x_spec[0], None, None)
    wi_spec = PartitionSpec(e_name, None, None, f_name)
    wo_spec = PartitionSpec(e_name, f_name, None)
    if isinstance(params["wo"], QArray):  # scales [E,1,2,F] / [E,1,D]: split like the outputs
        wo_spec = QArray(wo_spec, PartitionSpec(e_name, None, None))
    if isinstance(params["wi"], QArray):
        wi_spec = QArray(wi_spec, wi_spec)
    in_specs = (PartitionSpec(), wi_spec, wo_spec, x_spec)
    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(x_spec, x_spec))
    return fn(params["router"], params["wi"], params["wo"], x)
