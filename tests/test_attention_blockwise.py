"""pallas_kernels.attention.blockwise against the model's dense masked attention (fp32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.model.attention import causal_padding_mask, dot_product_attention
from pallas_kernels.attention.blockwise import blockwise_attention


def _inputs(seed, b, t, s, n, kh, h, dtype=jnp.float32):
    """Fresh normal q [B,T,N,H], k, v [B,S,K,H] in dtype and an fp32 cotangent [B,T,N,H]."""
    rng = np.random.default_rng(seed)
    q, k, v, cot = (
        rng.standard_normal(shape, np.float32)
        for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h), (b, t, n, h))
    )
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(cot)


def _dense_mask(q_index, kv_index, kv_valid, q_segment=None, kv_segment=None):
    mask = causal_padding_mask(q_index, kv_index, kv_valid)
    if q_segment is not None:
        mask &= q_segment[:, :, None] == kv_segment[:, None, :]
    return mask


def _check(q, k, v, cot, *, tol, grad_tol, block_q=16, block_k=16, **masking):
    """Output and d(sum(out * cot))/d(q, k, v) of blockwise vs dense (fp32 inputs) attention."""
    scale = q.shape[-1] ** -0.5

    def blockwise_loss(q, k, v):
        out = blockwise_attention(q, k, v, scale=scale, block_q=block_q, block_k=block_k, **masking)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    def dense_loss(q, k, v):
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        mask = _dense_mask(
            masking["q_index"],
            masking["kv_index"],
            masking.get("kv_valid", np.ones(k.shape[:2], bool)),
            masking.get("q_segment"),
            masking.get("kv_segment"),
        )
        out = dot_product_attention(q, k, v, mask, scale)
        return jnp.sum(out * cot), out

    grad = jax.value_and_grad(blockwise_loss, argnums=(0, 1, 2), has_aux=True)
    (_, out), grads = jax.jit(grad)(q, k, v)
    grad_ref = jax.value_and_grad(dense_loss, argnums=(0, 1, 2), has_aux=True)
    (_, out_ref), grads_ref = jax.jit(grad_ref)(q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    for got, want, atol in (
        (out, out_ref, tol),
        *zip(grads, grads_ref, [grad_tol] * 3, strict=True),
    ):
        got = np.asarray(got, np.float32)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, np.asarray(want, np.float32), rtol=atol, atol=atol)


def _arange(b, n):
    return np.broadcast_to(np.arange(n, dtype=np.int32), (b, n))


def test_causal_non_multiple_lengths():
    q, k, v, cot = _inputs(0, 2, 100, 100, 4, 4, 8)  # G = 1; GQA below
    idx = _arange(2, 100)
    _check(q, k, v, cot, tol=1e-5, grad_tol=1e-4, q_index=idx, kv_index=idx)


def test_left_padding_rows_see_nothing_before_their_first_token():
    b, t = 3, 50
    q, k, v, cot = _inputs(1, b, t, t, 8, 2, 8)
    idx = _arange(b, t)
    valid = idx >= np.array([0, 13, 37])[:, None]  # padding queries see no key at all
    _check(q, k, v, cot, tol=1e-5, grad_tol=1e-4, q_index=idx, kv_index=idx, kv_valid=valid)


def test_packed_segments_cross_block_borders():
    b, t = 2, 70
    q, k, v, cot = _inputs(2, b, t, t, 4, 2, 8)
    idx = _arange(b, t)
    borders = np.array([[0, 9, 30, 31, 55], [0, 17, 40, 41, 69]])  # starts of documents
    seg = np.sum(idx[:, :, None] >= borders[:, None, :], -1).astype(np.int32)
    valid = idx >= np.array([0, 5])[:, None]
    _check(
        q, k, v, cot, tol=1e-5, grad_tol=1e-4, q_index=idx, kv_index=idx, kv_valid=valid,
        q_segment=seg, kv_segment=seg,
    )  # fmt: skip


def test_prefill_chunk_against_cache_slots():
    b, t, s = 2, 37, 150
    q, k, v, cot = _inputs(3, b, t, s, 8, 2, 8)
    start = np.array([60, 81])[:, None]  # slot of each row's first new token
    q_index = start + _arange(b, t)
    slots = _arange(b, s)
    valid = (slots < start + t) & (slots >= np.array([0, 7])[:, None])  # unwritten: invalid
    _check(
        q, k, v, cot, tol=1e-5, grad_tol=1e-4, block_q=8, block_k=32, q_index=q_index,
        kv_index=slots, kv_valid=valid,
    )  # fmt: skip


def test_decode_step():
    b, s = 3, 150
    q, k, v, cot = _inputs(4, b, 1, s, 8, 2, 8)
    q_index = np.array([[99], [120], [149]], np.int32)
    slots = _arange(b, s)
    valid = (slots <= q_index) & (slots >= np.array([0, 40, 3])[:, None])
    _check(
        q, k, v, cot, tol=1e-5, grad_tol=1e-4, block_k=32, q_index=q_index, kv_index=slots,
        kv_valid=valid,
    )  # fmt: skip


def test_bfloat16_inputs_against_fp32_reference():
    b, t = 2, 100
    q, k, v, cot = _inputs(5, b, t, t, 8, 2, 16, jnp.bfloat16)
    idx = _arange(b, t)
    valid = idx >= np.array([0, 21])[:, None]
    _check(q, k, v, cot, tol=2e-2, grad_tol=5e-2, q_index=idx, kv_index=idx, kv_valid=valid)


def test_rejects_bad_shapes():
    q, k, v, _ = _inputs(6, 1, 4, 4, 3, 2, 8)
    idx = _arange(1, 4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        blockwise_attention(q, k, v, scale=1.0, q_index=idx, kv_index=idx)
    with pytest.raises(ValueError, match="both q_segment and kv_segment"):
        blockwise_attention(q[:, :, :2], k, v, scale=1.0, q_index=idx, kv_index=idx, q_segment=idx)


def _temp_bytes(loss, t):
    q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_grows_linearly_with_length():
    """Forward + backward temp memory: blockwise linear in T = S, the dense reference quadratic."""

    def blockwise_loss(q, k, v):
        idx = _arange(1, q.shape[1])
        out = blockwise_attention(
            q, k, v, scale=0.25, q_index=idx, kv_index=idx, block_q=128, block_k=128
        )
        return jnp.sum(out)

    def dense_loss(q, k, v):
        idx = _arange(1, q.shape[1])
        mask = causal_padding_mask(idx, idx, np.ones(idx.shape, bool))
        return jnp.sum(dot_product_attention(q, k, v, mask, 0.25))

    blockwise = [_temp_bytes(blockwise_loss, t) for t in (1024, 2048, 4096)]
    dense = [_temp_bytes(dense_loss, t) for t in (1024, 4096)]
    assert blockwise[1] <= 2.25 * blockwise[0], blockwise
    assert blockwise[2] <= 4.5 * blockwise[0], blockwise
    assert dense[1] >= 8 * dense[0], dense  # the linear bound above fails a quadratic op
    assert blockwise[2] * 16 < dense[1], (blockwise, dense)
