"""Long-context prefill of the 1.55B benchmark model on one GPU (issue #20's acceptance run).

    python experiments/bench_long_context.py --out results.jsonl \
        --lengths 32768,131072,524288,1048576 --chunk 8192
    python experiments/bench_long_context.py --tiny   # CPU smoke run

For each length (increasing), batch 1, chunks of --chunk: the hybrid model (two 7+1 blocks, the
`bench_generate.py` config, max_position_embeddings 1,048,576) prefills the whole prompt with
`Engine.prefill` on --impl (default "auto": what a user gets), and the lightning-only model of the
same width does the same, so the softmax layers' share of the time is hybrid minus lightning-only.
Rows (JSON lines, `harness.Rows`):

  rate       cuDNN causal flash attention alone at the model's shape (B1, N16, K4, H128) and
             --rate_len tokens, forward: its FLOP rate (4 N H T^2 / 2 causal FLOPs per call).
  check      the --impl prefill's last-token logits against the "xla" reference (materialised
             scores, --check_chunk chunks) at --check_len tokens.
  prefill    per length and model: seconds (median of --reps after one warm-up; lengths whose
             first call takes over --slow_s run once more only), us per token, the planner's
             weights / cache / activations, the process's peak bytes in use after the row and
             the activation peak = peak - weights - cache (the peak is cumulative: lengths run in
             increasing order, so it is this row's or a smaller row's).
  summary    per length: the softmax layers' share (us/token), their causal attention FLOPs at
             the measured cuDNN rate (us/token), and the ratio of the two.

A length is skipped (with a row saying so) when its estimated time (the last length's, scaled
quadratically) would pass --budget_s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import harness  # noqa: E402
from experiments.bench_generate import LIN, bench_config  # noqa: E402
from minimax_jax import MiniMaxForCausalLM  # noqa: E402
from minimax_jax.inference.engine import Engine  # noqa: E402
from minimax_jax.model.decoder import RunOptions  # noqa: E402


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def causal_flops(cfg, t: int) -> float:
    """QK^T and PV of one softmax layer over t causal positions (the visible half)."""
    return 4.0 * cfg.num_heads * cfg.head_dim * t * t / 2


def cudnn_rate(cfg, t: int, reps: int) -> dict:
    """FLOP/s of cuDNN causal flash attention alone at the model's head shape."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, t, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(x, (1, t, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
            for x in keys[1:])  # fmt: skip
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"))  # fmt: skip
    ref = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    n = min(t, 8192)  # the XLA reference materialises [N,T,T]: check on a prefix
    check = harness.check(fn(q[:, :n], k[:, :n], v[:, :n]).astype(jnp.float32),
                          ref(q[:, :n], k[:, :n], v[:, :n]).astype(jnp.float32),
                          atol=2e-2, rtol=2e-2)  # fmt: skip
    timing = harness.time_device(fn, q, k, v, reps=reps, warmup=2)
    rate = causal_flops(cfg, t) / timing.median
    return {"kind": "rate", "impl": "cudnn_causal", "tokens": t, **timing.row_ms(),
            "tflops": rate / 1e12, "check_len": n, **check}  # fmt: skip


def prefill_fn(engine: Engine, length: int):
    ids = np.random.RandomState(length).randint(0, engine.config.vocab_size, (1, length))
    plan = engine.plan(1, length, 1)

    def run():
        logits, _ = engine.prefill(ids, np.ones_like(ids), plan)
        return jax.block_until_ready(logits)

    return run, plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--tiny", action="store_true", help="tiny preset (CPU smoke run)")
    ap.add_argument("--lengths", default="32768,131072,524288,1048576")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--impl", default="auto", help="the hybrid model's attention_impl")
    ap.add_argument("--reps", type=int, default=3, help="timed prefills per length")
    ap.add_argument("--slow_s", type=float, default=20.0, help="one timed call above this")
    ap.add_argument("--rate_len", type=int, default=32768)
    ap.add_argument("--check_len", type=int, default=16384)
    ap.add_argument("--check_chunk", type=int, default=2048)
    ap.add_argument("--budget_s", type=float, default=480.0)
    ap.add_argument("--no_lightning_only", action="store_true")
    ap.add_argument("--no_check", action="store_true", help="skip the xla reference check")
    args = ap.parse_args()
    start = time.perf_counter()
    if args.tiny:
        args.lengths, args.chunk, args.rate_len = "256,512", 128, 256
        args.check_len, args.check_chunk = 256, 64
    cfg = bench_config(args.tiny)
    lin_cfg = bench_config(args.tiny, layer_types=lambda n: [LIN] * n)
    if args.tiny:
        cfg = cfg.replace(max_position_embeddings=1 << 20)
        lin_cfg = lin_cfg.replace(max_position_embeddings=1 << 20)
    rows = harness.Rows(args.out, bench="long_context", dtype="bfloat16",
                        params=cfg.param_count())  # fmt: skip
    on_gpu = jax.default_backend() == "gpu"
    rates = []
    if on_gpu:
        row = cudnn_rate(cfg, args.rate_len, reps=10)
        rates.append(row["tflops"] * 1e12)
        rows.emit(row)

    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    params = model.pure_params()
    engine = Engine(cfg, params, prefill_chunk=args.chunk,
                    options=RunOptions(attention_impl=args.impl))  # fmt: skip
    ref_engine = Engine(cfg, params, prefill_chunk=args.check_chunk,
                        options=RunOptions(attention_impl="xla"))  # fmt: skip
    if not args.no_check:
        run, _ = prefill_fn(engine, args.check_len)
        ref, _ = prefill_fn(ref_engine, args.check_len)
        # bf16 activations through 16 layers, two chunkings: compare like the model checks
        rows.emit({"kind": "check", "impl": args.impl, "tokens": args.check_len,
                   **harness.check(run().astype(jnp.float32), ref().astype(jnp.float32),
                                   atol=0.15, rtol=0.05)})  # fmt: skip
    del ref_engine

    lin = None
    if not args.no_lightning_only:
        lin_model = MiniMaxForCausalLM(lin_cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
        lin = Engine(lin_cfg, lin_model.pure_params(), prefill_chunk=args.chunk)
    last = None  # (tokens, seconds) of the last hybrid row
    for t in map(int, filter(None, args.lengths.split(","))):
        spent = time.perf_counter() - start
        if last is not None:
            # the lightning part scales linearly, the softmax part quadratically
            r = t / last[0]
            lin_s = last[2] if last[2] is not None else 0.0
            one = lin_s * r + (last[1] - lin_s) * r * r
            estimate = one * (1 + (1 if one > args.slow_s else args.reps))
            estimate += lin_s * r * (1 + (1 if lin_s * r > args.slow_s else args.reps))
            if spent + estimate > args.budget_s:
                rows.emit({"kind": "skipped", "tokens": t, "estimate_s": estimate,
                           "spent_s": spent, "budget_s": args.budget_s})  # fmt: skip
                continue
        result = {}
        for label, eng in (("hybrid", engine), ("lightning_only", lin)):
            if eng is None:
                continue
            run, plan = prefill_fn(eng, t)
            t0 = time.perf_counter()
            logits = run()  # compiles once per chunk shape, then runs every chunk
            first = time.perf_counter() - t0
            finite = bool(np.isfinite(np.asarray(logits, np.float32)).all())
            reps = 1 if first > args.slow_s else args.reps
            timing = harness.timed_stats(run, reps=reps, warmup=0)
            peak = peak_bytes()
            row = {"kind": "prefill", "model": label,
                   "impl": args.impl if label == "hybrid" else "auto", "tokens": t,
                   "chunk": args.chunk, "first_call_s": first, **timing.row_ms(),
                   "us_per_token": timing.median / t * 1e6, "logits_finite": finite,
                   "plan_weights": plan["weights"], "plan_cache": plan["cache"],
                   "plan_activations": plan["activations"], "peak_bytes": peak,
                   "activation_peak": None if peak is None
                   else peak - plan["weights"] - plan["cache"]}  # fmt: skip
            rows.emit(row)
            result[label] = row
            if label == "hybrid":
                last = (t, timing.median, None)
            else:
                last = (t, last[1], timing.median)
        if "lightning_only" in result and rates:
            share = result["hybrid"]["us_per_token"] - result["lightning_only"]["us_per_token"]
            layers = sum(1 for x in cfg.layer_types if x != LIN)
            ideal = layers * causal_flops(cfg, t) / rates[0] / t * 1e6
            rows.emit({"kind": "summary", "tokens": t, "softmax_us_per_token": share,
                       "cudnn_rate_us_per_token": ideal, "ratio": share / ideal})  # fmt: skip


if __name__ == "__main__":
    main()
