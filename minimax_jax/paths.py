"""Path arguments: a local path, a Hugging Face hub id, or a ``gs://`` / ``s3://`` / ``az://`` URL.

Every path a user hands us (a CLI flag, an API argument, a run-config key) is classified once
(``classify``), before anything is read or written:

* ``scheme://...`` is a URL. ``gs://``, ``s3://`` and ``az://`` go through ``etils.epath`` (the
  layer Orbax uses; the bucket needs gcsfs / s3fs / adlfs installed, or TensorFlow). Any other
  scheme (``ftp://``, ``http://``, ``file://``, ``memory://`` ...) is refused, naming the argument.
* Where a hub id makes sense (checkpoints, model configs, tokenizers), a string that exists
  locally, or starts with ``/``, ``./``, ``../`` or ``~``, is a local path; otherwise
  ``owner/name`` or ``owner/name@revision`` is a hub id; anything else is refused as neither an
  existing local path nor a valid hub id. So an existing directory ``a/b`` wins over the hub
  repository ``a/b``, and ``./a/b`` is always local.
* Outputs, run directories, data globs and small input files are local paths or URLs (``a/b``
  there is a relative local path).

A URL string is never turned into a ``pathlib.Path`` (which would collapse ``gs://b`` into the
local ``gs:/b``): it stays a string and its I/O goes through ``etils.epath``.

Hub ids are resolved by ``huggingface_hub.snapshot_download`` in the usual Hugging Face cache
(``HF_HOME`` / ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` uses the cache alone), downloading only the
top-level files a checkpoint needs (``CHECKPOINT_FILES``; ``TOKENIZER_FILES`` for a tokenizer).
Readers that need local files (safetensors memory maps, ``tokenizers``) get a URL input copied
into a temporary directory (under ``TMPDIR``) that ``as_local`` removes when its block ends.

Imports nothing of ``minimax_jax``; ``etils.epath`` and ``huggingface_hub`` only when used.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

LOCAL, HUB, URL = "local", "hub", "url"
URL_SCHEMES = ("gs", "s3", "az")  # what etils.epath reaches (through fsspec or tf.io.gfile)
_FS_PACKAGES = {"gs": "gcsfs google-cloud-storage", "s3": "s3fs", "az": "adlfs"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Hugging Face repo names (huggingface_hub.utils.validate_repo_id): letters, digits, "-", "_",
# "."; not starting or ending with "-" or "."; no "--" or ".."; at most 96 characters; the id
# does not end in ".git".
_HUB_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"({_HUB_NAME})/({_HUB_NAME})(?:@([A-Za-z0-9._][A-Za-z0-9._/-]*))?")
_LOCAL_PREFIXES = ("/", "./", "../", "~")

# The side files of a checkpoint (tokenizer, chat template, generation defaults).
TOKENIZER_FILES = (
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
# What loading a checkpoint reads: config, weights (+ index), the VL preprocessor config, and the
# side files. For a URL also ``params/`` (an Orbax directory written by convert.hf_to_orbax).
CHECKPOINT_FILES = (
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    *TOKENIZER_FILES,
)
CONFIG_FILES = ("config.json",)
_URL_EXTRA_FILES = ("params/*", "conversion.json")


class PathError(ValueError):
    """A path argument names nothing we can use; the message names the argument and the fix."""


def scheme(text: str | os.PathLike) -> str | None:
    """``"gs"`` of ``"gs://b/x"``; None for a string without ``scheme://``."""
    match = _SCHEME.match(os.fspath(text)) if isinstance(text, str) else None
    return match.group(1).lower() if match else None


def is_url(text: Any) -> bool:
    """True for a supported URL (``gs://``, ``s3://``, ``az://``)."""
    return isinstance(text, str) and scheme(text) in URL_SCHEMES


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(``owner/name``, revision or None) of ``owner/name[@revision]``; None if malformed."""
    match = _HUB_ID.fullmatch(text)
    if match is None or any(".." in p or "--" in p for p in match.group(1, 2)):
        return None
    if match.group(2).endswith(".git"):
        return None
    return f"{match.group(1)}/{match.group(2)}", match.group(3)


def _kinds(hub: bool) -> str:
    hub_id = "a Hugging Face hub id owner/name[@revision], " if hub else ""
    return f"use a local path, {hub_id}or a gs://, s3:// or az:// URL"


def classify(text: str | os.PathLike, what: str, *, hub: bool = True) -> str:
    """``LOCAL``, ``HUB`` or ``URL`` for the argument ``what`` (see the module docstring).

    Raises:
      PathError: an unsupported scheme, or (with ``hub``) neither an existing local path nor a
        well-formed hub id.
    """
    if not isinstance(text, str):
        return LOCAL  # a pathlib.Path (or other PathLike) is local by construction
    found = scheme(text)
    if found is not None:
        if found in URL_SCHEMES:
            return URL
        raise PathError(f"{what} {text}: unsupported scheme {found}://; {_kinds(hub)}")
    if not hub or text.startswith(_LOCAL_PREFIXES) or os.path.exists(os.path.expanduser(text)):
        return LOCAL
    if parse_hub_id(text) is not None:
        return HUB
    raise PathError(
        f"{what} {text}: no such local path, and not a Hugging Face hub id (owner/name or "
        f"owner/name@revision); {_kinds(hub)}"
    )


def location(text: str | os.PathLike, what: str, schemes: Sequence[str] = URL_SCHEMES) -> str:
    """An output, run directory or data path: the local path or URL as a string (schemes other
    than ``schemes`` refused). URLs lose trailing slashes; nothing is created."""
    kind = classify(text, what, hub=False)
    text = os.fspath(text)
    if kind == URL and scheme(text) not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes)
        raise PathError(
            f"{what} {text}: {scheme(text)}:// is not supported here (only local paths"
            f"{' and ' + allowed if allowed else ''})"
        )
    return text.rstrip("/") if kind == URL else text


def local_only(text: str | os.PathLike, what: str) -> Path:
    """``Path(text)`` for an argument that must be a local file or directory; a URL (any
    ``scheme://``) is refused, naming ``what``."""
    if classify(text, what, hub=False) == URL:
        raise PathError(f"{what} {text}: a URL; this argument takes a local path")
    return Path(text)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL (a string either way)."""
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def parent(loc: str) -> str:
    """The directory holding ``loc`` (a local path or a URL)."""
    return posixpath.dirname(loc.rstrip("/")) if is_url(loc) else os.path.dirname(loc)


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether one of two locations is, contains or lies inside the other (local paths with
    symbolic links resolved; URLs compared as strings; a URL never overlaps a local path)."""
    a, b = os.fspath(a), os.fspath(b)
    if is_url(a) != is_url(b):
        return False
    if is_url(a):
        a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
        return a.startswith(b) or b.startswith(a)
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra.is_relative_to(rb) or rb.is_relative_to(ra)


# --------------------------------------------------------------------------------------------
# URLs through etils.epath


def epath(url: str):
    """``etils.epath.Path`` of a supported URL."""
    from etils import epath as epath_lib  # Orbax's dependency; imported when a URL is used

    return epath_lib.Path(url)


class MissingFilesystem(PathError):
    """The package that reaches a URL's storage (gcsfs, s3fs, ...) is not installed."""

    def __init__(self, message: str, named: bool):
        super().__init__(message)
        self.named = named  # whether the message names the argument yet


@contextlib.contextmanager
def remote(url: str, what: str | None = None) -> Iterator[None]:
    """Under a URL: a missing filesystem package (gcsfs, s3fs, adlfs; Orbax's GCS code also
    imports google-cloud-storage) becomes a ``MissingFilesystem`` naming ``what`` (the argument;
    an inner ``remote`` without it leaves the naming to an outer one) and what to install."""
    if not is_url(url):
        yield
        return
    try:
        yield
    except MissingFilesystem as e:
        if what is None or e.named:
            raise
        raise MissingFilesystem(f"{what} {e}", named=True) from None
    except ImportError as e:
        packages = _FS_PACKAGES.get(scheme(url) or "", "its fsspec filesystem")
        message = f"{url}: {scheme(url)}:// support is not installed ({e}): pip install {packages}"
        raise MissingFilesystem(
            f"{what} {message}" if what else message, what is not None
        ) from None


def exists(loc: str) -> bool:
    if is_url(loc):
        with remote(loc):
            return epath(loc).exists()
    return os.path.exists(loc)


def isdir(loc: str) -> bool:
    if is_url(loc):
        with remote(loc):
            return epath(loc).is_dir()
    return os.path.isdir(loc)


def isfile(loc: str) -> bool:
    if is_url(loc):
        return exists(loc) and not isdir(loc)
    return os.path.isfile(loc)


def makedirs(loc: str) -> None:
    if is_url(loc):
        with remote(loc):
            epath(loc).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(loc, exist_ok=True)


def read_text(loc: str) -> str:
    if is_url(loc):
        with remote(loc):
            return epath(loc).read_text()
    with open(loc, encoding="utf-8") as f:
        return f.read()


def read_bytes(loc: str) -> bytes:
    if is_url(loc):
        with remote(loc):
            return epath(loc).read_bytes()
    with open(loc, "rb") as f:
        return f.read()


def size(loc: str) -> int:
    """Bytes in file ``loc``."""
    if is_url(loc):
        with remote(loc):
            return int(epath(loc).stat().length)
    return os.path.getsize(loc)


def write_text(loc: str, text: str) -> None:
    """Writes ``text`` whole: locally to a temporary file renamed over ``loc``; on an object
    store as one object (object writes are atomic)."""
    if is_url(loc):
        with remote(loc):
            epath(loc).write_text(text)
        return
    tmp = f"{loc}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, loc)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rmtree(loc: str) -> None:
    if is_url(loc):
        with remote(loc):
            epath(loc).rmtree(missing_ok=True)
    else:
        shutil.rmtree(loc)


def remove(loc: str) -> None:
    """Removes a file or a directory tree."""
    if isdir(loc):
        rmtree(loc)
    elif is_url(loc):
        with remote(loc):
            epath(loc).unlink(missing_ok=True)
    else:
        os.remove(loc)


def listdir(loc: str) -> list[str]:
    """Names of the entries of directory ``loc``."""
    if is_url(loc):
        with remote(loc):
            return sorted(p.name for p in epath(loc).iterdir())
    return sorted(os.listdir(loc))


def walk_files(url: str) -> Iterator[str]:
    """Relative POSIX paths of every file under directory ``url`` (sorted per directory)."""
    for name in listdir(url):
        child = join(url, name)
        if isdir(child):
            yield from (f"{name}/{rel}" for rel in walk_files(child))
        else:
            yield name


_GLOB_CHARS = re.compile(r"[*?[]")


def _match(parts: list[str], pattern: list[str]) -> bool:
    """``glob`` semantics on path segments: ``**`` spans any number of directories, other
    segments are ``fnmatch`` patterns; hidden names match only a pattern starting with "."."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        if _match(parts, rest):
            return True
        return bool(parts) and not parts[0].startswith(".") and _match(parts[1:], pattern)
    if not parts or (parts[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _match(parts[1:], rest)


def glob_url(pattern: str, suffix: str = "") -> list[str]:
    """Files matched by a URL: a file itself, every file under a directory (ending in
    ``suffix``; hidden names skipped), or the files matching a glob (``**`` included)."""
    segments = pattern.rstrip("/").split("/")
    first = next((i for i, seg in enumerate(segments) if _GLOB_CHARS.search(seg)), None)
    if first is None:
        if not exists(pattern):
            return []
        if not isdir(pattern):
            return [pattern.rstrip("/")]
        rels = [r.split("/") for r in walk_files(pattern)]
        keep = [r for r in rels if r[-1].endswith(suffix) and not any(p[:1] == "." for p in r)]
        return [join(pattern.rstrip("/"), *r) for r in keep]
    root = "/".join(segments[:first])
    if not is_url(root) or not isdir(root):  # a glob in the bucket name matches nothing
        return []
    matched = [r for r in walk_files(root) if _match(r.split("/"), segments[first:])]
    return [join(root, *r.split("/")) for r in matched]


def move_tree(src: str, dst: str) -> None:
    """Renames a directory: ``os.replace`` locally; on an object store each file is moved
    (a copy and a delete: not atomic, there is no rename of a prefix)."""
    if not is_url(src):
        os.replace(src, dst)
        return
    with remote(src):
        for rel in list(walk_files(src)):
            epath(join(dst, *rel.split("/"))).parent.mkdir(parents=True, exist_ok=True)
            epath(join(src, *rel.split("/"))).rename(join(dst, *rel.split("/")))
        epath(src).rmtree(missing_ok=True)


def upload_tree(local: Path, url: str, names: Sequence[str], last: Sequence[str] = ()) -> None:
    """Copies ``names`` (files or directories inside ``local``) to ``url``; files whose name is in
    ``last`` go after all others (so a reader never sees a metadata file before the data)."""
    files = []
    for name in names:
        path = local / name
        if path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file()]
        else:
            files.append(path)
    files.sort(key=lambda p: p.name in last)
    with remote(url, "the output"):
        for path in files:
            target = epath(join(url, *path.relative_to(local).parts))
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "rb") as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, 16 * 2**20)


def _download(url: str, dest: Path, patterns: Sequence[str], what: str) -> None:
    """Copies ``url`` (a file, or the files of a directory matching ``patterns``) to ``dest``."""
    if not isdir(url):
        with epath(url).open("rb") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 16 * 2**20)
        return
    dest.mkdir()
    wanted = [rel for rel in walk_files(url) if any(fnmatch.fnmatch(rel, p) for p in patterns)]
    if not wanted:
        raise PathError(
            f"{what} {url}: no checkpoint files in it (looked for {', '.join(patterns)})"
        )
    for rel in wanted:
        target = dest.joinpath(*rel.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with epath(join(url, *rel.split("/"))).open("rb") as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 16 * 2**20)


# --------------------------------------------------------------------------------------------
# Hugging Face hub ids


def hub_snapshot(text: str, what: str, patterns: Sequence[str] = CHECKPOINT_FILES) -> Path:
    """The local snapshot directory of hub id ``text`` (``owner/name[@revision]``), downloading
    the top-level files matching ``patterns`` that the Hugging Face cache lacks.

    Raises:
      PathError: unknown repository or revision, no access, or not cached with
        ``HF_HUB_OFFLINE`` set.
      OSError: the hub cannot be reached (and the cache does not have it) or answered an error.
    """
    parsed = parse_hub_id(text)
    if parsed is None:
        raise PathError(f"{what} {text}: not a Hugging Face hub id (owner/name[@revision])")
    repo_id, revision = parsed
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise PathError(
            f"{what} {text}: a Hugging Face hub id needs huggingface_hub (pip install "
            "huggingface_hub); or pass a local directory"
        ) from None
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=list(patterns), ignore_patterns=["*/*"]
        )
    except errors.RevisionNotFoundError:
        raise PathError(f"{what} {text}: no revision {revision!r} in {repo_id}") from None
    except errors.RepositoryNotFoundError:
        raise PathError(
            f"{what} {text}: no such model on the Hugging Face hub, or it is private or gated: "
            "check the id, or log in (hf auth login, or HF_TOKEN)"
        ) from None
    except errors.LocalEntryNotFoundError as e:
        cache = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            raise PathError(
                f"{what} {text}: not (completely) in the Hugging Face cache {cache} and "
                "HF_HUB_OFFLINE is set: download it once online, or unset HF_HUB_OFFLINE"
            ) from None
        raise OSError(
            f"{what} {text}: cannot reach the Hugging Face hub and not (completely) in the "
            f"cache {cache} ({' '.join(str(e).split())[:200]})"
        ) from None
    except errors.HfHubHTTPError as e:
        raise OSError(f"{what} {text}: Hugging Face hub error ({str(e).splitlines()[0]})") from None
    return Path(folder)


@contextlib.contextmanager
def as_local(
    text: str | os.PathLike,
    what: str,
    *,
    patterns: Sequence[str] = CHECKPOINT_FILES,
    hub: bool = True,
) -> Iterator[Path]:
    """A local path for the input ``text`` while the block runs.

    A local path is itself (``~`` expanded); a hub id is its snapshot in the Hugging Face cache
    (``hub_snapshot``); a URL is copied into a temporary directory (a directory: the files
    matching ``patterns``, and ``params/`` for an Orbax checkpoint) that is removed when the block
    ends. Nothing is checked about what the path holds: callers say what they expected.
    """
    kind = classify(text, what, hub=hub)
    if kind == LOCAL:
        yield Path(os.path.expanduser(text)) if isinstance(text, str) else Path(text)
        return
    if kind == HUB:
        yield hub_snapshot(text, what, patterns)
        return
    url = text.rstrip("/")
    tmp = Path(tempfile.mkdtemp(prefix="minimax_jax-url-"))
    try:
        dest = tmp / (posixpath.basename(url) or "root")
        with remote(url, what):
            if not exists(url):
                raise PathError(f"{what} {url}: no such file or directory")
            _download(url, dest, (*patterns, *_URL_EXTRA_FILES), what)
        yield dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
