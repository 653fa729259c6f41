"""Benchmark: the MoE layer and its grouped matmul at MiniMax width, against a dense matmul.

Run on a GPU (H100/H200, bf16; or `python experiments/run.py moe` / `ep`)::

    PYTHONUNBUFFERED=1 python3 experiments/bench_moe.py            # 1 GPU
    PYTHONUNBUFFERED=1 python3 experiments/bench_moe.py --ep       # + EP=2 rows (>= 2 GPUs)

E=32 experts, top-2, D=6144, F=9216, bf16, M in {4K, 16K, 64K} tokens (A = 2M routed rows).
Rows (one JSON line each, appended to --out):

* what="gmm": the fused w1/w3 grouped matmul alone, A x D x 2F, for this repo's
  `grouped_matmul` (auto = Mosaic GPU kernels), `jax.lax.ragged_dot` and a dense matmul of the
  same M, K, N; forward and forward+backward (dx via the transposed-RHS kernel, dw via tgmm).
* what="layer": the whole MoE layer (`moe_sorted`: route, sort, gmm w1/w3, SwiGLU, gmm w2,
  combine) beside a dense SwiGLU FFN over the same A rows and the layer built on ragged_dot.
* what="layer_ep": `moe_ep` on a (expert=2) mesh at the same global token count, per-GPU
  TFLOP/s, and the time of routing + sort + both all-to-alls (FFN replaced by identity).

TFLOP/s count routed tokens only: forward 2*A*D*2F + 2*A*F*D = 6*A*D*F, fwd+bwd 3x that.
Goals (issue 4): layer fwd >= 70% and fwd+bwd >= 60% of the dense TFLOP/s, >= 10x ragged_dot,
EP=2 per-GPU >= 80% of one GPU at 64K tokens. `--sweep` times several gmm block configs first
and uses the best. `--small` shrinks every dimension for a CPU smoke run of the script.
Rows go through `experiments.harness` (median ms with its spread; slow baselines, one warm call
over 0.1 s, take 3 samples). Forward rows of our implementations are checked against the same
computation on `jax.lax.ragged_dot` when that ran, and the EP rows against the one-GPU layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import harness  # noqa: E402
from experiments.profiling import kernel_profile  # noqa: E402
from minimax_jax import sharding  # noqa: E402
from minimax_jax.model import moe_parallel, quant  # noqa: E402
from minimax_jax.model.moe import dispatch as dispatch_rows  # noqa: E402
from minimax_jax.model.moe import ffn_implementation, moe_sorted, route, sort_by_expert  # noqa: E402
from pallas_kernels.moe import gpu as moe_gpu  # noqa: E402
from pallas_kernels.moe.api import grouped_matmul, resolve_implementation  # noqa: E402

ANCHOR = {"gmm_mgpu_tflops_32768x2048x4096": 385, "dense_tflops_32768x2048x4096": 547}
SWEEP = [
    moe_gpu.BlockSizes(128, 128, 64, 4, 4),
    moe_gpu.BlockSizes(128, 128, 64, 4, 1),
    moe_gpu.BlockSizes(128, 256, 64, 4, 2),
    moe_gpu.BlockSizes(64, 128, 64, 4, 4),
    moe_gpu.BlockSizes(128, 128, 64, 6, 8),
    moe_gpu.BlockSizes(192, 128, 64, 4, 4),
]


PROFILE = False  # --profile: add kernel profiles of our layer and the EP rows


def profile_row(emit, row, fn, *args) -> None:
    """A kernel profile of fn(*args) (already compiled and warm) as a row of its own."""
    if not PROFILE:
        return
    try:
        prof = kernel_profile(lambda: jax.block_until_ready(fn(*args)), reps=2)
    except Exception as e:  # noqa: BLE001 - a failed profile must not end the benchmark
        prof = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    emit({**row, "what": f"profile:{row.get('what')}", "profile": prof})


def safe_time(fn, *args) -> tuple[float | None, dict, str | None]:
    """(median ms, timing fields, None) or (None, {}, error) when the implementation fails (e.g.
    ragged_dot out of memory). Slow baselines (a warm call over 0.1 s) take 3 samples."""
    try:
        t = harness.time_device(fn, *args, slow_s=0.1, slow_reps=3)
    except Exception as e:  # noqa: BLE001 - record any failure as a row, keep benchmarking
        return None, {}, f"{type(e).__name__}: {str(e)[:200]}"
    return t.median * 1e3, t.row_ms(), None


def safe_check(fn, args, ref, tol: float = 5e-2) -> dict:
    """Max error of fn(*args) against ref (bf16 tier), or {} without a reference."""
    if ref is None:
        return {}
    try:
        return harness.check(fn(*args), ref, atol=tol, rtol=tol)
    except Exception as e:  # noqa: BLE001 - a failed check is a field, not the end of the run
        return {"check_ok": False, "check_error": f"{type(e).__name__}: {str(e)[:200]}"}


def reference_output(fn, *args):
    """fn(*args) as the reference of the checks, or None when it cannot run (out of memory)."""
    try:
        return jax.block_until_ready(jax.jit(fn)(*args))
    except Exception:  # noqa: BLE001 - no reference: the rows are not checked
        return None


def make_problem(m: int, d: int, f: int, e: int, k: int, dtype, seed: int = 0):
    """Random MoE params and tokens; the router is random, so loads are mildly skewed."""
    ks = jax.random.split(jax.random.key(seed), 4)
    params = {
        "router": jax.random.normal(ks[0], (d, e), jnp.float32) * d**-0.5,
        "wi": (jax.random.normal(ks[1], (e, d, 2, f), jnp.float32) * d**-0.5).astype(dtype),
        "wo": (jax.random.normal(ks[2], (e, f, d), jnp.float32) * f**-0.5).astype(dtype),
    }
    x = jax.random.normal(ks[3], (m, d), jnp.float32).astype(dtype)
    return params, x


def sorted_rows(params, x, k):
    """The gmm operands of the layer: rows sorted by expert [A,D] and group sizes [E]."""
    _, experts, _ = route(x, params["router"], k)
    order, gs = sort_by_expert(experts, params["wi"].shape[0])
    return dispatch_rows(x, order, k), gs


def fwd_and_bwd(fn):
    """fn(x, w) -> y; returns (jitted fwd, jitted fwd+bwd w.r.t. x and w with a fixed dy)."""

    def loss(x, w, dy):
        return jnp.sum((fn(x, w) * dy).astype(jnp.float32))

    fwd = jax.jit(fn)
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return fwd, bwd


def gmm_rows(xs, gs, w, impl_names, emit, base, ragged=True):
    """Time the A x D x 2F grouped matmul per implementation and the dense matmul."""
    a, d = xs.shape
    n = w.shape[2]
    flops = 2.0 * a * d * n
    # A random cotangent: with ones XLA simplifies dy @ w^T for the dense matmul (column sums).
    dy = jax.random.normal(jax.random.key(7), (a, n), jnp.float32).astype(xs.dtype)
    fns = {"dense": lambda x, w: jnp.dot(x, w[0])}
    if ragged:
        fns["ragged_dot"] = lambda x, w: jax.lax.ragged_dot(x, w, gs)
    for name in impl_names:
        fns[name] = functools.partial(_gmm_impl, gs=gs, impl=name)
    ref = reference_output(fns["ragged_dot"], xs, w) if ragged else None
    results = {}
    for name, fn in fns.items():
        fwd, bwd = fwd_and_bwd(fn)
        fwd_bwd = functools.partial(_call_with_dy, bwd, dy=dy)
        for mode, f, mult in (("fwd", fwd, 1), ("fwd_bwd", fwd_bwd, 3)):
            ms, timing, err = safe_time(f, xs, w)
            tf = None if ms is None else mult * flops / (ms * 1e-3) / 1e12
            results[(name, mode)] = tf
            checked = safe_check(f, (xs, w), ref) if mode == "fwd" and name in impl_names else {}
            emit({**base, "what": "gmm", "impl": name, "mode": mode, "shape_MKN": [a, d, n],
                  "ms": ms, **timing, "tflops": tf, "error": err, **checked})  # fmt: skip
    return results


def _call_with_dy(bwd, x, w, *, dy):
    return bwd(x, w, dy)


def _gmm_impl(x, w, *, gs, impl):
    return grouped_matmul(x, w, gs, implementation=impl)


def layer_rows(params, x, k, impls, emit, base, ragged=True, dense=True):
    """Time the whole MoE layer (ours per implementation, and on ragged_dot) and a dense FFN
    over the same rows. Returns ({(name, mode): TFLOP/s}, {impl: forward output})."""
    m, d = x.shape
    e, _, _, f = params["wi"].shape
    a = m * k
    flops = 6.0 * a * d * f
    xs, _ = sorted_rows(params, x, k)
    dense_p = {"wi": params["wi"][0], "wo": params["wo"][0]}

    def dense_ffn(p, rows):
        h = jnp.einsum("ad,dcf->acf", rows, p["wi"])
        return (jax.nn.silu(h[:, 0]) * h[:, 1]) @ p["wo"]

    variants = {"dense_ffn": (dense_ffn, dense_p, xs)}
    for impl in impls:
        variants[impl] = (functools.partial(_layer, k=k, impl=impl), params, x)
    if not dense:
        del variants["dense_ffn"]
    if ragged:
        variants["ragged_dot"] = (lambda p, x: moe_sorted(p, x, k, implementation="xla")[0],
                                  params, x)  # fmt: skip
    ref = reference_output(variants["ragged_dot"][0], params, x) if ragged else None
    out, outputs = {}, {}
    for name, (fn, p, inp) in variants.items():
        fwd = jax.jit(fn)
        bwd = jax.jit(jax.grad(lambda p, i, fn=fn: jnp.sum(fn(p, i).astype(jnp.float32) ** 2),
                               argnums=(0, 1)))  # fmt: skip
        for mode, g, mult in (("fwd", fwd, 1), ("fwd_bwd", bwd, 3)):
            ms, timing, err = safe_time(g, p, inp)
            tf = None if ms is None else mult * flops / (ms * 1e-3) / 1e12
            out[(name, mode)] = tf
            checked = {}
            if ms is not None and mode == "fwd" and name in impls:
                outputs[name] = g(p, inp)
                checked = safe_check(g, (p, inp), ref)
            row = {**base, "what": "layer", "impl": name, "mode": mode, "tokens": m,
                   "routed_rows": a, "ms": ms, **timing, "tflops": tf, "error": err,
                   **checked}  # fmt: skip
            emit(row)
            if ms is not None and name in impls:
                profile_row(emit, row, g, p, inp)
    return out, outputs


def _layer(p, x, *, k, impl):
    return moe_sorted(p, x, k, implementation=impl)[0]


def int8_rows(params, x, k, impls, emit, base, res: dict) -> None:
    """The layer forward with experts_int8 weights (wi, wo int8 + per-output-channel scales) per
    implementation: checked against the same layer on the dequantised weights (XLA, fp32
    weights), timed, and its time over the bf16 layer's from `layer_rows` (res)."""
    m, d = x.shape
    flops = 6.0 * m * k * d * params["wi"].shape[-1]
    qp = dict(params)
    for name in ("wi", "wo"):
        qp[name] = quant.QArray(*quant.quantize(params[name], (1,)))
    deq = {**params, "wi": qp["wi"].dequantize(), "wo": qp["wo"].dequantize()}
    ref = reference_output(lambda p, x: moe_sorted(p, x, k, implementation="xla")[0], deq, x)
    for impl in impls:
        fwd = jax.jit(functools.partial(_layer, k=k, impl=impl))
        ms, timing, err = safe_time(fwd, qp, x)
        checked = {} if ms is None else safe_check(fwd, (qp, x), ref)
        bf16 = res.get((impl, "fwd"))
        bf16_ms = None if not bf16 else flops / (bf16 * 1e12) * 1e3
        emit({**base, "what": "layer_int8", "quantize": "experts_int8", "impl": impl,
              "mode": "fwd", "tokens": m, "ms": ms, **timing,
              "tflops": None if ms is None else flops / (ms * 1e-3) / 1e12, "error": err,
              "bf16_ms": bf16_ms, "over_bf16": None if not (ms and bf16_ms) else ms / bf16_ms,
              "goal_over_bf16": 1.2, **checked})  # fmt: skip


def ratio_rows(res: dict, ours: str, what: str, emit, base) -> None:
    """Derived figures of one run: ours vs dense and vs ragged_dot."""
    for mode in ("fwd", "fwd_bwd"):
        dense = res.get(("dense" if what == "gmm" else "dense_ffn", mode))
        o, r = res.get((ours, mode)), res.get(("ragged_dot", mode))
        emit({**base, "what": f"{what}_ratio", "impl": ours, "mode": mode,
              "vs_dense": None if not (o and dense) else o / dense,
              "vs_ragged_dot": None if not (o and r) else o / r,
              "goal_vs_dense": 0.7 if mode == "fwd" else 0.6,
              "goal_vs_ragged_dot": 10.0})  # fmt: skip


def ep_setup(params, x):
    """A (expert=2) mesh on the first 2 devices; params and tokens placed by the fsdp_ep rules."""
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, expert=2, tensor=1),
                              devices=jax.devices()[:2])  # fmt: skip
    rules, _ = sharding.load_rules("fsdp_ep")
    m, d = x.shape
    x3 = x.reshape(2, m // 2, d)
    place = {
        "router": rules.sharding(mesh, ("embed", "experts")),
        "wi": rules.sharding(mesh, ("experts", "embed", "gate_up", "mlp"), params["wi"].shape),
        "wo": rules.sharding(mesh, ("experts", "mlp", "embed"), params["wo"].shape),
    }
    p = jax.device_put(params, place)
    x3 = jax.device_put(x3, rules.sharding(mesh, ("batch", "length", "act_embed"), x3.shape))
    return mesh, rules, p, x3


def ep_rows(params, x, k, impl, emit, base, single_tflops, quick=False, microbatches=(1,),
            single_out=None):  # fmt: skip
    """EP=2 layer on 2 devices (global tokens = x's rows) per all-to-all flavour: the padded
    `all_to_all` ("dense") dropless and with capacity 1.25, and `ragged_all_to_all`; plus the
    dispatch-only time (route + sort + both all-to-alls + combine, FFN skipped). Each padded
    flavour once per entry of `microbatches` (independent exchanges per device). Forward rows
    are checked against `single_out` (the one-GPU layer's output; capacity rows drop tokens)."""
    mesh, rules, p, x3 = ep_setup(params, x)
    m, d = x.shape
    ref = None if single_out is None else single_out.reshape(x3.shape)
    flops = 6.0 * m * k * d * params["wi"].shape[-1]
    configs = [("dense", None, ("fwd", "fwd_bwd")), ("dense", 1.25, ("fwd", "fwd_bwd")),
               ("ragged", None, ("fwd",))]  # fmt: skip
    if quick:  # dropless padded all_to_all, and capacity 1.25 forward only
        configs = [configs[0], ("dense", 1.25, ("fwd",))]
    configs = [(dp, cf, mb, modes) for dp, cf, modes in configs
               for mb in (microbatches if dp == "dense" else (1,))]  # fmt: skip
    for dispatch, cf, mb, modes in configs:

        def layer(p, x, cf=cf, dispatch=dispatch, mb=mb):
            return moe_parallel.moe_ep(p, x, k, mesh=mesh, rules=rules, implementation=impl,
                                       capacity_factor=cf, dispatch=dispatch,
                                       microbatches=mb)[0]  # fmt: skip

        fwd = jax.jit(layer)
        bwd = jax.jit(jax.grad(lambda p, x, f=layer: jnp.sum(f(p, x).astype(jnp.float32) ** 2),
                               (0, 1)))  # fmt: skip
        for mode, g, mult in (("fwd", fwd, 1), ("fwd_bwd", bwd, 3)):
            if mode not in modes:
                continue
            ms, timing, err = safe_time(g, p, x3)
            per_gpu = None if ms is None else mult * flops / 2 / (ms * 1e-3) / 1e12
            one = single_tflops.get(mode)
            checked = safe_check(g, (p, x3), ref) if ms is not None and mode == "fwd" else {}
            row = {**base, "what": "layer_ep", "mode": mode, "ep": 2, "capacity_factor": cf,
                   "dispatch": dispatch, "microbatches": mb, "tokens": m, "ms": ms, **timing,
                   "tflops_per_gpu": per_gpu, **checked,
                   "single_gpu_tflops": one, "goal": 0.8, "error": err,
                   "per_gpu_vs_single": None if not (per_gpu and one)
                   else per_gpu / one}  # fmt: skip
            emit(row)
            if ms is not None and mode == "fwd":
                profile_row(emit, row, g, p, x3)
        if mb > 1:
            continue
        real_ffn = moe_parallel.expert_ffn, moe_parallel.expert_ffn_padded
        moe_parallel.expert_ffn = lambda xs, wi, wo, gs, impl, **kw: xs  # dispatch only
        moe_parallel.expert_ffn_padded = lambda xs, expert, wi, wo, **kw: xs  # the padded path
        # A new function object: jax.jit(layer) would reuse the executable compiled above with
        # the real FFN (and time the whole layer as "dispatch only").
        only = jax.jit(lambda p, x, f=layer: f(p, x))
        try:
            ms, timing, err = safe_time(only, p, x3)
            row = {**base, "what": "layer_ep_dispatch", "mode": "fwd", "ep": 2, "tokens": m,
                   "capacity_factor": cf, "dispatch": dispatch, "ms": ms, **timing, "error": err,
                   "note": "route + sort + 2 all-to-alls + combine, FFN skipped"}  # fmt: skip
            emit(row)
            if ms is not None:
                profile_row(emit, row, only, p, x3)
        finally:
            moe_parallel.expert_ffn, moe_parallel.expert_ffn_padded = real_ffn


def sweep_blocks(xs, gs, w, emit, base) -> None:
    """Time gmm forward per block config; make the best the default for the rest of the run."""
    best = (float("inf"), None)
    for blocks in SWEEP:
        fn = jax.jit(lambda x, w, b=blocks: moe_gpu.gmm(x, w, gs, blocks=b))
        ms, timing, err = safe_time(fn, xs, w)
        emit({**base, "what": "gmm_sweep", "blocks": dataclasses.asdict(blocks), "ms": ms,
              **timing, "error": err})  # fmt: skip
        if ms is not None and ms < best[0]:
            best = (ms, blocks)
    if best[1] is not None:
        moe_gpu.GMM_BLOCKS = best[1]
        emit({**base, "what": "gmm_sweep_best", "blocks": dataclasses.asdict(best[1])})


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--tokens", default="4096,16384,65536")
    ap.add_argument("--ep", action="store_true", help="also EP=2 rows (needs 2 devices)")
    ap.add_argument("--sweep", action="store_true", help="sweep gmm block sizes first")
    ap.add_argument("--ep_microbatches", default="1", help="EP micro-batch counts, e.g. 1,2")
    ap.add_argument("--small", action="store_true", help="tiny dims: CPU smoke test")
    ap.add_argument("--no_gmm", action="store_true", help="skip the gmm-only rows")
    ap.add_argument(
        "--impls",
        default="auto",
        help="expert-FFN implementations to time, comma-separated (the first one is the "
        "single-GPU baseline of the EP rows and runs them), e.g. gpu,padded; auto = what the "
        "model's 'auto' runs here (padded on GPU)",
    )
    ap.add_argument(
        "--ep_only",
        action="store_true",
        help="only our layer on 1 GPU (the "
        "baseline) and the EP rows (dropless dense dispatch, capacity 1.25 fwd)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="kernel profiles of our layer (fwd, fwd+bwd) and of the EP rows",
    )
    ap.add_argument(
        "--ragged_max_tokens",
        type=int,
        default=16384,
        help="time jax.lax.ragged_dot only up to this many tokens (it computes "
        "every expert for every row on GPU: ~1 s per 64K-token forward)",
    )
    ap.add_argument(
        "--int8",
        action="store_true",
        help="also the layer forward with experts_int8 weights (vs bf16)",
    )
    return ap.parse_args()


def main() -> None:
    global PROFILE
    args = parse_args()
    PROFILE = args.profile
    e, k, d, f = (32, 2, 6144, 9216) if not args.small else (8, 2, 128, 192)
    tokens = [int(t) for t in args.tokens.split(",")] if not args.small else [256]
    dtype = jnp.bfloat16
    # "auto" is what the model runs: the padded FFN on GPU (bf16), else the platform's kernel.
    impls = [ffn_implementation(v, dtype) for v in args.impls.split(",")]
    impls = [v if v == "padded" else resolve_implementation(v) for v in impls]
    impl = impls[0]
    base = {"E": e, "top_k": k, "D": d, "F": f, "gmm_impl": impl, "anchor": ANCHOR}
    rows = harness.Rows(args.out, bench="moe", dtype="bfloat16")
    keys = ("what", "impl", "dispatch", "capacity_factor", "microbatches", "mode", "tokens",
            "ms", "tflops", "vs_dense", "vs_ragged_dot", "tflops_per_gpu", "per_gpu_vs_single",
            "max_rel_err", "error")  # fmt: skip

    def emit(row):  # the whole row goes to the file; the log gets the fields that matter
        rows.emit(row, echo=lambda r: {kk: r[kk] for kk in keys if r.get(kk) is not None})

    for i, m in enumerate(tokens):
        params, x = make_problem(m, d, f, e, k, dtype)
        xs, gs = sorted_rows(params, x, k)
        wi = params["wi"].reshape(e, d, 2 * f)
        row = {**base, "tokens": m, "group_sizes_min_max": [int(gs.min()), int(gs.max())]}
        if args.sweep and impl == "gpu" and i == 0:
            sweep_blocks(xs, gs, wi, emit, row)
        names = [v for v in impls if v != "xla"]
        ragged = (args.small or m <= args.ragged_max_tokens) and not args.ep_only
        if not (args.ep_only or args.no_gmm):
            res = gmm_rows(xs, gs, wi, names, emit, row, ragged)
            for v in names:
                ratio_rows(res, v, "gmm", emit, row)
        res, outputs = layer_rows(params, x, k, names or [impl], emit, row, ragged,
                                  dense=not args.ep_only)  # fmt: skip
        if not args.ep_only:
            for v in names or [impl]:
                ratio_rows(res, v, "layer", emit, row)
        if args.int8:
            int8_rows(params, x, k, names or [impl], emit, row, res)
        if args.ep and jax.device_count() >= 2:
            single = {mode: res.get((impl, mode)) for mode in ("fwd", "fwd_bwd")}
            ep_rows(
                params,
                x,
                k,
                impl,
                emit,
                row,
                single,
                quick=args.ep_only,
                microbatches=tuple(int(v) for v in args.ep_microbatches.split(",")),
                single_out=outputs.get(impl),
            )
        del params, x, xs, outputs


if __name__ == "__main__":
    main()
