"""HF -> Orbax -> HF on synthetic remote-schema checkpoints (numpy only): exactness, atomicity,
bounded memory, sharded restore, and interoperability with checkpoints Orbax writes itself."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from convert import hf_to_orbax, orbax_to_hf
from convert.common import ConversionError
from minimax_jax.config import ModelConfig
from minimax_jax.hf import mapping
from minimax_jax.hf import orbax as orbax_io
from minimax_jax.hf.pretrained import from_pretrained, sharding_from_rules
from minimax_jax.hf.safetensors import (
    SafetensorsError,
    SafetensorsReader,
    TensorSpec,
    write_sharded,
)

ROOT = Path(__file__).parent.parent
LIN, FULL = "linear_attention", "full_attention"


def config_of(num_blocks=2, d=64, f=96, e=4, v=512, **changes) -> ModelConfig:
    """Remote-schema tiny config with real structure (7+1 blocks, H*N != D, partial RoPE)."""
    base = dict(
        vocab_size=v,
        hidden_size=d,
        num_layers=8 * num_blocks,
        num_heads=4,
        head_dim=32,
        num_kv_heads=2,
        intermediate_size=f,
        num_experts=e,
        num_experts_per_tok=2,
        layer_types=((LIN,) * 7 + (FULL,)) * num_blocks,
        rope_theta=1e7,
        rotary_dim=16,
        max_position_embeddings=4096,
        block_size=16,
        linear_attn_alpha=1.3,
        full_attn_alpha=1.5,
        mlp_alpha=1.7,
    )
    return ModelConfig(**(base | changes))


def write_checkpoint(path: Path, config: ModelConfig, max_shard_bytes=40_000, seed=0) -> dict:
    """Writes a remote-schema checkpoint like the real M1 (bf16, fp32 router, sharded, index,
    tokenizer files); returns {name: tensor}. Tensors are generated one at a time."""
    rng = np.random.default_rng(seed)
    tensors = {}

    def gen():
        for a in mapping.export_assignments(config):
            dtype = np.float32 if a.leaf[-1] == mapping.ROUTER else ml_dtypes.bfloat16
            if not keep and dtype != np.float32:  # fast: random bf16 bits, |x| in [2^-7, 2^-6)
                bits = rng.integers(0, 2**16, a.hf_shape, dtype=np.uint16) & 0x807F | 0x3C00
                yield a.name, bits.view(ml_dtypes.bfloat16)
                continue
            x = (0.05 * rng.standard_normal(a.hf_shape, np.float32)).astype(dtype)
            if len(a.hf_shape) == 1:
                x = (1 + x.astype(np.float32)).astype(dtype)
            if keep:
                tensors[a.name] = x
            yield a.name, x

    keep = max_shard_bytes < 10**6
    write_sharded(path, gen(), max_shard_bytes=max_shard_bytes)
    config.save_hf(path / "config.json", "remote")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    (path / "tokenizer.json").write_text("{}")
    return tensors


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    config = config_of()
    tensors = write_checkpoint(root / "hf", config)
    hf_to_orbax.convert(hf_dir=root / "hf", out_dir=root / "orbax", stream=None)
    return config, root, tensors


@pytest.mark.parametrize("piece_bytes", [None, 10_000])
def test_hf_orbax_hf_is_bit_identical(small, tmp_path, monkeypatch, piece_bytes):
    config, root, tensors = small
    if piece_bytes is not None:  # embed, lm_head and experts exported in row pieces
        monkeypatch.setattr(orbax_to_hf, "PIECE_BYTES", piece_bytes)
    assert len(SafetensorsReader(root / "hf").names()) == len(tensors)
    orbax_to_hf.export(orbax_dir=root / "orbax", out_dir=tmp_path / "hf", max_shard_bytes=30_000)
    back = SafetensorsReader(tmp_path / "hf")
    assert sorted(back.names()) == sorted(tensors)
    for name, want in tensors.items():
        got = back.read(name)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
    assert ModelConfig.from_hf(tmp_path / "hf") == config
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_text() == (root / "hf" / name).read_text()


def test_conversion_in_row_pieces_is_identical(small, tmp_path, monkeypatch):
    """embed, lm_head and experts read and written in row pieces give the same leaves."""
    _, root, _ = small
    monkeypatch.setattr(orbax_io, "DEFAULT_PIECE_BYTES", 10_000)
    hf_to_orbax.convert(hf_dir=root / "hf", out_dir=tmp_path / "o", stream=None)
    a, b = orbax_io.LeafReader(root / "orbax/params"), orbax_io.LeafReader(tmp_path / "o/params")
    assert a.leaves == b.leaves
    for path in a.paths:
        assert a.read(path).tobytes() == b.read(path).tobytes(), path


def test_output_layout_and_orbax_reads_it(small):
    import orbax.checkpoint as ocp

    config, root, _ = small
    out = root / "orbax"
    names = {p.name for p in out.iterdir()}
    assert {"params", "config.json", "conversion.json", "tokenizer.json"} <= names
    assert not list(root.glob(".orbax.partial-*"))
    info = json.loads((out / "conversion.json").read_text())
    assert info["tensors"] == len(mapping.export_assignments(config)) and info["leaves"] == 75
    with ocp.StandardCheckpointer() as ckpt:  # plain Orbax, no target: stored dtypes
        tree = ckpt.restore((out / "params").resolve())
    ours = from_pretrained(out, dtype=jnp.bfloat16)
    flat = mapping.flatten(
        __import__("flax").nnx.to_pure_dict(
            __import__("flax").nnx.state(ours, __import__("flax").nnx.Param)
        )
    )
    assert tree["blocks"]["7"]["moe"]["router"].dtype == np.float32
    np.testing.assert_array_equal(
        tree["blocks"]["3"]["moe"]["wi"], flat[("blocks", 3, "moe", "wi")]
    )
    np.testing.assert_array_equal(tree["embed"], flat[("embed",)])


def _params(model) -> dict:
    from flax import nnx

    return {
        k: np.asarray(v)
        for k, v in mapping.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
    }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_from_pretrained_orbax_equals_hf(small, dtype):
    _, root, _ = small
    a, b = (
        _params(from_pretrained(root / "hf", dtype=dtype)),
        _params(from_pretrained(root / "orbax", dtype=dtype)),
    )
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def test_restore_fsdp_ep_mesh_on_8_devices(small, tmp_path):
    config, root, _ = small
    assert len(jax.devices()) == 8
    hf_to_orbax.convert(
        hf_dir=root / "hf", out_dir=tmp_path / "o", mesh="embed=4,experts=2", stream=None
    )
    chunks = json.loads((tmp_path / "o/params/array_metadatas/process_0").read_text())
    chunk = {
        c["array_metadata"]["param_name"]: c["array_metadata"]["chunk_shape"]
        for c in chunks["array_metadatas"]
    }
    assert chunk["blocks.0.moe.wi"] == [1, 1, 16, 1, 96]  # one slot, D split 4 ways
    mesh = jax.make_mesh((4, 2), ("fsdp", "expert"))
    sharding = sharding_from_rules(config, mesh, {"embed": "fsdp", "experts": "expert"})
    model = from_pretrained(tmp_path / "o", sharding=sharding)
    from flax import nnx

    state = mapping.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    wi = state[("blocks", 2, "moe", "wi")]
    assert wi.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", None, None)
    assert wi.addressable_shards[0].data.shape == (2, 2, 16, 2, 96)
    assert state[("embed",)].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    want = _params(from_pretrained(root / "hf"))
    for k, v in state.items():
        np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=str(k))
    # the HF path builds each shard from memory maps: same shardings, same values
    hf_state = mapping.flatten(
        nnx.to_pure_dict(nnx.state(from_pretrained(root / "hf", sharding=sharding), nnx.Param))
    )
    for k, v in hf_state.items():
        assert v.sharding == state[k].sharding, k
        np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=str(k))


def test_export_of_a_checkpoint_saved_by_orbax(small, tmp_path):
    """orbax_to_hf reads what Orbax itself writes (e.g. after training), not only our writer."""
    import orbax.checkpoint as ocp

    config, root, tensors = small
    params = _params(from_pretrained(root / "hf", dtype=jnp.bfloat16))
    tree = mapping.unflatten({tuple(str(k) for k in p): v for p, v in params.items()})
    (tmp_path / "o").mkdir()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((tmp_path / "o" / "params").resolve(), tree)
    config.save_hf(tmp_path / "o" / "config.json")
    orbax_to_hf.export(orbax_dir=tmp_path / "o", out_dir=tmp_path / "hf")
    back = SafetensorsReader(tmp_path / "hf")
    for name, want in tensors.items():
        assert back.read(name).tobytes() == want.tobytes(), name


def test_interrupted_conversion_leaves_no_output(small, tmp_path, monkeypatch):
    _, root, _ = small
    calls = {"n": 0}
    original = orbax_io.LeafWriter.write

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt  # as Ctrl-C / SIGTERM mid-way
        return original(self, *args)

    monkeypatch.setattr(orbax_io.LeafWriter, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        hf_to_orbax.convert(hf_dir=root / "hf", out_dir=tmp_path / "out", stream=None)
    assert calls["n"] == 40
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_or_replaced(small, tmp_path):
    _, root, _ = small
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match="exists"):
        hf_to_orbax.convert(hf_dir=root / "hf", out_dir=tmp_path / "out", stream=None)
    hf_to_orbax.convert(hf_dir=root / "hf", out_dir=tmp_path / "out", overwrite=True, stream=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_tensor_and_truncated_shard_give_clear_errors(small, tmp_path):
    config, root, tensors = small
    drop = "model.layers.9.block_sparse_moe.experts.2.w3.weight"
    write_sharded(
        tmp_path / "a", ((k, v) for k, v in tensors.items() if k != drop), max_shard_bytes=40_000
    )
    config.save_hf(tmp_path / "a" / "config.json")
    with pytest.raises(mapping.CheckpointMismatchError, match=drop.replace(".", r"\.")):
        hf_to_orbax.convert(hf_dir=tmp_path / "a", out_dir=tmp_path / "out", stream=None)
    write_sharded(tmp_path / "b", tensors.items(), max_shard_bytes=40_000)
    config.save_hf(tmp_path / "b" / "config.json")
    shard = sorted((tmp_path / "b").glob("model-*.safetensors"))[3]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SafetensorsError, match=shard.name):
        hf_to_orbax.convert(hf_dir=tmp_path / "b", out_dir=tmp_path / "out", stream=None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_streamed_shards_must_follow_the_plan(tmp_path):
    x = np.ones((2, 3), np.float32)
    specs = [("a", TensorSpec((2, 3), np.float32)), ("b", TensorSpec((3,), np.float32))]
    write_sharded(tmp_path / "ok", iter([("a", x), ("b", x[0])]), specs=specs, max_shard_bytes=20)
    assert SafetensorsReader(tmp_path / "ok").read("b").tolist() == [1, 1, 1]
    with pytest.raises(SafetensorsError, match="does not match the plan"):
        write_sharded(tmp_path / "bad", iter([("a", x), ("b", x)]), specs=specs)
    assert not (tmp_path / "bad").exists()


def test_large_slots_are_written_in_whole_chunk_pieces(tmp_path):
    writer = orbax_io.LeafWriter(tmp_path / "p")
    writer.max_piece_bytes = 1000
    value = np.arange(2 * 40 * 30, dtype=np.float32).reshape(2, 40, 30)
    writer.create(("w",), (3, 40, 30), np.float32, (1, 40, 8))
    writer.write(("w",), (1,), value[0].T.T)  # slot [40, 30]: pieces of 8 columns (chunk size)
    writer.create(("e",), (2, 40, 30), np.float32, (2, 7, 30))
    writer.write(("e",), (), value)  # pieces along axis 1, rows a multiple of 7
    writer.create(("o",), (2, 40, 30), np.float32, (2, 7, 30))
    writer.write(("o",), (), value[:, :21], at=(1, 0))  # at an offset, then in pieces
    writer.write(("o",), (), value[:, 21:], at=(1, 21))
    writer.finish()
    reader = orbax_io.LeafReader(tmp_path / "p")
    np.testing.assert_array_equal(reader.read(("w",), (1,)), value[0])
    np.testing.assert_array_equal(reader.read(("e",)), value)
    np.testing.assert_array_equal(reader.read(("o",)), value)
    assert orbax_io._piece_rows((40, 30), [40, 8], 4, 1000) == (1, 8)
    assert orbax_io._piece_rows((2, 40, 30), [2, 7, 30], 4, 2000) == (1, 7)
    assert orbax_io._piece_rows((4, 4), [4, 4], 4, 1000) == (0, 4)


def test_chunk_shape():
    assert orbax_io.chunk_shape((10, 32, 6144, 2, 9216), 2, unit_axes=(0, 1, 3)) == (
        1,
        1,
        6144,
        1,
        9216,
    )
    assert orbax_io.chunk_shape((200064, 6144), 2) == (6252, 6144)
    assert orbax_io.chunk_shape((10, 6144), 2, unit_axes=(0,), splits={1: 8}) == (1, 768)
    assert orbax_io.chunk_shape((7, 3), 4, splits={0: 2}, target_bytes=8) == (1, 2)  # 7 odd


_MEMORY_SCRIPT = r"""
import json, re, sys
from convert import hf_to_orbax, orbax_to_hf
def status(key):  # kB values of /proc/self/status
    text = open("/proc/self/status").read()
    return int(re.search(key + r":\s+(\d+) kB", text).group(1)) * 1024
hf_to_orbax.convert(hf_dir=sys.argv[1], out_dir=sys.argv[3] + "/warm", stream=None)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
s = hf_to_orbax.convert(hf_dir=sys.argv[2], out_dir=sys.argv[3] + "/big", stream=None,
                        max_inflight_bytes=int(sys.argv[4]))
after = status("VmHWM")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
export_before = status("VmRSS")
e = orbax_to_hf.export(orbax_dir=sys.argv[3] + "/big", out_dir=sys.argv[3] + "/back", stream=None,
                       max_shard_bytes=64 * 2**20)
print(json.dumps({"before": before, "after": after, "largest": s["largest_leaf_bytes"],
                  "total": s["bytes_read"], "seconds": s["seconds"],
                  "export_growth": status("VmHWM") - export_before,
                  "export_seconds": e["seconds"]}))
"""


def measure_conversion(small_hf: Path, big_hf: Path, out: Path, inflight: int) -> dict:
    """Peak RSS growth of converting ``big_hf`` in a fresh process (after a warm-up run)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_MEMORY_SCRIPT),
            str(small_hf),
            str(big_hf),
            str(out),
            str(inflight),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_memory_is_bounded_by_a_leaf(small, tmp_path):
    """16 layers, 8 experts: the checkpoint is ~12x the largest stacked leaf (wi, 2 blocks)."""
    config = config_of(num_blocks=2, d=512, f=1024, e=8, v=4096)
    write_checkpoint(tmp_path / "big", config, max_shard_bytes=64 * 2**20)
    (tmp_path / "out").mkdir()
    r = measure_conversion(small[1] / "hf", tmp_path / "big", tmp_path / "out", 16 * 2**20)
    growth = max(r["after"] - r["before"], 0)
    print(
        f"peak RSS growth {growth / 1e6:.1f} MB; largest leaf {r['largest'] / 1e6:.1f} MB; "
        f"checkpoint {r['total'] / 1e6:.1f} MB in {r['seconds']:.1f} s"
    )
    print(
        f"export: peak RSS growth {r['export_growth'] / 1e6:.1f} MB in {r['export_seconds']:.1f} s"
    )
    assert r["total"] > 10 * r["largest"]
    assert r["export_growth"] < r["largest"] + 64 * 2**20  # one tensor at a time, not a shard
    # Streaming keeps the growth near the write window (measured: 37 MB for a 67 MB leaf, 16 MiB
    # window); the bound leaves room for allocator noise.
    assert growth < 2 * r["largest"] + 64 * 2**20


@pytest.mark.heavy
@pytest.mark.slow
def test_scale_several_gb_many_shards(tmp_path):
    """Run by hand: ~3.3 GB remote-schema checkpoint in ~50 shards, default write window."""
    config = config_of(num_blocks=4, d=1024, f=2048, e=8, v=32768)
    write_checkpoint(tmp_path / "big", config, max_shard_bytes=64 * 2**20)
    (tmp_path / "out").mkdir()
    small = tmp_path / "small"
    write_checkpoint(small, config_of())
    r = measure_conversion(small, tmp_path / "big", tmp_path / "out", 256 * 2**20)
    growth = max(r["after"] - r["before"], 0)
    shards = len(list((tmp_path / "big").glob("model-*.safetensors")))
    print(
        f"\nscale: {r['total'] / 1e9:.2f} GB in {shards} shards, {r['seconds']:.1f} s "
        f"({r['total'] / r['seconds'] / 1e9:.3f} GB/s); peak RSS {r['after'] / 1e9:.2f} GB, "
        f"growth {growth / 1e6:.0f} MB; largest stacked leaf {r['largest'] / 1e6:.0f} MB; "
        f"export {r['export_seconds']:.1f} s, RSS growth {r['export_growth'] / 1e6:.0f} MB"
    )
    assert r["after"] < 1.5e9 + r["largest"]
