"""Where the files of ``configs/`` are: model presets (HF-style ``config.json``), VL presets,
mesh rules (``mesh/*.yaml``) and training run configs (``train/*.yaml``).

In a checkout they are the top-level ``configs/`` folder beside ``minimax_jax/``; the wheel ships
the same folder as ``minimax_jax/configs/`` (``setup.py`` maps it there), so that no top-level
``configs`` package is installed: that name is common, and another project's ``configs`` on
``sys.path`` would shadow ours or be shadowed. The folder is found by path, not by import, so the
same code works from a checkout, an editable install and a wheel.

Full-size presets: ``minimax-text-01``, ``minimax-m1-40k``, ``minimax-m1-80k`` (identical
architecture; the M1 files equal the released ``config.json``), ``minimax-vl-01-text`` (the
language model of MiniMax-VL-01, i.e. the Text-01 LM). Tiny presets keep the real structure (one
or two full 7+1 blocks, N*H != D, GQA, 4 experts top-2, partial RoPE, alpha != 1, lightning block
16) for tests. Standard library only: the jax-free ``minimax_jax.config`` imports it.
"""

from __future__ import annotations

import pathlib

_PACKAGE = pathlib.Path(__file__).resolve().parent


def _configs_dir() -> pathlib.Path:
    shipped = _PACKAGE / "configs"  # an installed wheel
    return shipped if shipped.is_dir() else _PACKAGE.parent / "configs"  # a checkout


CONFIGS_DIR = _configs_dir()
MESH_DIR = CONFIGS_DIR / "mesh"
VL_DIR = CONFIGS_DIR / "vl"
TRAIN_DIR = CONFIGS_DIR / "train"


def list_presets(folder: pathlib.Path = CONFIGS_DIR) -> list[str]:
    """Sorted preset names (file names without ``.json``) of ``folder``."""
    return sorted(p.stem for p in folder.glob("*.json"))


def preset_path(name: str, folder: pathlib.Path = CONFIGS_DIR) -> pathlib.Path:
    """Path of preset ``name`` (with or without ``.json``) in ``folder`` (``VL_DIR``: VL presets).

    Raises:
      ValueError: unknown preset (the message lists the known ones).
    """
    stem = name[: -len(".json")] if name.endswith(".json") else name
    path = folder / f"{stem}.json"
    if "/" in stem or "\\" in stem or not path.is_file():
        kind = "VL preset" if folder == VL_DIR else "preset"
        raise ValueError(f"unknown {kind} {name!r}: choose one of {list_presets(folder)}")
    return path
