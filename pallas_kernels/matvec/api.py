"""Gathered matrix-vector products for decode: dispatcher.

    gathered_matvec(x [A,K], w [E,K,N], index [A] int32, *, implementation="auto") -> [A,N] fp32

Row a is x[a] @ w[index[a]] with fp32 accumulation. A is small (the token-expert assignments of
a batch-1 decode step, or one row with E = 1 for a plain projection) and every call is bound by
reading the A selected [K,N] weights. Implementations: "xla" (`reference.py`: gather + einsum;
CPU path and fallback), "gpu" (Pallas Triton kernel, `gpu.py`: reads each selected weight once),
"gpu_interpret" (the same kernel in Pallas interpret mode, for CPU tests). "auto": gpu on a GPU
when the shape is supported (K, N multiples of 16) and the call is not partitioned over a
device mesh (XLA's SPMD partitioner does not split a Pallas call), else xla. Not differentiable
(inference).

Int8 weights (`pallas_kernels.quant`): gathered_matvec(x, q [E,K,N] int8, index, scale=s [E,N])
equals gathered_matvec(x, dequantize(q, s, axis=1), index), s fp32 or bf16 (one scale per
expert and output column). The kernel converts each int8 [BK,BN] tile to fp32 in registers and
multiplies its fp32 partial row by the expert's [BN] scale before writing it (the weight stays
int8 in HBM: a quarter of the fp32 bytes, half of bf16); xla converts only the A gathered
weights.
"""

from __future__ import annotations

import jax

from pallas_kernels import platform
from pallas_kernels.matvec import gpu as _gpu
from pallas_kernels.matvec.reference import gathered_matvec_reference
from pallas_kernels.quant import check_scale

IMPLEMENTATIONS = ("auto", "xla", "gpu", "gpu_interpret")


def supported(k: int, n: int) -> bool:
    """Whether the kernel tiles w [.,K,N] (K and N multiples of 16); else callers use xla."""
    return _gpu.supported(k, n)


def resolve_implementation(
    implementation: str, k: int | None = None, n: int | None = None, *, sharded: bool = False
) -> str:
    """'auto' -> 'gpu' on a GPU backend, else 'xla'; other names are checked and returned.

    k, n: the weight's [K,N] when known ('auto' takes xla for shapes the kernel does not tile;
    without them the caller checks `supported` per call). sharded: the call runs under a device
    mesh, where 'auto' means xla (a Pallas call is not partitioned).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"gathered_matvec implementation must be one of {IMPLEMENTATIONS}, "
            f"got {implementation!r}"
        )
    if implementation != "auto":
        return implementation
    if sharded or not (platform.on_gpu() and _gpu.AVAILABLE):
        return "xla"
    return "gpu" if k is None or n is None or _gpu.supported(k, n) else "xla"


def gathered_matvec(
    x: jax.Array, w: jax.Array, index: jax.Array, *, scale: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:  # fmt: skip
    """x [A,K], w [E,K,N], index [A] int32 -> [A,N] fp32; row a = x[a] @ w[index[a]].

    scale: for int8 w only (required then), [E,N] fp32 or bf16 (see the module docstring)."""
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1] or index.shape != x.shape[:1]:
        raise ValueError(f"gathered_matvec needs x [A,K], w [E,K,N], index [A]; got "
                         f"{x.shape}, {w.shape}, {index.shape}")  # fmt: skip
    check_scale(w, scale, axis=1)
    impl = resolve_implementation(implementation, w.shape[1], w.shape[2])
    if impl == "xla":
        return gathered_matvec_reference(x, w, index, scale)
    return _gpu.gathered_matvec_gpu(x, w, index, scale, interpret=impl == "gpu_interpret")
