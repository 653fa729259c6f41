"""experiments/fullscale: the ep_fold rules give the one-device results, random weights are
drawn in their shards, and the training plan's state bytes equal AdamW's (8 CPU devices)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.config import ModelConfig
from minimax_jax.inference import engine as sampling
from minimax_jax.inference import memory
from minimax_jax.model.causal_lm import MiniMaxForCausalLM
from minimax_jax.model.decoder import RunOptions, forward
from minimax_jax.sharding import load_rules, make_mesh, pure_param_shardings
from minimax_jax.training.run_config import OptimSection
from minimax_jax.training.step import build_optimizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments", "fullscale"))
from common import device_bytes, init_random_params  # noqa: E402
from train_slice import state_shardings  # noqa: E402

CFG = ModelConfig.preset("tiny-m1-2blocks")
SLICE = CFG.replace(num_layers=12, layer_types=CFG.layer_types[:12])  # one block of 12, like x2
MESHES = {"x2": dict(expert=2), "x8": dict(expert=2, tensor=4)}


def _mesh(name):
    shape = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1} | MESHES[name]
    n = int(np.prod(list(shape.values())))
    return make_mesh(shape, devices=jax.devices()[:n])


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _loss(cfg, opts):
    def loss(params, ids):
        logits, router = forward(cfg, params, ids, None, opts)
        return -jnp.mean(jax.nn.log_softmax(logits).max(-1)) + 0.01 * jnp.mean(router**2), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_ep_fold_logits_grads_and_generation_equal_one_device():
    model = MiniMaxForCausalLM(SLICE, rngs=nnx.Rngs(0))
    params = model.pure_params()
    ids = jnp.asarray(np.random.RandomState(0).randint(0, SLICE.vocab_size, (2, 40)), jnp.int32)
    (_, logits0), grads0 = _loss(SLICE, RunOptions())(params, ids)
    want = sampling.generate(model, ids[:, :21], max_new_tokens=8)
    rules, _ = load_rules("ep_fold")
    for name in MESHES:
        mesh = _mesh(name)
        shardings = pure_param_shardings(nnx.state(model, nnx.Param), mesh, rules)
        placed = jax.device_put(params, shardings)
        assert placed["blocks"][0]["attn"]["qkv"].sharding.spec[2] is not None  # heads split
        opts = RunOptions(lightning_impl="xla", moe_impl="ep", mesh=mesh, rules=rules)
        (_, logits), grads = _loss(SLICE, opts)(placed, ids)
        assert _rel(logits, logits0) < 1e-5, name
        for (path, g), g0 in zip(jax.tree_util.tree_leaves_with_path(grads),
                                 jax.tree.leaves(grads0), strict=True):  # fmt: skip
            assert _rel(g, g0) < 1e-5, (name, jax.tree_util.keystr(path))
        if name == "x8":  # generation on the full ep_fold mesh (x2 is its expert axis alone)
            engine = sampling.Engine(SLICE, placed, options=opts, prefill_chunk=8)
            got = sampling.generate(None, ids[:, :21], max_new_tokens=8, engine=engine)
            np.testing.assert_array_equal(got, want)


def test_random_init_is_drawn_in_shards():
    mesh = _mesh("x8")
    rules, _ = load_rules("ep_fold")
    params, _ = init_random_params(SLICE, mesh, rules, jnp.bfloat16, limit=1000)
    assert device_bytes(params) == memory.weight_bytes(SLICE, dict(mesh.shape), rules)
    wi = params["blocks"][0]["moe"]["wi"]
    shards = [np.asarray(s.data, np.float32) for s in wi.addressable_shards]
    assert shards[0].size * 8 == wi.size  # experts over expert, FFN width over tensor
    assert not np.array_equal(shards[0], shards[1])  # each device draws its own shard
    assert abs(float(np.std(np.asarray(wi, np.float32))) - SLICE.initializer_range) < 2e-3
    assert params["blocks"][0]["moe"]["router"].dtype == jnp.float32
    for leaf in jax.tree.leaves(params):  # replicas (shards of the same index) are equal
        first = {}
        for s in leaf.addressable_shards:
            key = str(s.index)
            first.setdefault(key, np.asarray(s.data, np.float32))
            np.testing.assert_array_equal(np.asarray(s.data, np.float32), first[key])
    qkv = params["blocks"][0]["attn"]["qkv"]  # 4 heads over tensor 4: replicated over expert
    assert len({str(s.index) for s in qkv.addressable_shards}) == 4
    assert np.all(np.asarray(params["final_norm"]) == 1)


def test_training_plan_state_bytes_equal_adamw():
    cfg = CFG.replace(num_layers=2, layer_types=("linear_attention", "full_attention"))
    for name in MESHES:
        mesh = _mesh(name)
        rules, _ = load_rules("ep_fold")
        params, _ = init_random_params(cfg, mesh, rules, jnp.bfloat16)
        tx, _ = build_optimizer(OptimSection(), 100)
        opt = jax.jit(tx.init, out_shardings=state_shardings(
            jax.eval_shape(tx.init, params), params, mesh))(params)  # fmt: skip
        opts = RunOptions(lightning_impl="xla", moe_impl="ep", mesh=mesh, rules=rules)
        ids = jnp.zeros((1, 16), jnp.int32)
        _, grads = _loss(cfg, opts)(params, ids)
        plan = memory.plan_training(cfg, batch=1, seq_len=16, mesh_shape=dict(mesh.shape),
                                    rules=rules, param_dtype=jnp.bfloat16)  # fmt: skip
        assert device_bytes(params) == plan.weights
        if name == "x2":  # GSPMD may place small gradients differently (the router's is
            # replicated): a large share of this tiny model on 8 devices, none on x2
            assert abs(device_bytes(grads) - plan.gradients) <= 0.01 * plan.gradients
        assert 0 <= device_bytes(opt) - plan.optimizer <= 16, name  # + two int32 step counts
