"""Benchmark: GPU lightning attention (pallas_kernels.lightning.gpu) vs XLA vs FLA, one process.

Run on a GPU (FLA installed from the `fla-core` wheel, see experiments/RESULTS.md; without it
pass --no-fla; or `python experiments/run.py lightning`)::

    PYTHONUNBUFFERED=1 python3 experiments/bench_lightning.py --out results.jsonl

Times, at bf16 and MiniMax slopes (scale 1): forward and forward+backward at B2 N16 H128
T in {8K, 32K} and B1 N64 H128 T in {32K, 128K} for this repo's GPU kernel, the XLA blockwise
implementation (`pallas_kernels.lightning.xla`) and FLA's `chunk_simple_gla`; and one decode step
at B in {1, 64, 256}, N64 H128 (fp32 state) against FLA's `fused_recurrent_simple_gla`. Every row
is one JSON line (`experiments.harness`: device, versions, commit, command line) with the shape,
impl, median ms and its spread, GB/s against the min-bytes floor and the FLA number from the same
run. Where the XLA implementation ran, the kernel's output (forward, gradients, decode loop) is
checked against it (`max_abs_err`, `max_rel_err`, `check_ok`).
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

from experiments import harness  # noqa: E402
from minimax_jax.model.slopes import lightning_slopes  # noqa: E402
from pallas_kernels.lightning import gpu as lgpu  # noqa: E402
from pallas_kernels.lightning.xla import lightning_attention_xla as xla_impl  # noqa: E402

FWD_SHAPES = [(2, 8192, 16, 128), (2, 32768, 16, 128), (1, 32768, 64, 128), (1, 131072, 64, 128)]
DECODE_BATCHES = [1, 64, 256]

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


def minimax_slopes(n: int, layer: int = 3, layers: int = 80) -> np.ndarray:
    """MiniMax's slopes (the released checkpoints' "remote" formula) of one lightning layer."""
    return lightning_slopes(n, layer, layers, "remote")


def time_ms(fn, *args, iters: int = 15, inner: int = 5) -> harness.Timing:
    """Per call: `inner` back-to-back async calls per sample, `iters` samples after warm-up."""
    return harness.time_device(fn, *args, reps=iters, inner=inner)


def check(out, ref, tol: float = 2e-2) -> dict:
    """The kernel's output against the XLA implementation's (bf16 tier), if that ran."""
    return {} if ref is None else harness.check(out, ref, atol=tol, rtol=tol)


def gpu_impl(cfg: dict | None, bcfg: dict | None = None):
    cfg = dict(cfg or {})
    block = cfg.pop("block", None)
    bcfg = dict(bcfg) if bcfg is not None else None
    if bcfg is not None:
        bblock = bcfg.pop("block", None)
        if bblock is not None and bblock != block:
            raise ValueError("forward and backward block must match")

    def f(q, k, v, slopes):
        return lgpu.lightning_attention_gpu(
            q, k, v, slopes, block_size=block, config=cfg or None, bwd_config=bcfg
        )

    return f


def make_fwd(impl, slopes):
    return jax.jit(lambda q, k, v: impl(q, k, v, slopes)[0])


def make_fwd_bwd(impl, slopes, do):
    def f(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: impl(q, k, v, slopes)[0], q, k, v)
        return o, vjp(do)

    return jax.jit(f)


def copy_bandwidth() -> float:
    x = jnp.ones((1 << 30,), jnp.bfloat16)  # 2 GiB
    f = jax.jit(lambda x: x + 1)
    ms = time_ms(f, x, iters=10, inner=3).median * 1e3
    del x
    return 2 * 2 * (1 << 30) / (ms * 1e-3) / 1e9


def fla_times(b, t, n, h, slopes_np, do_bwd: bool = True):
    import torch
    import triton
    from fla.ops.simple_gla import chunk_simple_gla

    g = -torch.tensor(slopes_np, device="cuda")
    qkv = [
        (torch.randn(b, t, n, h, device="cuda", dtype=torch.bfloat16) * 0.3).requires_grad_()
        for _ in range(3)
    ]
    q, k, v = qkv
    do = torch.randn_like(q)

    def fwd():
        return chunk_simple_gla(q, k, v, g_gamma=g, scale=1.0)[0]

    def fwd_bwd():
        fwd().backward(do)

    res = {"fwd": triton.testing.do_bench(fwd, warmup=25, rep=200, return_mode="median")}
    if do_bwd:
        res["fwd_bwd"] = triton.testing.do_bench(fwd_bwd, warmup=25, rep=200, return_mode="median")
    return res


def fla_decode(b, n, h, slopes_np):
    import torch
    import triton
    from fla.ops.simple_gla import fused_recurrent_simple_gla

    g = -torch.tensor(slopes_np, device="cuda")
    q, k, v = [torch.randn(b, 1, n, h, device="cuda", dtype=torch.bfloat16) * 0.3 for _ in range(3)]
    s = torch.randn(b, n, h, h, device="cuda", dtype=torch.float32) * 0.1

    def step():
        return fused_recurrent_simple_gla(
            q, k, v, g_gamma=g, scale=1.0, initial_state=s, output_final_state=True
        )

    return triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")


def decode_with(q, k, v, state, *, slopes, block_v, num_warps):
    return lgpu.lightning_decode_gpu(q, k, v, slopes, state, block_v=block_v, num_warps=num_warps)


def torch_free() -> None:
    import torch

    torch.cuda.empty_cache()


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
    XLA implementation with them (what "auto" runs for packed rows), forward and fwd+bwd."""
    key = jax.random.PRNGKey(1)
    for b, t, n, h in shapes:
        slopes = jnp.asarray(minimax_slopes(n))
        ks = jax.random.split(key, 4)
        q, k, v = (
            (jax.random.normal(ks[i], (b, t, n, h), jnp.float32) * 0.3).astype(jnp.bfloat16)
            for i in range(3)
        )
        do = jax.random.normal(ks[3], (b, t, n, h), jnp.bfloat16)
        seg = jnp.asarray(packed_segment_ids(b, t, doc_len))
        impls = {  # the XLA path first: the kernel's packed output is checked against it
            "xla_packed": functools.partial(xla_impl, segment_ids=seg),
            "gpu": lgpu.lightning_attention_gpu,
            "gpu_packed": functools.partial(lgpu.lightning_attention_gpu, segment_ids=seg),
        }
        shape = {"B": b, "T": t, "N": n, "H": h, "doc_len": doc_len}
        for pname in ["fwd"] + ([] if skip_bwd else ["fwd_bwd"]):
            got, ref = {}, None
            for name, impl in impls.items():
                fn = make_fwd(impl, slopes) if pname == "fwd" else make_fwd_bwd(impl, slopes, do)
                try:
                    t_ = time_ms(fn, q, k, v)
                    out = fn(q, k, v)
                except Exception as e:  # noqa: BLE001 - record the failure and go on
                    print(f"# {name} {pname} failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                got[name] = t_.median * 1e3
                if name == "xla_packed":
                    ref = out
                tol = 2e-2 if pname == "fwd" else 5e-2
                emit({**shape, "impl": name, "pass": pname, **t_.row_ms(),
                      **(check(out, ref, tol) if name == "gpu_packed" else {})})  # fmt: skip
            if {"gpu", "gpu_packed", "xla_packed"} <= set(got):
                emit({**shape, "impl": "summary", "pass": pname,
                      "gpu_packed_over_unpacked": got["gpu_packed"] / got["gpu"],
                      "speedup_vs_xla_packed": got["xla_packed"] / got["gpu_packed"]})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--shapes", default="all", help="'all' or indices into FWD_SHAPES, e.g. 0,2")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-bwd", action="store_true")
    ap.add_argument("--decode-sweep", action="store_true")
    ap.add_argument("--gpu-config", default=None, help="JSON dict, e.g. per-shape override list")
    ap.add_argument(
        "--packed",
        type=int,
        default=0,
        help="DOC_LEN: only the packed-rows comparison (segment ids, documents of ~DOC_LEN tokens)",
    )
    args = ap.parse_args()

    bw = copy_bandwidth()
    print(f"# copy bandwidth {bw:.0f} GB/s", flush=True)
    results = harness.Rows(args.out, bench="lightning", dtype="bfloat16", copy_GBps=round(bw, 1))
    rows = results.rows
    emit = results.emit

    if args.shapes == "all":
        shapes = FWD_SHAPES
    elif args.shapes == "none":
        shapes = []
    else:
        shapes = [FWD_SHAPES[int(i)] for i in args.shapes.split(",")]
    if args.packed:
        bench_packed(shapes, args.packed, emit, args.skip_bwd)
        return
    override = json.loads(args.gpu_config) if args.gpu_config else {}
    key = jax.random.PRNGKey(0)
    for b, t, n, h in shapes:
        slopes_np = minimax_slopes(n)
        slopes = jnp.asarray(slopes_np)
        ks = jax.random.split(key, 4)
        q, k, v = (
            jax.random.normal(ks[i], (b, t, n, h), jnp.float32).astype(jnp.bfloat16) * 0.3
            for i in range(3)
        )
        do = jax.random.normal(ks[3], (b, t, n, h), jnp.bfloat16)
        fwd_floor = 4 * b * t * n * h * 2
        bwd_floor = 11 * b * t * n * h * 2  # fwd 4 + bwd (q,k,v,do read; dq,dk,dv written) 7
        fla = {} if args.no_fla else fla_times(b, t, n, h, slopes_np, not args.skip_bwd)
        if not args.no_fla:
            torch_free()
        shape = {"B": b, "T": t, "N": n, "H": h}
        base_cfg = override.get(f"{b}x{t}x{n}", override.get("default"))
        # the XLA implementation first: the kernel's output is checked against it
        impls = {"xla": xla_impl, "gpu": gpu_impl(base_cfg, base_cfg)}
        if args.sweep:
            for c in SWEEP_FWD:
                impls["gpu" + json.dumps(c, separators=(",", ":"))] = gpu_impl(c)
        if not args.no_fla:
            emit(
                {
                    **shape,
                    "impl": "fla.chunk_simple_gla",
                    "pass": "fwd",
                    "ms": fla["fwd"],
                    "GBps_floor": fwd_floor / fla["fwd"] / 1e6,
                    "fla_ms": fla["fwd"],
                }
            )
        ref = None
        for name, impl in impls.items():
            if name == "xla" and t > 32768:
                continue  # the XLA scan at 128K only costs time; the FLA anchor is what counts
            try:
                fn = make_fwd(impl, slopes)
                t_ = time_ms(fn, q, k, v)
                out = fn(q, k, v)
            except Exception as e:  # noqa: BLE001 - record failing configs and go on
                print(f"# {name} fwd failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            ms = t_.median * 1e3
            if name == "xla":
                ref = out
            emit(
                {
                    **shape,
                    "impl": name,
                    "pass": "fwd",
                    **t_.row_ms(),
                    **(check(out, ref) if name != "xla" else {}),
                    "GBps_floor": fwd_floor / ms / 1e6,
                    "frac_of_copy_bw": fwd_floor / ms / 1e6 / bw,
                    "fla_ms": fla.get("fwd"),
                    "speedup_vs_fla": (fla.get("fwd") or 0) / ms,
                }
            )
        if args.sweep:  # where the time goes: the states-only pass alone
            for seg in (8,):
                nbl = t // 64
                init = jnp.zeros((b, n, seg, h, h), jnp.float32)

                def states(q, k, v, init=init, seg=seg, slopes=slopes, t=t):
                    return lgpu.scan_kernel_call(
                        q,
                        k,
                        v,
                        slopes,
                        init,
                        block=64,
                        block_v=64,
                        segments=seg,
                        seq_len=t,
                        reverse=False,
                        emit_output=False,
                    )

                if nbl % seg == 0:
                    t_ = time_ms(jax.jit(states), q, k, v)
                    emit(
                        {
                            **shape,
                            "impl": f"gpu states pass only (seg {seg})",
                            "pass": "fwd",
                            **t_.row_ms(),
                            "fla_ms": fla.get("fwd"),
                        }
                    )
        if not args.skip_bwd:
            if not args.no_fla:
                emit(
                    {
                        **shape,
                        "impl": "fla.chunk_simple_gla",
                        "pass": "fwd_bwd",
                        "ms": fla["fwd_bwd"],
                        "GBps_floor": bwd_floor / fla["fwd_bwd"] / 1e6,
                        "fla_ms": fla["fwd_bwd"],
                    }
                )
            bimpls = {"xla": xla_impl, "gpu": impls["gpu"]}
            if args.sweep:
                for c in SWEEP_BWD:
                    bimpls["gpu_bwd" + json.dumps(c, separators=(",", ":"))] = gpu_impl(c, c)
            ref = None
            for name, impl in bimpls.items():
                if name == "xla" and t > 32768:
                    continue
                try:
                    fn = make_fwd_bwd(impl, slopes, do)
                    t_ = time_ms(fn, q, k, v, iters=10, inner=3)
                    out = fn(q, k, v)
                except Exception as e:  # noqa: BLE001
                    print(
                        f"# {name} fwd_bwd failed: {type(e).__name__}: {str(e)[:300]}", flush=True
                    )
                    continue
                ms = t_.median * 1e3
                if name == "xla":
                    ref = out
                emit(
                    {
                        **shape,
                        "impl": name,
                        "pass": "fwd_bwd",
                        **t_.row_ms(),
                        **(check(out, ref, 5e-2) if name != "xla" else {}),
                        "GBps_floor": bwd_floor / ms / 1e6,
                        "fla_ms": fla.get("fwd_bwd"),
                        "speedup_vs_fla": (fla.get("fwd_bwd") or 0) / ms,
                    }
                )
        del q, k, v, do

    if not args.skip_decode:
        n, h, steps = 64, 128, 32
        slopes_np = minimax_slopes(n)
        slopes = jnp.asarray(slopes_np)
        for b in DECODE_BATCHES:
            ks = jax.random.split(jax.random.PRNGKey(b), 4)
            q, k, v = (jax.random.normal(ks[i], (b, n, h), jnp.bfloat16) * 0.3 for i in range(3))
            state = jax.random.normal(ks[3], (b, n, h, h), jnp.float32) * 0.1
            state_bytes = 2 * b * n * h * h * 4 + 4 * b * n * h * 2
            shape = {"B": b, "T": 1, "N": n, "H": h, "pass": "decode"}
            fla_ms = None if args.no_fla else fla_decode(b, n, h, slopes_np)
            if not args.no_fla:
                torch_free()
            if fla_ms is not None:
                emit(
                    {
                        **shape,
                        "impl": "fla.fused_recurrent_simple_gla",
                        "ms": fla_ms,
                        "GBps_floor": state_bytes / fla_ms / 1e6,
                        "fla_ms": fla_ms,
                    }
                )

            def xla_step(q, k, v, s):
                s = jnp.exp(-slopes)[None, :, None, None] * s + (
                    k.astype(jnp.float32)[..., :, None] * v.astype(jnp.float32)[..., None, :]
                )
                return jnp.einsum("bnd,bnde->bne", q.astype(jnp.float32), s).astype(q.dtype), s

            def gpu_step(q, k, v, s):
                return lgpu.lightning_decode_gpu(q, k, v, slopes, s)

            steps_by_name = {"xla": xla_step, "gpu": gpu_step}  # XLA first: the reference
            if args.decode_sweep:
                for bv in (32, 64, 128):
                    for nw in (2, 4, 8):
                        steps_by_name[f"gpu[block_v={bv},num_warps={nw}]"] = functools.partial(
                            decode_with, slopes=slopes, block_v=bv, num_warps=nw
                        )
            ref = None
            for name, stepf in steps_by_name.items():

                def loop(q, k, v, s, stepf=stepf):
                    def body(i, c):
                        return stepf(q, k, v, c[1])

                    o0 = jnp.zeros(q.shape, q.dtype)
                    return jax.lax.fori_loop(0, steps, body, (o0, s))

                fn = jax.jit(loop)
                t_ = time_ms(fn, q, k, v, state)
                out = fn(q, k, v, state)
                if name == "xla":
                    ref = out
                ms = t_.median * 1e3 / steps
                emit(
                    {
                        **shape,
                        "impl": name,
                        "ms": ms,
                        "loop_ms_min": t_.min * 1e3,
                        "loop_ms_max": t_.max * 1e3,
                        "reps": t_.reps,
                        **(check(out, ref) if name != "xla" else {}),
                        "GBps_floor": state_bytes / ms / 1e6,
                        "fla_ms": fla_ms,
                        "speedup_vs_fla": (fla_ms or 0) / ms,
                        "timing": f"in-jit loop of {steps} steps",
                    }
                )
            # one jitted step from Python, dispatch included (what a naive decode loop pays)
            one = jax.jit(gpu_step)
            t_ = time_ms(one, q, k, v, state, iters=30, inner=1)
            emit(
                {
                    **shape,
                    "impl": "gpu(single jitted call, wall)",
                    **t_.row_ms(),
                    "fla_ms": fla_ms,
                    "timing": "wall clock per call incl. dispatch",
                }
            )
    print("\n# summary: impl | pass | B T N | ms | GB/s floor | speedup vs FLA")
    for r in rows:
        print(
            f"{r['impl'][:60]:60s} {r['pass']:8s} {r['B']:>3} {r['T']:>6} {r['N']:>2} "
            f"{r['ms']:8.3f} {r.get('GBps_floor', 0) or 0:7.0f} "
            f"{r.get('speedup_vs_fla', 0) or 0:5.2f}"
        )


if __name__ == "__main__":
    main()
