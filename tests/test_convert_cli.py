"""Conversion CLIs against transformers (CPU, fp32): round trips, check_logits pass/fail, CLI
exit codes and one-line errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import test_transformers_parity as tp
from test_transformers_parity import H

from convert import check_logits, hf_to_orbax, orbax_to_hf
from minimax_jax.hf.safetensors import SafetensorsReader, write_sharded

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.torch

ROOT = Path(__file__).parent.parent
LAYER_TYPES = ["linear_attention"] * 7 + ["full_attention"]
V = 384


def hf_config(**changes):
    return tp.hf_config(LAYER_TYPES, vocab_size=V, tie_word_embeddings=False, **changes)


def _write_tokenizer(path: Path) -> None:
    """A word-level tokenizer over a few words (loads offline with AutoTokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "hello", "world", "the", "model", "converts", "weights"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A transformers-saved native checkpoint (sharded, fp32, random weights, full RoPE)."""
    root = tmp_path_factory.mktemp("native")
    torch.manual_seed(0)
    model = transformers.MiniMaxForCausalLM(hf_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if p.ndim == 1 else 0.08 * torch.randn_like(p))
    model.save_pretrained(root / "hf", max_shard_size="200KB")
    _write_tokenizer(root / "hf")
    hf_to_orbax.convert(hf_dir=root / "hf", out_dir=root / "orbax", dtype="float32", stream=None)
    return root


def test_native_round_trip_and_transformers_reload(native, tmp_path):
    out = tmp_path / "hf"
    orbax_to_hf.export(orbax_dir=native / "orbax", out_dir=out, schema="native")
    before, after = SafetensorsReader(native / "hf"), SafetensorsReader(out)
    assert sorted(before.names()) == sorted(after.names())
    for name in before.names():
        a, b = before.read(name), after.read(name)
        if name.endswith(("decay", "slope_rate")):  # derived: recomputed by our formula
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=name)
        else:
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (native / "hf" / name).read_bytes()
    ref = transformers.MiniMaxForCausalLM.from_pretrained(native / "hf")
    again = transformers.MiniMaxForCausalLM.from_pretrained(out)
    for (name, p), (_, q) in zip(ref.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_check_logits_passes_on_a_good_conversion(native):
    passed, m = check_logits.check(
        reference=native / "hf", candidate=native / "orbax", prompt="hello the model converts world"
    )
    assert m["tokens"] == 5 and m["token_source"] == "prompt"
    print(f"good conversion: max rel {m['max_rel']:.2e}, KL max {m['kl_max']:.2e}")
    assert passed and m["max_rel"] <= 1e-5 and m["top1"] == 1.0


def _swap_experts(orbax_dir: Path, leaf: str, block: int, e0: int, e1: int) -> None:
    """Corrupts a conversion the way a mapping bug would: two experts trade weights."""
    spec = {
        "driver": "zarr",
        "kvstore": {
            "driver": "ocdbt",
            "base": f"file://{orbax_dir / 'params'}",
            "path": leaf + "/",
        },
    }
    store = ts.open(spec, read=True, write=True).result()
    a, b = store[block, e0].read().result(), store[block, e1].read().result()
    store[block, e0].write(b).result()
    store[block, e1].write(a).result()


def test_check_logits_fails_on_a_corrupted_conversion(native, tmp_path, capsys):
    shutil.copytree(native / "orbax", tmp_path / "bad")
    _swap_experts(tmp_path / "bad", "blocks.3.moe.wi", 0, 1, 2)
    argv = ["check_logits", "--reference", str(native / "hf"), "--candidate", str(tmp_path / "bad")]
    check_logits._FLAGS(argv)  # the CLI's own flags, in-process (saves an interpreter start)
    try:
        with pytest.raises(SystemExit) as exit_info:
            check_logits.main(argv[:1])
    finally:
        check_logits._FLAGS.unparse_flags()
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert out.strip().endswith("FAIL") and "max rel err" in out
    print(out.strip().splitlines()[-2])


def _remote_checkpoint(path: Path, native_dir: Path, rotary_dim: int) -> None:
    """The native weights as the real M1 ships them: remote config (partial RoPE), bf16 with an
    fp32 router, no derived buffers, sharded with an index."""
    from minimax_jax.config import ModelConfig

    config = ModelConfig.from_hf(native_dir).replace(
        schema="remote", architecture="MiniMaxM1ForCausalLM", rotary_dim=rotary_dim,
        slope_formula="remote",
    )  # fmt: skip
    reader = SafetensorsReader(native_dir)
    keep = [n for n in reader.names() if not n.endswith(("decay", "slope_rate"))]

    def tensors():
        for name in sorted(keep):
            x = reader.read(name)
            yield name, x if name.endswith("moe.gate.weight") else x.astype("bfloat16")

    write_sharded(path, tensors(), max_shard_bytes=150_000)
    config.save_hf(path / "config.json", "remote")


def test_check_logits_remote_partial_rope_reference(native, tmp_path):
    """A remote-schema reference with rotary_dim < head_dim runs in transformers with the
    partial-RoPE patch; without the patch the same conversion fails (full RoPE differs)."""
    _remote_checkpoint(tmp_path / "hf", native / "hf", rotary_dim=H // 2)
    hf_to_orbax.convert(hf_dir=tmp_path / "hf", out_dir=tmp_path / "orbax", stream=None)
    ids = np.random.default_rng(1).integers(0, V, (1, 40))
    ours = check_logits.candidate_logits(tmp_path / "orbax", ids)
    patched = check_logits.compare(check_logits.reference_logits(tmp_path / "hf", ids, True), ours)
    print(f"remote, partial RoPE: max rel {patched['max_rel']:.2e}")
    assert patched["max_rel"] <= 1e-5 and patched["kl_max"] <= 1e-8
    full = check_logits.compare(check_logits.reference_logits(tmp_path / "hf", ids, False), ours)
    assert full["max_rel"] > 1e-3  # transformers as shipped (full RoPE) is another model
    orbax_to_hf.export(orbax_dir=tmp_path / "orbax", out_dir=tmp_path / "back")
    a, b = SafetensorsReader(tmp_path / "hf"), SafetensorsReader(tmp_path / "back")
    assert sorted(a.names()) == sorted(b.names())
    assert all(a.read(n).tobytes() == b.read(n).tobytes() for n in a.names())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["rotary_dim"] == H // 2


def test_cli_refuses_bad_checkpoint_with_one_line(native, tmp_path):
    reader = SafetensorsReader(native / "hf")
    drop = "model.layers.5.block_sparse_moe.experts.3.w2.weight"
    write_sharded(
        tmp_path / "hf",
        ((n, reader.read(n)) for n in reader.names() if n != drop),
        max_shard_bytes=10**9,
    )
    shutil.copy(native / "hf" / "config.json", tmp_path / "hf")
    proc = subprocess.run(
        [sys.executable, "-m", "convert.hf_to_orbax", "--hf_dir", str(tmp_path / "hf"),
         "--out_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2  # a bad checkpoint is bad input (README: exit codes)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and drop in lines[0] and "missing tensors (1)" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
