"""Generation is exact: cached prefill/decode equal full forwards, padded batches equal rows alone,
greedy tokens equal greedy decoding by repeated full forwards of transformers (no cache)."""

import jax
import numpy as np
import pytest
import test_model as tm

from minimax_jax.inference import engine as sampling
from minimax_jax.model.cache import init_cache
from minimax_jax.model.decoder import RunOptions, forward, forward_cached

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_model():
    # Lightning block 16 and a prefill chunk of 16 below: prompts span several blocks and chunks.
    return tm.random_model(tm.tiny(rotary_dim=16, rope_theta=1e7), seed=11)


@pytest.fixture(scope="module")
def engine(tiny_model):
    """One engine (and its compiled functions) shared by the tests below."""
    return sampling.Engine(tiny_model.config, tiny_model.pure_params(), prefill_chunk=16)


def test_every_decode_step_equals_full_forward(tiny_model):
    cfg, params = tiny_model.config, tiny_model.pure_params()
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 45)).astype(np.int32)
    full, _ = forward(cfg, params, ids)
    cache = init_cache(cfg, 2, 64)
    step = jax.jit(lambda p, i, m, c: forward_cached(cfg, p, i, m, c))
    outs = []
    for lo, hi in [(0, 13), (13, 29)] + [(t, t + 1) for t in range(29, 45)]:
        logits, cache = step(params, ids[:, lo:hi], np.ones((2, hi - lo), np.int32), cache)
        outs.append(np.asarray(logits))
    assert tm.rel_err(np.concatenate(outs, axis=1), full) <= TOL
    assert int(cache["index"]) == 45 and cache["positions"].tolist() == [45, 45]


def test_chunked_prefill_equals_one_shot(tiny_model):
    cfg, params = tiny_model.config, tiny_model.pure_params()
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 70))
    mask = np.ones_like(ids)
    chunked = sampling.Engine(cfg, params, prefill_chunk=16)
    one_shot = sampling.Engine(cfg, params, prefill_chunk=128)
    plan_c, plan_o = chunked.plan(1, 70, 4), one_shot.plan(1, 70, 4)
    assert plan_c["chunk"] == 16 and plan_o["chunk"] == 128
    logits_c, _ = chunked.prefill(ids, mask, plan_c)
    logits_o, _ = one_shot.prefill(ids, mask, plan_o)
    full, _ = forward(cfg, params, ids.astype(np.int32))
    assert tm.rel_err(logits_c, full[:, -1]) <= TOL
    assert tm.rel_err(logits_o, full[:, -1]) <= TOL


def greedy_by_full_forward(logits_fn, ids, n):
    """Greedy decoding with no cache: a full forward over the whole sequence for every token.

    The model is causal, so the sequence is right-filled to a fixed length (one compiled shape)
    and the logits are read at the last real token.
    """
    b, t = np.shape(ids)
    seq = np.zeros((b, t + n), np.int64)
    seq[:, :t] = ids
    for i in range(n):
        seq[:, t + i] = np.asarray(logits_fn(seq))[:, t + i - 1].argmax(-1)
    return seq[:, t:]


def test_greedy_equals_repeated_full_forward(tiny_model, engine):
    cfg, params = tiny_model.config, tiny_model.pure_params()
    ids = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 20))
    fwd = jax.jit(lambda s: forward(cfg, params, s)[0])
    want = greedy_by_full_forward(lambda s: fwd(s.astype(np.int32)), ids, 24)
    got = sampling.generate(tiny_model, ids, max_new_tokens=24, engine=engine)
    np.testing.assert_array_equal(got, want)
    streamed = np.stack(list(sampling.generate_stream(engine, ids, max_new_tokens=24)), axis=1)
    np.testing.assert_array_equal(streamed, want)


def test_padded_batch_equals_rows_alone(tiny_model, engine):
    rng = np.random.RandomState(3)
    lengths, t = [33, 7, 18], 33
    ids = rng.randint(0, tiny_model.config.vocab_size, (3, t))
    mask = (np.arange(t)[None] >= t - np.array(lengths)[:, None]).astype(np.int32)
    batched = sampling.generate(tiny_model, ids, mask, max_new_tokens=12, engine=engine)
    for i, n in enumerate(lengths):
        row = ids[i : i + 1, t - n :]
        alone = sampling.generate(tiny_model, row, max_new_tokens=12, engine=engine)
        np.testing.assert_array_equal(batched[i], alone[0])


def test_eos_fills_the_rest_and_sampling_is_seeded(tiny_model, engine):
    ids = np.random.RandomState(4).randint(0, tiny_model.config.vocab_size, (2, 9))
    greedy = sampling.generate(tiny_model, ids, max_new_tokens=10, engine=engine)
    eos = int(greedy[0, 3])
    stopped = sampling.generate(tiny_model, ids, max_new_tokens=10, eos_token_id=eos, engine=engine)
    first = int(np.argmax(greedy[0] == eos))
    np.testing.assert_array_equal(stopped[0, : first + 1], greedy[0, : first + 1])
    assert np.all(stopped[0, first:] == eos)
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, engine=engine)
    a = sampling.generate(tiny_model, ids, seed=1, **kw)
    b = sampling.generate(tiny_model, ids, seed=1, **kw)
    c = sampling.generate(tiny_model, ids, seed=2, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_decode_loop_variants_are_exact(tiny_model, engine):
    """The default engine (16 steps between stop checks, unrolled block scan in decode, the
    gathered-weight MoE up to num_experts // 2 assignments) gives the same tokens as one step per
    check with grouped matmuls only, and as other chunkings (also when eos stops every row
    inside a chunk)."""
    cfg, params = tiny_model.config, tiny_model.pure_params()
    ids = np.random.RandomState(6).randint(0, cfg.vocab_size, (2, 9))
    greedy = sampling.generate(tiny_model, ids, max_new_tokens=11, engine=engine)
    eos = int(greedy[0, 5])
    variants = (
        sampling.Engine(cfg, params, prefill_chunk=16, sync_every=1,
                        options=RunOptions(moe_gather_rows=0)),
        sampling.Engine(cfg, params, prefill_chunk=16, sync_every=3,
                        options=RunOptions(moe_gather_rows=4)),
    )  # fmt: skip
    for rows in (ids, ids[:1]):  # one row: every row stops, inside a chunk
        for eos_id in (None, eos):
            kw = dict(max_new_tokens=11, eos_token_id=eos_id)
            want = sampling.generate(tiny_model, rows, engine=engine, **kw)
            for variant in variants:
                got = sampling.generate(tiny_model, rows, engine=variant, **kw)
                np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="sync_every"):
        sampling.Engine(cfg, params, sync_every=0)


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = np.random.RandomState(5).randn(4, 50).astype(np.float32)
    key = jax.random.key(0)
    greedy = logits.argmax(-1)
    for sp in (sampling.SamplingParams(1.0, top_k=1), sampling.SamplingParams(1.0, top_p=1e-6)):
        np.testing.assert_array_equal(np.asarray(sampling.sample_token(logits, key, sp)), greedy)


def test_bad_requests_raise(tiny_model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling.generate(tiny_model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="left padding"):
        sampling.generate(tiny_model, [[1, 2]], [[1, 0]], max_new_tokens=2)
    with pytest.raises(ValueError, match="token ids"):
        sampling.generate(tiny_model, [[1, 10**6]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(tiny_model, [[1, 2]], max_new_tokens=2, temperature=1.0, top_p=1.5)


def test_memory_estimate_refuses_what_cannot_fit(tiny_model, monkeypatch):
    engine = sampling.Engine(tiny_model.config, tiny_model.pure_params())
    plan = engine.plan(2, 100, 20)
    assert plan["cache"] > 0 and plan["weights"] > 0
    monkeypatch.setattr(sampling, "device_memory_limit", lambda: plan["total"] - 1)
    with pytest.raises(MemoryError, match="exceeds device memory"):
        engine.check_memory(plan)


@pytest.mark.torch
def test_greedy_equals_transformers_repeated_forward(tmp_path):
    torch = pytest.importorskip("torch")
    import test_transformers_parity as tp

    ref, ours = tp.build(tmp_path, tp.hf_config(tp.PATTERNS["two_7plus1_blocks"]), seed=5)
    ids = np.random.RandomState(6).randint(0, 384, (1, 21))  # 21 + 32 tokens: 4 lightning blocks
    with torch.no_grad():
        want = greedy_by_full_forward(
            lambda s: ref(torch.as_tensor(s, dtype=torch.long)).logits.numpy(), ids, 32
        )
    engine = sampling.Engine(ours.config, ours.pure_params(), prefill_chunk=16)
    np.testing.assert_array_equal(
        sampling.generate(ours, ids, max_new_tokens=32, engine=engine), want
    )


def test_generation_on_a_mesh_equals_one_device(tiny_model):
    """TP + EP inference on 8 simulated devices: sharded params and caches, same greedy tokens."""
    from flax import nnx

    from minimax_jax import MiniMaxForCausalLM
    from minimax_jax.model.decoder import RunOptions
    from minimax_jax.sharding import load_rules, make_mesh

    rules, _ = load_rules("tp_ep")
    mesh = make_mesh({"data": 1, "fsdp": 1, "expert": 2, "tensor": 4})
    opts = RunOptions(moe_impl=rules.moe_impl, mesh=mesh, rules=rules)
    sharded = MiniMaxForCausalLM(tiny_model.config, rngs=nnx.Rngs(0), options=opts, mesh=mesh,
                                 rules=rules)  # fmt: skip
    params = jax.device_put(tiny_model.pure_params(), jax.tree.map(
        lambda x: x.sharding, sharded.pure_params()))  # fmt: skip
    engine = sampling.Engine(tiny_model.config, params, options=opts, prefill_chunk=16)
    ids = np.random.RandomState(8).randint(0, tiny_model.config.vocab_size, (2, 21))
    got = sampling.generate(None, ids, max_new_tokens=10, engine=engine)
    want = sampling.generate(tiny_model, ids, max_new_tokens=10)
    np.testing.assert_array_equal(got, want)
    cache_leaf = engine.prefill(ids, np.ones_like(ids), engine.plan(2, 21, 10))[1]["blocks"][0]
    assert len(cache_leaf["state"].sharding.device_set) == 8
