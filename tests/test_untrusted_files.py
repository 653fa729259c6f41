"""Checkpoint files are data, not instructions: the safetensors reader (behind from_pretrained,
generate and the converters) reads only inside the checkpoint directory and validates every
header; side files are copied only if they are regular files inside the directory. Every refusal
is one line that names the file and never echoes the bytes of the file it refused."""

import io
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from convert.common import copy_side_files
from minimax_jax.hf.safetensors import (
    INDEX_FILE,
    MAX_HEADER_BYTES,
    SINGLE_FILE,
    SafetensorsError,
    SafetensorsReader,
    write_file,
    write_sharded,
)

SECRET = b"TOPSECRET-passwd-line:x:0:0:root\n" * 4


def _refused(path, match: str) -> str:
    """The one-line SafetensorsError opening ``path`` and reading every tensor raises."""
    with pytest.raises(SafetensorsError, match=match) as info:
        reader = SafetensorsReader(path)
        for name in reader.names():
            reader.read(name)
    message = str(info.value)
    assert "\n" not in message
    return message


def _no_bytes_of(message: str, data: bytes) -> None:
    """``message`` holds neither ``data`` nor its first 8 bytes read as a header length."""
    assert data[:8].decode("latin-1") not in message
    assert str(struct.unpack("<Q", data[:8])[0]) not in message


@pytest.fixture
def outside(tmp_path) -> Path:
    """A valid safetensors file outside the checkpoint (conversion would succeed with it) and a
    secret text file."""
    (tmp_path / "outside").mkdir()
    write_file(tmp_path / "outside" / "x.safetensors", [("w", np.ones(4, np.float32))])
    (tmp_path / "outside" / "secret").write_bytes(SECRET)
    return tmp_path / "outside"


def _index(path: Path, weight_map: dict) -> Path:
    path.mkdir(exist_ok=True)
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.mark.parametrize("kind", ["relative", "absolute", "etc_passwd", "symlink"])
def test_weight_map_entries_leaving_the_directory_are_refused(tmp_path, outside, kind):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if kind == "relative":
        shard = "../outside/x.safetensors"
    elif kind == "absolute":
        shard = str(outside / "x.safetensors")
    elif kind == "etc_passwd":
        shard = "/etc/passwd"
    else:  # a link inside the directory whose target is outside
        (ckpt / "model-1.safetensors").symlink_to(outside / "secret")
        shard = "model-1.safetensors"
    _index(ckpt, {"w": shard})
    message = _refused(ckpt, "outside")
    assert INDEX_FILE in message and "'w'" in message
    _no_bytes_of(message, SECRET)
    if kind == "etc_passwd" and Path("/etc/passwd").is_file():
        _no_bytes_of(message, Path("/etc/passwd").read_bytes())


def test_single_file_and_index_links_leaving_the_directory_are_refused(tmp_path, outside):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / SINGLE_FILE).symlink_to(outside / "x.safetensors")
    _refused(tmp_path / "a", "symbolic link leading outside")
    (tmp_path / "b").mkdir()
    (tmp_path / "outside" / "index.json").write_text(json.dumps({"weight_map": {}}))
    (tmp_path / "b" / INDEX_FILE).symlink_to(outside / "index.json")
    _refused(tmp_path / "b", "symbolic link leading outside")


def test_links_inside_the_directory_and_the_hf_cache_layout_are_read(tmp_path):
    """Links that stay inside are fine, and so is a hub cache snapshot whose files link into the
    repository's blobs/ (how huggingface_hub stores downloads)."""
    x = np.arange(6, dtype=np.float32)
    write_sharded(tmp_path / "plain", [("a", x), ("b", 2 * x)], max_shard_bytes=24)
    shard = sorted((tmp_path / "plain").glob("model-*.safetensors"))[0]
    (tmp_path / "plain" / "real.safetensors").write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to("real.safetensors")
    assert SafetensorsReader(tmp_path / "plain").read("a").tolist() == x.tolist()

    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted((tmp_path / "plain").iterdir())):
        if path.name == "real.safetensors":
            continue
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(f"../../blobs/blob{i}")
    (repo / "blobs" / "tok").write_text("{}")
    (snapshot / "tokenizer.json").symlink_to("../../blobs/tok")
    reader = SafetensorsReader(snapshot)
    assert reader.read("b").tolist() == (2 * x).tolist()
    (tmp_path / "dst").mkdir()
    assert copy_side_files(snapshot, tmp_path / "dst") == (["tokenizer.json"], [])


def _raw(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file with a hand-written header (a dict, or raw bytes)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _u8(begin, end, shape=None, dtype="U8"):
    return {"dtype": dtype, "shape": [end - begin] if shape is None else shape,
            "data_offsets": [begin, end]}  # fmt: skip


BAD_HEADERS = {
    "negative offsets (would read the header)": ({"w": _u8(-8, 0)}, b"", "byte range"),
    "reversed offsets": ({"w": _u8(4, 0, shape=[0])}, SECRET, "byte range"),
    "past the end of the file": ({"w": _u8(0, 64)}, SECRET[:16], "file size"),
    "overlapping tensors": ({"a": _u8(0, 8), "b": _u8(4, 12)}, SECRET[:16], "overlaps"),
    "dtype x shape mismatch": ({"w": _u8(0, 8, shape=[4], dtype="F32")}, SECRET, "byte range"),
    "unknown dtype": ({"w": _u8(0, 8, dtype="Q99")}, SECRET, "unsupported dtype"),
    "negative shape": ({"w": _u8(0, 0, shape=[-2, 0])}, b"", "sizes >= 0"),
    "float offsets": (
        {"w": {"dtype": "U8", "shape": [2], "data_offsets": [0.0, 2.0]}},
        b"",
        "data_offsets",
    ),
    "bool shape": ({"w": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"1", "sizes"),
    "entry not an object": ({"w": [1, 2]}, b"", "not a JSON object"),
    "missing fields": ({"w": {"dtype": "U8"}}, b"", "shape and data_offsets"),
    "metadata not an object": ({"__metadata__": [1]}, b"", "__metadata__"),
    "header not an object": (b"[1, 2, 3]", b"", "not a JSON object"),
    "header not JSON": (b"{TOPSECRET not json", b"", "not valid JSON"),
    "header not UTF-8": (b"\xff\xfe\xfa" * 4, b"", "not (valid|UTF-8) JSON"),
    "header nested too deeply": (b"[" * 100_000, b"", "nested too deeply|not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_malformed_headers_are_refused_with_one_line(tmp_path, case):
    header, data, match = BAD_HEADERS[case]
    file = _raw(tmp_path / SINGLE_FILE, header, data)
    message = _refused(tmp_path, match)
    assert str(file) in message
    assert "TOPSECRET" not in message


def test_header_lengths_over_the_cap_or_the_file_are_refused(tmp_path):
    _raw(tmp_path / SINGLE_FILE, {}, SECRET, length=MAX_HEADER_BYTES + 1)
    message = _refused(tmp_path, "over the 100000000 byte limit")
    assert str(MAX_HEADER_BYTES + 1) not in message  # the length field is file bytes
    _raw(tmp_path / SINGLE_FILE, {}, SECRET, length=10_000)
    message = _refused(tmp_path, "exceeds the file size")
    assert "10000 " not in message and "TOPSECRET" not in message
    # Not a safetensors file at all: its first 8 bytes are never printed as a number.
    (tmp_path / SINGLE_FILE).write_bytes(SECRET)
    _no_bytes_of(_refused(tmp_path, "not a safetensors file"), SECRET)


def test_valid_edge_cases_still_read(tmp_path):
    """Empty tensors, scalars, gaps between tensors and any entry order are valid."""
    data = np.arange(4, dtype=np.float32).tobytes() + b"\0" * 4 + np.float32(7).tobytes()
    header = {
        "s": {"dtype": "F32", "shape": [], "data_offsets": [20, 24]},
        "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [16, 16]},
        "v": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
    }
    _raw(tmp_path / SINGLE_FILE, header, data)
    reader = SafetensorsReader(tmp_path)
    assert reader.read("v").tolist() == [0, 1, 2, 3] and reader.read("s") == 7
    assert reader.read("e").shape == (0, 3)


BAD_INDEXES = {
    "not JSON": b"{TOPSECRET",
    "not an object": b"[]",
    "no weight_map": b'{"metadata": {}}',
    "weight_map a list": b'{"weight_map": ["model.safetensors"]}',
    "shard not a string": b'{"weight_map": {"w": 3}}',
    "shard empty": b'{"weight_map": {"w": ""}}',
    "metadata a list": b'{"metadata": [], "weight_map": {}}',
}


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_malformed_index_is_one_clear_error(tmp_path, case):
    (tmp_path / INDEX_FILE).write_bytes(BAD_INDEXES[case])
    message = _refused(tmp_path, INDEX_FILE)
    assert "TOPSECRET" not in message


def test_index_over_the_cap_is_refused(tmp_path, monkeypatch):
    from minimax_jax.hf import safetensors

    monkeypatch.setattr(safetensors, "MAX_HEADER_BYTES", 100)
    (tmp_path / INDEX_FILE).write_text(
        json.dumps({"weight_map": {f"w{i}": "x" for i in range(50)}})
    )
    _refused(tmp_path, "over the 100 byte limit")


def test_side_files_are_copied_only_if_regular_files_inside(tmp_path, outside):
    """Chosen behaviour: unsafe side files are skipped with one warning line each (the weights are
    still converted; the summary lists what was skipped)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "merges.txt").write_text("a b\n")
    (src / "vocab.json").write_text("{}")
    (src / "special_tokens_map.json").symlink_to("vocab.json")  # stays inside: copied
    (src / "tokenizer.json").symlink_to(outside / "secret")  # e.g. /etc/shadow
    (src / "tokenizer_config.json").mkdir()
    os.mkfifo(src / "chat_template.jinja")  # would block a reader forever
    (src / "generation_config.json").symlink_to(src / "missing")
    log = io.StringIO()
    copied, skipped = copy_side_files(src, dst, log)
    assert copied == ["merges.txt", "special_tokens_map.json", "vocab.json"]
    assert skipped == [
        "chat_template.jinja",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in dst.iterdir()) == copied
    assert not (dst / "special_tokens_map.json").is_symlink()
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and all(line.startswith("warning: not copying") for line in lines)
    assert "leading outside" in lines[2] and "TOPSECRET" not in log.getvalue()
