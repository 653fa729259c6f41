"""The real MiniMax-Text-01 architecture (or a slice of its layers) at full width, sharded.

    # 2 GPUs: a 20-layer slice with EP=2 (issue 9, nvidia-h200-x2)
    python3 experiments/fullscale/run_fullscale.py --layers 20 --mesh expert=2 --out r.jsonl
    # 8 GPUs: the whole model, TP over heads/FFN and EP over experts
    python3 experiments/fullscale/run_fullscale.py --layers 80 --mesh expert=2,tensor=4
    # CPU smoke run on 8 simulated devices
    python3 experiments/fullscale/run_fullscale.py --tiny --cpu_devices 8 --mesh expert=2,tensor=4

Random bf16 weights are created directly in their shards (a jitted init with out_shardings: no
full copy anywhere), then: prefill at each --prefill length (batch 1, chunked), decode at each
--decode_batches size, each with the planner's bytes per device (`minimax_jax.memory`) beside the
measured peak (`device.memory_stats()["peak_bytes_in_use"]`, GPUs only). One JSON line per
measurement with device, mesh and numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in sizes:
            raise SystemExit(f"--mesh: unknown axis {name!r} (data, fsdp, expert, tensor)")
        sizes[name] = int(value)
    return sizes


def peak_bytes() -> int | None:
    import jax

    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats]
    return max(peaks) if all(p is not None for p in peaks) else None


def build(args):
    import jax.numpy as jnp
    from flax import nnx

    from minimax_jax import MiniMaxForCausalLM, ModelConfig
    from minimax_jax.ops.decoder import RunOptions
    from minimax_jax.sharding import load_rules, make_mesh

    cfg = ModelConfig.preset("tiny-m1-2blocks" if args.tiny else "minimax-text-01")
    if not args.tiny:
        cfg = cfg.replace(num_layers=args.layers, layer_types=cfg.layer_types[: args.layers])
    rules, _ = load_rules(args.rules)
    mesh = make_mesh(parse_mesh(args.mesh))
    opts = RunOptions(moe_impl=rules.moe_impl, mesh=mesh, rules=rules)
    t0 = time.perf_counter()
    model = MiniMaxForCausalLM(
        cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, options=opts, mesh=mesh, rules=rules
    )
    params = model.pure_params()
    jax_block(params)
    return cfg, mesh, rules, opts, params, time.perf_counter() - t0


def jax_block(tree):
    import jax

    jax.block_until_ready(tree)


def measure(engine, ids, new_tokens: int, base: dict) -> dict:
    """Prefill, then new_tokens decode steps in one jitted loop; times and memory."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from minimax_jax.sampling import SamplingParams, sample_token

    b, t = ids.shape
    plan = engine.plan(b, t, new_tokens)
    mask = np.ones_like(ids)
    sp, eos = SamplingParams(), jnp.asarray([-1], jnp.int32)
    out = {}
    for rep in range(2):  # the first repetition compiles
        t0 = time.perf_counter()
        logits, cache = engine.prefill(ids, mask, plan)
        first = sample_token(logits, jax.random.key(0), sp)
        jax_block(first)
        t1 = time.perf_counter()
        toks, _ = engine._loop(engine.params, cache, first, jax.random.key(1), new_tokens, sp, eos)
        jax_block(toks)
        t2 = time.perf_counter()
        out = {"prefill_s": t1 - t0, "decode_step_ms": (t2 - t1) / max(new_tokens - 1, 1) * 1e3}
        if rep == 0:
            out_compile = dict(out)
    return base | {
        "batch": b, "prompt": t, "new_tokens": new_tokens, **out,
        "prefill_tok_per_s": b * t / out["prefill_s"],
        "decode_tok_per_s": b / (out["decode_step_ms"] / 1e3),
        "first_call_s": out_compile["prefill_s"],
        "planned_bytes_per_device": plan["total"], "peak_bytes_per_device": peak_bytes(),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--mesh", default="expert=2")
    ap.add_argument("--rules", default="tp_ep")
    ap.add_argument("--prefill", default="8192,32768")
    ap.add_argument("--decode_batches", default="1,16")
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cpu_devices", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import jax

    if args.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.tiny:
        args.prefill, args.chunk, args.new_tokens = "64,128", 32, 8
    import numpy as np

    from minimax_jax.sampling import Engine

    cfg, mesh, rules, opts, params, init_s = build(args)
    dev = jax.devices()[0]
    base = {"bench": "fullscale", "device": dev.device_kind, "devices": jax.device_count(),
            "jax": jax.__version__, "mesh": dict(mesh.shape), "rules": args.rules,
            "layers": cfg.num_layers, "params": cfg.param_count(), "init_s": init_s}  # fmt: skip
    engine = Engine(cfg, params, options=opts, prefill_chunk=args.chunk)
    rng = np.random.RandomState(0)
    runs = [(1, int(t)) for t in args.prefill.split(",")]
    runs += [(int(b), 128 if not args.tiny else 16) for b in args.decode_batches.split(",")]
    for b, t in runs:
        row = measure(engine, rng.randint(0, cfg.vocab_size, (b, t)), args.new_tokens, base)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
