"""Benchmark: the softmax layers' attention core, "xla" (materialised fp32 logits) vs "cudnn".

Run on a GPU (or `python experiments/run.py attention`)::

    PYTHONUNBUFFERED=1 python3 experiments/bench_attention.py --out results.jsonl

Times `minimax_jax.model.attention.attention` (what the model's softmax layers call, after the
projections and RoPE) forward and forward+backward, bf16, for:
- the anchor shape (causal, B2 N16 H128, T 8K and 32K; an earlier measurement of the same
  `jax.nn.dot_product_attention(implementation="cudnn")`, not a row here: 1.46 / 15.3 ms forward);
- MiniMax-Text-01's softmax layers (64 query heads, 8 kv heads, H128) at 16K tokens per step as
  4 x 4K and 2 x 8K rows, plain causal and packed (documents of ~1K tokens: the mask goes in as
  a bias).
One JSON line per (shape, impl, pass) through `experiments.harness`: device time per call
(median with its spread, L2 flushed), or the error (e.g. "xla" out of memory). The forward +
backward returns the forward output beside the gradients of a random cotangent
(`harness.fwd_bwd`), so no part of the forward can be dropped.

Checks before timing: "cudnn" forward and gradients against "xla" at the same shape where
"xla" runs (T <= --xla_max_t); above that, against "xla" on the first --xla_max_t positions
(causal and document masks: a position's output depends only on the positions before it, so the
prefix of the full output is the prefix problem's output); the "xla" rows are the reference.
`--small`: tiny shapes for a CPU smoke run (with `--impls blockwise`: "cudnn" needs a GPU).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import harness  # noqa: E402
from minimax_jax.model.attention import Visibility, attention  # noqa: E402

# (B, T, N, K, H, packed doc length or None)
SHAPES = [
    (2, 8192, 16, 16, 128, None),
    (2, 32768, 16, 16, 128, None),
    (4, 4096, 64, 8, 128, None),
    (4, 4096, 64, 8, 128, 1024),
    (2, 8192, 64, 8, 128, None),
    (2, 8192, 64, 8, 128, 1024),
]


SMALL_SHAPES = [(1, 64, 4, 2, 32, None), (1, 64, 4, 2, 32, 16)]


def inputs(b, t, n, kh, h, doc):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (b, t, kh, h), jnp.bfloat16) for kk in keys[1:3])
    dout = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = None if doc is None else idx // doc
    vis = Visibility(idx, idx, jnp.ones((b, t), bool), seg, seg)
    return (q, k, v, vis), dout


def case(h, doc, impl, mode, dout):
    """The jitted function of one row: forward, or (forward, grads of <fwd, dout>)."""
    causal = doc is None

    # the visibility is an argument: a closed-over [B,T,T] mask became a constant folded into
    # the program and the MiniMax-shape compile ran past its time cap
    def fwd(q, k, v, vis):
        return attention(q, k, v, vis, h**-0.5, impl, causal)

    if mode == "fwd":
        return jax.jit(fwd)
    return harness.fwd_bwd(fwd, dout, argnums=(0, 1, 2))


def prefix(args, dout, n):
    q, k, v, vis = args
    vis = Visibility(*(None if x is None else x[:, :n] for x in vis))
    return (q[:, :n], k[:, :n], v[:, :n], vis), dout[:, :n]


def reference(shape, mode, xla_max_t):
    """The "xla" output of this row's problem, or of its first xla_max_t positions."""
    b, t, n, kh, h, doc = shape
    args, dout = inputs(b, t, n, kh, h, doc)
    m = min(t, xla_max_t)
    args, dout = prefix(args, dout, m)
    return jax.block_until_ready(case(h, doc, "xla", mode, dout)(*args)), m


def checked(out, ref, m, mode) -> dict:
    """An output (forward, or forward and grads) against the reference on its first m
    positions (bf16 tier, relative to each tensor's largest |ref|)."""
    if mode == "fwd":
        out = out[:, :m]
    else:
        o, grads = out
        out = (o[:, :m], tuple(g[:, :m] for g in grads))
    tol = 2e-2 if mode == "fwd" else 5e-2
    return harness.check(out, ref, atol=tol, rtol=tol, scaled=True) | {"check_len": m}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--reps", type=int, default=harness.DEFAULT_REPS)
    ap.add_argument("--xla_max_t", type=int, default=8192, help="skip xla above this length")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument(
        "--impls",
        default="xla,cudnn",
        help="implementations after the xla reference: cudnn, blockwise",
    )
    args = ap.parse_args()
    rows = harness.Rows(args.out, bench="attention", dtype="bfloat16")
    for shape in SMALL_SHAPES if args.small else SHAPES:
        b, t, n, kh, h, doc = shape
        for mode in ("fwd", "fwd_bwd"):
            try:
                ref, m = reference(shape, mode, args.xla_max_t)
            except Exception as e:  # noqa: BLE001 - no reference: the rows say so
                ref, m = None, f"{type(e).__name__}: {str(e)[:200]}"
            for impl in ["xla", *(i for i in args.impls.split(",") if i and i != "xla")]:
                if impl == "xla" and t > args.xla_max_t:
                    continue
                row = {"B": b, "T": t, "N": n, "K": kh, "H": h, "doc_len": doc,
                       "impl": impl, "pass": mode}  # fmt: skip
                try:
                    fargs, dout = inputs(b, t, n, kh, h, doc)
                    fn = case(h, doc, impl, mode, dout)
                    if impl == "xla":
                        row.update(harness.no_check("the reference"))
                    elif ref is None:
                        row.update(harness.no_check(f"the xla reference failed: {m}"))
                    else:
                        row.update(checked(fn(*fargs), ref, m, mode))
                    row.update(harness.time_device(fn, *fargs, reps=args.reps).row_ms())
                except Exception as e:  # noqa: BLE001 - an OOM or unsupported shape is a row
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.emit(row)


if __name__ == "__main__":
    main()
