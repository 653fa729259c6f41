"""Int8 weight-only quantisation in pallas_kernels: the quantise / dequantise helpers, the int8
grouped matmul on every backend (forward, ragged and empty groups, the input gradient) and the
int8 gathered matvec, each against its reference on the same int8 weights and scales."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.matvec import gathered_matvec
from pallas_kernels.matvec.reference import gathered_matvec_reference
from pallas_kernels.moe import grouped_matmul
from pallas_kernels.moe.api import grouped_matmul_vjp, resolve_int8_implementation
from pallas_kernels.moe.reference import grouped_matmul_reference
from pallas_kernels.moe.tiles import num_visits, schedule
from pallas_kernels.quant import dequantize, quantize_int8


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "NaN/inf"
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


# --- quantise / dequantise ---------------------------------------------------------------------


def test_quantize_hand_example():
    """Columns (axis 0 contracted): max 127 -> scale 1; all zero -> scale 1, q 0; max 254 ->
    scale 2 (q = round(w / 2))."""
    w = jnp.asarray([[127.0, 0.0, -254.0], [-3.2, 0.0, 100.0], [10.6, 0.0, 6.0]])
    q, s = quantize_int8(w, axis=0)
    assert q.dtype == jnp.int8 and s.dtype == jnp.float32 and s.shape == (3,)
    np.testing.assert_array_equal(s, [1.0, 1.0, 2.0])
    np.testing.assert_array_equal(q, [[127, 0, -127], [-3, 0, 50], [11, 0, 3]])
    np.testing.assert_array_equal(
        dequantize(q, s, axis=0), [[127, 0, -254], [-3, 0, 100], [11, 0, 6]]
    )


@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_round_trip_bound(scale_dtype):
    """Grouped [E,K,N] weights, K contracted: scale [E,N]; |w - dequant| <= scale / 2 (+ fp32
    rounding); the largest |w| of each column maps to +-127."""
    w = jax.random.normal(jax.random.key(0), (3, 40, 24)) * jnp.arange(1, 25) / 7
    q, s = quantize_int8(w, axis=1, scale_dtype=scale_dtype)
    assert q.shape == w.shape and s.shape == (3, 24) and s.dtype == scale_dtype
    err = np.abs(np.asarray(dequantize(q, s, axis=1)) - np.asarray(w))
    bound = np.asarray(s, np.float32)[:, None, :] / 2
    assert np.all(err <= bound * (1 + 1e-5) + 1e-7)
    if scale_dtype == jnp.float32:
        np.testing.assert_array_equal(np.max(np.abs(np.asarray(q, np.int32)), axis=1), 127)
    assert dequantize(q, s, axis=1, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_scale_contract_errors():
    x = jnp.ones((4, 8))
    q = jnp.ones((2, 8, 16), jnp.int8)
    gs = jnp.asarray([2, 2], jnp.int32)
    with pytest.raises(ValueError, match="need scale"):
        grouped_matmul(x, q, gs)
    with pytest.raises(ValueError, match="shape"):
        grouped_matmul(x, q, gs, scale=jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="only for int8"):
        grouped_matmul(x, q.astype(jnp.float32), gs, scale=jnp.ones((2, 16)))
    with pytest.raises(ValueError, match="gpu_interpret"):
        grouped_matmul(x, q.astype(jnp.float32), gs, implementation="gpu_interpret")
    with pytest.raises(ValueError, match="need scale"):
        gathered_matvec(x, q, jnp.zeros((4,), jnp.int32))


# --- grouped matmul ----------------------------------------------------------------------------


def test_schedule_hand_example():
    """Groups [3, 0, 5, 2] in tiles of 4 rows: visits (group, tile) = (0,0) (2,0) (2,1) (3,2),
    then the last visit repeated up to the static T + E - 1 = 6."""
    g, t, starts, ends, count = schedule(jnp.asarray([3, 0, 5, 2], jnp.int32), 3, 4)
    assert num_visits(3, 4) == 6 and int(count[0]) == 4
    np.testing.assert_array_equal(g, [0, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(t, [0, 0, 1, 2, 2, 2])
    np.testing.assert_array_equal(starts, [0, 3, 3, 8])
    np.testing.assert_array_equal(ends, [3, 3, 8, 10])
    g, t, *_, count = schedule(jnp.zeros((3,), jnp.int32), 2, 4)  # no rows at all
    assert int(count[0]) == 0 and g.shape == (4,)


def _sizes(seed: int, e: int, m: int, fill: bool) -> np.ndarray:
    """Skewed sizes with empty groups (the first and one more); sum m, or less if not fill."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(e, 0.5))
    p[[0, e // 2]] = 0.0
    p /= p.sum()
    total = m if fill else m - m // 5
    sizes = np.floor(p * total).astype(np.int32)
    sizes[np.argmax(p)] += total - sizes.sum()
    return sizes


def _gmm_inputs(seed, m, k, n, e, dtype, fill=True, scale_dtype=jnp.float32):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (e, k, n), jnp.float32) / np.sqrt(k)
    q, s = quantize_int8(w, axis=1, scale_dtype=scale_dtype)
    return x, q, s, jnp.asarray(_sizes(seed, e, m, fill))


# (M, K, N, E). K, N multiples of 16 (the Triton kernel's contract); the last has K = 3 TPU
# tiles of 128 (several K steps) and N = 2 x 128.
SHAPES = [(200, 48, 32, 5), (77, 16, 48, 6), (130, 384, 256, 3)]


class Int8GroupedMatmulTest:
    """Subclassed once per backend: int8 weights against the reference on dequantised ones."""

    impl = "xla"
    shapes = SHAPES

    def _check_forward(self, shape, dtype, fill, scale_dtype=jnp.float32):
        x, q, s, gs = _gmm_inputs(sum(shape), *shape, dtype, fill, scale_dtype)
        got = jax.jit(
            lambda x, q, s, g: grouped_matmul(x, q, g, scale=s, implementation=self.impl)
        )(x, q, s, gs)
        want = grouped_matmul_reference(x.astype(jnp.float32), q, gs, s)
        assert got.shape == want.shape and got.dtype == dtype
        assert _rel(got, want) < (1e-5 if dtype == jnp.float32 else 2e-2)
        assert np.all(np.asarray(got)[int(np.sum(gs)) :] == 0)  # rows past the groups

    def test_forward_fp32(self):
        for i, shape in enumerate(self.shapes):
            self._check_forward(shape, jnp.float32, fill=i % 2 == 0)

    def test_forward_bf16_scale_bf16(self):
        self._check_forward(self.shapes[0], jnp.bfloat16, False, scale_dtype=jnp.bfloat16)

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_input_gradient(self, dtype):
        """jax.grad w.r.t. x through the int8 custom VJP equals the reference's gradient on the
        dequantised weights; q and scale get zero cotangents; grouped_matmul_vjp gives dx."""
        tol = 1e-5 if dtype == jnp.float32 else 2e-2
        shape = self.shapes[0]
        x, q, s, gs = _gmm_inputs(3, *shape, dtype, fill=False)
        dy = jax.random.normal(jax.random.key(5), (shape[0], shape[2]), jnp.float32)
        dy = dy.astype(dtype)

        def loss(x, s):
            y = grouped_matmul(x, q, gs, scale=s, implementation=self.impl)
            return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

        dx, ds = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, s)
        wd = dequantize(q, s, axis=1)
        want = jax.grad(
            lambda x: jnp.sum(grouped_matmul_reference(x, wd, gs) * dy.astype(jnp.float32))
        )(x.astype(jnp.float32))
        assert dx.dtype == dtype and _rel(dx, want) < tol
        assert np.all(np.asarray(ds) == 0)
        dx2, dw = grouped_matmul_vjp(x, q, gs, dy, scale=s, implementation=self.impl)
        assert dw is None and _rel(dx2, want) < tol


class TestXla(Int8GroupedMatmulTest):
    impl = "xla"
    # K, N not multiples of 16: the XLA path takes any shape.
    shapes = SHAPES[:2] + [(50, 24, 40, 4)]


class TestPadded(Int8GroupedMatmulTest):
    """Capacity-padded batched GEMMs: the skewed sizes mostly take the fallback (xla here);
    `test_padded_branch` below forces a padded branch."""

    impl = "padded"
    shapes = SHAPES[:2]


class TestTpuInterpret(Int8GroupedMatmulTest):
    """The megablox-style Pallas TPU kernel in interpret mode (pltpu.InterpretParams)."""

    impl = "tpu_interpret"


class TestGpuInterpret(Int8GroupedMatmulTest):
    """The Pallas Triton kernel in interpret mode."""

    impl = "gpu_interpret"


@pytest.mark.parametrize("impl", ["xla", "tpu_interpret", "gpu_interpret"])
def test_all_groups_empty_and_no_rows(impl):
    """Every group empty: the output is all zeros; M = 0 gives an empty result."""
    q = jnp.ones((3, 16, 32), jnp.int8)
    s = jnp.ones((3, 32))
    y = grouped_matmul(jnp.ones((20, 16)), q, jnp.zeros((3,), jnp.int32), scale=s,
                       implementation=impl)  # fmt: skip
    assert y.shape == (20, 32) and not np.any(np.asarray(y))
    y = grouped_matmul(jnp.ones((0, 16)), q, jnp.zeros((3,), jnp.int32), scale=s,
                       implementation=impl)  # fmt: skip
    assert y.shape == (0, 32)


def test_padded_branch():
    """Balanced groups (one empty) take a padded capacity: forward and dx equal the reference."""
    m, k, n, e = 96, 16, 32, 4
    x, q, s, _ = _gmm_inputs(9, m, k, n, e, jnp.float32)
    gs = jnp.asarray([30, 0, 33, 33], jnp.int32)
    dy = jax.random.normal(jax.random.key(2), (m, n))

    def loss(fn):
        return lambda x: jnp.sum(fn(x) * dy)

    got = jax.jit(jax.value_and_grad(loss(
        lambda x: grouped_matmul(x, q, gs, scale=s, implementation="padded", group_rows=32))
    ))(x)  # fmt: skip
    wd = dequantize(q, s, axis=1)
    want = jax.value_and_grad(loss(lambda x: grouped_matmul_reference(x, wd, gs)))(x)
    assert abs(float(got[0]) - float(want[0])) < 1e-4 * abs(float(want[0])) + 1e-4
    assert _rel(got[1], want[1]) < 1e-5


def _float_arrays_shaped(jaxpr, shape) -> list:
    """Float values of `shape` produced by equations outside Pallas kernels (recursively)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            continue
        for v in eqn.outvars:
            aval = v.aval
            if getattr(aval, "shape", None) == shape and jnp.issubdtype(aval.dtype, jnp.floating):
                found.append((eqn.primitive.name, aval))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _float_arrays_shaped(sub, shape)
    return found


@pytest.mark.parametrize("impl", ["tpu_interpret", "gpu_interpret"])
def test_kernels_build_no_dequantised_weight(impl):
    """Forward and input gradient: no float array of the weight's shape exists outside the
    kernels (the int8 tiles are converted inside them)."""
    x, q, s, gs = _gmm_inputs(1, 64, 32, 48, 3, jnp.bfloat16)

    def f(x):
        return jnp.sum(grouped_matmul(x, q, gs, scale=s, implementation=impl))

    jaxpr = jax.make_jaxpr(jax.value_and_grad(f))(x).jaxpr
    assert not _float_arrays_shaped(jaxpr, q.shape)
    assert not _float_arrays_shaped(jaxpr, q.shape[1:])
    mv = jax.make_jaxpr(
        lambda x: gathered_matvec(
            x, q, jnp.asarray([2, 0]), scale=s, implementation="gpu_interpret"
        )
    )(x[:2]).jaxpr
    assert not _float_arrays_shaped(mv, q.shape) and not _float_arrays_shaped(mv, q.shape[1:])


def test_auto_resolution_for_int8():
    assert resolve_int8_implementation("auto", 48, 32) in ("xla", "gpu", "tpu")
    assert resolve_int8_implementation("padded", 48, 32) == "padded"
    with pytest.raises(ValueError, match="implementation"):
        resolve_int8_implementation("cuda", 48, 32)
    if jax.default_backend() == "cpu":
        assert resolve_int8_implementation("auto", 48, 32) == "xla"


# --- gathered matvec ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["xla", "gpu_interpret"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matvec_int8(impl, dtype):
    """(A, E, K, N) decode-like with repeated experts; and one row of a plain projection (E=1)."""
    for a, e, k, n in [(3, 4, 64, 96), (1, 1, 128, 32)]:
        kx, kw, ki = jax.random.split(jax.random.key(a + k), 3)
        x = jax.random.normal(kx, (a, k)).astype(dtype)
        w = jax.random.normal(kw, (e, k, n)) / np.sqrt(k)
        q, s = quantize_int8(w, axis=1, scale_dtype=dtype)
        idx = jax.random.randint(ki, (a,), 0, e, jnp.int32)
        got = jax.jit(lambda x, q, s, i: gathered_matvec(x, q, i, scale=s, implementation=impl))(
            x, q, s, idx
        )
        want = gathered_matvec_reference(x, dequantize(q, s, axis=1), idx)
        assert got.shape == (a, n) and got.dtype == jnp.float32
        assert _rel(got, want) < (1e-5 if dtype == jnp.float32 else 2e-2)


# --- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
class TestGpu(Int8GroupedMatmulTest):
    """The Pallas Triton kernel compiled for the GPU (bf16 and fp32 activations)."""

    impl = "gpu"


@pytest.mark.gpu
class TestPaddedGpu(Int8GroupedMatmulTest):
    """The padded backend on GPU: XLA batched GEMMs, the Triton int8 kernel as fallback."""

    impl = "padded"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matvec_int8_gpu(dtype):
    a, e, k, n = 4, 6, 256, 384
    kx, kw, ki = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (a, k)).astype(dtype)
    q, s = quantize_int8(jax.random.normal(kw, (e, k, n)), axis=1)
    idx = jax.random.randint(ki, (a,), 0, e, jnp.int32)
    got = gathered_matvec(x, q, idx, scale=s, implementation="gpu")
    want = gathered_matvec_reference(x, dequantize(q, s, axis=1), idx)
    assert _rel(got, want) < 1e-4
