"""Int8 weight-only quantisation: the stored form, the quantiser and the matmuls that read it.

A quantised weight w (any shape) is stored as two leaves (``ModelConfig.layer_param_layout`` with
``quantize``): ``q`` int8 in w's shape and ``scale`` float32 in w's shape with the contracted
(input) axes kept as size 1, so that ``q * scale`` is the dequantised weight and the scale is
sharded like w's output channels. Symmetric, per output channel:

    scale = max |w| over the contracted axes / 127,  q = round(w / scale)  (in [-127, 127])

The model gathers each ``{"q", "scale"}`` pair into a `QArray` (a pytree, so scan, shard_map and
tree maps slice both leaves alike) at the top of the decoder (`wrap`). Matmul sites call
`einsum` / `grouped_matmul` here instead of jnp / pallas_kernels: they multiply by q converted to
the compute dtype inside the matmul and scale the output, which equals the matmul with the
dequantised weight up to rounding. `grouped_matmul` hands int8 MoE weights to the kernels'
int8 path (`pallas_kernels.moe.grouped_matmul(..., scale=)`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from minimax_jax.config import INT8_LEAVES, check_quantize
from pallas_kernels.moe.api import grouped_matmul as _grouped_matmul

QMAX = 127


@dataclasses.dataclass(frozen=True)
class QArray:
    """An int8 weight: q int8 [...], scale float32 of q's rank (1 on the contracted axes)."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    @property
    def dtype(self):
        return self.q.dtype

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The weight in ``dtype`` (computed in fp32)."""
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


jax.tree_util.register_dataclass(QArray, data_fields=["q", "scale"], meta_fields=[])


def quantize(w, contract: tuple[int, ...]):
    """w (numpy or jax array, any float dtype) -> (q int8, scale float32 with the ``contract``
    axes kept as size 1). Computed in fp32; an all-zero channel gets scale 0 and q 0. Numpy in,
    numpy out (the loaders quantise on the host, one tensor at a time)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    w = xp.asarray(w, dtype=xp.float32)
    # times fp32(1/127), not / 127: XLA turns a division by a constant into that product, and
    # host (numpy) and device quantisation must give the same bits
    scale = xp.max(xp.abs(w), axis=tuple(contract), keepdims=True) * xp.float32(1 / QMAX)
    safe = xp.where(scale > 0, scale, 1.0)
    q = xp.clip(xp.round(w / safe), -QMAX, QMAX).astype(xp.int8)
    return q, scale.astype(xp.float32)


def is_pair(node) -> bool:
    """Whether a params-tree node is a stored int8 pair ``{"q": ..., "scale": ...}``."""
    return isinstance(node, dict) and set(node) == set(INT8_LEAVES)


def wrap(tree):
    """Every ``{"q", "scale"}`` dict of a params tree (dicts and lists) as a `QArray`."""
    if is_pair(tree):
        return QArray(tree["q"], tree["scale"])
    if isinstance(tree, dict):
        return {k: wrap(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [wrap(v) for v in tree]
    return tree


def dequantize_tree(tree, dtype=jnp.float32):
    """A params tree with every ``{"q", "scale"}`` pair replaced by its dequantised weight."""
    if is_pair(tree):
        return QArray(tree["q"], tree["scale"]).dequantize(dtype)
    if isinstance(tree, dict):
        return {k: dequantize_tree(v, dtype) for k, v in tree.items()}
    if isinstance(tree, list):
        return [dequantize_tree(v, dtype) for v in tree]
    return tree


def as_dtype(w, dtype):
    """A float weight cast to dtype; a `QArray` unchanged (its int8 converts inside the
    matmul)."""
    return w if isinstance(w, QArray) else w.astype(dtype)


def _output_scale(spec: str, scale: jax.Array) -> jax.Array:
    """The scale of an 'x,w->out' einsum's w, laid out to broadcast against out."""
    lhs, out = spec.replace(" ", "").split("->")
    wl = lhs.split(",")[1]
    if "." in spec or len(wl) != scale.ndim:
        raise ValueError(f"int8 einsum: unsupported spec {spec!r} for a rank-{scale.ndim} weight")
    kept = [c for c in wl if c in out]
    s = scale.reshape([n for c, n in zip(wl, scale.shape, strict=True) if c in out])
    s = jnp.transpose(s, sorted(range(len(kept)), key=lambda i: out.index(kept[i])))
    sizes = dict(zip(sorted(kept, key=out.index), s.shape, strict=True))
    return s.reshape([sizes.get(c, 1) for c in out])


def einsum(spec: str, x: jax.Array, w, **kwargs) -> jax.Array:
    """jnp.einsum(spec, x, w, **kwargs) for a float w or a `QArray` (weight second).

    int8: q is converted to x's dtype inside the matmul (exact: |q| <= 127) and the result is
    multiplied by the per-output-channel scale (XLA fuses both), in the einsum's result dtype.
    """
    if not isinstance(w, QArray):
        return jnp.einsum(spec, x, w, **kwargs)
    y = jnp.einsum(spec, x, w.q.astype(x.dtype), **kwargs)
    return (y * _output_scale(spec, w.scale)).astype(y.dtype)


def reshape(w, shape: tuple[int, ...]):
    """w.reshape(shape) for a float w or a `QArray` whose contracted axes reshape to whole new
    axes (e.g. wi [E,D,2,F] -> [E,D,2F]): the scale keeps size 1 on those."""
    if not isinstance(w, QArray):
        return w.reshape(shape)
    old = w.q.shape
    contracted = [s == 1 and n != 1 for s, n in zip(w.scale.shape, old, strict=True)]
    co, cn = np.cumprod((1, *old)), np.cumprod((1, *shape))
    out_scale = []
    for j, n in enumerate(shape):  # axes overlap where their cumulative-product ranges do
        over = [c for i, c in enumerate(contracted) if co[i] < cn[j + 1] and co[i + 1] > cn[j]]
        if n > 1 and any(over) and not all(over):
            raise ValueError(f"int8 reshape {old} -> {tuple(shape)} mixes contracted axes")
        out_scale.append(1 if n > 1 and all(over) and over else n)
    return QArray(w.q.reshape(shape), w.scale.reshape(out_scale))


def grouped_matmul(
    x: jax.Array, w, group_sizes: jax.Array, *, implementation: str, group_rows=None
) -> jax.Array:
    """`pallas_kernels.moe.grouped_matmul` for w [E,K,N] a float array or a `QArray` (scale
    [E,1,N]): rows of group e use expert e's weight; the result has x's dtype.

    int8: the kernels take q and the scale [E,N] and dequantise tile by tile (never a
    dequantised copy of the weight; differentiable in x only), on the backend the kernel API
    resolves for int8 weights.
    """
    if not isinstance(w, QArray):
        return _grouped_matmul(
            x, w, group_sizes, implementation=implementation, group_rows=group_rows
        )
    return _grouped_matmul(
        x, w.q, group_sizes, scale=w.scale[:, 0], implementation=implementation,
        group_rows=group_rows,
    )  # fmt: skip


def quantize_params(config, params: dict, scheme: str | None) -> dict:
    """A float params tree (`MiniMaxForCausalLM.pure_params()` layout) with every weight that
    ``scheme`` quantises (`ModelConfig.layer_param_layout`) replaced by its ``{"q", "scale"}``
    pair, quantised on the device where it lives; other leaves are shared, not copied. The
    in-memory counterpart of `from_pretrained(quantize=)` (which quantises while reading)."""
    if check_quantize(scheme) is None:
        return params
    blocks = []
    for kind, block in zip(config.block_pattern, params["blocks"], strict=True):
        block = jax.tree.map(lambda x: x, block)  # a new container tree, same arrays
        for name, spec in config._float_layer_layout(kind).items():
            if not spec.quantized_by(scheme):
                continue
            *path, leaf = name.split(".")
            node = block
            for key in path:
                node = node[key]
            q, scale = quantize(node[leaf], spec.stacked(config.num_blocks).contract)
            node[leaf] = {"q": q, "scale": scale}
        blocks.append(block)
    return {**params, "blocks": blocks}


def nbytes(shape, dtype) -> int:
    """Bytes of an array of this shape and dtype."""
    return math.prod(shape) * np.dtype(dtype).itemsize
