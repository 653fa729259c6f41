"""The capacity-padded expert FFN (batched GEMMs, lax.switch over capacities) against a
per-assignment fp32 reference: values and gradients, unused rows, the fallback branch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimax_jax.model import moe
from minimax_jax.model.moe import ffn_implementation, moe_dense, moe_sorted
from minimax_jax.model.moe_padded import expert_ffn_padded
from pallas_kernels.moe import padded

D, F, E = 24, 40, 6


def _reference(x, expert, wi, wo, k):
    """Row a: token a // k through expert[a]'s SwiGLU FFN (0 where expert[a] == E)."""
    e = jnp.clip(expert, 0, E - 1)
    xa = jnp.repeat(x, k, axis=0)
    h = jnp.einsum("ad,adcf->acf", xa, wi[e], precision="highest")
    y = jnp.einsum("af,afd->ad", jax.nn.silu(h[:, 0]) * h[:, 1], wo[e], precision="highest")
    return jnp.where((expert < E)[:, None], y, 0)


def _weights(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(k1, (E, D, 2, F)) / 5, jax.random.normal(k2, (E, F, D)) / 6)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a))
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _check(x, expert, k, *, group_rows=None, tol=1e-5):
    wi, wo = _weights(1)
    dy = jax.random.normal(jax.random.key(2), (expert.shape[0], D))

    def loss(fn):
        return lambda x, wi, wo: jnp.sum(fn(x, wi, wo) * dy)

    def ours(x, wi, wo):
        return expert_ffn_padded(x, expert, wi, wo, k=k, group_rows=group_rows, fallback="xla")

    got = jax.jit(ours)(x, wi, wo)
    want = _reference(x, expert, wi, wo, k)
    assert got.shape == want.shape and _rel(got, want) < tol
    assert np.all(np.asarray(got)[np.asarray(expert) == E] == 0)
    g = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, wi, wo)
    g0 = jax.grad(loss(lambda x, wi, wo: _reference(x, expert, wi, wo, k)), argnums=(0, 1, 2))(
        x, wi, wo
    )
    for a, b in zip(g, g0, strict=True):
        assert _rel(a, b) < tol


def _caps_index(expert, a, group_rows=None):
    gs = np.bincount(np.asarray(expert)[np.asarray(expert) < E], minlength=E)
    caps = padded.capacities(group_rows or -(-a // E))
    return int(padded.choose(jnp.asarray(gs), caps)), len(caps)


def test_balanced_top2_takes_a_padded_branch():
    m, k = 48, 2
    x = jax.random.normal(jax.random.key(0), (m, D))
    expert = jnp.asarray(np.random.RandomState(0).permutation(np.arange(m * k) % E), jnp.int32)
    which, n = _caps_index(expert, m * k)
    assert which < n
    _check(x, expert, k)


def test_unused_rows_and_k1():
    """The expert-parallel receive buffer: k=1, a tail of unused rows (expert == E) holding
    garbage; group_rows sizes the ladder for the used rows."""
    rng = np.random.RandomState(1)
    used, rows = 70, 128
    expert = np.full(rows, E, np.int32)
    expert[:used] = rng.randint(0, E, used)
    rng.shuffle(expert)
    x = jax.random.normal(jax.random.key(3), (rows, D)) * 3
    which, n = _caps_index(expert, rows, group_rows=-(-used // E))
    assert which < n
    _check(x, jnp.asarray(expert), 1, group_rows=-(-used // E))


def test_skewed_groups_take_the_fallback():
    m, k = 40, 2
    expert = np.zeros(m * k, np.int32)
    expert[::7] = 3  # expert 0 holds ~6x its share: beyond the ladder
    which, n = _caps_index(expert, m * k)
    assert which == n
    _check(jax.random.normal(jax.random.key(4), (m, D)), jnp.asarray(expert), k)


def test_moe_sorted_padded_matches_dense():
    k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
    wi, wo = _weights(6)
    params = {"router": jax.random.normal(k1, (D, E)), "wi": wi, "wo": wo}
    x = jax.random.normal(k2, (64, D))
    y, logits = jax.jit(lambda p, x: moe_sorted(p, x, 2, implementation="padded"))(params, x)
    y0, logits0 = moe_dense(params, x, 2)
    assert _rel(y, y0) < 1e-5 and _rel(logits, logits0) < 1e-6
    dy = jax.random.normal(k3, y.shape)

    def grads(fn):
        return jax.grad(lambda p, x: jnp.sum(fn(p, x)[0] * dy), argnums=(0, 1))(params, x)

    got = jax.jit(lambda p, x: grads(lambda p, x: moe_sorted(p, x, 2, implementation="padded")))(
        params, x
    )
    want = grads(lambda p, x: moe_dense(p, x, 2))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert _rel(a, b) < 1e-5


def test_bf16_close_to_fp32_reference():
    m, k = 64, 2
    x = jax.random.normal(jax.random.key(7), (m, D))
    expert = jnp.asarray(np.random.RandomState(2).randint(0, E, m * k), jnp.int32)
    wi, wo = _weights(8)
    got = expert_ffn_padded(x.astype(jnp.bfloat16), expert, wi.astype(jnp.bfloat16),
                            wo.astype(jnp.bfloat16), k=k, fallback="xla")  # fmt: skip
    assert got.dtype == jnp.bfloat16
    assert _rel(got, _reference(x, expert, wi, wo, k)) < 3e-2


def test_bad_shapes_raise():
    wi, wo = _weights(0)
    with pytest.raises(ValueError, match="M\\*k"):
        expert_ffn_padded(jnp.ones((4, D)), jnp.zeros((9,), jnp.int32), wi, wo, k=2)


def test_auto_means_padded_only_on_gpu_with_16_bit_operands(monkeypatch):
    assert ffn_implementation("auto", jnp.bfloat16) == "auto"  # CPU: the grouped-matmul API's
    assert ffn_implementation("auto", jnp.float32) == "auto"
    monkeypatch.setattr(moe, "resolve_implementation", lambda name: "gpu")
    assert ffn_implementation("auto", jnp.bfloat16) == "padded"
    assert ffn_implementation("auto", jnp.float16) == "padded"
    assert ffn_implementation("auto", jnp.float32) == "auto"  # the kernels take 16-bit only
    for name in ("xla", "gpu", "padded"):
        assert ffn_implementation(name, jnp.bfloat16) == name
    monkeypatch.setattr(moe, "resolve_implementation", lambda name: "tpu")
    assert ffn_implementation("auto", jnp.bfloat16) == "auto"


@pytest.mark.gpu
def test_gpu_auto_moe_sorted_bf16_matches_dense():
    """On GPU "auto" with bf16 takes the padded path; it matches the dense fp32 layer."""
    k1, k2 = jax.random.split(jax.random.key(12))
    wi, wo = _weights(13)
    params = {"router": jax.random.normal(k1, (D, E)), "wi": wi, "wo": wo}
    x = jax.random.normal(k2, (256, D))
    assert ffn_implementation("auto", jnp.bfloat16) == "padded"
    bf = jax.tree.map(lambda t: t.astype(jnp.bfloat16), {"p": params, "x": x})
    y, _ = jax.jit(lambda p, x: moe_sorted(p, x, 2))(bf["p"], bf["x"])
    y0, _ = moe_dense(jax.tree.map(lambda t: t.astype(jnp.float32), bf["p"]),
                      bf["x"].astype(jnp.float32), 2)  # fmt: skip
    assert _rel(y, y0) < 3e-2


@pytest.mark.gpu
def test_gpu_bf16_both_branches():
    """On GPU: cuBLAS batched GEMMs (balanced) and the Mosaic grouped kernels inside the same
    switch (skewed), bf16, values and gradients against the fp32 reference."""
    wi, wo = _weights(9)
    m, k = 256, 2
    x = jax.random.normal(jax.random.key(10), (m, D))
    bal = np.random.RandomState(3).permutation(np.arange(m * k) % E).astype(np.int32)
    skew = np.where(np.arange(m * k) % 5 == 0, 2, 0).astype(np.int32)
    for expert in (bal, skew):
        expert = jnp.asarray(expert)
        bf = [t.astype(jnp.bfloat16) for t in (x, wi, wo)]
        dy = jax.random.normal(jax.random.key(11), (m * k, D))

        def loss(x, wi, wo, expert=expert, dy=dy):
            y = expert_ffn_padded(x, expert, wi, wo, k=k, fallback="gpu")
            return jnp.sum(y.astype(jnp.float32) * dy)

        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*bf)
        want = jax.grad(lambda x, wi, wo, expert=expert, dy=dy: jnp.sum(
            _reference(x, expert, wi, wo, k) * dy), argnums=(0, 1, 2))(x, wi, wo)  # fmt: skip
        for a, b in zip(got, want, strict=True):
            assert _rel(a, b) < 5e-2
