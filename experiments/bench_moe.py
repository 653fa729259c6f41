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
Rows go through `experiments.harness` (device time per call, median with its spread; slow
baselines, one warm call over 0.1 s, take 3 samples and say `few_reps`).

Checks, before the timing, at the benchmarked shape: every grouped-matmul forward against an
fp32-accumulated product of sampled rows of every group with their expert's weights
(`gmm_check`); every layer forward on a sample of tokens against the XLA layer on those tokens
(`layer_check`: a token's output depends only on itself); and with `--routings` (default
uniform,skewed) each implementation's layer forward again on tokens routed exactly uniformly
and Zipf-skewed (the largest group several times the mean: the padded FFN's fallback branch),
rows what="layer_routing", timed too. Forward + backward rows are not checked here (the
gradients are tested in tests/test_moe_padded.py and tests/test_grouped_matmul.py); they say so.
The grouped matmul's forward + backward returns the forward output beside the gradients of a
random cotangent (`harness.fwd_bwd`): rows before that (`loss` absent) used sum(y * dy), linear
in y, which let XLA drop the forward while the TFLOP/s counted it (marked invalid in results/).
The EP rows are checked against the one-GPU layer.
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
import numpy as np  # noqa: E402

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
    """Max error of fn(*args) against ref (bf16 tier), or a reason without a reference."""
    if ref is None:
        return harness.no_check("no reference ran at this size")
    try:
        return harness.check(fn(*args), ref, atol=tol, rtol=tol)
    except Exception as e:  # noqa: BLE001 - a failed check is a field, not the end of the run
        return {"check_ok": False, "check_error": f"{type(e).__name__}: {str(e)[:200]}"}


def guarded(check, *args) -> dict:
    """check(*args) as row fields; a failure to check is recorded, not raised."""
    try:
        return check(*args)
    except Exception as e:  # noqa: BLE001
        return {"check_ok": False, "check_error": f"{type(e).__name__}: {str(e)[:200]}"}


def reference_output(fn, *args):
    """fn(*args) as the reference of a check, or None when it cannot run (out of memory)."""
    try:
        return jax.block_until_ready(jax.jit(fn)(*args))
    except Exception:  # noqa: BLE001 - no reference: the rows say so
        return None


def routing_assignments(m: int, e: int, k: int, routing: str, seed: int = 0) -> np.ndarray:
    """[m, k] distinct experts per token. "uniform": token i takes (i + j * e // k) mod e, so
    every expert gets exactly m k / e rows (m a multiple of e); "skewed": a Gumbel top-k draw
    from Zipf probabilities p_j ~ (j + 1)^-1.2 (the largest group several times the mean)."""
    if routing == "uniform":
        return (np.arange(m)[:, None] + np.arange(k)[None] * (e // k)) % e
    if routing == "skewed":
        rng = np.random.default_rng(seed)
        logp = -1.2 * np.log(np.arange(1, e + 1))
        return np.argsort(-(logp + rng.gumbel(size=(m, e))), axis=1)[:, :k]
    raise ValueError(f"routing must be uniform or skewed, got {routing!r}")


def make_problem(m: int, d: int, f: int, e: int, k: int, dtype, seed: int = 0,
                 routing: str = "random"):  # fmt: skip
    """Random MoE params and tokens. "random": a random router (loads mildly skewed); else a
    router reading x's first e coordinates, which are set so the top-k experts are
    `routing_assignments` (top-1 logit 4, top-2 3, ..., the rest N(0, 0.1))."""
    ks = jax.random.split(jax.random.key(seed), 4)
    params = {
        "router": jax.random.normal(ks[0], (d, e), jnp.float32) * d**-0.5,
        "wi": (jax.random.normal(ks[1], (e, d, 2, f), jnp.float32) * d**-0.5).astype(dtype),
        "wo": (jax.random.normal(ks[2], (e, f, d), jnp.float32) * f**-0.5).astype(dtype),
    }
    x = jax.random.normal(ks[3], (m, d), jnp.float32)
    if routing != "random":
        chosen = routing_assignments(m, e, k, routing, seed)
        logits = np.random.default_rng(seed + 1).normal(0, 0.1, (m, e)).astype(np.float32)
        np.put_along_axis(logits, chosen, 4.0 - np.arange(k, dtype=np.float32)[None], axis=1)
        x = x.at[:, :e].set(jnp.asarray(logits))
        params["router"] = jnp.eye(d, e, dtype=jnp.float32)
    return params, x.astype(dtype)


def sorted_rows(params, x, k):
    """The gmm operands of the layer: rows sorted by expert [A,D] and group sizes [E]."""
    _, experts, _ = route(x, params["router"], k)
    order, gs = sort_by_expert(experts, params["wi"].shape[0])
    return dispatch_rows(x, order, k), gs


def group_sample(gs, per: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Row indices [E, per] of up to `per` rows spread over each group of the sorted rows (the
    first and the last included) and a mask [E, per] of the valid ones."""
    gs = np.asarray(gs)
    starts = np.concatenate([[0], np.cumsum(gs)[:-1]])
    m = np.minimum(gs, per)[:, None]  # rows taken from each group
    j = np.arange(per)[None]
    pick = j / np.maximum(m - 1, 1) * np.maximum(gs - 1, 0)[:, None]
    idx = starts[:, None] + np.round(pick).astype(np.int64)
    valid = j < m
    return np.where(valid, idx, 0), valid


def gmm_check(out, xs, w, gs, tol: float = 5e-2) -> dict:
    """A grouped-matmul output [A,N] on sampled rows of every group against xs[rows] @ w[group]
    with fp32 accumulation (one batched product per expert: no weight is gathered)."""
    idx, valid = group_sample(gs)
    ref = jnp.einsum("esd,edn->esn", xs[idx], w, preferred_element_type=jnp.float32)
    got = jnp.asarray(out)[idx].astype(jnp.float32)
    mask = jnp.asarray(valid)[..., None]
    fields = harness.check(jnp.where(mask, got, 0), jnp.where(mask, ref, 0), tol, tol)
    return fields | {"check_rows": int(valid.sum()), "check_ref": "fp32-accumulated rows x w[g]"}


def layer_check(out, params, x, k, tol: float = 5e-2, sample: int = 512) -> dict:
    """A layer output [M,D] on `sample` tokens against the XLA layer (ragged_dot) run on those
    tokens only."""
    m = x.shape[0]
    rows = np.unique(np.linspace(0, m - 1, min(sample, m)).astype(np.int64))
    ref = jax.jit(lambda p, x: moe_sorted(p, x, k, implementation="xla")[0])(params, x[rows])
    fields = harness.check(jnp.asarray(out)[rows], ref, tol, tol)
    return fields | {"check_rows": len(rows), "check_ref": "xla layer on sampled tokens"}


def _checked_gmm(fn, xs, w, gs) -> dict:
    return gmm_check(fn(xs, w), xs, w, gs)


def _checked_layer(fn, params, x, k) -> dict:
    return layer_check(fn(params, x), params, x, k)


def gmm_fwd_bwd(fn, dy):
    """(x, w) -> (fn(x, w), (dx, dw)) for the cotangent dy: the forward is an output."""
    return harness.fwd_bwd(fn, dy, argnums=(0, 1))


def gmm_rows(xs, gs, w, impl_names, emit, base, ragged=True):
    """Check, then time, the A x D x 2F grouped matmul per implementation and the dense
    matmul of the same shape."""
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
    results = {}
    for name, fn in fns.items():
        fwd = jax.jit(fn)
        for mode, f, mult in (("fwd", fwd, 1), ("fwd_bwd", gmm_fwd_bwd(fn, dy), 3)):
            if name == "dense":
                checked = harness.no_check("baseline: every row times expert 0's weights")
            elif mode == "fwd":
                checked = guarded(_checked_gmm, fwd, xs, w, gs)
            else:
                checked = harness.no_check("gradients: tests/test_grouped_matmul.py")
            ms, timing, err = safe_time(f, xs, w)
            tf = None if ms is None else mult * flops / (ms * 1e-3) / 1e12
            results[(name, mode)] = tf
            emit({**base, "what": "gmm", "impl": name, "mode": mode, "shape_MKN": [a, d, n],
                  "ms": ms, **timing, "tflops": tf, "error": err, **checked,
                  "loss": "vjp_returning_output" if mode == "fwd_bwd" else None})  # fmt: skip
    return results


def _gmm_impl(x, w, *, gs, impl):
    return grouped_matmul(x, w, gs, implementation=impl)


def layer_rows(params, x, k, impls, emit, base, ragged=True, dense=True):
    """Check, then time, the whole MoE layer (ours per implementation, and on ragged_dot) and
    a dense FFN over the same rows. Returns ({(name, mode): TFLOP/s}, {impl: fwd output})."""
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
    out, outputs = {}, {}
    for name, (fn, p, inp) in variants.items():
        fwd = jax.jit(fn)
        bwd = jax.jit(jax.grad(lambda p, i, fn=fn: jnp.sum(fn(p, i).astype(jnp.float32) ** 2),
                               argnums=(0, 1)))  # fmt: skip
        for mode, g, mult in (("fwd", fwd, 1), ("fwd_bwd", bwd, 3)):
            if name == "dense_ffn":
                checked = harness.no_check("baseline: every row through expert 0")
            elif mode == "fwd":
                try:
                    y = outputs[name] = fwd(p, inp)
                    checked = guarded(layer_check, y, p, inp, k)
                except Exception as err:  # noqa: BLE001 - safe_time records the failure
                    checked = {"check_ok": False, "check_error": str(err)[:200]}
            else:
                checked = harness.no_check("gradients: tests/test_moe_padded.py")
            ms, timing, err = safe_time(g, p, inp)
            tf = None if ms is None else mult * flops / (ms * 1e-3) / 1e12
            out[(name, mode)] = tf
            row = {**base, "what": "layer", "impl": name, "mode": mode, "tokens": m,
                   "routed_rows": a, "ms": ms, **timing, "tflops": tf, "error": err,
                   **checked}  # fmt: skip
            emit(row)
            if ms is not None and name in impls:
                profile_row(emit, row, g, p, inp)
    outputs.pop("ragged_dot", None)
    return out, outputs


def routing_rows(m, d, f, e, k, dtype, impls, emit, base, routings) -> None:
    """Each implementation's layer forward at the same shape with tokens routed exactly
    uniformly and skewed: checked against the XLA layer on sampled tokens, then timed."""
    flops = 6.0 * m * k * d * f
    for routing in routings:
        params, x = make_problem(m, d, f, e, k, dtype, routing=routing)
        _, gs = sorted_rows(params, x, k)
        gs = np.asarray(gs)
        group = {"routing": routing, "group_sizes_min_max": [int(gs.min()), int(gs.max())],
                 "largest_over_mean": float(gs.max() / gs.mean())}  # fmt: skip
        for impl in impls:
            fwd = jax.jit(functools.partial(_layer, k=k, impl=impl))
            checked = guarded(_checked_layer, fwd, params, x, k)
            ms, timing, err = safe_time(fwd, params, x)
            emit({**base, **group, "what": "layer_routing", "impl": impl, "mode": "fwd",
                  "tokens": m, "ms": ms, **timing, "error": err, **checked,
                  "tflops": None if ms is None else flops / (ms * 1e-3) / 1e12})  # fmt: skip


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
        checked = safe_check(fwd, (qp, x), ref)
        ms, timing, err = safe_time(fwd, qp, x)
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
            if mode == "fwd":  # capacity rows drop tokens: their mismatch is expected
                checked = safe_check(g, (p, x3), ref)
            else:
                checked = harness.no_check("gradients: tests/test_moe_parallel.py")
            ms, timing, err = safe_time(g, p, x3)
            per_gpu = None if ms is None else mult * flops / 2 / (ms * 1e-3) / 1e12
            one = single_tflops.get(mode)
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
                   "note": "route + sort + 2 all-to-alls + combine, FFN skipped",
                   **harness.no_check("a partial computation (FFN skipped)")}  # fmt: skip
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
        checked = guarded(_checked_gmm, fn, xs, w, gs)
        ms, timing, err = safe_time(fn, xs, w)
        emit({**base, "what": "gmm_sweep", "blocks": dataclasses.asdict(blocks), "ms": ms,
              **timing, "error": err, **checked})  # fmt: skip
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
    ap.add_argument(
        "--routings",
        default="uniform,skewed",
        help="also each implementation's layer forward with tokens routed this way "
        "(uniform, skewed; comma-separated; '' for none), checked then timed",
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
            "routing", "largest_over_mean", "max_rel_err", "check_ok", "error")  # fmt: skip

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
        routings = [r for r in args.routings.split(",") if r]
        if routings and not args.ep_only:
            routing_rows(m, d, f, e, k, dtype, names or [impl], emit, base, routings)
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
