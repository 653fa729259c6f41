"""Pieces shared by the conversion CLIs: output atomicity, side files, error reporting."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import flags

from minimax_jax.hf import mapping
from minimax_jax.hf.safetensors import SafetensorsError

CONFIG_FILE = "config.json"
# Flags every conversion CLI has (defined once: absl flags are process-global).
OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory (must not exist).")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace OUT if it exists (atomically).")
# Files copied verbatim from the HF directory (tokenizer, chat template, generation defaults).
COPIED_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",
    "*.jinja",
    "generation_config.json",
)


class ConversionError(ValueError):
    """A conversion cannot proceed (bad arguments or output location)."""


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copies tokenizer / chat template / generation config files; returns their names."""
    names = sorted({p.name for pattern in COPIED_FILES for p in src.glob(pattern) if p.is_file()})
    for name in names:
        shutil.copy2(src / name, dst / name)
    return names


def atomic_output(out_dir: Path, overwrite: bool, build: Callable[[Path], Any]) -> Any:
    """Runs ``build(tmp)`` on a hidden temporary directory beside ``out_dir``, then renames it.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and
    ``out_dir`` is untouched. With ``overwrite`` an existing ``out_dir`` is replaced only after
    ``build`` succeeded.
    """
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir} exists; remove it or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        result = build(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_cli(work: Callable[[], None], exit_code: int = 1) -> None:
    """Runs ``work``; expected errors become one line on stderr and ``exit_code``."""
    import signal

    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every store open/close at INFO

    def on_term(signum, frame):  # cleanup (temporary directories) runs on SIGTERM too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        work()
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted; nothing was written\n")
        sys.exit(130)
    except (ValueError, OSError, SafetensorsError) as e:  # our errors subclass ValueError
        sys.stderr.write(f"error: {one_line(e)}\n")
        sys.exit(exit_code)


def one_line(error: Exception, max_names: int = 20) -> str:
    """The error as one line; a checkpoint mismatch lists up to ``max_names`` names per problem."""
    if isinstance(error, mapping.CheckpointMismatchError):
        head = str(error).splitlines()[0]
        parts = []
        for kind, names in error.problems.items():
            more = f" (+{len(names) - max_names} more)" if len(names) > max_names else ""
            parts.append(f"{kind} ({len(names)}): {', '.join(names[:max_names])}{more}")
        return f"{head}: {'; '.join(parts)}"
    return " | ".join(line.strip() for line in str(error).splitlines() if line.strip())
