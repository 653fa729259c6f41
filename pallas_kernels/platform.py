"""The platform facts every op's dispatcher shares: which backend runs, and shard_map typing.

`backend()` reads `jax.default_backend()` at call time (so a test that monkeypatches it sees
its value) and names the platform "gpu" for CUDA and ROCm alike. `match_vma` gives an array the
varying manual axes of others inside `jax.shard_map` (a no-op outside).
"""

from __future__ import annotations

import jax

__all__ = ["backend", "match_vma", "on_gpu", "on_tpu"]

_GPU_NAMES = ("gpu", "cuda", "rocm")


def backend() -> str:
    """The default backend: "gpu" (CUDA or ROCm), "tpu", "cpu", or another platform's name."""
    name = jax.default_backend()
    return "gpu" if name in _GPU_NAMES else name


def on_gpu() -> bool:
    """Whether the default backend is a GPU."""
    return backend() == "gpu"


def on_tpu() -> bool:
    """Whether the default backend is a TPU."""
    return backend() == "tpu"


def _varying(x: jax.Array) -> frozenset[str]:
    """shard_map axes over which x varies (JAX 0.10 spells it `manual_axis_type.varying`)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def match_vma(x: jax.Array, *likes: jax.Array | None) -> jax.Array:
    """Mark `x` as varying over every shard_map axis that any of `likes` varies over.

    Inside `jax.shard_map` a value that starts invariant (a fresh zero state, a Pallas call's
    result, a replicated weight) but meets sharded operands must be cast to varying first (scan
    carries, `lax.switch` branches and custom-VJP cotangents need matching types); outside
    shard_map this is a no-op. None entries of `likes` are skipped.
    """
    want = frozenset().union(*(_varying(y) for y in likes if y is not None))
    missing = tuple(sorted(want - _varying(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x
