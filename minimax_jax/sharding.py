"""Device mesh, logical-axis rules, and the shardings they give parameters and activations.

The mesh has five named axes, always in this order (a size-1 axis costs nothing):

    data      pure data parallelism (parameters replicated)
    fsdp      data parallelism with parameters (and optimizer state) sharded over it
    expert    expert parallelism: MoE experts split over it; tokens are also batch-sharded over it
    tensor    tensor parallelism: attention heads, expert FFN width and vocab split over it
    sequence  sequence (context) parallelism: one long sequence's tokens split over it in
              contiguous shards (the `length` logical axis); lightning layers exchange their
              fp32 states, softmax layers all-gather K/V (`minimax_jax.model.sequence`)

Parameters carry logical axis names (`minimax_jax.model.layers`: layers, vocab, embed, heads,
kv_heads, head_dim, qkv, experts, mlp, gate_up); activations use batch, length, act_embed,
act_heads, act_vocab. A `ShardingRules` table maps each logical name to zero or more mesh axes.
`spec` drops, per array, mesh axes that do not divide the dimension or that an earlier dimension
already uses, so one table serves every model size and batch shape (a tiny model simply stays
replicated where it cannot be split). Presets live in `configs/mesh/*.yaml` (strict keys).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from minimax_jax import files, paths
from minimax_jax.distributed import distributed_args, maybe_initialize_distributed  # noqa: F401 - re-exported
from minimax_jax.presets import MESH_DIR

MESH_AXES = ("data", "fsdp", "expert", "tensor", "sequence")
PARAM_AXES = (
    "layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "qkv", "experts", "mlp",
    "gate_up",
)  # fmt: skip
ACTIVATION_AXES = ("batch", "length", "act_embed", "act_heads", "act_vocab")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES
MOE_IMPLS = ("sorted", "dense", "ep")


# ------------------------------------------------------------------------------------- mesh


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; exactly one may be -1 (= the devices left over)."""

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    sequence: int = 1

    def __post_init__(self):
        sizes = self.sizes()
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"MeshConfig sizes must be positive with at most one -1: {self}")

    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)

    @staticmethod
    def _show(sizes) -> str:
        return ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))

    def shape(self, num_devices: int) -> tuple[int, ...]:
        """Resolved sizes for num_devices devices (raises when they do not multiply out)."""
        sizes = self.sizes()
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh ({self._show(sizes)}): {num_devices} devices are not a "
                    f"multiple of the fixed axes' product {known}"
                )
            sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh ({self._show(sizes)}) needs {math.prod(sizes)} devices, "
                f"have {num_devices}: change a size or set one to -1"
            )
        return sizes


def make_mesh(config: MeshConfig | Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A Mesh over all (or the given) devices with axes (data, fsdp, expert, tensor, sequence).

    Axis types are Auto (GSPMD propagation + explicit constraints), whatever the JAX default.
    """
    if config is None:
        config = MeshConfig()
    elif isinstance(config, Mapping):
        unknown = set(config) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; allowed: {MESH_AXES}")
        config = MeshConfig(**config)
    maybe_initialize_distributed()
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def single_device_mesh() -> Mesh:
    """The five named axes, all of size 1, on the first device."""
    return make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Make mesh the ambient mesh (jax.set_mesh in JAX >= 0.7; jax.sharding.use_mesh before)."""
    setter = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
    if setter is None:  # pragma: no cover - very old JAX
        raise RuntimeError("this JAX has neither jax.set_mesh nor jax.sharding.use_mesh")
    with setter(mesh):
        yield mesh


# ------------------------------------------------------------------------------------ rules


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> tuple of mesh axes (hashable; usable inside static RunOptions)."""

    rules: tuple[tuple[str, tuple[str, ...]], ...]
    name: str = "custom"
    moe_impl: str = "sorted"  # the MoE path these rules are meant for

    def __post_init__(self):
        for logical, axes in self.rules:
            if logical not in LOGICAL_AXES:
                raise ValueError(f"rules: unknown logical axis {logical!r}; known: {LOGICAL_AXES}")
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise ValueError(f"rules: {logical} -> unknown mesh axes {bad}; use {MESH_AXES}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"rules: moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], **kwargs) -> ShardingRules:
        """{logical: None | "axis" | ["axis", ...]} -> ShardingRules."""

        def axes(v) -> tuple[str, ...]:
            if v is None:
                return ()
            return (v,) if isinstance(v, str) else tuple(v)

        return cls(tuple((k, axes(v)) for k, v in table.items()), **kwargs)

    def get(self, logical: str, default=None):
        """Mapping-style lookup (what `pretrained.sharding_from_rules` reads): axes or default."""
        return self.mesh_axes(logical) or default

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        for name, axes in self.rules:
            if name == logical:
                return axes
        return ()

    def spec(
        self, logical_axes: Sequence[str | None], mesh: Mesh | None = None, shape=None
    ) -> PartitionSpec:
        """PartitionSpec for an array with these logical axes (and, if given, shape on mesh)."""
        used: set[str] = set()
        out = []
        for i, logical in enumerate(logical_axes):
            dim = None if shape is None else shape[i]
            kept = []
            for axis in self.mesh_axes(logical):
                size = 1 if mesh is None else mesh.shape[axis]
                if axis in used or (mesh is not None and size == 1):
                    continue
                if dim is not None and dim % (math.prod(mesh.shape[a] for a in kept) * size):
                    continue
                kept.append(axis)
            used.update(kept)
            out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
        return PartitionSpec(*out)

    def sharding(self, mesh: Mesh, logical_axes: Sequence[str | None], shape=None):
        return NamedSharding(mesh, self.spec(logical_axes, mesh, shape))


_PRESET_KEYS = {"description", "mesh", "rules", "moe_impl"}


def load_rules(name_or_path: str | os.PathLike) -> tuple[ShardingRules, MeshConfig]:
    """Rules and default mesh sizes from a preset name (`configs/mesh/<name>.yaml`) or a path.

    Keys (strict): description, mesh {data, fsdp, expert, tensor, sequence}, rules {logical: axes},
    moe_impl (sorted | dense | ep).
    """
    path = paths.local_only(name_or_path, "sharding rules")  # a preset name or a local YAML
    if not path.suffix:
        path = MESH_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        names = sorted(p.stem for p in MESH_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no mesh preset {str(name_or_path)!r}; presets: {names}")
    raw = files.read_mapping(path, "a sharding rules YAML file", kind="yaml")
    unknown = set(raw) - _PRESET_KEYS
    if unknown or "rules" not in raw:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} or no 'rules'; "
                         f"allowed keys: {sorted(_PRESET_KEYS)}")  # fmt: skip
    mesh_cfg = raw.get("mesh") or {}
    bad = set(mesh_cfg) - set(MESH_AXES)
    if bad:
        raise ValueError(f"{path}: unknown mesh axes {sorted(bad)}; allowed: {MESH_AXES}")
    rules = ShardingRules.from_mapping(
        raw["rules"], name=path.stem, moe_impl=raw.get("moe_impl", "sorted")
    )
    return rules, MeshConfig(**mesh_cfg)


def presets() -> list[str]:
    """Names of the rules presets in configs/mesh."""
    return sorted(p.stem for p in MESH_DIR.glob("*.yaml"))


# ------------------------------------------------------------------ params and activations


def _is_variable(x) -> bool:
    return hasattr(x, "get_metadata") and hasattr(x, "get_value")


def _leaf_axes(variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("logical_axes")
    shape = np.shape(variable.get_value())
    if axes is None or len(axes) != len(shape):
        raise ValueError(f"parameter of shape {shape} has no matching logical_axes ({axes})")
    return tuple(axes)


def param_shardings(params_state, mesh: Mesh, rules: ShardingRules):
    """nnx.State of Params (real or abstract) -> the same tree with NamedSharding leaves.

    Use `nnx.to_pure_dict` on the result to match `model.pure_params()` (blocks as int keys).
    """

    def one(v):
        return rules.sharding(mesh, _leaf_axes(v), np.shape(v.get_value()))

    return jax.tree.map(one, params_state, is_leaf=_is_variable)


def pure_param_shardings(params_state, mesh: Mesh, rules: ShardingRules) -> dict:
    """Like `param_shardings`, as a nested dict shaped like `model.pure_params()`."""
    from flax import nnx

    tree = nnx.to_pure_dict(param_shardings(params_state, mesh, rules))
    blocks = tree["blocks"]
    tree["blocks"] = [blocks[i] for i in sorted(blocks, key=int)]
    return tree


def leaf_sharding_fn(pure_shardings: dict):
    """Nested dict of shardings -> `leaf path -> Sharding` (for `pretrained.from_pretrained`)."""

    def get(path: Sequence[Any]):
        node = pure_shardings
        for key in path:
            node = node[int(key)] if isinstance(node, list) else node[key]
        return node

    return get


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh, rules) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op without mesh or rules."""
    if mesh is None or rules is None:
        return x
    return jax.lax.with_sharding_constraint(x, rules.sharding(mesh, logical_axes, x.shape))
