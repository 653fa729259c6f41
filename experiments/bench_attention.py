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
One JSON line per (shape, impl, pass) through `experiments.harness`: median ms with its spread,
or the error (e.g. "xla" out of memory). Forward rows of "cudnn" carry the max error of its output
against "xla" at the same shape (when "xla" ran).
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
from minimax_jax.model.attention import attention, causal_padding_mask  # noqa: E402

# (B, T, N, K, H, packed doc length or None)
SHAPES = [
    (2, 8192, 16, 16, 128, None),
    (2, 32768, 16, 16, 128, None),
    (4, 4096, 64, 8, 128, None),
    (4, 4096, 64, 8, 128, 1024),
    (2, 8192, 64, 8, 128, None),
    (2, 8192, 64, 8, 128, 1024),
]


def case(b, t, n, kh, h, doc, impl, mode):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (b, t, kh, h), jnp.bfloat16) for kk in keys[1:3])
    idx = jnp.arange(t, dtype=jnp.int32)
    mask = causal_padding_mask(idx, idx, jnp.ones((b, t), bool))
    if doc is not None:
        seg = jnp.broadcast_to(idx // doc, (b, t))
        mask &= seg[:, :, None] == seg[:, None, :]
    causal = doc is None

    # the mask is an argument: closed over, XLA would fold a [B,T,T] constant into the program
    # and the MiniMax-shape compile ran past its time cap
    def fwd(q, k, v, mask):
        return attention(q, k, v, mask, h**-0.5, impl, causal)

    if mode == "fwd":
        fn = jax.jit(fwd)
    else:
        dout = jax.random.normal(keys[3], q.shape, jnp.bfloat16)

        def loss(q, k, v, mask):
            return jnp.sum(fwd(q, k, v, mask).astype(jnp.float32) * dout)

        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return fn, (q, k, v, mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--reps", type=int, default=harness.DEFAULT_REPS)
    ap.add_argument("--xla_max_t", type=int, default=8192, help="skip xla above this length")
    args = ap.parse_args()
    rows = harness.Rows(args.out, bench="attention", dtype="bfloat16")
    for b, t, n, kh, h, doc in SHAPES:
        ref = None  # the "xla" forward output of this shape, the reference of "cudnn"
        for impl in ("xla", "cudnn"):
            if impl == "xla" and t > args.xla_max_t:
                continue
            for mode in ("fwd", "fwd_bwd"):
                row = {"B": b, "T": t, "N": n, "K": kh, "H": h, "doc_len": doc,
                       "impl": impl, "pass": mode}  # fmt: skip
                try:
                    fn, fargs = case(b, t, n, kh, h, doc, impl, mode)
                    row.update(harness.time_device(fn, *fargs, reps=args.reps).row_ms())
                    if mode == "fwd" and impl == "xla":
                        ref = fn(*fargs)
                    elif mode == "fwd" and ref is not None:
                        row.update(harness.check(fn(*fargs), ref, atol=2e-2, rtol=2e-2))
                except Exception as e:  # noqa: BLE001 - an OOM or unsupported shape is a row
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.emit(row)


if __name__ == "__main__":
    main()
