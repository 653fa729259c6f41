"""Safe outputs for the tools that write checkpoints (converters, ``train --export``).

OUT is built in a hidden ``.OUT.partial-<pid>-<random>`` directory beside it and renamed into
place only when complete, with a marker file (``MARKER``) listing what was written. OUT may not be
the input, contain it or lie inside it; ``--overwrite`` replaces an existing OUT only if it is
empty or holds nothing but what a tool wrote there (per its marker). Partial directories of a run
that was killed (SIGKILL, power loss) are removed, with one line saying so, by the next run
writing the same OUT; on an exception (KeyboardInterrupt included) they are removed at once.

OUT may also be a ``gs://`` / ``s3://`` / ``az://`` URL (``minimax_jax.paths``). An object store
has no rename, so there OUT is built in a local temporary directory (under ``TMPDIR``: local disk
for the whole output), then uploaded into OUT: first a ``MARKER`` with ``"complete": false``
listing what will be written (so an interrupted upload is recognisably ours and ``--overwrite``
may replace it), then the files (metadata files such as ``_METADATA`` and ``config.json`` last),
then the ``MARKER`` again with ``"complete": true``. Replacing an existing OUT removes its old
entries first (only when they are the tool's own, as above): during the upload OUT is incomplete.

Single new files (``generate --output``) are written the same way (``new_file``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from minimax_jax import paths
from minimax_jax.cli import UsageError

# Written last into every output; lists the entries the tool wrote (what --overwrite may replace).
MARKER = ".minimax_jax_convert.json"
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Uploaded last: a reader that finds them finds the data they describe.
_UPLOADED_LAST = (
    "_METADATA",
    "_CHECKPOINT_METADATA",
    "model.safetensors.index.json",
    "config.json",
)
Location = Path | str  # a local directory, or a URL string (never a Path: it would collapse "//")


class OutputError(UsageError):
    """OUT may not be written (overlaps the input, exists, or is not the tool's own output)."""


def check_locations(
    in_dir: Location, out_dir: Location, in_flag: str, out_flag: str = "--out_dir"
) -> None:
    """OUT may not be IN, contain it, or lie inside it (symbolic links resolved; URLs compared
    as strings; a URL and a local path never overlap)."""
    if paths.is_url(in_dir) != paths.is_url(out_dir):
        return
    if paths.is_url(in_dir):
        src, dst = Path("/", in_dir.rstrip("/")), Path("/", out_dir.rstrip("/"))
    else:
        src, dst = Path(in_dir).resolve(), Path(out_dir).resolve()
    if dst == src:
        why = f"is the {in_flag} directory itself"
    elif src.is_relative_to(dst):
        why = f"contains the {in_flag} directory {in_dir}"
    elif dst.is_relative_to(src):
        why = f"is inside the {in_flag} directory {in_dir}"
    else:
        return
    raise OutputError(f"{out_flag} {out_dir} {why}; choose a new directory outside the input")


def check_replaceable(out_dir: Location, out_flag: str = "--out_dir") -> None:
    """Raises unless ``--overwrite`` may replace ``out_dir``: a real directory that is empty or
    holds only the entries its ``MARKER`` says a converter wrote."""
    fix = f"remove it yourself or choose another {out_flag}"
    url = paths.is_url(out_dir)
    link = not url and Path(out_dir).is_symlink()
    if link or not paths.isdir(str(out_dir)):
        kind = "a symbolic link" if link else "not a directory"
        raise OutputError(f"{out_flag} {out_dir} is {kind}; --overwrite will not replace it: {fix}")
    names = set(paths.listdir(str(out_dir)))
    if not names:
        return
    marker = paths.join(str(out_dir), MARKER)
    try:
        ours = (MARKER in names) if url else _regular(Path(marker))
        written = json.loads(paths.read_text(marker)).get("files") if ours else None
    except (OSError, ValueError, AttributeError):
        written = None
    if not isinstance(written, list):
        raise OutputError(
            f"{out_flag} {out_dir} was not written by a converter or train --export (no {MARKER}); "
            f"--overwrite replaces only such an output: {fix}"
        )
    extra = sorted(names - {f for f in written if isinstance(f, str)} - {MARKER})
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise OutputError(
            f"{out_flag} {out_dir} holds files a converter or export did not write "
            f"({', '.join(extra[:5])}"
            f"{more}); --overwrite would delete them: move them away or choose another {out_flag}"
        )


def prepare_output(
    in_dir: Location, out_dir: Location, overwrite: bool, in_flag: str, out_flag: str = "--out_dir"
) -> None:
    """All checks of OUT against IN and ``--overwrite``, before any work is done."""
    check_locations(in_dir, out_dir, in_flag, out_flag)
    with paths.remote(str(out_dir), out_flag):
        link = not paths.is_url(out_dir) and Path(out_dir).is_symlink()
        if paths.exists(str(out_dir)) or link:
            if not overwrite:
                raise OutputError(f"{out_flag} {out_dir} exists; remove it or pass --overwrite")
            check_replaceable(out_dir, out_flag)


def _regular(path: Path) -> bool:
    """A regular file, not a symbolic link."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _owner_alive(name: str, prefix: str) -> bool:
    """Whether the process whose id starts ``name`` after ``prefix`` is still running."""
    pid = name[len(prefix) :].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale(out_dir: Path, stream: TextIO | None) -> list[Path]:
    """Removes the ``.OUT.partial-*`` / ``.OUT.old-*`` directories that runs killed before they
    could clean up left beside ``out_dir`` (not those of a run still in progress); one line each
    on ``stream``."""
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    prefixes = (f".{out_dir.name}.partial-", f".{out_dir.name}.old-")
    for entry in sorted(out_dir.parent.iterdir()):
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None or entry.is_symlink() or not entry.is_dir():
            continue
        if _owner_alive(entry.name, prefix):
            continue
        shutil.rmtree(entry)
        removed.append(entry)
        if stream is not None:
            stream.write(f"removed {entry}: partial output of an interrupted run\n")
            stream.flush()
    return removed


def _remove(path: Path) -> None:
    """``rmtree`` that a second Ctrl-C / SIGTERM cannot cut short (signals wait until done)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def atomic_output(
    out_dir: Location,
    overwrite: bool,
    build: Callable[[Path], Any],
    *,
    in_dir: Location,
    in_flag: str = "input",
    stream: TextIO | None = sys.stderr,
    out_flag: str = "--out_dir",
    written_by: str = "convert",
) -> Any:
    """Runs ``build(tmp)`` on a hidden ``.OUT.partial-<pid>-*`` directory beside ``out_dir``,
    writes ``MARKER`` and renames it to ``out_dir``; returns what ``build`` returned.

    Checks ``prepare_output`` first (and again before replacing: OUT may change during a long
    build) and removes stale partial directories of killed runs (``remove_stale``). On any
    exception (KeyboardInterrupt included) the temporary directory is removed and ``out_dir`` is
    untouched. With ``overwrite`` an existing ``out_dir`` is replaced only after ``build``
    succeeded. A URL ``out_dir`` is built locally and uploaded (``upload_output``).
    """
    if paths.is_url(out_dir):
        return upload_output(out_dir, overwrite, build, in_dir=in_dir, in_flag=in_flag,
                             out_flag=out_flag, written_by=written_by)  # fmt: skip
    out_dir = Path(out_dir)
    prepare_output(in_dir, out_dir, overwrite, in_flag, out_flag)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir, stream)
    prefix = f".{out_dir.name}.partial-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    try:
        result = build(tmp)
        written = sorted(os.listdir(tmp))
        (tmp / MARKER).write_text(json.dumps({"written_by": written_by, "files": written}) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
        prepare_output(in_dir, out_dir, overwrite, in_flag, out_flag)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old is not None:
                os.replace(old, out_dir)
            raise
        if old is not None:
            _remove(old)
        return result
    finally:
        _remove(tmp)


def upload_output(
    url: str,
    overwrite: bool,
    build: Callable[[Path], Any],
    *,
    in_dir: Location,
    in_flag: str = "input",
    out_flag: str = "--out_dir",
    written_by: str = "convert",
) -> Any:
    """``atomic_output`` for a URL: ``build(tmp)`` on a local temporary directory, then the
    upload described in the module docstring; returns what ``build`` returned.

    On an exception during the upload what was uploaded is removed again (best effort; its
    ``"complete": false`` marker lets a later ``--overwrite`` replace what remains)."""
    prepare_output(in_dir, url, overwrite, in_flag, out_flag)
    tmp = Path(tempfile.mkdtemp(prefix="minimax_jax-out-"))
    try:
        result = build(tmp)
        written = sorted(os.listdir(tmp))
        prepare_output(in_dir, url, overwrite, in_flag, out_flag)  # OUT may have changed
        if paths.exists(url):  # checked: empty, or only entries of an earlier output
            for name in paths.listdir(url):
                paths.remove(paths.join(url, name))
        marker = paths.join(url, MARKER)
        record = {"written_by": written_by, "files": written, "complete": False}
        try:
            paths.write_text(marker, json.dumps(record) + "\n")
            paths.upload_tree(tmp, url, written, last=_UPLOADED_LAST)
            paths.write_text(marker, json.dumps(record | {"complete": True}) + "\n")
        except BaseException:
            for name in [*written, MARKER]:
                try:
                    paths.remove(paths.join(url, name))
                except Exception:  # noqa: BLE001, S110 - already failing: best effort
                    pass
            raise
        return result
    finally:
        _remove(tmp)


def check_new_file(path: Path, flag: str) -> None:
    """``path`` may be written as a new file: it does not exist, its directory does."""
    if path.exists() or path.is_symlink():
        raise OutputError(f"{flag} {path} exists; remove it or choose another file")
    if not path.parent.is_dir():
        raise OutputError(f"{flag} {path}: no directory {path.parent}; create it first")


@contextlib.contextmanager
def new_file(path: Path, flag: str) -> Iterator[TextIO]:
    """A text file that must not exist yet, written through a hidden ``.NAME.partial-<pid>-*``
    beside it and linked into place when the block ends without error (never replacing a file
    that appeared meanwhile); on an error the temporary is removed and ``path`` never appears."""
    check_new_file(path, flag)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp makes it 0600
            yield f
        try:
            os.link(tmp, path)  # fails if path exists: nothing is ever replaced
        except FileExistsError:
            raise OutputError(f"{flag} {path} appeared while running; left it alone") from None
        except OSError:  # a file system without hard links
            if path.exists():
                raise OutputError(f"{flag} {path} appeared while running; left it alone") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
