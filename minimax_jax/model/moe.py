"""Mixture-of-experts FFN: fp32 router softmax, top-k, renormalise, SwiGLU experts; aux losses.

Einsum letters: M tokens (B*T flattened), D model dim, E experts, F expert FFN dim, A = M*top_k
token-expert assignments.
Three paths compute the same thing: `moe_dense` runs every expert on every token (a reference
for tests and tiny models), `moe_sorted` sorts assignments by expert and runs grouped matmuls
(dropless, `pallas_kernels.moe.grouped_matmul`), and `moe_gather` gathers each assignment's
expert weights (decode-sized batches: only the routed experts' weights are read). The
expert-parallel path is in `minimax_jax.model.moe_parallel` and reuses `sort_by_expert`,
`expert_ffn`, `dispatch` and `combine`.
`router_aux` turns router logits into the training losses (Switch load balancing, z-loss) and
the per-expert load.
"""

import functools
import math

import jax
import jax.numpy as jnp

from minimax_jax.model import quant
from minimax_jax.model.moe_padded import expert_ffn_padded, swiglu
from minimax_jax.model.proj import LayerSlice
from pallas_kernels.matvec import gathered_matvec
from pallas_kernels.matvec.api import supported as matvec_supported
from pallas_kernels.moe.api import gpu_takes, grouped_matmul_vjp, resolve_implementation
from pallas_kernels.platform import match_vma


def route(
    x: jax.Array,
    router: jax.Array,
    top_k: int,
    *,
    jitter_key: jax.Array | None = None,
    jitter_noise: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [M,D], router [D,E] -> (weights [M,k] fp32, experts [M,k] int32, logits [M,E] fp32).

    Logits and softmax are fp32 over all experts; the top-k probabilities are renormalised.
    With jitter_key and jitter_noise > 0 the router input is scaled by U(1-eps, 1+eps) noise
    (training only; the experts see the clean x).
    """
    xr = x.astype(jnp.float32)
    if jitter_key is not None and jitter_noise > 0:
        xr = xr * jax.random.uniform(
            jitter_key, xr.shape, jnp.float32, 1.0 - jitter_noise, 1.0 + jitter_noise
        )
    logits = jnp.einsum(
        "md,de->me", xr, router.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, top_k)
    return top_p / jnp.sum(top_p, axis=-1, keepdims=True), top_i.astype(jnp.int32), logits


def router_aux(
    router_logits: jax.Array, top_k: int, token_mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Training auxiliaries from router logits [..., E] fp32 (e.g. forward's [L,B,T,E]).

    token_mask [...] (1 token, 0 padding; the shape of logits without E) excludes padding.
    Returns fp32 scalars/vectors averaged over every leading axis (layers included):
      load_balancing_loss: E * sum_e f_e P_e with f_e the fraction of tokens that pick e among
        their top-k and P_e the mean router probability (HF Mixtral convention: k when uniform),
      z_loss: mean logsumexp(logits)^2,
      expert_load [E]: fraction of the token-expert assignments that go to each expert.
    """
    e = router_logits.shape[-1]
    logits = router_logits.reshape(-1, e).astype(jnp.float32)
    if token_mask is None:
        w = jnp.ones((logits.shape[0],), jnp.float32)
    else:
        w = jnp.broadcast_to(token_mask, router_logits.shape[:-1]).reshape(-1)
        w = w.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w), 1.0)
    probs = jax.nn.softmax(logits, axis=-1)
    _, top_i = jax.lax.top_k(probs, top_k)
    picked = jnp.sum(jax.nn.one_hot(top_i, e, dtype=jnp.float32), axis=1)  # [M,E] 0/1
    f = jnp.sum(picked * w[:, None], axis=0) / count
    p = jnp.sum(probs * w[:, None], axis=0) / count
    z = jax.nn.logsumexp(logits, axis=-1)
    return {
        "load_balancing_loss": e * jnp.sum(f * p),
        "z_loss": jnp.sum(z * z * w) / count,
        "expert_load": f / top_k,
    }


def moe_dense(params: dict, x: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Every expert on every token, combined by the routing weights: x [M,D] -> ([M,D], logits)."""
    weights, experts, logits = route(x, params["router"], top_k)
    combine_w = jnp.sum(jax.nn.one_hot(experts, params["wi"].shape[0]) * weights[..., None], axis=1)
    h = swiglu(quant.einsum("md,edcf->mecf", x, params["wi"]))
    y = quant.einsum("mef,efd->med", h, params["wo"], preferred_element_type=jnp.float32)
    return jnp.einsum("med,me->md", y, combine_w).astype(x.dtype), logits


@jax.custom_vjp
def permute_rows(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    """x[perm] for a permutation perm of x's rows (inverse = its inverse permutation).

    The gradient is the inverse gather g[inverse]: no scatter-add (bf16 atomics on GPU).
    """
    return jnp.take(x, perm, axis=0)


def _permute_fwd(x, perm, inverse):
    return jnp.take(x, perm, axis=0), inverse


def _permute_bwd(inverse, g):
    return jnp.take(g, inverse, axis=0), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def inverse_permutation(perm: jax.Array) -> jax.Array:
    """inv with inv[perm[i]] = i (perm [N] int32)."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def sort_by_expert(experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """experts [M,k] int32 -> (order [A], group_sizes [E] int32).

    order: the flat assignments (m*k + slot) sorted by expert (stable), so sorted row a comes
    from token order[a] // k; group_sizes: rows per expert.
    """
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def _ffn_and_h(xs, wi, wo, group_sizes, implementation, group_rows=None):
    """(expert outputs [A,D], the fused w1/w3 product h [A,2F] before SwiGLU)."""
    e, d, _, f = wi.shape
    gmm = functools.partial(
        quant.grouped_matmul, implementation=implementation, group_rows=group_rows
    )
    h = gmm(xs, quant.reshape(wi, (e, d, 2 * f)), group_sizes)
    act = swiglu(h.reshape(-1, 2, f))
    return gmm(act, wo, group_sizes), h


def _ffn(xs, wi, wo, group_sizes, implementation, group_rows=None):
    return _ffn_and_h(xs, wi, wo, group_sizes, implementation, group_rows)[0]


# Prefix lengths tried for buffers with unused tail rows, as multiples of the expected used
# rows: fine steps just above 1 (balanced routing lands there), coarse ones elsewhere.
BUCKET_LADDER = (0.25, 0.5, 0.75, 1.0, 1.03125, 1.0625, 1.125, 1.25, 1.5, 2.0, 3.0, 4.0)


def row_bucket_sizes(rows: int, expected: int, multiple: int = 128) -> tuple[int, ...]:
    """Static prefix lengths for a buffer of `rows` rows of which about `expected` are used:
    expected x `BUCKET_LADDER`, rounded up to `multiple`, capped at rows; the last is rows."""
    sizes = {min(rows, -(-math.ceil(expected * r) // multiple) * multiple) for r in BUCKET_LADDER}
    return tuple(sorted((sizes - {0}) | {rows}))


def expert_ffn(
    xs: jax.Array,
    wi: jax.Array,
    wo: jax.Array,
    group_sizes: jax.Array,
    implementation="auto",
    *,
    expected_rows: int | None = None,
    row_multiple: int = 128,
) -> jax.Array:
    """Rows sorted by expert xs [A,D], wi [E,D,2,F], wo [E,F,D], group_sizes [E] -> [A,D].

    wi, wo: float arrays or int8 `quant.QArray`s (forward only: no gradient to int8 weights).

    Rows past sum(group_sizes) give zero. w1/w3 run as one fused grouped matmul.
    expected_rows < A: the buffer is mostly unused tail rows (the expert-parallel receive
    buffer is sized for the worst case) and about this many are used. The grouped-matmul
    kernels do work for every row tile of their operand, used or not, so the matmuls run on the
    shortest of the `row_bucket_sizes` prefixes (multiples of row_multiple) that holds every
    used row (a `lax.switch`; its custom VJP keeps one [A,2F] residual, where a plain switch
    under autodiff keeps every branch's). The "padded" implementation only reads used rows: it
    takes no prefix and sizes its capacities for expected_rows instead.
    """
    a, e = xs.shape[0], wi.shape[0]
    if expected_rows is None or expected_rows >= a:
        return _ffn(xs, wi, wo, group_sizes, implementation)
    if implementation == "padded":
        return _ffn(xs, wi, wo, group_sizes, implementation, -(-expected_rows // e))
    sizes = row_bucket_sizes(a, expected_rows, row_multiple)
    if len(sizes) == 1:
        return _ffn(xs, wi, wo, group_sizes, implementation)
    # One set of varying mesh axes for every operand (inside shard_map), so the custom VJP's
    # cotangents have the primal types; the pcast outside transposes to a psum of the weights'.
    wi, wo, group_sizes = (_match(t, xs) for t in (wi, wo, group_sizes))
    xs = match_vma(xs, *jax.tree.leaves(wi))
    return _bucketed_ffn(sizes, implementation, xs, wi, wo, group_sizes)


def _match(t, like):
    """`match_vma` for an array or each leaf of an int8 `QArray`."""
    return jax.tree.map(lambda a: match_vma(a, like), t)


def _bucket(sizes: tuple[int, ...], group_sizes: jax.Array) -> jax.Array:
    used = jnp.sum(group_sizes)
    which = jnp.searchsorted(jnp.asarray(sizes, used.dtype), used, side="left")
    return jnp.minimum(which, len(sizes) - 1)


def _pad_rows(y: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(y, ((0, rows - y.shape[0]), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _bucketed_ffn(sizes, impl, xs, wi, wo, gs):
    return _bucketed_fwd(sizes, impl, xs, wi, wo, gs)[0]


def _bucketed_fwd(sizes, impl, xs, wi, wo, gs):
    a = xs.shape[0]

    def branch(n, xs, wi, wo, gs):
        y, h = _ffn_and_h(xs[:n], wi, wo, gs, impl)
        return _pad_rows(y, a), _pad_rows(h, a)

    which = _bucket(sizes, gs)
    branches = [functools.partial(branch, n) for n in sizes]
    y, h = jax.lax.switch(which, branches, xs, wi, wo, gs)
    return y, (xs, wi, wo, gs, h, which)


def _bucketed_bwd(sizes, impl, res, dy):
    xs, wi, wo, gs, h, which = res
    a = xs.shape[0]
    e, d, _, f = wi.shape

    def branch(n, xs, wi, wo, gs, h, dy):
        hn = h[:n].reshape(-1, 2, f)
        act, act_vjp = jax.vjp(swiglu, hn)
        dact, dwo = grouped_matmul_vjp(act, wo, gs, dy[:n].astype(act.dtype), implementation=impl)
        (dh,) = act_vjp(dact)
        dxs, dwi = grouped_matmul_vjp(xs[:n], wi.reshape(e, d, 2 * f), gs, dh.reshape(n, 2 * f),
                                      implementation=impl)  # fmt: skip
        return _pad_rows(dxs, a), dwi.reshape(wi.shape), dwo

    branches = [functools.partial(branch, n) for n in sizes]
    dxs, dwi, dwo = jax.lax.switch(which, branches, xs, wi, wo, gs, h, dy)
    return dxs.astype(xs.dtype), dwi.astype(wi.dtype), dwo.astype(wo.dtype), None


_bucketed_ffn.defvjp(_bucketed_fwd, _bucketed_bwd)


def combine(ys: jax.Array, weights: jax.Array, order: jax.Array, m: int) -> jax.Array:
    """Sorted expert outputs ys [A,D] -> weighted sum per token [M,D] fp32 (unsort + combine).

    order [A] is the sort permutation of the M*k assignments (`sort_by_expert`); unsorting is a
    gather (and so is its gradient), the combine a sum over each token's k slots.
    """
    k = weights.shape[1]
    y = permute_rows(ys, inverse_permutation(order), order).astype(jnp.float32)
    return jnp.sum(y.reshape(m, k, -1) * weights[..., None], axis=1)


def dispatch(x: jax.Array, order: jax.Array, top_k: int) -> jax.Array:
    """Tokens x [M,D] -> their rows sorted by expert [A,D] (row a is token order[a] // k)."""
    rows = jnp.repeat(x, top_k, axis=0, total_repeat_length=x.shape[0] * top_k)
    return permute_rows(rows, order, inverse_permutation(order))


def ffn_implementation(implementation: str, dtype) -> str:
    """The expert-FFN implementation "auto" stands for with operands of this dtype (the one
    place that decides it; `moe_sorted` and `moe_parallel.moe_ep` call this).

    Where the grouped-matmul API would pick its GPU kernels (a GPU, 16-bit operands) that is
    "padded" (batched GEMMs over capacity-padded groups, `moe_padded`, the Mosaic grouped
    kernels as fallback): measured faster than the grouped kernels alone at every MiniMax-width
    token count (experiments/RESULTS.md). Elsewhere, and for explicit names, the name is returned
    unchanged (`pallas_kernels.moe.api.resolve_implementation` resolves it per call).
    """
    if implementation == "auto" and gpu_takes(dtype) and resolve_implementation("auto") == "gpu":
        return "padded"
    return implementation


def moe_sorted(
    params: dict, x: jax.Array, top_k: int, *, implementation: str = "auto"
) -> tuple[jax.Array, jax.Array]:
    """Dropless sorted dispatch with grouped matmuls. x [M,D] -> ([M,D], router logits [M,E]).

    implementation="padded" (what "auto" means on GPU for 16-bit x, `ffn_implementation`): the
    batched-GEMM expert FFN of `moe_padded` (capacity-padded groups, the platform's grouped
    kernel as fallback) instead of the sorted grouped matmuls.
    """
    e = params["wi"].shape[0]
    implementation = ffn_implementation(implementation, x.dtype)
    weights, experts, logits = route(x, params["router"], top_k)
    if implementation == "padded":
        ya = expert_ffn_padded(x, experts.reshape(-1), params["wi"], params["wo"], k=top_k)
        y = ya.astype(jnp.float32).reshape(x.shape[0], top_k, -1)
        return jnp.sum(y * weights[..., None], axis=1).astype(x.dtype), logits
    order, group_sizes = sort_by_expert(experts, e)
    xs = dispatch(x, order, top_k)  # [A,D]
    ys = expert_ffn(xs, params["wi"], params["wo"], group_sizes, implementation)
    return combine(ys, weights, order, x.shape[0]).astype(x.dtype), logits


def moe_gather(
    params: dict, x: jax.Array, top_k: int, *, matvec: str = "xla"
) -> tuple[jax.Array, jax.Array]:
    """Per-assignment weight gather: x [M,D] -> ([M,D], router logits [M,E]).

    For decode-sized M (a few rows): the grouped-matmul kernels visit a tile of every expert
    whatever the group sizes, while this reads only the M*k routed experts' weights. Rounding
    as in `moe_sorted` (expert matmuls in x's dtype with fp32 accumulation, fp32 combine).
    matvec="xla": each assignment's row is paired with a zero row ([A,2,D] batched matmuls on
    gathered weights; with one row XLA:GPU materialised an fp32 product, bench_matvec.py);
    another value runs `pallas_kernels.matvec.gathered_matvec` with that implementation, which
    reads each routed expert's weights in place (no gathered copy). params["wi"], ["wo"] may be
    `LayerSlice`s (the kernel then indexes the weights stacked over blocks).
    """
    m, d = x.shape
    wi_v, wo_v = LayerSlice.of(params["wi"]), LayerSlice.of(params["wo"])
    e, _, _, f = wi_v.stacked.shape[1:]
    weights, experts, logits = route(x, params["router"], top_k)
    flat = experts.reshape(-1)  # [A], assignment a = token a // k
    xa = jnp.repeat(x, top_k, axis=0)
    kernel = matvec != "xla"
    if kernel and matvec_supported(d, 2 * f) and matvec_supported(f, d):
        # [L*E, D, 2F]: the stacked weights (int8 with their [L*E, 2F] scales), indexed in place
        wi, si, first = wi_v.rows(e, d)
        h = gathered_matvec(xa, wi, first + flat, scale=si, implementation=matvec)
        act = swiglu(h.astype(x.dtype).reshape(-1, 2, f))  # [A,F]
        wo, so, first = wo_v.rows(e, f)
        y = gathered_matvec(act, wo, first + flat, scale=so, implementation=matvec)
    else:
        pair = jnp.stack([xa, jnp.zeros_like(xa)], axis=1)  # [A,2,D]
        wi = quant.reshape(wi_v.get(), (e, d, 2 * f))
        wi = quant.as_dtype(jax.tree.map(lambda w: jnp.take(w, flat, axis=0), wi), x.dtype)
        h = quant.einsum("ard,adn->arn", pair, wi, preferred_element_type=jnp.float32)
        act = swiglu(h.astype(x.dtype).reshape(*h.shape[:2], 2, f))  # [A,2,F]
        wo = jax.tree.map(lambda w: jnp.take(w, flat, axis=0), wo_v.get())  # [A,F,D]
        wo = quant.as_dtype(wo, x.dtype)
        y = quant.einsum("arf,afd->ard", act, wo, preferred_element_type=jnp.float32)[:, 0]
    y = y.astype(x.dtype).astype(jnp.float32).reshape(m, top_k, -1)
    return jnp.sum(y * weights[..., None], axis=1).astype(x.dtype), logits
