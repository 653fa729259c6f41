"""Reading the small input files users hand us (JSON, YAML, tokenizer.json): every problem is one
``InputFileError`` naming the file, never a parser traceback or a bare ``UnicodeDecodeError``.
And writing a small file whole (`write_atomic`: a temporary beside it, then a rename).

Imports nothing of ``minimax_jax`` but the leaf ``minimax_jax.paths``: every layer may use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from tokenizers import Tokenizer

from minimax_jax import paths

# Configs, manifests and templates are small; a larger one is not what we expect.
MAX_BYTES = 100 * 2**20


class InputFileError(ValueError):
    """An input file is missing, of the wrong kind, or malformed (the message names it)."""


def read_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of regular file ``path`` (``what`` says what it should be, for messages).
    A URL (``scheme://...``) is refused: these files are read from the local disk."""
    if paths.scheme(path) is not None:
        raise InputFileError(f"{path}: a URL; expected {what} as a local file")
    path = Path(path)
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory; expected {what}")
    if not path.exists():
        raise InputFileError(f"{path}: no such file; expected {what}")
    if not path.is_file():
        raise InputFileError(f"{path}: not a regular file; expected {what}")
    if path.stat().st_size > MAX_BYTES:
        raise InputFileError(f"{path}: over {MAX_BYTES} bytes; expected {what}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path}: not UTF-8 text (byte {e.start}); expected {what}") from None


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` whose errors name ``where`` and the position (never the text)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(
            f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise InputFileError(f"{where}: JSON nested too deeply") from None


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` whose errors name ``where`` and the position."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise InputFileError(f"{where}: not valid YAML ({problem}{at})") from None
    except RecursionError:
        raise InputFileError(f"{where}: YAML nested too deeply") from None


def read_json(path: str | os.PathLike, what: str = "a JSON file") -> Any:
    return parse_json(read_text(path, what), str(path))


def read_yaml(path: str | os.PathLike, what: str = "a YAML file") -> Any:
    return parse_yaml(read_text(path, what), str(path))


def read_mapping(path: str | os.PathLike, what: str, kind: str = "json") -> dict:
    """A JSON (or YAML) file that must hold an object / mapping."""
    data = (read_json if kind == "json" else read_yaml)(path, what)
    if data is None and kind == "yaml":
        return {}
    if not isinstance(data, dict):
        raise InputFileError(f"{path}: expected {what} (a mapping), got {type(data).__name__}")
    return data


def load_tokenizer(file: str | os.PathLike) -> Any:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``; a corrupt file is one
    ``InputFileError`` naming it."""
    text = read_text(file, "a tokenizer.json")
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InputFileError(
            f"{file}: not a valid tokenizer.json ({detail}); replace it with the checkpoint's "
            "original"
        ) from None


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file beside it and a rename: a reader (or
    a crash) never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
