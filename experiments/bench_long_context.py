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
  prefill    per length and model: seconds (wall clock of the whole chunked prefill, median
             of --reps after one warm-up; lengths whose first call takes over --slow_s run once
             more only, `few_reps`), us per token, the planner's weights / cache / activations,
             the peak bytes in use after the row and the activation peak = peak - weights -
             cache. Each row's last-token logits must be finite (`logits_finite`); the
             `check` row compares the same prefill path with the XLA reference.
  summary    per length: the softmax layers' share (us/token), their causal attention FLOPs at
             the measured cuDNN rate (us/token), and the ratio of the two.

Memory: with --isolate every row (rate, check, each length x model) runs in a process of its own
(`harness.run_isolated`): its peak is its own (`isolated: true`, `peak_is_own: true`). Without
it the rows share one process, whose peak is cumulative; a row's activation peak is then given
only when the row raised the peak (`peak_is_own`), else null.

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
    return harness.memory_peak().get("peak_bytes")


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
    timing = harness.time_device(fn, q, k, v, reps=reps, warmup=2)  # device time per call
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


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--tiny", action="store_true", help="tiny preset (CPU smoke run)")
    ap.add_argument(
        "--lengths",
        default=None,
        help="prompt lengths (default 32768,131072,524288,1048576; --tiny 256,512)",
    )
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
    ap.add_argument("--no_rate", action="store_true", help="skip the cuDNN rate probe")
    ap.add_argument(
        "--isolate",
        action="store_true",
        help="run every row in a process of its own (each peak its own)",
    )
    ap.add_argument(
        "--row", default=None, help="(internal, --isolate) run one row: rate, check or LENGTH:MODEL"
    )
    args = ap.parse_args()
    if args.tiny:
        args.lengths = args.lengths if args.lengths is not None else "256,512"
        args.chunk, args.rate_len, args.check_len, args.check_chunk = 128, 256, 256, 64
    elif args.lengths is None:
        args.lengths = "32768,131072,524288,1048576"
    return args


def configs(tiny: bool):
    cfg = bench_config(tiny)
    lin_cfg = bench_config(tiny, layer_types=lambda n: [LIN] * n)
    if tiny:
        cfg = cfg.replace(max_position_embeddings=1 << 20)
        lin_cfg = lin_cfg.replace(max_position_embeddings=1 << 20)
    return {"hybrid": cfg, "lightning_only": lin_cfg}


def check_row(cfg, args) -> dict:
    """The --impl prefill's last-token logits against the "xla" reference at --check_len."""
    params = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16).pure_params()
    engine = Engine(cfg, params, prefill_chunk=args.chunk,
                    options=RunOptions(attention_impl=args.impl))  # fmt: skip
    ref_engine = Engine(cfg, params, prefill_chunk=args.check_chunk,
                        options=RunOptions(attention_impl="xla"))  # fmt: skip
    run, _ = prefill_fn(engine, args.check_len)
    ref, _ = prefill_fn(ref_engine, args.check_len)
    # bf16 activations through 16 layers, two chunkings: compare like the model checks
    return {"kind": "check", "impl": args.impl, "tokens": args.check_len,
            **harness.check(run().astype(jnp.float32), ref().astype(jnp.float32),
                            atol=0.15, rtol=0.05)}  # fmt: skip


def prefill_row(cfg, label: str, t: int, args, engine=None) -> dict:
    """One length of one model: the first (compiling) call, then the timed prefills."""
    if engine is None:
        params = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
        impl = args.impl if label == "hybrid" else "auto"
        engine = Engine(cfg, params.pure_params(), prefill_chunk=args.chunk,
                        options=RunOptions(attention_impl=impl))  # fmt: skip
    run, plan = prefill_fn(engine, t)
    before = peak_bytes()
    t0 = time.perf_counter()
    logits = run()  # compiles once per chunk shape, then runs every chunk
    first = time.perf_counter() - t0
    finite = bool(np.isfinite(np.asarray(logits, np.float32)).all())
    reps = 1 if first > args.slow_s else args.reps
    timing = harness.measure(lambda _: run(), reps=reps, warmup=0, method="wall")
    peak = peak_bytes()
    own = args.row is not None or (peak is not None and (before is None or peak > before))
    return {"kind": "prefill", "model": label,
            "impl": args.impl if label == "hybrid" else "auto", "tokens": t,
            "chunk": args.chunk, "first_call_s": first, **timing.row_ms(),
            "us_per_token": timing.median / t * 1e6, "logits_finite": finite,
            **harness.no_check("the check row compares this prefill path with XLA"),
            "plan_weights": plan["weights"], "plan_cache": plan["cache"],
            "plan_activations": plan["activations"], "peak_bytes": peak, "peak_is_own": own,
            "activation_peak": None if peak is None or not own
            else peak - plan["weights"] - plan["cache"]}  # fmt: skip


def one_row(args) -> None:
    """--row: a single row in this process (a child of --isolate)."""
    cfgs = configs(args.tiny)
    rows = harness.Rows(args.out, bench="long_context", dtype="bfloat16",
                        params=cfgs["hybrid"].param_count())  # fmt: skip
    if args.row == "rate":
        rows.emit(cudnn_rate(cfgs["hybrid"], args.rate_len, reps=harness.DEFAULT_REPS))
    elif args.row == "check":
        rows.emit(check_row(cfgs["hybrid"], args))
    else:
        t, label = args.row.split(":")
        rows.emit(prefill_row(cfgs[label], label, int(t), args))


class Plan:
    """The rows in order, their time estimates and the summaries."""

    def __init__(self, args, emit):
        self.args, self.emit, self.start = args, emit, time.perf_counter()
        self.last = None  # (tokens, hybrid s, lightning-only s or None) of the last length
        self.rates: list[float] = []

    def fits(self, t: int) -> bool:
        """False (and a skipped row) when the length's estimate would pass --budget_s."""
        if self.last is None:
            return True
        a = self.args
        r = t / self.last[0]  # the lightning part scales linearly, the softmax part quadratically
        lin_s = self.last[2] if self.last[2] is not None else 0.0
        one = lin_s * r + (self.last[1] - lin_s) * r * r
        estimate = one * (1 + (1 if one > a.slow_s else a.reps))
        estimate += lin_s * r * (1 + (1 if lin_s * r > a.slow_s else a.reps))
        spent = time.perf_counter() - self.start
        if spent + estimate <= a.budget_s:
            return True
        self.emit({"kind": "skipped", "tokens": t, "estimate_s": estimate, "spent_s": spent,
                   "budget_s": a.budget_s})  # fmt: skip
        return False

    def done(self, t: int, result: dict, cfg) -> None:
        hyb, lin = result.get("hybrid"), result.get("lightning_only")
        if hyb is not None and "ms" in hyb:
            self.last = (t, hyb["ms"] / 1e3, lin["ms"] / 1e3 if lin and "ms" in lin else None)
        if hyb and lin and "us_per_token" in hyb and "us_per_token" in lin and self.rates:
            share = hyb["us_per_token"] - lin["us_per_token"]
            layers = sum(1 for x in cfg.layer_types if x != LIN)
            ideal = layers * causal_flops(cfg, t) / self.rates[0] / t * 1e6
            self.emit({"kind": "summary", "tokens": t, "softmax_us_per_token": share,
                       "cudnn_rate_us_per_token": ideal, "ratio": share / ideal})  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.row is not None:
        return one_row(args)
    cfgs = configs(args.tiny)
    cfg = cfgs["hybrid"]
    rows = harness.Rows(args.out, bench="long_context", dtype="bfloat16",
                        params=cfg.param_count())  # fmt: skip
    plan = Plan(args, rows.emit)
    argv = [a for a in sys.argv if a not in ("--isolate",)]
    argv = [os.path.relpath(argv[0], harness.REPO), *_without_out(argv[1:])]

    def run(job: str, local):  # one row, in a child process with --isolate
        if not args.isolate:
            out = local()
            rows.emit(out)
            return [out]
        left = args.budget_s - (time.perf_counter() - plan.start)
        got, err = harness.run_isolated([*argv, "--row", job], timeout=max(left, 30))
        for r in got:
            rows.append(r)
        if err:
            rows.emit({"kind": "error", "row": job, "error": err})
        return got

    if jax.default_backend() == "gpu" and not args.no_rate:
        got = run("rate", lambda: cudnn_rate(cfg, args.rate_len, reps=harness.DEFAULT_REPS))
        plan.rates += [r["tflops"] * 1e12 for r in got if r.get("tflops")]
    if not args.no_check:
        run("check", lambda: check_row(cfg, args))
    engines = {}
    labels = ["hybrid"] + ([] if args.no_lightning_only else ["lightning_only"])
    for t in map(int, filter(None, args.lengths.split(","))):
        if not plan.fits(t):
            continue
        result = {}
        for label in labels:
            if not args.isolate and label not in engines:
                params = MiniMaxForCausalLM(cfgs[label], rngs=nnx.Rngs(0),
                                            param_dtype=jnp.bfloat16).pure_params()  # fmt: skip
                impl = args.impl if label == "hybrid" else "auto"
                engines[label] = Engine(cfgs[label], params, prefill_chunk=args.chunk,
                                        options=RunOptions(attention_impl=impl))  # fmt: skip
            got = run(f"{t}:{label}",
                      lambda label=label, t=t: prefill_row(cfgs[label], label, t, args,
                                                           engines.get(label)))  # fmt: skip
            result[label] = got[0] if got else None
        plan.done(t, result, cfg)


def _without_out(argv: list[str]) -> list[str]:
    """argv without --out PATH / --out=PATH (a child writes to its own file)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out


if __name__ == "__main__":
    main()
