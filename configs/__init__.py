"""Model presets: HF-style ``config.json`` files, diffable against the real checkpoints' configs.

``ModelConfig.preset(name)`` loads one; ``list_presets()`` names them. Full-size presets:
``minimax-text-01``, ``minimax-m1-40k``, ``minimax-m1-80k`` (identical architecture; M1 files equal
the released ``config.json``), ``minimax-vl-01-text`` (the language model of MiniMax-VL-01, i.e.
the Text-01 LM). Tiny presets keep the real structure (one or two full 7+1 blocks, N*H != D,
GQA, 4 experts top-2, partial RoPE, alpha != 1, lightning block 16) for tests.
"""

from __future__ import annotations

import pathlib

_DIR = pathlib.Path(__file__).resolve().parent


def list_presets() -> list[str]:
    """Sorted preset names (file names without ``.json``)."""
    return sorted(p.stem for p in _DIR.glob("*.json"))


def preset_path(name: str) -> pathlib.Path:
    """Path of preset ``name`` (with or without ``.json``).

    Raises:
      ValueError: unknown preset (the message lists the known ones).
    """
    stem = name[: -len(".json")] if name.endswith(".json") else name
    path = _DIR / f"{stem}.json"
    if "/" in stem or "\\" in stem or not path.is_file():
        raise ValueError(f"unknown preset {name!r}: choose one of {list_presets()}")
    return path
