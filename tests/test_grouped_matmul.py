"""grouped_matmul and its gradients against a dense per-expert reference (skewed, empty groups)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.moe import grouped_matmul, resolve_implementation, tgmm
from pallas_kernels.moe.reference import grouped_matmul_reference, tgmm_reference


def _skewed_sizes(rng: np.random.Generator, e: int, m: int, *, fill: bool = True) -> np.ndarray:
    """Random skewed group sizes with some empty groups; they sum to m (or less if not fill)."""
    p = rng.dirichlet(np.full(e, 0.3))
    p[rng.choice(e, size=max(1, e // 4), replace=False)] = 0.0  # empty groups
    p /= p.sum()
    total = m if fill else m - rng.integers(1, m // 4)
    sizes = np.floor(p * total).astype(np.int32)
    sizes[np.argmax(p)] += total - sizes.sum()
    return sizes


def _inputs(seed: int, m: int, k: int, n: int, e: int, dtype=jnp.float32, fill=True):
    rng = np.random.default_rng(seed)
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (e, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    return x, w, jnp.asarray(_skewed_sizes(rng, e, m, fill=fill))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "NaN/inf"
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


# The last: N = 6 tiles of 128, where the GPU wrapper lowers grid_block_n to 3 (fit_blocks).
SHAPES = [(200, 48, 40, 8), (77, 16, 24, 5), (256, 64, 32, 32), (300, 64, 768, 6)]


class GroupedMatmulTest:
    """Subclassed once per backend."""

    impl = "xla"
    dtype = jnp.float32
    fwd_tol, grad_tol = 1e-5, 1e-4

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("fill", [True, False])
    def test_forward(self, shape, fill):
        x, w, gs = _inputs(sum(shape), *shape, dtype=self.dtype, fill=fill)
        got = jax.jit(lambda x, w, g: grouped_matmul(x, w, g, implementation=self.impl))(x, w, gs)
        want = grouped_matmul_reference(x, w, gs)
        assert got.shape == want.shape and got.dtype == x.dtype
        assert _rel(got, want) < self.fwd_tol

    @pytest.mark.parametrize("shape", SHAPES[:2])
    @pytest.mark.parametrize("fill", [True, False])
    def test_gradients(self, shape, fill):
        x, w, gs = _inputs(sum(shape) + 1, *shape, dtype=self.dtype, fill=fill)
        dy = jax.random.normal(jax.random.key(7), (shape[0], shape[2]), jnp.float32)

        def loss(fn):
            return lambda x, w: jnp.sum(fn(x, w) * dy)

        def ours_fn(x, w):
            return grouped_matmul(x, w, gs, implementation=self.impl)

        ours = jax.jit(jax.grad(loss(ours_fn), argnums=(0, 1)))(x, w)
        x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
        ref = jax.grad(loss(lambda x, w: grouped_matmul_reference(x, w, gs)), argnums=(0, 1))(
            x32, w32
        )
        for got, want in zip(ours, ref, strict=True):
            assert _rel(got, want) < self.grad_tol
        assert np.all(np.asarray(ours[1])[np.asarray(gs) == 0] == 0)  # empty groups: zero dW

    def test_tgmm(self):
        x, w, gs = _inputs(3, 120, 24, 16, 6, dtype=self.dtype, fill=False)
        dy = jax.random.normal(jax.random.key(3), (120, 16), jnp.float32).astype(self.dtype)
        got = tgmm(x, dy, gs, implementation=self.impl)
        assert _rel(got, tgmm_reference(x, dy, gs)) < self.fwd_tol


class TestXla(GroupedMatmulTest):
    impl = "xla"


class TestTpuInterpret(GroupedMatmulTest):
    """megablox in Pallas interpret mode on CPU."""

    impl = "tpu_interpret"


class TestPadded(GroupedMatmulTest):
    """Batched GEMM over capacity-padded groups; the skewed sizes above mostly take the
    fallback branch (xla on CPU), the balanced ones below the padded branches."""

    impl = "padded"


def _balanced_sizes(seed: int, e: int, m: int, spread: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = 1.0 + rng.uniform(-spread, spread, e)
    sizes = np.floor(p / p.sum() * m).astype(np.int32)
    sizes[0] += m - sizes.sum()
    return sizes


@pytest.mark.parametrize("spread", [0.0, 0.05, 0.3, 0.6])
def test_padded_branches_match_reference(spread):
    """Near-balanced groups pick a padded capacity (the smallest that holds the largest group),
    forward and both gradients match the dense reference; an empty group gets zero dW."""
    from pallas_kernels.moe import padded

    m, k, n, e = 192, 16, 24, 6
    sizes = _balanced_sizes(int(spread * 10), e, m, spread)
    if spread == 0.6:
        sizes[2], sizes[3] = 0, sizes[3] + sizes[2]  # an empty group (and a larger one)
    gs = jnp.asarray(sizes)
    caps = padded.capacities(-(-m // e))
    which = int(padded.choose(gs, caps))
    assert which < len(caps) and caps[which] >= sizes.max()
    assert which == 0 or caps[which - 1] < sizes.max()
    x, w, _ = _inputs(5, m, k, n, e)
    dy = jax.random.normal(jax.random.key(1), (m, n), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * dy)

    got = jax.jit(
        jax.value_and_grad(
            loss(lambda x, w: grouped_matmul(x, w, gs, implementation="padded")), argnums=(0, 1)
        )
    )(x, w)
    want = jax.value_and_grad(loss(
        lambda x, w: grouped_matmul_reference(x, w, gs)), argnums=(0, 1))(x, w)  # fmt: skip
    assert abs(float(got[0]) - float(want[0])) < 1e-4 * abs(float(want[0])) + 1e-4
    for a, b in zip(got[1], want[1], strict=True):
        assert _rel(a, b) < 1e-5
    assert np.all(np.asarray(got[1][1])[sizes == 0] == 0)


def test_padded_layout_round_trip_and_ladder():
    """to_padded / from_padded invert each other on used rows; rows past the groups are zero;
    the ladder is sorted, rounded to the multiple and starts at the expected size."""
    from pallas_kernels.moe import padded

    gs = jnp.asarray([3, 0, 5, 2], jnp.int32)
    x = jnp.arange(12 * 2, dtype=jnp.float32).reshape(12, 2) + 1
    xp = padded.to_padded(x, gs, 5)
    assert xp.shape == (4, 5, 2)
    np.testing.assert_array_equal(xp[0, :3], x[:3])
    np.testing.assert_array_equal(xp[1], 0)
    np.testing.assert_array_equal(xp[2], x[3:8])
    np.testing.assert_array_equal(xp[3, :2], x[8:10])
    np.testing.assert_array_equal(xp[3, 2:], 0)
    back = padded.from_padded(xp, gs, 12)
    np.testing.assert_array_equal(back[:10], x[:10])
    np.testing.assert_array_equal(back[10:], 0)
    assert padded.capacities(256) == (256, 288, 320, 352, 384, 448, 512)
    assert padded.capacities(4096) == tuple(4096 + 128 * i for i in range(9)) + (
        5632, 6144, 7168, 8192)  # fmt: skip
    # The Mosaic kernel's 95 tiles for 8192 rows ~ 447 rows per group at 0.85 of dense speed.
    assert padded.break_even(padded.capacities(256), 8192, 32) == (256, 288, 320, 352, 384)
    assert padded.capacities(1) == (32,)
    assert int(padded.choose(gs, (4, 5, 8))) == 1 and int(padded.choose(gs, (2, 4))) == 2
    with pytest.raises(ValueError, match="expected rows"):
        padded.capacities(0)


def test_bf16_against_fp32_reference():
    x, w, gs = _inputs(11, 130, 32, 48, 8, dtype=jnp.bfloat16)
    got = grouped_matmul(x, w, gs, implementation="xla")
    want = grouped_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32), gs)
    assert got.dtype == jnp.bfloat16 and _rel(got, want) < 2e-2


def test_auto_resolves_and_bad_name_raises():
    assert resolve_implementation("auto") in ("xla", "gpu", "tpu")
    with pytest.raises(ValueError, match="implementation"):
        resolve_implementation("cuda")
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(jnp.ones((4, 2)), jnp.ones((3, 2, 2)), jnp.ones((2,), jnp.int32))


@pytest.mark.gpu
class TestGpu(GroupedMatmulTest):
    """Mosaic GPU kernels (Hopper, bf16 inputs) against the fp32 reference."""

    impl = "gpu"
    dtype = jnp.bfloat16
    fwd_tol, grad_tol = 2e-2, 5e-2


@pytest.mark.gpu
class TestPaddedGpu(GroupedMatmulTest):
    """The padded backend in bf16 on GPU: cuBLAS batched GEMMs, the Mosaic kernels as fallback
    (inside the same lax.switch)."""

    impl = "padded"
    dtype = jnp.bfloat16
    fwd_tol, grad_tol = 2e-2, 5e-2


def test_gpu_blocks_fit_n_without_padding_the_weights():
    """grid_block_n shrinks to divide N's tile count (no per-call copy of padded weights)."""
    from pallas_kernels.moe.gpu import BlockSizes, fit_blocks

    base = BlockSizes()  # block_n 128, grid_block_n 4
    assert fit_blocks(base, 2 * 1408).grid_block_n == 2  # 22 tiles
    assert fit_blocks(base, 2 * 9216) is base  # 144 tiles: unchanged
    assert fit_blocks(base, 2048).grid_block_n == 4
    assert fit_blocks(base, 100).grid_block_n == 1  # one (padded) tile
    assert fit_blocks(base, 5 * 128).grid_block_n == 1
    assert fit_blocks(base, 6 * 128).grid_block_n == 3
