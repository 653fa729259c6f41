"""Softmax-layer implementations (`RunOptions.attention_impl`): "xla" (the reference),
"blockwise" (online softmax over key blocks) and cuDNN flash attention, and what "auto" picks.

"blockwise" must give the "xla" path's logits and gradients for plain, left-padded and packed
rows, and chunked prefill over the cache. On CPU the cuDNN path's own arguments are checked by
running them through `jax.nn.dot_product_attention(implementation="xla")` (the module's `_CUDNN`
switch): the mask layout, the causal shortcut, the GQA head grouping and the cached-prefill mask
over cache slots must give the "xla" path's logits and gradients. The GPU tests run real cuDNN
against "xla".
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import random_model, rel_err, tiny

from minimax_jax.model import attention as attn_mod
from minimax_jax.model.cache import init_cache
from minimax_jax.model.decoder import RunOptions, forward, forward_cached
from minimax_jax.training.run_config import ConfigError, TrainConfig, validate

# one lightning + one softmax layer (GQA 4 q / 2 kv heads, partial RoPE): the softmax path is
# what differs between the implementations
CFG = tiny(
    rotary_dim=16, rope_theta=1e7, num_layers=2, layer_types=("linear_attention", "full_attention")
)


def _inputs(kind: str, rng: np.random.RandomState):
    """(ids, attention_mask, segment_ids) for a plain causal batch, left padding, packed rows."""
    ids = rng.randint(0, CFG.vocab_size, (2, 37)).astype(np.int32)
    if kind == "plain":
        return ids, None, None
    if kind == "left_padded":
        mask = np.ones_like(ids)
        mask[0, :11] = 0
        return ids, mask, None
    seg = np.stack([np.repeat([1, 2, 3], [20, 1, 16]), np.repeat([4, 5], [5, 32])]).astype(np.int32)
    return ids, None, seg


@pytest.fixture
def cudnn_args_on_xla(monkeypatch):
    """Route "cudnn" through jax.nn.dot_product_attention's XLA implementation on CPU; record
    which form each call took ("causal": the built-in causal mask, "mask": the boolean bias)."""
    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        assert kwargs["implementation"] == "xla"
        calls.append("causal" if kwargs.get("is_causal") else "mask")
        return real(*args, **kwargs)

    monkeypatch.setattr(attn_mod, "_CUDNN", "xla")
    monkeypatch.setattr(attn_mod, "cudnn_unsupported", lambda q: None)
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    return calls


def _logits_and_grads(kind: str, impl: str, compute_dtype=None):
    """Logits [B,T,V], every parameter's gradient of a weighted logit sum, and the real-token
    weights [B,T,1] (left-padding positions' logits are unused, as in training)."""
    params = random_model(CFG, seed=7).pure_params()
    ids, mask, seg = _inputs(kind, np.random.RandomState(3))
    real = np.ones((2, 37, 1), np.float32) if mask is None else mask[..., None].astype(np.float32)
    w = np.random.RandomState(4).standard_normal((2, 37, CFG.vocab_size)).astype(np.float32)
    w = jnp.asarray(w * real)

    def loss(p):
        opts = RunOptions(attention_impl=impl)
        logits, _ = forward(CFG, p, ids, mask, opts, compute_dtype, segment_ids=seg)
        return jnp.sum(logits * w), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads, real


@pytest.mark.parametrize(
    "kind, form", [("plain", "causal"), ("left_padded", "mask"), ("packed", "mask")]
)
def test_cudnn_arguments_match_xla_logits_and_grads(cudnn_args_on_xla, kind, form):
    want, g_want, real = _logits_and_grads(kind, "xla")
    assert cudnn_args_on_xla == []
    got, g_got, _ = _logits_and_grads(kind, "cudnn")
    assert set(cudnn_args_on_xla) == {form}
    assert rel_err(got * real, want * real) <= 1e-5
    for got_leaf, want_leaf in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        assert rel_err(got_leaf, want_leaf) <= 1e-5


def test_cudnn_cached_prefill_matches_xla(cudnn_args_on_xla):
    """Prefill chunks attend over the cache slots through the mask; one-row steps stay on xla."""
    model = random_model(CFG, seed=8)
    params = model.pure_params()
    ids, mask, _ = _inputs("left_padded", np.random.RandomState(5))
    outs = {}
    for impl in ("xla", "cudnn"):
        opts = RunOptions(attention_impl=impl)
        cache = init_cache(CFG, 2, 48)
        first, cache = forward_cached(CFG, params, ids[:, :30], mask[:, :30], cache, opts)
        second, cache = forward_cached(CFG, params, ids[:, 30:], mask[:, 30:], cache, opts)
        step, _ = forward_cached(CFG, params, ids[:, :1], np.ones((2, 1), np.int32), cache, opts)
        outs[impl] = (first, second, step)
    assert cudnn_args_on_xla == ["mask", "mask"]  # the two prefill chunks, not the step
    for got, want in zip(outs["cudnn"], outs["xla"], strict=True):
        assert rel_err(got, want) <= 1e-5


def test_auto_and_refusals(monkeypatch):
    q = jnp.zeros((1, 8, 4, 32), jnp.bfloat16)
    resolve = attn_mod.resolve_attention_impl
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match=r'attention_impl="cudnn" needs a CUDA GPU'):
            resolve("cudnn", q)
        # no GPU: every multi-row call takes the linear-memory path
        assert resolve("auto", q) == "blockwise"
        assert resolve("auto", q, causal=True) == "blockwise"
    assert resolve("auto", q[:, :1]) == "xla"  # decode step: [B,1,S] logits
    assert resolve("cudnn", q[:, :1]) == "xla"
    assert resolve("blockwise", q[:, :1]) == "blockwise"
    assert resolve("xla", q) == "xla"
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        resolve("flash", q)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        RunOptions(attention_impl="flash")
    cfg = TrainConfig()
    model = dataclasses.replace(cfg.model, preset="tiny-remote", attention_impl="flash")
    with pytest.raises(ConfigError, match="model.attention_impl must be one of auto, xla, blockw"):
        validate(dataclasses.replace(cfg, model=model))
    # where cuDNN can run: plain causal calls take it, masked ones (padding, packing, cache
    # slots) keep the linear-memory path instead of cuDNN's [B,T,S] bias
    monkeypatch.setattr(attn_mod, "cudnn_unsupported", lambda q: None)
    assert resolve("auto", q, causal=True) == "cudnn"
    assert resolve("auto", q) == "blockwise"


@pytest.mark.parametrize("kind", ["plain", "left_padded", "packed"])
def test_blockwise_matches_xla_logits_and_grads(kind):
    want, g_want, real = _logits_and_grads(kind, "xla")
    got, g_got, _ = _logits_and_grads(kind, "blockwise")
    assert rel_err(got * real, want * real) <= 1e-5
    for got_leaf, want_leaf in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        assert rel_err(got_leaf, want_leaf) <= 1e-5


@pytest.mark.parametrize("impl", ["xla", "blockwise", "cudnn"])
def test_chunked_prefill_equals_one_shot_forward(impl, monkeypatch):
    """Nine prefill chunks (the last one short) over a left-padded batch, then decode steps,
    equal one full forward: on every attention path ("cudnn" with its arguments on xla)."""
    if impl == "cudnn":
        monkeypatch.setattr(attn_mod, "_CUDNN", "xla")
        monkeypatch.setattr(attn_mod, "cudnn_unsupported", lambda q: None)
    params = random_model(CFG, seed=9).pure_params()
    rng = np.random.RandomState(6)
    ids = rng.randint(0, CFG.vocab_size, (2, 75)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :13] = 0
    full, _ = forward(CFG, params, ids, mask)
    opts = RunOptions(attention_impl=impl)
    step = jax.jit(lambda p, i, m, c: forward_cached(CFG, p, i, m, c, opts))
    cache = init_cache(CFG, 2, 96)
    outs, bounds = [], [*range(0, 72, 8), 72, 73, 74, 75]  # 9 chunks, then 3 one-row steps
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        logits, cache = step(params, ids[:, lo:hi], mask[:, lo:hi], cache)
        outs.append(np.asarray(logits))
    got = np.concatenate(outs, axis=1)
    real = mask[..., None].astype(np.float32)
    assert rel_err(got * real, np.asarray(full) * real) <= 1e-5


def test_cudnn_unsupported_reasons(monkeypatch):
    monkeypatch.setattr(attn_mod.jax, "default_backend", lambda: "gpu")
    assert attn_mod.cudnn_unsupported(jnp.zeros((1, 8, 4, 128), jnp.bfloat16)) is None
    assert "bfloat16 or float16" in attn_mod.cudnn_unsupported(jnp.zeros((1, 8, 4, 128)))
    assert "head dim" in attn_mod.cudnn_unsupported(jnp.zeros((1, 8, 4, 36), jnp.float16))
    assert "head dim" in attn_mod.cudnn_unsupported(jnp.zeros((1, 8, 4, 256), jnp.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["plain", "left_padded", "packed"])
def test_gpu_cudnn_matches_xla_bf16(kind):
    """bf16 compute (fp32 params), as training runs: logits and parameter gradients."""
    got, g_got, real = _logits_and_grads(kind, "cudnn", jnp.bfloat16)
    want, g_want, _ = _logits_and_grads(kind, "xla", jnp.bfloat16)
    err = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert np.median(err[real[..., 0] > 0]) <= 2e-2
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 5e-2 * np.linalg.norm(b) + 1e-6
