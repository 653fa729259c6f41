"""Mesh, rules presets, sharded init, and the whole tiny model on several meshes (8 CPU devices).

The sharded runs must give the single-device logits and gradients (fp32, 1e-5 relative).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import MESHES

from minimax_jax import sharding
from minimax_jax.config import ModelConfig
from minimax_jax.model.causal_lm import MiniMaxForCausalLM
from minimax_jax.model.decoder import RunOptions, forward


def _mesh(shape):
    return sharding.single_device_mesh() if shape is None else sharding.make_mesh(shape)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "NaN/inf"
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


# ------------------------------------------------------------------------- mesh and rules


def test_mesh_config_resolves_minus_one():
    assert sharding.MeshConfig(data=2, fsdp=-1).shape(8) == (2, 4, 1, 1, 1)
    assert sharding.MeshConfig(fsdp=1, expert=-1, tensor=2).shape(8) == (1, 1, 4, 2, 1)
    assert sharding.MeshConfig(fsdp=-1, sequence=4).shape(8) == (1, 2, 1, 1, 4)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.MeshConfig(data=3, fsdp=2).shape(8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})
    mesh = sharding.make_mesh({"data": 2, "expert": 2, "tensor": 2, "fsdp": 1})
    assert mesh.axis_names == sharding.MESH_AXES and mesh.devices.shape == (2, 1, 2, 2, 1)


def test_rules_spec_drops_axes_that_do_not_divide_or_repeat():
    mesh = sharding.make_mesh(dict(fsdp=2, expert=2, tensor=2))
    rules, _ = sharding.load_rules("fsdp_ep")
    P = jax.sharding.PartitionSpec
    wi = ("layers", "experts", "embed", "gate_up", "mlp")
    assert rules.spec(wi, mesh, (1, 4, 64, 2, 96)) == P(None, "expert", "fsdp", None, "tensor")
    assert rules.spec(wi, mesh, (1, 3, 64, 2, 95)) == P(None, None, "fsdp", None, None)
    act = ("batch", "length", "act_embed")
    assert rules.spec(act, mesh, (8, 5, 64)) == P(("fsdp", "expert"), None, None)
    assert rules.spec(act, mesh, (2, 5, 64)) == P("fsdp", None, None)
    dup = sharding.ShardingRules.from_mapping({"embed": "tensor", "heads": "tensor"})
    assert dup.spec(("embed", "heads"), mesh, (4, 4)) == P("tensor", None)


def test_presets_are_strict(tmp_path):
    assert {"fsdp", "fsdp_ep", "tp_ep"} <= set(sharding.presets())
    for name in sharding.presets():
        rules, mesh_cfg = sharding.load_rules(name)
        assert rules.name == name and isinstance(mesh_cfg, sharding.MeshConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: {embed: fsdp}\nmesh_shape: {data: 2}\n")
    with pytest.raises(ValueError, match="unknown keys"):
        sharding.load_rules(bad)
    bad.write_text("rules: {embedding: fsdp}\n")
    with pytest.raises(ValueError, match="unknown logical axis"):
        sharding.load_rules(bad)
    bad.write_text("rules: {embed: model}\n")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.load_rules(bad)
    with pytest.raises(FileNotFoundError, match="presets"):
        sharding.load_rules("no_such_preset")


def test_leaf_sharding_fn_for_from_pretrained():
    """`from_pretrained(..., sharding=fn)` takes leaf paths like ("blocks", 0, "moe", "wi")."""
    config = ModelConfig.preset("tiny-remote")
    mesh = _mesh(MESHES["data2_expert4"])
    rules, _ = sharding.load_rules("fsdp_ep")
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(config, rngs=nnx.Rngs(0)))
    fn = sharding.leaf_sharding_fn(
        sharding.pure_param_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    )
    P = jax.sharding.PartitionSpec
    assert fn(("blocks", 0, "moe", "wi")).spec == P(None, "expert", None, None, None)
    assert fn(("embed",)).spec == P(None, None)
    assert rules.get("experts") == ("expert",) and rules.get("qkv") is None


# ------------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def reference():
    """Unsharded tiny model: params, ids, and its jitted logits + gradients."""
    config = ModelConfig.preset("tiny-remote")
    params = MiniMaxForCausalLM(config, rngs=nnx.Rngs(0)).pure_params()
    ids = jax.random.randint(jax.random.key(1), (8, 17), 0, config.vocab_size)
    (_, logits), grads = _loss_and_grad(config, ids, RunOptions())(params)
    return config, params, ids, logits, grads


def _loss_and_grad(config, ids, opts):
    def loss(params):
        logits, router_logits = forward(config, params, ids, None, opts)
        nll = -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))
        return nll + 0.01 * jnp.mean(router_logits**2), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_sharded_init_places_params_and_matches(reference):
    config, params, *_ = reference
    mesh = _mesh(MESHES["fsdp2_expert2_tensor2"])
    rules, _ = sharding.load_rules("fsdp_ep")
    model = MiniMaxForCausalLM(config, rngs=nnx.Rngs(0), mesh=mesh, rules=rules)
    got = model.pure_params()
    P = jax.sharding.PartitionSpec
    assert got["blocks"][0]["moe"]["wi"].sharding.spec == P(None, "expert", "fsdp", None, "tensor")
    assert got["blocks"][7]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert got["blocks"][0]["attn"]["out"].sharding.spec == P(None, "tensor", None, "fsdp")
    shard = got["blocks"][0]["moe"]["wi"].addressable_shards[0].data
    assert shard.size * 8 == got["blocks"][0]["moe"]["wi"].size  # never a full copy
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    assert model.options.mesh is mesh and model.options.rules is rules


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_model_logits_and_grads_match_on_mesh(reference, mesh_name):
    config, params, ids, logits0, grads0 = reference
    mesh = _mesh(MESHES[mesh_name])
    rules, _ = sharding.load_rules("fsdp_ep")
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(config, rngs=nnx.Rngs(0)))
    shardings = sharding.pure_param_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    placed = jax.device_put(params, shardings)
    opts = RunOptions(moe_impl="ep", mesh=mesh, rules=rules)
    (_, logits), grads = _loss_and_grad(config, ids, opts)(placed)
    assert _rel(logits, logits0) < 1e-5
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        want = _get(grads0, path)
        assert _rel(g, want) < 1e-5, jax.tree_util.keystr(path)


def _get(tree, path):
    for k in path:
        tree = tree[k.idx if hasattr(k, "idx") else k.key]
    return tree


@pytest.mark.parametrize(
    ("preset", "shape"),
    [("tp_ep", dict(data=2, fsdp=1, expert=2, tensor=2)), ("fsdp", dict(data=2, fsdp=4))],
)
def test_other_presets_forward(reference, preset, shape):
    """Inference TP+EP and pure FSDP: the same logits (forward only, to keep CI short)."""
    config, params, ids, logits0, _ = reference
    mesh = sharding.make_mesh(shape)
    rules, _ = sharding.load_rules(preset)
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(config, rngs=nnx.Rngs(0)))
    placed = jax.device_put(
        params, sharding.pure_param_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    )
    opts = dataclasses.replace(RunOptions(), moe_impl=rules.moe_impl, mesh=mesh, rules=rules)
    fwd = jax.jit(lambda p: forward(config, p, ids, None, opts)[0])
    assert _rel(fwd(placed), logits0) < 1e-5
