"""Sampling defaults of a checkpoint, read from its ``generation_config.json``.

The file is transformers' own (``GenerationConfig.save_pretrained`` writes it). Of its keys,
``do_sample``, ``temperature``, ``top_p``, ``top_k`` and ``max_new_tokens`` become defaults of
``python -m minimax_jax.generate`` (flags given on the command line win); other keys
(``eos_token_id``, ``transformers_version``, ...) are left to the tokenizer and config. Every
key read is validated: a bad value raises ``ValueError`` naming the file and the field.
"""

from __future__ import annotations

import math
from pathlib import Path

from minimax_jax import files

FILE_NAME = "generation_config.json"


def _number(value, field: str, where: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: {field} must be a finite number, got {value!r}")
    return float(value)


def _check(d: dict, path: Path) -> dict:
    out: dict = {}
    if "do_sample" in d:
        if not isinstance(d["do_sample"], bool):
            raise ValueError(f"{path}: do_sample must be true or false, got {d['do_sample']!r}")
        out["greedy"] = not d["do_sample"]
    if d.get("temperature") is not None:
        out["temperature"] = _number(d["temperature"], "temperature", path)
        if out["temperature"] < 0:
            raise ValueError(f"{path}: temperature must be >= 0, got {d['temperature']!r}")
    if d.get("top_p") is not None:
        out["top_p"] = _number(d["top_p"], "top_p", path)
        if not 0 < out["top_p"] <= 1:
            raise ValueError(f"{path}: top_p must be in (0, 1], got {d['top_p']!r}")
    for field in ("top_k", "max_new_tokens"):
        value = d.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{path}: {field} must be a non-negative integer, got {value!r}")
        if field == "max_new_tokens" and value == 0:
            raise ValueError(f"{path}: max_new_tokens must be >= 1, got 0")
        out[field] = value if field == "max_new_tokens" or value > 0 else None  # top_k 0 = off
    return out


def sampling_defaults(checkpoint: str | Path) -> dict:
    """{greedy, temperature, top_p, top_k, max_new_tokens}: the keys the checkpoint's
    generation_config.json sets ({} without the file). top_k 0 in the file reads as None (off)."""
    path = Path(checkpoint) / FILE_NAME
    if not path.is_file():
        return {}
    return _check(files.read_mapping(path, "a generation_config.json (a JSON object)"), path)


def merge(defaults: dict, flags: dict, given: set[str]) -> dict:
    """Generation arguments: flag values where the flag was given (``given``) or the file has
    no value, else the file's value. A file's greedy (do_sample false) yields to any sampling
    flag given on the command line."""
    sampling = {"greedy", "temperature", "top_p", "top_k"}
    out = dict(flags)
    for name, value in defaults.items():
        if name in given or name not in out:
            continue
        if name == "greedy" and value and sampling & given:
            continue
        out[name] = value
    return out
