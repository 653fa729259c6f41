"""Lightning attention on NVIDIA Hopper GPUs: Pallas (Triton backend) kernels.

Semantics, per batch ``b`` and head ``n`` (``s = slopes[n]``, ``lam = exp(-s)``)::

    S_t = lam * S_{t-1} + k_t^T v_t        # S: [H, H] float32, S_0 = initial_state (or 0)
    o_t = q_t S_t                          # no 1/sqrt(H) scale

``q, k, v``: ``[B, T, N, H]`` (any float dtype, bf16 on the hot path); ``slopes``: ``[N]`` fp32;
``initial_state``: ``[B, N, H, H]`` fp32. Returns ``(o [B, T, N, H] in q.dtype, final [B, N, H, H]
fp32)``.

Design (chosen by measurement on an H200, ``experiments/RESULTS.md``, ``bench_lightning.jsonl``):

* One generic *scan kernel* does everything. A program owns one ``(b, n, value tile, T segment)``
  and walks its T segment block by block (block ``C`` = 64 tokens) keeping its ``[Hk, BV]`` fp32
  state slice in registers. Per block: ``A = (Q lam^(j-c)) (K lam^(c-i))^T`` (tensor cores, bf16 in,
  fp32 accumulate; the decay is folded into the operands around the block centre ``c``),
  causal-masked, ``O = A V + lam^(c+1) (Q lam^(j-c)) S``, ``S = lam^C S + (K lam^(C-1-i))^T V``.
  Loads of the next block are software-pipelined (``num_stages=2``) against the current matmuls.
* A single program per ``(b, n, tile)`` is latency-bound (one 64-token step of ~3.5 MFLOP takes
  ~4 us on one SM), and B2 N16 gives only 64 such programs for 132 SMs. So the T axis is split
  into ``P`` segments (about 3.5 programs per SM): a states-only pass (reads k, v; block 128)
  gives each segment's local final state, a tiny XLA loop over the segments turns them into
  initial states, and the output pass runs all segments in parallel. The states pass costs one
  extra read of k and v (~30% of the forward time at T=32K) but the parallelism pays 2.2x.
* The kernel also runs *in reverse time* (``reverse=True``), which is what the backward needs.
  With ``dS_t = lam dS_{t+1} + q_t^T do_t`` (``dS_T = q_T^T do_T + d final``):
  ``dq = scan(do, v, k; init S_0^T)``, ``dk = rscan(v, do, q; init lam^-1 dfinal^T)``,
  ``dv = rscan(k, q, do; init lam^-1 dfinal)``, ``d initial_state = lam * (final state of the dv
  scan)``. So the backward is three launches of the same kernel (each with its states pass) and
  keeps no residual but q, k, v: no per-chunk states are materialised.
* Decode: one fused kernel per token step, ``S = lam S + k^T v; o = q S``, state updated in place
  (``input_output_aliases``), grid over ``(B, N, value tiles of 64)``, 8 warps.

Measured (H200, JAX 0.11.2, same run as FLA 0.6.0): forward 0.80-1.13x FLA ``chunk_simple_gla``
(slower at T <= 32K, faster at 128K), forward+backward 1.28-1.39x FLA, decode 1.03-1.06x FLA's
``fused_recurrent_simple_gla`` at B >= 64 and 17 us per step at B=1.

``slopes`` are treated as constants: their cotangent is zero (MiniMax never trains them); the
``fold`` option needs ``slopes * block_size / 2 < 80`` (MiniMax slopes are <= 1).
``segment_ids`` (packed sequences) restart the state where the id changes: per-token masks made in
XLA (``_segment_masks``: same-run mask on the intra-block scores, "sees the incoming state" on the
inter-block term, "kept in the end state" on the state update, no carry across a block where a run
starts) and, in the segment-parallel scan, no state passed across a segment where a run starts.

The Pallas Triton backend is deprecated in JAX 0.11 but works; it is used because the kernel is a
plain blocked loop of ``dot``s that Triton pipelines and lowers to tensor-core instructions, and
because Pallas' interpret mode runs the very same kernel on CPU (tests, JAX 0.10).
Mosaic GPU (wgmma, TMA, warp specialisation) is the route to the remaining forward gap; it has
not been tried yet.

This file is longer than the house limit of 600 lines on purpose: the scan kernel, its
segment-parallel driver, the custom VJP built from the same kernel and the decode kernel share
block-size and mask helpers and are read together.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

try:  # Pallas and its Triton dialect are pure Python: importable on CPU too (interpret mode).
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
except ImportError as e:  # pragma: no cover - only on JAX builds without Pallas
    raise ImportError(f"pallas_kernels.lightning.gpu needs jax.experimental.pallas: {e}") from e

from pallas_kernels.lightning.reference import segment_runs

__all__ = [
    "lightning_attention",
    "lightning_attention_gpu",
    "lightning_decode",
    "lightning_decode_gpu",
    "scan_kernel_call",
]

DEFAULT_BLOCK_SIZE = 64
_SLOPE_LANES = 16  # slopes are passed broadcast to [N, 16]: vector loads only, no scalar loads


def _pick(x: int, want: int) -> int:
    """Largest power of two <= want that divides x (x itself if smaller)."""
    b = min(want, x)
    while x % b:
        b //= 2
    return b


def _num_sms() -> int:
    try:
        dev = jax.devices()[0]
        return int(getattr(dev, "core_count", 0) or 132)
    except Exception:  # pragma: no cover
        return 132


def _dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """2-D matmul with fp32 accumulation (tensor cores for bf16 operands)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------
# The scan kernel
# --------------------------------------------------------------------------------------------
def _scan_kernel(
    q_ref,  # [Tp, Hk] (block of [B, Tp, N, Hk])
    k_ref,  # [Tp, Hk]
    v_ref,  # [Tp, BV]
    slope_ref,  # [16] (slopes broadcast)
    s0_ref,  # [Hk, BV] fp32 initial state slice of this segment
    *refs,  # (run_ref, sees_ref, keep_ref [Tp] if segmented), o_ref [Tp, BV] (if emit_output),
    #        sT_ref [Hk, BV] fp32
    block: int,
    seg_blocks: int,
    seq_len: int,
    reverse: bool,
    emit_output: bool,
    fold: bool,
    segmented: bool,
):
    if segmented:
        run_ref, sees_ref, keep_ref, *out_refs = refs
    else:
        out_refs = refs
    if emit_output:
        o_ref, st_ref = out_refs
    else:
        (st_ref,) = out_refs
    seg = pl.program_id(3)
    s = jnp.max(slope_ref[...])  # scalar decay rate
    idx = lax.broadcasted_iota(jnp.int32, (block,), 0).astype(jnp.float32)
    row = lax.broadcasted_iota(jnp.int32, (block, block), 0)
    col = lax.broadcasted_iota(jnp.int32, (block, block), 1)
    # forward: o_j sees i <= j with lam^(j-i); reverse: i >= j with lam^(i-j)
    diff = (row - col) if not reverse else (col - row)
    causal = diff >= 0
    if not fold:
        intra_decay = jnp.exp(-s * jnp.maximum(diff, 0).astype(jnp.float32))
    center = block / 2.0

    def body(i, state):
        local = i if not reverse else seg_blocks - 1 - i
        blk = seg * seg_blocks + local
        t0 = pl.multiple_of(blk * block, block)
        # valid tokens in this block (< block only for the last, zero-padded block)
        m = jnp.clip(seq_len - blk * block, 0, block).astype(jnp.float32)
        # position along the scan direction; clamped so padded rows keep finite factors
        pos = idx if not reverse else jnp.maximum(m - 1.0 - idx, 0.0)
        k = k_ref[pl.ds(t0, block), :]
        v = v_ref[pl.ds(t0, block), :]
        kf = k.astype(jnp.float32)
        k_decay = jnp.exp(-s * jnp.maximum(m - 1.0 - pos, 0.0))
        carry = jnp.exp(-s * m)
        mask = causal
        if segmented:
            # packed sequences (see `_segment_masks`): attend within a run only; the incoming
            # state reaches the tokens of the run it came from; the block's end state keeps the
            # tokens of its last run, and the old state only if no run starts in the block
            run = run_ref[pl.ds(t0, block)]
            sees = sees_ref[pl.ds(t0, block)]
            mask = causal & (run[:, None] == run[None, :])
            k_decay = k_decay * keep_ref[pl.ds(t0, block)]
            carry = carry * jnp.min(sees)
        k_dec = (kf * k_decay[:, None]).astype(k.dtype)
        new_state = state * carry + _dot(k_dec, v, trans_a=True)
        if emit_output:
            q = q_ref[pl.ds(t0, block), :]
            if fold:
                # lam^(pos_j - pos_i) split as lam^(pos_j - c) * lam^(c - pos_i) folded into the
                # matmul operands (|exponent| <= s * block / 2): no [C, C] exp, no decay matrix
                qf = q.astype(jnp.float32) * jnp.exp(-s * (pos - center))[:, None]
                k_inc = (kf * jnp.exp(s * (pos - center))[:, None]).astype(k.dtype)
                q_c = qf.astype(q.dtype)
                a = jnp.where(mask, _dot(q_c, k_inc, trans_b=True), 0.0)
                inter = _dot(q_c, state.astype(q.dtype)) * jnp.exp(-s * (center + 1.0))
            else:
                a = jnp.where(mask, _dot(q, k, trans_b=True) * intra_decay, 0.0)
                q_dec = (q.astype(jnp.float32) * jnp.exp(-s * (pos + 1.0))[:, None]).astype(q.dtype)
                inter = _dot(q_dec, state.astype(q.dtype))
            if segmented:
                inter = inter * sees[:, None]
            o = _dot(a.astype(v.dtype), v) + inter
            o_ref[pl.ds(t0, block), :] = o.astype(o_ref.dtype)
        return new_state

    state = lax.fori_loop(0, seg_blocks, body, s0_ref[...].astype(jnp.float32))
    st_ref[...] = state


@functools.partial(
    jax.jit,
    static_argnames=(
        "block",
        "block_v",
        "segments",
        "seq_len",
        "reverse",
        "emit_output",
        "num_warps",
        "num_stages",
        "interpret",
        "out_dtype",
        "fold",
    ),
)
def scan_kernel_call(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    init: jax.Array,
    masks: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    *,
    block: int,
    block_v: int,
    segments: int,
    seq_len: int,
    reverse: bool,
    emit_output: bool,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
    out_dtype=None,
    fold: bool = True,
):
    """One launch of the scan kernel.

    Args:
      q, k: ``[B, Tp, N, Hk]``; v: ``[B, Tp, N, Hv]`` with ``Tp`` a multiple of
        ``block * segments`` (zero-padded past ``seq_len``).
      slopes: ``[N]`` fp32.
      init: ``[B, N, P, Hk, Hv]`` fp32, the initial state of each of the ``P = segments`` segments.
      masks: packed sequences only, ``_segment_masks(runs, block, reverse)``: three ``[B, Tp]``
        arrays (run ids int32, "sees the incoming state" and "kept in the block's end state"
        fp32).
    Returns:
      ``(o [B, Tp, N, Hv], final [B, N, P, Hk, Hv])`` if ``emit_output`` else ``final`` alone; the
      final state of each segment is its local scan from its own initial state.
    """
    b, tp, n, hk = k.shape
    hv = v.shape[-1]
    assert tp % (block * segments) == 0, (tp, block, segments)
    seg_blocks = tp // (block * segments)
    nv = hv // block_v
    grid = (b, n, nv, segments)
    slopes16 = jnp.broadcast_to(slopes.astype(jnp.float32)[:, None], (n, _SLOPE_LANES))
    kern = functools.partial(
        _scan_kernel,
        block=block,
        seg_blocks=seg_blocks,
        seq_len=seq_len,
        reverse=reverse,
        emit_output=emit_output,
        fold=fold,
        segmented=masks is not None,
    )
    full_t = lambda width, tile: pl.BlockSpec(  # noqa: E731
        (None, tp, None, width),
        (lambda bi, ni, vi, si: (bi, 0, ni, vi))
        if tile
        else (lambda bi, ni, vi, si: (bi, 0, ni, 0)),
    )
    state_spec = pl.BlockSpec(
        (None, None, None, hk, block_v), lambda bi, ni, vi, si: (bi, ni, si, 0, vi)
    )
    in_specs = [
        full_t(hk, False),
        full_t(hk, False),
        full_t(block_v, True),
        pl.BlockSpec((None, _SLOPE_LANES), lambda bi, ni, vi, si: (ni, 0)),
        state_spec,
    ]
    row_spec = pl.BlockSpec((None, tp), lambda bi, ni, vi, si: (bi, 0))
    in_specs += [row_spec] * (0 if masks is None else len(masks))
    st_shape = jax.ShapeDtypeStruct((b, n, segments, hk, hv), jnp.float32)
    if emit_output:
        out_shape = (jax.ShapeDtypeStruct((b, tp, n, hv), out_dtype or q.dtype), st_shape)
        out_specs = (full_t(block_v, True), state_spec)
    else:
        out_shape = st_shape
        out_specs = state_spec
    return pl.pallas_call(
        kern,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lightning_scan_rev" if reverse else "lightning_scan",
    )(q, k, v, slopes16, init, *(masks or ()))


# --------------------------------------------------------------------------------------------
# Segment-parallel scan = states pass + XLA combine + output pass
# --------------------------------------------------------------------------------------------
def _auto_config(b: int, n: int, t_pad_blocks: int, hv: int, cfg: dict | None) -> dict:
    cfg = dict(cfg or {})
    cfg.setdefault("block_v", _pick(hv, 64))
    cfg.setdefault("num_warps", 4)
    cfg.setdefault("num_stages", 2)
    cfg.setdefault("fold", True)
    # A states-pass block of 128 measured 3-7% faster at the four benchmark shapes (run "final"),
    # but as a default it failed in the model's chunked prefill (B1 N16 T4096 with an initial
    # state: 320 KB of shared memory requested, 227 KB available on H200). Keep the block of the
    # output pass until a config is validated per shape on the GPU.
    if "segments" not in cfg:
        programs = b * n * (hv // cfg["block_v"])
        target = (7 * _num_sms()) // 2  # measured: ~4 programs per SM hide the loop latency
        seg = 1
        while programs * seg < target and t_pad_blocks % (seg * 2) == 0 and seg < 16:
            seg *= 2
        # a segment should hold many blocks, or the extra states pass is not worth it
        while seg > 1 and t_pad_blocks // seg < 16:
            seg //= 2
        cfg["segments"] = seg
    return cfg


def _segment_masks(runs: jax.Array, block: int, reverse: bool) -> tuple[jax.Array, ...]:
    """Per-token masks of a scan over ``block``-token blocks of packed sequences.

    ``runs [B, Tp]`` int32 (memory order; the padded tail repeats the last run). In scan order
    (reversed when ``reverse``): a token *sees* the state entering its block iff it is in the run
    of the token just before the block (the first block: the run of the first token, which is
    what the initial state feeds); it is *kept* in the block's end state iff it is in the run of
    the block's last token. Returned in memory order: ``(runs, sees f32, keep f32)``.
    """
    b, tp = runs.shape
    r = runs[:, ::-1] if reverse else runs
    blocks = r.reshape(b, tp // block, block)
    before = jnp.concatenate([r[:, :1], blocks[:, :-1, -1]], axis=1)  # [B, nb]
    sees = (blocks == before[:, :, None]).reshape(b, tp).astype(jnp.float32)
    keep = (blocks == blocks[:, :, -1:]).reshape(b, tp).astype(jnp.float32)
    if reverse:
        sees, keep = sees[:, ::-1], keep[:, ::-1]
    return runs, sees, keep


def _scan(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    init: jax.Array,
    runs: jax.Array | None = None,
    *,
    seq_len: int,
    block: int,
    reverse: bool,
    cfg: dict,
    interpret: bool,
    out_dtype,
) -> tuple[jax.Array, jax.Array]:
    """Full scan over padded ``[B, Tp, N, H]`` inputs from ``init [B, N, Hk, Hv]``; ``runs``
    ``[B, Tp]`` (packed sequences, padded tail = last run) restarts the state at run changes.

    Returns ``(o [B, Tp, N, Hv], final state [B, N, Hk, Hv] fp32)``.
    """
    b, tp, n, _ = k.shape
    p = cfg["segments"]
    masks = None if runs is None else _segment_masks(runs, block, reverse)
    common = dict(
        block=block,
        block_v=cfg["block_v"],
        seq_len=seq_len,
        reverse=reverse,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        interpret=interpret,
        fold=cfg["fold"],
    )
    init = init.astype(jnp.float32)
    if p == 1:
        o, fin = scan_kernel_call(
            q,
            k,
            v,
            slopes,
            init[:, :, None],
            masks,
            segments=1,
            emit_output=True,
            out_dtype=out_dtype,
            **common,
        )
        return o, fin[:, :, 0]
    # 1) local final state of each segment, from zero (no intra-block work: its own tiling)
    zeros = jnp.zeros(init.shape[:2] + (p,) + init.shape[2:], jnp.float32)
    st_block = cfg.get("states_block", block)
    if (tp // p) % st_block or masks is not None:  # the masks are made for `block`
        st_block = block
    st_common = dict(
        common,
        block=st_block,
        block_v=cfg.get("states_block_v", cfg["block_v"]),
        num_warps=cfg.get("states_warps", cfg["num_warps"]),
        num_stages=cfg.get("states_stages", cfg["num_stages"]),
    )
    local = scan_kernel_call(
        q, k, v, slopes, zeros, masks, segments=p, emit_output=False, **st_common
    )
    # 2) chain them: a segment of L tokens decays the incoming state by lam^L (the padded tail
    #    is handled by the kernel, so every segment spans exactly L real-or-virtual steps)
    seg_len = tp // p
    decay = jnp.exp(-slopes.astype(jnp.float32) * seg_len)[None, :, None, None]
    order = range(p) if not reverse else range(p - 1, -1, -1)
    # with padding only the last segment is short; its decay never matters in the forward
    # direction (it is the last one) and in reverse it is the first: use its true length
    last_len = seq_len - (p - 1) * seg_len
    decay_last = jnp.exp(-slopes.astype(jnp.float32) * last_len)[None, :, None, None]
    if masks is not None:  # a segment in which a run starts passes no state on
        unbroken = jnp.min(masks[1].reshape(b, p, seg_len), axis=-1)[:, None, :, None, None]
    inits = [None] * p
    cur = init
    for si in order:
        inits[si] = cur
        d = decay_last if si == p - 1 else decay
        if masks is not None:
            d = d * unbroken[:, :, si]
        cur = d * cur + local[:, :, si]
    final = cur
    inits = jnp.stack(inits, axis=2)
    # 3) every segment's output from its true initial state
    o, _ = scan_kernel_call(
        q, k, v, slopes, inits, masks, segments=p, emit_output=True, out_dtype=out_dtype, **common
    )
    return o, final


def _pad_t(x: jax.Array, tp: int) -> jax.Array:
    t = x.shape[1]
    return x if t == tp else jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))


def _pad_runs(runs: jax.Array | None, tp: int) -> jax.Array | None:
    if runs is None or runs.shape[1] == tp:
        return runs
    return jnp.pad(runs, ((0, 0), (0, tp - runs.shape[1])), mode="edge")


def _prep(t: int, block: int, segments: int | None) -> tuple[int, int]:
    nb = -(-t // block)
    if segments:
        nb = -(-nb // segments) * segments
    return nb, nb * block


def _fwd_impl(q, k, v, slopes, init, runs, block, cfg, interpret):
    b, t, n, hk = q.shape
    hv = v.shape[-1]
    nb, _ = _prep(t, block, None)
    cfg = _auto_config(b, n, nb, hv, cfg)
    _, tp = _prep(t, block, cfg["segments"])
    o, fin = _scan(
        _pad_t(q, tp),
        _pad_t(k, tp),
        _pad_t(v, tp),
        slopes,
        init,
        _pad_runs(runs, tp),
        seq_len=t,
        block=block,
        reverse=False,
        cfg=cfg,
        interpret=interpret,
        out_dtype=q.dtype,
    )
    return o[:, :t], fin


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _lightning(q, k, v, slopes, init, runs, block, cfg, bwd_cfg, interpret):
    return _fwd_impl(q, k, v, slopes, init, runs, block, _thaw(cfg), interpret)


def _lightning_fwd(q, k, v, slopes, init, runs, block, cfg, bwd_cfg, interpret):
    out = _fwd_impl(q, k, v, slopes, init, runs, block, _thaw(cfg), interpret)
    return out, (q, k, v, slopes, init, runs)


def _lightning_bwd(block, cfg, bwd_cfg, interpret, res, cts):
    q, k, v, slopes, init, runs = res
    do, dfin = cts
    b, t, n, hk = q.shape
    hv = v.shape[-1]
    nb, _ = _prep(t, block, None)
    bcfg = _thaw(bwd_cfg) if bwd_cfg is not None else _thaw(cfg)
    dfin = dfin.astype(jnp.float32)
    do = do.astype(q.dtype)
    c_q = _auto_config(b, n, nb, hk, bcfg)  # dq scan: values are k (width Hk)
    c_v = _auto_config(b, n, nb, hv, bcfg)  # dv scan: values are do (width Hv)
    c_k = _auto_config(b, n, nb, hk, bcfg)  # dk scan: values are q (width Hk)
    _, tp = _prep(t, block, max(c_q["segments"], c_v["segments"], c_k["segments"]))
    qp, kp, vp, dop = (_pad_t(x, tp) for x in (q, k, v, do))
    runs_p = _pad_runs(runs, tp)
    common = dict(seq_len=t, block=block, interpret=interpret)
    inv_lam = jnp.exp(slopes.astype(jnp.float32))[None, :, None, None]
    lam = jnp.exp(-slopes.astype(jnp.float32))[None, :, None, None]
    # dq_t = do_t S_t^T: forward scan with (q, k, v) -> (do, v, k), state S^T
    dq, _ = _scan(
        dop,
        vp,
        kp,
        slopes,
        jnp.swapaxes(init, -1, -2),
        runs_p,
        reverse=False,
        cfg=c_q,
        out_dtype=q.dtype,
        **common,
    )
    # dv_t = k_t dS_t: reverse scan with (q, k, v) -> (k, q, do), state dS
    dv, ds1 = _scan(
        kp, qp, dop, slopes, dfin * inv_lam, runs_p, reverse=True, cfg=c_v, out_dtype=v.dtype,
        **common,
    )  # fmt: skip
    # dk_t = v_t dS_t^T: reverse scan with (q, k, v) -> (v, do, q), state dS^T
    dk, _ = _scan(
        vp,
        dop,
        qp,
        slopes,
        jnp.swapaxes(dfin * inv_lam, -1, -2),
        runs_p,
        reverse=True,
        cfg=c_k,
        out_dtype=k.dtype,
        **common,
    )
    dinit = (lam * ds1).astype(init.dtype)
    return dq[:, :t], dk[:, :t], dv[:, :t], jnp.zeros_like(slopes), dinit, None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def _freeze(cfg: dict | None):
    return None if cfg is None else tuple(sorted(cfg.items()))


def _thaw(cfg) -> dict | None:
    return None if cfg is None else dict(cfg)


def lightning_attention_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    block_size: int | None = None,
    config: dict | None = None,
    bwd_config: dict | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Lightning attention forward (differentiable; the backward is the same Pallas kernel).

    Args:
      q, k: ``[B, T, N, Hk]``; v: ``[B, T, N, Hv]`` (Hk, Hv powers of two >= 16; bf16 preferred).
      slopes: ``[N]`` decay rates (treated as constants: zero cotangent).
      initial_state: optional ``[B, N, Hk, Hv]`` fp32 (feeds the first run of each row).
      segment_ids: optional ``[B, T]`` int (packed sequences): the state restarts from zero
        wherever the id changes; attention never crosses a change.
      block_size: tokens per block ``C`` (power of two >= 16; None = the tuned default).
      config / bwd_config: optional overrides ``{"block_v", "segments", "num_warps",
        "num_stages", "fold", "states_block", "states_block_v", "states_warps",
        "states_stages"}`` for the forward and the backward scans (``fold``: decays folded into
        the Q K^T operands, needs ``slopes * block_size / 2 < 80``; ``states_*``: tiling of the
        states-only pass of the segment-parallel scan).
      interpret: run the kernels in the Pallas interpreter (CPU testing).
    Returns:
      ``(o [B, T, N, Hv] in q.dtype, final_state [B, N, Hk, Hv] fp32)``.
    """
    b, t, n, hk = q.shape
    hv = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"shape mismatch: q {q.shape} k {k.shape} v {v.shape}")
    for h in (hk, hv):
        if h < 16 or h & (h - 1):
            raise ValueError(f"head dims must be powers of two >= 16, got {hk}, {hv}")
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if initial_state is None:
        initial_state = jnp.zeros((b, n, hk, hv), jnp.float32)
    runs = None
    if segment_ids is not None:
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
        runs = segment_runs(segment_ids, b, t)
    dt = q.dtype
    k = k.astype(dt)
    v = v.astype(dt)
    return _lightning(
        q,
        k,
        v,
        slopes.astype(jnp.float32),
        initial_state.astype(jnp.float32),
        runs,
        block_size,
        _freeze(config),
        _freeze(bwd_config),
        interpret,
    )


# --------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------
def _decode_kernel(q_ref, k_ref, v_ref, slope_ref, s_ref, o_ref, s_out_ref):
    s = jnp.max(slope_ref[...])
    q = q_ref[...].astype(jnp.float32)  # [Hk]
    k = k_ref[...].astype(jnp.float32)  # [Hk]
    v = v_ref[...].astype(jnp.float32)  # [BV]
    st = s_ref[...] * jnp.exp(-s) + k[:, None] * v[None, :]  # [Hk, BV]
    s_out_ref[...] = st
    o_ref[...] = jnp.sum(q[:, None] * st, axis=0).astype(o_ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("block_v", "num_warps", "interpret"), donate_argnames=("state",)
)
def _decode_call(q, k, v, slopes, state, *, block_v: int, num_warps: int, interpret: bool):
    b, n, hk = q.shape
    hv = v.shape[-1]
    slopes16 = jnp.broadcast_to(slopes.astype(jnp.float32)[:, None], (n, _SLOPE_LANES))
    vec = lambda w, tile: pl.BlockSpec(  # noqa: E731
        (None, None, w),
        (lambda bi, ni, vi: (bi, ni, vi)) if tile else (lambda bi, ni, vi: (bi, ni, 0)),
    )
    st_spec = pl.BlockSpec((None, None, hk, block_v), lambda bi, ni, vi: (bi, ni, 0, vi))
    return pl.pallas_call(
        _decode_kernel,
        grid=(b, n, hv // block_v),
        in_specs=[
            vec(hk, False),
            vec(hk, False),
            vec(block_v, True),
            pl.BlockSpec((None, _SLOPE_LANES), lambda bi, ni, vi: (ni, 0)),
            st_spec,
        ],
        out_specs=(vec(block_v, True), st_spec),
        out_shape=(
            jax.ShapeDtypeStruct((b, n, hv), q.dtype),
            jax.ShapeDtypeStruct(state.shape, jnp.float32),
        ),
        input_output_aliases={4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="lightning_decode",
    )(q, k, v, slopes16, state)


def lightning_decode_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    state: jax.Array,
    *,
    block_v: int = 64,
    num_warps: int = 8,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One decode step: ``S = exp(-s) S + k^T v; o = q S``.

    Args:
      q, k: ``[B, N, Hk]`` or ``[B, 1, N, Hk]``; v: same with ``Hv``.
      slopes: ``[N]``; state: ``[B, N, Hk, Hv]`` fp32 (donated: updated in place).
    Returns:
      ``(o, new_state)`` with ``o`` shaped like ``q`` (last dim ``Hv``) in q.dtype.
    """
    squeeze = q.ndim == 4
    if squeeze:
        if q.shape[1] != 1:
            raise ValueError("lightning_decode_gpu takes one token; use the scan for more")
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    hv = v.shape[-1]
    o, st = _decode_call(
        q,
        k.astype(q.dtype),
        v.astype(q.dtype),
        slopes.astype(jnp.float32),
        state.astype(jnp.float32),
        block_v=_pick(hv, block_v),
        num_warps=num_warps,
        interpret=interpret,
    )
    return (o[:, None] if squeeze else o), st


def lightning_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slopes: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    block_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dispatcher-facing adapter with the ``api.lightning_attention`` keyword signature.

    ``block_size`` is used only if it is 32, 64 or 128 (the XLA default of 256 would be a poor
    GPU tile); otherwise the tuned default is used.
    """
    if block_size not in (32, 64, 128):
        block_size = None
    return lightning_attention_gpu(
        q, k, v, slopes, initial_state, segment_ids=segment_ids, block_size=block_size
    )


def lightning_decode(
    q: jax.Array, k: jax.Array, v: jax.Array, slopes: jax.Array, state: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Dispatcher-facing alias of :func:`lightning_decode_gpu` (q, k, v ``[B, N, H]``)."""
    return lightning_decode_gpu(q, k, v, slopes, state)
