"""cuDNN prefill chunks against the cache (`minimax_jax.model.attention._cudnn_chunk`) and the
log-sum-exp contract of `pallas_kernels.attention.cudnn.cudnn_attention_lse` it merges through.

On CPU the merging logic runs on the contract's XLA emulation (`emulate=True`, what the module's
`_CUDNN` switch selects off a GPU): a fp32 hand check of the contract itself, then chunked
prefill over left-padded rows (several cache pieces, the last one clamped) equal to the "xla"
reference, and rows whose valid slots have holes taking the blockwise fallback. The GPU tests
hold real cuDNN to the emulation and the whole chunked prefill to "xla" in bf16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_impl import CFG
from test_model import random_model, rel_err

from minimax_jax.model import attention as attn_mod
from minimax_jax.model.cache import init_cache
from minimax_jax.model.decoder import RunOptions, forward, forward_cached
from pallas_kernels.attention import cudnn as cudnn_mod


def _even_only(q, k=None):
    return None if q.shape[1] % 2 == 0 and (k is None or k.shape[1] % 2 == 0) else "odd"


@pytest.fixture
def chunk_on_emulation(monkeypatch):
    """Let "auto" / "cudnn" take `_cudnn_chunk` on CPU, on the emulated contract; record the
    calls (("causal"|"prefix", q_len, kv_len)) and fail on any bias-mask call."""
    calls = []
    real = cudnn_mod.cudnn_attention_lse

    def spy(q, k, v, **kw):
        assert kw["emulate"] is True
        calls.append("causal" if kw.get("causal") else "prefix")
        return real(q, k, v, **kw)

    def no_bias(*a, **kw):
        raise AssertionError("the [B,T,S] bias path ran")

    monkeypatch.setattr(attn_mod, "_CUDNN", "xla")
    monkeypatch.setattr(attn_mod, "cudnn_unsupported", lambda q: None)
    monkeypatch.setattr(attn_mod, "cudnn_lse_unsupported", _even_only)
    monkeypatch.setattr(attn_mod, "cudnn_attention_lse", spy)
    monkeypatch.setattr(jax.nn, "dot_product_attention", no_bias)
    return calls


def test_contract_by_hand():
    """fp32 emulation: lse is the log-sum-exp of the visible scaled logits, queries that see
    nothing give (0, -inf), and two disjoint key sets merge to the whole."""
    rng = np.random.RandomState(0)
    q = rng.standard_normal((2, 4, 2, 8)).astype(np.float32)
    k = rng.standard_normal((2, 6, 1, 8)).astype(np.float32)
    v = rng.standard_normal((2, 6, 1, 8)).astype(np.float32)
    q_len, kv_len = np.array([3, 4], np.int32), np.array([5, 0], np.int32)
    out, lse = cudnn_mod.cudnn_attention_lse(
        q, k, v, scale=0.5, q_len=q_len, kv_len=kv_len, causal=True, emulate=True
    )
    out, lse = np.asarray(out), np.asarray(lse)
    for b in range(2):
        for t in range(4):
            for n in range(2):
                keys = [s for s in range(6) if t < q_len[b] and s < kv_len[b] and s <= t]
                if not keys:
                    assert lse[b, t, n] == -np.inf and not out[b, t, n].any()
                    continue
                z = np.array([0.5 * q[b, t, n] @ k[b, s, 0] for s in keys], np.float64)
                want_lse = np.log(np.exp(z).sum())
                want = (np.exp(z - want_lse)[:, None] * v[b, keys, 0]).sum(0)
                assert abs(lse[b, t, n] - want_lse) <= 1e-5
                np.testing.assert_allclose(out[b, t, n], want, rtol=1e-5, atol=1e-6)
    # keys [0, 2) and [2, 6) of a non-causal call merge to the call over all six
    full, _ = cudnn_mod.cudnn_attention_lse(q, k, v, scale=0.5, emulate=True)
    ones = np.ones(2, np.int32)
    a = cudnn_mod.cudnn_attention_lse(
        q, k[:, :2], v[:, :2], scale=0.5, q_len=4 * ones, kv_len=2 * ones, emulate=True
    )
    b_ = cudnn_mod.cudnn_attention_lse(
        q, k[:, 2:], v[:, 2:], scale=0.5, q_len=4 * ones, kv_len=4 * ones, emulate=True
    )
    merged, _ = attn_mod._merge((a[0].astype(jnp.float32), a[1]), b_)
    assert rel_err(merged, full) <= 1e-6


def _chunked(params, ids, mask, impl, bounds, cache_len=96, runs=False):
    opts = RunOptions(attention_impl=impl, cache_runs=runs)
    step = jax.jit(lambda p, i, m, c: forward_cached(CFG, p, i, m, c, opts))
    cache = init_cache(CFG, ids.shape[0], cache_len)
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        logits, cache = step(params, ids[:, lo:hi], mask[:, lo:hi], cache)
        outs.append(np.asarray(logits))
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("impl, runs", [("auto", False), ("cudnn", False), ("auto", True)])
def test_chunked_prefill_equals_forward(chunk_on_emulation, monkeypatch, impl, runs):
    """Left padding that spans whole chunks (row 1: 21 pad slots) and ends inside one; prefix
    pieces of 14 slots (so pieces split chunks, and the last one, 84..98, is clamped to 82..96);
    with and without the engine's promise of one valid run per row (no fallback compiled)."""
    monkeypatch.setattr(attn_mod, "PIECE", 14)
    params = random_model(CFG, seed=9).pure_params()
    rng = np.random.RandomState(6)
    ids = rng.randint(0, CFG.vocab_size, (3, 92)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :21] = 0
    mask[2, :90] = 0  # only two real tokens, in the last chunk
    full, _ = forward(CFG, params, ids, mask)
    got = _chunked(params, ids, mask, impl, [*range(0, 96, 8)[:-1], 88, 90, 91, 92], runs=runs)
    real = mask[..., None].astype(np.float32)
    assert rel_err(got * real, np.asarray(full) * real) <= 1e-5
    assert "prefix" in chunk_on_emulation and "causal" in chunk_on_emulation


def test_rows_with_holes_take_blockwise(chunk_on_emulation):
    """A valid-slot pattern that is not one run (a pad token inside a row): the lax.cond takes
    the blockwise branch, which must match the xla path chunk by chunk."""
    params = random_model(CFG, seed=10).pure_params()
    rng = np.random.RandomState(7)
    ids = rng.randint(0, CFG.vocab_size, (2, 32)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 12] = 0
    bounds = [0, 8, 16, 24, 32]
    got = _chunked(params, ids, mask, "cudnn", bounds, cache_len=32)
    want = _chunked(params, ids, mask, "xla", bounds, cache_len=32)
    real = mask[..., None].astype(np.float32)
    assert rel_err(got * real, want * real) <= 1e-5


def test_resolution(monkeypatch):
    q = jnp.zeros((1, 8, 4, 32), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((1, 64, 2, 32), jnp.bfloat16)
    if jax.default_backend() == "cpu":
        assert attn_mod.resolve_attention_impl("auto", q, chunk=cache) == "blockwise"
        assert "CUDA GPU" in cudnn_mod.cudnn_lse_unsupported(q)
    monkeypatch.setattr(attn_mod, "cudnn_unsupported", lambda q: None)
    monkeypatch.setattr(attn_mod, "cudnn_lse_unsupported", _even_only)
    assert attn_mod.resolve_attention_impl("auto", q, chunk=cache) == "cudnn"
    assert attn_mod.resolve_attention_impl("auto", q[:, :7], chunk=cache) == "blockwise"
    assert attn_mod.resolve_attention_impl("auto", q[:, :1], chunk=cache) == "xla"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_cudnn_lse_matches_emulation(causal):
    if cudnn_mod.cudnn_lse_unsupported(jnp.zeros((1, 2, 1, 128), jnp.bfloat16)) is not None:
        pytest.skip(cudnn_mod.cudnn_lse_unsupported(jnp.zeros((1, 2, 1, 128), jnp.bfloat16)))
    rng = np.random.RandomState(1)
    b, t, s = 3, 256, 256 if causal else 1024
    q = jnp.asarray(rng.standard_normal((b, t, 8, 128)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, s, 2, 128)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, s, 2, 128)), jnp.bfloat16)
    q_len = jnp.array([t, t - 40, 0], jnp.int32)
    kv_len = jnp.array([s, s - 100, 7]) if not causal else q_len
    got = cudnn_mod.cudnn_attention_lse(
        q, k, v, scale=128**-0.5, q_len=q_len, kv_len=kv_len.astype(jnp.int32), causal=causal
    )
    want = cudnn_mod.cudnn_attention_lse(
        q, k, v, scale=128**-0.5, q_len=q_len, kv_len=kv_len.astype(jnp.int32), causal=causal,
        emulate=True,
    )  # fmt: skip
    lse_g, lse_w = np.asarray(got[1]), np.asarray(want[1])
    assert np.array_equal(np.isfinite(lse_g), np.isfinite(lse_w))
    fin = np.isfinite(lse_w)
    assert np.abs(lse_g[fin] - lse_w[fin]).max() <= 1e-2
    assert rel_err(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32)) <= 2e-2


@pytest.mark.gpu
def test_gpu_chunked_prefill_bf16_matches_xla(monkeypatch):
    """Real cuDNN: 8 chunks of 64 over left-padded rows in bf16 equal the xla path (bf16)."""
    calls = []
    real_lse = attn_mod.cudnn_attention_lse

    def spy(*a, **kw):
        calls.append(kw["emulate"])
        return real_lse(*a, **kw)

    monkeypatch.setattr(attn_mod, "cudnn_attention_lse", spy)
    params = random_model(CFG, seed=11).pure_params()
    rng = np.random.RandomState(8)
    ids = rng.randint(0, CFG.vocab_size, (2, 512)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :77] = 0
    bounds = list(range(0, 513, 64))
    outs = {}
    for impl in ("auto", "xla"):
        opts = RunOptions(attention_impl=impl)
        step = jax.jit(lambda p, i, m, c, o=opts: forward_cached(CFG, p, i, m, c, o, jnp.bfloat16))
        cache = init_cache(CFG, 2, 576, jnp.bfloat16)
        parts = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            logits, cache = step(params, ids[:, lo:hi], mask[:, lo:hi], cache)
            parts.append(np.asarray(logits, np.float32))
        outs[impl] = np.concatenate(parts, axis=1)
    assert calls and not any(calls)  # "auto" ran the split on real cuDNN
    real = mask > 0
    err = np.linalg.norm(outs["auto"] - outs["xla"], axis=-1) / np.linalg.norm(outs["xla"], axis=-1)
    assert np.median(err[real]) <= 2e-2
    assert err[real].max() <= 5e-2
