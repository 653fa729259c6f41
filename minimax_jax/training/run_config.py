"""The training run configuration: frozen dataclass sections read from YAML with strict keys.

A run config (``configs/train/*.yaml``) has the sections ``model``, ``data``, ``optim``,
``train``, ``checkpoint``, ``mesh`` and ``log``; every key is a field below and anything else is an
error naming the key. ``--set section.key=value`` overrides one key (the value is parsed as
YAML, so ``--set optim.lr=1e-3`` and ``--set model.remat=full`` both work).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any

from minimax_jax import files
from minimax_jax.distributed import MODES as DISTRIBUTED_MODES
from minimax_jax.model.attention import ATTENTION_IMPLS
from minimax_jax.training.data import SourceSpec


class ConfigError(ValueError):
    """A bad run configuration (unknown key, wrong type, impossible value)."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to train and how to run it (numerics and memory, not the math)."""

    preset: str | None = None  # a configs/*.json name, e.g. "tiny-native"
    config: str | None = None  # an HF config.json (or its dir, a hub id, a URL) instead of a preset
    init_from: str | None = None  # start from the weights of a checkpoint (from_pretrained: a
    # local dir, hub id owner/name[@revision] or URL)
    overrides: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields to change
    param_dtype: str = "float32"
    compute_dtype: str | None = "bfloat16"  # None: compute in param_dtype
    remat: str | None = None  # None | "full" | "dots"
    moe_impl: str = "sorted"  # "sorted" | "dense"
    lightning_impl: str = "auto"
    attention_impl: str = "auto"  # softmax layers: ATTENTION_IMPLS (RunOptions)


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Sources, tokenizer and batch shape. ``batch_size`` is global rows per optimizer step."""

    sources: tuple = ()  # of SourceSpec (YAML: list of {type, path, text_field})
    tokenizer: str | None = None  # tokenizer.json or its dir, hub id, URL (default: init_from)
    eos_token: str = "<end_of_sentence>"
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1  # microbatches per step; batch_size must divide by it
    eval_fraction: float = 0.01  # share of documents held out
    eval_batches: int = 8
    seed: int = 0
    prefetch: int = 2  # batches a background thread prepares ahead (0: none)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW + warmup/cosine, clipping and the MoE router loss coefficients."""

    lr: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int | None = None  # cosine length (default: train.steps)
    end_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # never on norms and embeddings
    clip_norm: float | None = 1.0
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Run length, logging, eval and failure handling."""

    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # 0: only at the end
    max_nonfinite: int = 10  # consecutive skipped steps before the run stops
    peak_tflops: float | None = None  # per device, for MFU; None: measured at start
    distributed: str = "auto"  # join a multi-process job: auto | on | off (minimax_jax.distributed)
    # {start_step, steps}: a jax.profiler trace of those steps under WORKDIR/profile
    profile: dict | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 500
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Sharding rules preset (``configs/mesh/<rules>.yaml`` or a path) and optional axis sizes.

    Axis sizes left null come from the preset; one size may be -1 (the devices left over).
    """

    rules: str = "fsdp"
    num_devices: int | None = None  # use only the first N devices (default: all)
    data: int | None = None
    fsdp: int | None = None
    expert: int | None = None
    tensor: int | None = None
    sequence: int | None = None  # splits each row's tokens (data.seq_len must be a multiple)


@dataclasses.dataclass(frozen=True)
class LogSection:
    """Where metrics go besides ``WORKDIR/metrics.jsonl`` (always written), from process 0.

    ``backends`` null: TensorBoard events too when tensorboardX is installed. A list names exactly
    the backends (jsonl, tensorboard, wandb); a listed backend whose package is missing is an
    error before anything is compiled.
    """

    backends: tuple | None = None
    wandb_project: str | None = None  # default: "minimax_jax"
    wandb_name: str | None = None  # the run's display name (default: W&B's)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    mesh: MeshSection = MeshSection()
    log: LogSection = LogSection()

    def to_dict(self) -> dict:
        """Nested dicts and lists (YAML / JSON ready) that `from_dict` reads back."""
        d = dataclasses.asdict(self)
        d["data"]["sources"] = [dataclasses.asdict(s) for s in self.data.sources]
        if self.log.backends is not None:
            d["log"]["backends"] = list(self.log.backends)
        return d


_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Checks/converts one YAML value to the field's type (ints to floats, '1e-3' to float)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where} must not be null")
    for t in args:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, int | float | str) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if t is str and isinstance(value, str):
            return value
        if t in (dict, tuple) and isinstance(value, dict if t is dict else list):
            return value
    names = " | ".join(getattr(t, "__name__", str(t)) for t in args)
    raise ConfigError(f"{where} must be {names}, got {value!r}")


def _section(cls: type, raw: Any, name: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"section {name!r} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"unknown key {name}.{unknown[0]}: valid keys are {sorted(hints)}")
    if name == "train" and isinstance(raw.get("distributed"), bool):  # YAML reads on/off as bools
        raw = {**raw, "distributed": "on" if raw["distributed"] else "off"}
    values = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in raw.items()}
    if name == "data" and "sources" in values:
        values["sources"] = tuple(_source(s, i) for i, s in enumerate(values["sources"]))
    if name == "log" and values.get("backends") is not None:
        values["backends"] = tuple(values["backends"])
    return cls(**values)


def _source(raw: Any, i: int):
    keys = {"type", "path", "text_field"}
    if not isinstance(raw, dict) or not {"type", "path"} <= set(raw) or set(raw) - keys:
        raise ConfigError(f"data.sources[{i}] must be a mapping with keys type, path[, text_field]")
    return SourceSpec(**raw)


def from_dict(raw: dict) -> TrainConfig:
    """Builds and validates a TrainConfig from nested dicts (YAML contents)."""
    if not isinstance(raw, dict):
        raise ConfigError("a run config must be a mapping of sections")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}: valid sections are {sorted(_SECTIONS)}")
    hints = typing.get_type_hints(TrainConfig)
    cfg = TrainConfig(**{k: _section(hints[k], v or {}, k) for k, v in raw.items()})
    validate(cfg)
    return cfg


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies ``section.key=value`` strings to nested dicts (values parsed as YAML)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        section, name = parts
        if section not in _SECTIONS:
            raise ConfigError(f"--set {item!r}: unknown section {section!r}")
        raw.setdefault(section, {})
        raw[section] = dict(raw[section] or {})
        raw[section][name] = files.parse_yaml(value, f"--set {item!r}")
    return raw


def load(path: str, overrides: list[str] | None = None) -> TrainConfig:
    """Reads a YAML run config and applies ``--set`` overrides."""
    if not os.path.exists(path):
        raise ConfigError(f"--config {path}: no such file; expected a YAML run config")
    raw = files.read_mapping(path, "a YAML run config", kind="yaml")
    return from_dict(apply_overrides(raw, list(overrides or [])))


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that need no data or devices."""
    m, d, t = cfg.model, cfg.data, cfg.train
    if (m.preset is None) == (m.config is None) and m.init_from is None:
        raise ConfigError("set exactly one of model.preset, model.config (or model.init_from)")
    if m.remat not in (None, "full", "dots"):
        raise ConfigError(f"model.remat must be null, full or dots, got {m.remat!r}")
    if m.attention_impl not in ATTENTION_IMPLS:
        raise ConfigError(
            f"model.attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, "
            f"got {m.attention_impl!r}"
        )
    if d.tokenizer is None and m.init_from is None:
        raise ConfigError(
            "data.tokenizer is required (a tokenizer.json or its directory) unless "
            "model.init_from names a checkpoint directory that holds one"
        )
    for name in ("seq_len", "batch_size", "grad_accum", "eval_batches"):
        if getattr(d, name) < 1:
            raise ConfigError(f"data.{name} must be >= 1")
    if d.batch_size % d.grad_accum:
        raise ConfigError(f"data.batch_size {d.batch_size} must divide by grad_accum")
    if not isinstance(d.prefetch, int) or d.prefetch < 0:
        raise ConfigError(f"data.prefetch must be an integer >= 0 (got {d.prefetch!r})")
    if t.steps < 1 or t.log_every < 1 or t.max_nonfinite < 1:
        raise ConfigError("train.steps, train.log_every and train.max_nonfinite must be >= 1")
    if cfg.checkpoint.every < 1 or cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.every and checkpoint.keep must be >= 1")
    if t.distributed not in DISTRIBUTED_MODES:
        raise ConfigError(
            f"train.distributed must be one of {', '.join(DISTRIBUTED_MODES)}, "
            f"got {t.distributed!r}"
        )
    _check_profile(t.profile)
    _check_backends(cfg.log.backends)
    _check_floats(cfg)


LOG_BACKENDS = ("jsonl", "tensorboard", "wandb")


def _check_profile(profile: dict | None) -> None:
    if profile is None:
        return
    keys = {"start_step", "steps"}
    if set(profile) != keys or not all(
        isinstance(profile[k], int) and not isinstance(profile[k], bool) and profile[k] >= 1
        for k in keys
    ):
        raise ConfigError(
            f"train.profile must be null or {{start_step: N, steps: M}} with integers >= 1, "
            f"got {profile!r}"
        )


def _check_backends(backends: tuple | None) -> None:
    if backends is None:
        return
    bad = [b for b in backends if b not in LOG_BACKENDS]
    if bad:
        raise ConfigError(
            f"log.backends: unknown backend {bad[0]!r}; choose from {', '.join(LOG_BACKENDS)}"
        )


# Floats that must also be >= 0 (learning rates and the like); every float must be finite.
_NON_NEGATIVE = ("optim.lr", "optim.end_lr_ratio", "optim.weight_decay", "optim.eps",
                 "optim.clip_norm", "optim.load_balance_coef", "optim.z_loss_coef",
                 "data.eval_fraction", "train.peak_tflops")  # fmt: skip


def _check_floats(cfg: TrainConfig) -> None:
    """Every float field finite; learning rates and coefficients >= 0; b1, b2 in [0, 1)."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value, key = getattr(values, f.name), f"{section.name}.{f.name}"
            if not isinstance(value, float):
                continue
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value}")
            if key in _NON_NEGATIVE and value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
    for key in ("b1", "b2"):
        if not 0 <= getattr(cfg.optim, key) < 1:
            raise ConfigError(f"optim.{key} must be in [0, 1), got {getattr(cfg.optim, key)}")
