"""Benchmark: training-step throughput and MFU of a ~1B-parameter hybrid MoE on one GPU.

    PYTHONUNBUFFERED=1 python3 experiments/bench_train.py --out bench_train.jsonl
    python3 experiments/bench_train.py --tiny          # CPU smoke run of the script

Config: hidden 2048, 16 layers (two 7+1 blocks), 16 heads x 128, 4 kv heads, 8 experts x 768,
top-2, vocab 32000: 1.05B total / 0.54B active parameters (with the lm head); fp32 weights and
AdamW state, bf16 compute, the real train step of `minimax_jax.training.step` (jitted, state
donated). One JSON line per sequence length (4K and 8K; --tokens per step): median step time
(device time per step, `harness.measure`, with its spread over --reps steps), tokens/s, MFU =
`flops_per_token` (6 x active matmul params + attention) x tokens/s over the datasheet's dense
bf16 peak of the device (`roofline.PEAKS`, sources there; null for a device not in the table),
the measured rate of an 8192^3 bf16 matmul in the same process as an extra column
(`measured_matmul_tflops`, `mfu_vs_measured_matmul`), and a breakdown forward / backward /
optimizer+rest from separately jitted forward-only and forward+backward functions. The first
step's objective is checked against a separately jitted forward on the same initial weights
(`experiments.harness.check`).
"""

from __future__ import annotations

import argparse
import os
import sys
import types

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import harness, roofline  # noqa: E402
from minimax_jax import MiniMaxForCausalLM, ModelConfig  # noqa: E402
from minimax_jax.model.decoder import RunOptions  # noqa: E402
from minimax_jax.training import losses  # noqa: E402
from minimax_jax.training.run_config import OptimSection  # noqa: E402
from minimax_jax.training.step import (  # noqa: E402
    batch_loss,
    build_optimizer,
    flops_per_token,
    make_train_step,
)

LIN, FULL = "linear_attention", "full_attention"


def bench_config(tiny: bool) -> ModelConfig:
    if tiny:
        return ModelConfig.preset("tiny-native")
    return ModelConfig(
        vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16, head_dim=128,
        num_kv_heads=4, intermediate_size=768, num_experts=8, num_experts_per_tok=2,
        layer_types=tuple(([LIN] * 7 + [FULL]) * 2), rope_theta=1e7, rotary_dim=64,
        max_position_embeddings=1 << 20, schema="native", slope_formula="native",
        architecture="MiniMaxForCausalLM",
    )  # fmt: skip


def run_one(config, seq_len: int, rows: int, args) -> dict:
    optim = OptimSection()
    tx, _ = build_optimizer(optim, 1000)
    opts = RunOptions(
        args.lightning_impl, args.moe_impl, args.remat, attention_impl=args.attention_impl
    )
    compute = jnp.bfloat16
    params = jax.jit(lambda: MiniMaxForCausalLM(config, rngs=nnx.Rngs(0)).pure_params())()
    opt_state = jax.jit(tx.init)(params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), "int32")}
    key = jax.random.key(1)
    tokens = jax.random.randint(key, (1, rows, seq_len), 0, config.vocab_size, jnp.int32)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens)}
    step = jax.jit(make_train_step(config, opts, compute, optim, tx, packed=args.packed),
                   donate_argnums=0)  # fmt: skip
    n_tok = float(rows * seq_len)
    # the step divides by the tokens that have a target; the reference forward does the same
    _, weights, _ = losses.shifted_targets(tokens[0], batch["segment_ids"][0])
    total = jnp.maximum(jnp.sum(weights), 1.0)

    def loss(p):
        return batch_loss(config, opts, compute, optim, p, tokens[0], batch["segment_ids"][0],
                          total, 1, packed=args.packed)[0]  # fmt: skip

    fwd = jax.jit(loss)
    fwd_bwd = jax.jit(jax.grad(loss))
    ref = fwd(state["params"])  # before the first step donates the weights
    holder = types.SimpleNamespace(state=state)
    holder.state, first = step(holder.state, batch)
    checked = harness.check(first["objective"], ref, atol=1e-3, rtol=1e-2)

    def run_step(_):
        holder.state, m = step(holder.state, batch)
        return m

    timing = harness.measure(run_step, reps=args.reps, warmup=1)
    t_step = timing.median
    t_fwd = t_fb = None
    if seq_len in args.breakdown:  # one more compilation
        params = holder.state["params"]
        t_fwd = harness.time_device(fwd, params, reps=args.reps).median
        t_fb = harness.time_device(fwd_bwd, params, reps=args.reps).median
    kind = jax.devices()[0].device_kind
    peak = roofline.peak_for(kind)
    measured = roofline.matmul_tflops() * 1e12
    tok_s = n_tok / t_step
    fpt = flops_per_token(config, seq_len)
    return {
        "seq_len": seq_len, "rows": rows, "tokens_per_step": int(n_tok),
        "step_s": t_step, **timing.row_ms("step_ms"), "tokens_per_s": tok_s,
        "mfu": None if peak is None else fpt * tok_s / (peak.bf16_tflops * 1e12),
        **roofline.peak_fields(kind), "measured_matmul_tflops": measured / 1e12,
        "mfu_vs_measured_matmul": fpt * tok_s / measured,
        "flops_per_token": fpt,
        "breakdown_s": None if t_fb is None else {
            "forward": t_fwd, "backward": t_fb - t_fwd, "optimizer_and_rest": t_step - t_fb},
        "remat": args.remat, "packed": args.packed, "moe_impl": args.moe_impl,
        "lightning_impl": args.lightning_impl, "attention_impl": args.attention_impl,
        **checked,
    }  # fmt: skip


def count_params(config) -> tuple[int, float]:
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(config, rngs=nnx.Rngs(0)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    return total, flops_per_token(config, 1) / 6  # active params (attention term negligible)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny preset, short sequences (CPU)")
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--tokens", type=int, default=32768, help="tokens per step")
    p.add_argument("--remat", default="dots", choices=["none", "dots", "full"])
    p.add_argument("--moe_impl", default="sorted")
    p.add_argument("--lightning_impl", default="auto")
    p.add_argument("--attention_impl", default="auto", help="softmax layers: auto | xla | cudnn")
    p.add_argument("--reps", type=int, default=harness.DEFAULT_REPS)
    p.add_argument(
        "--packed",
        action="store_true",
        help="segment-aware attention (packed documents; on GPU the Pallas lightning kernel only "
        "with --lightning_impl gpu, XLA with auto)",
    )
    p.add_argument(
        "--breakdown",
        type=int,
        nargs="*",
        default=[4096, 64],
        help="sequence lengths that also time forward and forward+backward alone",
    )
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args()
    args.remat = None if args.remat == "none" else args.remat
    config = bench_config(args.tiny)
    seqs = [64, 128] if args.tiny else args.seq
    total, active = count_params(config)
    rows = harness.Rows(args.out, bench="train", total_params=total, active_params=int(active),
                        tiny=args.tiny)  # fmt: skip
    for t in seqs:
        rows.emit(run_one(config, t, max(1, (256 if args.tiny else args.tokens) // t), args))


if __name__ == "__main__":
    main()
