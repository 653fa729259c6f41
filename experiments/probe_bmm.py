"""Probe: batched GEMM over capacity-padded expert groups vs the dense matmul and the Mosaic GPU
grouped kernels, at MiniMax expert width (one-off measurements behind the "padded" backend)."""

import argparse
import json
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
from experiments.timing import timed  # noqa: E402
from pallas_kernels.moe import gpu as mgpu  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    e, d, n = 32, 6144, 18432
    key = jax.random.PRNGKey(0)
    rows = []

    def run(fn, *a, reps=10):
        f = jax.jit(fn)
        return timed(lambda: f(*a).block_until_ready(), reps)

    def rec(**r):
        r["device"] = jax.devices()[0].device_kind
        rows.append(r)
        print(json.dumps(r), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(r) + "\n")

    for tokens in (4096, 65536):
        m = tokens * 2
        mean = m // e
        x = jax.random.normal(key, (m, d), jnp.bfloat16)
        w = jax.random.normal(key, (e, d, n), jnp.bfloat16) * 0.02
        dy = jax.random.normal(key, (m, n), jnp.bfloat16)
        t = run(lambda x, w: x @ w[0], x, w)
        rec(tokens=tokens, what="dense", ms=t * 1e3, tflops=2 * m * d * n / t / 1e12)
        t = run(lambda x, dy: x.T @ dy, x, dy)
        rec(tokens=tokens, what="dense_dw", ms=t * 1e3, tflops=2 * m * d * n / t / 1e12)
        gs = jnp.full((e,), mean, jnp.int32)
        t = run(mgpu.gmm, x, w, gs)
        rec(tokens=tokens, what="mosaic_gmm", ms=t * 1e3, tflops=2 * m * d * n / t / 1e12)
        t = run(mgpu.tgmm, x, dy, gs, reps=5)
        rec(tokens=tokens, what="mosaic_tgmm", ms=t * 1e3, tflops=2 * m * d * n / t / 1e12)
        for r in (1.0, 1.0625, 1.125, 1.25, 1.5):
            for mult in (32, 64, 128):
                c = -(-int(mean * r) // mult) * mult
                xp = jax.random.normal(key, (e, c, d), jnp.bfloat16)
                dp = jax.random.normal(key, (e, c, n), jnp.bfloat16)
                fwd = (lambda xp, w: jnp.einsum("eck,ekn->ecn", xp, w), w, {})
                dw = (lambda xp, dp: jnp.einsum("eck,ecn->ekn", xp, dp), dp, {"reps": 5})
                for what, (fn, other, kw) in (("bmm", fwd), ("bmm_dw", dw)):
                    t = run(fn, xp, other, **kw)
                    rec(tokens=tokens, what=what, ratio=r, mult=mult, C=c, ms=t * 1e3,
                        tflops_useful=2 * m * d * n / t / 1e12)  # fmt: skip
                if tokens > 4096:
                    break


if __name__ == "__main__":
    main()
