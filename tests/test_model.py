"""The model against an independent float64 NumPy implementation, plus full-size shape checks.

Covers what transformers cannot: partial RoPE (rotary_dim = head_dim / 2, theta 1e7), the remote
slope formula (power-of-2 and non-power-of-2 head counts), postnorm=false, tied embeddings, and
the dense vs sorted MoE paths. Parity with transformers itself is in test_transformers_parity.py.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import numpy_model
import pytest
from flax import nnx

from minimax_jax import MiniMaxForCausalLM, ModelConfig
from minimax_jax.model.decoder import RunOptions, forward

TOL = 1e-5


def random_model(cfg: ModelConfig, seed: int = 0, **kw) -> MiniMaxForCausalLM:
    """A model with N(0, 0.1) weights and norm weights drawn around 1 (never all ones)."""
    model = MiniMaxForCausalLM(cfg.replace(initializer_range=0.1), rngs=nnx.Rngs(seed), **kw)
    rng = np.random.RandomState(seed + 1)
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)

    def perturb(path, leaf):
        if "norm" in jax.tree_util.keystr(path):
            return leaf + 0.3 * rng.standard_normal(leaf.shape).astype(leaf.dtype)
        return leaf

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(perturb, pure))
    nnx.update(model, state)
    return model


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "NaN/inf in output"
    return float(np.abs(a - b).max() / np.abs(b).max())


def tiny(**changes) -> ModelConfig:
    return ModelConfig.preset("tiny-remote").replace(**changes)


CASES = {
    "partial_rope_theta_1e7": dict(rotary_dim=16, rope_theta=1e7),
    "postnorm_false": dict(postnorm=False, rotary_dim=16),
    "non_pow2_heads_remote_slopes": dict(num_heads=6, num_kv_heads=3, rotary_dim=32),
    "tied_embeddings_full_rope": dict(tie_word_embeddings=True, rotary_dim=32),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("moe_impl", ["sorted", "dense"])
def test_matches_numpy_reference(case, moe_impl):
    cfg = tiny(**CASES[case])
    model = random_model(cfg, options=RunOptions(moe_impl=moe_impl))
    params = model.pure_params()
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, 37))  # 3 lightning blocks of 16
    got = model(ids)[0]
    slope_fn = (
        numpy_model.native_slopes if cfg.slope_formula == "native" else numpy_model.remote_slopes
    )
    want = numpy_model.forward(cfg, params, ids[0], slope_fn)
    assert rel_err(got, want) <= TOL


def test_padded_expert_ffn_matches_numpy_reference():
    """RunOptions(gmm_impl="padded"), what "auto" runs on GPU for bf16, in the whole model."""
    cfg = tiny(**CASES["partial_rope_theta_1e7"])
    model = random_model(cfg, options=RunOptions(gmm_impl="padded"))
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 21))
    want = [numpy_model.forward(cfg, model.pure_params(), row, numpy_model.remote_slopes)
            for row in ids]  # fmt: skip
    got = model(ids)  # logits [B,T,V]
    assert got.shape == (2, 21, cfg.vocab_size) and rel_err(got, np.stack(want)) <= TOL
    with pytest.raises(ValueError, match="gmm_impl"):
        RunOptions(gmm_impl="cublas")


def test_left_padding_rows_equal_unpadded_runs():
    cfg = tiny(rotary_dim=16, rope_theta=1e7)
    model = random_model(cfg, seed=3)
    rng = np.random.RandomState(1)
    lengths = [40, 17, 5]
    ids = np.zeros((3, 40), np.int32)
    mask = np.zeros((3, 40), np.int32)
    for i, n in enumerate(lengths):
        ids[i, 40 - n :] = rng.randint(0, cfg.vocab_size, n)
        ids[i, : 40 - n] = rng.randint(0, cfg.vocab_size, 40 - n)  # garbage under the pad
        mask[i, 40 - n :] = 1
    batched = model(ids, mask)
    for i, n in enumerate(lengths):
        alone = model(ids[i : i + 1, 40 - n :])
        assert rel_err(batched[i, 40 - n :], alone[0]) <= TOL


def test_bfloat16_compute_close_to_fp32():
    cfg = tiny()
    model = random_model(cfg, seed=5)
    ids = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 20))
    ref = model(ids)
    low = model(ids, compute_dtype=jnp.bfloat16)
    assert low.dtype == jnp.float32
    assert np.all(np.isfinite(low))
    # Per-token relative L2 error: bf16 rounding (and the odd flipped top-2 routing) stays small.
    ref, low = np.asarray(ref), np.asarray(low)
    err = np.linalg.norm(low - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert np.median(err) <= 3e-2
    assert (low.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


def test_bad_inputs_raise_clear_errors():
    cfg = tiny()
    model = random_model(cfg)
    with pytest.raises(ValueError, match="token ids must be in"):
        model(np.array([[0, cfg.vocab_size]]))
    with pytest.raises(ValueError, match="batch, length"):
        model(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(np.array([[1, 2, 3]]), np.array([[1, 1]]))
    with pytest.raises(TypeError, match="integers"):
        model(np.array([[1.0, 2.0]]))


@pytest.mark.parametrize("name", ["minimax-m1-80k", "minimax-text-01"])
def test_full_size_parameter_count_by_eval_shape(name):
    cfg = ModelConfig.preset(name)
    abstract = nnx.eval_shape(
        lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    )
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    total = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    assert total == 456_089_655_296 == cfg.param_count()
    bytes_ = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    assert bytes_ == 912_210_767_872  # the M1 index's total_size (router gates fp32)
    assert round(cfg.active_param_count() / 1e9, 1) == 45.9


def test_80_layer_forward_lowers_quickly_from_abstract_inputs():
    """The stack is scanned: lowering the full model compiles one 8-layer block, not 80 layers."""
    cfg = ModelConfig.preset("minimax-text-01")
    abstract = nnx.eval_shape(
        lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    )
    params = abstract.pure_params()
    ids = jax.ShapeDtypeStruct((1, 2048), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 2048), jnp.int32)
    start = time.perf_counter()
    lowered = jax.jit(forward, static_argnums=(0,)).lower(cfg, params, ids, mask)
    elapsed = time.perf_counter() - start
    text = lowered.as_text()
    assert elapsed < 60, f"lowering took {elapsed:.1f}s"
    assert "while" in text or "scan" in text  # a loop over blocks survives in the HLO
    # Unrolled, the module would hold 80 copies of the block's einsums; scanned it holds one block.
    assert text.count("dot_general") < 200


def test_packed_segments_equal_separate_documents():
    """Packing: each document in a segment_ids-packed row equals that document run alone."""
    cfg = tiny(rotary_dim=16, rope_theta=1e7)
    model = random_model(cfg, seed=4)
    params = model.pure_params()
    rng = np.random.RandomState(6)
    lengths = [21, 3, 16]  # crosses lightning blocks of 16 mid-document
    docs = [rng.randint(0, cfg.vocab_size, n) for n in lengths]
    ids = np.concatenate(docs)[None].astype(np.int32)
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int32)
    packed, _ = forward(cfg, params, ids, segment_ids=seg)
    start = 0
    for doc in docs:
        alone, _ = forward(cfg, params, doc[None].astype(np.int32))
        assert rel_err(packed[0, start : start + len(doc)], alone[0]) <= TOL
        start += len(doc)
