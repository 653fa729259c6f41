"""Probe: batched GEMM over capacity-padded expert groups vs the dense matmul and the Mosaic GPU
grouped kernels, at MiniMax expert width (the measurements behind the "padded" expert FFN).

    python3 experiments/probe_bmm.py --out probe_bmm.jsonl      # GPU (`run.py moe-probe`)

Rows through `experiments.harness` (device time per call). Checks before timing: the Mosaic
`gmm` on sampled rows of every group (`bench_moe.gmm_check`), `tgmm` and every batched GEMM on
its first and last expert against fp32-accumulated products; the dense rows are the baselines.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import harness  # noqa: E402
from experiments.bench_moe import gmm_check  # noqa: E402
from pallas_kernels.moe import gpu as mgpu  # noqa: E402


def expert_check(out, a, b, spec: str) -> dict:
    """out [E,...] on its first and last expert against einsum(spec) of a[e], b[e] in fp32."""
    got, ref = [], []
    for e in (0, out.shape[0] - 1):
        ref.append(jnp.einsum(spec, a[e], b[e], preferred_element_type=jnp.float32))
        got.append(out[e].astype(jnp.float32))
    return harness.check(got, ref, atol=2e-2, rtol=2e-2, scaled=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="append JSON lines here")
    args = ap.parse_args()
    e, d, n = 32, 6144, 18432
    key = jax.random.PRNGKey(0)
    rows = harness.Rows(args.out, bench="probe_bmm", E=e, D=d, N=n, dtype="bfloat16")

    def run(fn, *a):
        return harness.time_device(jax.jit(fn), *a)

    def rec(t: harness.Timing, flops: float, key="tflops", **r):
        rows.emit({**r, **t.row_ms(), key: flops / t.median / 1e12})

    baseline = harness.no_check("baseline")

    for tokens in (4096, 65536):
        m = tokens * 2
        mean = m // e
        flops = 2 * m * d * n
        x = jax.random.normal(key, (m, d), jnp.bfloat16)
        w = jax.random.normal(key, (e, d, n), jnp.bfloat16) * 0.02
        dy = jax.random.normal(key, (m, n), jnp.bfloat16)
        rec(run(lambda x, w: x @ w[0], x, w), flops, tokens=tokens, what="dense", **baseline)
        rec(run(lambda x, dy: x.T @ dy, x, dy), flops, tokens=tokens, what="dense_dw", **baseline)
        gs = jnp.full((e,), mean, jnp.int32)
        gmm_out = jax.jit(mgpu.gmm)(x, w, gs)
        checked = gmm_check(gmm_out, x, w, gs)
        rec(run(mgpu.gmm, x, w, gs), flops, tokens=tokens, what="mosaic_gmm", **checked)
        checked = expert_check(jax.jit(mgpu.tgmm)(x, dy, gs), x.reshape(e, mean, d),
                               dy.reshape(e, mean, n), "ck,cn->kn")  # fmt: skip
        rec(run(mgpu.tgmm, x, dy, gs), flops, tokens=tokens, what="mosaic_tgmm", **checked)
        for r in (1.0, 1.0625, 1.125, 1.25, 1.5):
            for mult in (32, 64, 128):
                c = -(-int(mean * r) // mult) * mult
                xp = jax.random.normal(key, (e, c, d), jnp.bfloat16)
                dp = jax.random.normal(key, (e, c, n), jnp.bfloat16)
                fwd = (lambda xp, w: jnp.einsum("eck,ekn->ecn", xp, w), w, "ck,kn->cn")
                dw = (lambda xp, dp: jnp.einsum("eck,ecn->ekn", xp, dp), dp, "ck,cn->kn")
                for what, (fn, other, spec) in (("bmm", fwd), ("bmm_dw", dw)):
                    checked = expert_check(jax.jit(fn)(xp, other), xp, other, spec)
                    rec(run(fn, xp, other), flops, "tflops_useful", tokens=tokens,
                        what=what, ratio=r, mult=mult, C=c, **checked)  # fmt: skip
                if tokens > 4096:
                    break


if __name__ == "__main__":
    main()
