"""HF name <-> parameter mapping, from metadata only (the real M1 index and tiny configs)."""

import json
import math
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from minimax_jax.config import ModelConfig
from minimax_jax.hf import mapping

M1_DIR = Path(__file__).parent / "data" / "minimax-m1"
M1_PARAMS = 456_089_655_296


@pytest.fixture(scope="module")
def m1():
    config = ModelConfig.from_hf(M1_DIR / "config.json")
    index = json.loads((M1_DIR / "model.safetensors.index.json").read_text())
    return config, list(index["weight_map"]), index["metadata"]["total_size"]


def tiny_config(**changes) -> ModelConfig:
    """Real structure, tiny sizes: a 7+1 block repeated twice, 4 experts, H*N != D."""
    base = dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=16,
        num_heads=4,
        head_dim=32,
        num_kv_heads=2,
        intermediate_size=96,
        num_experts=4,
        num_experts_per_tok=2,
        layer_types=(("linear_attention",) * 7 + ("full_attention",)) * 2,
        rope_theta=1e7,
        rotary_dim=16,
        max_position_embeddings=4096,
        block_size=16,
    )
    return ModelConfig(**(base | changes))


def _names(config: ModelConfig, naming: str = "original") -> list[str]:
    return [a.name for a in mapping.export_assignments(config, naming=naming)]


def test_m1_every_name_maps_and_covers_every_element_once(m1):
    config, names, total_size = m1
    assert len(names) == 8243
    plan = mapping.plan_load(config, names)
    mapped = [a for assignments in plan.by_leaf.values() for a in assignments]
    assert sorted(a.name for a in mapped) == sorted(names)
    shapes = mapping.flatten(mapping.expected_leaf_shapes(config))
    for leaf, assignments in plan.by_leaf.items():
        # coverage is exact (plan_load checks no overlap and no hole); sizes must add up too
        assert sum(math.prod(a.slot_shape) for a in assignments) == math.prod(shapes[leaf].shape)
    assert mapping.num_params(config) == M1_PARAMS
    implied_bytes = sum(
        math.prod(a.hf_shape) * (4 if a.leaf[-1] == mapping.ROUTER else 2) for a in mapped
    )
    assert implied_bytes == total_size == 912_210_767_872
    assert {a.name for a in mapping.export_assignments(config)} == set(names)


def test_m1_expected_leaf_shapes(m1):
    config, _, _ = m1
    shapes = mapping.expected_leaf_shapes(config, jnp.bfloat16)
    assert set(shapes["blocks"]) == set(range(8))
    assert shapes["blocks"][0]["attn"]["qkv"].shape == (10, 6144, 64, 3, 128)
    assert shapes["blocks"][7]["attn"]["k"].shape == (10, 6144, 8, 128)
    assert shapes["blocks"][3]["moe"]["wi"].shape == (10, 32, 6144, 2, 9216)
    assert shapes["blocks"][3]["moe"]["router"].dtype == jnp.float32
    assert shapes["blocks"][3]["moe"]["wo"].dtype == jnp.bfloat16
    assert shapes["lm_head"].shape == (6144, 200064)


def test_negative_missing_extra_duplicate_all_reported(m1):
    config, names, _ = m1
    missing = ["model.layers.3.block_sparse_moe.experts.5.w3.weight", "model.norm.weight"]
    extra = [
        "model.layers.0.self_attn.rotary.weight",
        "model.layers.80.input_layernorm.weight",
        "model.layers.7.self_attn.qkv_proj.weight",
    ]
    broken = [n for n in names if n not in missing] + extra + [names[10]]
    with pytest.raises(mapping.CheckpointMismatchError) as err:
        mapping.plan_load(config, broken, where="m1")
    problems = err.value.problems
    assert sorted(problems["missing tensors"]) == sorted(missing)
    assert [u.split(" ")[0] for u in problems["unknown tensors"]] == extra
    assert "layer 7 is full_attention" in problems["unknown tensors"][2]
    (dup_key,) = [k for k in problems if k.startswith("duplicate")]
    assert problems[dup_key] == [names[10]]
    for name in missing + extra + [names[10]]:
        assert name in str(err.value)


def test_fused_overlap_with_per_expert_is_a_duplicate():
    config = tiny_config()
    names = _names(config) + ["model.layers.9.mlp.experts.down_proj"]
    with pytest.raises(mapping.CheckpointMismatchError) as err:
        mapping.plan_load(config, names)
    (dup,) = [v for k, v in err.value.problems.items() if k.startswith("duplicate")]
    per_expert = [f"model.layers.9.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)]
    assert sorted(dup) == sorted(per_expert + ["model.layers.9.mlp.experts.down_proj"])


@pytest.mark.parametrize("naming", ["original", "fused"])
def test_both_namings_cover_the_model(naming):
    config = tiny_config()
    plan = mapping.plan_load(config, _names(config, naming))
    assert all(plan.by_leaf.values())


@pytest.mark.parametrize("old,new", [("block_sparse_moe.", "mlp."), ("mlp.", "block_sparse_moe.")])
def test_alias_namings_cover_the_model(old, new):
    config = tiny_config()
    naming = "original" if old == "block_sparse_moe." else "fused"
    names = [n.replace(old, new) for n in _names(config, naming)]
    assert any(new + "experts" in n for n in names)
    plan = mapping.plan_load(config, names)
    assert sum(len(v) for v in plan.by_leaf.values()) == len(names)


def test_mixed_namings_across_layers_load():
    config = tiny_config()
    fused = [n for n in _names(config, "fused") if ".layers.2." in n]
    names = [n for n in _names(config) if ".layers.2." not in n or "block_sparse" not in n]
    mapping.plan_load(config, names + [n for n in fused if ".mlp." in n])


def test_shape_and_dtype_errors_list_every_tensor():
    config = tiny_config()
    assignments = mapping.export_assignments(config)
    meta = {a.name: (a.hf_shape, "BF16") for a in assignments}
    bad_shape = ["model.layers.0.self_attn.qkv_proj.weight", "lm_head.weight"]
    meta[bad_shape[0]] = ((64, 384), "BF16")  # transposed
    meta[bad_shape[1]] = ((64, 512), "BF16")
    meta["model.norm.weight"] = ((64,), "I32")
    with pytest.raises(mapping.CheckpointMismatchError) as err:
        mapping.plan_load(config, list(meta), meta=meta)
    problems = err.value.problems
    assert sorted(s.split(":")[0] for s in problems["wrong shapes"]) == sorted(bad_shape)
    assert [s.split(":")[0] for s in problems["wrong dtypes"]] == ["model.norm.weight"]


def test_prefix_for_vl():
    config = tiny_config()
    names = ["language_model." + n for n in _names(config)]
    plan = mapping.plan_load(config, names, prefix="language_model.")
    assert sum(len(v) for v in plan.by_leaf.values()) == len(names)
    with pytest.raises(mapping.CheckpointMismatchError):
        mapping.plan_load(config, names)


def test_tied_embeddings_have_no_lm_head():
    config = tiny_config(tie_word_embeddings=True)
    assert "lm_head" not in mapping.expected_leaf_shapes(config)
    names = _names(config)
    assert "lm_head.weight" not in names
    with pytest.raises(mapping.CheckpointMismatchError, match="tie_word_embeddings"):
        mapping.plan_load(config, names + ["lm_head.weight"])


@pytest.mark.parametrize(
    "layout",
    [
        mapping.IDENTITY,
        mapping.IDENTITY_2D,
        mapping.TRANSPOSE,
        mapping.QKV_HEAD_MAJOR,
        mapping.HEADS_IN,
        mapping.HEADS_OUT,
        mapping.HEADS_NORM,
        mapping.FUSED_GATE_UP,
        mapping.FUSED_DOWN,
    ],
)
def test_layouts_are_exact_inverses(layout):
    rng = np.random.default_rng(0)
    slot_shape = (3, 5, 7, 11)[: len(layout.perm)]
    y = rng.standard_normal(slot_shape).astype(np.float32)
    x = layout.to_hf(y)
    assert x.shape == layout.hf_shape(slot_shape)
    np.testing.assert_array_equal(layout.to_ours(x, slot_shape), y)


def test_qkv_is_head_major():
    n, h, d = 4, 3, 5
    hf = np.arange(3 * n * h * d, dtype=np.float32).reshape(3 * n * h, d)
    ours = mapping.QKV_HEAD_MAJOR.to_ours(hf, (d, n, 3, h))
    for head in range(n):
        for j in range(3):  # q, k, v
            rows = hf[head * 3 * h + j * h : head * 3 * h + (j + 1) * h]
            np.testing.assert_array_equal(ours[:, head, j, :], rows.T)


def test_fused_gate_up_is_w1_then_w3():
    e, f, d = 2, 3, 4
    hf = np.arange(e * 2 * f * d, dtype=np.float32).reshape(e, 2 * f, d)
    ours = mapping.FUSED_GATE_UP.to_ours(hf, (e, d, 2, f))
    np.testing.assert_array_equal(ours[1, :, 0, :], hf[1, :f].T)  # w1 (gate)
    np.testing.assert_array_equal(ours[1, :, 1, :], hf[1, f:].T)  # w3 (up)


def test_derived_buffers_checked_against_formula():
    config = tiny_config(slope_formula="native")
    derived = {d.template.rsplit(".", 1)[-1]: d for d in mapping.DERIVED}
    for name, d in derived.items():
        good = d.value(config, 3).astype(np.float32)
        assert good.shape == d.shape(config)
        assert mapping.check_derived(config, d, 3, good) is None, name
        assert mapping.check_derived(config, d, 4, good) is not None, name  # other layer
        bf16 = good.astype(ml_dtypes.bfloat16)
        assert mapping.check_derived(config, d, 3, bf16) is None, name
        assert mapping.check_derived(config, d, 10, bf16) is not None, name
        nan = good.copy()
        nan.flat[0] = np.nan
        assert mapping.check_derived(config, d, 3, nan) is not None, name
    s = derived["slope_rate"].value(config, 0)
    assert np.all(s > 0) and s.shape == (4, 1, 1)
    diag = derived["diagonal_decay"].value(config, 0)
    assert diag[0, 0, 0, 1] == 0 and diag[0, 0, 1, 0] == pytest.approx(np.exp(-s[0, 0, 0]))
    names = _names(config) + [f"model.layers.2.self_attn.{n}" for n in derived]
    plan = mapping.plan_load(config, names)
    assert [layer for _, layer, _ in plan.derived] == [2] * 4
    with pytest.raises(mapping.CheckpointMismatchError, match="not a lightning layer"):
        mapping.plan_load(config, _names(config) + ["model.layers.7.self_attn.slope_rate"])
