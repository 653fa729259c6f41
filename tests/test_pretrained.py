"""Loading and saving HF checkpoints against transformers' own MiniMaxForCausalLM (CPU, fp32)."""

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import test_transformers_parity as tp
from flax import nnx
from test_transformers_parity import D, E, F, H, K, N

from minimax_jax.hf import mapping
from minimax_jax.hf.pretrained import from_pretrained, save_pretrained
from minimax_jax.hf.safetensors import SafetensorsReader

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.torch

LAYER_TYPES = ["linear_attention"] * 7 + ["full_attention"]
V = 512


def _hf_config(layer_types=LAYER_TYPES, **changes):
    return tp.hf_config(layer_types, vocab_size=V, tie_word_embeddings=False, **changes)


@pytest.fixture(scope="module")
def hf_model():
    """Tiny transformers model with every parameter random (norm weights too)."""
    torch.manual_seed(0)
    model = transformers.MiniMaxForCausalLM(_hf_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory):
    """The same model saved by transformers three ways, plus two renamed (alias) copies."""
    root = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(root / "single")
    hf_model.save_pretrained(root / "sharded", max_shard_size="100KB")
    hf_model.save_pretrained(root / "fused", save_original_format=False)
    assert len(list((root / "sharded").glob("model-*.safetensors"))) > 5
    # The two mixed namings transformers also reads (its loader renames block_sparse_moe <-> mlp
    # and fuses any per-expert names); checked by hand to load into transformers too.
    for name, source, old, new in (
        ("mlp_per_expert", "single", "block_sparse_moe", "mlp"),
        ("bsm_fused", "fused", ".mlp.", ".block_sparse_moe."),
    ):
        sd = safetensors_torch.load_file(root / source / "model.safetensors")
        (root / name).mkdir()
        shutil.copy(root / source / "config.json", root / name)
        safetensors_torch.save_file(
            {k.replace(old, new): v for k, v in sd.items()},
            root / name / "model.safetensors",
            metadata={"format": "pt"},
        )
    names = ("single", "sharded", "fused", "mlp_per_expert", "bsm_fused")
    return {name: root / name for name in names}


def _np(t) -> np.ndarray:
    return t.detach().float().numpy()


def reference_leaves(hf_model) -> dict:
    """Our layout built from transformers' in-memory parameters with explicit index formulas."""
    sd = {k: _np(v) for k, v in hf_model.state_dict().items()}
    n, h3 = np.arange(N)[:, None, None], np.arange(3)[None, :, None] * H
    rows = n * 3 * H + h3 + np.arange(H)[None, None, :]  # head-major qkv rows [N, 3, H]
    out = {
        ("embed",): sd["model.embed_tokens.weight"],
        ("final_norm",): sd["model.norm.weight"],
        ("lm_head",): sd["lm_head.weight"].T,
    }
    for layer, kind in enumerate(LAYER_TYPES):
        pre = f"model.layers.{layer}."
        a = pre + "self_attn."
        leaves = {
            ("input_norm",): sd[pre + "input_layernorm.weight"],
            ("post_attn_norm",): sd[pre + "post_attention_layernorm.weight"],
            ("moe", "router"): sd[pre + "mlp.gate.weight"].T,
        }
        gate_up = sd[pre + "mlp.experts.gate_up_proj"]  # [E, 2F, D]
        leaves[("moe", "wi")] = np.stack([gate_up[:, :F], gate_up[:, F:]], 2).transpose(0, 3, 2, 1)
        leaves[("moe", "wo")] = sd[pre + "mlp.experts.down_proj"].transpose(0, 2, 1)
        if kind == "linear_attention":
            leaves[("attn", "qkv")] = sd[a + "qkv_proj.weight"][rows].transpose(3, 0, 1, 2)
            leaves[("attn", "gate")] = sd[a + "output_gate.weight"].T.reshape(D, N, H)
            leaves[("attn", "norm")] = sd[a + "norm.weight"].reshape(N, H)
            leaves[("attn", "out")] = sd[a + "out_proj.weight"].reshape(D, N, H).transpose(1, 2, 0)
        else:
            for name, heads in (("q", N), ("k", K), ("v", K)):
                leaves[("attn", name)] = sd[a + f"{name}_proj.weight"].T.reshape(D, heads, H)
            leaves[("attn", "o")] = sd[a + "o_proj.weight"].reshape(D, N, H).transpose(1, 2, 0)
        for key, value in leaves.items():  # one block of 8 layers: stack axis of size 1
            out[("blocks", layer, *key)] = value[None]
    return out


def params_of(model) -> dict:
    return {
        k: np.asarray(v)
        for k, v in mapping.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
    }


def assert_params_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))


@pytest.mark.parametrize("kind", ["single", "sharded", "fused", "mlp_per_expert", "bsm_fused"])
def test_load_transformers_checkpoint_exactly(hf_model, saved, kind):
    model = from_pretrained(saved[kind])
    assert model.config.schema == "native"
    got = params_of(model)
    assert got[("blocks", 0, "moe", "router")].dtype == np.float32
    assert_params_equal(got, reference_leaves(hf_model))


def test_transformers_writes_per_expert_names_and_buffers(saved):
    names = set(SafetensorsReader(saved["single"]).names())
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert "model.layers.0.self_attn.diagonal_decay" in names
    assert not any(".mlp." in n for n in names)
    fused = set(SafetensorsReader(saved["fused"]).names())
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused


def _remote_config() -> dict:
    """A hand-written remote-code config.json in the shape of the real M1 one."""
    return {
        "architectures": ["MiniMaxM1ForCausalLM"],
        "model_type": "minimax_m1",
        "auto_map": {
            "AutoConfig": "configuration_minimax_m1.MiniMaxM1Config",
            "AutoModelForCausalLM": "modeling_minimax_m1.MiniMaxM1ForCausalLM",
        },
        "attn_type_list": [int(t == "full_attention") for t in LAYER_TYPES],
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": None,
        "head_dim": H,
        "hidden_act": "silu",
        "hidden_size": D,
        "initializer_range": 0.02,
        "intermediate_size": F,
        "layernorm_full_attention_alpha": 1.5,
        "layernorm_full_attention_beta": 0.9,
        "layernorm_linear_attention_alpha": 1.3,
        "layernorm_linear_attention_beta": 1.1,
        "layernorm_mlp_alpha": 1.7,
        "layernorm_mlp_beta": 0.8,
        "max_position_embeddings": 4096,
        "num_attention_heads": N,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 8,
        "num_key_value_heads": K,
        "num_local_experts": E,
        "output_router_logits": False,
        "postnorm": True,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000000,
        "rotary_dim": H // 2,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "shared_intermediate_size": 0,
        "shared_moe_mode": "sigmoid",
        "sliding_window": None,
        "tie_word_embeddings": False,
        "transformers_version": "4.45.2",
        "use_cache": True,
        "vocab_size": V,
        "block_size": 16,
    }


def test_remote_schema_checkpoint_written_by_hand(hf_model, saved, tmp_path):
    """As the real M1: remote config, per-expert names, bf16 but fp32 router, 3 shards + index."""
    sd = safetensors_torch.load_file(saved["single"] / "model.safetensors")
    sd = {
        k: (v if k.endswith("moe.gate.weight") else v.to(torch.bfloat16)).contiguous()
        for k, v in sd.items()
        if "decay" not in k and "slope" not in k
    }
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(names), 3)):
        file = f"model-0000{i}-of-00003.safetensors"
        safetensors_torch.save_file({k: sd[k] for k in part}, tmp_path / file)
        weight_map.update(dict.fromkeys(part.tolist(), file))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": sum(v.nbytes for v in sd.values())},
                "weight_map": weight_map,
            }
        )
    )
    (tmp_path / "config.json").write_text(json.dumps(_remote_config()))
    model = from_pretrained(tmp_path)
    assert model.config.schema == "remote" and model.config.rotary_dim == H // 2
    want = {
        k: (v if k[-1] == "router" else v.astype(ml_dtypes.bfloat16).astype(np.float32))
        for k, v in reference_leaves(hf_model).items()
    }
    assert_params_equal(params_of(model), want)
    bf16 = params_of(from_pretrained(tmp_path, dtype=jnp.bfloat16))
    assert bf16[("blocks", 0, "moe", "router")].dtype == np.float32
    assert bf16[("blocks", 0, "moe", "wi")].dtype == jnp.bfloat16
    assert_params_equal({k: v.astype(np.float32) for k, v in bf16.items()}, want)
    # bf16 load + remote export reproduces the original tensors bit for bit (names, dtypes)
    save_pretrained(from_pretrained(tmp_path, dtype=jnp.bfloat16), tmp_path / "out")
    exported = SafetensorsReader(tmp_path / "out")
    assert sorted(exported.names()) == names
    for name in names:
        original = sd[name]
        again = exported.read(name)
        assert str(original.dtype).endswith(str(again.dtype)), name
        assert original.view(torch.uint8).numpy().tobytes() == again.tobytes(), name


@pytest.mark.parametrize("schema", ["remote", "native"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_bit_identical(saved, tmp_path, schema, dtype):
    model = from_pretrained(saved["single"], dtype=dtype)
    files = save_pretrained(model, tmp_path / "out", schema=schema, max_shard_bytes=50_000)
    assert "model.safetensors.index.json" in files
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["model_type"] == ("minimax" if schema == "native" else "minimax_text_01")
    names = SafetensorsReader(tmp_path / "out").names()
    assert any("block_sparse_moe.experts.0.w1.weight" in n for n in names)
    assert any(n.endswith("slope_rate") for n in names) == (schema == "native")
    again = from_pretrained(tmp_path / "out", dtype=dtype)
    assert again.config.schema == schema
    before, after = params_of(model), params_of(again)
    assert set(before) == set(after)
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert before[key].tobytes() == after[key].tobytes(), key


def test_transformers_loads_native_export(hf_model, saved, tmp_path):
    save_pretrained(from_pretrained(saved["sharded"]), tmp_path, schema="native")
    reloaded = transformers.MiniMaxForCausalLM.from_pretrained(tmp_path)
    want, got = dict(hf_model.named_parameters()), dict(reloaded.named_parameters())
    assert set(want) == set(got)
    for name, p in want.items():
        assert torch.equal(p, got[name]), name
    want_buf, got_buf = dict(hf_model.named_buffers()), dict(reloaded.named_buffers())
    for name, b in want_buf.items():
        torch.testing.assert_close(got_buf[name], b, rtol=1e-5, atol=1e-7)


def test_buffers_computed_in_bf16_by_transformers_pass(tmp_path):
    """transformers built in bf16 computes its decay buffers in bf16; they must still load."""
    config = _hf_config(num_hidden_layers=16, layer_types=LAYER_TYPES * 2, block_size=64)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = transformers.MiniMaxForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    assert model.model.layers[0].self_attn.diagonal_decay.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, dtype=jnp.bfloat16)
    want = _np(model.model.layers[9].self_attn.qkv_proj.weight)
    got = params_of(loaded)[("blocks", 1, "attn", "qkv")][1].astype(np.float32)
    np.testing.assert_array_equal(got, want.reshape(N, 3, H, D).transpose(3, 0, 1, 2))


def test_load_with_sharding(hf_model, saved):
    mesh = jax.make_mesh((len(jax.devices()),), ("x",))

    def sharding(path):  # vocab-shard embed/lm_head, replicate the rest
        spec = {("embed",): ("x", None), ("lm_head",): (None, "x")}.get(path, ())
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    model = from_pretrained(saved["single"], sharding=sharding)
    state = mapping.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert state[("embed",)].sharding == sharding(("embed",))
    assert_params_equal(params_of(model), reference_leaves(hf_model))


def test_save_replaces_previous_checkpoint(saved, tmp_path):
    model = from_pretrained(saved["single"])
    save_pretrained(model, tmp_path, schema="remote", max_shard_bytes=50_000)
    save_pretrained(model, tmp_path, schema="remote")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.tmp-*"))


def test_bad_checkpoint_lists_every_problem(saved, tmp_path):
    sd = safetensors_torch.load_file(saved["single"] / "model.safetensors")
    drop = ["model.layers.2.block_sparse_moe.experts.1.w2.weight", "model.norm.weight"]
    for name in drop:
        del sd[name]
    sd["model.layers.3.self_attn.extra.weight"] = torch.zeros(3)
    out_proj = "model.layers.4.self_attn.out_proj.weight"
    sd[out_proj] = sd[out_proj].T
    sd["model.layers.5.self_attn.slope_rate"] = sd["model.layers.5.self_attn.slope_rate"] * 1.5
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors"
    )
    shutil.copy(saved["single"] / "config.json", tmp_path)
    with pytest.raises(mapping.CheckpointMismatchError) as err:
        from_pretrained(tmp_path)
    message = str(err.value)
    for name in [*drop, "model.layers.3.self_attn.extra.weight", out_proj]:
        assert name in message
    del sd["model.layers.3.self_attn.extra.weight"]
    for name in drop:
        sd[name] = torch.ones(D) if name == "model.norm.weight" else torch.zeros(D, F)
    sd[out_proj] = sd[out_proj].T
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors"
    )
    with pytest.raises(mapping.CheckpointMismatchError, match="layers.5.self_attn.slope_rate"):
        from_pretrained(tmp_path)


def test_logits_match_transformers(hf_model, saved):
    """Full-RoPE config (transformers rotates all head dims); fp32; 40 tokens = 3 blocks of 16."""
    model = from_pretrained(saved["single"])
    assert model.config.rotary_dim == H
    ids = np.random.default_rng(0).integers(0, V, size=(2, 40))
    with torch.no_grad():
        want = _np(hf_model(torch.from_numpy(ids)).logits)
    got = np.asarray(jax.device_get(model(jnp.asarray(ids))))
    assert np.isfinite(got).all()
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    print(f"logits max relative error vs transformers: {rel:.2e}")
    assert rel <= 1e-4, rel
