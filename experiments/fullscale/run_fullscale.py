"""The real MiniMax-Text-01 architecture (or a slice of its layers) at full width, sharded.

    # 2 GPUs (issue 9, nvidia-h200-x2): the first 20 layers, EP=2 with attention/vocab TP on the
    # same devices (rules ep_fold); experiments/fullscale/x2.sh runs this with a time budget
    python3 experiments/fullscale/run_fullscale.py --layers 20 --mesh expert=2 --out r.jsonl
    # 8 GPUs: the whole model
    python3 experiments/fullscale/run_fullscale.py --layers 80 --mesh expert=2,tensor=4
    # CPU smoke runs on simulated devices
    python3 experiments/fullscale/run_fullscale.py --tiny --cpu_devices 8 --mesh expert=2,tensor=4
    python3 experiments/fullscale/run_fullscale.py --tiny --cpu_devices 2 --mesh expert=2

Random bf16 weights are drawn directly in their shards (`common.init_random_params`: per leaf,
each device draws its own shard in pieces; no full copy anywhere). Then every program (a decode
loop per batch size, one prefill chunk function for all lengths) is compiled at once in threads
(`common.Compiler`), and the rows run. Rows (JSON lines, --out):

  init     init time, the planner's weight bytes per device vs the bytes of the shards actually
           placed on device 0 and vs bytes in use, the device-to-device copy bandwidth (GB/s,
           read + write, measured first: `roofline.copy_bandwidth`).
  compile  the programs and which compiled within the budget.
  decode   per --decode_batches size: the Engine's jitted decode loop (--new_tokens - 1 steps)
           from an empty cache of 128 slots (made untimed); step time (median of --reps
           loops after one warm-up, wall clock, with the spread), tokens/s and the bandwidth
           floor of a step (bytes one device must read / the measured copy bandwidth).
  prefill  per --prefill length (batch 1): chunked prefill into a cache of max(--prefill) slots
           (one compiled chunk function serves every length); tokens/s.

Memory per row (`common.run_row`): the planner's total (weights + cache + activations; all
printed before anything compiles) beside XLA's own total for the compiled program (`xla_bytes`, per
program) and the measured `peak_bytes_in_use` after the row. That peak is cumulative over the
process, so rows run in increasing planned memory (decode, then prefill by length);
`peak_raised` false means an earlier row or the init set it, and `planned_over_peak` is then
null (rows before that compared the plan with a peak set before the row ran). Outputs are not
checked at full width (`check_skipped`): tests/test_fullscale.py checks the same code on tiny
configs. A row is skipped (with a row saying
so) when its program had not compiled --run_reserve_s before --budget_s, or its estimated time
(the longest row so far) would pass --budget_s. --chunk 0 picks the largest prefill chunk whose
plan, activations x 1.3, fits 90% of the device's bytes_limit.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    Budget,
    Compiler,
    GiB,
    Rows,
    add_run_args,
    device_bytes,
    gib,
    init_random_params,
    lightning_impl,
    memory_stats,
    parse_mesh,
    run_row,
    setup_jax,
    text01_slice,
)

DECODE_SLOTS = 128  # cache slots of the decode rows (>= new_tokens)


def copy_gbps() -> float:
    """GB/s (read + write) of the best device-to-device copy on the first device."""
    from experiments import roofline

    return roofline.copy_bandwidth()["copy_GBps"]


def local(n: int, logical: str, mesh, rules) -> int:
    """n divided over the mesh axes the rules give a dimension of size n."""
    entry = rules.spec((logical,), mesh, (n,))[0]
    axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
    return n // math.prod(mesh.shape[a] for a in axes)


def decode_floor_bytes(cfg, params, batch: int, slots: int, mesh, rules) -> int:
    """Bytes one device must read per decode step: its expected distinct routed experts (uniform
    routing of batch*k assignments), its shards of attention weights and lm head, lightning
    states (read + write) and the K/V slots (all `slots` are read, masked)."""
    import jax

    e, k = cfg.num_experts, cfg.num_experts_per_tok
    dev = jax.devices()[0]
    experts = attn = 0
    for block in params["blocks"]:
        wi, wo = block["moe"]["wi"], block["moe"]["wo"]
        local_e = next(s.data.shape[1] for s in wi.addressable_shards if s.device == dev)
        per_expert = (device_bytes(wi, dev) + device_bytes(wo, dev)) / local_e / wi.shape[0]
        active = local_e * (1 - (1 - 1 / e) ** (batch * k))  # expected distinct, per layer
        experts += wi.shape[0] * active * per_expert
        attn += device_bytes(block["attn"], dev)
    n, kv, h = (
        local(cfg.num_heads, "heads", mesh, rules),
        local(cfg.num_kv_heads, "kv_heads", mesh, rules),
        cfg.head_dim,
    )
    states = cfg.num_lightning_layers * batch * n * h * h * 4 * 2
    kv_read = cfg.num_full_layers * 2 * batch * slots * kv * h * 2
    return int(experts + attn + device_bytes(params["lm_head"], dev) + states + kv_read)


def pick_chunk(cfg, mesh, rules, lengths, slots: int, limit: int | None, default: int):
    """Largest power-of-two chunk dividing every length whose prefill plan (activations x 1.3)
    fits 90% of limit; without a known limit, the largest dividing one up to `default`."""
    from minimax_jax.inference import memory

    for c in (4096, 2048, 1024, 512, 256, 128, 64, 32, 16):
        if any(t % c for t in lengths) or (limit is None and c > default):
            continue
        p = memory.plan_inference(
            cfg, batch=1, prompt_len=max(lengths), max_len=slots, mesh_shape=dict(mesh.shape),
            rules=rules, prefill_chunk=c,
        )  # fmt: skip
        if limit is None or p.weights + p.cache + 1.3 * p.activations <= 0.9 * limit:
            return c
    return 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--mesh", default="expert=2")
    ap.add_argument("--rules", default="ep_fold")
    ap.add_argument("--prefill", default="8192,32768")
    ap.add_argument("--decode_batches", default="1,16")
    ap.add_argument(
        "--new_tokens",
        type=int,
        default=33,
        help="1 + a multiple of 16: one compiled copy of the step in the decode loop",
    )
    ap.add_argument("--chunk", type=int, default=0, help="prefill chunk; 0: largest that fits")
    ap.add_argument("--reps", type=int, default=10, help="timed loops / prefills per row")
    add_run_args(ap, budget_s=480, run_reserve_s=45)
    args = ap.parse_args()
    budget = Budget(args.budget_s, args.first_row_guess_s)
    jax = setup_jax(args.cpu_devices)
    import jax.numpy as jnp
    import numpy as np

    from experiments import harness
    from minimax_jax.inference import memory
    from minimax_jax.inference.engine import Engine, SamplingParams, sample_token
    from minimax_jax.model.cache import cache_shapes, cache_shardings
    from minimax_jax.model.decoder import RunOptions
    from minimax_jax.sharding import load_rules, make_mesh

    if args.tiny:
        args.layers = min(args.layers, 12)  # 7 lightning + 1 softmax + 4 lightning: one block
        args.prefill, args.new_tokens = "64,128", 17
        args.chunk = args.chunk or 32
    cfg = text01_slice(args.tiny, args.layers)
    rules, _ = load_rules(args.rules)
    mesh = make_mesh(parse_mesh(args.mesh))
    mesh_shape = dict(mesh.shape)
    impl = lightning_impl(args.lightning_impl, cfg, mesh, rules)
    opts = RunOptions(lightning_impl=impl, moe_impl=rules.moe_impl, mesh=mesh, rules=rules)
    dev = jax.devices()[0]
    rows = Rows(args.out, {
        "bench": "fullscale", "device": dev.device_kind, "devices": jax.device_count(),
        "jax": jax.__version__, "mesh": mesh_shape, "rules": args.rules, "layers": cfg.num_layers,
        "lightning_layers": cfg.num_lightning_layers, "params": cfg.param_count(),
        "lightning_impl": impl, "tiny": args.tiny,
    })  # fmt: skip

    planned_w = memory.weight_bytes(cfg, mesh_shape, rules, jnp.bfloat16)
    print(f"[plan] weights {planned_w / GiB:.2f} GiB per device "
          f"({cfg.param_count() * 2 / GiB:.1f} GiB in all, bf16)", flush=True)  # fmt: skip
    limit = min(memory_stats().get("bytes_limit", [0])) or None  # known before any weight
    lengths = sorted(int(t) for t in args.prefill.split(",") if t)
    slots = -(-max(lengths, default=128) // 128) * 128
    chunk = args.chunk or pick_chunk(cfg, mesh, rules, lengths or [128], slots, limit, 2048)
    if any(t % chunk for t in lengths):
        raise SystemExit(f"--prefill lengths must be multiples of the chunk ({chunk})")
    batches = sorted(int(x) for x in args.decode_batches.split(",") if x)
    print(f"[plan] prefill chunk {chunk}, cache {slots} slots; bytes_limit {gib(limit)} GiB")

    def plan(**kw):
        return memory.plan_inference(cfg, mesh_shape=mesh_shape, rules=rules, **kw)

    plans = {f"decode_b{b}": plan(batch=b, prompt_len=1, max_len=DECODE_SLOTS, prefill_chunk=1)
             for b in batches}  # fmt: skip
    plans |= {f"prefill_{t}": plan(batch=1, prompt_len=t, max_len=slots, prefill_chunk=chunk)
              for t in lengths}  # fmt: skip
    for name, p in plans.items():
        print(f"[plan] {name}: {p.report()}", flush=True)
    gbps = copy_gbps()  # before the weights: its buffers are gone before any row
    params, init_s = init_random_params(cfg, mesh, rules, jnp.bfloat16)
    placed, stats = device_bytes(params), memory_stats()
    rows.write({
        "row": "init", "init_s": init_s, "planned_weight_bytes": planned_w,
        "placed_weight_bytes_dev0": placed, "planned_over_placed": planned_w / placed,
        "planned_over_in_use": planned_w / max(stats["bytes_in_use"]) if stats else None,
        "bytes_in_use": stats.get("bytes_in_use"), "peak_bytes_per_device":
        stats.get("peak_bytes_in_use"), "bytes_limit": stats.get("bytes_limit"),
        "copy_gbps": gbps, "chunk": chunk, "elapsed_s": budget.elapsed(),
    })  # fmt: skip

    engine = Engine(cfg, params, options=opts, prefill_chunk=chunk)
    rng = np.random.RandomState(0)
    sp, eos, key = SamplingParams(), jnp.asarray([-1], jnp.int32), jax.random.key(1)

    def cache_abstract(b: int, n: int):
        shapes = cache_shapes(cfg, b, n, engine.kv_dtype)
        shardings = cache_shardings(cfg, b, n, mesh, rules)
        return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                            shapes, shardings)  # fmt: skip

    @functools.cache
    def cache_fn(b: int, n: int):
        shapes = cache_shapes(cfg, b, n, engine.kv_dtype)
        zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
        return jax.jit(zeros, out_shardings=cache_shardings(cfg, b, n, mesh, rules))

    def new_cache(b: int, n: int):  # an empty cache in its shards, made outside the timings
        return jax.block_until_ready(cache_fn(b, n)())

    compiler = Compiler(args.compile_workers)  # all at once; the rows reuse the executables
    for b in batches:
        first = jax.ShapeDtypeStruct((b,), jnp.int32)
        compiler.submit(
            f"decode_b{b}",
            lambda b=b, first=first: engine._loop.lower(
                params, cache_abstract(b, DECODE_SLOTS), first, key, args.new_tokens, sp, eos
            ),
        )
    if lengths:
        ids = jax.ShapeDtypeStruct((1, chunk), jnp.int32)
        compiler.submit("prefill", lambda: engine._prefill.lower(
            params, ids, ids, cache_abstract(1, slots)))  # fmt: skip
    compiler.wait(args.budget_s - budget.elapsed() - args.run_reserve_s)
    rows.write({"row": "compile", "programs": list(compiler.jobs), "elapsed_s": budget.elapsed(),
                "done": [k for k, j in compiler.jobs.items() if j.done()]})  # fmt: skip

    unchecked = harness.no_check("full width: tests/test_fullscale.py checks the code, tiny")

    def decode(b: int) -> dict:
        first = jnp.asarray(rng.randint(0, cfg.vocab_size, (b,)), jnp.int32)
        t0 = time.perf_counter()
        jax.block_until_ready(engine._loop(params, new_cache(b, DECODE_SLOTS), first, key,
                                           args.new_tokens, sp, eos))  # fmt: skip
        first_s = time.perf_counter() - t0
        timing = harness.measure(
            lambda cache: engine._loop(params, cache, first, key, args.new_tokens, sp, eos)[0],
            setup=lambda: new_cache(b, DECODE_SLOTS),
            reps=args.reps,
            warmup=0,
            method="wall",
        )
        step = timing.median / (args.new_tokens - 1)
        floor = decode_floor_bytes(cfg, params, b, DECODE_SLOTS, mesh, rules)
        return {"batch": b, "new_tokens": args.new_tokens, "cache_slots": DECODE_SLOTS,
                "first_call_s": first_s, "decode_step_ms": step * 1e3,
                **timing.row_ms("loop_ms"), **unchecked,
                "decode_tok_per_s": b / step, "floor_bytes_per_device": floor,
                "floor_ms": floor / (gbps * 1e9) * 1e3,
                "floor_over_step": floor / (gbps * 1e9) / step}  # fmt: skip

    done_prefill: dict[int, float] = {}  # length -> seconds of one prefill

    def prefill(t: int) -> dict:
        ids = rng.randint(0, cfg.vocab_size, (1, t)).astype(np.int32)
        mask = np.ones_like(ids)

        def run(cache):  # as Engine.prefill, with the cache made beforehand (untimed)
            for s in range(0, t, chunk):
                logits, cache = engine._prefill(params, ids[:, s : s + chunk],
                                                mask[:, s : s + chunk], cache)  # fmt: skip
            return sample_token(logits, jax.random.key(0), sp)

        t0 = time.perf_counter()
        jax.block_until_ready(run(new_cache(1, slots)))
        first_s = time.perf_counter() - t0
        timing = harness.measure(run, setup=lambda: new_cache(1, slots), reps=args.reps,
                                 warmup=0, method="wall")  # fmt: skip
        done_prefill[t] = timing.median
        return {"batch": 1, "prompt": t, "chunk": chunk, "cache_slots": slots,
                "first_call_s": first_s, "prefill_s": timing.median, **timing.row_ms(),
                **unchecked, "prefill_tok_per_s": t / timing.median}  # fmt: skip

    for b in batches:
        name = f"decode_b{b}"
        run_row(rows, budget, name, plans[name], lambda b=b: decode(b), compiler, name)
    for t in lengths:
        est = None  # the longest row so far; after one length: 2 runs, at worst quadratic
        if done_prefill:
            t0, s0 = max(done_prefill.items())
            est = (2 + args.reps) * s0 * (t / t0) ** 2 + 10
        name = f"prefill_{t}"
        run_row(rows, budget, name, plans[name], lambda t=t: prefill(t), compiler, "prefill", est)
    rows.write({"row": "done", "elapsed_s": budget.elapsed()})
    compiler.close()
    os._exit(0)  # do not wait for a compile the budget gave up on


if __name__ == "__main__":
    main()
