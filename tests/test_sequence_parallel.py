"""Sequence parallelism (issue #20): the whole tiny model with its tokens split over the
`sequence` mesh axis gives the logits and gradients of one device (fp32, 1e-5 relative), on
8 simulated CPU devices, T = 512, lightning block 16, for left-padded rows and for packed
documents whose borders fall inside and across the shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minimax_jax import sharding
from minimax_jax.config import ModelConfig
from minimax_jax.model import sequence
from minimax_jax.model.causal_lm import MiniMaxForCausalLM
from minimax_jax.model.decoder import RunOptions, forward

T = 512
CFG = ModelConfig.preset("tiny-remote").replace(block_size=16, max_position_embeddings=4096)

MESHES = {
    "sequence8": dict(fsdp=1, sequence=8),
    "sequence4_expert2": dict(fsdp=1, expert=2, sequence=4),
    "sequence2_data2_tensor2": dict(fsdp=1, data=2, tensor=2, sequence=2),
}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "NaN/inf"
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _inputs():
    """4 rows: ids; left padding of 0 / 37 / 200 / 0 tokens; packed documents with borders at
    1, 64 (a shard border for sequence=8), 100, 300 and 511, and one row that is one document."""
    ids = jax.random.randint(jax.random.key(1), (4, T), 0, CFG.vocab_size)
    mask = np.ones((4, T), np.int32)
    mask[1, :37] = 0
    mask[2, :200] = 0
    seg = np.zeros((4, T), np.int32)
    for row, borders in enumerate(([64, 300], [1, 100, 511], [], [128, 129, 256])):
        for b in borders:
            seg[row, b:] += 1
    return ids, jnp.asarray(mask), jnp.asarray(seg)


def _loss_and_grad(ids, mask, seg, opts):
    weights = jax.random.normal(jax.random.key(2), (4, T, CFG.vocab_size))

    def loss(params):
        logits, router_logits = forward(CFG, params, ids, mask, opts, segment_ids=seg)
        # a loss that uses every logit (padded positions are dropped like a masked loss)
        keep = 1.0 if mask is None else mask[..., None]
        return jnp.sum(logits * weights * keep) / T + 0.01 * jnp.mean(router_logits**2), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def reference():
    params = MiniMaxForCausalLM(CFG, rngs=nnx.Rngs(0)).pure_params()
    ids, mask, seg = _inputs()
    out = {}
    for case, (m, s) in {"padded": (mask, None), "packed": (None, seg)}.items():
        (_, logits), grads = _loss_and_grad(ids, m, s, RunOptions())(params)
        out[case] = (m, s, logits, grads)
    return params, ids, out


def _get(tree, path):
    for k in path:
        tree = tree[k.idx if hasattr(k, "idx") else k.key]
    return tree


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sequence_parallel_logits_and_grads_match_one_device(reference, mesh_name):
    params, ids, cases = reference
    mesh = sharding.make_mesh(MESHES[mesh_name])
    rules, _ = sharding.load_rules("fsdp_ep")
    assert sequence.sequence_size(mesh) == MESHES[mesh_name]["sequence"]
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(CFG, rngs=nnx.Rngs(0)))
    placed = jax.device_put(
        params, sharding.pure_param_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    )
    opts = RunOptions(moe_impl="ep", mesh=mesh, rules=rules)
    x = jax.ShapeDtypeStruct((4, T, CFG.hidden_size), jnp.float32)
    assert sequence.is_sequence_sharded(mesh, rules, x)
    for case, (mask, seg, logits0, grads0) in cases.items():
        (_, logits), grads = _loss_and_grad(ids, mask, seg, opts)(placed)
        assert _rel(logits, logits0) < 1e-5, case
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            assert _rel(g, _get(grads0, path)) < 1e-5, (case, jax.tree_util.keystr(path))


def test_sequence_parallel_runs_the_sharded_cores(reference, monkeypatch):
    """The sharded model really goes through the sequence-parallel cores (one call per layer
    kind per traced block), and the tokens stay split: no core sees the whole sequence."""
    params, ids, _ = reference
    mesh = sharding.make_mesh(MESHES["sequence8"])
    rules, _ = sharding.load_rules("fsdp_ep")
    seen = []
    for name in ("lightning_core", "softmax_core"):
        real = getattr(sequence, name)

        def spy(*a, _real=real, _name=name, **kw):
            seen.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(sequence, name, spy)
    opts = RunOptions(moe_impl="ep", mesh=mesh, rules=rules)
    jax.jit(lambda p: forward(CFG, p, ids, None, opts)[0]).lower(params)
    assert seen.count("lightning_core") == 7 and seen.count("softmax_core") == 1


def test_sequence_axis_errors_before_compiling():
    """A sequence size that does not divide the length, or a mesh with more devices than
    exist, is one clear error."""
    mesh = sharding.make_mesh(dict(fsdp=1, sequence=8))
    rules, _ = sharding.load_rules("fsdp_ep")
    params = MiniMaxForCausalLM(CFG, rngs=nnx.Rngs(0)).pure_params()
    ids = jnp.zeros((1, 100), jnp.int32)
    opts = RunOptions(moe_impl="ep", mesh=mesh, rules=rules)
    with pytest.raises(ValueError, match=r"sequence=8 does not divide .* \(100 tokens\)"):
        forward(CFG, params, ids, None, opts)
    with pytest.raises(ValueError, match="needs 16 devices, have 8"):
        sharding.make_mesh(dict(fsdp=1, sequence=16))


def test_all_gather_bytes_hand_computed():
    """MiniMax-Text-01 (8 kv heads x 128) at 1M tokens over sequence=8: each device receives
    7/8 of K and V in bf16 per softmax layer: 7/8 * 2^20 * 8 * 128 * 2 * 2 bytes."""
    text01 = ModelConfig.preset("minimax-text-01")
    got = sequence.gathered_kv_bytes(text01, 1, 1 << 20, 8)
    assert got == 7 * (1 << 20) * 8 * 128 * 2 * 2 // 8
    assert abs(got / 2**30 - 3.5) < 1e-9
