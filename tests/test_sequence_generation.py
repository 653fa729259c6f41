"""Generation with the prompt split over the `sequence` mesh axis (issue #20): every prefill
chunk's tokens are split over the axis (the lightning state exchange starts from the cache's
state, softmax queries attend over all cache slots), decode steps run unsplit. Greedy tokens
and prefill logits equal one device (fp32, 1e-5) for left-padded prompts of different lengths
over 3 prefill chunks, on 4 simulated CPU devices; plus the automatic prefill chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_model as tm
from flax import nnx

from minimax_jax import sharding
from minimax_jax.inference import engine as sampling
from minimax_jax.inference import memory
from minimax_jax.model import sequence
from minimax_jax.model.cache import init_cache
from minimax_jax.model.causal_lm import MiniMaxForCausalLM
from minimax_jax.model.decoder import RunOptions, forward, forward_cached

TOL = 1e-5
CHUNK = 16
MESHES = {
    "sequence4": dict(data=1, fsdp=1, expert=1, tensor=1, sequence=4),
    "sequence2_tensor2": dict(data=1, fsdp=1, expert=1, tensor=2, sequence=2),
}
LENGTHS = (40, 29, 13)  # left-padded to 48: 3 chunks of 16; row 3's first 35 slots are padding


@pytest.fixture(scope="module")
def model():
    return tm.random_model(tm.tiny(rotary_dim=16, rope_theta=1e7), seed=11)


def _prompts(cfg):
    rng = np.random.RandomState(3)
    t = max(LENGTHS)
    ids = np.zeros((len(LENGTHS), t), np.int32)
    mask = np.zeros((len(LENGTHS), t), np.int32)
    for r, n in enumerate(LENGTHS):
        ids[r, t - n :] = rng.randint(0, cfg.vocab_size, n)
        mask[r, t - n :] = 1
    return ids, mask


def _options(cfg, params, sizes):
    n = int(np.prod(list(sizes.values())))
    mesh = sharding.make_mesh(sizes, devices=jax.devices()[:n])
    rules, _ = sharding.load_rules("tp_ep")
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)))
    shardings = sharding.pure_param_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    return jax.device_put(params, shardings), RunOptions(moe_impl="ep", mesh=mesh, rules=rules)


def _run(engine, ids, mask, n=6):
    plan = engine.plan(ids.shape[0], ids.shape[1], n)
    assert plan["chunk"] == CHUNK and plan["padded_prompt"] == 48  # 3 prefill chunks
    logits, _ = engine.prefill(ids, mask, plan)
    return np.asarray(logits), sampling.generate(None, ids, mask, max_new_tokens=n, engine=engine)


@pytest.fixture(scope="module")
def reference(model):
    cfg, params = model.config, model.pure_params()
    ids, mask = _prompts(cfg)
    logits, tokens = _run(sampling.Engine(cfg, params, prefill_chunk=CHUNK), ids, mask)
    # independent check of the reference: each row alone, unpadded, one-shot forward
    for r, n in enumerate(LENGTHS):
        alone, _ = forward(cfg, params, ids[r : r + 1, -n:])
        assert tm.rel_err(logits[r], alone[0, -1]) <= TOL
    return ids, mask, logits, tokens


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sequence_split_generation_equals_one_device(model, reference, mesh_name):
    ids, mask, logits0, tokens0 = reference
    placed, opts = _options(model.config, model.pure_params(), MESHES[mesh_name])
    engine = sampling.Engine(model.config, placed, options=opts, prefill_chunk=CHUNK)
    logits, tokens = _run(engine, ids, mask)
    assert tm.rel_err(logits, logits0) <= TOL
    np.testing.assert_array_equal(tokens, tokens0)


def test_cached_chunks_run_the_sharded_cores_and_decode_steps_do_not(model, monkeypatch):
    """A 16-token chunk goes through the sequence-parallel cores (the lightning one with the
    cache's state as its initial state); a one-token decode step through neither."""
    cfg = model.config
    placed, opts = _options(cfg, model.pure_params(), MESHES["sequence4"])
    seen = []
    for name in ("lightning_core", "cached_softmax_core"):
        real = getattr(sequence, name)

        def spy(*a, _real=real, _name=name, **kw):
            seen.append((_name, a[5] is not None if _name == "lightning_core" else True))
            return _real(*a, **kw)

        monkeypatch.setattr(sequence, name, spy)
    cache = init_cache(cfg, 2, 128, mesh=opts.mesh, rules=opts.rules)
    step = jax.jit(lambda p, i, m, c: forward_cached(cfg, p, i, m, c, opts))
    step.lower(placed, jnp.zeros((2, 16), jnp.int32), jnp.ones((2, 16), jnp.int32), cache)
    assert seen == [("lightning_core", True)] * 7 + [("cached_softmax_core", True)]
    seen.clear()
    step.lower(placed, jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1), jnp.int32), cache)
    assert seen == []


def test_chunk_not_divisible_by_sequence_is_refused_before_compiling(model, monkeypatch):
    placed, opts = _options(model.config, model.pure_params(), MESHES["sequence4"])
    engine = sampling.Engine(model.config, placed, options=opts, prefill_chunk=18)
    monkeypatch.setattr(engine, "prefill", lambda *a: pytest.fail("compiled a prefill"))
    with pytest.raises(ValueError, match=r"--prefill_chunk 18 is not a multiple of the mesh's "):
        sampling.generate(None, np.ones((1, 40), np.int32), max_new_tokens=2, engine=engine)
    # the model-level check, for callers of forward_cached
    cache = init_cache(model.config, 1, 128, mesh=opts.mesh, rules=opts.rules)
    with pytest.raises(ValueError, match=r"sequence=4 does not divide the prefill chunk \(6 "):
        forward_cached(
            model.config,
            placed,
            jnp.zeros((1, 6), jnp.int32),
            jnp.ones((1, 6), jnp.int32),
            cache,
            opts,
        )


def _hand_plans(model, batch):
    """The planner's totals for chunks 16, 32, 64 of a 50-token prompt, bucketed by hand: each
    pads the prompt to 64 tokens and the cache to 128 slots; fp32 weights as loaded."""
    cfg, params = model.config, model.pure_params()
    w = sum(x.nbytes for x in jax.tree.leaves(params))
    return {
        c: memory.plan_inference(
            cfg,
            batch=batch,
            prompt_len=64,
            max_len=128,
            weights=w,
            param_dtype=jnp.float32,
            kv_dtype=jnp.float32,
            prefill_chunk=c,
            attention_impl="blockwise",
        ).total
        for c in (16, 32, 64)
    }


def test_automatic_chunk_is_the_largest_that_fits(model, monkeypatch):
    cfg, params = model.config, model.pure_params()
    totals = _hand_plans(model, 2)
    assert totals[16] < totals[32] < totals[64]
    auto = sampling.Engine(cfg, params)
    given = sampling.Engine(cfg, params, prefill_chunk=64)
    limit = (totals[32] + totals[64]) // 2
    monkeypatch.setattr(sampling, "device_memory_limit", lambda: limit)
    plan = auto.plan(2, 50, 4)
    assert (plan["chunk"], plan["chunk_source"], plan["total"]) == (32, "auto", totals[32])
    assert (plan["padded_prompt"], plan["max_len"]) == (64, 128)
    # an explicit chunk wins over the plan (and is then refused by the memory check)
    plan = given.plan(2, 50, 4)
    assert (plan["chunk"], plan["chunk_source"], plan["total"]) == (64, "given", totals[64])
    with pytest.raises(MemoryError, match="exceeds device memory"):
        given.check_memory(plan)
    monkeypatch.setattr(sampling, "device_memory_limit", lambda: totals[16] - 1)
    assert auto.plan(2, 50, 4)["chunk"] == 16  # nothing fits: the smallest, refused later
    monkeypatch.setattr(sampling, "device_memory_limit", lambda: None)
    assert auto.plan(2, 300, 4)["chunk"] == 256 == sampling.DEFAULT_CHUNK
    # a short prompt's only chunk: the power-of-two bucket
    monkeypatch.setattr(sampling, "device_memory_limit", lambda: 1 << 40)
    assert auto.plan(2, 50, 4)["chunk"] == 64


def test_chunk_candidates_are_multiples_of_the_sequence_size():
    assert sampling.chunk_candidates(50) == [16, 32, 64]
    assert sampling.chunk_candidates(16, 4) == [16]
    assert sampling.chunk_candidates(100, 3) == [18, 36, 72, 144]
    assert sampling.chunk_candidates(100, 32) == [32, 64, 128]


def test_planner_splits_the_chunk_over_sequence(model):
    """With sequence=4 a 64-token chunk costs one device what a 16-token chunk costs unsplit,
    plus the gathered K, V of the whole chunk: 2 x B x 64 x K x H x 4 bytes (fp32)."""
    cfg = model.config
    rules, _ = sharding.load_rules("tp_ep")
    kw = dict(
        batch=2,
        prompt_len=64,
        max_len=128,
        rules=rules,
        param_dtype=jnp.float32,
        kv_dtype=jnp.float32,
        attention_impl="blockwise",
    )
    split = memory.plan_inference(cfg, mesh_shape={"sequence": 4}, prefill_chunk=64, **kw)
    alone = memory.plan_inference(cfg, mesh_shape={"sequence": 1}, prefill_chunk=16, **kw)
    gathered = 2 * 2 * 64 * cfg.num_kv_heads * cfg.head_dim * 4
    assert split.activations == alone.activations + gathered
    assert split.cache == alone.cache  # the KV cache is not split over sequence
