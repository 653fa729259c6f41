"""ModelConfig: HF schemas (remote, native, VL-01), presets, lightning slopes, param counts, CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib

import numpy as np
import pytest

import configs
from minimax_jax import info
from minimax_jax.config import FULL, LINEAR, ModelConfig
from minimax_jax.model.slopes import lightning_slopes

M1_DIR = pathlib.Path(__file__).parent / "data" / "minimax-m1"
M1_TOTAL = 456_089_655_296
M1_ACTIVE = 45_944_920_064  # reported as "45.9B": excludes embedding and lm_head
PATTERN = (LINEAR,) * 7 + (FULL,)


@pytest.fixture(scope="module")
def m1_dict() -> dict:
    return json.loads((M1_DIR / "config.json").read_text())


def tiny(**changes) -> ModelConfig:
    return ModelConfig.preset("tiny-remote").replace(**changes)


# ------------------------------------------------------------------------- slopes


def test_remote_slopes_power_of_two_by_hand():
    # N=4, L=8, l=3: 2**(-8(j+1)/4) = 2**-2, 2**-4, 2**-6, 2**-8; factor 1 - 3/7 + 1e-5.
    factor = 1 - 3 / 7 + 1e-5
    want = np.array([0.25, 0.0625, 0.015625, 0.00390625]) * factor
    np.testing.assert_allclose(lightning_slopes(4, 3, 8, "remote"), want, rtol=1e-7)
    assert lightning_slopes(4, 3, 8, "remote").dtype == np.float32


def test_remote_slopes_non_power_of_two_alibi_interleaving_by_hand():
    # N=6: cp=4 -> [2^-2, 2^-4, 2^-6, 2^-8]; then slopes(8) = 2^-1..2^-8, every other one
    # (2^-1, 2^-3, 2^-5, 2^-7), first N-cp=2 of them.
    want6 = np.array([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
    np.testing.assert_allclose(lightning_slopes(6, 0, 8, "remote"), want6 * (1 + 1e-5), rtol=1e-7)
    # N=12: cp=8 -> 2^-1..2^-8; slopes(16) = 2^-0.5, 2^-1, ..., every other: 2^-0.5, 2^-1.5, ...
    want12 = np.array([2.0**-k for k in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5])
    factor = 1 - 5 / 15 + 1e-5
    np.testing.assert_allclose(lightning_slopes(12, 5, 16, "remote"), want12 * factor, rtol=1e-7)


def test_native_slopes_by_hand():
    for n in (4, 6):
        l, L = 2, 8
        want = (1 / 2 ** (8 / n)) ** np.arange(1, n + 1) * (1 - l / (L - 1 + 1e-5) + 1e-5)
        np.testing.assert_allclose(lightning_slopes(n, l, L, "native"), want, rtol=1e-7)
    # Power-of-two heads: same base, layer factor differs by <= ~1e-5 relative.
    r, nat = lightning_slopes(8, 6, 8, "remote"), lightning_slopes(8, 6, 8, "native")
    np.testing.assert_allclose(r, nat, rtol=2e-5)


def test_slopes_single_layer_and_bad_inputs():
    np.testing.assert_allclose(
        lightning_slopes(4, 0, 1, "remote"), 2.0 ** -np.arange(2, 9, 2) * (1 + 1e-5), rtol=1e-7
    )
    assert np.all(np.isfinite(lightning_slopes(4, 0, 1, "native")))
    with pytest.raises(ValueError, match="layer_idx"):
        lightning_slopes(4, 8, 8, "remote")
    with pytest.raises(ValueError, match="formula"):
        lightning_slopes(4, 0, 8, "alibi")


@pytest.mark.torch
@pytest.mark.parametrize("heads", [4, 6])
def test_native_slopes_match_transformers(heads):
    transformers = pytest.importorskip("transformers")
    from transformers.models.minimax import modeling_minimax

    cfg = tiny(
        num_heads=heads,
        num_kv_heads=heads,
        slope_formula="native",
        schema="native",
        architecture="MiniMaxForCausalLM",
        rotary_dim=32,
    )
    hf = transformers.MiniMaxConfig(**cfg.to_hf("native"))
    for layer in (0, 3, 6):
        attn = modeling_minimax.MiniMaxLightningAttention(hf, layer)
        want = attn.get_slope_rate().reshape(-1).double().numpy()
        np.testing.assert_allclose(cfg.lightning_slopes(layer), want, rtol=1e-6)


# ------------------------------------------------------------------------- real M1 config


def test_real_m1_config(m1_dict):
    cfg = ModelConfig.from_hf(M1_DIR)
    assert cfg == ModelConfig.from_hf(M1_DIR / "config.json") == ModelConfig.from_hf(m1_dict)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (200064, 6144, 80)
    assert (cfg.num_heads, cfg.head_dim, cfg.num_kv_heads) == (64, 128, 8)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (32, 2, 9216)
    assert (cfg.rotary_dim, cfg.rope_theta, cfg.block_size) == (64, 1e7, 256)
    assert cfg.postnorm and cfg.slope_formula == "remote" and cfg.schema == "remote"
    assert cfg.architecture == "MiniMaxM1ForCausalLM"
    assert cfg.linear_attn_alpha == cfg.full_attn_alpha == cfg.mlp_alpha == pytest.approx(160**0.25)
    assert cfg.linear_attn_beta == cfg.full_attn_beta == cfg.mlp_beta == 1.0
    assert cfg.layer_types == PATTERN * 10
    assert (cfg.period, cfg.num_blocks, cfg.block_pattern) == (8, 10, PATTERN)
    assert [l for l in range(80) if not cfg.layer_is_lightning(l)] == list(range(7, 80, 8))
    assert cfg.to_hf() == m1_dict  # writes the released file back key for key


def test_m1_param_counts():
    cfg = ModelConfig.from_hf(M1_DIR)
    assert cfg.param_count() == M1_TOTAL
    assert cfg.active_param_count() == M1_ACTIVE
    assert round(cfg.active_param_count() / 1e9, 1) == 45.9
    v, d = cfg.vocab_size, cfg.hidden_size
    assert cfg.active_param_count(include_embeddings=True) == M1_ACTIVE + 2 * v * d
    shapes = cfg.param_shapes()
    assert shapes["layers.0.attn.qkv"] == (6144, 64, 3, 128)
    assert shapes["layers.7.attn.k"] == (6144, 8, 128)
    assert shapes["layers.7.moe.wi"] == (32, 6144, 2, 9216)
    assert cfg.replace(tie_word_embeddings=True).param_count() == M1_TOTAL - v * d


def test_tiny_param_count_by_hand():
    cfg = tiny()
    D, N, H, K, E, F, V = 64, 4, 32, 2, 4, 96, 512
    lightning = D * N * 3 * H + D * N * H + N * H + N * H * D
    softmax = D * N * H + 2 * D * K * H + N * H * D
    per_layer = 2 * D + D * E + E * D * 2 * F + E * F * D
    total = 2 * V * D + D + 8 * per_layer + 7 * lightning + softmax
    assert cfg.param_count() == total
    active = total - 2 * V * D - 8 * (E - 2) * 3 * D * F
    assert cfg.active_param_count() == active


# ------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", configs.list_presets())
def test_presets_round_trip_own_schema(name, tmp_path):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    cfg.save_hf(tmp_path)
    assert ModelConfig.from_hf(tmp_path) == cfg
    assert json.loads(configs.preset_path(name).read_text()) == cfg.to_hf()


@pytest.mark.parametrize("name", ["tiny-remote", "tiny-native", "minimax-m1-80k"])
def test_cross_schema_round_trip_keeps_math(name):
    cfg = ModelConfig.preset(name)
    other = "native" if cfg.schema == "remote" else "remote"
    back = ModelConfig.from_hf(cfg.to_hf(other))
    assert back.schema == other and back.slope_formula == cfg.slope_formula
    assert back == cfg.replace(schema=other, architecture=back.architecture)
    assert ModelConfig.from_hf(back.to_hf(cfg.schema)).replace(architecture=cfg.architecture) == cfg


def test_extra_keys_only_when_needed():
    assert "minimax_jax_slope_formula" not in tiny().to_hf("remote")
    assert tiny().to_hf("native")["minimax_jax_slope_formula"] == "remote"
    assert "block_size" not in ModelConfig.preset("minimax-m1-80k").to_hf("remote")
    assert tiny().to_hf("remote")["block_size"] == 16
    d = tiny(lightning_norm_eps=1e-5).to_hf()
    assert ModelConfig.from_hf(d).lightning_norm_eps == 1e-5


def test_remote_non_power_of_two_to_native_warns():
    cfg = tiny(num_heads=6, num_kv_heads=2)
    with pytest.warns(UserWarning, match="power of two"):
        d = cfg.to_hf("native")
    back = ModelConfig.from_hf(d)
    np.testing.assert_array_equal(back.lightning_slopes(0), cfg.lightning_slopes(0))


def test_prenorm_cannot_be_native():
    with pytest.raises(ValueError, match="postnorm"):
        ModelConfig.preset("tiny-remote-prenorm").to_hf("native")


@pytest.mark.torch
def test_native_dict_builds_transformers_config_and_back():
    transformers = pytest.importorskip("transformers")
    for name in ("tiny-native", "tiny-remote", "minimax-m1-80k"):
        cfg = ModelConfig.preset(name)
        hf = transformers.MiniMaxConfig(**cfg.to_hf("native"))
        assert list(hf.layer_types) == list(cfg.layer_types)
        assert hf.linear_attn_alpha_factor == cfg.linear_attn_alpha
        assert hf.mlp_beta_factor == cfg.mlp_beta
        assert hf.block_size == cfg.block_size and hf.num_local_experts == cfg.num_experts
        assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
        back = ModelConfig.from_hf(hf.to_dict())
        assert back == cfg.replace(schema="native", architecture="MiniMaxForCausalLM")


@pytest.mark.torch
def test_reads_a_config_written_by_transformers():
    transformers = pytest.importorskip("transformers")
    hf = transformers.MiniMaxConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=None,
        num_key_value_heads=2,
        intermediate_size=48,
        num_local_experts=4,
    )
    cfg = ModelConfig.from_hf(hf.to_dict())
    assert cfg.layer_types == (FULL, LINEAR) * 2 and cfg.period == 2  # transformers' default
    assert cfg.head_dim == 8 and cfg.rotary_dim == 8 and cfg.slope_formula == "native"
    assert cfg.bos_token_id == 1 and cfg.eos_token_id == 2


def test_vl01_config_reads_text_config(m1_dict):
    text = {k: v for k, v in m1_dict.items() if k not in ("architectures", "auto_map")}
    text["model_type"] = "minimax_text_01"
    vl = {
        "architectures": ["MiniMaxVL01ForConditionalGeneration"],
        "model_type": "minimax_vl_01",
        "image_token_index": 200025,
        "text_config": text,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024},
    }
    cfg = ModelConfig.from_hf(vl)
    assert cfg == ModelConfig.preset("minimax-vl-01-text")
    assert cfg.architecture == "MiniMaxText01ForCausalLM"
    del text["model_type"]  # text_config without model_type: the Text-01 LM
    assert ModelConfig.from_hf(vl) == cfg
    with pytest.raises(ValueError, match="text_config"):
        ModelConfig.from_hf({"model_type": "minimax_vl_01"})


def _saved_by_remote_code(hub: dict, model_type: str) -> dict:
    """config.json as the remote code's configuration class saves it (by hand, from
    configuration_minimax_m1.py of MiniMax-AI/MiniMax-M1 and transformers 4.45's
    ``to_diff_dict``): ``model_type`` is the class attribute ("MiniMaxM1" / "MiniMaxText01"),
    keys equal to PretrainedConfig's defaults (bos/eos/pad_token_id None) are left out, and
    ``torch_dtype`` records the weights' dtype."""
    d = {k: v for k, v in hub.items() if k not in ("bos_token_id", "eos_token_id")}
    return {**d, "model_type": model_type, "torch_dtype": "bfloat16"}


def test_reads_configs_the_remote_code_saves(m1_dict):
    from minimax_jax.hf.hf_config import stored_dtype

    saved = _saved_by_remote_code(m1_dict, "MiniMaxM1")
    cfg = ModelConfig.from_hf(saved)
    assert cfg == ModelConfig.from_hf(m1_dict) and cfg.architecture == "MiniMaxM1ForCausalLM"
    assert cfg.to_hf()["model_type"] == "minimax_m1"  # written as the hub files spell it
    assert stored_dtype(saved) == "bfloat16" and stored_dtype(m1_dict) is None
    no_arch = {k: v for k, v in saved.items() if k != "architectures"}
    assert ModelConfig.from_hf(no_arch) == cfg  # the spelling alone tells the architecture
    text01 = {**saved, "model_type": "MiniMaxText01", "architectures": ["MiniMaxText01ForCausalLM"]}
    assert ModelConfig.from_hf(text01).architecture == "MiniMaxText01ForCausalLM"
    # VL-01's configuration class writes model_type minimax_vl_01 itself, but its text_config is
    # a MiniMaxText01Config, saved with that class's spelling
    text = {k: v for k, v in text01.items() if k not in ("architectures", "auto_map")}
    vl = {"architectures": ["MiniMaxVL01ForConditionalGeneration"], "model_type": "minimax_vl_01",
          "torch_dtype": "bfloat16", "text_config": text}  # fmt: skip
    assert ModelConfig.from_hf(vl) == ModelConfig.preset("minimax-vl-01-text")
    with pytest.raises(ValueError, match="contradict"):
        ModelConfig.from_hf({**saved, "architectures": ["MiniMaxForCausalLM"]})
    with pytest.raises(ValueError, match="MiniMaxM1"):  # the error lists the spellings read
        ModelConfig.from_hf({**saved, "model_type": "MiniMaxM2"})


def test_native_legacy_keys():
    d = tiny().to_hf("native")
    rope = d.pop("rope_parameters")
    d["rope_theta"], d["rotary_dim"] = rope["rope_theta"], 16  # transformers-4 style -hf config
    cfg = ModelConfig.from_hf(d)
    assert cfg.rotary_dim == 16 and cfg.rope_theta == 1e4
    d["rope_parameters"] = dict(rope, rope_theta=5e5)
    with pytest.raises(ValueError, match="rope_theta"):
        ModelConfig.from_hf(d)
    d["rope_parameters"] = dict(rope)
    d["rotary_dim"] = 8
    with pytest.raises(ValueError, match="rotary_dim"):
        ModelConfig.from_hf(d)


# ------------------------------------------------------------------------- errors


def _without(d: dict, key: str) -> dict:
    d = copy.deepcopy(d)
    del d[key]
    return d


def _with(d: dict, **kv) -> dict:
    d = copy.deepcopy(d)
    d.update(kv)
    return d


REMOTE_REQUIRED = [
    "attn_type_list",
    "postnorm",
    "rotary_dim",
    "rope_theta",
    "layernorm_mlp_alpha",
    "layernorm_full_attention_beta",
    "layernorm_linear_attention_alpha",
    "num_hidden_layers",
    "hidden_size",
    "num_key_value_heads",
    "num_local_experts",
    "vocab_size",
]
NATIVE_REQUIRED = [
    "layer_types",
    "linear_attn_alpha_factor",
    "full_attn_beta_factor",
    "mlp_alpha_factor",
    "rope_parameters",
    "num_attention_heads",
    "intermediate_size",
]


@pytest.mark.parametrize("key", REMOTE_REQUIRED)
def test_remote_missing_key_is_named(m1_dict, key):
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf(_without(m1_dict, key))


@pytest.mark.parametrize("key", NATIVE_REQUIRED)
def test_native_missing_key_is_named(key):
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf(_without(ModelConfig.preset("tiny-native").to_hf(), key))


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"attn_type_list": [0, 1] * 3}, "attn_type_list"),
        ({"attn_type_list": [0] * 79 + [2]}, "attn_type_list"),
        ({"shared_intermediate_size": 1024}, "shared_intermediate_size"),
        ({"shared_intermediate_size": [512]}, "shared_intermediate_size"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"rope_scaling": {"type": "linear"}}, "rope_scaling"),
        ({"architectures": ["MixtralForCausalLM"]}, "architectures"),
        ({"model_type": "mixtral"}, "model_type"),
        ({"model_type": "minimax"}, "model_type"),  # native type on a remote architecture
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rotary_dim": 65}, "rotary_dim"),
        ({"rotary_dim": 256}, "rotary_dim"),
        ({"num_key_value_heads": 7}, "num_kv_heads"),
        ({"num_experts_per_tok": 33}, "num_experts_per_tok"),
        ({"postnorm": "yes"}, "postnorm"),
        ({"layer_types": [FULL] * 80}, "layer_types"),
    ],
)
def test_remote_contradictions_are_named(m1_dict, changes, key):
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf(_with(m1_dict, **changes))


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"layer_types": [LINEAR] * 7}, "layer_types"),
        ({"layer_types": ["mamba"] * 8}, "layer_types"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type"),
        (
            {
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1e4,
                    "partial_rotary_factor": 0.3,
                }
            },
            "partial_rotary_factor",
        ),
        ({"postnorm": False}, "postnorm"),
        ({"attn_type_list": [1] * 8}, "attn_type_list"),
        ({"sliding_window": 128}, "sliding_window"),
    ],
)
def test_native_contradictions_are_named(changes, key):
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf(_with(ModelConfig.preset("tiny-native").to_hf(), **changes))


def test_unknown_schema_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="architectures"):
        ModelConfig.from_hf({"hidden_size": 8})
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="schema"):
        tiny().to_hf("gguf")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_layers": 9}, "layer_types"),
        ({"layer_types": ("softmax",) * 8}, "layer_types"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"rotary_dim": 15}, "rotary_dim"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"slope_formula": "alibi"}, "slope_formula"),
        ({"schema": "gguf"}, "schema"),
        ({"block_size": -16}, "block_size"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ],
)
def test_dataclass_validation(changes, field):
    with pytest.raises(ValueError, match=field):
        tiny(**changes)


def test_frozen_and_hashable():
    cfg = tiny(layer_types=list(PATTERN), eos_token_id=[1, 2])
    assert cfg.layer_types == PATTERN and cfg.eos_token_id == (1, 2)
    assert {cfg: 1}[tiny(eos_token_id=(1, 2))] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 4  # type: ignore[misc]


# ------------------------------------------------------------------------- layer pattern


@pytest.mark.parametrize(
    ("types", "period"),
    [
        (PATTERN * 10, 8),
        ((FULL, LINEAR) * 4, 2),
        ((LINEAR,) * 6, 1),
        ((LINEAR, FULL, LINEAR, FULL, LINEAR, LINEAR), 6),
        ((LINEAR, LINEAR, FULL) * 2 + (LINEAR,), 7),
        (PATTERN + (LINEAR,) * 8, 16),
    ],
)
def test_period(types, period):
    cfg = tiny(num_layers=len(types), layer_types=types)
    assert cfg.period == period and cfg.num_blocks == len(types) // period
    assert cfg.block_pattern == types[:period]


def test_slopes_per_block_position():
    cfg = ModelConfig.preset("tiny-m1-2blocks")
    per_pos = cfg.slopes_per_block_position()
    assert sorted(per_pos) == list(range(7))  # position 7 is softmax
    for p, table in per_pos.items():
        assert table.shape == (2, 4) and table.dtype == np.float32
        for b in range(2):
            want = lightning_slopes(4, b * 8 + p, 16, "remote")
            np.testing.assert_array_equal(table[b], want)
    with pytest.raises(ValueError, match="not linear_attention"):
        cfg.lightning_slopes(7)
    native = ModelConfig.preset("tiny-native")
    np.testing.assert_array_equal(native.lightning_slopes(3), lightning_slopes(4, 3, 8, "native"))


# ------------------------------------------------------------------------- presets, CLI


def test_presets():
    names = configs.list_presets()
    for want in (
        "minimax-text-01",
        "minimax-m1-40k",
        "minimax-m1-80k",
        "minimax-vl-01-text",
        "tiny-remote",
        "tiny-native",
        "tiny-m1-2blocks",
    ):
        assert want in names
    m1 = ModelConfig.from_hf(M1_DIR)
    assert ModelConfig.preset("minimax-m1-40k") == ModelConfig.preset("minimax-m1-80k.json") == m1
    text01 = ModelConfig.preset("minimax-text-01")
    assert text01.architecture == "MiniMaxText01ForCausalLM"
    assert text01.to_hf()["model_type"] == "minimax_text_01"
    assert text01.replace(architecture=m1.architecture) == m1
    assert text01.param_count() == M1_TOTAL
    t = ModelConfig.preset("tiny-remote")
    sizes = (t.num_layers, t.hidden_size, t.num_heads, t.head_dim, t.num_kv_heads)
    assert sizes == (8, 64, 4, 32, 2)
    assert t.num_heads * t.head_dim != t.hidden_size
    assert (t.num_experts, t.num_experts_per_tok, t.intermediate_size) == (4, 2, 96)
    assert (t.vocab_size, t.rotary_dim, t.block_size, t.period) == (512, 16, 16, 8)
    assert t.linear_attn_alpha == 2.0 and t.linear_attn_beta == 1.0
    n = ModelConfig.preset("tiny-native")
    assert n.schema == "native" and n.slope_formula == "native" and n.layer_types[0] == LINEAR
    assert n.rotary_dim == n.head_dim  # transformers' minimax rotates all dims: full RoPE
    assert not ModelConfig.preset("tiny-remote-prenorm").postnorm
    with pytest.raises(ValueError, match="unknown preset"):
        configs.preset_path("minimax-m2")


def test_info_describe():
    text = info.describe(preset="minimax-m1-80k")
    assert "456,089,655,296" in text and "45,944,920,064" in text
    assert "LLLLLLLF x 10" in text and f"{2 * M1_TOTAL:,}" in text
    assert "LLLLLLLF x 1" in info.describe(config=configs.preset_path("tiny-remote"))
    with pytest.raises(ValueError, match="exactly one"):
        info.describe()
    with pytest.raises(ValueError, match="unknown preset"):
        info.describe(preset="nope")


def test_info_main_errors_are_one_line(capsys):
    from absl import flags
    from absl.testing import flagsaver

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(preset="nope"):
        assert info.main(["minimax-jax-info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown preset") and err.count("\n") == 1
    with flagsaver.flagsaver(preset="tiny-native"):
        assert info.main(["minimax-jax-info"]) == 0
    assert "native schema" in capsys.readouterr().out
