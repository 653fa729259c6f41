"""Training step of a full-width MiniMax-Text-01 layer slice, sharded (issue 9, nvidia-h200-x2).

    # 2 GPUs: one lightning + one softmax layer, 32 experts x 9216, vocab 200064, EP=2
    python3 experiments/fullscale/train_slice.py --mesh expert=2 --out t.jsonl
    # CPU smoke runs on simulated devices
    python3 experiments/fullscale/train_slice.py --tiny --cpu_devices 8 --mesh expert=2,tensor=4

The repo's training step (`train_step.make_train_step`: loss with the router losses, gradient,
global-norm clip, AdamW from `build_optimizer`, skip on non-finite; jitted, state donated;
unpacked rows of random tokens) on bf16 parameters and compute with full remat per block.
AdamW's moments follow the parameter dtype (bf16; the fp32 router's stay fp32), so
`memory.plan_training(param_dtype=bf16, optimizer_moments=2)` plans the state exactly. Random
weights are drawn in their shards (`common.init_random_params`), the optimizer state is created
sharded like them.

Every shape's step is compiled at once in threads (`common.Compiler`), then the rows run. Rows
(JSON lines, --out): `init` (planned vs placed bytes on device 0 of parameters and optimizer
state, bytes in use), `compile`, then one row per --shapes BxT in increasing planned memory: the
plan (printed before compiling), a warm-up step, the median of --steps more, tokens/s, model
TFLOP/s per device (`flops_per_token`), XLA's total for the compiled step and the peak per
device after the row, both against the plan (`common.run_row`; the peak is cumulative over the
process, hence the order). A shape that did not compile in the budget, or whose estimate would
pass --budget_s, is skipped with a row saying so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    FULL,
    LIN,
    Budget,
    Compiler,
    Rows,
    add_run_args,
    device_bytes,
    init_random_params,
    lightning_impl,
    memory_stats,
    parse_mesh,
    run_row,
    setup_jax,
    text01_slice,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer_types", default=f"{LIN},{FULL}")
    ap.add_argument("--mesh", default="expert=2")
    ap.add_argument("--rules", default="ep_fold")
    ap.add_argument("--shapes", default="1x4096,1x8192", help="BxT per row")
    ap.add_argument("--steps", type=int, default=10, help="timed steps after the first")
    ap.add_argument("--remat", default="full", choices=["none", "dots", "full"])
    add_run_args(ap, budget_s=240, run_reserve_s=30)
    args = ap.parse_args()
    budget = Budget(args.budget_s, args.first_row_guess_s)
    jax = setup_jax(args.cpu_devices)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from experiments import harness, roofline
    from minimax_jax.inference import memory
    from minimax_jax.model.decoder import RunOptions
    from minimax_jax.sharding import load_rules, make_mesh
    from minimax_jax.training.run_config import OptimSection
    from minimax_jax.training.step import build_optimizer, flops_per_token, make_train_step

    if args.tiny:
        args.shapes = "1x64,2x128"
    cfg = text01_slice(args.tiny, layer_types=args.layer_types)
    rules, _ = load_rules(args.rules)
    mesh = make_mesh(parse_mesh(args.mesh))
    mesh_shape = dict(mesh.shape)
    remat = None if args.remat == "none" else args.remat
    impl = lightning_impl(args.lightning_impl, cfg, mesh, rules)
    opts = RunOptions(lightning_impl=impl, moe_impl=rules.moe_impl, remat_policy=remat,
                      mesh=mesh, rules=rules)  # fmt: skip
    bf16 = jnp.bfloat16
    dev = jax.devices()[0]
    rows = Rows(args.out, {
        "bench": "fullscale_train", "device": dev.device_kind, "devices": jax.device_count(),
        "jax": jax.__version__, "mesh": mesh_shape, "rules": args.rules, "layers":
        cfg.num_layers, "layer_types": list(cfg.layer_types), "params": cfg.param_count(),
        "param_dtype": "bfloat16", "optimizer": "adamw (moments in param dtype)",
        "remat": args.remat, "lightning_impl": impl, "tiny": args.tiny,
    })  # fmt: skip

    def plan(b: int, t: int):
        return memory.plan_training(cfg, batch=b, seq_len=t, mesh_shape=mesh_shape, rules=rules,
                                    param_dtype=bf16, compute_dtype=bf16, optimizer_moments=2,
                                    remat=args.remat)  # fmt: skip

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    shapes.sort(key=lambda bt: plan(*bt).total)
    print(f"[plan] state: {plan(1, 1).report()} (activations of one token)", flush=True)
    optim = OptimSection(warmup_steps=1)
    tx, _ = build_optimizer(optim, total_steps=1000)
    params, init_s = init_random_params(cfg, mesh, rules, bf16)
    t0 = time.perf_counter()
    opt_shardings = state_shardings(jax.eval_shape(tx.init, params), params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    step0 = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, PartitionSpec()))
    state = {"params": params, "opt_state": opt_state, "step": step0}  # as the step returns it
    jax.block_until_ready(state)
    p0 = plan(1, 1)
    stats = memory_stats()
    rows.write({
        "row": "init", "init_s": init_s, "opt_init_s": time.perf_counter() - t0,
        "planned_weight_bytes": p0.weights, "placed_weight_bytes_dev0": device_bytes(params),
        "planned_optimizer_bytes": p0.optimizer,
        "placed_optimizer_bytes_dev0": device_bytes(opt_state),
        "bytes_in_use": stats.get("bytes_in_use"), "bytes_limit": stats.get("bytes_limit"),
        "elapsed_s": budget.elapsed(),
    })  # fmt: skip
    fixed = jax.tree.map(lambda x: x.sharding, state)  # the state keeps its shardings
    step_fn = jax.jit(make_train_step(cfg, opts, bf16, optim, tx, packed=False),
                      donate_argnums=0, out_shardings=(fixed, None))  # fmt: skip
    for b, t in shapes:
        print(f"[plan] train_{b}x{t}: {plan(b, t).report()}", flush=True)
    compiler = Compiler(args.compile_workers)  # all at once; the rows reuse the executables
    for b, t in shapes:
        tokens = jax.ShapeDtypeStruct((1, b, t), jnp.int32)
        batch = {"tokens": tokens, "segment_ids": tokens}
        compiler.submit(f"train_{b}x{t}", lambda batch=batch: step_fn.lower(state, batch))
    compiler.wait(args.budget_s - budget.elapsed() - args.run_reserve_s)
    rows.write({"row": "compile", "programs": list(compiler.jobs), "elapsed_s": budget.elapsed(),
                "done": [k for k, j in compiler.jobs.items() if j.done()]})  # fmt: skip
    rng = np.random.RandomState(0)

    def run(b: int, t: int) -> dict:
        nonlocal state
        tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, b, t)), jnp.int32)
        batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens)}
        times = []
        for _ in range(1 + args.steps):  # the first step warms up
            t0 = time.perf_counter()
            state, m = step_fn(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        step = statistics.median(times[1:]) if args.steps else times[0]
        fpt = flops_per_token(cfg, t)
        per_device = fpt * b * t / step / jax.device_count() / 1e12
        peak = roofline.peak_for(jax.devices()[0].device_kind)
        return {"batch": b, "seq_len": t, "first_step_s": times[0], "step_s": step,
                "step_times_s": times[1:], "tokens_per_s": b * t / step,
                "timing_method": "wall_block_until_ready", "reps": len(times) - 1,
                "model_tflops_per_s_per_device": per_device,
                "mfu": None if peak is None else per_device / peak.bf16_tflops,
                **roofline.peak_fields(jax.devices()[0].device_kind),
                **harness.no_check("full width: tests/test_fullscale.py checks the code, tiny"),
                "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                "skipped_steps": float(m["skipped"])}  # fmt: skip

    for b, t in shapes:
        name = f"train_{b}x{t}"
        run_row(rows, budget, name, plan(b, t), lambda b=b, t=t: run(b, t), compiler, name)
    rows.write({"row": "done", "elapsed_s": budget.elapsed()})
    compiler.close()
    os._exit(0)  # do not wait for a compile the budget gave up on


def state_shardings(abstract_state, params, mesh):
    """Shardings for an optax state: a leaf that mirrors a parameter (its path ends with the
    parameter's path, same shape: AdamW's mu and nu) gets that parameter's sharding; the rest
    (step counts) is replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    keystr = jax.tree_util.keystr
    leaves = jax.tree_util.tree_leaves_with_path(params)
    by_path = [(keystr(p), x.shape, x.sharding) for p, x in leaves]

    def one(path, leaf):
        name = keystr(path)
        for suffix, shape, sharding in by_path:
            if name.endswith(suffix) and leaf.shape == shape:
                return sharding
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, abstract_state)


if __name__ == "__main__":
    main()
