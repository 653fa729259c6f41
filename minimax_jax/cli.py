"""The contract every command-line tool keeps (generate, train, tokenizer_train, info, convert.*).

* ``--help`` (``-h``, ``--helpfull``) prints the tool's own flags with their defaults; exit 0.
* ``--version`` prints ``<prog> <version>`` (the program as invoked: ``minimax-jax-generate``, or
  ``minimax_jax.generate`` under ``python -m``; the version of the installed package); exit 0.
* Bad input (a flag, a config, a file given by the user or read from a checkpoint): one line
  ``error: <what and the fix>`` on stderr, exit 2 (``EXIT_USAGE``).
* A failure while running (out of memory, an I/O error, non-finite training): one line, exit 1
  (``EXIT_FAILURE``; ``convert.check_logits`` uses 2 for every error, 1 meaning "logits differ").
* SIGINT / SIGTERM / SIGHUP: exit 128 + the signal number.
* Never a Python traceback, unless ``--debug`` is given.

Imports nothing of ``minimax_jax`` but the standard-library leaf ``minimax_jax.version``: every
layer may raise ``UsageError``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags, logging

from minimax_jax.version import __version__

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
SEED_MAX = 2**32 - 1  # seeds are 0 .. 2**32 - 1 (a PRNG key holds 32-bit words)
# Defined once on absl's global FLAGS: every CLI has it.
DEBUG = flags.DEFINE_bool("debug", False, "On an error, also print the Python traceback.")
_HELP_ARGS = {"--help", "-h", "-?", "--helpshort", "--helpfull"}
_VERSION_ARG = "--version"
# A wrong path the user gave: bad input, not a failure of the run.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


class UsageError(ValueError):
    """Bad input (flag, config, file): the CLIs print one line and exit 2."""


def error_exit(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One ``error:`` line on stderr, then ``sys.exit(code)``."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def _hard_exit(message: str, code: int) -> NoReturn:
    """``error_exit`` that does not wait for other threads."""
    sys.stderr.write(f"error: {message}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def one_line(error: BaseException, max_names: int = 20) -> str:
    """The error as one line. An error with a ``problems`` mapping (a checkpoint mismatch) lists
    up to ``max_names`` names per problem."""
    problems = getattr(error, "problems", None)
    if isinstance(problems, dict):
        head = str(error).splitlines()[0] if str(error) else type(error).__name__
        parts = []
        for kind, names in problems.items():
            more = f" (+{len(names) - max_names} more)" if len(names) > max_names else ""
            parts.append(f"{kind} ({len(names)}): {', '.join(names[:max_names])}{more}")
        return f"{head}: {'; '.join(parts)}"
    text = " | ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{error.filename}: {text}"
    return text or type(error).__name__


def help_text(doc: str, holders: Sequence[flags.FlagHolder]) -> str:
    """``doc`` and every flag in ``holders`` (absl's short help omits flags of imported modules
    and of separate ``FlagValues``), with defaults."""
    lines = [doc.strip(), "", "flags:"]
    for holder in [*holders, DEBUG]:
        flag = holder._flagvalues[holder.name]  # noqa: SLF001 - absl has no public accessor
        name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
        default = "" if flag.default is None else f" (default: {flag.default_as_str})"
        lines.append(f"  {name}: {flag.help}{default}")
    lines.append(f"  {_VERSION_ARG}: Print the program name and version ({__version__}) and exit.")
    return "\n".join(lines) + "\n"


def prog_name(argv0: str) -> str:
    """The program as the user invoked it: the module under ``python -m`` (``argv[0]`` is then
    the file's path), else the console script's file name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name not in ("__main__", ""):
        return spec.name
    return os.path.basename(argv0) or "minimax_jax"


def version_line(argv0: str) -> str:
    """``<prog> <version>``, what ``--version`` prints."""
    return f"{prog_name(argv0)} {__version__}\n"


def finite(
    holder: flags.FlagHolder, minimum: float | None = None, maximum: float | None = None
) -> None:
    """Registers a check that the float flag is finite and within [minimum, maximum]."""

    def ok(value: float | None) -> bool:
        if value is None:
            return True
        if not math.isfinite(value):
            return False
        return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)

    low = "" if minimum is None else f" >= {minimum:g}"
    high = "" if maximum is None else f" <= {maximum:g}"
    flags.register_validator(
        holder,
        ok,
        message=f"must be a finite number{low}{' and' if low and high else ''}{high}",
        flag_values=holder._flagvalues,  # noqa: SLF001
    )


def guard(
    work: Callable[[], None],
    *,
    failure_code: int = EXIT_FAILURE,
    on_interrupt: str = "",
    hard_exit: bool = False,
) -> None:
    """Runs ``work`` under the contract: ``ValueError`` (``UsageError``, JSON / UTF-8 errors) and
    wrong paths exit 2; ``OSError``, ``MemoryError``, ``RuntimeError`` and anything unexpected
    exit ``failure_code``; SIGINT / SIGTERM / SIGHUP unwind (``finally`` blocks run) and exit
    128 + the signal number. With ``--debug`` the error propagates with its traceback.
    ``hard_exit``: on an error, flush and ``os._exit`` (threads of a failed Orbax save would
    otherwise keep the process alive)."""
    received: list[int] = []

    def on_signal(signum, frame):  # cleanup in finally blocks runs on SIGTERM too
        received.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        work()
    except KeyboardInterrupt:
        signum = received[0] if received else signal.SIGINT
        sys.stderr.write(f"\ninterrupted ({signal.Signals(signum).name}){on_interrupt}\n")
        sys.exit(128 + signum)
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        if _debug():
            raise
        exit_with = _hard_exit if hard_exit else error_exit
        if isinstance(e, (ValueError, *_PATH_ERRORS)):
            exit_with(one_line(e), EXIT_USAGE)
        if isinstance(e, OSError | MemoryError | RuntimeError):
            exit_with(one_line(e), failure_code)
        exit_with(
            f"internal error ({type(e).__name__}: {one_line(e)}); rerun with --debug for the "
            "traceback and report it",
            failure_code,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _debug() -> bool:
    try:
        return bool(DEBUG.value)
    except flags.UnparsedFlagAccessError:
        return False


def run(
    main: Callable[[list[str]], None],
    doc: str,
    holders: Sequence[flags.FlagHolder],
    *,
    extra: flags.FlagValues | None = None,
) -> None:
    """``app.run(main)`` with the contract for the command line: ``--help`` prints ``holders``
    and exits 0, ``--version`` prints ``<prog> <version>`` and exits 0; an unknown flag, a bad
    value or a stray argument is one line and exit 2.
    ``extra``: the tool's own ``FlagValues``, joined to absl's ``FLAGS`` first."""
    if extra is not None:
        flags.FLAGS.append_flag_values(extra)

    def parse(argv: list[str]) -> list[str]:
        args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
        if _HELP_ARGS & set(args):
            sys.stdout.write(help_text(doc, holders))
            sys.exit(EXIT_OK)
        if _VERSION_ARG in args:
            sys.stdout.write(version_line(argv[0]))
            sys.exit(EXIT_OK)
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            error_exit(f"{one_line(e)}; see --help")
        if extra is not None:
            extra.mark_as_parsed()  # parsed through FLAGS, which holds the same Flag objects
        if len(rest) > 1:
            error_exit(f"unexpected arguments {rest[1:]}: every input is a flag (see --help)")
        logging.set_verbosity(logging.WARNING)  # Orbax logs every store open/close at INFO
        return rest

    app.run(main, flags_parser=parse)
