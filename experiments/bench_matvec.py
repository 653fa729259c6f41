"""Benchmark: decode-sized matmuls (1 or 16 rows) written several ways, as XLA:GPU compiles them.

The decode profile (experiments/RESULTS.md, "Decode") showed XLA rewriting some 1-row dots into
an elementwise multiply that materialises a weight-sized product, then a reduce (e.g. a
[1,16,128,2048] bf16 temporary for a 2048x2048 projection, an fp32 [2,2048,2,1408] one for the
gathered-expert MoE), and copying each layer's slice of the stacked weights. This script times a
16-layer chain of each formulation and counts, in the optimised HLO, the loop fusions whose
output is at least as large as one weight and the cuBLAS / Triton GEMM calls:

    python3 experiments/bench_matvec.py --out results.jsonl      # GPU
    python3 experiments/bench_matvec.py --small                  # CPU smoke run

Every formulation's output (and every tiling of the sweep) is checked, before it is timed,
against the same chain computed in fp32 (`experiments.harness.check`, within 5e-2 of the
output's largest |value|); timings are device time per call (`harness.time_device`) with their
spread over the reps.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import harness  # noqa: E402
from pallas_kernels.matvec import gathered_matvec  # noqa: E402
from pallas_kernels.matvec.gpu import gathered_matvec_gpu, pick_blocks  # noqa: E402
from pallas_kernels.moe import grouped_matmul  # noqa: E402

L = 16


def hlo_stats(compiled_text: str, big: int) -> dict:
    """Loop fusions with >= big output elements, GEMM calls, total fusions."""
    n_big = 0
    for m in re.finditer(r"= [a-z0-9]+\[([0-9,]*)\]\{[^}]*\} fusion\(.*?kind=kLoop", compiled_text):
        dims = [int(d) for d in m.group(1).split(",") if d]
        if dims and int(np.prod(dims)) >= big:
            n_big += 1
    return {"big_loop_fusions": n_big,
            "cublas": compiled_text.count('custom_call_target="__cublas'),
            "triton_gemm": compiled_text.count("__triton_gemm"),
            "fusions": compiled_text.count(" fusion(")}  # fmt: skip


def proj_variants(d, n1, n2):
    """x [B,D] -> [B,N] with w [D,n1,n2] written four ways."""

    def einsum_nd(x, w):
        return jnp.einsum("btd,dnh->btnh", x[:, None], w).reshape(x.shape[0], -1)

    def dot_2d(x, w):
        return jnp.dot(x, w.reshape(d, n1 * n2))

    def dot_2d_f32(x, w):
        y = jnp.dot(x, w.reshape(d, n1 * n2), preferred_element_type=jnp.float32)
        return y.astype(x.dtype)

    def pad_rows(x, w):  # at least 2 rows: never a vector operand
        if x.shape[0] > 1:
            return dot_2d_f32(x, w)
        xp = jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
        return dot_2d_f32(xp, w)[:1]

    def kernel(x, w):  # pallas_kernels.matvec (one row only; other batches: the GEMM)
        if x.shape[0] > 1:
            return dot_2d_f32(x, w)
        y = gathered_matvec(x, w.reshape(1, d, n1 * n2), jnp.zeros((1,), jnp.int32))
        return y.astype(x.dtype)

    return {"einsum_nd": einsum_nd, "dot_2d": dot_2d, "dot_2d_f32": dot_2d_f32,
            "pad_rows": pad_rows, "kernel": kernel}  # fmt: skip


def moe_variants(d, f):
    """Gathered-expert SwiGLU for A = B*2 assignments: x [A,D], wi [E,D,2,F], wo [E,F,D]."""

    def cur(x, wi, wo, ex):
        h = jnp.einsum("ad,adcf->acf", x, jnp.take(wi, ex, axis=0),
                       preferred_element_type=jnp.float32).astype(x.dtype)  # fmt: skip
        a = jax.nn.silu(h[:, 0]) * h[:, 1]
        return jnp.einsum("af,afd->ad", a, jnp.take(wo, ex, axis=0),
                          preferred_element_type=jnp.float32).astype(x.dtype)  # fmt: skip

    def flat(x, wi, wo, ex):
        w1 = jnp.take(wi.reshape(wi.shape[0], d, 2 * f), ex, axis=0)
        h = jnp.einsum("ad,adn->an", x, w1, preferred_element_type=jnp.float32).astype(x.dtype)
        a = jax.nn.silu(h[:, :f]) * h[:, f:]
        return jnp.einsum("af,afd->ad", a, jnp.take(wo, ex, axis=0),
                          preferred_element_type=jnp.float32).astype(x.dtype)  # fmt: skip

    def rows2(x, wi, wo, ex):  # one extra zero row per assignment: [A,2,D] batched matmuls
        w1 = jnp.take(wi.reshape(wi.shape[0], d, 2 * f), ex, axis=0)
        xp = jnp.stack([x, jnp.zeros_like(x)], axis=1)
        h = jnp.einsum("amd,adn->amn", xp, w1, preferred_element_type=jnp.float32)
        h = h.astype(x.dtype)
        a = jax.nn.silu(h[..., :f]) * h[..., f:]
        y = jnp.einsum("amf,afd->amd", a, jnp.take(wo, ex, axis=0),
                       preferred_element_type=jnp.float32)  # fmt: skip
        return y[:, 0].astype(x.dtype)

    def loop(x, wi, wo, ex):  # one 1-row matmul per assignment on a dynamically indexed expert
        w1 = wi.reshape(wi.shape[0], d, 2 * f)
        outs = []
        for i in range(x.shape[0]):
            h = jnp.dot(x[i : i + 1], w1[ex[i]], preferred_element_type=jnp.float32)
            h = h.astype(x.dtype)
            a = jax.nn.silu(h[:, :f]) * h[:, f:]
            outs.append(jnp.dot(a, wo[ex[i]], preferred_element_type=jnp.float32))
        return jnp.concatenate(outs).astype(x.dtype)

    def kernel(x, wi, wo, ex):  # pallas_kernels.matvec: the routed experts read in place
        h = gathered_matvec(x, wi.reshape(wi.shape[0], d, 2 * f), ex).astype(x.dtype)
        a = jax.nn.silu(h[:, :f]) * h[:, f:]
        return gathered_matvec(a, wo, ex).astype(x.dtype)

    def gmm(x, wi, wo, ex):  # the grouped-matmul kernels on the rows sorted by expert
        order = jnp.argsort(ex)
        gs = jnp.bincount(ex, length=wi.shape[0]).astype(jnp.int32)
        xs = x[order]
        h = grouped_matmul(xs, wi.reshape(wi.shape[0], d, 2 * f), gs)
        a = jax.nn.silu(h[:, :f]) * h[:, f:]
        y = grouped_matmul(a, wo, gs)
        return jnp.zeros_like(y).at[order].set(y)

    return {"moe_cur": cur, "moe_flat": flat, "moe_rows2": rows2, "moe_loop": loop,
            "moe_kernel": kernel, "moe_gmm": gmm}  # fmt: skip


def f32_reference(chain, *args):
    """chain(*args) with every floating argument in fp32 (full-precision matmuls)."""
    up = jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating)
                      else a, args)  # fmt: skip
    with jax.default_matmul_precision("highest"):
        return jax.jit(chain)(*up)


def kernel_sweep(emit, d, f, e, rs, vocab=32000):
    """pallas_kernels.matvec tilings on the decode shapes of the benchmark model, each weight
    stacked over L layers and indexed in place (as the model calls it: no sliced copies)."""
    interpret = jax.default_backend() == "cpu"
    shapes = [(2, e, d, 2 * f), (2, e, f, d), (1, 1, d, 3 * d), (1, 1, d, d), (1, 1, d, vocab)]
    for a, ee, k, n in shapes[:1] if interpret else shapes:
        layers = L if n != vocab else 1
        x = jnp.asarray(rs.randn(a, k), jnp.bfloat16)
        w = jnp.asarray(rs.randn(layers * ee, k, n) * k**-0.5, jnp.bfloat16)
        idx = jnp.asarray(rs.randint(0, ee, (layers, a)) + ee * np.arange(layers)[:, None],
                          jnp.int32)  # fmt: skip
        auto = pick_blocks(a, k, n)
        grid = {auto}
        for bk, bn, nw, tp in itertools.product((32, 64, 128), (128, 256), (4, 8),
                                                (264, 528, 1056)):  # fmt: skip
            if bk * bn <= 64 * 256:
                grid.add(pick_blocks(a, k, n, target_programs=tp, block_k=bk, block_n=bn,
                                     num_warps=nw))  # fmt: skip
        grid |= {dataclasses.replace(b, num_stages=3) for b in list(grid) if b.num_warps == 4}
        x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
        ref = sum(jnp.einsum("ak,akn->an", x32, w32[idx[i]]) for i in range(idx.shape[0]))
        for blocks in sorted(grid, key=lambda b: (b != auto, str(b))):

            def chain(x, w, idx, blocks=blocks):
                out = 0.0
                for i in range(idx.shape[0]):
                    out = out + gathered_matvec_gpu(x, w, idx[i], blocks=blocks,
                                                    interpret=interpret)  # fmt: skip
                return out

            g = jax.jit(chain)
            try:
                checked = harness.check(g(x, w, idx), ref, atol=5e-2, rtol=5e-2, scaled=True)
                t = harness.time_device(g, x, w, idx, reps=20)
            except Exception as err:  # noqa: BLE001 - a config the backend rejects
                bad = {"blocks": dataclasses.asdict(blocks), "error": repr(err)[:300]}
                emit({"what": "kernel_sweep", "shape": [a, ee, k, n]} | bad)
                continue
            sec = t.median
            byts = layers * a * k * n * 2
            emit({"what": "kernel_sweep", "shape": [a, ee, k, n], "auto": blocks == auto,
                  "blocks": dataclasses.asdict(blocks), "us": sec / layers * 1e6,
                  "GBps": byts / sec / 1e9, **t.row_ms(), **checked})  # fmt: skip
            if interpret:
                return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--sweep", action="store_true", help="also sweep the matvec kernel's blocks")
    args = ap.parse_args()
    d, n1, n2, e, f = (64, 4, 16, 4, 48) if args.small else (2048, 16, 128, 8, 1408)
    dt = jnp.bfloat16
    rows = harness.Rows(args.out, bench="matvec", layers=L)
    emit = rows.emit
    rs = np.random.RandomState(0)

    stacked = jnp.asarray(rs.randn(L, d, n1, n2) * d**-0.5, dt)
    layers = [stacked[i] for i in range(L)]
    wi = jnp.asarray(rs.randn(L, e, d, 2, f) * d**-0.5, dt)
    wo = jnp.asarray(rs.randn(L, e, f, d) * f**-0.5, dt)
    wi_l, wo_l = [wi[i] for i in range(L)], [wo[i] for i in range(L)]
    for b in map(int, args.batches.split(",")):
        x = jnp.asarray(rs.randn(b, d), dt)
        ref = None  # the chain of the first formulation in fp32
        for name, fn in proj_variants(d, n1, n2).items():
            for src, ws in (("stacked", stacked), ("list", layers)):

                def chain(x, ws, fn=fn):
                    for i in range(L):
                        x = fn(x, ws[i])[:, :d] * 0.5 + x
                    return x

                g = jax.jit(chain)
                if ref is None:
                    ref = f32_reference(chain, x, ws)
                checked = harness.check(g(x, ws), ref, atol=5e-2, rtol=5e-2, scaled=True)
                txt = g.lower(x, ws).compile().as_text()
                t = harness.time_device(g, x, ws, reps=20)
                sec = t.median
                byts = L * d * n1 * n2 * 2
                emit({"what": "proj", "variant": name, "weights": src, "batch": b,
                      "us_per_layer": sec / L * 1e6, "GBps": byts / sec / 1e9,
                      **hlo_stats(txt, d * n1 * n2), **t.row_ms(), **checked})  # fmt: skip
        xa = jnp.repeat(x, 2, axis=0)
        ex = jnp.asarray(rs.randint(0, e, (L, 2 * b)), jnp.int32)
        ref = None
        for name, fn in moe_variants(d, f).items():
            if name in ("moe_loop", "moe_kernel") and b > 1:
                continue

            def mchain(x, wi, wo, ex, fn=fn):
                for i in range(L):
                    x = fn(x, wi[i], wo[i], ex[i]) * 0.5 + x
                return x

            g = jax.jit(mchain)
            if ref is None:
                ref = f32_reference(mchain, xa, wi_l, wo_l, ex)
            checked = harness.check(g(xa, wi_l, wo_l, ex), ref, atol=5e-2, rtol=5e-2, scaled=True)
            txt = g.lower(xa, wi_l, wo_l, ex).compile().as_text()
            t = harness.time_device(g, xa, wi_l, wo_l, ex, reps=20)
            sec = t.median
            touched = min(e, 2 * b)
            byts = L * touched * 3 * d * f * 2
            emit({"what": "moe_gather", "variant": name, "batch": b, "assignments": 2 * b,
                  "us_per_layer": sec / L * 1e6, "GBps_touched": byts / sec / 1e9,
                  **hlo_stats(txt, d * f), **t.row_ms(), **checked})  # fmt: skip
    if args.sweep:
        kernel_sweep(emit, d, f, e, rs)


if __name__ == "__main__":
    main()
