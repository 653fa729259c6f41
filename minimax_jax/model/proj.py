"""Weight projections that stay bandwidth-bound at decode size.

With a single activation row (B*T == 1: a batch-1 decode step) XLA:GPU rewrites some einsums
with a weight into an elementwise multiply that materialises a weight-sized product, then a
reduce: e.g. a [1,16,128,2048] temporary for a 2048x2048 projection, written and read back on
every step. `experiments/bench_matvec.py` measured such a 1-row projection at 23-25 us against
12 us when the row is paired with a zero row (then XLA calls a GEMM that reads the weight once);
see experiments/RESULTS.md. `proj` does that pairing (matvec="xla"), or with
matvec="gpu" runs the row through `pallas_kernels.matvec` (a split-K kernel that streams the
weight once). Either way the real row's result is the einsum's, up to summation order.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from minimax_jax.model import quant
from minimax_jax.model.quant import QArray
from pallas_kernels.matvec import gathered_matvec
from pallas_kernels.matvec.api import supported


@dataclasses.dataclass(frozen=True)
class LayerSlice:
    """Layer `index` of a weight stacked [L, ...] over the scanned blocks, left unsliced.

    XLA:GPU copies a slice of a stacked weight before handing it to a Pallas call (custom-call
    operands are whole buffers): at batch 1 those copies took 1.4 ms of a 2.4 ms decode step
    (experiments/RESULTS.md). The matvec kernel instead indexes the stacked array
    itself. Everything else takes `get()`, which XLA fuses into its own GEMMs.
    """

    stacked: jax.Array
    index: jax.Array | int

    @classmethod
    def of(cls, w) -> LayerSlice:
        """w itself if a LayerSlice, else a plain weight as the only layer of a stack of one."""
        return w if isinstance(w, LayerSlice) else cls(jax.tree.map(lambda a: a[None], w), 0)

    def get(self) -> jax.Array | QArray:
        return jax.tree.map(lambda a: a[self.index], self.stacked)

    @property
    def quantized(self) -> bool:
        return isinstance(self.stacked, QArray)

    def rows(self, groups: int, k: int) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """(the stacked weight as [L*groups, k, n] (a bitcast; int8 q for a `QArray`), its
        per-output-channel scale as [L*groups, n] (None for a float weight), the row of this
        layer's first matrix): for a per-layer weight made of `groups` matrices of k rows each."""
        first = jnp.asarray(self.index, jnp.int32) * groups
        w = self.stacked
        if isinstance(w, QArray):
            n = w.q.shape[0] * groups
            return w.q.reshape(n, k, -1), w.scale.reshape(n, -1), first
        return w.reshape(w.shape[0] * groups, k, -1), None, first


def materialize(w):
    """w itself, or the slice a LayerSlice stands for."""
    return w.get() if isinstance(w, LayerSlice) else w


def _split_spec(spec: str, x_ndim: int) -> int | None:
    """For 'bt<in>,<in><out>->bt<out>' the number of contracted dims, else None."""
    lhs, out = spec.split("->")
    xs, ws = lhs.split(",")
    c = x_ndim - 2
    if len(xs) != x_ndim or xs[:2] != "bt" or ws[:c] != xs[2:] or out != "bt" + ws[c:]:
        return None
    return c


def proj(spec: str, x: jax.Array, w, *, matvec: str = "xla", **kwargs) -> jax.Array:
    """jnp.einsum(spec, x, w, **kwargs) for x [B,T,...], w an array, an int8 `QArray` (see
    `quant.einsum`) or a `LayerSlice` of either.

    With B*T == 1: matvec="xla" computes on [2,T,...] (x and a zero row) and slices back, so the
    product is never a vector-matrix one; another matvec implementation (`pallas_kernels.matvec`)
    takes the row alone, for specs of the form 'bt<in>,<in><out>->bt<out>'."""
    if x.shape[0] * x.shape[1] != 1:
        return quant.einsum(spec, x, materialize(w), **kwargs)
    c = _split_spec(spec, x.ndim)
    view = LayerSlice.of(w)
    shape, k = view.stacked.shape[1:], x.size
    kernel = matvec != "xla" and c is not None and set(kwargs) <= {"preferred_element_type"}
    if kernel and supported(k, math.prod(shape) // k):
        stacked, scale, first = view.rows(1, k)
        y = gathered_matvec(
            x.reshape(1, k), stacked, first[None], scale=scale, implementation=matvec
        )
        # the einsum's result dtype (an int8 weight converts to x's dtype inside the matmul)
        wdt = x.dtype if scale is not None else stacked.dtype
        dtype = kwargs.get("preferred_element_type") or jnp.result_type(x.dtype, wdt)
        return y.astype(dtype).reshape(1, 1, *shape[c:])
    pair = jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
    return quant.einsum(spec, pair, view.get(), **kwargs)[:1]
