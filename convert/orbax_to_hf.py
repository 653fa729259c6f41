r"""Convert our Orbax checkpoint directory back into a Hugging Face checkpoint.

    python -m convert.orbax_to_hf --orbax_dir IN --out_dir OUT [--schema remote|native]
        [--max_shard_gb 5]

IN is a directory written by ``convert.hf_to_orbax`` (``config.json`` + ``params/``), local or a
``gs://`` / ``s3://`` URL (copied to a temporary local directory first). OUT (local, or a URL:
built locally, then uploaded; see ``minimax_jax.outputs``) gets
sharded safetensors (at most ``--max_shard_gb`` GB per file; ``model.safetensors`` if one file
suffices) with ``model.safetensors.index.json``, ``config.json`` in the requested schema (default:
the schema of IN's config) and the tokenizer files copied from IN. Tensors use the remote-code
per-expert names (``block_sparse_moe.experts.{e}.w1/w2/w3``), which both the MiniMax remote code
and transformers read; the native schema also gets the derived lightning buffers transformers
keeps. Tensors keep the stored dtype (bf16, router fp32): HF -> Orbax -> HF is bit-identical.
A checkpoint converted with ``--quantize`` (int8 weights) is refused (exit 2): its weights are
not the original ones.

Streaming: shards are planned from the leaf metadata, then each HF tensor is read from its slot
of the stored leaf (TensorStore reads only the chunks of that slot) and appended to its shard
file at once; host memory holds one HF tensor (embed / lm_head: one 128 MiB piece of it).
OUT is built in a hidden temporary directory beside it and moved into place at the end; a failed
or interrupted run removes it and leaves no OUT. OUT may not be IN, contain it or lie inside it,
``--overwrite`` replaces only an empty directory or an earlier converter output, and side files
are copied only if they are regular files inside IN (see ``convert.common``). Exit codes: 0 done,
2 wrong command line, 1 failure while converting, 128 + N on signal N.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from minimax_jax import paths
from minimax_jax.config import SCHEMAS, ModelConfig
from minimax_jax.hf import mapping
from minimax_jax.hf import orbax as orbax_io
from minimax_jax.hf.pretrained import ORBAX_PARAMS_DIR
from minimax_jax.hf.safetensors import RowPieces, TensorSpec, check_inside, write_sharded

from .common import (
    CONFIG_FILE,
    OUT_DIR,
    OVERWRITE,
    ArgumentError,
    atomic_output,
    check_input_dir,
    copy_side_files,
    prepare_output,
    run_app,
    run_cli,
    usage_error,
)
from .progress import Progress, human_bytes, human_seconds, peak_rss_bytes

PIECE_BYTES = 128 * 2**20  # larger HF tensors (embed, lm_head) are read and written in pieces
_STAGE = "shards"  # write_sharded's directory inside the partial output, emptied into it
_ORBAX_DIR = flags.DEFINE_string(
    "orbax_dir", None, "Directory (or gs:// / s3:// URL) written by convert.hf_to_orbax."
)
_SCHEMA = flags.DEFINE_enum(
    "schema", None, list(SCHEMAS), "config.json schema (default: the schema of the input)."
)
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors file, in GB (1e9).")


def check_leaves(reader: orbax_io.LeafReader, config: ModelConfig, where: str) -> None:
    """Stored leaves must be exactly our layout for ``config`` (shapes; float dtypes)."""
    expected = mapping.flatten(mapping.expected_leaf_shapes(config))
    orbax_io.check_stored_leaves(reader, expected, where, float_dtypes=True)


def refuse_quantized(orbax_dir: Path) -> None:
    """An ``hf_to_orbax --quantize`` output holds int8 weights, not the original ones: refuse it
    (ArgumentError, exit 2) before anything is written."""
    params = orbax_dir / ORBAX_PARAMS_DIR
    if not orbax_io.is_orbax_checkpoint(params):
        return  # the usual checks below say what is wrong
    scheme = orbax_io.stored_quantize(orbax_io.LeafReader(params))
    if scheme is not None:
        raise ArgumentError(
            f"--orbax_dir {orbax_dir} holds int8 weights (quantize={scheme}): they are not the "
            "original weights, so no HF checkpoint is written from them; convert the original "
            "HF checkpoint instead"
        )


def hf_tensors(
    reader: orbax_io.LeafReader, config: ModelConfig, schema: str, progress: Progress
) -> Iterator[tuple[str, np.ndarray | RowPieces]]:
    """Yields (HF name, tensor) one at a time, in leaf order (then the native buffers); tensors
    over ``PIECE_BYTES`` whose HF rows are one axis of ours come as ``RowPieces``."""
    for a in mapping.export_assignments(config, naming="original"):
        dtype = reader.leaves[a.leaf][1]
        nbytes = int(np.prod(a.slot_shape)) * dtype.itemsize
        if nbytes > PIECE_BYTES and a.layout.groups[0] == 1:
            yield a.name, _row_pieces(reader, a, dtype, progress)
            continue
        tensor = a.layout.to_hf(reader.read(a.leaf, a.slot))
        progress.update(tensor.nbytes, a.name)
        yield a.name, tensor
    if schema == "native":
        yield from mapping.export_buffers(config)


def _row_pieces(
    reader: orbax_io.LeafReader, a: mapping.Assignment, dtype: np.dtype, progress: Progress
) -> RowPieces:
    """``a``'s HF tensor in pieces of ~``PIECE_BYTES`` whole rows (HF axis 0 is our slot axis
    ``perm.index(0)``), each read from the stored chunks it needs."""
    axis = a.layout.perm.index(0)
    hf_shape = a.hf_shape
    row_bytes = int(np.prod(hf_shape[1:])) * dtype.itemsize
    rows = max(PIECE_BYTES // row_bytes, 1)

    def pieces() -> Iterator[np.ndarray]:
        view = reader.store(a.leaf)[a.slot]
        for start in range(0, hf_shape[0], rows):
            index = (slice(None),) * axis + (slice(start, min(start + rows, hf_shape[0])),)
            piece = a.layout.to_hf(np.asarray(view[index].read().result()))
            progress.update(piece.nbytes, a.name)
            yield piece

    return RowPieces(hf_shape, dtype, pieces)


def hf_specs(
    reader: orbax_io.LeafReader, config: ModelConfig, schema: str
) -> list[tuple[str, TensorSpec]]:
    """(name, TensorSpec) of every tensor ``hf_tensors`` yields, in the same order."""
    leaves = reader.leaves
    out = [
        (a.name, TensorSpec(a.hf_shape, leaves[a.leaf][1]))
        for a in mapping.export_assignments(config, naming="original")
    ]
    if schema == "native":
        out += [(name, TensorSpec(x.shape, x.dtype)) for name, x in mapping.export_buffers(config)]
    return out


def export(
    *,
    orbax_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    schema: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
    stream=sys.stderr,
) -> dict[str, Any]:
    """Writes the HF checkpoint of ``orbax_dir`` into ``out_dir``; returns a summary dict.

    Raises:
      OrbaxFormatError: ``orbax_dir`` has no finished checkpoint.
      CheckpointMismatchError: its leaves do not match its config.
      ArgumentError: ``orbax_dir`` is not a hf_to_orbax output or holds int8 weights
        (``--quantize``), ``out_dir`` exists (without ``overwrite``), overlaps ``orbax_dir`` or
        is not replaceable; bad schema or shard size.
    """
    if schema is not None and schema not in SCHEMAS:
        raise ArgumentError(f"--schema must be one of {sorted(SCHEMAS)}, got {schema!r}")
    if max_shard_bytes <= 0:
        raise ArgumentError("--max_shard_gb must be positive")
    out = paths.location(out_dir, "--out_dir")
    source = os.fspath(orbax_dir)
    if paths.classify(orbax_dir, "--orbax_dir", hub=False) == paths.LOCAL:
        source = None
    else:  # refuse a bad OUT before a download
        prepare_output(source, out, overwrite, "--orbax_dir")
    with paths.as_local(orbax_dir, "--orbax_dir", hub=False) as local:
        return _export(local, source, out, schema, max_shard_bytes, overwrite, stream)


def _export(
    orbax_dir: Path,
    source: str | None,
    out_dir: str,
    schema: str | None,
    max_shard_bytes: int,
    overwrite: bool,
    stream,
) -> dict[str, Any]:
    """``export`` of the local directory ``orbax_dir``; ``source``: the hub id or URL it was
    resolved from (named in errors), None for a local ``--orbax_dir``."""
    expected = f"a directory written by convert.hf_to_orbax ({CONFIG_FILE} + {ORBAX_PARAMS_DIR}/)"
    check_input_dir(orbax_dir, "--orbax_dir", expected, any_of=(ORBAX_PARAMS_DIR,), shown=source)
    refuse_quantized(orbax_dir)
    in_loc = source if paths.is_url(source) else orbax_dir
    prepare_output(in_loc, out_dir, overwrite, "--orbax_dir")
    config = ModelConfig.from_hf(check_inside(orbax_dir, orbax_dir / CONFIG_FILE, CONFIG_FILE))
    schema = config.schema if schema is None else schema
    hf_config = config.to_hf(schema)  # validates the schema before anything is written
    params = check_inside(orbax_dir, orbax_dir / ORBAX_PARAMS_DIR, ORBAX_PARAMS_DIR)
    reader = orbax_io.LeafReader(params)
    check_leaves(reader, config, str(params))
    total = sum(int(np.prod(s)) * d.itemsize for s, d in (reader.leaves[p] for p in reader.paths))
    progress = Progress(total, "orbax_to_hf", stream)

    def build(tmp: Path) -> tuple[list[str], list[str], list[str]]:
        files = write_sharded(
            tmp / _STAGE,
            hf_tensors(reader, config, schema, progress),
            specs=hf_specs(reader, config, schema),
            max_shard_bytes=max_shard_bytes,
            extra_files={CONFIG_FILE: json.dumps(hf_config, indent=2, sort_keys=True) + "\n"},
        )
        for name in files:
            os.replace(tmp / _STAGE / name, tmp / name)
        (tmp / _STAGE).rmdir()
        progress.close()
        return files, *copy_side_files(orbax_dir, tmp, stream)

    files, copied, skipped = atomic_output(
        out_dir, overwrite, build, in_dir=in_loc, in_flag="--orbax_dir", stream=stream
    )
    summary = {
        "output": out_dir if paths.is_url(out_dir) else str(Path(out_dir).resolve()),
        "schema": schema,
        "files": files + copied,
        "bytes": total,
        "seconds": round(progress.elapsed, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    return summary | ({"skipped_files": skipped} if skipped else {})


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        usage_error(f"unexpected arguments {argv[1:]}: every input is a flag (see --help)")
    for holder in (_ORBAX_DIR, OUT_DIR):
        if not holder.value:
            usage_error(f"--{holder.name} is required (see --help)")

    if not math.isfinite(_MAX_SHARD_GB.value) or _MAX_SHARD_GB.value <= 0:
        usage_error(f"--max_shard_gb {_MAX_SHARD_GB.value}: must be a positive finite number")

    def work() -> None:
        s = export(
            orbax_dir=_ORBAX_DIR.value,
            out_dir=OUT_DIR.value,
            schema=_SCHEMA.value,
            max_shard_bytes=int(_MAX_SHARD_GB.value * 1e9),
            overwrite=OVERWRITE.value,
        )
        shards = sum(f.endswith(".safetensors") for f in s["files"])
        print(
            f"wrote {shards} safetensors file(s), {human_bytes(s['bytes'])} ({s['schema']} "
            f"schema) to {s['output']} in {human_seconds(s['seconds'])}; "
            f"peak RSS {human_bytes(s['peak_rss_bytes'])}"
        )

    run_cli(work)


def run() -> None:
    """Console-script entry point."""
    run_app(main, __doc__, (_ORBAX_DIR, OUT_DIR, _SCHEMA, _MAX_SHARD_GB, OVERWRITE))


if __name__ == "__main__":
    run()
