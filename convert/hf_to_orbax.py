r"""Convert a Hugging Face MiniMax-Text-01 / MiniMax-M1 checkpoint into an Orbax checkpoint.

    python -m convert.hf_to_orbax --hf_dir IN --out_dir OUT [--dtype bfloat16|float32]
        [--quantize experts_int8|int8] [--mesh embed=8,experts=4] [--overwrite]

IN is a HF directory (``config.json`` in the remote-code or transformers-native schema,
``model.safetensors`` or ``model.safetensors.index.json`` + shards), a Hugging Face hub id
(``owner/name[@revision]``, fetched into the HF cache) or a ``gs://`` / ``s3://`` URL (copied
into a temporary local directory first: the safetensors reader maps local files). OUT is a local
directory or a URL (built locally, then uploaded; see ``minimax_jax.outputs``). OUT gets::

    OUT/params/        Orbax PyTree checkpoint (OCDBT, zarr), one array per parameter leaf
    OUT/config.json    our config as HF config.json (same schema as IN)
    OUT/conversion.json  what was converted (source, dtype, bytes, versions)
    OUT/tokenizer files, chat template, generation_config.json copied from IN

Every tensor name, shape and dtype is validated against the config before anything is written;
derived lightning buffers (``slope_rate``, ``*_decay``) are checked against our formula and
dropped. Then each HF tensor is read once and streamed into its slot of the stacked leaf
(``minimax_jax.hf.orbax``), so host memory stays at about one HF tensor plus a 256 MiB write-behind
window, whatever the model size. Everything is written to a hidden temporary directory next to
OUT and renamed at the end; a failed or interrupted run removes it and leaves no OUT.

IN is data, not instructions: index entries and side files must stay inside IN (see
``minimax_jax.hf.safetensors``); a tokenizer file that is a symbolic link leading out of IN, a
directory or a FIFO is not copied (one warning line). OUT may not be IN, contain it or lie inside
it, and ``--overwrite`` replaces only an empty directory or an earlier converter output.
Exit codes: 0 done, 2 wrong command line, 1 failure while converting (bad checkpoint contents,
I/O), 128 + N on signal N.

``--quantize`` stores int8 weights (symmetric, one fp32 scale per output channel; see
``minimax_jax.model.quant``): ``experts_int8`` the expert FFN weights, ``int8`` every matmul
weight of the decoder layers; each HF tensor is quantised from its own values as it is read, and
the weight becomes two leaves (``.../q`` int8, ``.../scale`` fp32). The scheme is recorded in
the Orbax metadata and ``conversion.json``; ``from_pretrained`` restores such a checkpoint
without requantising, and ``convert.orbax_to_hf`` refuses it.

``--mesh`` names how the logical axes will be sharded when the checkpoint is restored
(``logical_axis=ways``, axes: layers, vocab, embed, heads, kv_heads, head_dim, qkv, experts,
gate_up, mlp); chunks are cut so each shard is a whole number of chunks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import flags

from minimax_jax import paths
from minimax_jax.config import QUANTIZE_SCHEMES, ModelConfig
from minimax_jax.hf import mapping
from minimax_jax.hf import orbax as orbax_io
from minimax_jax.hf.pretrained import ORBAX_PARAMS_DIR, check_buffers, logical_axes
from minimax_jax.hf.safetensors import INDEX_FILE, SINGLE_FILE, SafetensorsReader, check_inside
from minimax_jax.model import quant

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

_HF_DIR = flags.DEFINE_string(
    "hf_dir", None, "Hugging Face checkpoint to read: a directory, hub id owner/name[@rev] or URL."
)
_DTYPE = flags.DEFINE_enum(
    "dtype", "bfloat16", ["bfloat16", "float32"], "Parameter dtype (the MoE router stays fp32)."
)
_QUANTIZE = flags.DEFINE_enum(
    "quantize",
    None,
    list(QUANTIZE_SCHEMES),
    "Store int8 weights: experts_int8 (expert FFN) or int8 (every matmul weight of the layers).",
)
_MESH = flags.DEFINE_string(
    "mesh", None, "Restore-time sharding, 'logical_axis=ways,...', to align chunks with shards."
)
_CHUNK_MB = flags.DEFINE_integer("chunk_mb", 128, "Largest chunk of a stored array, in MiB.")

PARAMS_DIR = ORBAX_PARAMS_DIR
INFO_FILE = "conversion.json"
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def _splits(names: tuple[str, ...], ways: dict[str, int]) -> dict[int, int]:
    return {i: ways[n] for i, n in enumerate(names) if n in ways}


def parse_mesh(text: str | None, known: set[str]) -> dict[str, int]:
    """'embed=8,experts=4' -> {'embed': 8, 'experts': 4}; unknown axes or bad ways raise."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        name, _, ways = item.partition("=")
        if name not in known or not ways.isdigit() or int(ways) < 1:
            raise ArgumentError(
                f"--mesh item {item!r}: expected logical_axis=ways with an axis in "
                f"{sorted(known)} and ways >= 1"
            )
        out[name] = int(ways)
    return out


def validate(reader: SafetensorsReader, config: ModelConfig, where: str) -> mapping.LoadPlan:
    """Plans the load (names, shapes, dtypes) and checks derived buffers; raises on problems."""
    meta = {n: (reader.info(n).shape, reader.info(n).dtype) for n in reader.names()}
    plan = mapping.plan_load(config, reader.names(), meta=meta, where=where)
    check_buffers(reader, config, plan, where)
    return plan


def _unit_axes(assignments: list[mapping.Assignment]) -> tuple[int, ...]:
    """Axes some slot indexes with an int: the chunk size there must be 1."""
    return tuple(
        sorted({i for a in assignments for i, s in enumerate(a.slot) if isinstance(s, int)})
    )


def _write_tensor(
    reader: SafetensorsReader,
    writer: orbax_io.LeafWriter,
    leaf: mapping.LeafPath,
    a: mapping.Assignment,
    dtype: np.dtype,
    progress: Progress,
    contract: tuple[int, ...] | None = None,
) -> None:
    """Reads one HF tensor into its slot. A tensor over ``writer.max_piece_bytes`` whose HF rows
    are one axis of the slot (embed, lm_head) is read and written in pieces of whole rows aligned
    to the chunks, so the host never holds it whole. With ``contract`` (the leaf's contracted
    axes) the tensor is quantised whole (scales need whole input rows) and its ``q`` / ``scale``
    go to the same slot of ``leaf/q`` and ``leaf/scale``."""
    nbytes = reader.info(a.name).nbytes
    if contract is not None:
        value = a.layout.to_ours(reader.read(a.name), a.slot_shape)
        q, scale = quant.quantize(value, mapping.slot_axes(a.slot, contract))
        writer.write(leaf + ("q",), a.slot, q)
        writer.write(leaf + ("scale",), a.slot, scale)
        progress.update(nbytes, orbax_io.leaf_key(leaf))
        return
    if nbytes <= writer.max_piece_bytes or a.layout.groups[0] != 1:
        tensor = reader.read(a.name)
        writer.write(leaf, a.slot, a.layout.to_ours(tensor, a.slot_shape).astype(dtype, copy=False))
        progress.update(nbytes, orbax_io.leaf_key(leaf))
        return
    axis, n = a.layout.perm.index(0), a.hf_shape[0]
    chunk = writer.slot_chunks(leaf, a.slot)[axis]
    rows = max(writer.max_piece_bytes // (nbytes // n) // chunk, 1) * chunk
    for start in range(0, n, rows):
        piece = reader.read(a.name, (start, min(start + rows, n)))
        shape = list(a.slot_shape)
        shape[axis] = piece.shape[0]
        value = a.layout.to_ours(piece, tuple(shape)).astype(dtype, copy=False)
        writer.write(leaf, a.slot, value, at=(axis, start))
        progress.update(piece.nbytes, orbax_io.leaf_key(leaf))


def write_params(
    reader: SafetensorsReader,
    config: ModelConfig,
    plan: mapping.LoadPlan,
    directory: Path,
    *,
    dtype: Any,
    splits: dict[mapping.LeafPath, dict[int, int]],
    target_chunk_bytes: int,
    max_inflight_bytes: int,
    progress: Progress,
    quantize: str | None = None,
) -> dict[str, int]:
    """Streams every HF tensor into its slot of the Orbax leaves; returns byte counts.

    ``splits[leaf]`` = {axis: ways} cuts chunks so each shard is a whole number of chunks;
    ``quantize``: the weights of that scheme are written as int8 ``q`` + fp32 ``scale`` leaves."""
    expected = mapping.flatten(mapping.expected_leaf_shapes(config, dtype, quantize))
    int8 = mapping.int8_leaves(config, quantize)
    writer = orbax_io.LeafWriter(directory, max_inflight_bytes)
    largest = 0
    try:
        for leaf, assignments in plan.by_leaf.items():
            stored = [leaf + ("q",), leaf + ("scale",)] if leaf in int8 else [leaf]
            for path in stored:
                spec = expected[path]
                np_dtype = np.dtype(spec.dtype)
                chunks = orbax_io.chunk_shape(
                    spec.shape,
                    np_dtype.itemsize,
                    unit_axes=_unit_axes(assignments),
                    splits=splits.get(path),
                    target_bytes=target_chunk_bytes,
                )
                writer.create(path, spec.shape, np_dtype, chunks)
                largest = max(largest, int(np.prod(spec.shape)) * np_dtype.itemsize)
            np_dtype = np.dtype(expected[stored[0]].dtype)
            for a in assignments:
                _write_tensor(reader, writer, leaf, a, np_dtype, progress, int8.get(leaf))
        ours = {"layout_version": 1, "quantize": quantize}
        writer.finish(custom_metadata={orbax_io.METADATA_KEY: ours})
    except BaseException:
        writer.abort()  # no write may land after the caller removes the directory
        raise
    return {"largest_leaf_bytes": largest}


def convert(
    *,
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "bfloat16",
    quantize: str | None = None,
    mesh: str | None = None,
    overwrite: bool = False,
    target_chunk_bytes: int = orbax_io.DEFAULT_CHUNK_BYTES,
    max_inflight_bytes: int = orbax_io.DEFAULT_INFLIGHT_BYTES,
    stream=sys.stderr,
) -> dict[str, Any]:
    """Converts ``hf_dir`` into ``out_dir`` (see the module docstring); returns a summary dict.

    Raises:
      CheckpointMismatchError: unknown/missing/duplicate tensors, wrong shapes, dtypes or buffers.
      SafetensorsError: missing, truncated, malformed or unsafe files (paths leaving IN).
      ArgumentError: bad arguments, ``hf_dir`` not a checkpoint, ``out_dir`` exists (without
        ``overwrite``), overlaps ``hf_dir`` or is not replaceable (``common.check_replaceable``).
      ValueError: bad config.
    """
    if dtype not in DTYPES:
        raise ArgumentError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANTIZE_SCHEMES:
        raise ArgumentError(
            f"--quantize must be one of {', '.join(QUANTIZE_SCHEMES)}, got {quantize!r}"
        )
    if target_chunk_bytes < 1:
        raise ArgumentError("--chunk_mb must be at least 1")
    out = paths.location(out_dir, "--out_dir")
    source = os.fspath(hf_dir) if paths.classify(hf_dir, "--hf_dir") != paths.LOCAL else None
    if source is not None:  # refuse a bad OUT before a download
        prepare_output(source, out, overwrite, "--hf_dir")
    with paths.as_local(hf_dir, "--hf_dir") as local:
        return _convert(
            local, source, out, dtype=dtype, quantize=quantize, mesh=mesh, overwrite=overwrite,
            target_chunk_bytes=target_chunk_bytes, max_inflight_bytes=max_inflight_bytes,
            stream=stream,
        )  # fmt: skip


def _convert(
    hf_dir: Path,
    source: str | None,
    out_dir: str,
    *,
    dtype: str,
    quantize: str | None,
    mesh: str | None,
    overwrite: bool,
    target_chunk_bytes: int,
    max_inflight_bytes: int,
    stream,
) -> dict[str, Any]:
    """``convert`` of the local directory ``hf_dir``; ``source``: the hub id or URL it was
    resolved from (named in errors and the summary), None for a local ``--hf_dir``."""
    expected = (
        f"a Hugging Face checkpoint directory ({CONFIG_FILE} + {SINGLE_FILE} or {INDEX_FILE})"
    )
    check_input_dir(hf_dir, "--hf_dir", expected, any_of=(SINGLE_FILE, INDEX_FILE), shown=source)
    # a URL input is compared with a URL output as given (its local copy is a temporary)
    in_loc = source if paths.is_url(source) else hf_dir
    prepare_output(in_loc, out_dir, overwrite, "--hf_dir")
    config = ModelConfig.from_hf(check_inside(hf_dir, hf_dir / CONFIG_FILE, CONFIG_FILE))
    axes = logical_axes(config, quantize) if mesh else {}
    mesh_ways = parse_mesh(mesh, {name for names in axes.values() for name in names})
    reader = SafetensorsReader(hf_dir)
    plan = validate(reader, config, source or str(hf_dir))
    total = sum(reader.info(a.name).nbytes for v in plan.by_leaf.values() for a in v)
    labels = (source or str(hf_dir.resolve()), _shown(out_dir))

    def build(tmp: Path) -> dict[str, Any]:
        progress = Progress(total, "hf_to_orbax", stream)
        sizes = write_params(
            reader,
            config,
            plan,
            tmp / PARAMS_DIR,
            dtype=DTYPES[dtype],
            splits={leaf: _splits(names, mesh_ways) for leaf, names in axes.items()},
            target_chunk_bytes=target_chunk_bytes,
            max_inflight_bytes=max_inflight_bytes,
            progress=progress,
            quantize=quantize,
        )
        progress.close()
        config.save_hf(tmp / CONFIG_FILE)
        copied, skipped = copy_side_files(hf_dir, tmp, stream)
        summary = _summary(*labels, dtype, plan, total, progress.elapsed, tmp, sizes)
        summary |= {"quantize": quantize}
        summary |= {"copied_files": copied, "peak_rss_bytes": peak_rss_bytes()}
        if skipped:
            summary["skipped_files"] = skipped
        (tmp / INFO_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    return atomic_output(
        out_dir, overwrite, build, in_dir=in_loc, in_flag="--hf_dir", stream=stream
    )


def _shown(out_dir: str) -> str:
    """An output location as the summary names it: a URL as given, a local path resolved."""
    return out_dir if paths.is_url(out_dir) else str(Path(out_dir).resolve())


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _summary(
    source: str,
    output: str,
    dtype: str,
    plan: mapping.LoadPlan,
    total: int,
    seconds: float,
    tmp: Path,
    sizes: dict[str, int],
) -> dict[str, Any]:
    import jax
    import orbax.checkpoint as ocp

    return {
        "source": source,
        "output": output,
        "dtype": dtype,
        "leaves": len(plan.by_leaf),
        "tensors": sum(len(v) for v in plan.by_leaf.values()),
        "dropped_derived_buffers": len(plan.derived),
        "bytes_read": total,
        "bytes_written": _du(tmp / PARAMS_DIR),
        "seconds": round(seconds, 3),
        "read_rate_bytes_per_s": round(total / max(seconds, 1e-9)),
        "versions": {"jax": jax.__version__, "orbax": ocp.__version__},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **sizes,
    }


def print_summary(summary: dict[str, Any]) -> None:
    """Human-readable summary on stdout."""
    print(
        f"converted {summary['tensors']} tensors into {summary['leaves']} leaves "
        f"({summary['dropped_derived_buffers']} derived buffers checked and dropped)\n"
        f"read {human_bytes(summary['bytes_read'])} in {human_seconds(summary['seconds'])} "
        f"({human_bytes(summary['read_rate_bytes_per_s'])}/s); wrote "
        f"{human_bytes(summary['bytes_written'])} to {summary['output']}\n"
        f"largest stacked leaf {human_bytes(summary['largest_leaf_bytes'])}; "
        f"peak RSS {human_bytes(summary['peak_rss_bytes'])}"
        + (f"\nint8 weights: {summary['quantize']}" if summary.get("quantize") else "")
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        usage_error(f"unexpected arguments {argv[1:]}: every input is a flag (see --help)")
    for holder in (_HF_DIR, OUT_DIR):
        if not holder.value:
            usage_error(f"--{holder.name} is required (see --help)")

    def work() -> None:
        summary = convert(
            hf_dir=_HF_DIR.value,
            out_dir=OUT_DIR.value,
            dtype=_DTYPE.value,
            quantize=_QUANTIZE.value,
            mesh=_MESH.value,
            overwrite=OVERWRITE.value,
            target_chunk_bytes=_CHUNK_MB.value * 2**20,
        )
        print_summary(summary)

    run_cli(work)


def run() -> None:
    """Console-script entry point."""
    run_app(main, __doc__, (_HF_DIR, OUT_DIR, _DTYPE, _QUANTIZE, _MESH, _CHUNK_MB, OVERWRITE))


if __name__ == "__main__":
    run()
