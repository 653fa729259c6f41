"""Benchmark: generation speed of minimax_jax beside transformers' `generate` on the same weights.

    PYTHONUNBUFFERED=1 python3 experiments/bench_generate.py --out results.jsonl
    python3 experiments/bench_generate.py --tiny --no_hf    # CPU smoke run of the script

Config (the model-level anchor of experiments/RESULTS.md): a ~1.5B-parameter hybrid MoE, hidden
2048, 16 layers (two 7+1 blocks), 16 heads x 128, 4 kv heads, 8 experts x 1408, top-2, vocab
32000, bf16 random weights. Rows (JSON lines, with device and versions):
- decode: tokens/s at batch 1 and 16 (median of timed jitted decode loops after warm-up), the step
  time against its memory floor (weights read + lightning states read/written + KV read, over
  the copy bandwidth measured in the same run), and transformers' `generate` on the same weights;
- prefill: time per token at 16K..128K tokens for the whole model and for an all-lightning model
  of the same width (the difference is the softmax layers' share).
Every decode variant's greedy tokens are checked against the first variant's of the same batch
(`check_ok`, `mismatch_frac`: the fraction of tokens that differ); timings carry their spread.
Rows go through `experiments.harness`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import harness  # noqa: E402
from experiments.profiling import kernel_profile  # noqa: E402
from minimax_jax import MiniMaxForCausalLM, ModelConfig, save_pretrained  # noqa: E402
from minimax_jax.inference.engine import Engine, SamplingParams, sample_token  # noqa: E402
from minimax_jax.model import quant  # noqa: E402
from minimax_jax.model.decoder import RunOptions  # noqa: E402

LIN, FULL = "linear_attention", "full_attention"


def bench_config(tiny: bool, layer_types=None) -> ModelConfig:
    if tiny:
        cfg = ModelConfig.preset("tiny-remote")
        return cfg if layer_types is None else cfg.replace(layer_types=layer_types(cfg.num_layers))
    types_ = ([LIN] * 7 + [FULL]) * 2 if layer_types is None else layer_types(16)
    return ModelConfig(
        vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16, head_dim=128,
        num_kv_heads=4, intermediate_size=1408, num_experts=8, num_experts_per_tok=2,
        layer_types=tuple(types_), rope_theta=1e7, rotary_dim=64, max_position_embeddings=1 << 20,
        schema="native", slope_formula="native", architecture="MiniMaxForCausalLM",
    )  # fmt: skip


def copy_bandwidth() -> float:
    x = jnp.ones((1 << 28,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    sec = harness.time_device(f, x, warmup=1).median
    return 2 * x.size * 2 / sec


def decode_floor_bytes(cfg: ModelConfig, params, batch: int, kv_len: int) -> int:
    """Bytes one decode step must read: non-expert weights, the experts the batch can touch,
    lightning states (read + write) and the softmax K/V up to kv_len."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    expert = sum(
        x.nbytes for p, x in leaves if any(getattr(k, "key", "") in ("wi", "wo") for k in p)
    )
    other = sum(x.nbytes for _, x in leaves) - expert
    touched = min(cfg.num_experts, batch * cfg.num_experts_per_tok) / cfg.num_experts
    n_lin = sum(t == LIN for t in cfg.layer_types)
    states = 2 * n_lin * batch * cfg.num_heads * cfg.head_dim**2 * 4
    kv = (cfg.num_layers - n_lin) * 2 * batch * kv_len * cfg.num_kv_heads * cfg.head_dim * 2
    return int(other + expert * touched + states + kv)


def parse_variant(name: str) -> dict:
    """'default' (the Engine's defaults) or '+'-joined overrides: syncN (Engine sync_every=N),
    gatherN (RunOptions moe_gather_rows=N; gather0 = grouped matmuls only), mvxla (one-row
    projections and the gathered MoE on XLA instead of the pallas_kernels.matvec kernel), q8e /
    q8 (the same bf16 weights quantised in memory to experts_int8 / int8)."""
    kw = {"sync_every": 16, "moe_gather_rows": None, "matvec_impl": "auto", "quantize": None}
    for tok in filter(None, name.split("+")):
        if tok == "default":
            continue
        if tok in ("q8e", "q8"):
            kw["quantize"] = "experts_int8" if tok == "q8e" else "int8"
            continue
        if tok.startswith("sync"):
            kw["sync_every"] = int(tok[4:])
        elif tok.startswith("gather"):
            kw["moe_gather_rows"] = int(tok[6:])
        elif tok == "mvxla":
            kw["matvec_impl"] = "xla"
        else:
            raise SystemExit(f"unknown variant token {tok!r} in {name!r}")
    return kw


def bench_decode(cfg, model, batch, prompt, new, reps, bw, variant="default", profile=False):
    params = model.pure_params()
    kw = parse_variant(variant)
    opts = RunOptions(moe_gather_rows=kw["moe_gather_rows"], matvec_impl=kw["matvec_impl"])
    extra = {}
    ids = np.random.RandomState(batch).randint(0, cfg.vocab_size, (batch, prompt))
    if kw["quantize"]:
        params = quant.quantize_params(cfg, params, kw["quantize"])
        # the int8 model against the same model holding the dequantised weights (bf16), on the
        # benchmarked prompt: the last position's logits (the first decoded token's)
        deq = quant.dequantize_tree(params, jnp.bfloat16)
        last = []
        for p in (params, deq):
            eng = Engine(cfg, p, prefill_chunk=min(prompt, 2048), options=opts)
            logits, _ = eng.prefill(ids, np.ones_like(ids), eng.plan(batch, prompt, new))
            last.append(np.asarray(logits, np.float32))
            del eng
        extra["quantize"] = kw["quantize"]
        extra.update(harness.check(last[0], last[1], atol=0.15, rtol=0.05))
        del deq
    engine = Engine(
        cfg, params, prefill_chunk=min(prompt, 2048), options=opts, sync_every=kw["sync_every"]
    )
    plan = engine.plan(batch, prompt, new)
    sp, eos = SamplingParams(), jnp.asarray([-1], jnp.int32)

    def run():  # the decode loop alone: prefill is not timed
        logits, cache = engine.prefill(ids, np.ones_like(ids), plan)
        first = jax.block_until_ready(sample_token(logits, jax.random.key(0), sp))
        return harness.device_seconds(
            engine._loop, engine.params, cache, first, jax.random.key(1), new, sp, eos
        )

    tokens, _ = run()
    timing = harness.Timing.of([run()[1] for _ in range(reps)])
    step = timing.median / (new - 1)
    floor = decode_floor_bytes(cfg, params, batch, prompt + new) / bw
    if profile:  # kernel time of one decode loop (new - 1 steps), per op
        starts = []  # the loop donates its cache: one prefilled cache per profiled call
        for _ in range(2):
            logits, cache = engine.prefill(ids, np.ones_like(ids), plan)
            starts.append((cache, sample_token(logits, jax.random.key(0), sp)))
        jax.block_until_ready(starts)

        def loop():
            cache, first = starts.pop()
            out, _ = engine._loop(engine.params, cache, first, jax.random.key(1), new, sp, eos)
            out.block_until_ready()

        extra["profile"] = kernel_profile(loop, reps=2, top=40)
    row = {"impl": "minimax_jax", "variant": variant, "batch": batch, "prompt": prompt,
           "new_tokens": new, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "tokens_per_s": batch / step, "step_ms": step * 1e3,
           "floor_ms": floor * 1e3, "step_over_floor": step / floor,
           **timing.row_ms("loop_ms")}  # fmt: skip
    return extra | row, np.asarray(tokens[0])


def bench_hf(cfg, model, batch, prompt, new, reps):
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d, schema="native")
        ref = transformers.MiniMaxForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)

    def run():
        with torch.no_grad():
            ref.generate(ids, **kw)
        torch.cuda.synchronize()

    timing = harness.timed_stats(run, reps, warmup=1)
    sec = timing.median
    return {"impl": "transformers.generate", "batch": batch, "prompt": prompt,
            "new_tokens": new, "tokens_per_s": batch * new / sec,
            "step_ms": sec / new * 1e3, **timing.row_ms("generate_ms")}  # fmt: skip


def bench_prefill(cfg, model, length, chunk, label, reps):
    engine = Engine(cfg, model.pure_params(), prefill_chunk=chunk)
    ids = np.random.RandomState(length).randint(0, cfg.vocab_size, (1, length))
    plan = engine.plan(1, length, 1)

    def run():
        logits, _ = engine.prefill(ids, np.ones_like(ids), plan)
        logits.block_until_ready()

    timing = harness.timed_stats(run, reps, warmup=1)
    sec = timing.median
    return {"impl": f"minimax_jax.prefill[{label}]", "batch": 1, "tokens": length,
            "chunk": chunk, **timing.row_ms(), "us_per_token": sec / length * 1e6}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--reps", type=int, default=harness.DEFAULT_REPS, help="timed decode loops")
    ap.add_argument(
        "--slow_reps",
        type=int,
        default=3,
        help="timed calls of the slow parts (transformers.generate, long prefills)",
    )
    ap.add_argument("--tiny", action="store_true", help="tiny preset (CPU smoke run)")
    ap.add_argument("--no_hf", action="store_true", help="skip transformers")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--prefill", default="16384,32768,65536,131072")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument(
        "--hybrid_max",
        type=int,
        default=65536,
        help="prefill the hybrid model only up to this length (its softmax layers "
        "materialise [N,chunk,T] scores); the lightning-only model runs every length",
    )
    ap.add_argument(
        "--variants",
        default="default",
        help="decode variants, comma-separated "
        "(see parse_variant), e.g. default,sync1+gather0,16:gather32 (B: that batch only)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="add a kernel profile of one decode loop to each decode row",
    )
    args = ap.parse_args()
    if args.tiny:
        args.prefill, args.new_tokens, args.chunk = "256,512", 16, 128
    cfg = bench_config(args.tiny)
    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    bw = copy_bandwidth()
    rows = harness.Rows(args.out, bench="generate", dtype="bfloat16", params=cfg.param_count(),
                        copy_GBps=bw / 1e9)  # fmt: skip
    for b in map(int, filter(None, args.batches.split(","))):
        ref = None  # the first variant's greedy tokens at this batch
        for v in args.variants.split(","):
            only, _, v = v.rpartition(":")  # "16:gather32": batch 16 only
            if only and int(only) != b:
                continue
            row, tokens = bench_decode(cfg, model, b, args.prompt, args.new_tokens, args.reps, bw,
                                       v, profile=args.profile)  # fmt: skip
            if ref is None:
                ref = tokens
            elif row.get("quantize"):  # int8 greedy tokens may differ from bf16's: a figure
                row["token_mismatch_vs_first"] = float(np.mean(tokens != ref))
            else:
                row.update(harness.check(tokens, ref, atol=0, rtol=0))
            rows.emit(row)
        if not args.no_hf:
            rows.emit(bench_hf(cfg, model, b, args.prompt, args.new_tokens, args.slow_reps))
    lin_cfg = bench_config(args.tiny, layer_types=lambda n: [LIN] * n)
    lin_model = MiniMaxForCausalLM(lin_cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    for t in map(int, filter(None, args.prefill.split(","))):
        if t <= args.hybrid_max:
            rows.emit(bench_prefill(cfg, model, t, args.chunk, "hybrid", args.slow_reps))
        rows.emit(bench_prefill(lin_cfg, lin_model, t, args.chunk, "lightning_only",
                                args.slow_reps))  # fmt: skip


if __name__ == "__main__":
    main()
