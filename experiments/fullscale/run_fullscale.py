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
each device draws its own shard in pieces; no full copy anywhere). Rows (JSON lines, --out):

  init     init time, the planner's weight bytes per device vs the bytes of the shards actually
           placed on device 0, bytes in use / peak after init, the copy bandwidth (GB/s).
  decode   per --decode_batches size: --new_tokens steps in the Engine's jitted loop from an empty
           cache of 128 slots; step time, tokens/s and the bandwidth floor of a step.
  prefill  per --prefill length (batch 1): chunked prefill into a cache of max(--prefill) slots
           (one compiled chunk function serves every length); tokens/s.

Rows run in increasing planned memory (decode, then prefill by length), because the measured
`peak_bytes_in_use` is cumulative over the process: each row records the peak before and after
it and compares the planner's total for that row (weights + cache + activations, planner
weights) with the peak after it (`planned_over_peak`; `peak_raised` false means an earlier row
or the init set that peak). The planner's numbers are printed before each row compiles. A row
whose estimated time (the longest row so far) would pass --budget_s is skipped with a row saying
so. --chunk 0 picks the largest prefill chunk whose plan, activations x 1.3, fits 90% of the
device's bytes_limit.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    GiB, Budget, Rows, device_bytes, gib, init_random_params, lightning_impl, memory_stats,
    parse_mesh, setup_jax, text01_slice,
)  # fmt: skip

DECODE_SLOTS = 128  # cache slots of the decode rows (>= new_tokens)


def copy_gbps(jax, elems: int) -> float:
    """Read + write bandwidth of `x + 1` over elems fp32 on the first device (best of 5)."""
    import jax.numpy as jnp

    x = jax.device_put(jnp.ones((elems,), jnp.float32), jax.devices()[0])
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.nbytes / best / 1e9


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
    n, kv, h = local(cfg.num_heads, "heads", mesh, rules), local(cfg.num_kv_heads, "kv_heads",
                                                                  mesh, rules), cfg.head_dim
    states = cfg.num_lightning_layers * batch * n * h * h * 4 * 2
    kv_read = cfg.num_full_layers * 2 * batch * slots * kv * h * 2
    return int(experts + attn + device_bytes(params["lm_head"], dev) + states + kv_read)


def pick_chunk(cfg, mesh, rules, longest: int, slots: int, limit: int | None, default: int):
    """Largest power-of-two chunk dividing `longest` whose prefill plan (activations x 1.3)
    fits 90% of limit; `default` without a known limit."""
    from minimax_jax import memory

    if limit is None:
        return default
    for c in (4096, 2048, 1024, 512, 256, 128):
        if longest % c:
            continue
        p = memory.plan_inference(cfg, batch=1, prompt_len=longest, max_len=slots,
                                  mesh_shape=dict(mesh.shape), rules=rules, prefill_chunk=c)  # fmt: skip
        if p.weights + p.cache + 1.3 * p.activations <= 0.9 * limit:
            return c
    return 128


class Measure:
    """Runs one row: prints the plan, checks the budget, records memory before and after."""

    def __init__(self, rows: Rows, budget: Budget, cfg, mesh, rules):
        self.rows, self.budget, self.cfg, self.mesh, self.rules = rows, budget, cfg, mesh, rules

    def __call__(self, what: str, plan_kw: dict, fn, compare: str) -> None:
        from minimax_jax import memory

        plan = memory.plan_inference(self.cfg, mesh_shape=dict(self.mesh.shape), rules=self.rules,
                                     **plan_kw)  # fmt: skip
        print(f"[plan] {what}: {plan.report()}", flush=True)
        if not self.budget.allows():
            self.rows.write(self.budget.skip_row(what))
            return
        before = memory_stats()
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - one failed row must not end the run
            out = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
        seconds = time.perf_counter() - t0
        self.budget.done(seconds)
        after = memory_stats()
        peak_b = max(before.get("peak_bytes_in_use", [0]))
        peak = max(after["peak_bytes_in_use"]) if after else None
        self.rows.write({
            "row": what, **out, "row_s": seconds,
            "planned": {k: getattr(plan, k) for k in ("weights", "cache", "activations")}
            | {"total": plan.total},
            "planned_gib": gib(plan.total), "compared_with": compare,
            "peak_bytes_per_device": after.get("peak_bytes_in_use"),
            "peak_before": peak_b or None, "peak_raised": peak is not None and peak > peak_b,
            "bytes_in_use_before": before.get("bytes_in_use"),
            "planned_over_peak": None if not peak else plan.total / peak,
        })  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--mesh", default="expert=2")
    ap.add_argument("--rules", default="ep_fold")
    ap.add_argument("--prefill", default="8192,32768")
    ap.add_argument("--decode_batches", default="1,16")
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=0, help="prefill chunk; 0: largest that fits")
    ap.add_argument("--lightning_impl", default=None, help="default: xla if heads are sharded")
    ap.add_argument("--budget_s", type=float, default=480)
    ap.add_argument("--first_row_guess_s", type=float, default=90)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cpu_devices", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    budget = Budget(args.budget_s, args.first_row_guess_s)
    jax = setup_jax(args.cpu_devices)
    import jax.numpy as jnp
    import numpy as np

    from minimax_jax import memory
    from minimax_jax.cache import init_cache
    from minimax_jax.ops.decoder import RunOptions
    from minimax_jax.sampling import Engine, SamplingParams, sample_token
    from minimax_jax.sharding import load_rules, make_mesh

    if args.tiny:
        args.layers = min(args.layers, 12)  # 7 lightning + 1 softmax + 4 lightning: one block
        args.prefill, args.new_tokens = "64,128", 8
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
    params, init_s = init_random_params(cfg, mesh, rules, jnp.bfloat16)
    placed, stats = device_bytes(params), memory_stats()
    gbps = copy_gbps(jax, (1 << 22) if dev.platform == "cpu" else (1 << 29))
    limit = min(stats["bytes_limit"]) if "bytes_limit" in stats else None
    rows.write({
        "row": "init", "init_s": init_s, "planned_weight_bytes": planned_w,
        "placed_weight_bytes_dev0": placed, "planned_over_placed": planned_w / placed,
        "bytes_in_use": stats.get("bytes_in_use"), "peak_bytes_per_device":
        stats.get("peak_bytes_in_use"), "bytes_limit": stats.get("bytes_limit"),
        "copy_gbps": gbps, "elapsed_s": budget.elapsed(),
    })  # fmt: skip

    lengths = sorted(int(t) for t in args.prefill.split(",") if t)
    slots = -(-max(lengths, default=128) // 128) * 128
    chunk = pick_chunk(cfg, mesh, rules, max(lengths, default=128), slots, limit, args.chunk or 2048)
    engine = Engine(cfg, params, options=opts, prefill_chunk=chunk)
    rng = np.random.RandomState(0)
    measure = Measure(rows, budget, cfg, mesh, rules)
    sp, eos = SamplingParams(), jnp.asarray([-1], jnp.int32)

    def decode(b: int) -> dict:
        first = jnp.asarray(rng.randint(0, cfg.vocab_size, (b,)), jnp.int32)
        times = []
        for _ in range(2):  # the first call compiles
            cache = init_cache(cfg, b, DECODE_SLOTS, engine.kv_dtype, mesh=mesh, rules=rules)
            jax.block_until_ready(cache)
            t0 = time.perf_counter()
            toks, cache = engine._loop(params, cache, first, jax.random.key(1), args.new_tokens,
                                       sp, eos)  # fmt: skip
            jax.block_until_ready(toks)
            times.append(time.perf_counter() - t0)
            del cache
        step = times[-1] / (args.new_tokens - 1)
        floor = decode_floor_bytes(cfg, params, b, DECODE_SLOTS, mesh, rules)
        return {"batch": b, "new_tokens": args.new_tokens, "cache_slots": DECODE_SLOTS,
                "first_call_s": times[0], "decode_step_ms": step * 1e3,
                "decode_tok_per_s": b / step, "floor_bytes_per_device": floor,
                "floor_ms": floor / (gbps * 1e9) * 1e3,
                "floor_over_step": floor / (gbps * 1e9) / step}  # fmt: skip

    def prefill(t: int) -> dict:
        ids = rng.randint(0, cfg.vocab_size, (1, t))
        plan = {"padded_prompt": t, "chunk": chunk, "max_len": slots}
        times = []
        for _ in range(2):  # the first call compiles (once for every length: same shapes)
            t0 = time.perf_counter()
            logits, cache = engine.prefill(ids, np.ones_like(ids), plan)
            jax.block_until_ready(sample_token(logits, jax.random.key(0), sp))
            times.append(time.perf_counter() - t0)
            del logits, cache
        return {"batch": 1, "prompt": t, "chunk": chunk, "cache_slots": slots,
                "first_call_s": times[0], "prefill_s": times[-1],
                "prefill_tok_per_s": t / times[-1]}  # fmt: skip

    for b in sorted(int(x) for x in args.decode_batches.split(",") if x):
        kw = dict(batch=b, prompt_len=1, max_len=DECODE_SLOTS, prefill_chunk=1)
        measure(f"decode_b{b}", kw, lambda b=b: decode(b), "decode-step plan vs peak after row")
    for t in lengths:
        kw = dict(batch=1, prompt_len=t, max_len=slots, prefill_chunk=chunk)
        measure(f"prefill_{t}", kw, lambda t=t: prefill(t), "prefill-chunk plan vs peak after row")
    rows.write({"row": "done", "elapsed_s": budget.elapsed()})


if __name__ == "__main__":
    main()
