"""Benchmark: GPU lightning attention (pallas_kernels.lightning.gpu) vs XLA vs FLA, one process.

Run on a GPU (FLA installed from the `fla-core` wheel, see experiments/RESULTS.md; without it
pass --no-fla; or `python experiments/run.py lightning`)::

    PYTHONUNBUFFERED=1 python3 experiments/bench_lightning.py --out results.jsonl
    python3 experiments/bench_lightning.py --small --no-fla     # CPU smoke run (interpret mode)

Times, at bf16 and MiniMax slopes (scale 1): forward and forward+backward at B2 N16 H128
T in {8K, 32K} and B1 N64 H128 T in {32K, 128K} for this repo's GPU kernel, the XLA blockwise
implementation (`pallas_kernels.lightning.xla`) and FLA's `chunk_simple_gla`; and one decode step
at B in {1, 64, 256}, N64 H128 (fp32 state) against FLA's `fused_recurrent_simple_gla`.

Both sides are timed the same way (`experiments.harness`): the profiler's device time of each
call (JAX: `jax.profiler`; FLA: `torch.profiler`), the L2 flushed before every call, median of
>= 10 calls after warm-up, on the same inputs (FLA gets our q, k, v converted exactly). The
decode comparison is one call on each side; the in-jit loop of 32 steps is an extra row (its
state stays in L2 between steps at small B: `timing` says so) and is not compared with FLA.

Checks, before the timing, at every benchmarked shape: the XLA implementation's output (the
forward, and the forward with the gradients of a random cotangent) is the reference, computed
untimed even where XLA is not timed (T > 32K); every kernel configuration and FLA are checked
against it (`max_abs_err`, `max_rel_err`, `check_ok`; bf16 tier: within 2e-2 forward, 5e-2 with
gradients, of each tensor's max |ref| plus as much relative); decode steps (one call and the
loop) against the XLA step. The states-pass-only rows of --sweep are a partial computation and
say so (`check_skipped`).
GB/s = the minimum bytes (q, k, v read, o written; + do read and dq, dk, dv written for the
backward; the state read and written for decode) over the time; `frac_of_copy_bw` divides that
by the device-to-device copy rate measured first in the same process (`roofline`).
`--sweep` also times several kernel configurations per shape (rows with impl "gpu[...]").
`--packed DOC_LEN` times only packed rows (segment ids, documents of ~DOC_LEN tokens): the kernel
with and without the ids and XLA with them (rows "gpu_packed", "gpu", "xla_packed", "summary").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import harness, roofline  # noqa: E402
from minimax_jax.model.slopes import lightning_slopes  # noqa: E402
from pallas_kernels.lightning import gpu as lgpu  # noqa: E402
from pallas_kernels.lightning.xla import lightning_attention_xla as xla_impl  # noqa: E402

FWD_SHAPES = [(2, 8192, 16, 128), (2, 32768, 16, 128), (1, 32768, 64, 128), (1, 131072, 64, 128)]
DECODE_BATCHES = [1, 64, 256]
SMALL_SHAPES = [(1, 128, 2, 32)]  # --small: CPU, kernels in interpret mode
SMALL_DECODE = (2, 4, 32, 4)  # (B, N, H, steps)
XLA_TIMED_MAX_T = 32768  # above this the XLA path is the (untimed) reference only

SWEEP_FWD = [
    {"segments": 4},
    {"segments": 8},
    {"segments": 16},
    {"states_block": 128, "states_block_v": 64, "states_warps": 4},
    {"states_block": 256, "states_block_v": 64, "states_warps": 4},
    {"states_block": 128, "states_block_v": 128, "states_warps": 8},
]
SWEEP_BWD = [
    {"states_block": 128, "states_block_v": 64, "states_warps": 4},
]
INTERPRET = False  # --small on CPU: the Pallas kernels run in the interpreter


def minimax_slopes(n: int, layer: int = 3, layers: int = 80) -> np.ndarray:
    """MiniMax's slopes (the released checkpoints' "remote" formula) of one lightning layer."""
    return lightning_slopes(n, layer, layers, "remote")


def time_ms(fn, *args, iters: int = harness.DEFAULT_REPS) -> harness.Timing:
    """Device time per call (`harness.time_device`: profiler on a GPU, L2 flushed)."""
    return harness.time_device(fn, *args, reps=iters)


def check(out, ref, tol: float = 2e-2) -> dict:
    """An output against the XLA implementation's (bf16 tier: each element within tol of its
    tensor's max |ref| plus tol relative)."""
    if ref is None:
        return harness.no_check("the XLA reference did not run at this shape")
    return harness.check(out, ref, atol=tol, rtol=tol, scaled=True)


def gpu_impl(cfg: dict | None, bcfg: dict | None = None):
    cfg = dict(cfg or {})
    block = cfg.pop("block", None)
    bcfg = dict(bcfg) if bcfg is not None else None
    if bcfg is not None:
        bblock = bcfg.pop("block", None)
        if bblock is not None and bblock != block:
            raise ValueError("forward and backward block must match")

    def f(q, k, v, slopes, **kw):
        return lgpu.lightning_attention_gpu(
            q, k, v, slopes, block_size=block, config=cfg or None, bwd_config=bcfg,
            interpret=INTERPRET, **kw
        )  # fmt: skip

    return f


def make_fwd(impl, slopes):
    return jax.jit(lambda q, k, v: impl(q, k, v, slopes)[0])


def make_fwd_bwd(impl, slopes, do):
    """(q, k, v) -> (o, (dq, dk, dv)) for the cotangent do: the forward is an output."""
    return harness.fwd_bwd(lambda q, k, v: impl(q, k, v, slopes)[0], do, argnums=(0, 1, 2))


def copy_bandwidth() -> float:
    """GB/s of the best device-to-device copy (read + write), measured in this process."""
    return roofline.copy_bandwidth()["copy_GBps"]


def to_torch(x):
    """A JAX array as a CUDA torch tensor of the same values (bf16 goes through fp32 exactly)."""
    import torch

    dtype = torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32
    return torch.from_numpy(np.asarray(x, np.float32)).to("cuda", dtype)


def to_np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def fla_rows(emit, shape, qkv, do, slopes_np, refs, floors, skip_bwd) -> dict:
    """FLA's chunk_simple_gla on our inputs: checked against the XLA reference, then timed."""
    import torch
    from fla.ops.simple_gla import chunk_simple_gla

    g = -torch.tensor(slopes_np, device="cuda", dtype=torch.float32)
    tq, tk, tv = (to_torch(x).requires_grad_() for x in qkv)
    tdo = to_torch(do)

    def fwd(_=None):
        return chunk_simple_gla(tq, tk, tv, g_gamma=g, scale=1.0)[0]

    def fwd_bwd(_=None):
        fwd().backward(tdo)

    def no_grads():
        for x in (tq, tk, tv):
            x.grad = None

    got = {}
    passes = [("fwd", fwd, 2e-2)] + ([] if skip_bwd else [("fwd_bwd", fwd_bwd, 5e-2)])
    for name, fn, tol in passes:
        no_grads()
        if name == "fwd":
            with torch.no_grad():
                checked = check(to_np(fwd()), refs.get("fwd"), tol)
        else:
            o = fwd()
            o.backward(tdo)
            out = (to_np(o), tuple(to_np(x.grad) for x in (tq, tk, tv)))
            checked = check(out, refs.get("fwd_bwd"), tol)
        t = harness.time_torch(fn, setup=no_grads)
        got[name] = t.median * 1e3
        emit({**shape, "impl": "fla.chunk_simple_gla", "pass": name, **t.row_ms(),
              "GBps_floor": floors[name] / got[name] / 1e6, **checked})  # fmt: skip
    return got


def reference(fn_maker, q, k, v):
    """The XLA output at this shape (untimed), or None if it cannot run here."""
    try:
        return jax.block_until_ready(fn_maker()(q, k, v))
    except Exception as e:  # noqa: BLE001 - the rows say the reference did not run
        print(f"# xla reference failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None


def bench_pass(emit, shape, pname, impls, qkv, slopes, do, ref, fla, floor, bw) -> None:
    """One pass (fwd or fwd_bwd) of every implementation at one shape: check, then time."""
    tol = 2e-2 if pname == "fwd" else 5e-2
    for name, impl in impls.items():
        if name == "xla" and shape["T"] > XLA_TIMED_MAX_T:
            continue  # the XLA path at 128K only costs time: it ran once as the reference
        try:
            fn = make_fwd(impl, slopes) if pname == "fwd" else make_fwd_bwd(impl, slopes, do)
            checked = harness.no_check("the reference") if name == "xla" else check(
                fn(*qkv), ref, tol)  # fmt: skip
            t_ = time_ms(fn, *qkv)
        except Exception as e:  # noqa: BLE001 - record failing configs and go on
            print(f"# {name} {pname} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        ms = t_.median * 1e3
        emit({**shape, "impl": name, "pass": pname, **t_.row_ms(), **checked,
              "GBps_floor": floor / ms / 1e6, "frac_of_copy_bw": floor / ms / 1e6 / bw,
              "fla_ms": fla.get(pname),
              "speedup_vs_fla": fla[pname] / ms if fla.get(pname) else None})  # fmt: skip


def states_rows(emit, shape, qkv, slopes, fla) -> None:
    """--sweep: the states-only pass alone (where the forward's time goes)."""
    b, t, n, h = shape["B"], shape["T"], shape["N"], shape["H"]
    seg = 8
    if (t // 64) % seg:
        return
    init = jnp.zeros((b, n, seg, h, h), jnp.float32)

    def states(q, k, v):
        return lgpu.scan_kernel_call(q, k, v, slopes, init, block=64, block_v=64, segments=seg,
                                     seq_len=t, reverse=False, emit_output=False,
                                     interpret=INTERPRET)  # fmt: skip

    t_ = time_ms(jax.jit(states), *qkv)
    emit({**shape, "impl": f"gpu states pass only (seg {seg})", "pass": "fwd", **t_.row_ms(),
          "fla_ms": fla.get("fwd"),
          **harness.no_check("a partial computation (segment states only)")})  # fmt: skip


def bench_shape(emit, b, t, n, h, args, override, bw) -> None:
    slopes_np = minimax_slopes(n)
    slopes = jnp.asarray(slopes_np)
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    qkv = tuple(jax.random.normal(ks[i], (b, t, n, h), jnp.float32).astype(jnp.bfloat16) * 0.3
                for i in range(3))  # fmt: skip
    do = jax.random.normal(ks[3], (b, t, n, h), jnp.bfloat16)
    floors = {
        "fwd": 4 * b * t * n * h * 2,
        "fwd_bwd": 11 * b * t * n * h * 2,
    }  # fwd 4 + bwd (q,k,v,do read; dq,dk,dv) 7
    shape = {"B": b, "T": t, "N": n, "H": h}
    refs = {"fwd": reference(lambda: make_fwd(xla_impl, slopes), *qkv)}
    if not args.skip_bwd:
        refs["fwd_bwd"] = reference(lambda: make_fwd_bwd(xla_impl, slopes, do), *qkv)
    fla = {} if args.no_fla else fla_rows(emit, shape, qkv, do, slopes_np, refs, floors,
                                          args.skip_bwd)  # fmt: skip
    base_cfg = override.get(f"{b}x{t}x{n}", override.get("default"))
    impls = {"xla": xla_impl, "gpu": gpu_impl(base_cfg, base_cfg)}
    if args.sweep:
        for c in SWEEP_FWD:
            impls["gpu" + json.dumps(c, separators=(",", ":"))] = gpu_impl(c)
    bench_pass(emit, shape, "fwd", impls, qkv, slopes, do, refs["fwd"], fla, floors["fwd"], bw)
    if args.sweep:
        states_rows(emit, shape, qkv, slopes, fla)
    if not args.skip_bwd:
        bimpls = {"xla": xla_impl, "gpu": impls["gpu"]}
        if args.sweep:
            for c in SWEEP_BWD:
                bimpls["gpu_bwd" + json.dumps(c, separators=(",", ":"))] = gpu_impl(c, c)
        bench_pass(emit, shape, "fwd_bwd", bimpls, qkv, slopes, do, refs["fwd_bwd"], fla,
                   floors["fwd_bwd"], bw)  # fmt: skip


def fla_decode_row(emit, shape, qkv, state, slopes_np, ref, state_bytes) -> float | None:
    """FLA's fused_recurrent_simple_gla, one step on our inputs: checked against the XLA step
    (output and new state), then timed per call."""
    import torch
    from fla.ops.simple_gla import fused_recurrent_simple_gla

    g = -torch.tensor(slopes_np, device="cuda", dtype=torch.float32)
    tq, tk, tv = (to_torch(x)[:, None] for x in qkv)  # [B,1,N,H]
    ts = to_torch(state)

    def step(_=None):
        return fused_recurrent_simple_gla(tq, tk, tv, g_gamma=g, scale=1.0, initial_state=ts,
                                          output_final_state=True)  # fmt: skip

    o, s = step()
    checked = check((to_np(o)[:, 0], to_np(s)), ref)
    t = harness.time_torch(step)
    ms = t.median * 1e3
    emit({**shape, "impl": "fla.fused_recurrent_simple_gla", **t.row_ms(), **checked,
          "GBps_floor": state_bytes / ms / 1e6, "timing": "one call"})  # fmt: skip
    return ms


def bench_decode(emit, b, n, h, steps, args, bw) -> None:
    """One decode step at batch b: the XLA step (the reference), the GPU kernel (and --decode-sweep
    tilings) as one jitted call each, beside FLA's one call; then the same steps in a jitted
    loop of `steps` (per step; the state stays in L2 between steps at small B)."""
    slopes_np = minimax_slopes(n)
    slopes = jnp.asarray(slopes_np)
    ks = jax.random.split(jax.random.PRNGKey(b), 4)
    qkv = tuple(jax.random.normal(ks[i], (b, n, h), jnp.bfloat16) * 0.3 for i in range(3))
    state = jax.random.normal(ks[3], (b, n, h, h), jnp.float32) * 0.1
    state_bytes = 2 * b * n * h * h * 4 + 4 * b * n * h * 2
    shape = {"B": b, "T": 1, "N": n, "H": h, "pass": "decode"}

    def xla_step(q, k, v, s):
        s = jnp.exp(-slopes)[None, :, None, None] * s + (
            k.astype(jnp.float32)[..., :, None] * v.astype(jnp.float32)[..., None, :]
        )
        return jnp.einsum("bnd,bnde->bne", q.astype(jnp.float32), s).astype(q.dtype), s

    def gpu_step(q, k, v, s, **kw):
        return lgpu.lightning_decode_gpu(q, k, v, slopes, s, interpret=INTERPRET, **kw)

    def loop_of(stepf):
        def loop(q, k, v, s):
            o0 = jnp.zeros(q.shape, q.dtype)
            return jax.lax.fori_loop(0, steps, lambda i, c: stepf(q, k, v, c[1]), (o0, s))

        return jax.jit(loop)

    steps_by_name = {"xla": xla_step, "gpu": gpu_step}  # XLA first: the reference
    if args.decode_sweep:
        for bv in (32, 64, 128):
            for nw in (2, 4, 8):
                steps_by_name[f"gpu[block_v={bv},num_warps={nw}]"] = functools.partial(
                    gpu_step, block_v=bv, num_warps=nw)  # fmt: skip
    ref_one = jax.block_until_ready(jax.jit(xla_step)(*qkv, state))
    ref_loop = jax.block_until_ready(loop_of(xla_step)(*qkv, state))
    fla_ms = None if args.no_fla else fla_decode_row(emit, shape, qkv, state, slopes_np,
                                                     ref_one, state_bytes)  # fmt: skip
    for name, stepf in steps_by_name.items():
        one, loop = jax.jit(stepf), loop_of(stepf)  # the outer jit does not donate the state
        ref_ok = name == "xla"
        checked = harness.no_check("the reference") if ref_ok else check(one(*qkv, state), ref_one)
        t_ = time_ms(one, *qkv, state)
        ms = t_.median * 1e3
        emit({**shape, "impl": name, **t_.row_ms(), **checked, "timing": "one call",
              "GBps_floor": state_bytes / ms / 1e6, "frac_of_copy_bw": state_bytes / ms / 1e6 / bw,
              "fla_ms": fla_ms, "speedup_vs_fla": fla_ms / ms if fla_ms else None})  # fmt: skip
        checked = harness.no_check("the reference") if ref_ok else check(loop(*qkv, state),
                                                                         ref_loop)  # fmt: skip
        t_ = time_ms(loop, *qkv, state)
        row = t_.row_ms("loop_ms")
        ms = row["loop_ms"] / steps
        emit({**shape, "impl": f"{name} (in-jit loop)", "ms": ms, **row, **checked,
              "GBps_floor": state_bytes / ms / 1e6,
              "timing": f"per step of an in-jit loop of {steps} steps; the state may stay in L2 "
              "between steps, so it is not compared with FLA's one call"})  # fmt: skip


def packed_segment_ids(b: int, t: int, doc_len: int, seed: int = 0) -> np.ndarray:
    """[B, T] int32 ids of documents with lengths uniform in [doc_len / 2, 3 doc_len / 2]."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        lens = rng.integers(doc_len // 2, 3 * doc_len // 2 + 1, size=t // max(doc_len // 2, 1) + 1)
        rows.append(np.repeat(np.arange(1, len(lens) + 1), lens)[:t])
    return np.stack(rows).astype(np.int32)


def bench_packed(shapes, doc_len: int, emit, skip_bwd: bool) -> None:
    """Packed rows (segment ids): the GPU kernel with them, without them (same tokens) and the
    XLA implementation with them (what "auto" runs for packed rows), forward and fwd+bwd; the
    kernel's rows are checked against XLA with the same ids (without ids: XLA without ids)."""
    key = jax.random.PRNGKey(1)
    for b, t, n, h in shapes:
        slopes = jnp.asarray(minimax_slopes(n))
        ks = jax.random.split(key, 4)
        qkv = tuple((jax.random.normal(ks[i], (b, t, n, h), jnp.float32) * 0.3).astype(
            jnp.bfloat16) for i in range(3))  # fmt: skip
        do = jax.random.normal(ks[3], (b, t, n, h), jnp.bfloat16)
        seg = jnp.asarray(packed_segment_ids(b, t, doc_len))
        gpu = gpu_impl(None)
        impls = {  # name: (implementation, its reference)
            "xla_packed": (functools.partial(xla_impl, segment_ids=seg), None),
            "gpu": (gpu, xla_impl),
            "gpu_packed": (
                functools.partial(gpu, segment_ids=seg),
                functools.partial(xla_impl, segment_ids=seg),
            ),
        }
        shape = {"B": b, "T": t, "N": n, "H": h, "doc_len": doc_len}
        for pname in ["fwd"] + ([] if skip_bwd else ["fwd_bwd"]):
            make = make_fwd if pname == "fwd" else functools.partial(make_fwd_bwd, do=do)
            got = {}
            for name, (impl, ref_impl) in impls.items():
                try:
                    fn = make(impl, slopes)
                    if ref_impl is None:
                        checked = harness.no_check("the reference")
                    else:
                        ref = reference(functools.partial(make, ref_impl, slopes), *qkv)
                        checked = check(fn(*qkv), ref, 2e-2 if pname == "fwd" else 5e-2)
                    t_ = time_ms(fn, *qkv)
                except Exception as e:  # noqa: BLE001 - record the failure and go on
                    print(f"# {name} {pname} failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                got[name] = t_.median * 1e3
                emit({**shape, "impl": name, "pass": pname, **t_.row_ms(), **checked})
            if {"gpu", "gpu_packed", "xla_packed"} <= set(got):
                emit({**shape, "impl": "summary", "pass": pname,
                      "gpu_packed_over_unpacked": got["gpu_packed"] / got["gpu"],
                      "speedup_vs_xla_packed": got["xla_packed"] / got["gpu_packed"]})  # fmt: skip


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--sweep", action="store_true", help="also kernel configurations per shape")
    ap.add_argument("--no-fla", action="store_true", help="no FLA rows (FLA not installed)")
    ap.add_argument("--shapes", default="all", help="'all', 'none' or indices into FWD_SHAPES")
    ap.add_argument("--skip-decode", action="store_true", help="no decode rows")
    ap.add_argument("--skip-bwd", action="store_true", help="no forward+backward rows")
    ap.add_argument("--decode-sweep", action="store_true", help="decode kernel tilings too")
    ap.add_argument("--gpu-config", default=None, help="JSON dict, e.g. per-shape override list")
    ap.add_argument(
        "--small",
        action="store_true",
        help="tiny shapes, kernels in interpret mode off a GPU (CPU smoke run)",
    )
    ap.add_argument(
        "--packed",
        type=int,
        default=0,
        help="DOC_LEN: only the packed-rows comparison (segment ids, documents of ~DOC_LEN tokens)",
    )
    return ap.parse_args()


def main() -> None:
    global INTERPRET
    args = parse_args()
    INTERPRET = jax.default_backend() != "gpu"
    bw = copy_bandwidth()
    print(f"# copy bandwidth {bw:.0f} GB/s", flush=True)
    results = harness.Rows(args.out, bench="lightning", dtype="bfloat16", copy_GBps=round(bw, 1),
                           interpret=INTERPRET)  # fmt: skip
    emit = results.emit
    all_shapes = SMALL_SHAPES if args.small else FWD_SHAPES
    if args.shapes == "all":
        shapes = all_shapes
    elif args.shapes == "none":
        shapes = []
    else:
        shapes = [all_shapes[int(i)] for i in args.shapes.split(",")]
    if args.packed:
        bench_packed(shapes, args.packed, emit, args.skip_bwd)
        return
    override = json.loads(args.gpu_config) if args.gpu_config else {}
    for b, t, n, h in shapes:
        bench_shape(emit, b, t, n, h, args, override, bw)
    if not args.skip_decode:
        if args.small:
            b, n, h, steps = SMALL_DECODE
            bench_decode(emit, b, n, h, steps, args, bw)
        else:
            for b in DECODE_BATCHES:
                bench_decode(emit, b, 64, 128, 32, args, bw)
    print("\n# summary: impl | pass | B T N | ms | GB/s floor | speedup vs FLA")
    for r in results.rows:
        print(f"{r['impl'][:60]:60s} {r['pass']:8s} {r['B']:>3} {r['T']:>6} {r['N']:>2} "
              f"{r.get('ms', 0) or 0:8.3f} {r.get('GBps_floor', 0) or 0:7.0f} "
              f"{r.get('speedup_vs_fla', 0) or 0:5.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
