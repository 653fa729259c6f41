"""Pieces shared by the conversion CLIs: safe output placement, side files, the CLI contract.

Output: OUT is built in a hidden ``.OUT.partial-<pid>-<random>`` directory beside it and renamed
into place only when complete, with a marker file (``MARKER``) listing what was written. OUT may
not be the input, contain it or lie inside it; ``--overwrite`` replaces an existing OUT only if it
is empty or holds nothing but what a converter wrote there (per its marker). Partial directories
of a run that was killed (SIGKILL, power loss) are removed, with one line saying so, by the next
run writing the same OUT; SIGINT, SIGTERM and SIGHUP remove them before exiting.

CLI contract (``minimax_jax.cli``, through ``run_app`` / ``run_cli``): a wrong command line
(flag, directory of the wrong kind, OUT refused) or a malformed checkpoint is one ``error: ...``
line on stderr and exit 2; a failure while running (an I/O error, a full disk, out of memory) is
one line and exit 1; a signal exits 128 + its number; ``--help`` prints every flag of the tool
and exits 0; never a traceback (unless ``--debug``).
"""

from __future__ import annotations

import fnmatch
import functools
import os
import shutil
import signal
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from absl import flags

from minimax_jax import cli, outputs, paths
from minimax_jax.hf.safetensors import trusted_roots
from minimax_jax.outputs import MARKER, remove_stale  # noqa: F401 - re-exported

CONFIG_FILE = "config.json"
# Flags every conversion CLI has (defined once: absl flags are process-global).
OUT_DIR = flags.DEFINE_string(
    "out_dir",
    None,
    "Output directory or gs:// / s3:// URL; must not exist (unless --overwrite) nor overlap the "
    "input.",
)
OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace OUT if it is empty or an earlier output of a converter (atomically, after success).",
)
# Files copied verbatim from the HF directory (tokenizer, chat template, generation defaults).
COPIED_FILES = paths.TOKENIZER_FILES
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ConversionError(ValueError):
    """A conversion cannot proceed (bad arguments or output location)."""


class ArgumentError(ConversionError, cli.UsageError):
    """The command line is wrong (a flag, or a directory it names): CLIs exit 2."""


def check_input_dir(
    path: Path, flag: str, expected: str, any_of: Sequence[str] = (), shown: str | None = None
) -> None:
    """``path`` must be a directory holding ``config.json`` (and one of ``any_of``); errors
    name ``shown`` (what the user gave: a hub id or URL resolved to ``path``), default ``path``."""
    shown = str(path) if shown is None else shown
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise ArgumentError(f"{flag} {shown}: {what}; expected {expected}")
    missing = not (path / CONFIG_FILE).is_file() or (
        any_of and not any((path / name).exists() for name in any_of)
    )
    if missing:
        raise ArgumentError(f"{flag} {shown}: not {expected}")


def _as_argument_error(fn: Callable) -> Callable:
    """``fn`` raising ``ArgumentError`` (a ``ConversionError``) for an ``OutputError``."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except outputs.OutputError as e:
            raise ArgumentError(str(e)) from None

    return wrapped


check_locations = _as_argument_error(outputs.check_locations)
check_replaceable = _as_argument_error(outputs.check_replaceable)
prepare_output = _as_argument_error(outputs.prepare_output)
atomic_output = _as_argument_error(outputs.atomic_output)


def _side_file_problem(src: Path, path: Path) -> str | None:
    """Why ``path`` (a side file of checkpoint ``src``) must not be copied, or None."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            real = path.resolve()
            if not any(real.is_relative_to(root) for root in trusted_roots(src)):
                return f"a symbolic link leading outside {src}"
            st = os.stat(path)
    except (OSError, RuntimeError):  # broken link, link loop
        return "a broken symbolic link"
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def copy_side_files(
    src: Path, dst: Path, stream: TextIO | None = None
) -> tuple[list[str], list[str]]:
    """Copies tokenizer / chat template / generation config files; returns (copied, skipped).

    Only regular files inside ``src`` are copied (a symbolic link is followed only if it stays
    inside, as in a Hugging Face cache snapshot); a link leading outside, a directory, a FIFO or
    a device is skipped with one ``warning:`` line on ``stream``, never opened.
    """
    names = sorted(
        name
        for name in os.listdir(src)  # not glob: it hides broken links, which deserve a warning
        if not name.startswith(".") and any(fnmatch.fnmatchcase(name, p) for p in COPIED_FILES)
    )
    copied, skipped = [], []
    for name in names:
        problem = _side_file_problem(src, src / name)
        if problem is None:
            # Open the checked target without following links or blocking, re-check it is a file.
            fd = os.open((src / name).resolve(), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    with open(dst / name, "wb") as out:
                        shutil.copyfileobj(f, out)
                    copied.append(name)
                    continue
                problem = "not a regular file"
        skipped.append(name)
        if stream is not None:
            stream.write(f"warning: not copying {src / name}: {problem}\n")
    return copied, skipped


def usage_error(message: str) -> NoReturn:
    """One ``error:`` line on stderr naming the flag and the fix; exit 2."""
    cli.error_exit(message, cli.EXIT_USAGE)


def run_app(
    main: Callable[[list[str]], None], doc: str, holders: Sequence[flags.FlagHolder]
) -> None:
    """``minimax_jax.cli.run``: ``--help`` lists ``holders`` and exits 0; a bad command line is
    one line and exit 2."""
    cli.run(main, doc, holders)


def run_cli(work: Callable[[], None], exit_code: int = cli.EXIT_FAILURE) -> None:
    """``minimax_jax.cli.guard``: bad input (``ArgumentError``, a malformed checkpoint) exits 2,
    a failure while running ``exit_code``, a signal 128 + its number after the temporary
    directories are removed."""
    cli.guard(
        work,
        failure_code=exit_code,
        on_interrupt="; partial output removed, nothing was written",
    )


one_line = cli.one_line
