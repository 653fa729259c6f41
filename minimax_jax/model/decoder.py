"""The decoder stack as pure functions: one layer, one repeating block, and the scan over blocks.

Einsum letters: B batch, T length, D model dim, V vocab.
Parameters of the repeating block (7 lightning + 1 softmax layers in the real models) are stacked
on a leading axis of size `num_blocks`; `jax.lax.scan` runs over that axis, so the 80-layer model
compiles one block, not 80 layers. Per-layer lightning slopes (they depend on the global layer
index) are scanned inputs.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minimax_jax.config import ModelConfig
from minimax_jax.model import quant, sequence
from minimax_jax.model.attention import (
    ATTENTION_IMPLS,
    BLOCK,
    Visibility,
    softmax_attention_cached,
    softmax_attention_layer,
)
from minimax_jax.model.lightning import lightning_attention_layer
from minimax_jax.model.moe import moe_dense, moe_gather, moe_sorted
from minimax_jax.model.moe_parallel import moe_ep
from minimax_jax.model.norm import rms_norm
from minimax_jax.model.proj import LayerSlice, materialize, proj
from minimax_jax.model.rope import rope_tables
from minimax_jax.sharding import constrain
from pallas_kernels.matvec.api import IMPLEMENTATIONS as MATVEC_IMPLEMENTATIONS
from pallas_kernels.matvec.api import resolve_implementation as resolve_matvec
from pallas_kernels.moe.api import IMPLEMENTATIONS as GMM_IMPLEMENTATIONS

LIGHTNING = "linear_attention"


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Static choices that do not change the math: kernels, MoE path, remat, device mesh.

    With `mesh` and `rules` (`minimax_jax.sharding`), activations are constrained at block
    boundaries and the MoE runs under shard_map (`moe_parallel.moe_ep`): "sorted" and "ep" both
    sort each device's own tokens; experts are split over the mesh only where the rules say so.
    """

    lightning_impl: str = "auto"
    moe_impl: str = "sorted"  # "sorted" (grouped matmul) | "dense" (reference) | "ep"
    remat_policy: str | None = None  # None | "full" | "dots" (save matmul outputs)
    mesh: Any = None  # jax.sharding.Mesh with axes (data, fsdp, expert, tensor)
    rules: Any = None  # minimax_jax.sharding.ShardingRules
    gmm_impl: str = "auto"  # expert FFN: pallas_kernels.moe implementation or "padded" (GPU auto)
    ep_dispatch: str = "auto"  # "ragged" | "dense" all-to-all (auto: dense on CPU)
    ep_capacity_factor: float | None = None  # None: dropless EP buffers (see moe_parallel)
    ep_microbatches: int = 1  # independent all-to-all exchanges per device (overlap; moe_ep)
    # "sorted" without a mesh: calls with at most this many token-expert assignments (B*T*k)
    # use `moe_gather` (decode steps at small batch); None: num_experts // 2 (it reads one
    # expert per assignment; at 32 assignments of 8 experts it made the decode step 1.4x slower
    # than the grouped kernels, experiments/RESULTS.md); 0: never.
    moe_gather_rows: int | None = None
    unroll_blocks: bool = False  # unroll the scan over blocks (the Engine's decode step does)
    # One-row projections and `moe_gather` (batch-1 decode): "xla" (paired zero row, gathered
    # weights), "gpu" (`pallas_kernels.matvec` kernel: reads each weight once), "gpu_interpret"
    # (tests); "auto": `pallas_kernels.matvec.api.resolve_implementation` (gpu on a GPU without
    # a mesh, else xla).
    matvec_impl: str = "auto"
    # Softmax layers: "auto" | "xla" | "blockwise" | "cudnn" (`minimax_jax.model.attention`).
    attention_impl: str = "auto"
    # A promise about cached calls: every row's valid cache slots are one run (left padding,
    # then tokens), as the generation engine writes them. cuDNN prefill chunks then skip the
    # compiled blockwise fallback for rows with holes (whose [B,S]-sized temporaries count
    # toward the step's memory even when the branch never runs). Wrong results if broken.
    cache_runs: bool = False

    def __post_init__(self):
        if self.moe_impl not in ("sorted", "dense", "ep"):
            raise ValueError(f"moe_impl must be 'sorted', 'dense' or 'ep', got {self.moe_impl!r}")
        if self.remat_policy not in (None, "full", "dots"):
            raise ValueError(
                f"remat_policy must be None, 'full' or 'dots', got {self.remat_policy!r}"
            )
        if (self.mesh is None) != (self.rules is None):
            raise ValueError("RunOptions: give both mesh and rules, or neither")
        if self.moe_impl == "ep" and self.mesh is None:
            raise ValueError("RunOptions(moe_impl='ep') needs mesh and rules")
        if self.gmm_impl not in GMM_IMPLEMENTATIONS:
            raise ValueError(
                f"gmm_impl must be one of {GMM_IMPLEMENTATIONS}, got {self.gmm_impl!r}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )
        if self.matvec_impl not in MATVEC_IMPLEMENTATIONS:
            raise ValueError(
                f"matvec_impl must be one of {MATVEC_IMPLEMENTATIONS}, got {self.matvec_impl!r}"
            )

    @property
    def matvec(self) -> str:
        """matvec_impl with 'auto' resolved for the default backend and the mesh."""
        return resolve_matvec(self.matvec_impl, sharded=self.mesh is not None)


@dataclasses.dataclass(frozen=True)
class _Context:
    """Per-call arrays shared by every layer."""

    token_mask: jax.Array | None  # [B,T] float, None when there is no padding
    vis: Visibility | None  # which keys each softmax query sees (no [T,S] array)
    cos: jax.Array | None  # [B,T,R]
    sin: jax.Array | None
    segment_ids: jax.Array | None = None  # [B,T] int32, packed sequences
    cache_index: jax.Array | None = None  # int32 slot of the first new token (cached calls)
    causal_only: bool = False  # vis is the plain causal mask (no padding, no segments)


def _residual_factors(config: ModelConfig, kind: str) -> tuple[float, float]:
    if kind == LIGHTNING:
        return config.linear_attn_alpha, config.linear_attn_beta
    return config.full_attn_alpha, config.full_attn_beta


def _mixer(config, kind, params, u, slopes, ctx, opts, cache):
    """Attention of one layer -> (y [B,T,D], updated layer cache or None).

    With the token axis split over `sequence` (one-shot forwards, and cached prefill chunks
    whose length the axis divides; a one-token decode step is never split) the attention cores
    run under shard_map (`minimax_jax.model.sequence`); a cached chunk starts from the cache's
    lightning state and attends over all cache slots."""
    seq = sequence.is_sequence_sharded(opts.mesh, opts.rules, u)
    if kind == LIGHTNING:
        core = None
        if seq:
            core = functools.partial(
                sequence.lightning_core, mesh=opts.mesh, rules=opts.rules,
                implementation=opts.lightning_impl, block_size=config.block_size,
            )  # fmt: skip
        y, state = lightning_attention_layer(
            params,
            u,
            slopes,
            token_mask=ctx.token_mask,
            segment_ids=ctx.segment_ids,
            norm_eps=config.lightning_norm_eps,
            block_size=config.block_size,
            initial_state=None if cache is None else cache["state"],
            implementation=opts.lightning_impl,
            matvec=opts.matvec,
            core=core,
        )
        return y, None if cache is None else {"state": state}
    if cache is None:
        core = None
        if seq:
            core = functools.partial(
                sequence.softmax_core, impl=opts.attention_impl, mesh=opts.mesh,
                rules=opts.rules, block=BLOCK,
            )  # fmt: skip
        y = softmax_attention_layer(
            params, u, ctx.cos, ctx.sin, ctx.vis, opts.matvec, opts.attention_impl,
            ctx.causal_only, core=core,
        )  # fmt: skip
        return y, None
    core = None
    if seq:
        core = functools.partial(
            sequence.cached_softmax_core, impl=opts.attention_impl, mesh=opts.mesh,
            rules=opts.rules, runs=opts.cache_runs,
        )  # fmt: skip
    return softmax_attention_cached(
        params, u, ctx.cos, ctx.sin, ctx.vis, cache, ctx.cache_index, opts.matvec,
        opts.attention_impl, runs=opts.cache_runs, core=core,
    )  # fmt: skip


def _gather_rows(config: ModelConfig, opts: RunOptions) -> int:
    """Token-expert assignments up to which the MoE uses `moe_gather`."""
    return config.num_experts // 2 if opts.moe_gather_rows is None else opts.moe_gather_rows


def _moe(config, params, v, opts):
    b, t, d = v.shape
    k = config.num_experts_per_tok
    if b * t * k <= _gather_rows(config, opts) and opts.moe_impl != "dense" and opts.mesh is None:
        y, logits = moe_gather(params, v.reshape(b * t, d), k, matvec=opts.matvec)
        return y.reshape(b, t, d), logits.reshape(b, t, -1)
    params = {name: materialize(w) for name, w in params.items()}
    if opts.mesh is not None and opts.moe_impl != "dense":
        return moe_ep(params, v, k, mesh=opts.mesh, rules=opts.rules,
                      implementation=opts.gmm_impl, dispatch=opts.ep_dispatch,
                      capacity_factor=opts.ep_capacity_factor,
                      microbatches=opts.ep_microbatches)  # fmt: skip
    if opts.moe_impl == "dense":
        y, logits = moe_dense(params, v.reshape(b * t, d), k)
    else:
        y, logits = moe_sorted(params, v.reshape(b * t, d), k, implementation=opts.gmm_impl)
    return y.reshape(b, t, d), logits.reshape(b, t, -1)


def decoder_layer(config, kind, params, x, slopes, ctx, opts, cache=None):
    """One layer. x [B,T,D] -> (x [B,T,D], router logits [B,T,E] fp32, updated cache or None).

    postnorm (released models): the residual is the *normed* input, h = a*u + b*Attn(u) with
    u = rmsnorm(x); otherwise h = a*x + b*Attn(rmsnorm(x)). The same for the MoE half.
    """
    a_attn, b_attn = _residual_factors(config, kind)
    eps = config.rms_norm_eps
    u = rms_norm(x, params["input_norm"], eps)
    attn, cache = _mixer(config, kind, params["attn"], u, slopes, ctx, opts, cache)
    h = a_attn * (u if config.postnorm else x) + b_attn * attn
    v = rms_norm(h, params["post_attn_norm"], eps)
    moe, logits = _moe(config, params["moe"], v, opts)
    out = config.mlp_alpha * (v if config.postnorm else h) + config.mlp_beta * moe
    return out.astype(x.dtype), logits, cache


def _remat(fn, policy):
    if policy is None:
        return fn
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return jax.checkpoint(fn)


def _slopes_array(config: ModelConfig) -> jax.Array:
    by_pos = config.slopes_per_block_position()
    zeros = np.zeros((config.num_blocks, config.num_heads), np.float32)
    return jnp.asarray(np.stack([by_pos.get(p, zeros) for p in range(config.period)]))


def decoder_stack(
    config: ModelConfig,
    blocks: list,
    x: jax.Array,
    ctx: _Context,
    opts: RunOptions,
    caches: list | None = None,
):
    """Scan the repeating block over its stacked parameters (and caches, when given).

    blocks: list over block positions p of layer params stacked [num_blocks, ...]; caches: the
    matching list of `cache["blocks"]`. Returns (x [B,T,D], router logits [num_layers,B,T,E] in
    layer order, updated caches or None).
    """
    pattern = config.block_pattern
    blocks = quant.wrap(blocks)  # int8 {"q", "scale"} pairs -> QArray (scanned like arrays)
    slopes = _slopes_array(config)  # [P, num_blocks, N]; rows of softmax positions are unused
    caches = [None] * len(pattern) if caches is None else caches
    b, t = x.shape[:2]
    # Decode-sized calls on the matvec kernel: its weights stay stacked (closed over, indexed by
    # the block number) instead of being scanned, since a sliced operand is copied first.
    views = (
        opts.matvec != "xla"
        and opts.mesh is None
        and (b * t == 1 or b * t * config.num_experts_per_tok <= _gather_rows(config, opts))
    )
    blocks, whole = _split_matvec_weights(blocks) if views else (blocks, None)

    def block(carry, scanned):
        block_params, block_slopes, i = scanned
        x, stacked = carry
        # this block's caches, sliced from the stacked ones the loop carries (updated in place
        # below: a cache as scanned input and output would be held twice)
        block_caches = [
            None if c is None
            else jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, False), c)
            for c in stacked
        ]  # fmt: skip
        if whole is not None:
            block_params = [
                _with_views(bp, wp, i) for bp, wp in zip(block_params, whole, strict=True)
            ]
        x = constrain(x, ("batch", "length", "act_embed"), opts.mesh, opts.rules)
        logits, new_caches = [], []
        for p, kind in enumerate(pattern):  # heterogeneous positions inside one block: static
            x, lg, c = decoder_layer(
                config, kind, block_params[p], x, block_slopes[p], ctx, opts, block_caches[p]
            )
            logits.append(lg)
            new_caches.append(c)
        x = constrain(x, ("batch", "length", "act_embed"), opts.mesh, opts.rules)
        stacked = [
            None if c is None
            else jax.tree.map(
                lambda a, n: jax.lax.dynamic_update_index_in_dim(a, n.astype(a.dtype), i, 0), c, nc
            )
            for c, nc in zip(stacked, new_caches, strict=True)
        ]  # fmt: skip
        return (x, stacked), jnp.stack(logits)

    scanned = (blocks, slopes.swapaxes(0, 1), jnp.arange(config.num_blocks))
    (x, new_caches), logits = jax.lax.scan(
        _remat(block, opts.remat_policy), (x, caches), scanned, unroll=bool(opts.unroll_blocks)
    )
    nb, p = logits.shape[:2]
    return x, logits.reshape(nb * p, *logits.shape[2:]), new_caches


_MATVEC_WEIGHTS = {"attn": ("qkv", "gate", "out", "q", "k", "v", "o"), "moe": ("wi", "wo")}


def _split_matvec_weights(blocks: list) -> tuple[list, list]:
    """(block params without the matvec-kernel weights, those weights, still stacked)."""
    rest, whole = [], []
    for p in blocks:
        r, w = dict(p), {}
        for group, names in _MATVEC_WEIGHTS.items():
            r[group] = {n: a for n, a in p[group].items() if n not in names}
            w[group] = {n: a for n, a in p[group].items() if n in names}
        rest.append(r)
        whole.append(w)
    return rest, whole


def _with_views(sliced: dict, whole: dict, i: jax.Array) -> dict:
    """One layer's params: the scanned slices plus `LayerSlice` views of the stacked weights."""
    out = dict(sliced)
    for group, ws in whole.items():
        out[group] = {**sliced[group], **{n: LayerSlice(a, i) for n, a in ws.items()}}
    return out


def make_context(
    config: ModelConfig,
    attention_mask: jax.Array | None,
    b: int,
    t: int,
    segment_ids: jax.Array | None = None,
) -> _Context:
    """Positions, RoPE tables and key visibility for a prefill over [B,T] tokens (no cache).

    Positions count real tokens only (left padding is skipped), so a padded row computes exactly
    what the same row computes alone. With segment_ids [B,T] (packed training sequences) positions
    restart at every change of id, softmax attention stays inside a segment and the lightning
    recurrence restarts.
    """
    idx = jnp.arange(t, dtype=jnp.int32)
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    token_mask = None if attention_mask is None else valid.astype(jnp.float32)
    count = jnp.cumsum(valid.astype(jnp.int32), axis=1)  # valid tokens up to t
    if segment_ids is None:
        positions = jnp.maximum(count - 1, 0)
    else:
        new = jnp.concatenate(
            [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
        )
        start = jax.lax.cummax(jnp.where(new, idx[None], 0), axis=1)  # first index of segment
        before = jnp.take_along_axis(count - valid.astype(jnp.int32), start, axis=1)
        positions = jnp.maximum(count - before - 1, 0)
    has_softmax = any(kind != LIGHTNING for kind in config.layer_types)
    if not has_softmax:
        return _Context(token_mask, None, None, None, segment_ids)
    cos, sin = rope_tables(positions, config.rotary_dim, config.rope_theta)
    rows = jnp.broadcast_to(idx, (b, t))
    vis = Visibility(rows, rows, valid, segment_ids, segment_ids)
    causal_only = attention_mask is None and segment_ids is None
    return _Context(token_mask, vis, cos, sin, segment_ids, causal_only=causal_only)


def forward(
    config: ModelConfig,
    params: dict[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    opts: RunOptions | None = None,
    compute_dtype: Any = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """input_ids [B,T] int32, attention_mask [B,T] (1 token, 0 left padding) -> logits [B,T,V] fp32.

    Also returns router logits [L,B,T,E] fp32 for the auxiliary losses. compute_dtype (e.g.
    bfloat16) casts the weights for the matmuls; the router always runs in fp32. segment_ids
    [B,T] int32 marks packed documents (see `make_context`).
    """
    opts = opts or RunOptions()
    x = embed_tokens(params["embed"], input_ids, opts)
    return forward_embedded(config, params, x, attention_mask, opts, compute_dtype, segment_ids)


def forward_embedded(
    config: ModelConfig,
    params: dict[str, Any],
    x: jax.Array,
    attention_mask: jax.Array | None = None,
    opts: RunOptions | None = None,
    compute_dtype: Any = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`forward` from input embeddings x [B,T,D] (e.g. text with image features merged in)."""
    opts = opts or RunOptions()
    if compute_dtype is not None:
        params = cast_params(params, compute_dtype)
        x = x.astype(compute_dtype)
    b, t = x.shape[:2]
    sequence.check_length(opts.mesh, opts.rules, t)
    ctx = make_context(config, attention_mask, b, t, segment_ids)
    x, router_logits, _ = decoder_stack(config, params["blocks"], x, ctx, opts)
    return _logits(config, params, x), router_logits


def embed_tokens(table: jax.Array, input_ids: jax.Array, opts: RunOptions) -> jax.Array:
    """[V,D] table, [B,T] ids -> [B,T,D]. With a mesh the table is gathered along D first: a
    lookup into an FSDP-sharded model dim would make SPMD rematerialise the whole table."""
    table = constrain(table, ("vocab", None), opts.mesh, opts.rules)
    return jnp.take(table, input_ids, axis=0)


def _logits(config: ModelConfig, params: dict, x: jax.Array, matvec: str = "xla") -> jax.Array:
    """Final norm and the output projection, in fp32 (one row: `matvec`, as in `proj`)."""
    x = rms_norm(x, params["final_norm"], config.rms_norm_eps)
    if config.tie_word_embeddings:
        return jnp.einsum("btd,vd->btv", x, params["embed"], preferred_element_type=jnp.float32)
    return proj("btd,dv->btv", x, params["lm_head"], matvec=matvec,
                preferred_element_type=jnp.float32)  # fmt: skip


def make_cached_context(
    config: ModelConfig, token_mask: jax.Array, cache: dict
) -> tuple[_Context, dict]:
    """Context for T new tokens appended at cache["index"]; also the cache's new bookkeeping.

    token_mask [B,T] (1 token, 0 left padding). New tokens take slots index..index+T-1; their
    positions continue from cache["positions"] counting real tokens only.
    """
    b, t = token_mask.shape
    s = cache["valid"].shape[1]
    valid_new = token_mask.astype(bool)
    index = cache["index"]
    valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], valid_new, index, 1)
    count = jnp.cumsum(valid_new.astype(jnp.int32), axis=1)
    positions = jnp.maximum(cache["positions"][:, None] + count - 1, 0)
    slots = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
    vis = Visibility(slots, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s)), valid)
    cos, sin = rope_tables(positions, config.rotary_dim, config.rope_theta)
    ctx = _Context(valid_new.astype(jnp.float32), vis, cos, sin, None, index)
    book = {"valid": valid, "index": index + t, "positions": cache["positions"] + count[:, -1]}
    return ctx, book


def forward_cached(
    config: ModelConfig,
    params: dict[str, Any],
    input_ids: jax.Array,
    token_mask: jax.Array,
    cache: dict,
    opts: RunOptions | None = None,
    compute_dtype: Any = None,
    last_only: bool = False,
) -> tuple[jax.Array, dict]:
    """Prefill a chunk or decode a step with caches (see `minimax_jax.model.cache`).

    input_ids [B,T] int32, token_mask [B,T] -> (logits [B,T,V] fp32, updated cache). Running
    tokens in several calls equals one call over all of them. last_only: logits of the last
    position only ([B,1,V]): a long prefill never materialises [B,T,V].
    """
    opts = opts or RunOptions()
    x = embed_tokens(params["embed"], input_ids, opts)
    return forward_cached_embedded(
        config, params, x, token_mask, cache, opts, compute_dtype, last_only
    )


def forward_cached_embedded(
    config: ModelConfig,
    params: dict[str, Any],
    x: jax.Array,
    token_mask: jax.Array,
    cache: dict,
    opts: RunOptions | None = None,
    compute_dtype: Any = None,
    last_only: bool = False,
) -> tuple[jax.Array, dict]:
    """`forward_cached` from input embeddings x [B,T,D]."""
    opts = opts or RunOptions()
    if compute_dtype is not None:
        params = cast_params(params, compute_dtype)
        x = x.astype(compute_dtype)
    if x.shape[1] > 1:  # decode steps (one token) run unsplit
        sequence.check_length(opts.mesh, opts.rules, x.shape[1], "the prefill chunk")
    ctx, book = make_cached_context(config, token_mask, cache)
    x, _, blocks = decoder_stack(config, params["blocks"], x, ctx, opts, cache["blocks"])
    if last_only:
        x = x[:, -1:]
    return _logits(config, params, x, opts.matvec), {"blocks": blocks, **book}


def cast_params(params: dict, dtype: Any) -> dict:
    """Cast floating weights to dtype, keeping the MoE router and int8 weights' scales in fp32
    (int8 ``q`` leaves are not floating: they stay int8)."""

    def cast(path, leaf):
        if any(getattr(k, "key", None) == "router" for k in path):
            return leaf
        if getattr(path[-1], "key", None) == "scale" and quant.is_pair(_parent(params, path)):
            return leaf
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def _parent(tree, path):
    for k in path[:-1]:
        tree = tree[getattr(k, "key", getattr(k, "idx", None))]
    return tree
