"""Benchmark: generation speed of minimax_jax beside transformers on the same weights.

    PYTHONUNBUFFERED=1 python3 experiments/bench_generate.py --out results.jsonl
    python3 experiments/bench_generate.py --tiny --hf_variants eager    # CPU smoke run

Config (the model-level anchor of experiments/RESULTS.md): a ~1.5B-parameter hybrid MoE, hidden
2048, 16 layers (two 7+1 blocks), 16 heads x 128 (RoPE over the whole head: transformers'
MiniMax ignores `partial_rotary_factor`, so only then both sides compute the same function), 4
kv heads, 8 experts x 1408, top-2, vocab 32000, bf16 random weights. Rows (JSON lines, with
device, versions, commit and command):

- decode (`phase: decode`): greedy decoding of --new_tokens after a --prompt-token prompt at
  batch 1 and 16. Timed on both sides: the loop of new - 1 steps only, after an untimed prefill
  (`setup`), >= 10 loops after warm-up, the L2 flushed before each; `timing_method` names the
  clock (--timing; default "wall" on both sides: the wall clock until the tokens are ready, since
  the profiler's per-launch overhead would slow the launch-bound eager anchor more than our one
  executable). Ours: the Engine's jitted decode loop per --variants. transformers (--hf_variants,
  `experiments/hf_anchor.py`): "eager" (its default MiniMaxCache, no compilation), "static" (a
  static cache), "compiled" (static cache + torch.compile reduce-overhead: its best
  configuration), "generate" (the whole generate call, prefill included: the earlier anchor).
- prefill of the same prompt (`phase: prefill`), both sides, timed the same way.
- the memory floor of a step: the bytes it must move (`roofline.decode_step_bytes`: non-expert
  weights, the expected distinct routed experts at this batch, the batch's embedding rows, the
  lm head, lightning states read and written, K/V over the mean context, logits) over the best
  device-to-device copy rate measured first in the same process (`copy_GBps`).
- long prefill (`phase: long_prefill`): time per token at 16K..128K tokens for the whole model
  and for an all-lightning model of the same width.

Checks before timing, at the benchmarked shapes: every decode variant's tokens (ours and
transformers') against our uncached forward over the prompt and the decoded tokens: the gap
between the forward's largest logit and the decoded token's logit at each step (`max_abs_err`,
within 2e-2 of the largest |logit| for `check_ok`; `argmax_mismatch_frac` counts steps where
the forward's argmax is another token); int8 variants also compare their prefill logits with the
dequantised model's (`q8_*`). Long prefills: last-token logits against the XLA-attention engine
in chunks of 2048 up to --check_max tokens. Rows go through `experiments.harness`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments import harness, roofline  # noqa: E402
from experiments.profiling import kernel_profile  # noqa: E402
from minimax_jax import MiniMaxForCausalLM, ModelConfig, save_pretrained  # noqa: E402
from minimax_jax.inference.engine import Engine, SamplingParams, sample_token  # noqa: E402
from minimax_jax.model import quant  # noqa: E402
from minimax_jax.model.decoder import RunOptions, forward  # noqa: E402

LIN, FULL = "linear_attention", "full_attention"


def bench_config(tiny: bool, layer_types=None) -> ModelConfig:
    if tiny:
        cfg = ModelConfig.preset("tiny-remote")
        cfg = cfg.replace(rotary_dim=cfg.head_dim)
        return cfg if layer_types is None else cfg.replace(layer_types=layer_types(cfg.num_layers))
    types_ = ([LIN] * 7 + [FULL]) * 2 if layer_types is None else layer_types(16)
    return ModelConfig(
        vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16, head_dim=128,
        num_kv_heads=4, intermediate_size=1408, num_experts=8, num_experts_per_tok=2,
        layer_types=tuple(types_), rope_theta=1e7, rotary_dim=128,
        max_position_embeddings=1 << 20, schema="native", slope_formula="native",
        architecture="MiniMaxForCausalLM",
    )  # fmt: skip


def copy_bandwidth() -> float:
    """Bytes/s of the best device-to-device copy (read + write) measured in this process."""
    return roofline.copy_bandwidth()["copy_GBps"] * 1e9


def decode_floor_bytes(cfg: ModelConfig, params, batch: int, context: float) -> dict:
    """The bytes one decode step must move, by part (`roofline.decode_step_bytes`)."""
    return roofline.decode_step_bytes(cfg, batch, context, params=params)


@functools.cache
def _forward_fn(cfg: ModelConfig):
    return jax.jit(lambda p, ids: forward(cfg, p, ids)[0])


def decode_check(cfg, params, ids: np.ndarray, tokens: np.ndarray, tol: float = 2e-2) -> dict:
    """Greedy tokens [B,new] decoded after ids [B,T] against the uncached forward over ids and
    tokens[:, :-1]: at each step the gap between the forward's largest logit and the decoded
    token's (0 when the decoder chose the forward's argmax); check_ok when every gap is within
    tol of the largest |logit| and the logits are finite."""
    tokens = np.asarray(tokens)
    full = np.concatenate([np.asarray(ids), tokens[:, :-1]], axis=1).astype(np.int32)
    logits = np.asarray(_forward_fn(cfg)(params, jnp.asarray(full)), np.float64)
    lg = logits[:, ids.shape[1] - 1 :]
    chosen = np.take_along_axis(lg, tokens[..., None].astype(np.int64), axis=-1)[..., 0]
    gap = lg.max(-1) - chosen
    scale = float(np.abs(lg).max())
    finite = bool(np.isfinite(lg).all())
    return {"max_abs_err": float(gap.max()), "max_rel_err": float(gap.max()) / scale,
            "argmax_mismatch_frac": float(np.mean(lg.argmax(-1) != tokens)),
            "check_ok": finite and float(gap.max()) <= tol * scale, "check_atol": tol,
            "check_atol_scaled": True,
            "check_ref": "uncached forward over prompt + decoded tokens: logit gap of each "
            "decoded token to the forward's max"}  # fmt: skip


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


def our_engine(cfg, params, batch, prompt, new, variant):
    """(engine, plan, params, q8 check fields) for one decode variant."""
    kw = parse_variant(variant)
    opts = RunOptions(moe_gather_rows=kw["moe_gather_rows"], matvec_impl=kw["matvec_impl"])
    extra = {}
    ids = prompt_ids(cfg, batch, prompt)
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
        extra.update(harness.check(last[0], last[1], atol=0.15, rtol=0.05, prefix="q8_"))
        del deq
    engine = Engine(
        cfg, params, prefill_chunk=min(prompt, 2048), options=opts, sync_every=kw["sync_every"]
    )
    return engine, engine.plan(batch, prompt, new), params, extra


def prompt_ids(cfg, batch: int, prompt: int) -> np.ndarray:
    """The benchmark prompt [B, T] (the same on both sides)."""
    return np.random.RandomState(batch).randint(0, cfg.vocab_size, (batch, prompt))


def bench_decode(cfg, model, batch, prompt, new, args, bw, variant="default"):
    """Rows (decode, prefill) of one of our variants; returns (decode row, tokens)."""
    engine, plan, params, extra = our_engine(cfg, model.pure_params(), batch, prompt, new,
                                             variant)  # fmt: skip
    ids = prompt_ids(cfg, batch, prompt)
    sp, eos = SamplingParams(), jnp.asarray([-1], jnp.int32)

    def setup():  # the prefill and the first token: not timed
        logits, cache = engine.prefill(ids, np.ones_like(ids), plan)
        return cache, sample_token(logits, jax.random.key(0), sp)

    def run(state):  # the decode loop alone (new - 1 steps; it donates the cache)
        cache, first = state
        return engine._loop(engine.params, cache, first, jax.random.key(1), new, sp, eos)[0]

    tokens = np.asarray(run(setup()))  # compiles; the checked output
    checked = decode_check(cfg, params, ids, tokens)
    timing = harness.measure(run, setup=setup, reps=args.reps, warmup=1, method=args.timing)
    step = timing.median / (new - 1)
    floor = decode_floor_bytes(cfg, params, batch, prompt + new / 2)
    if args.profile:  # kernel time of one decode loop (new - 1 steps), per op
        starts = [setup() for _ in range(2)]  # the loop donates its cache: one per call
        extra["profile"] = kernel_profile(lambda: run(starts.pop()).block_until_ready(),
                                          reps=2, top=40)  # fmt: skip
    pre = harness.measure(lambda _: engine.prefill(ids, np.ones_like(ids), plan)[0],
                          reps=args.reps, method=args.timing)  # fmt: skip
    common = {"impl": "minimax_jax", "variant": variant, "batch": batch, "prompt": prompt,
              "new_tokens": new}  # fmt: skip
    row = {**common, "phase": "decode", "tokens_per_s": batch / step, "step_ms": step * 1e3,
           "floor_bytes": floor, "floor_ms": floor["total"] / bw * 1e3,
           "step_over_floor": step / (floor["total"] / bw), **timing.row_ms("loop_ms"),
           **checked, **extra}  # fmt: skip
    prefill_row = {
        **common,
        "phase": "prefill",
        **pre.row_ms(),
        **harness.no_check("the decode row checks this prefill's tokens"),
    }
    return row, prefill_row, tokens


def bench_hf(cfg, model, batch, prompt, new, args, variant, bw):
    """Rows (decode, prefill) of transformers' MiniMaxForCausalLM in one variant
    (`hf_anchor.Decoder`) on our weights and prompt."""
    import torch

    from experiments import hf_anchor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    common = {"impl": "transformers", "variant": variant, "batch": batch, "prompt": prompt,
              "new_tokens": new, "hf_dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
    try:
        with tempfile.TemporaryDirectory() as d:
            save_pretrained(model, d, schema="native")
            ref = hf_anchor.load(d, device, dtype, experts=args.hf_experts)
        ids_np = prompt_ids(cfg, batch, prompt)
        ids = torch.as_tensor(ids_np, device=device)
        dec = hf_anchor.Decoder(ref, variant, batch, prompt, new, args.hf_compile_backend)
        common |= {"experts_implementation": ref.config._experts_implementation,
                   "cache": type(dec.cache).__name__ if dec.cache is not None else "MiniMaxCache",
                   "torch_compile": "reduce-overhead" if variant == "compiled"
                   and args.hf_compile_backend == "inductor" else None}  # fmt: skip
        tokens = dec.decode(dec.prefill(ids)).cpu().numpy()  # compiles; the checked output
        checked = decode_check(cfg, model.pure_params(), ids_np, tokens)
        timing = harness.time_torch(dec.decode, setup=lambda: dec.prefill(ids), reps=args.reps,
                                    warmup=2, method=args.timing)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a variant that fails is a row, not the end
        return [{**common, "phase": "decode", "error": f"{type(e).__name__}: {str(e)[:500]}"}]
    steps = new if variant == "generate" else new - 1
    step = timing.median / steps
    rows = [
        {
            **common,
            "phase": "decode",
            "tokens_per_s": batch / step,
            "step_ms": step * 1e3,
            "includes_prefill": variant == "generate",
            **timing.row_ms("loop_ms"),
            **checked,
        }
    ]
    if variant != "generate":
        pre = harness.time_torch(lambda _: dec.prefill(ids), reps=args.reps, method=args.timing)
        rows.append(
            {
                **common,
                "phase": "prefill",
                **pre.row_ms(),
                **harness.no_check("the decode row checks this prefill's tokens"),
            }
        )
    return rows


def free_torch() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_prefill(cfg, model, length, args, label):
    """One long prefill (batch 1, chunks of --chunk): checked, then timed per token."""
    params = model.pure_params()
    engine = Engine(cfg, params, prefill_chunk=args.chunk)
    ids = np.random.RandomState(length).randint(0, cfg.vocab_size, (1, length))
    plan = engine.plan(1, length, 1)

    def run(_):
        return engine.prefill(ids, np.ones_like(ids), plan)[0]

    logits = run(None)
    if length <= args.check_max:
        ref_engine = Engine(cfg, params, prefill_chunk=min(2048, length),
                            options=RunOptions(attention_impl="xla"))  # fmt: skip
        ref = ref_engine.prefill(ids, np.ones_like(ids), ref_engine.plan(1, length, 1))[0]
        checked = harness.check(np.asarray(logits, np.float32), np.asarray(ref, np.float32),
                                atol=0.15, rtol=0.05)  # fmt: skip
        del ref_engine, ref
    else:
        checked = harness.no_check(f"above --check_max {args.check_max}: the XLA reference "
                                   "materialises [N, chunk, T] scores")  # fmt: skip
    timing = harness.measure(run, reps=args.slow_reps, warmup=1, method=args.timing)
    return {"impl": f"minimax_jax.prefill[{label}]", "phase": "long_prefill", "batch": 1,
            "tokens": length, "chunk": args.chunk, **timing.row_ms(),
            "us_per_token": timing.median / length * 1e6, **checked}  # fmt: skip


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--reps", type=int, default=harness.DEFAULT_REPS, help="timed decode loops")
    ap.add_argument("--slow_reps", type=int, default=3, help="timed calls of the long prefills")
    ap.add_argument("--tiny", action="store_true", help="tiny preset (CPU smoke run)")
    ap.add_argument("--no_hf", action="store_true", help="skip transformers")
    ap.add_argument("--no_ours", action="store_true", help="skip our decode rows")
    ap.add_argument(
        "--hf_variants",
        default="eager,compiled",
        help="transformers variants: eager, static, compiled, generate",
    )
    ap.add_argument(
        "--hf_experts",
        default=None,
        help="transformers experts_implementation (default: its own choice)",
    )
    ap.add_argument(
        "--hf_compile_backend",
        default="inductor",
        help="torch.compile backend of the compiled variant (tests: eager)",
    )
    ap.add_argument(
        "--timing",
        default="wall",
        choices=["wall", "profiler", "auto"],
        help="clock of the decode loops and prefills, the same on both sides",
    )
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--prefill", default="16384,32768,65536,131072")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument(
        "--check_max",
        type=int,
        default=16384,
        help="check long prefills against the XLA engine up to this length",
    )
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
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.tiny:
        args.prefill, args.new_tokens, args.chunk = "256,512", 16, 128
        args.prompt = min(args.prompt, 32)
    cfg = bench_config(args.tiny)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16  # tiny: fp32, to compare with torch CPU
    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=dtype)
    bw = copy_bandwidth()
    rows = harness.Rows(args.out, bench="generate", dtype=jnp.dtype(dtype).name,
                        params=cfg.param_count(), copy_GBps=bw / 1e9,
                        **roofline.peak_fields(jax.devices()[0].device_kind))  # fmt: skip
    for b in map(int, filter(None, args.batches.split(","))):
        for v in [] if args.no_ours else args.variants.split(","):
            only, _, v = v.rpartition(":")  # "16:gather32": batch 16 only
            if only and int(only) != b:
                continue
            row, prefill_row, _ = bench_decode(cfg, model, b, args.prompt, args.new_tokens,
                                               args, bw, v)  # fmt: skip
            rows.emit(row)
            rows.emit(prefill_row)
        for v in [] if args.no_hf else filter(None, args.hf_variants.split(",")):
            for r in bench_hf(cfg, model, b, args.prompt, args.new_tokens, args, v, bw):
                rows.emit(r)
            free_torch()
    lin_cfg = bench_config(args.tiny, layer_types=lambda n: [LIN] * n)
    lin_model = MiniMaxForCausalLM(lin_cfg, rngs=nnx.Rngs(0), param_dtype=dtype)
    for t in map(int, filter(None, args.prefill.split(","))):
        if t <= args.hybrid_max:
            rows.emit(bench_prefill(cfg, model, t, args, "hybrid"))
        rows.emit(bench_prefill(lin_cfg, lin_model, t, args, "lightning_only"))


if __name__ == "__main__":
    main()
