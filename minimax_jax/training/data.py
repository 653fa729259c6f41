"""Grain input pipeline: documents -> tokens -> packed fixed-length rows with segment ids.

Sources (each a random-access list of documents, one string each; a ``path`` is a local file,
directory or glob, or for ``text`` and ``jsonl`` also a ``gs://`` / ``s3://`` / ``az://`` URL of
one, read through ``etils.epath``; see ``minimax_jax.paths``):

* ``text``: every file matched by a glob is one document;
* ``jsonl``: every line of every matched file is a JSON object whose ``text_field`` is a document;
* ``arrayrecord``: every record of every matched ArrayRecord file is a UTF-8 document (or a JSON
  object when ``text_field`` is set).

The held-out split is a seeded choice of whole documents, so no eval text is ever trained on.
Training order: seeded per-epoch shuffle of the training documents -> this process's shard
(``process_index::process_count``) -> repeat forever -> tokenise (+ eos) -> concat-then-split
packing (``PackedBatches``) into rows of ``seq_len`` tokens with segment ids (documents longer
than a row continue as a new segment in the next row) -> batches of
``batch_size // process_count`` rows.
The iterator's state (``get_state()``, a JSON-able dict) is saved with every checkpoint, so a
restored run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from tokenizers import Tokenizer

from minimax_jax import files, paths

SOURCE_TYPES = ("text", "jsonl", "arrayrecord")


class DataError(ValueError):
    """A data problem the user can fix (missing path, empty dataset, bad record)."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One data source: ``type`` in SOURCE_TYPES, ``path`` a file, directory or glob."""

    type: str
    path: str
    text_field: str | None = None

    def __post_init__(self):
        if self.type not in SOURCE_TYPES:
            raise DataError(f"data source type must be one of {SOURCE_TYPES}, got {self.type!r}")


def _expand(path: str, suffix: str | None) -> list[str]:
    """Sorted files of a path: a file, every file under a directory (recursively), or a glob."""
    if paths.is_url(path):
        files = sorted(paths.glob_url(path, suffix or ""))
        if not files:
            raise DataError(f"data path {path!r} matches no files: check data.sources[].path")
        return files
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        pattern = os.path.join(path, "**", f"*{suffix or ''}")
        files = glob.glob(pattern, recursive=True)
    else:
        files = glob.glob(path, recursive=True)
    files = sorted(f for f in files if os.path.isfile(f))
    if not files:
        raise DataError(f"data path {path!r} matches no files: check data.sources[].path")
    return files


class TextFiles:
    """Each file is one document (read lazily, UTF-8 with replacement of bad bytes)."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> str:
        return paths.read_bytes(self.files[i]).decode("utf-8", errors="replace")

    def num_chars_hint(self) -> int:
        return sum(paths.size(f) for f in self.files)


class JsonlTexts:
    """Each JSON line's ``text_field`` is one document (all held in memory)."""

    def __init__(self, files: Sequence[str], field: str):
        self.texts: list[str] = []
        for name in files:
            try:
                text = paths.read_bytes(name).decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{name}: not UTF-8 text (byte {e.start})") from None
            for n, line in enumerate(text.split("\n"), 1):  # lines as a file iterates them
                if line.strip():
                    self.texts.append(_field(line, field, f"{name}:{n}"))

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> str:
        return self.texts[i]

    def num_chars_hint(self) -> int:
        return sum(len(t) for t in self.texts)


def _field(raw: str | bytes, field: str, where: str) -> str:
    try:
        value = json.loads(raw)[field]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{where}: expected a JSON object with a string {field!r} ({e})") from e
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value


class ArrayRecordTexts:
    """Each ArrayRecord record is a UTF-8 document, or JSON with ``field`` when one is given."""

    def __init__(self, files: Sequence[str], field: str | None):
        self.source = grain.sources.ArrayRecordDataSource(list(files))
        self.field = field

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> str:
        raw = self.source[i]
        if self.field is None:
            return raw.decode("utf-8", errors="replace")
        return _field(raw, self.field, f"arrayrecord record {i}")

    def num_chars_hint(self) -> int:
        return len(self.source)  # records are not read up front


class Documents:
    """Concatenation of several sources as one random-access list of strings."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> str:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k][int(i - self.offsets[k])]


def open_documents(specs: Sequence[SourceSpec]) -> Documents:
    """Opens every source; raises DataError for no sources, missing paths or no text at all
    (``paths.PathError`` for an unsupported URL scheme)."""
    if not specs:
        raise DataError("data.sources is empty: give at least one {type, path}")
    parts = []
    for i, s in enumerate(specs):
        if paths.classify(s.path, f"data.sources[{i}].path", hub=False) == paths.URL:
            if s.type == "arrayrecord":
                raise DataError(
                    f"data.sources[{i}].path {s.path}: arrayrecord sources are read from local "
                    "files only; copy them or mount the bucket (e.g. gcsfuse)"
                )
        with paths.remote(s.path, f"data.sources[{i}].path"):
            if s.type == "text":
                parts.append(TextFiles(_expand(s.path, None)))
            elif s.type == "jsonl":
                parts.append(JsonlTexts(_expand(s.path, ".jsonl"), s.text_field or "text"))
            else:
                parts.append(ArrayRecordTexts(_expand(s.path, ".array_record"), s.text_field))
    docs = Documents(parts)
    if len(docs) == 0 or sum(p.num_chars_hint() for p in parts) == 0:
        where = ", ".join(s.path for s in specs)
        raise DataError(f"the dataset is empty: no text in {where}")
    return docs


def split_documents(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, eval) document indices; at least one of each when eval_fraction > 0."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_eval = 0 if eval_fraction == 0 else max(1, int(round(n * eval_fraction)))
    if n - n_eval < 1:
        raise DataError(f"{n} document(s) cannot be split into train and eval: add documents")
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


class _Tokenize:
    """document strings -> int32 token arrays (ids followed by eos), many documents per call.

    ``encode_batch`` runs the tokenizer's Rust threads over the documents (``encode`` holds the
    GIL and uses one core): the same ids as one call per document.
    """

    def __init__(self, tokenizer: Tokenizer, eos_id: int):
        self.tokenizer = tokenizer
        self.eos_id = eos_id

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray([*e.ids, self.eos_id], np.int32) for e in out]


class PackedBatches:
    """Concat-then-split packing over a random-access dataset of documents, as an iterator.

    Rows of ``seq_len`` tokens are filled from consecutive documents; a document that does not
    fit continues as a new segment in the next row. Segment ids count the pieces in a row from
    1; 0 marks padding (only after the last document of a finite dataset). Documents are
    tokenised ``lookahead`` at a time (one parallel tokenizer call). The state is just (next
    document index, token offset inside it), so restoring it is exact.
    """

    def __init__(
        self,
        docs: grain.MapDataset,
        tokenize: _Tokenize,
        seq_len: int,
        rows: int,
        lookahead: int = 64,
    ):
        self.docs = docs
        self.tokenize = tokenize
        self.seq_len = seq_len
        self.rows = rows
        self.lookahead = max(1, lookahead)
        self.index = 0
        self.offset = 0
        self._cache: dict[int, np.ndarray] = {}

    def __iter__(self) -> PackedBatches:
        return self

    def _tokens(self, i: int) -> np.ndarray:
        if i not in self._cache:
            stop = min(i + self.lookahead, len(self.docs))
            self._cache = dict(
                zip(
                    range(i, stop),
                    self.tokenize([self.docs[j] for j in range(i, stop)]),
                    strict=True,
                )
            )
        return self._cache[i]

    def _row(self) -> tuple[np.ndarray, np.ndarray] | None:
        tokens = np.zeros(self.seq_len, np.int32)
        seg = np.zeros(self.seq_len, np.int32)
        filled, piece = 0, 0
        while filled < self.seq_len and self.index < len(self.docs):
            doc = self._tokens(self.index)
            take = min(self.seq_len - filled, len(doc) - self.offset)
            piece += 1
            tokens[filled : filled + take] = doc[self.offset : self.offset + take]
            seg[filled : filled + take] = piece
            filled += take
            self.offset += take
            if self.offset == len(doc):
                self.index, self.offset = self.index + 1, 0
        return None if filled == 0 else (tokens, seg)

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [r for r in (self._row() for _ in range(self.rows)) if r is not None]
        if not rows:
            raise StopIteration
        pad = (np.zeros(self.seq_len, np.int32),) * 2
        rows += [pad] * (self.rows - len(rows))
        return {
            "tokens": np.stack([r[0] for r in rows]),
            "segment_ids": np.stack([r[1] for r in rows]),
        }

    def get_state(self) -> dict[str, int]:
        return {"index": int(self.index), "offset": int(self.offset)}

    def set_state(self, state: dict[str, int]) -> None:
        self.index, self.offset = int(state["index"]), int(state["offset"])


class Prefetch:
    """An iterator with ``get_state`` / ``set_state`` (``PackedBatches``) run ``depth`` batches
    ahead by a background thread, so tokenising and packing overlap the device step.

    ``get_state()`` is the state after the last batch *returned* (what a checkpoint must hold),
    not the producer's; ``set_state`` stops the thread, sets the inner iterator and restarts on
    the next ``next``. An exception in the producer (``StopIteration`` included) is raised by
    the ``next`` call that reaches it. ``depth == 0`` runs the inner iterator in the caller's
    thread.
    """

    def __init__(self, it, depth: int = 2):
        self.it = it
        self.depth = depth
        self._state = it.get_state()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None

    def __iter__(self) -> Prefetch:
        return self

    def _start(self) -> None:
        q: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()

        def work():
            while not stop.is_set():
                try:
                    item = (next(self.it), self.it.get_state(), None)
                except BaseException as e:  # noqa: BLE001 - handed to the consumer
                    item = (None, None, e)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if item[2] is not None:
                    return

        self._queue, self._stop = q, stop
        self._thread = threading.Thread(target=work, name="data-prefetch", daemon=True)
        self._thread.start()

    def __next__(self) -> dict[str, np.ndarray]:
        if self.depth <= 0:
            batch = next(self.it)
            self._state = self.it.get_state()
            return batch
        if self._thread is None:
            self._start()
        batch, state, err = self._queue.get()
        if err is not None:
            self.close()
            raise err
        self._state = state
        return batch

    def get_state(self) -> dict[str, int]:
        return dict(self._state)

    def set_state(self, state: dict[str, int]) -> None:
        self.close()
        self.it.set_state(state)
        self._state = self.it.get_state()

    def close(self) -> None:
        """Stop the producer (the inner iterator is then ahead of ``get_state()``)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


def train_dataset(
    docs: Documents,
    indices: np.ndarray,
    tokenizer: Tokenizer,
    eos_id: int,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> PackedBatches:
    """Infinite packed batches {"tokens", "segment_ids"}: int32 [batch_size // process_count, T].

    Document order: a seeded grain shuffle per epoch, this process's shard, repeated forever.
    """
    if batch_size % process_count:
        raise DataError(f"batch size {batch_size} must divide over {process_count} processes")
    ds = grain.MapDataset.source(_Subset(docs, indices)).seed(seed).shuffle()
    ds = ds[process_index::process_count].repeat(None)
    return PackedBatches(ds, _Tokenize(tokenizer, eos_id), seq_len, batch_size // process_count)


def eval_batches(
    docs: Documents,
    indices: np.ndarray,
    tokenizer: Tokenizer,
    eos_id: int,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """The held-out split packed once, in order, as at most ``max_batches`` batches.

    The last batch is padded with empty rows (segment id 0, weight 0); with several processes
    every process gets exactly ``max_batches`` (empty ones after its documents run out).
    """
    ds = grain.MapDataset.source(_Subset(docs, indices))[process_index::process_count]
    rows = batch_size // process_count
    packed = PackedBatches(ds, _Tokenize(tokenizer, eos_id), seq_len, rows)
    out = [b for _, b in zip(range(max_batches), packed, strict=False)]
    if process_count > 1:  # every process must run the same number of (collective) eval steps
        empty = np.zeros((rows, seq_len), np.int32)
        out += [{"tokens": empty, "segment_ids": empty}] * (max_batches - len(out))
    return out


class _Subset:
    """A view of ``docs`` restricted to ``indices`` (a grain random-access source)."""

    def __init__(self, docs: Documents, indices: np.ndarray):
        self.docs = docs
        self.indices = np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> str:
        return self.docs[int(self.indices[i])]


def iterator_state(it: Iterator) -> dict:
    """The JSON-able state of a data iterator (``PackedBatches`` or a grain iterator)."""
    return json.loads(json.dumps(it.get_state(), default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot store {type(x).__name__} in the data iterator state")


def load_tokenizer(path: str, what: str = "data.tokenizer") -> Tokenizer:
    """A ``tokenizers`` tokenizer from ``tokenizer.json`` or a directory holding one: local, a
    Hugging Face hub id or a URL (``minimax_jax.paths``; ``what`` names the argument)."""
    with paths.as_local(path, what, patterns=paths.TOKENIZER_FILES) as local:
        file = local / "tokenizer.json" if local.is_dir() else local
        if not file.is_file():
            raise DataError(f"tokenizer {path!r} not found: give a tokenizer.json or its directory")
        return files.load_tokenizer(file)
