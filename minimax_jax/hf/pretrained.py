"""Load and save checkpoints of the MiniMax-01 text models: HF safetensors and our Orbax dirs.

``from_pretrained(path)`` reads ``config.json`` (remote-code or transformers-native schema) and
``model.safetensors`` or a sharded ``model.safetensors.index.json`` checkpoint; every tensor name
is mapped by the table in ``hf.mapping`` and the whole checkpoint is validated before any
weight is read. Leaves are filled one at a time (host memory ~ one stacked leaf plus one tensor).

``save_pretrained(model, path, schema=...)`` writes the same table backwards: per-expert
``block_sparse_moe.experts.{e}.w1/w2/w3`` names (what the remote code reads and what
transformers 5.23 writes by default), sharded safetensors + index, and ``config.json`` in the
requested schema; the native schema also gets the lightning decay buffers transformers keeps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax import paths
from minimax_jax.config import ModelConfig, check_quantize
from minimax_jax.hf import mapping
from minimax_jax.hf import orbax as orbax_io
from minimax_jax.hf.safetensors import SafetensorsReader, write_sharded
from minimax_jax.model import quant
from minimax_jax.model.causal_lm import MiniMaxForCausalLM
from minimax_jax.sharding import ShardingRules

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
ORBAX_PARAMS_DIR = "params"  # the Orbax checkpoint inside a directory written by hf_to_orbax


def load_state(
    path: str | os.PathLike,
    config: ModelConfig,
    *,
    dtype: Any = jnp.float32,
    prefix: str = "",
    sharding: Callable[[mapping.LeafPath], jax.sharding.Sharding] | None = None,
    quantize: str | None = None,
) -> dict[mapping.LeafPath, jax.Array]:
    """Reads a checkpoint into {leaf path: array} in our layout (``mapping.expected_leaf_shapes``).

    Every leaf is cast to ``dtype`` except the MoE router (float32). Without ``sharding`` each
    leaf is filled on the host (one leaf at a time) and put on the default device. With
    ``sharding(leaf_path)`` each device's shard is built from memory-mapped tensors, so the host
    holds the addressable shards of one leaf, never a full replica of a sharded leaf.
    ``quantize``: the weights the scheme covers are quantised from the checkpoint's values (in
    fp32) as each HF tensor is read, into ``leaf/q`` int8 and ``leaf/scale`` fp32; the host
    holds the int8 leaf and one fp32 tensor (sharded: one shard's rows over the whole
    contracted axis), never a float copy of the leaf.

    Raises:
      CheckpointMismatchError: listing every unknown, missing, duplicated, misshapen or mistyped
        tensor, or derived lightning buffers that disagree with our decay formula.
      SafetensorsError: unreadable files.
    """
    reader = SafetensorsReader(path)
    meta = {n: (reader.info(n).shape, reader.info(n).dtype) for n in reader.names()}
    plan = mapping.plan_load(config, reader.names(), meta=meta, prefix=prefix, where=str(path))
    check_buffers(reader, config, plan, str(path))
    expected = mapping.flatten(mapping.expected_leaf_shapes(config, dtype))
    int8 = mapping.int8_leaves(config, quantize)
    state = {}
    for leaf, assignments in plan.by_leaf.items():
        if leaf in int8:
            shape, contract = expected[leaf].shape, int8[leaf]
            if sharding is None:
                q, scale = _int8_leaf(reader, shape, contract, assignments)
                state |= {
                    leaf + ("q",): jax.device_put(q),
                    leaf + ("scale",): jax.device_put(scale),
                }
                del q, scale
            else:
                state |= _sharded_int8_leaf(reader, leaf, shape, contract, assignments, sharding)
        elif sharding is None:
            host = _fill_leaf(reader, expected[leaf], assignments)
            state[leaf] = jax.device_put(host)
            del host  # host memory: one leaf at a time
        else:
            state[leaf] = _sharded_leaf(reader, expected[leaf], assignments, sharding(leaf))
    return state


def _sharded_leaf(
    reader: SafetensorsReader,
    spec: jax.ShapeDtypeStruct,
    assignments: list[mapping.Assignment],
    sharding: jax.sharding.Sharding,
) -> jax.Array:
    """One leaf placed by ``sharding``; each distinct shard is read once, from memory maps."""
    cache: dict[tuple, np.ndarray] = {}

    def shard(index: tuple) -> np.ndarray:
        bounds = tuple(sl.indices(n)[:2] for sl, n in zip(index, spec.shape, strict=True))
        if bounds not in cache:
            cache[bounds] = _fill_region(reader, spec, assignments, bounds)
        return cache[bounds]

    return jax.make_array_from_callback(spec.shape, sharding, shard)


def _fill_region(
    reader: SafetensorsReader,
    spec: jax.ShapeDtypeStruct,
    assignments: list[mapping.Assignment],
    bounds: tuple[tuple[int, int], ...],
) -> np.ndarray:
    """``leaf[lo:hi, ...]`` for ``bounds`` = ((lo, hi), ...) per axis, read through memory maps
    (only the pages a region touches are read)."""
    out = np.empty([hi - lo for lo, hi in bounds], np.dtype(spec.dtype))
    for a in assignments:
        src, dst = [], []
        for axis, (lo, hi) in enumerate(bounds):
            s = a.slot[axis] if axis < len(a.slot) else slice(None)
            if isinstance(s, int):
                if not lo <= s < hi:
                    break
                dst.append(s - lo)
            else:  # slots only use whole axes
                src.append(slice(lo, hi))
                dst.append(slice(None))
        else:
            view = a.layout.to_ours(reader.memmap(a.name), a.slot_shape)
            out[tuple(dst)] = view[tuple(src)]
    return out


def _fill_leaf(
    reader: SafetensorsReader, spec: jax.ShapeDtypeStruct, assignments: list[mapping.Assignment]
) -> np.ndarray:
    """Host array of one leaf, every slot filled from its HF tensor (cast to the leaf dtype)."""
    out = np.empty(spec.shape, np.dtype(spec.dtype))
    for a in assignments:
        out[a.slot] = a.layout.to_ours(reader.read(a.name), a.slot_shape).astype(out.dtype)
    return out


def _int8_leaf(
    reader: SafetensorsReader,
    shape: tuple[int, ...],
    contract: tuple[int, ...],
    assignments: list[mapping.Assignment],
) -> tuple[np.ndarray, np.ndarray]:
    """(q int8, scale fp32) of one quantised leaf, each HF tensor quantised as it is read
    (slots cover whole contracted axes, so per tensor equals per leaf)."""
    q = np.empty(shape, np.int8)
    scale = np.empty([1 if a in contract else n for a, n in enumerate(shape)], np.float32)
    for a in assignments:
        value = a.layout.to_ours(reader.read(a.name), a.slot_shape)
        q[a.slot], scale[a.slot] = quant.quantize(value, mapping.slot_axes(a.slot, contract))
    return q, scale


def _sharded_int8_leaf(reader, leaf, shape, contract, assignments, sharding):
    """{leaf/q, leaf/scale} placed by ``sharding``: each shard's rows are read over the whole
    contracted axes (one region per distinct non-contracted shard), quantised, and cut."""
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
    scale_shape = tuple(1 if a in contract else n for a, n in enumerate(shape))
    cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def region(index: tuple, sizes: tuple[int, ...]) -> tuple[tuple, tuple[np.ndarray, ...]]:
        bounds = tuple(sl.indices(n)[:2] for sl, n in zip(index, sizes, strict=True))
        full = tuple(
            (0, n) if a in contract else b
            for a, (b, n) in enumerate(zip(bounds, shape, strict=True))
        )
        if full not in cache:
            cache[full] = quant.quantize(_fill_region(reader, spec, assignments, full), contract)
        return bounds, cache[full]

    def q_shard(index: tuple) -> np.ndarray:
        bounds, (q, _) = region(index, shape)
        cut = tuple(slice(lo, hi) if a in contract else slice(None)
                    for a, (lo, hi) in enumerate(bounds))  # fmt: skip
        return q[cut]

    q_path, s_path = leaf + ("q",), leaf + ("scale",)
    out = {q_path: jax.make_array_from_callback(shape, sharding(q_path), q_shard)}
    out[s_path] = jax.make_array_from_callback(
        scale_shape, sharding(s_path), lambda index: region(index, scale_shape)[1][1]
    )
    return out


def check_buffers(
    reader: SafetensorsReader, config: ModelConfig, plan: mapping.LoadPlan, where: str
) -> None:
    """Derived lightning buffers in the checkpoint must match our formula (then are dropped)."""
    bad = []
    for name, layer, derived in plan.derived:
        why = mapping.check_derived(config, derived, layer, reader.read(name))
        if why is not None:
            bad.append(f"{name}: {why}")
    if bad:
        raise mapping.CheckpointMismatchError(
            where, {"derived buffers that disagree with the config": bad}
        )


def checkpoint_quantize(path: str | os.PathLike, quantize: str | None) -> str | None:
    """The int8 scheme loading ``path`` with ``quantize`` gives: ``quantize`` itself for an HF
    or float Orbax checkpoint (quantised on load); for an Orbax checkpoint written with
    ``hf_to_orbax --quantize S``, S (when ``quantize`` is None or S).

    Raises:
      ValueError: unknown scheme, or a quantised checkpoint asked for another scheme (int8
        weights are not requantised: convert the original checkpoint instead).
    """
    check_quantize(quantize)
    params = Path(path) / ORBAX_PARAMS_DIR
    if not orbax_io.is_orbax_checkpoint(params):
        return quantize
    stored = orbax_io.stored_quantize(orbax_io.LeafReader(params))
    if stored is not None and quantize not in (None, stored):
        raise ValueError(
            f"{path} holds int8 weights quantised as {stored!r}; they cannot be requantised as "
            f"{quantize!r}: load it with quantize {stored!r} (or none), or convert the original "
            f"HF checkpoint with --quantize {quantize}"
        )
    return stored if quantize is None else quantize


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    prefix: str = "",
    sharding: Callable[[mapping.LeafPath], jax.sharding.Sharding] | None = None,
    quantize: str | None = None,
):
    """Builds ``MiniMaxForCausalLM`` from an HF checkpoint directory or our Orbax directory.

    Args:
      path: an HF directory (``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json`` + shards), or a directory written by
        ``convert.hf_to_orbax`` (``config.json`` + ``params/``, an Orbax checkpoint); local, a
        Hugging Face hub id ``owner/name[@revision]`` (HF directories; fetched into the HF
        cache) or a ``gs://`` / ``s3://`` / ``az://`` URL (copied to a temporary directory
        while loading). See ``minimax_jax.paths``.
      dtype: parameter dtype (the MoE router stays float32); values are cast on the host.
      prefix: prefix of every text-model tensor name (``"language_model."`` inside VL-01; HF only).
      sharding: optional ``leaf path -> Sharding`` (paths as in ``mapping.flatten``, e.g.
        ``("blocks", 0, "moe", "wi")``; see ``sharding_from_rules``). HF: each leaf is placed right
        after it is read. Orbax: each device reads only the chunks of its own shard. With
        ``quantize``, paths of int8 weights end in ``"q"`` / ``"scale"`` (``sharding_from_rules``
        with the same ``quantize`` gives them).
      quantize: None or an int8 weight-only scheme (``minimax_jax.config.QUANTIZE_SCHEMES``):
        HF and float Orbax checkpoints are quantised while they are read (``load_state``); an
        Orbax checkpoint written with ``hf_to_orbax --quantize`` loads as stored (None means
        its own scheme; another scheme is an error, see ``checkpoint_quantize``).
    Returns:
      the model; parameters on the default device, or placed by ``sharding``.

    Raises:
      minimax_jax.paths.PathError: ``path`` is neither a local path, a hub id nor a supported URL.
    """
    with paths.as_local(path, "path") as local:
        return _from_local(local, dtype=dtype, prefix=prefix, sharding=sharding, quantize=quantize)


def _from_local(path: Path, *, dtype, prefix, sharding, quantize):
    """``from_pretrained`` of a local directory."""
    config = ModelConfig.from_hf(path)
    quantize = checkpoint_quantize(path, quantize)
    abstract = nnx.eval_shape(
        lambda: MiniMaxForCausalLM(config, rngs=nnx.Rngs(0), param_dtype=dtype, quantize=quantize)
    )
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    _check_model_layout(nnx.to_pure_dict(params), config, dtype, quantize)
    if orbax_io.is_orbax_checkpoint(path / ORBAX_PARAMS_DIR):
        state = load_orbax_state(
            path / ORBAX_PARAMS_DIR, config, dtype=dtype, sharding=sharding, quantize=quantize
        )
    else:
        state = load_state(
            path, config, dtype=dtype, prefix=prefix, sharding=sharding, quantize=quantize
        )
    nnx.replace_by_pure_dict(params, mapping.unflatten(state))
    return nnx.merge(graphdef, params, rest)


def load_orbax_state(
    path: str | os.PathLike,
    config: ModelConfig,
    *,
    dtype: Any = jnp.float32,
    sharding: Callable[[mapping.LeafPath], jax.sharding.Sharding] | None = None,
    quantize: str | None = None,
) -> dict[mapping.LeafPath, jax.Array]:
    """Restores our Orbax checkpoint ``path`` (the ``params`` directory) as {leaf path: array}.

    Leaves are checked against ``mapping.expected_leaf_shapes`` first (every leaf named once,
    shapes equal; stored dtypes may differ and are cast on read, the router stays float32).
    ``quantize``: the scheme wanted; a checkpoint stored with it restores its int8 leaves as
    they are; a float checkpoint has the covered leaves read one at a time on the host,
    quantised and placed (see ``checkpoint_quantize`` for the other combinations).

    Raises:
      CheckpointMismatchError: listing unknown, missing and misshapen leaves.
    """
    reader = orbax_io.LeafReader(path)
    stored = orbax_io.stored_quantize(reader)
    if stored not in (None, quantize):
        raise ValueError(f"{path}: stored as {stored!r}, asked for {quantize!r}")
    expected = mapping.flatten(mapping.expected_leaf_shapes(config, dtype, stored))
    orbax_io.check_stored_leaves(reader, expected, str(path))
    int8 = {} if stored else mapping.int8_leaves(config, quantize)

    def place(p):
        if sharding is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return sharding(p)

    if not int8:
        target = {p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=place(p))
                  for p, s in expected.items()}  # fmt: skip
        return orbax_io.restore(path, target)
    # A float checkpoint quantised on load: leaf by leaf through TensorStore (host memory: one
    # leaf), int8 leaves quantised on the host before they are placed.
    state = {}
    for leaf, spec in expected.items():
        value = reader.read(leaf)
        if leaf in int8:
            q, scale = quant.quantize(value, int8[leaf])
            state[leaf + ("q",)] = jax.device_put(q, place(leaf + ("q",)))
            state[leaf + ("scale",)] = jax.device_put(scale, place(leaf + ("scale",)))
        else:
            state[leaf] = jax.device_put(value.astype(spec.dtype), place(leaf))
        del value
    return state


def logical_axes(
    config: ModelConfig, quantize: str | None = None
) -> dict[mapping.LeafPath, tuple[str | None, ...]]:
    """Logical axis names of every parameter leaf, read from the model's parameter metadata."""
    abstract = nnx.eval_shape(
        lambda: MiniMaxForCausalLM(config, rngs=nnx.Rngs(0), quantize=quantize)
    )
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {tuple(p): tuple(v.get_metadata()["logical_axes"]) for p, v in flat}


def sharding_from_rules(
    config: ModelConfig,
    mesh: jax.sharding.Mesh,
    rules: ShardingRules | Mapping[str, str | tuple[str, ...] | None],
    quantize: str | None = None,
) -> Callable[[mapping.LeafPath], jax.sharding.NamedSharding]:
    """``leaf path -> NamedSharding`` by `minimax_jax.sharding` rules (a ``ShardingRules`` or a
    mapping {logical axis: mesh axis, axes or None}, e.g. ``{"embed": "fsdp", "experts":
    "expert"}``). The same specs the model is created with: unlisted axes are replicated, and a
    mesh axis that is already used or does not divide the dimension is dropped for that leaf.
    ``quantize``: the leaves of that int8 scheme (scales split like the weights' outputs)."""
    if not isinstance(rules, ShardingRules):
        rules = ShardingRules.from_mapping(rules)
    axes = logical_axes(config, quantize)
    shapes = mapping.flatten(mapping.expected_leaf_shapes(config, quantize=quantize))

    def spec(path: mapping.LeafPath) -> jax.sharding.NamedSharding:
        return rules.sharding(mesh, axes[path], shapes[path].shape)

    return spec


def _check_model_layout(
    pure: dict, config: ModelConfig, dtype: Any | None, quantize: str | None = None
) -> None:
    """Parameter leaves must be exactly ``mapping.expected_leaf_shapes`` (dtypes unless None)."""

    def describe(s) -> tuple:
        return (tuple(np.shape(s)), None if dtype is None else str(np.dtype(s.dtype)))

    expected = mapping.expected_leaf_shapes(
        config, jnp.float32 if dtype is None else dtype, quantize
    )
    got = {p: describe(s) for p, s in mapping.flatten(pure).items()}
    want = {p: describe(s) for p, s in mapping.flatten(expected).items()}
    bad = [
        f"{'/'.join(map(str, p))}: {got.get(p)} vs {want.get(p)}"
        for p in sorted(set(got) | set(want), key=str)
        if got.get(p) != want.get(p)
    ]
    if bad:
        raise ValueError(
            "model parameters differ from minimax_jax.hf.mapping.expected_leaf_shapes (got vs "
            f"expected) at {'; '.join(bad)}: the model layout and the conversion table must "
            "change together"
        )


def export_tensors(
    params: dict, config: ModelConfig, *, schema: str, prefix: str = ""
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, numpy tensor) for ``params`` (nested dict in our layout), one at a time.

    Each tensor is sliced on device before the transfer, so host memory holds one HF tensor.
    The native schema adds the derived lightning buffers (float32) that transformers keeps.
    """
    _check_model_layout(params, config, None)
    flat = mapping.flatten(params)
    for a in mapping.export_assignments(config, naming="original", prefix=prefix):
        leaf = flat[a.leaf]
        yield a.name, a.layout.to_hf(np.asarray(jax.device_get(leaf[a.slot])))
    if schema == "native":
        yield from mapping.export_buffers(config, prefix)


def save_pretrained(
    model,
    path: str | os.PathLike,
    *,
    schema: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Writes ``model`` as an HF checkpoint directory; returns the file names written.

    Args:
      model: a ``MiniMaxForCausalLM`` (its ``config`` and ``nnx.Param`` leaves are used).
      path: local output directory (created; old weight files in it are replaced atomically).
        A URL is refused: save locally and copy, or use ``convert.hf_to_orbax`` /
        ``convert.orbax_to_hf``, whose ``--out_dir`` may be a URL.
      schema: ``"remote"`` (remote-code config, loadable by the MiniMax remote code and vLLM) or
        ``"native"`` (transformers ``MiniMaxForCausalLM``); default ``model.config.schema``.
      max_shard_bytes: shard size limit; one shard is written as ``model.safetensors``.
    """
    config: ModelConfig = model.config
    path = paths.local_only(path, "path")
    if getattr(model, "quantize", None) is not None:
        raise ValueError(
            f"the model holds int8 weights ({model.quantize}): an HF checkpoint of them would "
            "not be the original weights; save the unquantised model instead"
        )
    schema = config.schema if schema is None else schema
    hf_config = config.to_hf(schema)  # validates the schema before anything is written
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return write_sharded(
        path,
        export_tensors(params, config, schema=schema),
        max_shard_bytes=max_shard_bytes,
        extra_files={"config.json": json.dumps(hf_config, indent=2, sort_keys=True) + "\n"},
    )
