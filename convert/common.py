"""Pieces shared by the conversion CLIs: safe output placement, side files, the CLI contract.

Output: OUT is built in a hidden ``.OUT.partial-<pid>-<random>`` directory beside it and renamed
into place only when complete, with a marker file (``MARKER``) listing what was written. OUT may
not be the input, contain it or lie inside it; ``--overwrite`` replaces an existing OUT only if it
is empty or holds nothing but what a converter wrote there (per its marker). Partial directories
of a run that was killed (SIGKILL, power loss) are removed, with one line saying so, by the next
run writing the same OUT; SIGINT, SIGTERM and SIGHUP remove them before exiting.

CLI contract (``run_app``, ``run_cli``): a wrong command line (flag, directory of the wrong kind,
OUT refused) is one ``error: ...`` line on stderr and exit 2; a failure while running (a
checkpoint whose contents are wrong, an I/O error, a full disk) is one line and exit 1; a signal
exits 128 + its number; ``--help`` prints every flag of the tool and exits 0; never a traceback
for any of these.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from absl import app, flags, logging

from minimax_jax.hf import mapping
from minimax_jax.hf.safetensors import trusted_roots

CONFIG_FILE = "config.json"
# Written last into every output; lists the entries the converter wrote (what --overwrite may
# replace).
MARKER = ".minimax_jax_convert.json"
# Flags every conversion CLI has (defined once: absl flags are process-global).
OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Output directory; must not exist (unless --overwrite) nor overlap the input."
)
OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace OUT if it is empty or an earlier output of a converter (atomically, after success).",
)
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
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HELP_ARGS = {"--help", "-h", "-?", "--helpshort", "--helpfull"}


class ConversionError(ValueError):
    """A conversion cannot proceed (bad arguments or output location)."""


class ArgumentError(ConversionError):
    """The command line is wrong (a flag, or a directory it names): CLIs exit 2."""


def check_input_dir(path: Path, flag: str, expected: str, any_of: Sequence[str] = ()) -> None:
    """``path`` must be a directory holding ``config.json`` (and one of ``any_of``)."""
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise ArgumentError(f"{flag} {path}: {what}; expected {expected}")
    missing = not (path / CONFIG_FILE).is_file() or (
        any_of and not any((path / name).exists() for name in any_of)
    )
    if missing:
        raise ArgumentError(f"{flag} {path}: not {expected}")


def check_locations(in_dir: Path, out_dir: Path, in_flag: str) -> None:
    """OUT may not be IN, contain it, or lie inside it (symbolic links resolved)."""
    src, dst = in_dir.resolve(), out_dir.resolve()
    if dst == src:
        why = f"is the {in_flag} directory itself"
    elif src.is_relative_to(dst):
        why = f"contains the {in_flag} directory {in_dir}"
    elif dst.is_relative_to(src):
        why = f"is inside the {in_flag} directory {in_dir}"
    else:
        return
    raise ArgumentError(f"--out_dir {out_dir} {why}; choose a new directory outside the input")


def check_replaceable(out_dir: Path) -> None:
    """Raises unless ``--overwrite`` may replace ``out_dir``: a real directory that is empty or
    holds only the entries its ``MARKER`` says a converter wrote."""
    fix = "remove it yourself or choose another --out_dir"
    if out_dir.is_symlink() or not out_dir.is_dir():
        kind = "a symbolic link" if out_dir.is_symlink() else "not a directory"
        raise ArgumentError(
            f"--out_dir {out_dir} is {kind}; --overwrite will not replace it: {fix}"
        )
    names = set(os.listdir(out_dir))
    if not names:
        return
    marker = out_dir / MARKER
    try:
        written = json.loads(marker.read_text()).get("files") if _regular(marker) else None
    except (OSError, ValueError, AttributeError):
        written = None
    if not isinstance(written, list):
        raise ArgumentError(
            f"--out_dir {out_dir} was not written by a converter (no {MARKER}); --overwrite "
            f"replaces only a converter's own output: {fix}"
        )
    extra = sorted(names - {f for f in written if isinstance(f, str)} - {MARKER})
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise ArgumentError(
            f"--out_dir {out_dir} holds files a converter did not write ({', '.join(extra[:5])}"
            f"{more}); --overwrite would delete them: move them away or choose another --out_dir"
        )


def prepare_output(in_dir: Path, out_dir: Path, overwrite: bool, in_flag: str) -> None:
    """All checks of OUT against IN and ``--overwrite``, before any work is done."""
    check_locations(in_dir, out_dir, in_flag)
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise ArgumentError(f"--out_dir {out_dir} exists; remove it or pass --overwrite")
        check_replaceable(out_dir)


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
    out_dir: Path,
    overwrite: bool,
    build: Callable[[Path], Any],
    *,
    in_dir: Path,
    in_flag: str = "input",
    stream: TextIO | None = sys.stderr,
) -> Any:
    """Runs ``build(tmp)`` on a hidden ``.OUT.partial-<pid>-*`` directory beside ``out_dir``,
    writes ``MARKER`` and renames it to ``out_dir``; returns what ``build`` returned.

    Checks ``prepare_output`` first (and again before replacing: OUT may change during a long
    build) and removes stale partial directories of killed runs (``remove_stale``). On any
    exception (KeyboardInterrupt included) the temporary directory is removed and ``out_dir`` is
    untouched. With ``overwrite`` an existing ``out_dir`` is replaced only after ``build``
    succeeded.
    """
    prepare_output(in_dir, out_dir, overwrite, in_flag)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir, stream)
    prefix = f".{out_dir.name}.partial-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    try:
        result = build(tmp)
        written = sorted(os.listdir(tmp))
        (tmp / MARKER).write_text(json.dumps({"written_by": "convert", "files": written}) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
        prepare_output(in_dir, out_dir, overwrite, in_flag)
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
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def help_text(doc: str, holders: Sequence[flags.FlagHolder]) -> str:
    """``doc`` and every flag of the tool (absl's short help omits flags of imported modules)."""
    lines = [doc.strip(), "", "flags:"]
    for holder in holders:
        flag = flags.FLAGS[holder.name]
        name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
        default = "" if flag.default is None else f" (default: {flag.default_as_str})"
        lines.append(f"  {name}: {flag.help}{default}")
    return "\n".join(lines) + "\n"


def run_app(
    main: Callable[[list[str]], None], doc: str, holders: Sequence[flags.FlagHolder]
) -> None:
    """``app.run(main)`` with the CLI contract for flag parsing: ``--help`` lists ``holders`` and
    exits 0; an unknown flag or bad value is one line and exit 2."""

    def parse(argv: list[str]) -> list[str]:
        args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
        if _HELP_ARGS & set(args):
            sys.stdout.write(help_text(doc, holders))
            sys.exit(0)
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            usage_error(f"{one_line(e)}; see --help")

    app.run(main, flags_parser=parse)


def run_cli(work: Callable[[], None], exit_code: int = 1) -> None:
    """Runs ``work``; expected errors become one line on stderr: ``ArgumentError`` exits 2,
    others ``exit_code``; SIGINT / SIGTERM / SIGHUP unwind (removing temporary directories) and
    exit 128 + the signal number."""
    logging.set_verbosity(logging.WARNING)  # Orbax logs every store open/close at INFO
    received: list[int] = []

    def on_signal(signum, frame):  # cleanup (temporary directories) runs on SIGTERM too
        received.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        work()
    except KeyboardInterrupt:
        signum = received[0] if received else signal.SIGINT
        name = signal.Signals(signum).name
        sys.stderr.write(f"\ninterrupted ({name}); partial output removed, nothing was written\n")
        sys.exit(128 + signum)
    except ArgumentError as e:
        usage_error(one_line(e))
    except (ValueError, OSError, MemoryError) as e:  # our errors subclass ValueError
        sys.stderr.write(f"error: {one_line(e) or type(e).__name__}\n")
        sys.exit(exit_code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
