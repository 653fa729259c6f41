"""Tests for pallas_kernels.lightning: every implementation against the fp32 reference.

Relative error everywhere is rel(a, b) = max|a - b| / max|b| with b the fp32 reference.
Tiers: fp32 forward 1e-5, fp32 gradients 1e-4; bf16 inputs 2e-2 (forward) / 5e-2 (gradients).
One base class holds the tests; subclasses pick the implementation (and interpret mode).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as Spec

from pallas_kernels.lightning import (
    LightningConfig,
    interpret_mode,
    lightning_attention,
    lightning_decode,
    resolve_implementation,
)
from pallas_kernels.lightning.decode import lightning_decode_pallas, lightning_decode_xla
from pallas_kernels.lightning.reference import (
    lightning_attention_quadratic,
    lightning_attention_reference,
)
from pallas_kernels.lightning.sharded import lightning_attention_seq_sharded
from pallas_kernels.lightning.tpu import lightning_attention_tpu

FWD_TOL, GRAD_TOL = 1e-5, 1e-4
BF16_FWD_TOL, BF16_GRAD_TOL = 2e-2, 5e-2


def rel(a, b) -> float:
    """max|a - b| / max|b| in float64; NaN never passes."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite values"
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def minimax_slopes(n: int, layer: int = 3, num_layers: int = 8) -> jax.Array:
    """MiniMax slopes 2**(-8(j+1)/N) * (1 - l/(L-1) + 1e-5) for a middle layer."""
    factor = 1.0 - layer / (num_layers - 1) + 1e-5
    return jnp.array([2.0 ** (-8.0 * (j + 1) / n) * factor for j in range(n)], jnp.float32)


def make_inputs(seed: int, b: int, t: int, n: int, h: int, dtype=jnp.float32, scale=0.3):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (scale * jax.random.normal(kk, (b, t, n, h), jnp.float32) for kk in ks[:3])
    s0 = scale * jax.random.normal(ks[3], (b, n, h, h), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), s0


def packed_segments(b: int, t: int, seed: int = 0) -> jax.Array:
    """Packed rows with a few segments each; row 1 reuses an earlier id (0 .. 1 .. 0)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((b, t), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=min(3, t - 1), replace=False))
        for i, c in enumerate(cuts):
            ids[row, c:] = (i + 1) % 2 if row % 2 else i + 1
    return jnp.asarray(ids)


def pytest_generate_tests(metafunc):
    if metafunc.cls is not None and "length" in metafunc.fixturenames:
        metafunc.parametrize("length", metafunc.cls.lengths)


def _loss_grads(fn, q, k, v, slopes, s0, segment_ids):
    """Gradients of a non-trivial scalar loss of (o, final_state) w.r.t. q, k, v, s0, slopes."""
    w = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))

    def loss(q, k, v, s0, slopes):
        o, s = fn(q, k, v, slopes, initial_state=s0, segment_ids=segment_ids)
        return jnp.sum(o.astype(jnp.float32) * w) + jnp.sum(jnp.sin(s))

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, s0, slopes)


def _ref(q, k, v, slopes, **kw):
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    return lightning_attention_reference(q, k, v, slopes, **kw)


class LightningTestBase:
    """Tests shared by every implementation of `lightning_attention`."""

    implementation = "xla"
    interpret = False
    block_size = 16
    lengths = (1, 15, 16, 17, 100, 300)
    grad_length = 100  # multi-block with a partial last block
    b, n, h = 2, 4, 16

    def attn(self, q, k, v, slopes, **kw):
        with interpret_mode(self.interpret):
            return lightning_attention(
                q, k, v, slopes, implementation=self.implementation,
                block_size=self.block_size, **kw,
            )  # fmt: skip

    def test_forward_fp32(self, length):
        q, k, v, s0 = make_inputs(length, self.b, length, self.n, self.h)
        slopes = minimax_slopes(self.n)
        for init in (None, s0):
            o, s = self.attn(q, k, v, slopes, initial_state=init)
            o_ref, s_ref = _ref(q, k, v, slopes, initial_state=init)
            assert o.shape == q.shape and o.dtype == q.dtype and s.dtype == jnp.float32
            assert rel(o, o_ref) < FWD_TOL and rel(s, s_ref) < FWD_TOL

    def test_forward_segments(self, length):
        q, k, v, s0 = make_inputs(length + 1, self.b, length, self.n, self.h)
        slopes = minimax_slopes(self.n)
        seg = packed_segments(self.b, length, seed=length)
        o, s = self.attn(q, k, v, slopes, initial_state=s0, segment_ids=seg)
        o_ref, s_ref = _ref(q, k, v, slopes, initial_state=s0, segment_ids=seg)
        assert rel(o, o_ref) < FWD_TOL and rel(s, s_ref) < FWD_TOL

    def test_grads_fp32(self):
        t = self.grad_length
        q, k, v, s0 = make_inputs(7, self.b, t, self.n, self.h)
        slopes = minimax_slopes(self.n)
        seg = packed_segments(self.b, t, seed=3)
        got = _loss_grads(self.attn, q, k, v, slopes, s0, seg)
        ref = _loss_grads(_ref, q, k, v, slopes, s0, seg)
        for name, g, r in zip(("dq", "dk", "dv", "ds0"), got[:4], ref[:4], strict=True):
            assert g.shape == r.shape, name
            assert rel(g, r) < GRAD_TOL, (name, rel(g, r))
        np.testing.assert_array_equal(got[4], 0.0)  # slopes get no gradient

    def test_grads_no_segments_no_state(self):
        t = self.lengths[-1]
        q, k, v, _ = make_inputs(8, self.b, t, self.n, self.h)
        slopes = minimax_slopes(self.n)

        def grads(fn):
            def loss(q, k, v):
                o, s = fn(q, k, v, slopes)
                return jnp.sum(o * o) + jnp.sum(s)

            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        for g, r in zip(grads(self.attn), grads(_ref), strict=True):
            assert rel(g, r) < GRAD_TOL

    def test_bf16(self):
        t = self.lengths[-1]
        q, k, v, s0 = make_inputs(9, self.b, t, self.n, self.h, dtype=jnp.bfloat16)
        slopes = minimax_slopes(self.n)
        seg = packed_segments(self.b, t, seed=5)
        o, s = self.attn(q, k, v, slopes, initial_state=s0, segment_ids=seg)
        o_ref, s_ref = _ref(q, k, v, slopes, initial_state=s0, segment_ids=seg)
        assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
        assert rel(o, o_ref) < BF16_FWD_TOL and rel(s, s_ref) < BF16_FWD_TOL
        got = _loss_grads(self.attn, q, k, v, slopes, s0, seg)
        ref = _loss_grads(_ref, q, k, v, slopes, s0, seg)
        for g, r, x in zip(got[:3], ref[:3], (q, k, v), strict=True):
            assert g.dtype == x.dtype
            assert rel(g, r) < BF16_GRAD_TOL
        assert rel(got[3], ref[3]) < BF16_GRAD_TOL

    def test_chunked_calls_carry_state(self):
        t = self.lengths[-1]
        q, k, v, s0 = make_inputs(10, self.b, t, self.n, self.h)
        slopes = minimax_slopes(self.n)
        seg = packed_segments(self.b, t, seed=11)
        o_full, s_full = self.attn(q, k, v, slopes, initial_state=s0, segment_ids=seg)
        cuts = sorted({0, min(5, t), t // 2, t})
        state, outs = s0, []
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            # A chunk continues the previous one's segment iff its first id matches the last one.
            chunk_seg = seg[:, lo:hi]
            if lo > 0:
                same = seg[:, lo] == seg[:, lo - 1]
                state = jnp.where(same[:, None, None, None], state, 0.0)
            o, state = self.attn(
                q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], slopes,
                initial_state=state, segment_ids=chunk_seg,
            )  # fmt: skip
            outs.append(o)
        assert rel(jnp.concatenate(outs, axis=1), o_full) < FWD_TOL
        assert rel(state, s_full) < FWD_TOL

    def test_jit_and_left_padding(self):
        t = self.lengths[-1]
        q, k, v, _ = make_inputs(12, 1, t, self.n, self.h)
        slopes = minimax_slopes(self.n)
        pad = 5
        qp, kp, vp = (jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0))) for x in (q, k, v))
        fn = jax.jit(lambda q, k, v: self.attn(q, k, v, slopes))
        o, s = fn(q, k, v)
        op, sp = fn(qp, kp, vp)
        assert rel(op[:, pad:], o) < FWD_TOL and rel(sp, s) < FWD_TOL
        np.testing.assert_array_equal(op[:, :pad], 0.0)


class TestXla(LightningTestBase):
    implementation = "xla"


class TestXlaBlock8(LightningTestBase):
    implementation = "xla"
    block_size = 8
    lengths = (7, 65)
    grad_length = 65
    b, n, h = 3, 2, 8


class TestXlaDefaultBlock(LightningTestBase):
    implementation = "xla"
    block_size = None  # 256: two blocks for 300 tokens
    lengths = (300,)
    grad_length = 300
    b, n, h = 1, 2, 8


class TestTpuInterpret(LightningTestBase):
    """The Pallas Mosaic TPU kernels on CPU in TPU interpret mode (slow: small shapes)."""

    implementation = "tpu"
    interpret = True
    lengths = (1, 17, 40)
    grad_length = 40
    b, n, h = 2, 2, 8


class TestGpuInterpret(LightningTestBase):
    """The Pallas GPU (Triton) kernels through the dispatcher, interpreted on CPU: packed
    segments, chunked calls and gradients as for every other implementation."""

    implementation = "gpu"
    interpret = True
    lengths = (1, 17, 100)
    grad_length = 100
    b, n, h = 2, 2, 16

    @pytest.fixture(autouse=True)
    def _needs_module(self):
        pytest.importorskip("pallas_kernels.lightning.gpu")


# ---------------------------------------------------------------- reference cross-checks


@pytest.mark.parametrize("length", [1, 16, 45])
def test_quadratic_matches_recurrence(length):
    b, n, h = 2, 4, 8
    q, k, v, s0 = make_inputs(20 + length, b, length, n, h)
    slopes = minimax_slopes(n)
    for seg in (None, packed_segments(b, length, seed=length)):
        o1, s1 = lightning_attention_quadratic(q, k, v, slopes, initial_state=s0, segment_ids=seg)
        o2, s2 = lightning_attention_reference(q, k, v, slopes, initial_state=s0, segment_ids=seg)
        assert rel(o1, o2) < FWD_TOL and rel(s1, s2) < FWD_TOL


def test_segment_restart_equals_separate_calls():
    """Packing two sequences equals running them separately (from zero state)."""
    b, n, h, t1, t2 = 1, 2, 8, 23, 30
    q, k, v, s0 = make_inputs(30, b, t1 + t2, n, h)
    slopes = minimax_slopes(n)
    seg = jnp.asarray(np.r_[np.zeros(t1), np.ones(t2)][None].astype(np.int32))
    o, s = lightning_attention(q, k, v, slopes, initial_state=s0, segment_ids=seg, block_size=16)
    o1, _ = lightning_attention(q[:, :t1], k[:, :t1], v[:, :t1], slopes, initial_state=s0)
    o2, s2 = lightning_attention(q[:, t1:], k[:, t1:], v[:, t1:], slopes)
    assert rel(o, jnp.concatenate([o1, o2], axis=1)) < FWD_TOL and rel(s, s2) < FWD_TOL


# ---------------------------------------------------------------- dispatcher


def test_dispatch_and_validation():
    if jax.default_backend() == "cpu":
        assert resolve_implementation("auto") == "xla"
    with pytest.raises(ValueError, match="implementation"):
        LightningConfig(implementation="cuda")
    with pytest.raises(ValueError, match="block_size"):
        LightningConfig(block_size=0)
    q, k, v, s0 = make_inputs(0, 1, 4, 2, 8)
    slopes = minimax_slopes(2)
    with pytest.raises(ValueError, match="slopes"):
        lightning_attention(q, k, v, slopes[:1])
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention(q, k, v, slopes, initial_state=s0[:, :1])
    with pytest.raises(ValueError, match="segment_ids"):
        lightning_attention(q, k, v, slopes, segment_ids=jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="state"):
        lightning_decode(q[:, 0], k[:, 0], v[:, 0], slopes, s0[..., :4])
    with pytest.raises(ValueError, match="multiple of 8"):
        lightning_attention(q, k, v, slopes, implementation="tpu", block_size=12)
    o_ref, s_ref = lightning_attention_quadratic(q, k, v, slopes, initial_state=s0)
    for impl in ("reference", "xla", "auto"):
        o, s = lightning_attention(q, k, v, slopes, initial_state=s0, implementation=impl)
        assert rel(o, o_ref) < FWD_TOL and rel(s, s_ref) < FWD_TOL, impl


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("implementation", ["xla", "reference", "auto"])
def test_decode_steps_match_recurrence(implementation):
    b, t, n, h = 2, 9, 4, 16
    q, k, v, s0 = make_inputs(40, b, t, n, h)
    slopes = minimax_slopes(n)
    o_ref, s_ref = lightning_attention_reference(q, k, v, slopes, initial_state=s0)
    state, outs = s0, []
    for i in range(t):
        o, state = lightning_decode(
            q[:, i], k[:, i], v[:, i], slopes, state, implementation=implementation
        )
        outs.append(o)
    assert state.dtype == jnp.float32
    assert rel(jnp.stack(outs, axis=1), o_ref) < FWD_TOL and rel(state, s_ref) < FWD_TOL


@pytest.mark.parametrize("implementation", ["xla", "auto"])
def test_decode_after_prefill_matches_one_call(implementation):
    b, t, n, h, prompt = 2, 40, 4, 16, 33
    q, k, v, _ = make_inputs(41, b, t, n, h)
    slopes = minimax_slopes(n)
    o_full, s_full = lightning_attention(q, k, v, slopes, implementation="xla", block_size=16)
    o, state = lightning_attention(
        q[:, :prompt], k[:, :prompt], v[:, :prompt], slopes, implementation=implementation
    )
    outs = [o]
    step = jax.jit(lambda q, k, v, s: lightning_decode(q, k, v, slopes, s))
    for i in range(prompt, t):
        o, state = step(q[:, i], k[:, i], v[:, i], state)
        outs.append(o[:, None])
    assert rel(jnp.concatenate(outs, axis=1), o_full) < FWD_TOL
    assert rel(state, s_full) < FWD_TOL


def test_decode_bf16_and_grad():
    b, n, h = 2, 4, 16
    q, k, v, s0 = make_inputs(42, b, 1, n, h, dtype=jnp.bfloat16)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    slopes = minimax_slopes(n)
    o, s = lightning_decode(q, k, v, slopes, s0)
    o_ref, s_ref = lightning_decode_xla(*(x.astype(jnp.float32) for x in (q, k, v)), slopes, s0)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel(o, o_ref) < BF16_FWD_TOL and rel(s, s_ref) < BF16_FWD_TOL
    # Decode is differentiable on the jnp paths ("xla", "reference"); the kernels are inference.
    g = jax.grad(lambda s: jnp.sum(lightning_decode(q, k, v, slopes, s, implementation="xla")[0]))(
        s0
    )
    assert g.shape == s0.shape and np.all(np.isfinite(g))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_pallas_interpret(dtype):
    b, n, h = 2, 4, 16
    q, k, v, s0 = make_inputs(43, b, 1, n, h, dtype=dtype)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    slopes = minimax_slopes(n)
    o, s = lightning_decode_pallas(q, k, v, slopes, s0, interpret=True)
    o_ref, s_ref = lightning_decode_xla(q, k, v, slopes, s0)
    assert o.dtype == dtype and s.dtype == jnp.float32
    assert rel(o, o_ref) < FWD_TOL and rel(s, s_ref) < FWD_TOL
    with interpret_mode():
        o2, s2 = lightning_decode(q, k, v, slopes, s0, implementation="tpu")
    assert rel(o2, o_ref) < FWD_TOL and rel(s2, s_ref) < FWD_TOL


# ---------------------------------------------------------------- sharding


def _cpu_mesh(name: str):
    """4 CPU devices (conftest makes 8), also on a GPU machine with one GPU."""
    return jax.make_mesh((4,), (name,), devices=jax.devices("cpu")[:4])


def _shard(x, mesh, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


@pytest.mark.parametrize("with_segments", [False, True])
def test_sequence_sharded_matches_reference(with_segments):
    """T split over 4 devices; each shard corrected by the previous shards' final states."""
    b, t, n, h = 2, 64, 2, 8
    q, k, v, s0 = make_inputs(50, b, t, n, h)
    slopes = minimax_slopes(n)
    seg = None
    if with_segments:  # boundaries inside shards, on a shard edge (32) and an id reused later
        ids = np.zeros((b, t), np.int32)
        ids[0, 10:], ids[0, 32:], ids[0, 40:], ids[1, 17:] = 1, 2, 0, 5
        seg = jnp.asarray(ids)
    mesh = _cpu_mesh("seq")
    tspec = Spec(None, "seq")

    def sharded(q, k, v, s0, seg):
        fn = functools.partial(
            lightning_attention_seq_sharded, slopes=slopes, axis_name="seq", block_size=8
        )
        in_specs = (tspec, tspec, tspec, Spec(), None if seg is None else tspec)
        return jax.shard_map(
            lambda q, k, v, s0, seg: fn(q, k, v, initial_state=s0, segment_ids=seg),
            mesh=mesh, in_specs=in_specs, out_specs=(tspec, Spec()),
        )(q, k, v, s0, seg)  # fmt: skip

    def loss(fn, q, k, v, s0):
        o, s = fn(q, k, v, s0)
        return jnp.sum(jnp.sin(o)) + jnp.sum(s * s)

    shard_seg = None if seg is None else _shard(seg, mesh, tspec)
    qs, ks, vs = (_shard(x, mesh, tspec) for x in (q, k, v))
    o, s = jax.jit(sharded)(qs, ks, vs, s0, shard_seg)
    o_ref, s_ref = lightning_attention_reference(q, k, v, slopes, initial_state=s0, segment_ids=seg)
    assert rel(o, o_ref) < FWD_TOL and rel(s, s_ref) < FWD_TOL

    grad = jax.grad(loss, argnums=(1, 2, 3, 4))
    got = jax.jit(lambda *a: grad(lambda *x: sharded(*x, shard_seg), *a))(qs, ks, vs, s0)
    ref_fn = functools.partial(lightning_attention_reference, slopes=slopes, segment_ids=seg)
    ref = grad(lambda q, k, v, s0: ref_fn(q, k, v, initial_state=s0), q, k, v, s0)
    for g, r in zip(got, ref, strict=True):
        assert rel(g, r) < GRAD_TOL


def test_batch_sharded_inside_shard_map():
    """The op under shard_map with B split over devices (data parallel), forward and grads."""
    b, t, n, h = 4, 40, 2, 8
    q, k, v, s0 = make_inputs(51, b, t, n, h)
    slopes = minimax_slopes(n)
    mesh = _cpu_mesh("data")
    bspec = Spec("data")

    def fn(q, k, v, s0):
        return jax.shard_map(
            lambda q, k, v, s0: lightning_attention(q, k, v, slopes, initial_state=s0,
                                                    block_size=16),
            mesh=mesh, in_specs=bspec, out_specs=bspec,
        )(q, k, v, s0)  # fmt: skip

    def loss(fn, q, k, v, s0):
        o, s = fn(q, k, v, s0)
        return jnp.sum(jnp.sin(o)) + jnp.sum(s * s)

    args = tuple(_shard(x, mesh, bspec) for x in (q, k, v, s0))
    o, s = jax.jit(fn)(*args)
    o_ref, s_ref = lightning_attention_reference(q, k, v, slopes, initial_state=s0)
    assert rel(o, o_ref) < FWD_TOL and rel(s, s_ref) < FWD_TOL
    grad = jax.grad(loss, argnums=(1, 2, 3, 4))
    got = jax.jit(lambda *a: grad(fn, *a))(*args)
    ref_fn = functools.partial(lightning_attention_reference, slopes=slopes)
    ref = grad(lambda q, k, v, s0: ref_fn(q, k, v, initial_state=s0), q, k, v, s0)
    for g, r in zip(got, ref, strict=True):
        assert rel(g, r) < GRAD_TOL


def test_gpu_dispatch_interpret():
    """implementation="gpu" reaches the gpu module (Pallas Triton kernels, interpreted on CPU)."""
    pytest.importorskip("pallas_kernels.lightning.gpu")
    b, t, n, h = 1, 40, 2, 16
    q, k, v, s0 = make_inputs(60, b, t, n, h)
    slopes = minimax_slopes(n)
    with interpret_mode():
        o, s = lightning_attention(
            q, k, v, slopes, initial_state=s0, implementation="gpu", block_size=32
        )
        od, sd = lightning_decode(q[:, 0], k[:, 0], v[:, 0], slopes, s0, implementation="gpu")
    o_ref, s_ref = lightning_attention_reference(q, k, v, slopes, initial_state=s0)
    assert rel(o, o_ref) < FWD_TOL and rel(s, s_ref) < FWD_TOL
    od_ref, sd_ref = lightning_decode_xla(q[:, 0], k[:, 0], v[:, 0], slopes, s0)
    assert rel(od, od_ref) < FWD_TOL and rel(sd, sd_ref) < FWD_TOL
    q8 = q[..., :8]
    with pytest.raises(ValueError, match=r"powers of two >= 16 \(got H=8\)"):
        lightning_attention(q8, q8, q8, slopes, implementation="gpu")


def test_tpu_kernels_lower_for_tpu():
    """Cross-lowering to TPU (jax.export, no TPU needed) catches Mosaic lowering errors early."""
    b, t, n, h = 1, 256, 2, 128
    x = jnp.ones((b, t, n, h), jnp.bfloat16)
    slopes, s0 = minimax_slopes(n), jnp.zeros((b, n, h, h), jnp.float32)
    seg = jnp.zeros((b, t), jnp.int32)

    def loss(q, k, v, s0, seg):
        fn = functools.partial(lightning_attention_tpu, block_size=128, segment_ids=seg)
        o, s = fn(q, k, v, slopes, initial_state=s0)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    for seg_ids in (None, seg):
        exported = jax.export.export(jax.jit(grad), platforms=["tpu"])(x, x, x, s0, seg_ids)
        assert exported.mlir_module().count("tpu_custom_call") == 2  # forward + backward kernel
    step = jax.jit(lambda q, s: lightning_decode_pallas(q, q, q, slopes, s))
    exported = jax.export.export(step, platforms=["tpu"])(x[:, 0], s0)
    assert "tpu_custom_call" in exported.mlir_module()
