"""The package version: the installed distribution's metadata, whose one source is the
``version`` of ``setup.cfg`` (read directly in a checkout that was never installed).
Standard library only: ``minimax_jax.cli`` imports it."""

from __future__ import annotations

import configparser
import importlib.metadata
import pathlib

DISTRIBUTION = "minimax_jax"


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        setup_cfg = configparser.ConfigParser()
        setup_cfg.read(pathlib.Path(__file__).resolve().parent.parent / "setup.cfg")
        return setup_cfg.get("metadata", "version", fallback="0+unknown")


__version__ = _version()
