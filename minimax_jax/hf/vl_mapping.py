"""MiniMax-VL-01 checkpoint names <-> our VL parameter leaves (both directions, one table).

The text model keeps ``hf.mapping`` (its names behind the prefix ``language_model.``). The
rest of a VL-01 checkpoint (SPEC, section VL-01) maps as follows; ``{i}`` is the vision layer,
which fills slot ``i`` of the leaf stacked over layers::

    vision_tower.vision_model.embeddings.patch_embedding.weight [D, C, p, p] -> embed.patch
        [C, p, p, D];  .class_embedding [D] -> embed.cls;  .position_embedding.weight [S, D] ->
        embed.pos
    vision_tower.vision_model.pre_layrnorm.{weight,bias} [D] -> pre_norm.{scale,bias}
    vision_tower.vision_model.encoder.layers.{i}.
        self_attn.{q,k,v}_proj.weight [N*H, D] -> layers.{q,k,v} [L, D, N, H]; .bias -> *_bias
        self_attn.out_proj.weight [D, N*H] -> layers.o [L, N, H, D]; .bias -> o_bias [L, D]
        layer_norm{1,2}.{weight,bias} -> layers.ln{1,2}_{scale,bias} [L, D]
        mlp.fc1.weight [F, D] -> layers.fc1 [L, D, F]; mlp.fc2.weight [D, F] -> layers.fc2
    multi_modal_projector.linear_{1,2}.{weight,bias} -> projector.{w1,b1,w2,b2}
    image_newline [E] -> image_newline

Our leaves sit under ``vision_tower`` / ``projector`` / ``image_newline`` and the text leaves
under ``language_model``. Tensors that CLIP checkpoints may carry but VL-01 never uses
(``post_layernorm``, ``embeddings.position_ids``) are accepted on load and dropped, never written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minimax_jax.hf import mapping
from minimax_jax.hf import orbax as orbax_io
from minimax_jax.hf.mapping import (
    HEADS_IN,
    HEADS_NORM,
    HEADS_OUT,
    IDENTITY,
    IDENTITY_2D,
    TRANSPOSE,
    Assignment,
    CheckpointMismatchError,
    Layout,
    LeafPath,
)
from minimax_jax.hf.pretrained import check_buffers
from minimax_jax.hf.safetensors import SafetensorsReader
from minimax_jax.vl.vision import VLConfig

TEXT_PREFIX = "language_model."
VISION_PREFIX = "vision_tower.vision_model."
PATCH_CONV = Layout("patch_conv", (1, 2, 3, 0), (1, 1, 1, 1))  # [D, C, p, p] -> [C, p, p, D]
# Unused by VL-01; dropped when a checkpoint has them.
IGNORED = (
    VISION_PREFIX + "post_layernorm.weight",
    VISION_PREFIX + "post_layernorm.bias",
    VISION_PREFIX + "embeddings.position_ids",
)


@dataclasses.dataclass(frozen=True)
class VLRule:
    """HF name (``{i}``: vision layer) -> leaf under our VL tree, with its layout hook."""

    name: str
    leaf: LeafPath
    layout: Layout

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name


def _layer_rules() -> list[VLRule]:
    pre = VISION_PREFIX + "encoder.layers.{i}."
    leaf = ("vision_tower", "layers")
    rules = []
    for x in ("q", "k", "v"):
        rules.append(VLRule(pre + f"self_attn.{x}_proj.weight", (*leaf, x), HEADS_IN))
        rules.append(VLRule(pre + f"self_attn.{x}_proj.bias", (*leaf, f"{x}_bias"), HEADS_NORM))
    rules.append(VLRule(pre + "self_attn.out_proj.weight", (*leaf, "o"), HEADS_OUT))
    rules.append(VLRule(pre + "self_attn.out_proj.bias", (*leaf, "o_bias"), IDENTITY))
    for n in ("1", "2"):
        rules.append(VLRule(pre + f"layer_norm{n}.weight", (*leaf, f"ln{n}_scale"), IDENTITY))
        rules.append(VLRule(pre + f"layer_norm{n}.bias", (*leaf, f"ln{n}_bias"), IDENTITY))
        rules.append(VLRule(pre + f"mlp.fc{n}.weight", (*leaf, f"fc{n}"), TRANSPOSE))
        rules.append(VLRule(pre + f"mlp.fc{n}.bias", (*leaf, f"fc{n}_bias"), IDENTITY))
    return rules


VL_RULES: tuple[VLRule, ...] = (
    VLRule(
        VISION_PREFIX + "embeddings.class_embedding", ("vision_tower", "embed", "cls"), IDENTITY
    ),
    VLRule(
        VISION_PREFIX + "embeddings.patch_embedding.weight",
        ("vision_tower", "embed", "patch"),
        PATCH_CONV,
    ),
    VLRule(
        VISION_PREFIX + "embeddings.position_embedding.weight",
        ("vision_tower", "embed", "pos"),
        IDENTITY_2D,
    ),
    VLRule(VISION_PREFIX + "pre_layrnorm.weight", ("vision_tower", "pre_norm", "scale"), IDENTITY),
    VLRule(VISION_PREFIX + "pre_layrnorm.bias", ("vision_tower", "pre_norm", "bias"), IDENTITY),
    *_layer_rules(),
    VLRule("multi_modal_projector.linear_1.weight", ("projector", "w1"), TRANSPOSE),
    VLRule("multi_modal_projector.linear_1.bias", ("projector", "b1"), IDENTITY),
    VLRule("multi_modal_projector.linear_2.weight", ("projector", "w2"), TRANSPOSE),
    VLRule("multi_modal_projector.linear_2.bias", ("projector", "b2"), IDENTITY),
    VLRule("image_newline", ("image_newline",), IDENTITY),
)


def vision_leaf_shapes(config: VLConfig) -> dict[LeafPath, tuple[int, ...]]:
    """Shapes of every non-text leaf of ``MiniMaxVLForConditionalGeneration``."""
    v, e = config.vision, config.text.hidden_size
    L, d, n, h, f = v.num_layers, v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size
    p, c = v.patch_size, v.num_channels
    layers = {
        "q": (L, d, n, h),
        "k": (L, d, n, h),
        "v": (L, d, n, h),
        "o": (L, n, h, d),
        "q_bias": (L, n, h),
        "k_bias": (L, n, h),
        "v_bias": (L, n, h),
        "o_bias": (L, d),
        "ln1_scale": (L, d),
        "ln1_bias": (L, d),
        "ln2_scale": (L, d),
        "ln2_bias": (L, d),
        "fc1": (L, d, f),
        "fc1_bias": (L, f),
        "fc2": (L, f, d),
        "fc2_bias": (L, d),
    }
    out: dict[LeafPath, tuple[int, ...]] = {
        ("vision_tower", "embed", "patch"): (c, p, p, d),
        ("vision_tower", "embed", "cls"): (d,),
        ("vision_tower", "embed", "pos"): (v.num_patches + 1, d),
        ("vision_tower", "pre_norm", "scale"): (d,),
        ("vision_tower", "pre_norm", "bias"): (d,),
    }
    out.update({("vision_tower", "layers", k): s for k, s in layers.items()})
    out.update(
        {
            ("projector", "w1"): (d, e),
            ("projector", "b1"): (e,),
            ("projector", "w2"): (e, e),
            ("projector", "b2"): (e,),
            ("image_newline",): (e,),
        }
    )
    return out


def expected_leaf_shapes(config: VLConfig, dtype=jnp.float32) -> dict:
    """Nested dict of ``jax.ShapeDtypeStruct`` for every leaf of the VL model (text router fp32)."""
    tree = {"language_model": mapping.expected_leaf_shapes(config.text, dtype)}
    flat = {p: jax.ShapeDtypeStruct(s, dtype) for p, s in vision_leaf_shapes(config).items()}
    tree.update(mapping.unflatten(flat))
    return tree


def vision_assignments(config: VLConfig) -> list[Assignment]:
    """Every non-text HF tensor of a VL-01 checkpoint as an ``Assignment``, in table order."""
    shapes = vision_leaf_shapes(config)
    out = []
    for rule in VL_RULES:
        shape = shapes[rule.leaf]
        if rule.per_layer:
            for i in range(config.vision.num_layers):
                out.append(
                    Assignment(rule.name.format(i=i), rule.leaf, (i,), shape[1:], rule.layout)
                )
        else:
            out.append(Assignment(rule.name, rule.leaf, (), shape, rule.layout))
    return out


def export_assignments(config: VLConfig) -> list[Assignment]:
    """All tensors written for a VL-01 checkpoint: text (remote per-expert names) then vision.

    Text assignments have their leaf paths under ``("language_model", ...)``.
    """
    text = [
        dataclasses.replace(a, leaf=("language_model", *a.leaf))
        for a in mapping.export_assignments(config.text, naming="original", prefix=TEXT_PREFIX)
    ]
    return text + vision_assignments(config)


def expected_names(config: VLConfig) -> list[str]:
    """The HF tensor names of a VL-01 checkpoint (8,637 for the real model)."""
    return [a.name for a in export_assignments(config)]


@dataclasses.dataclass(frozen=True)
class VLLoadPlan:
    """Text plan (``minimax_jax.hf.mapping.LoadPlan``, leaves without the ``language_model`` key),
    vision assignments (leaves with their full path) and the names dropped."""

    text: mapping.LoadPlan
    vision: list[Assignment]
    ignored: list[str]


def plan_load(
    config: VLConfig,
    names: Iterable[str],
    *,
    meta: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
    where: str = "checkpoint",
) -> VLLoadPlan:
    """Maps a VL-01 checkpoint's tensor names onto our leaves, validating all of it at once.

    Raises:
      CheckpointMismatchError: unknown, missing, duplicated, misshapen or non-float tensors (the
        text part's problems are reported by ``minimax_jax.hf.mapping.plan_load``).
    """
    names = list(names)
    text_names = [n for n in names if n.startswith(TEXT_PREFIX)]
    rest = [n for n in names if not n.startswith(TEXT_PREFIX)]
    text_meta = None if meta is None else {n: meta[n] for n in text_names}
    text_plan = mapping.plan_load(
        config.text, text_names, meta=text_meta, prefix=TEXT_PREFIX, where=where
    )
    wanted = {a.name: a for a in vision_assignments(config)}
    seen: set[str] = set()
    problems: dict[str, list[str]] = {
        "unknown tensors": [],
        "missing tensors": [],
        "duplicate tensors": [],
        "wrong shapes": [],
        "wrong dtypes": [],
    }
    for n in rest:
        if n in seen:
            problems["duplicate tensors"].append(n)
        seen.add(n)
        if n not in wanted and n not in IGNORED:
            problems["unknown tensors"].append(n)
    problems["missing tensors"] = [n for n in wanted if n not in seen]
    for n, a in wanted.items() if meta is not None else ():
        if n not in seen:
            continue
        shape, code = meta[n]
        if tuple(shape) != a.hf_shape:
            problems["wrong shapes"].append(f"{n}: {list(shape)}, expected {list(a.hf_shape)}")
        if code not in mapping.FLOAT_CODES:
            problems["wrong dtypes"].append(f"{n}: {code}, expected one of {mapping.FLOAT_CODES}")
    if any(problems.values()):
        raise CheckpointMismatchError(where, problems)
    return VLLoadPlan(text_plan, list(wanted.values()), [n for n in rest if n in IGNORED])


def fill_leaves(
    read, assignments: Iterable[Assignment], specs: Mapping[LeafPath, Any]
) -> dict[LeafPath, np.ndarray]:
    """{leaf: host array} with every slot filled by ``layout.to_ours(read(name))``.

    ``read(name) -> np.ndarray`` gives one HF tensor; ``specs[leaf]`` has the leaf's ``shape``
    and ``dtype`` (e.g. a ``jax.ShapeDtypeStruct``), which values are cast to.
    """
    by_leaf: dict[LeafPath, list[Assignment]] = {}
    for a in assignments:
        by_leaf.setdefault(a.leaf, []).append(a)
    out = {}
    for leaf, items in by_leaf.items():
        arr = np.empty(specs[leaf].shape, np.dtype(specs[leaf].dtype))
        for a in items:
            hf = np.asarray(read(a.name))
            arr[a.slot] = a.layout.to_ours(hf, a.slot_shape).astype(arr.dtype)
        out[leaf] = arr
    return out


def export_vision(config: VLConfig, params: Mapping) -> Iterable[tuple[str, np.ndarray]]:
    """Yields (HF name, numpy tensor) of the non-text leaves of a VL parameter tree (nested dict
    keyed as ``vision_leaf_shapes``), one tensor at a time."""
    flat = mapping.flatten(params)
    for a in vision_assignments(config):
        yield a.name, a.layout.to_hf(np.asarray(jax.device_get(flat[a.leaf][a.slot])))


# ----------------------------------------------------------------------------- whole checkpoints


def _by_leaf(plan: VLLoadPlan) -> dict[LeafPath, list[Assignment]]:
    """Every assignment of a plan grouped by full leaf path (text under ``language_model``)."""
    out: dict[LeafPath, list[Assignment]] = {}
    for leaf, items in plan.text.by_leaf.items():
        out[("language_model", *leaf)] = [
            dataclasses.replace(a, leaf=("language_model", *leaf)) for a in items
        ]
    for a in plan.vision:
        out.setdefault(a.leaf, []).append(a)
    return out


def _open_hf(path: Path) -> tuple[VLConfig, Any, VLLoadPlan]:
    config = VLConfig.from_hf(json.loads((path / "config.json").read_text()))
    reader = SafetensorsReader(path)
    meta = {n: (reader.info(n).shape, reader.info(n).dtype) for n in reader.names()}
    plan = plan_load(config, reader.names(), meta=meta, where=str(path))
    check_buffers(reader, config.text, plan.text, str(path))
    return config, reader, plan


def load_hf_state(path: str | os.PathLike, dtype=jnp.float32) -> dict[LeafPath, jax.Array]:
    """An HF VL-01 directory -> {leaf path: array} (validated first, one leaf at a time)."""
    config, reader, plan = _open_hf(Path(path))
    specs = mapping.flatten(expected_leaf_shapes(config, dtype))
    state = {}
    for leaf, items in _by_leaf(plan).items():
        state[leaf] = jnp.asarray(fill_leaves(reader.read, items, specs)[leaf])
    return state


def hf_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=jnp.float32) -> None:
    """Converts an HF VL-01 directory to ours: ``dst/config.json`` + ``dst/params`` (Orbax, one
    zarr array per leaf written slot by slot with ``minimax_jax.hf.orbax``; router kept fp32)."""
    src, dst = Path(src), Path(dst)
    config, reader, plan = _open_hf(src)
    specs = mapping.flatten(expected_leaf_shapes(config, dtype))
    writer = orbax_io.LeafWriter(dst / "params")
    try:
        for leaf, items in _by_leaf(plan).items():
            spec, np_dtype = specs[leaf], np.dtype(specs[leaf].dtype)
            unit = tuple(
                sorted({i for a in items for i, s in enumerate(a.slot) if s != slice(None)})
            )
            chunks = orbax_io.chunk_shape(spec.shape, np_dtype.itemsize, unit_axes=unit)
            writer.create(leaf, spec.shape, np_dtype, chunks)
            for a in items:
                value = a.layout.to_ours(reader.read(a.name), a.slot_shape).astype(np_dtype)
                writer.write(leaf, a.slot, value)
    except BaseException:
        writer.abort()
        raise
    writer.finish(custom_metadata={"minimax_jax": {"layout_version": 1, "model": "minimax_vl_01"}})
    shutil.copyfile(src / "config.json", dst / "config.json")


def load_orbax_state(
    path: str | os.PathLike, config: VLConfig, dtype=jnp.float32
) -> dict[LeafPath, jax.Array]:
    """Our Orbax ``params`` directory -> {leaf path: array} (leaves and shapes checked first)."""
    stored = orbax_io.LeafReader(path).leaves
    specs = mapping.flatten(expected_leaf_shapes(config, dtype))
    problems = {
        "unknown leaves": [orbax_io.leaf_key(p) for p in stored if p not in specs],
        "missing leaves": [orbax_io.leaf_key(p) for p in specs if p not in stored],
        "wrong shapes": [
            f"{orbax_io.leaf_key(p)}: {list(stored[p][0])}, expected {list(s.shape)}"
            for p, s in specs.items()
            if p in stored and tuple(stored[p][0]) != tuple(s.shape)
        ],
    }
    if any(problems.values()):
        raise CheckpointMismatchError(str(path), problems)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device) for p, s in specs.items()}
    return orbax_io.restore(path, target)
