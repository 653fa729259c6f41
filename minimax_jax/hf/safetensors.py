"""Lazy safetensors reading and sharded writing, numpy only (bf16 via ml_dtypes).

File format (https://huggingface.co/docs/safetensors): 8-byte little-endian header length ``n``,
``n`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}``, then the data buffer; offsets are relative to the end of the header.

``SafetensorsReader`` opens a checkpoint directory (``model.safetensors``, or shards listed by
``model.safetensors.index.json``) and reads nothing but headers until a tensor is asked for; each
``read`` returns one tensor as a fresh numpy array, so host memory is bounded by the tensors the
caller keeps. ``write_sharded`` streams tensors into shards of bounded size inside a temporary
directory and moves the finished files into place, so a crash never leaves a half-written
checkpoint under the final name.

Checkpoint files are data, not instructions: the reader reads only files inside the checkpoint
directory (an index entry that is absolute, holds ``..`` or is a symbolic link leading outside is
refused; a Hugging Face hub cache snapshot may link into its repository's ``blobs/``), checks
every header (size cap, offsets non-negative, ordered, non-overlapping, inside the file and equal
to dtype x shape) before any tensor is read, and its errors name the file and the entry but never
echo file bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Largest header / index accepted (the safetensors reference implementation's header limit):
# a bigger length field is a corrupt or hostile file, not a checkpoint.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype code <-> numpy dtype.
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A checkpoint file or index is missing or malformed."""


def dtype_code(dtype: np.dtype | type) -> str:
    """safetensors dtype code ("BF16", "F32", ...) of a numpy dtype."""
    try:
        return _CODES[np.dtype(dtype)]
    except KeyError:
        raise SafetensorsError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors") from None


def numpy_dtype(code: str) -> np.dtype:
    """numpy dtype of a safetensors dtype code."""
    try:
        return _DTYPES[code]
    except (KeyError, TypeError):
        raise SafetensorsError(f"unsupported safetensors dtype {short(code)}") from None


def short(value: object, limit: int = 80) -> str:
    """``repr`` of a value read from a file, cut to ``limit`` characters: errors name entries but
    never dump file contents."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def trusted_roots(directory: Path) -> tuple[Path, ...]:
    """Real directories the files of checkpoint ``directory`` may resolve into: the directory
    itself and, for a Hugging Face hub cache snapshot (``models--org--name/snapshots/<rev>/``,
    whose files are symbolic links to ``../../blobs/<hash>``), that repository's ``blobs/``."""
    real = directory.resolve()
    for parent in real.parents:
        if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
            blobs = parent.parent / "blobs"
            return (real, blobs) if blobs.is_dir() else (real,)
    return (real,)


def check_inside(directory: Path, path: Path, what: str) -> Path:
    """``path`` if it resolves inside ``directory`` (see ``trusted_roots``); else raises."""
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in trusted_roots(directory)):
        raise SafetensorsError(
            f"{path}: {what} is a symbolic link leading outside {directory}; only files inside "
            "the checkpoint directory are read"
        )
    return path


def resolve_inside(directory: Path, name: Any, what: str) -> Path:
    """``directory / name`` for a relative file name read from an index or manifest; raises
    unless it stays inside ``directory`` (no absolute path, no ``..``, no link leading out)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise SafetensorsError(f"{what}: {short(name)} is not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise SafetensorsError(
            f"{what}: {short(name)} points outside the checkpoint directory {directory}; entries "
            "must be file names relative to it"
        )
    return check_inside(directory, directory / pure, what)


def _load_json(file: Path, what: str) -> Any:
    """Parsed JSON of a small metadata file; any malformation is one ``SafetensorsError``."""
    if file.stat().st_size > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{file}: {what} is over the {MAX_HEADER_BYTES} byte limit")
    return _parse_json(file.read_bytes(), file, what)


def _parse_json(raw: bytes, file: Path, what: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:  # its message names the position, not the text
        raise SafetensorsError(
            f"{file}: {what} is not valid JSON ({e.msg} at byte {e.pos})"
        ) from None
    except UnicodeDecodeError:
        raise SafetensorsError(f"{file}: {what} is not UTF-8 JSON") from None
    except RecursionError:
        raise SafetensorsError(f"{file}: {what} is nested too deeply") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: shard file, dtype code, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parses and validates one safetensors file's header: ({name: TensorInfo}, __metadata__).

    Refused (``SafetensorsError`` naming the file): a header length over ``MAX_HEADER_BYTES`` or
    the file size, malformed JSON, an entry without a known dtype, a shape of non-negative ints
    and two ``data_offsets``, offsets that are negative, reversed, past the end of the file, not
    dtype x shape bytes apart, or overlapping another tensor's.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{file}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:  # the length itself is not printed: it is 8 bytes of the file
            raise SafetensorsError(
                f"{file}: header length is over the {MAX_HEADER_BYTES} byte limit; not a "
                "safetensors file or corrupt"
            )
        if n > size - 8:
            raise SafetensorsError(
                f"{file}: header length exceeds the file size {size}; not a safetensors file or "
                "truncated"
            )
        header = _parse_json(f.read(n), file, "header")
    if not isinstance(header, dict):
        raise SafetensorsError(f"{file}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{file}: header __metadata__ is not a JSON object")
    infos = {name: _tensor_info(file, name, entry, 8 + n, size) for name, entry in header.items()}
    end = 0
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].nbytes)):
        if info.start < end:
            raise SafetensorsError(
                f"{file}: tensor {short(name)} overlaps the bytes of another tensor"
            )
        end = info.start + info.nbytes
    return infos, metadata


def _tensor_info(file: Path, name: str, entry: Any, data_start: int, size: int) -> TensorInfo:
    """One validated header entry (``data_start`` = 8 + header length)."""
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{file}: header entry {short(name)} is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not isinstance(offsets, list):
        raise SafetensorsError(f"{file}: tensor {short(name)} needs a shape and data_offsets")
    if not (isinstance(dtype, str) and dtype in _DTYPES):
        raise SafetensorsError(f"{file}: tensor {short(name)} has unsupported dtype {short(dtype)}")
    itemsize = _DTYPES[dtype].itemsize
    if not all(_is_int(s) and s >= 0 for s in shape):
        raise SafetensorsError(f"{file}: tensor {short(name)} has a shape that is not sizes >= 0")
    if len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise SafetensorsError(f"{file}: tensor {short(name)} needs data_offsets [begin, end]")
    begin, end = offsets
    nbytes = math.prod(shape) * itemsize
    if not 0 <= begin <= end or end - begin != nbytes or data_start + end > size:
        raise SafetensorsError(
            f"{file}: tensor {short(name)} has byte range {begin}..{end} inconsistent with "
            f"dtype {dtype} shape {shape} ({nbytes} bytes) or the file size"
        )
    return TensorInfo(file, dtype, tuple(shape), data_start + begin, nbytes)


class SafetensorsReader:
    """Lazy reader of a single-file or sharded safetensors checkpoint directory.

    Names come from the index (sharded) without opening any shard; a shard's header is parsed the
    first time one of its tensors' ``info`` or data is needed.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_file():
            path, files = path.parent, {None: path}
        else:
            files = None
        self.path = path
        self._headers: dict[Path, dict[str, TensorInfo]] = {}
        self.total_size: int | None = None
        if files is None and (path / INDEX_FILE).is_file():
            self._where = self._read_index(check_inside(path, path / INDEX_FILE, INDEX_FILE))
        elif files is not None or (path / SINGLE_FILE).is_file():
            file = (
                files[None]
                if files is not None
                else check_inside(path, path / SINGLE_FILE, SINGLE_FILE)
            )
            self._headers[file] = read_header(file)[0]
            self._where = dict.fromkeys(self._headers[file], file)
        else:
            raise SafetensorsError(
                f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found; expected a HF checkpoint "
                "directory"
            )

    def _read_index(self, index_file: Path) -> dict[str, Path]:
        """{tensor name: shard path} of the index, every shard checked to be inside the
        directory; sets ``total_size``."""
        index = _load_json(index_file, "index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        metadata = index.get("metadata") if isinstance(index, dict) else None
        metadata = {} if metadata is None else metadata
        if not isinstance(weight_map, dict) or not isinstance(metadata, dict):
            raise SafetensorsError(
                f"{index_file}: expected a JSON object with a weight_map object of tensor name "
                "-> shard file name (and an optional metadata object)"
            )
        total = metadata.get("total_size")
        self.total_size = total if _is_int(total) else None
        shards: dict[Any, Path] = {}
        where = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or shard not in shards:
                what = f"{index_file.name} weight_map[{short(name)}]"
                shards[shard] = resolve_inside(self.path, shard, what)
            where[name] = shards[shard]
        return where

    def names(self) -> list[str]:
        """All tensor names, in index/file order."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        """Shape/dtype/location of ``name`` (parses its shard's header on first use)."""
        file = self._where[name]
        if file not in self._headers:
            if not file.is_file():
                raise SafetensorsError(
                    f"{file}: shard listed in {INDEX_FILE} does not exist or is not a regular file"
                )
            self._headers[file] = read_header(file)[0]
        try:
            return self._headers[file][name]
        except KeyError:
            raise SafetensorsError(
                f"{file}: tensor {name!r} is listed in {INDEX_FILE} but not stored in this shard"
            ) from None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Reads one tensor (or its rows ``start:stop`` along axis 0) into a new numpy array
        (dtype as stored, bf16 as ml_dtypes)."""
        info = self.info(name)
        start, stop = (0, info.shape[0] if info.shape else 1) if rows is None else rows
        if info.shape:
            if not 0 <= start <= stop <= info.shape[0]:
                raise SafetensorsError(f"{name}: rows {start}:{stop} outside {info.shape[0]}")
            shape = (stop - start, *info.shape[1:])
        else:
            shape = ()
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        out = np.empty(shape, dtype=numpy_dtype(info.dtype))
        with open(info.file, "rb") as f:
            f.seek(info.start + start * row_bytes)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != out.nbytes:
            raise SafetensorsError(f"{info.file}: short read of {name!r} ({got}/{out.nbytes})")
        return out

    def memmap(self, name: str) -> np.ndarray:
        """Read-only memory map of one tensor: slicing it reads only the pages it touches."""
        info = self.info(name)
        if info.nbytes == 0:
            return np.empty(info.shape, numpy_dtype(info.dtype))
        return np.memmap(
            info.file, numpy_dtype(info.dtype), mode="r", offset=info.start, shape=info.shape
        )


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor to be produced later (``write_sharded(..., specs=...)``)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class RowPieces:
    """A tensor produced in pieces of whole rows (axis 0), in order: ``pieces()`` yields arrays
    whose concatenation along axis 0 is the tensor. Lets a huge tensor be written without ever
    holding it whole."""

    shape: tuple[int, ...]
    dtype: np.dtype
    pieces: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _write_data(f, name: str, arr: np.ndarray | RowPieces) -> None:
    """Writes one tensor's bytes (C order)."""
    if not isinstance(arr, RowPieces):
        f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
        return
    rows = 0
    for piece in arr.pieces():
        if piece.shape[1:] != tuple(arr.shape[1:]) or piece.dtype != np.dtype(arr.dtype):
            raise SafetensorsError(f"{name}: piece {list(piece.shape)} {piece.dtype} misfits")
        f.write(memoryview(np.ascontiguousarray(piece).reshape(-1).view(np.uint8)))
        rows += piece.shape[0]
    if rows != arr.shape[0]:
        raise SafetensorsError(f"{name}: pieces gave {rows} rows, expected {arr.shape[0]}")


def _shard_bytes(tensors: list[tuple[str, np.ndarray]]) -> tuple[bytes, int]:
    """Serialized header for ``tensors`` (in order) and the size of their data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, arr in tensors:
        header[name] = {
            "dtype": dtype_code(arr.dtype),
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data buffer 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offset


def write_file(
    file: Path,
    tensors: list[tuple[str, np.ndarray | TensorSpec]],
    source: Iterator[tuple[str, np.ndarray]] | None = None,
) -> None:
    """Writes one safetensors file holding ``tensors`` (C-contiguous copies are made if needed).

    With ``source``, ``tensors`` may be specs: the header is written from them and each tensor's
    data is then pulled from ``source`` (which must yield the same names, shapes and dtypes in
    order, each an array or ``RowPieces``), so at most one tensor is in memory at a time.
    """
    header, _ = _shard_bytes(tensors)
    with open(file, "wb") as f:
        f.write(header)
        for name, arr in tensors:
            if source is not None:
                arr = _next_matching(source, name, arr)
            _write_data(f, name, arr)


def _next_matching(
    source: Iterator[tuple[str, np.ndarray]], name: str, spec: np.ndarray | TensorSpec
) -> np.ndarray:
    """The next tensor of ``source``; it must be ``name`` with the planned shape and dtype."""
    got_name, arr = next(source, (None, None))
    if got_name != name or arr.shape != tuple(spec.shape) or arr.dtype != np.dtype(spec.dtype):
        got = None if arr is None else (list(arr.shape), str(arr.dtype))
        raise SafetensorsError(
            f"streamed tensor {got_name!r} {got} does not match the plan: {name!r} "
            f"{[list(spec.shape), str(np.dtype(spec.dtype))]}"
        )
    return arr


def _group_shards(
    tensors: Iterable[tuple[str, np.ndarray]], max_shard_bytes: int
) -> Iterator[list[tuple[str, np.ndarray]]]:
    """Groups a tensor stream greedily into shards of at most max_shard_bytes (one tensor larger
    than that gets a shard of its own)."""
    shard: list[tuple[str, np.ndarray]] = []
    size = 0
    for name, arr in tensors:
        if shard and size + arr.nbytes > max_shard_bytes:
            yield shard
            shard, size = [], 0
        shard.append((name, arr))
        size += arr.nbytes
    if shard:
        yield shard


def write_sharded(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_bytes: int = 5 * 2**30,
    extra_files: dict[str, str] | None = None,
    specs: Iterable[tuple[str, TensorSpec]] | None = None,
) -> list[str]:
    """Writes a HF-style safetensors checkpoint to directory ``path``; returns the file names.

    One shard is written as ``model.safetensors``; several as ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json`` (``metadata.total_size`` = sum of tensor bytes). Only
    one shard's tensors are held at a time. Everything is written to a temporary directory next
    to ``path`` and then moved in; previous ``model*.safetensors``/index files in ``path`` are
    removed. ``extra_files`` ({file name: text}, e.g. config.json) are written alongside.
    With ``specs`` ((name, TensorSpec) in the order ``tensors`` will yield them), shards are
    planned from the specs and each tensor is written as soon as it is produced: host memory
    holds one tensor instead of one shard.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        if specs is None:
            files = _write_shards_into(tmp, tensors, max_shard_bytes)
        else:
            source = iter(tensors)
            files = _write_shards_into(tmp, specs, max_shard_bytes, source)
            if next(source, None) is not None:
                raise SafetensorsError("more tensors were streamed than planned in specs")
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
            files.append(fname)
        _move_into_place(tmp, path, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def _write_shards_into(
    tmp: Path,
    tensors: Iterable[tuple[str, np.ndarray | TensorSpec]],
    max_shard_bytes: int,
    source: Iterator[tuple[str, np.ndarray]] | None = None,
) -> list[str]:
    """Writes shards as ``part-i`` into ``tmp``, renames them once their count is known."""
    weight_map: dict[str, int] = {}
    total = 0
    count = 0
    for count, shard in enumerate(_group_shards(tensors, max_shard_bytes), start=1):
        for name, arr in shard:
            if name in weight_map:
                raise SafetensorsError(f"tensor {name!r} written twice")
            weight_map[name] = count
            total += arr.nbytes
        write_file(tmp / f"part-{count}", shard, source)
    if count <= 1:
        if count == 1:
            os.replace(tmp / "part-1", tmp / SINGLE_FILE)
        else:
            write_file(tmp / SINGLE_FILE, [])
        return [SINGLE_FILE]
    names = {i: f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
    for i, fname in names.items():
        os.replace(tmp / f"part-{i}", tmp / fname)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: names[i] for k, i in sorted(weight_map.items())},
    }
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names.values(), INDEX_FILE]


def _move_into_place(tmp: Path, path: Path, files: list[str]) -> None:
    """Moves ``files`` from ``tmp`` into ``path``, dropping stale weight files there."""
    if not path.exists():
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700
        os.replace(tmp, path)
        tmp.mkdir()  # so the caller's cleanup of tmp stays harmless
        return
    if not path.is_dir():
        raise SafetensorsError(f"{path} exists and is not a directory")
    for old in path.iterdir():
        stale = old.name == INDEX_FILE or (
            old.name.startswith("model") and old.name.endswith(".safetensors")
        )
        if stale and old.name not in files:
            old.unlink()
    for fname in files:
        os.replace(tmp / fname, path / fname)
