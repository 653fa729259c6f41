"""HF checkpoint names <-> minimax_jax parameter leaves: one table of rules, both directions.

Our parameters (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``; layers ``l = b * period + p``
stacked on axis 0 of ``blocks[p]``, NB = num_blocks)::

    embed [V, D]   final_norm [D]   lm_head [D, V] (untied only)
    blocks[p].input_norm / post_attn_norm [NB, D]
    blocks[p].attn  lightning: qkv [NB, D, N, 3, H], gate [NB, D, N, H], norm [NB, N, H],
                               out [NB, N, H, D]
                    softmax:   q [NB, D, N, H], k / v [NB, D, K, H], o [NB, N, H, D]
    blocks[p].moe   router [NB, D, E] (always float32), wi [NB, E, D, 2, F] (0 = w1 gate,
                    1 = w3 up), wo [NB, E, F, D]

Each ``Rule`` maps an HF name template (fields ``{layer}``, ``{expert}``) to a leaf, a *slot* in
that leaf (which block ``b``, expert ``e`` and fixed indices it fills) and a ``Layout`` hook: a
reshape + transpose with an exact inverse, so export is the same table read backwards.
MoE namings that load (all that transformers 5.23 reads): the remote-code per-expert names
``block_sparse_moe.{gate, experts.{e}.w1/w2/w3}`` (the real M1, and what transformers
``save_pretrained`` writes by default: it converts back), transformers' fused in-memory names
``mlp.{gate, experts.gate_up_proj [E, 2F, D] = cat(w1, w3), experts.down_proj [E, D, F]}``
(written with ``save_original_format=False``), and the two mixes of module name and expert form.
Export always writes the remote-code per-expert names. Native checkpoints also carry derived
lightning buffers (``slope_rate``, ``query_decay``, ``key_decay``, ``diagonal_decay``): they are
checked against our decay formula and dropped. ``prefix`` (e.g. ``"language_model."`` for
VL-01) is prepended to every template.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from minimax_jax.config import FULL, LINEAR, ModelConfig

LeafPath = tuple[str | int, ...]
ROUTER = "router"  # leaf name kept in float32 whatever the parameter dtype
FLOAT_CODES = ("F64", "F32", "F16", "BF16")  # safetensors dtypes we accept for parameters


class CheckpointMismatchError(ValueError):
    """Checkpoint tensors do not match the config; lists every offending name by problem."""

    def __init__(self, where: str, problems: Mapping[str, list[str]]) -> None:
        self.problems = {k: list(v) for k, v in problems.items() if v}
        count = sum(len(v) for v in self.problems.values())
        lines = [f"{where}: {count} tensor problem(s) against the config"]
        for kind, names in self.problems.items():
            lines.append(f"  {kind} ({len(names)}):")
            lines.extend(f"    {n}" for n in names)
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------- layout hooks


@dataclasses.dataclass(frozen=True)
class Layout:
    """Transform hook between an HF tensor and our slot, with an exact inverse.

    ``to_ours(x) = x.reshape(split).transpose(perm)`` where ``split`` is the slot shape with
    axes un-permuted; HF axis i is the product of the next ``groups[i]`` split axes.
    """

    name: str
    perm: tuple[int, ...]
    groups: tuple[int, ...]

    def split_shape(self, slot_shape: tuple[int, ...]) -> tuple[int, ...]:
        split = [0] * len(self.perm)
        for i, p in enumerate(self.perm):
            split[p] = slot_shape[i]
        return tuple(split)

    def hf_shape(self, slot_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the HF tensor that fills a slot of ``slot_shape``."""
        split, out, i = self.split_shape(slot_shape), [], 0
        for g in self.groups:
            out.append(math.prod(split[i : i + g]))
            i += g
        return tuple(out)

    def to_ours(self, x: np.ndarray, slot_shape: tuple[int, ...]) -> np.ndarray:
        """HF tensor -> slot array (a view when possible)."""
        return x.reshape(self.split_shape(slot_shape)).transpose(self.perm)

    def to_hf(self, y: np.ndarray) -> np.ndarray:
        """Slot array -> HF tensor (contiguous)."""
        inv = tuple(int(i) for i in np.argsort(self.perm))
        return np.ascontiguousarray(y.transpose(inv).reshape(self.hf_shape(y.shape)))


IDENTITY = Layout("identity", (0,), (1,))  # [D] -> [D]
IDENTITY_2D = Layout("identity_2d", (0, 1), (1, 1))  # [V, D] -> [V, D]
TRANSPOSE = Layout("transpose", (1, 0), (1, 1))  # [A, B] -> [B, A]
# qkv_proj [3*N*H, D] head-major: split [N, 3, H, D] -> [D, N, 3, H].
QKV_HEAD_MAJOR = Layout("qkv_head_major", (3, 0, 1, 2), (3, 1))
HEADS_IN = Layout("heads_in", (2, 0, 1), (2, 1))  # [n*H, D] -> [D, n, H]
HEADS_OUT = Layout("heads_out", (1, 2, 0), (1, 2))  # [D, N*H] -> [N, H, D]
HEADS_NORM = Layout("heads_norm", (0, 1), (2,))  # [N*H] -> [N, H]
FUSED_GATE_UP = Layout("fused_gate_up", (0, 3, 1, 2), (1, 2, 1))  # [E, 2F, D] -> [E, D, 2, F]
FUSED_DOWN = Layout("fused_down", (0, 2, 1), (1, 1, 1))  # [E, D, F] -> [E, F, D]


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF name family -> one leaf slot.

    ``leaf`` is the path under ``blocks[p]`` for per-layer templates (with ``{layer}``), else the
    top-level path. ``index`` gives one token per leading leaf axis: ``"b"`` block of the layer,
    ``"e"`` expert, an int (fixed index) or ``":"`` (whole axis); omitted trailing axes are whole.
    ``layer_type`` restricts per-layer rules; ``naming`` is "any", "original" (remote-code
    per-expert names, what gets exported), "fused" (transformers in-memory names) or "alias"
    (read, never written); ``untied_only`` for lm_head.
    """

    template: str
    leaf: tuple[str, ...]
    index: tuple[str | int, ...]
    layout: Layout
    layer_type: str | None = None
    naming: str = "any"
    untied_only: bool = False

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.template


_L = "model.layers.{layer}."


def _moe_rules() -> tuple[Rule, ...]:
    """MoE rules for every naming transformers 5.23 reads: module ``block_sparse_moe`` (remote
    code; transformers renames it to ``mlp``) or ``mlp``, experts per-expert or fused. Only the
    remote-code per-expert form is "original" (exported); ``mlp`` + fused is what transformers
    writes with ``save_original_format=False``; the two mixed forms are accepted aliases."""
    rules = []
    for module in ("block_sparse_moe", "mlp"):
        m = _L + module + "."
        x = m + "experts.{expert}."
        per_expert = "original" if module == "block_sparse_moe" else "alias"
        fused = "fused" if module == "mlp" else "alias"
        rules += [
            Rule(
                m + "gate.weight",
                ("moe", ROUTER),
                ("b",),
                TRANSPOSE,
                naming="original" if module == "block_sparse_moe" else "fused",
            ),
            Rule(x + "w1.weight", ("moe", "wi"), ("b", "e", ":", 0), TRANSPOSE, naming=per_expert),
            Rule(x + "w3.weight", ("moe", "wi"), ("b", "e", ":", 1), TRANSPOSE, naming=per_expert),
            Rule(x + "w2.weight", ("moe", "wo"), ("b", "e"), TRANSPOSE, naming=per_expert),
            Rule(m + "experts.gate_up_proj", ("moe", "wi"), ("b",), FUSED_GATE_UP, naming=fused),
            Rule(m + "experts.down_proj", ("moe", "wo"), ("b",), FUSED_DOWN, naming=fused),
        ]
    return tuple(rules)


RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed",), (), IDENTITY_2D),
    Rule("model.norm.weight", ("final_norm",), (), IDENTITY),
    Rule("lm_head.weight", ("lm_head",), (), TRANSPOSE, untied_only=True),
    Rule(_L + "input_layernorm.weight", ("input_norm",), ("b",), IDENTITY),
    Rule(_L + "post_attention_layernorm.weight", ("post_attn_norm",), ("b",), IDENTITY),
    Rule(_L + "self_attn.qkv_proj.weight", ("attn", "qkv"), ("b",), QKV_HEAD_MAJOR, LINEAR),
    Rule(_L + "self_attn.output_gate.weight", ("attn", "gate"), ("b",), HEADS_IN, LINEAR),
    Rule(_L + "self_attn.norm.weight", ("attn", "norm"), ("b",), HEADS_NORM, LINEAR),
    Rule(_L + "self_attn.out_proj.weight", ("attn", "out"), ("b",), HEADS_OUT, LINEAR),
    Rule(_L + "self_attn.q_proj.weight", ("attn", "q"), ("b",), HEADS_IN, FULL),
    Rule(_L + "self_attn.k_proj.weight", ("attn", "k"), ("b",), HEADS_IN, FULL),
    Rule(_L + "self_attn.v_proj.weight", ("attn", "v"), ("b",), HEADS_IN, FULL),
    Rule(_L + "self_attn.o_proj.weight", ("attn", "o"), ("b",), HEADS_OUT, FULL),
    *_moe_rules(),
)


def _regex(template: str, prefix: str) -> re.Pattern:
    parts = re.split(r"(\{layer\}|\{expert\})", prefix + template)
    body = "".join(
        f"(?P<{p[1:-1]}>0|[1-9][0-9]*)" if p in ("{layer}", "{expert}") else re.escape(p)
        for p in parts
    )
    return re.compile(body + r"\Z")


# ----------------------------------------------------------------------------- our leaves


def expected_leaf_shapes(config: ModelConfig, dtype=jnp.float32, quantize=None) -> dict:
    """Nested dict (block positions as int keys) of ``jax.ShapeDtypeStruct`` for every parameter
    leaf of ``MiniMaxForCausalLM(config, param_dtype=dtype, quantize=quantize)`` (from the
    config's parameter layout); the router is always float32; a weight the ``quantize`` scheme
    covers is two leaves, ``.../q`` int8 and ``.../scale`` float32."""

    def leaf(spec):
        kind = jnp.int8 if spec.int8 else jnp.float32 if spec.float32 else dtype
        return jax.ShapeDtypeStruct(spec.shape, kind)

    flat: dict[LeafPath, object] = {
        (name,): leaf(spec) for name, spec in config.outer_param_layout().items()
    }
    for p, kind in enumerate(config.block_pattern):
        for name, spec in config.layer_param_layout(kind, quantize).items():
            flat[("blocks", p, *name.split("."))] = leaf(spec.stacked(config.num_blocks))
    return unflatten(flat)


def slot_axes(slot: tuple, axes: tuple[int, ...]) -> tuple[int, ...]:
    """Axes of a leaf numbered in ``leaf[slot]`` (the axes a slot indexes with an int drop out;
    ``axes`` must not be among them)."""
    dropped = [i for i, s in enumerate(slot) if isinstance(s, int)]
    return tuple(a - sum(d < a for d in dropped) for a in axes)


def int8_leaves(config: ModelConfig, quantize: str | None) -> dict[LeafPath, tuple[int, ...]]:
    """{float leaf path: its contracted axes (stacked numbering)} of the weights ``quantize``
    stores as int8 pairs (``leaf + ("q",)``, ``leaf + ("scale",)``); empty for None."""
    out = {}
    for p, kind in enumerate(config.block_pattern):
        for name, spec in config.layer_param_layout(kind).items():
            if spec.quantized_by(quantize):
                out[("blocks", p, *name.split("."))] = spec.stacked(config.num_blocks).contract
    return out


def num_params(config: ModelConfig) -> int:
    """Total parameter count of the layout (``ModelConfig.param_count``)."""
    return config.param_count()


def flatten(tree: Mapping) -> dict[LeafPath, object]:
    """Nested dict -> {path tuple: leaf}. Lists count as int-keyed dicts (``model.pure_params()``
    gives the blocks as a list); anything else that is not a Mapping is a leaf."""
    out: dict[LeafPath, object] = {}
    for key, value in tree.items():
        if isinstance(value, list):
            value = dict(enumerate(value))
        if isinstance(value, Mapping):
            out.update({(key, *p): v for p, v in flatten(value).items()})
        else:
            out[(key,)] = value
    return out


def unflatten(flat: Mapping[LeafPath, object]) -> dict:
    """{path tuple: leaf} -> nested dict."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


# ----------------------------------------------------------------------------- derived buffers


def _slopes(config: ModelConfig, layer: int) -> np.ndarray:
    """Our decay rates of lightning layer ``layer`` as float64 [N, 1, 1]."""
    return config.lightning_slopes(layer).astype(np.float64)[:, None, None]


def _query_decay(config: ModelConfig, layer: int) -> np.ndarray:
    """exp(-s * (i + 1)) for block position i: [N, C, 1]."""
    i = np.arange(1, config.block_size + 1, dtype=np.float64)[:, None]
    return np.exp(-_slopes(config, layer) * i)


def _key_decay(config: ModelConfig, layer: int) -> np.ndarray:
    """exp(-s * (C - 1 - i)) for block position i: [N, C, 1]."""
    i = np.arange(1, config.block_size + 1, dtype=np.float64)[:, None]
    return np.exp(-_slopes(config, layer) * (config.block_size - i))


def _diagonal_decay(config: ModelConfig, layer: int) -> np.ndarray:
    """exp(-s * (j - i)) for j >= i else 0: [1, N, C, C]."""
    i = np.arange(config.block_size, dtype=np.float64)
    dist = i[:, None] - i[None, :]
    decay = np.exp(-_slopes(config, layer) * np.maximum(dist, 0.0))
    return np.where(dist >= 0, decay, 0.0)[None]


@dataclasses.dataclass(frozen=True)
class Derived:
    """A buffer transformers stores for lightning layers; recomputed by us, so checked + dropped."""

    template: str
    value: Callable[[ModelConfig, int], np.ndarray]  # float64, HF shape
    shape: Callable[[ModelConfig], tuple[int, ...]]


def _per_position(c: ModelConfig) -> tuple[int, ...]:
    return (c.num_heads, c.block_size, 1)


DERIVED: tuple[Derived, ...] = (
    Derived(_L + "self_attn.slope_rate", _slopes, lambda c: (c.num_heads, 1, 1)),
    Derived(_L + "self_attn.query_decay", _query_decay, _per_position),
    Derived(_L + "self_attn.key_decay", _key_decay, _per_position),
    Derived(
        _L + "self_attn.diagonal_decay",
        _diagonal_decay,
        lambda c: (1, c.num_heads, c.block_size, c.block_size),
    ),
)


def _log_error(got: np.ndarray, expected: np.ndarray, dtype: np.dtype) -> float:
    """Worst error of stored slopes/decays in log space, relative to |log expected| + 1.

    The buffers are s or exp(-s x) computed *in the stored dtype*, so their error is relative to
    the exponent s x (bf16: ~5e-2 measured for transformers built in bf16; fp32: ~1e-6), not to
    the value. Values below ``floor`` (underflow, the zero upper triangle) must stay below
    2 * floor. Returns inf for non-finite or sign-wrong values.
    """
    floor = max(1e-20, float(ml_dtypes.finfo(dtype).tiny) * 100)
    big = expected > floor
    if not np.all(np.isfinite(got)) or np.any(got[big] <= 0):
        return float("inf")
    if np.any(np.abs(got[~big]) > 2 * floor):
        return float("inf")
    if not np.any(big):
        return 0.0
    log_e = np.log(expected[big])
    return float(np.max(np.abs(np.log(got[big]) - log_e) / (np.abs(log_e) + 1)))


def check_derived(
    config: ModelConfig, derived: Derived, layer: int, array: np.ndarray
) -> str | None:
    """None if a stored buffer matches our formula (tolerance from its dtype), else the reason.

    Tolerance (see ``_log_error``): 1e-4 for 32/64-bit buffers (the remote and native slope
    formulas differ by ~1e-5 and both pass), 8e-2 for 16-bit ones (bf16 arithmetic).
    """
    expected = derived.value(config, layer)
    if array.shape != expected.shape:
        return f"shape {list(array.shape)}, expected {list(expected.shape)}"
    tol = 1e-4 if array.dtype.itemsize >= 4 else 8e-2
    err = _log_error(np.asarray(array, np.float64), expected, array.dtype)
    if not err <= tol:
        return (
            f"disagrees with the {config.slope_formula!r} decay formula for layer {layer} "
            f"(log-relative error {err:.3g} > {tol:g}; check num_hidden_layers, "
            "num_attention_heads, block_size)"
        )
    return None


def export_buffers(config: ModelConfig, prefix: str = ""):
    """Yields (name, float32 array) of the derived buffers transformers keeps, for native export."""
    for layer in range(config.num_layers):
        if config.layer_is_lightning(layer):
            for d in DERIVED:
                name = (prefix + d.template).format(layer=layer)
                yield name, d.value(config, layer).astype(np.float32)


# ----------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class Assignment:
    """One HF tensor <-> one slot of one leaf: ``leaf_array[slot] = layout.to_ours(hf)``."""

    name: str
    leaf: LeafPath
    slot: tuple[int | slice, ...]
    slot_shape: tuple[int, ...]
    layout: Layout

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.layout.hf_shape(self.slot_shape)


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """Validated mapping of a checkpoint: assignments grouped by leaf (every leaf present, in
    layout order) and derived buffers to check: (name, layer, Derived)."""

    by_leaf: dict[LeafPath, list[Assignment]]
    derived: list[tuple[str, int, Derived]]


def _leaf_shapes(config: ModelConfig) -> dict[LeafPath, tuple[int, ...]]:
    return {p: tuple(s.shape) for p, s in flatten(expected_leaf_shapes(config)).items()}


def _assign(
    config: ModelConfig,
    rule: Rule,
    name: str,
    layer: int | None,
    expert: int | None,
    leaf_shapes: Mapping[LeafPath, tuple[int, ...]],
) -> Assignment | str:
    """Assignment for a matched name, or the reason it does not fit the config."""
    if rule.untied_only and config.tie_word_embeddings:
        return "present but tie_word_embeddings is true"
    leaf: LeafPath = rule.leaf
    block = 0
    if layer is not None:
        if layer >= config.num_layers:
            return f"layer {layer} >= num_hidden_layers {config.num_layers}"
        kind = config.layer_types[layer]
        if rule.layer_type is not None and kind != rule.layer_type:
            return f"layer {layer} is {kind}, this tensor belongs to {rule.layer_type}"
        leaf = ("blocks", layer % config.period, *rule.leaf)
        block = layer // config.period
    if expert is not None and expert >= config.num_experts:
        return f"expert {expert} >= num_local_experts {config.num_experts}"
    shape = leaf_shapes[leaf]
    slot = tuple(
        block if t == "b" else expert if t == "e" else slice(None) if t == ":" else t
        for t in rule.index
    )
    slot_shape = tuple(n for n, i in zip(shape, slot, strict=False) if isinstance(i, slice))
    return Assignment(name, leaf, slot, slot_shape + shape[len(slot) :], rule.layout)


def export_assignments(
    config: ModelConfig, *, naming: str = "original", prefix: str = ""
) -> list[Assignment]:
    """Every HF tensor of a checkpoint in ``naming`` ("original" or "fused"), leaf by leaf."""
    leaf_shapes = _leaf_shapes(config)
    order = {p: i for i, p in enumerate(leaf_shapes)}
    out = []
    for rule in RULES:
        if rule.naming not in ("any", naming):
            continue
        layers = range(config.num_layers) if rule.per_layer else [None]
        experts = range(config.num_experts) if "{expert}" in rule.template else [None]
        for layer in layers:
            for expert in experts:
                name = (prefix + rule.template).format(layer=layer, expert=expert)
                a = _assign(config, rule, name, layer, expert, leaf_shapes)
                if isinstance(a, Assignment):
                    out.append(a)
    return sorted(out, key=lambda a: order[a.leaf])  # stable: layer/expert order kept


def _match(
    config: ModelConfig, names: Iterable[str], prefix: str
) -> tuple[list[Assignment], list[tuple[str, int, Derived]], list[str], list[str]]:
    """Matches names against the table: (assignments, derived, unknown, repeated names)."""
    leaf_shapes = _leaf_shapes(config)
    rules = [(_regex(r.template, prefix), r) for r in RULES]
    derived_rules = [(_regex(d.template, prefix), d) for d in DERIVED]
    assignments, derived, unknown, seen, repeated = [], [], [], set(), []
    for name in names:
        if name in seen:
            repeated.append(name)
            continue
        seen.add(name)
        hit = next(((r, m) for r, m in ((r, rx.match(name)) for rx, r in rules) if m), None)
        if hit is not None:
            rule, m = hit
            groups = {k: int(v) for k, v in m.groupdict().items()}
            a = _assign(config, rule, name, groups.get("layer"), groups.get("expert"), leaf_shapes)
            if isinstance(a, Assignment):
                assignments.append(a)
            else:
                unknown.append(f"{name} ({a})")
            continue
        hit = next(((d, m) for d, m in ((d, rx.match(name)) for rx, d in derived_rules) if m), None)
        if hit is None:
            unknown.append(name)
            continue
        layer = int(hit[1]["layer"])
        if layer < config.num_layers and config.layer_is_lightning(layer):
            derived.append((name, layer, hit[0]))
        else:
            unknown.append(f"{name} (layer {layer} is not a lightning layer of this config)")
    return assignments, derived, unknown, repeated


def _grid_axes(leaf: LeafPath) -> tuple[int, ...]:
    """Leaf axes that some rule indexes (the coverage grid of that leaf)."""
    tail = tuple(k for k in leaf if isinstance(k, str) and k != "blocks")
    axes = {i for r in RULES if r.leaf == tail for i, t in enumerate(r.index) if t != ":"}
    return tuple(sorted(axes))


def _cell(a: Assignment, axes: tuple[int, ...]) -> tuple[int | slice, ...]:
    return tuple(a.slot[i] if i < len(a.slot) else slice(None) for i in axes)


def _coverage(
    config: ModelConfig, assignments: list[Assignment], prefix: str
) -> tuple[list[str], list[str]]:
    """(missing, overlapping) names: every element of every leaf must be filled exactly once.

    Counting runs on a small grid per leaf (its indexed axes: block, expert, gate/up), never on
    the leaf itself. Missing slots are named by the per-expert ("original") naming.
    """
    leaf_shapes = _leaf_shapes(config)
    axes = {leaf: _grid_axes(leaf) for leaf in leaf_shapes}
    counts = {
        leaf: np.zeros([leaf_shapes[leaf][i] for i in ax], np.int32) for leaf, ax in axes.items()
    }
    for a in assignments:
        counts[a.leaf][_cell(a, axes[a.leaf])] += 1
    overlap = [a.name for a in assignments if np.any(counts[a.leaf][_cell(a, axes[a.leaf])] > 1)]
    missing = [
        a.name
        for a in export_assignments(config, naming="original", prefix=prefix)
        if np.any(counts[a.leaf][_cell(a, axes[a.leaf])] == 0)
    ]
    return missing, overlap


def plan_load(
    config: ModelConfig,
    names: Iterable[str],
    *,
    meta: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
    prefix: str = "",
    where: str = "checkpoint",
) -> LoadPlan:
    """Maps checkpoint tensor names onto our leaves and validates the whole checkpoint at once.

    Args:
      config: the model config.
      names: every tensor name in the checkpoint.
      meta: optional {name: (shape, safetensors dtype code)} to check shapes and dtypes.
      prefix: prepended to every HF template (e.g. "language_model." for VL-01).
      where: how error messages refer to the checkpoint (its path).
    Raises:
      CheckpointMismatchError listing every unknown, missing, duplicated, wrongly shaped or
      wrongly typed tensor.
    """
    assignments, derived, unknown, repeated = _match(config, names, prefix)
    missing, overlap = _coverage(config, assignments, prefix)
    bad_shape, bad_dtype = [], []
    for a in assignments if meta is not None else ():
        shape, code = meta[a.name]
        if tuple(shape) != a.hf_shape:
            bad_shape.append(f"{a.name}: {list(shape)}, expected {list(a.hf_shape)}")
        if code not in FLOAT_CODES:
            bad_dtype.append(f"{a.name}: {code}, expected one of {FLOAT_CODES}")
    for name, _, d in derived if meta is not None else ():
        shape, code = meta[name]
        if tuple(shape) != d.shape(config):
            bad_shape.append(f"{name}: {list(shape)}, expected {list(d.shape(config))}")
        if code not in FLOAT_CODES:
            bad_dtype.append(f"{name}: {code}, expected one of {FLOAT_CODES}")
    problems = {
        "unknown tensors": unknown,
        "missing tensors": missing,
        "duplicate tensors (same parameter slot filled more than once)": repeated + overlap,
        "wrong shapes": bad_shape,
        "wrong dtypes": bad_dtype,
    }
    if any(problems.values()):
        raise CheckpointMismatchError(where, problems)
    by_leaf: dict[LeafPath, list[Assignment]] = {leaf: [] for leaf in _leaf_shapes(config)}
    for a in assignments:
        by_leaf[a.leaf].append(a)
    return LoadPlan(by_leaf, derived)
