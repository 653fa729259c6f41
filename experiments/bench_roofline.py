"""Benchmark: what the device at hand can do, beside its datasheet (`experiments.roofline`).

    python3 experiments/bench_roofline.py --out results.jsonl     # GPU (`run.py roofline`)
    python3 experiments/bench_roofline.py --small                 # CPU smoke run

Rows (`experiments.harness`, device time per call, L2 flushed):
- what="copy": a jitted device-to-device copy (`jnp.copy` into a new buffer; the HLO is a
  `copy`, checked) per size: GB/s = read + write bytes / time; the best is what memory floors
  divide by;
- what="elementwise": `x + 1` over the largest size, for comparison (what earlier floors used);
- what="matmul": an n x n x n bf16 matmul, TFLOP/s, checked against an fp32-accumulated
  product on a sample of rows;
- what="peak": the datasheet figures of this device kind (`roofline.PEAKS`, sources there) and
  the measured ones over them.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from experiments import harness, roofline  # noqa: E402


def copy_rows(emit, sizes) -> float:
    """One row per copy size; returns the best GB/s."""
    best = 0.0
    for n in sizes:
        x = jnp.zeros((n // 2,), jnp.bfloat16) + 1
        hlo = roofline.device_copy.lower(x).compile().as_text()
        y = roofline.device_copy(x)
        checked = harness.check(y, x, atol=0, rtol=0) | {
            "hlo_has_copy": " copy(" in hlo,
            "new_buffer": y.unsafe_buffer_pointer() != x.unsafe_buffer_pointer(),
        }
        t = harness.time_device(roofline.device_copy, x)
        gbps = 2 * x.nbytes / t.median / 1e9
        best = max(best, gbps)
        emit({"what": "copy", "bytes": x.nbytes, **t.row_ms(), "GBps": gbps, **checked})
        del x, y
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--small", action="store_true", help="small sizes (CPU smoke run)")
    args = ap.parse_args()
    small = args.small or jax.default_backend() == "cpu"
    sizes = (4 << 20, 16 << 20) if small else (256 << 20, 1 << 30, 2 << 30, 4 << 30)
    kind = jax.devices()[0].device_kind
    rows = harness.Rows(args.out, bench="roofline", **roofline.peak_fields(kind))
    best = copy_rows(rows.emit, sizes)
    x = jnp.zeros((sizes[-1] // 2,), jnp.bfloat16)
    inc = jax.jit(lambda a: a + 1)
    t = harness.time_device(inc, x)
    rows.emit({"what": "elementwise", "op": "x + 1", "bytes": x.nbytes, **t.row_ms(),
               "GBps": 2 * x.nbytes / t.median / 1e9,
               **harness.check(inc(x), jnp.ones_like(x), atol=0, rtol=0)})  # fmt: skip
    del x
    n = 256 if small else 8192
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(jnp.matmul)
    ref = jnp.matmul(a[:64], b, preferred_element_type=jnp.float32)
    checked = harness.check(mm(a, b)[:64], ref, atol=2e-2, rtol=2e-2, scaled=True)
    t = harness.time_device(mm, a, b)
    tflops = 2.0 * n**3 / t.median / 1e12
    rows.emit({"what": "matmul", "n": n, "dtype": "bfloat16", **t.row_ms(), "tflops": tflops,
               **checked})  # fmt: skip
    peak = roofline.peak_for(kind)
    rows.emit({"what": "peak", "copy_GBps": best, "matmul_tflops": tflops,
               "copy_over_datasheet": None if peak is None else best / (peak.hbm_tbps * 1e3),
               "matmul_over_datasheet": None if peak is None else tflops / peak.bf16_tflops,
               **harness.no_check("derived from the rows above")})  # fmt: skip


if __name__ == "__main__":
    main()
