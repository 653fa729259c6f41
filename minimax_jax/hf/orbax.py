"""Orbax checkpoints of our parameters, written and read one slot of one leaf at a time.

Why not ``orbax.checkpoint`` for writing: its savers take a whole pytree of in-memory arrays
(``StandardCheckpointer``), or, with the experimental v1 partial save, at least whole leaves; a
stacked MiniMax-M1 leaf (``blocks[p].moe.wi``) is 72 GB in bf16 and 145 GB in fp32. So the
converter writes the format Orbax reads directly with TensorStore and streams each HF tensor into
its slot of the leaf; host memory is one HF tensor (plus a bounded write-behind window).

Directory layout (what ``StandardCheckpointer().restore(dir)`` and ``PyTreeCheckpointer`` read):

* one OCDBT key-value database at the root (``manifest.ocdbt`` + ``d/``), which holds one zarr v2
  array per leaf under the key ``"."``-joined leaf path (``blocks.3.moe.wi/``), zstd-compressed,
  chunked so that every slot an HF tensor fills is a whole number of chunks (chunk size 1 along
  block, expert and gate/up axes) and no chunk exceeds ``target_chunk_bytes``; ``--mesh`` splits
  chunks further so each device's shard is an exact union of chunks;
* ``_METADATA``: the Orbax tree metadata (leaf key paths, ``write_shape``, ``use_ocdbt``);
* ``array_metadatas/process_0``: chunk and write shapes per leaf; ``_CHECKPOINT_METADATA``.

Reading for export goes through the same TensorStore arrays (one slot at a time); loading a model
goes through Orbax (``restore``) with the target shardings, so each device reads only the chunks
of its own shard.
"""

from __future__ import annotations

import ast
import json
import math
import os
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import tensorstore as ts

from minimax_jax import files
from minimax_jax.config import QUANTIZE_SCHEMES
from minimax_jax.hf import mapping
from minimax_jax.hf.safetensors import check_inside

LeafPath = tuple[str | int, ...]
METADATA_FILE = "_METADATA"
CHECKPOINT_METADATA_FILE = "_CHECKPOINT_METADATA"
DEFAULT_CHUNK_BYTES = 128 * 2**20
DEFAULT_INFLIGHT_BYTES = 256 * 2**20
DEFAULT_PIECE_BYTES = 128 * 2**20
_ZARR_DTYPES = {
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
    np.dtype(np.float32): "<f4",
    np.dtype(np.float16): "<f2",
    np.dtype(np.float64): "<f8",
    np.dtype(np.int8): "|i1",  # int8 weights (``q`` leaves of a quantised checkpoint)
}
METADATA_KEY = "minimax_jax"  # our entry in the Orbax custom metadata


class OrbaxFormatError(ValueError):
    """A directory is not an Orbax checkpoint of the expected kind."""


def leaf_key(path: LeafPath) -> str:
    """("blocks", 3, "moe", "wi") -> "blocks.3.moe.wi" (Orbax's parameter name)."""
    return ".".join(str(k) for k in path)


def _from_keys(keys: list[str]) -> LeafPath:
    """Orbax metadata keys -> our leaf path (block positions back to ints)."""
    return tuple(int(k) if k.isdigit() else k for k in keys)


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` holds Orbax PyTree metadata (``_METADATA``)."""
    return (Path(path) / METADATA_FILE).is_file()


def chunk_shape(
    shape: tuple[int, ...],
    itemsize: int,
    *,
    unit_axes: tuple[int, ...] = (),
    splits: Mapping[int, int] | None = None,
    target_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[int, ...]:
    """Chunk shape of one leaf.

    ``unit_axes`` get chunk size 1 (the axes HF tensors index: block, expert, gate/up), axis a in
    ``splits`` is cut into ``splits[a]`` equal parts when divisible (a mesh axis sharding it), then
    the largest remaining chunk axis is halved (evenly when possible) until the chunk holds at
    most ``target_bytes``.
    """
    chunk = [1 if a in unit_axes else n for a, n in enumerate(shape)]
    for a, parts in (splits or {}).items():
        if a not in unit_axes and parts > 1 and shape[a] % parts == 0:
            chunk[a] = shape[a] // parts
    while math.prod(chunk) * itemsize > target_bytes and max(chunk) > 1:
        even = [a for a, c in enumerate(chunk) if c > 1 and c % 2 == 0]
        a = max(even or range(len(chunk)), key=lambda i: chunk[i])
        chunk[a] = -(-chunk[a] // 2)
    return tuple(chunk)


def _piece_rows(
    shape: tuple[int, ...], chunks: list[int], itemsize: int, max_bytes: int
) -> tuple[int, int]:
    """(axis, rows per piece) to write a slot of ``shape`` in pieces of about ``max_bytes``.

    The axis is the one cut into the most chunks; rows are a multiple of its chunk size (whole
    chunks per piece). Small slots and unchunked ones come back whole: (0, shape[0])."""
    if not shape or math.prod(shape) * itemsize <= max_bytes:
        return 0, max(shape[0], 1) if shape else 1
    axis = max(range(len(shape)), key=lambda a: -(-shape[a] // chunks[a]))
    if chunks[axis] >= shape[axis]:
        return 0, shape[0]
    row_bytes = math.prod(shape) // shape[axis] * itemsize
    rows = max(max_bytes // row_bytes // chunks[axis], 1) * chunks[axis]
    return axis, rows


def _kvstore(directory: Path, key: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "driver": "ocdbt",
        "base": f"file://{directory.resolve()}",
        "config": {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000},
    }
    if key is not None:
        spec["path"] = key + "/"
    return spec


class LeafWriter:
    """Writes leaves into a new Orbax checkpoint directory slot by slot.

    ``create`` opens one zarr array per leaf; ``write(path, slot, value)`` stores a slot without
    waiting for it to land, keeping at most ``max_inflight_bytes`` of writes pending (at least
    one); ``finish`` waits for everything and writes the metadata files. Until ``finish`` the
    directory has no ``_METADATA`` and is not a checkpoint.
    """

    def __init__(
        self, directory: str | os.PathLike, max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_inflight_bytes = max_inflight_bytes
        self.max_piece_bytes = DEFAULT_PIECE_BYTES
        self._context = ts.Context()
        self._stores: dict[LeafPath, ts.TensorStore] = {}
        self._chunks: dict[LeafPath, tuple[int, ...]] = {}
        self._pending: deque[tuple[Any, np.ndarray]] = deque()
        self._pending_bytes = 0
        self._start_ns = time.time_ns()

    def create(self, path: LeafPath, shape: tuple[int, ...], dtype, chunks: tuple[int, ...]):
        """Creates the (empty) array of leaf ``path``."""
        dtype = np.dtype(dtype)
        if dtype not in _ZARR_DTYPES:
            raise OrbaxFormatError(f"{leaf_key(path)}: dtype {dtype} is not supported")
        spec = {
            "driver": "zarr",
            "kvstore": _kvstore(self.directory, leaf_key(path)),
            "metadata": {
                "shape": list(shape),
                "chunks": list(chunks),
                "dtype": _ZARR_DTYPES[dtype],
                "compressor": {"id": "zstd", "level": 1},
            },
            "create": True,
        }
        self._stores[path] = ts.open(spec, context=self._context).result()
        self._chunks[path] = tuple(chunks)

    def slot_chunks(self, path: LeafPath, slot: tuple) -> list[int]:
        """Chunk shape of ``leaf[slot]`` (the chunk sizes of the axes the slot keeps)."""
        chunks = self._chunks[path]
        padded = slot + (slice(None),) * (len(chunks) - len(slot))
        return [c for c, s in zip(chunks, padded, strict=True) if not isinstance(s, int)]

    def write(
        self, path: LeafPath, slot: tuple, value: np.ndarray, at: tuple[int, int] | None = None
    ) -> None:
        """Stores ``value`` at ``leaf[slot]`` (asynchronously, bounded by the in-flight window);
        with ``at = (axis, start)``, at ``leaf[slot][..., start:start + n, ...]`` on that axis.

        A slot larger than ``max_piece_bytes`` (embed, lm_head: 2.5 GB in M1) is copied and
        written in pieces cut along a chunked axis at chunk boundaries, so the extra host memory
        is one piece, not a second copy of the tensor.
        """
        view = self._stores[path][slot]
        chunks = self.slot_chunks(path, slot)
        if at is not None:
            axis, start = at
            view = view[(slice(None),) * axis + (slice(start, start + value.shape[axis]),)]
            view = view.translate_to[0]  # TensorStore keeps absolute coordinates: re-zero them
        axis, rows = _piece_rows(value.shape, chunks, value.dtype.itemsize, self.max_piece_bytes)
        for start in range(0, value.shape[axis], rows):
            # TensorStore, unlike numpy, refuses slices that run past the end
            index = (slice(None),) * axis + (slice(start, min(start + rows, value.shape[axis])),)
            # A C-order copy here is faster than TensorStore's strided copy of a transposed view.
            piece = np.ascontiguousarray(value[index], dtype=view.dtype.numpy_dtype)
            self._pending.append((view[index].write(piece), piece))
            self._pending_bytes += piece.nbytes
            while self._pending and self._pending_bytes > self.max_inflight_bytes:
                self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, value = self._pending.popleft()
        future.result()  # waits for the commit; raises on I/O errors
        self._pending_bytes -= value.nbytes

    def flush(self) -> None:
        """Waits until every pending write is committed."""
        while self._pending:
            self._wait_oldest()

    def abort(self) -> None:
        """Waits for pending writes, ignoring their errors, so the directory can be removed."""
        while self._pending:
            future, _ = self._pending.popleft()
            try:
                future.result()
            except Exception:  # noqa: BLE001 - already failing; the directory is discarded
                pass
        self._pending_bytes = 0
        self._stores.clear()

    def finish(self, custom_metadata: dict | None = None) -> None:
        """Flushes and writes the Orbax metadata files: the directory becomes a checkpoint."""
        self.flush()
        tree, arrays = {}, []
        for path, store in self._stores.items():
            shape = [int(n) for n in store.shape]
            tree[str(tuple(str(k) for k in path))] = {
                "key_metadata": [{"key": str(k), "key_type": 2} for k in path],
                "value_metadata": {
                    "value_type": "jax.Array",
                    "skip_deserialize": False,
                    "write_shape": shape,
                },
            }
            arrays.append(
                {
                    "array_metadata": {
                        "param_name": leaf_key(path),
                        "write_shape": shape,
                        "chunk_shape": list(self._chunks[path]),
                        "ext_metadata": None,
                    }
                }
            )
        (self.directory / "array_metadatas").mkdir(exist_ok=True)
        _write_json(self.directory / "array_metadatas" / "process_0", {"array_metadatas": arrays})
        checkpoint_meta = {
            "item_handlers": None,
            "metrics": {},
            "performance_metrics": {},
            "init_timestamp_nsecs": self._start_ns,
            "commit_timestamp_nsecs": time.time_ns(),
            "custom_metadata": custom_metadata or {},
        }
        _write_json(self.directory / CHECKPOINT_METADATA_FILE, checkpoint_meta)
        metadata = {
            "tree_metadata": tree,
            "use_ocdbt": True,
            "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": custom_metadata,
        }
        _write_json(self.directory / METADATA_FILE, metadata)  # last: marks the checkpoint


def _write_json(file: Path, data: Any) -> None:
    file.write_text(json.dumps(data))


def check_tree_inside(root: Path, directory: Path) -> None:
    """Every file and directory under ``directory`` (itself included) must resolve inside
    ``root`` (the checkpoint directory): no symbolic link may lead out of it."""
    check_inside(root, directory, "the Orbax params directory")
    for top, dirs, names in os.walk(directory):
        for name in dirs + names:
            path = Path(top) / name
            if path.is_symlink():
                check_inside(root, path, "a file of the Orbax checkpoint")


class LeafReader:
    """Reads leaves (or slots of them) of an Orbax PyTree checkpoint saved with OCDBT.

    Works for checkpoints written by ``LeafWriter`` and by Orbax itself (zarr or zarr3 arrays);
    ``leaves`` maps each leaf path to its (shape, numpy dtype).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if not is_orbax_checkpoint(self.directory):
            raise OrbaxFormatError(
                f"{self.directory}: no {METADATA_FILE}; not an Orbax checkpoint (or an "
                "unfinished conversion)"
            )
        check_tree_inside(self.directory.parent, self.directory)
        meta = files.read_mapping(self.directory / METADATA_FILE, "Orbax metadata (a JSON object)")
        if not isinstance(meta.get("tree_metadata"), dict):
            raise OrbaxFormatError(f"{self.directory / METADATA_FILE}: no tree_metadata mapping")
        if not meta.get("use_ocdbt", False):
            raise OrbaxFormatError(f"{self.directory}: only OCDBT checkpoints are supported")
        self._driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        custom = meta.get("custom_metadata")
        self.custom_metadata: dict = custom if isinstance(custom, dict) else {}
        self._context = ts.Context()
        self._stores: dict[LeafPath, ts.TensorStore] = {}
        self.paths: list[LeafPath] = []
        for key, entry in meta["tree_metadata"].items():
            keys = [k["key"] for k in entry.get("key_metadata", [])] or list(ast.literal_eval(key))
            self.paths.append(_from_keys([str(k) for k in keys]))

    def store(self, path: LeafPath) -> ts.TensorStore:
        """The TensorStore array of one leaf (opened on first use)."""
        if path not in self._stores:
            spec = {
                "driver": self._driver,
                "kvstore": _kvstore(self.directory, leaf_key(path)),
                "open": True,
            }
            self._stores[path] = ts.open(spec, context=self._context, read=True).result()
        return self._stores[path]

    @property
    def leaves(self) -> dict[LeafPath, tuple[tuple[int, ...], np.dtype]]:
        """{leaf path: (shape, numpy dtype)}; opens every array (metadata reads only)."""
        out = {}
        for path in self.paths:
            store = self.store(path)
            out[path] = (tuple(int(n) for n in store.shape), np.dtype(store.dtype.numpy_dtype))
        return out

    def read(self, path: LeafPath, slot: tuple = ()) -> np.ndarray:
        """Reads ``leaf[slot]`` into a numpy array."""
        return np.asarray(self.store(path)[slot].read().result())


def stored_quantize(reader: LeafReader) -> str | None:
    """The int8 scheme a checkpoint was written with (``hf_to_orbax --quantize``), or None.

    Raises OrbaxFormatError for a recorded value that is not a known scheme name."""
    ours = reader.custom_metadata.get(METADATA_KEY)
    scheme = ours.get("quantize") if isinstance(ours, dict) else None
    if scheme is not None and scheme not in QUANTIZE_SCHEMES:
        raise OrbaxFormatError(
            f"{reader.directory}: unknown quantisation {scheme!r} in its metadata; "
            f"known: {', '.join(QUANTIZE_SCHEMES)}"
        )
    return scheme


def restore(
    directory: str | os.PathLike, target: Mapping[LeafPath, jax.ShapeDtypeStruct]
) -> dict[LeafPath, jax.Array]:
    """Restores leaves with Orbax onto ``target`` shardings and dtypes (cast on read).

    Each ``target`` entry needs ``.sharding`` (set, e.g., ``SingleDeviceSharding``); every device
    reads only the chunks that overlap its shard.
    """
    import orbax.checkpoint as ocp  # heavy import, only needed here

    nested: dict = {}
    for path, spec in target.items():
        node = nested
        for k in path[:-1]:
            node = node.setdefault(str(k), {})
        node[str(path[-1])] = spec
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(Path(directory).resolve(), nested)
    out = {}
    for path in target:
        node = restored
        for k in path:
            node = node[str(k)]
        out[path] = node
    return out


def check_stored_leaves(
    reader: LeafReader, expected: Mapping, where: str, *, float_dtypes: bool = False
) -> None:
    """Stored leaves must be exactly ``expected`` ({leaf path: ShapeDtypeStruct}): every leaf
    named once and shapes equal; with ``float_dtypes`` also floating-point storage.

    Raises ``minimax_jax.hf.mapping.CheckpointMismatchError`` listing every problem.
    """
    stored = reader.leaves
    problems = {
        "unknown leaves": [leaf_key(p) for p in stored if p not in expected],
        "missing leaves": [leaf_key(p) for p in expected if p not in stored],
        "wrong shapes": [
            f"{leaf_key(p)}: {list(stored[p][0])}, expected {list(s.shape)}"
            for p, s in expected.items()
            if p in stored and stored[p][0] != tuple(s.shape)
        ],
    }
    if float_dtypes:
        problems["wrong dtypes"] = [
            f"{leaf_key(p)}: {d}"
            for p, (_, d) in stored.items()
            if not np.issubdtype(d, np.floating) and d.kind != "V"
        ]
    if any(problems.values()):
        raise mapping.CheckpointMismatchError(where, problems)
