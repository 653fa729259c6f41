"""Load and save MiniMax-VL-01 checkpoints: HF safetensors directories and our Orbax directories.

The tensor names and layouts are ``hf.vl_mapping`` (vision, projector, ``image_newline``) and
``hf.mapping`` behind the prefix ``language_model.`` (the text model).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from minimax_jax import paths
from minimax_jax.hf import mapping, vl_mapping
from minimax_jax.hf import orbax as orbax_io
from minimax_jax.hf.pretrained import export_tensors
from minimax_jax.hf.safetensors import write_sharded
from minimax_jax.vl.model import MiniMaxVLForConditionalGeneration
from minimax_jax.vl.vision import VL_ARCHITECTURE, VL_MODEL_TYPE, VLConfig


def _read_vl_config(path: Path) -> VLConfig:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no config.json at {file}")
    return VLConfig.from_hf(json.loads(file.read_text()))


def is_vl_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` (a directory or config.json) holds a MiniMax-VL-01 config."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        d = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return d.get("model_type") == VL_MODEL_TYPE or VL_ARCHITECTURE in (d.get("architectures") or [])


def from_pretrained_vl(
    path: str | os.PathLike, *, dtype: Any = jnp.float32, max_tile_batch: int = 32
) -> MiniMaxVLForConditionalGeneration:
    """Builds the VL model from an HF VL-01 directory (config.json + safetensors) or from ours
    written by ``minimax_jax.hf.vl_mapping.hf_to_orbax`` (config.json + ``params/``, Orbax).

    Every tensor name and shape is validated before any weight is read (``hf.vl_mapping``);
    leaves are filled one at a time. Raises CheckpointMismatchError listing every problem.
    ``path`` may also be a Hugging Face hub id or a URL, as for ``from_pretrained``; anything
    else raises ``minimax_jax.paths.PathError``.
    """
    with paths.as_local(path, "path") as local:
        return _from_local(local, dtype, max_tile_batch)


def _from_local(path: Path, dtype: Any, max_tile_batch: int) -> MiniMaxVLForConditionalGeneration:
    config = _read_vl_config(path)
    abstract = nnx.eval_shape(
        lambda: MiniMaxVLForConditionalGeneration(
            config, rngs=nnx.Rngs(0), param_dtype=dtype, max_tile_batch=max_tile_batch
        )
    )
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if orbax_io.is_orbax_checkpoint(path / "params"):
        state = vl_mapping.load_orbax_state(path / "params", config, dtype)
    else:
        state = vl_mapping.load_hf_state(path, dtype)
    nnx.replace_by_pure_dict(params, mapping.unflatten(state))
    return nnx.merge(graphdef, params, rest)


def save_pretrained_vl(
    model: MiniMaxVLForConditionalGeneration,
    path: str | os.PathLike,
    *,
    schema: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Writes an HF VL-01 checkpoint (``text_config`` in ``schema``, default the text's own;
    remote-code per-expert names); returns the file names written."""
    config: VLConfig = model.config
    path = paths.local_only(path, "path")
    schema = config.text.schema if schema is None else schema
    hf_config = config.to_hf(schema)
    text = nnx.to_pure_dict(nnx.state(model.language_model, nnx.Param))
    rest = {k: v for k, v in model.pure_params().items() if k != "language_model"}
    tensors = itertools.chain(
        export_tensors(text, config.text, schema=schema, prefix=vl_mapping.TEXT_PREFIX),
        vl_mapping.export_vision(config, rest),
    )
    return write_sharded(
        path,
        tensors,
        max_shard_bytes=max_shard_bytes,
        extra_files={"config.json": json.dumps(hf_config, indent=2, sort_keys=True) + "\n"},
    )
