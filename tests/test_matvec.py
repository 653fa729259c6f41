"""gathered_matvec (the decode matvec kernel) against its reference, and the model paths that use
it (one-row projections, the gathered-expert MoE, batch-1 decode) against the XLA paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_model as tm

from minimax_jax.inference import engine as sampling
from minimax_jax.model.decoder import RunOptions
from minimax_jax.model.moe import moe_dense, moe_gather
from minimax_jax.model.proj import LayerSlice, proj
from pallas_kernels.matvec import gathered_matvec
from pallas_kernels.matvec.api import resolve_implementation
from pallas_kernels.matvec.gpu import BlockSizes, gathered_matvec_gpu, pick_blocks
from pallas_kernels.matvec.reference import gathered_matvec_reference


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "NaN/inf"
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _inputs(seed, a, e, k, n, dtype=jnp.float32):
    kx, kw, ki = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (a, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (e, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    return x, w, jax.random.randint(ki, (a,), 0, e, jnp.int32)


def _loop_reference(x, w, index):
    """Row by row in float64 numpy: independent of the einsum under test."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return np.stack([x[a] @ w[int(i)] for a, i in enumerate(np.asarray(index))])


# (A, E, K, N): decode-like, one expert (a plain projection), N not a multiple of 256 (block 32),
# K with a single 16-row step, repeated experts.
SHAPES = [(2, 4, 64, 96), (1, 1, 128, 256), (3, 5, 96, 48), (4, 2, 16, 32)]


class MatvecTest:
    """Subclassed once per implementation."""

    impl = "xla"
    dtype = jnp.float32
    tol = 1e-5

    @pytest.mark.parametrize("shape", SHAPES)
    def test_against_loop_reference(self, shape):
        x, w, idx = _inputs(sum(shape), *shape, dtype=self.dtype)
        got = jax.jit(lambda x, w, i: gathered_matvec(x, w, i, implementation=self.impl))(x, w, idx)
        assert got.shape == (shape[0], shape[3]) and got.dtype == jnp.float32
        assert _rel(got, _loop_reference(x, w, idx)) < self.tol


class TestXla(MatvecTest):
    impl = "xla"


class TestGpuInterpret(MatvecTest):
    """The Triton kernel in Pallas interpret mode on CPU."""

    impl = "gpu_interpret"


@pytest.mark.gpu
class TestGpu(MatvecTest):
    """The Triton kernel on a GPU, bf16 weights against the float64 loop."""

    impl = "gpu"
    dtype = jnp.bfloat16
    tol = 1e-2


def test_explicit_blocks_and_split_k_sum_the_same():
    x, w, idx = _inputs(5, 3, 4, 128, 64)
    want = gathered_matvec_reference(x, w, idx)
    for blocks in (BlockSizes(16, 16, 1), BlockSizes(32, 64, 4), BlockSizes(16, 32, 8)):
        got = gathered_matvec_gpu(x, w, idx, blocks=blocks, interpret=True)
        assert _rel(got, want) < 1e-5, blocks
    with pytest.raises(ValueError, match="do not tile"):
        gathered_matvec_gpu(x, w, idx, blocks=BlockSizes(32, 64, 3), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(24, 64, 1)


def test_pick_blocks_fills_the_gpu():
    # The decode shapes of the 1.5B benchmark model: MoE w1/w3 and w2 for 2 assignments, qkv.
    for a, k, n in [(2, 2048, 2816), (2, 1408, 2048), (1, 2048, 6144), (1, 2048, 32000)]:
        b = pick_blocks(a, k, n)
        assert n % b.block_n == 0 and (k // b.block_k) % b.splits == 0
        programs = a * n // b.block_n * b.splits
        assert 128 <= programs <= 2048, (a, k, n, b, programs)
    with pytest.raises(ValueError, match="multiples of 16"):
        pick_blocks(1, 100, 64)


def test_bad_arguments_raise():
    x, w, idx = _inputs(1, 2, 3, 32, 16)
    with pytest.raises(ValueError, match="implementation"):
        resolve_implementation("cuda", 32, 16)
    with pytest.raises(ValueError, match="index"):
        gathered_matvec(x, w, idx[:1])
    with pytest.raises(ValueError, match=r"x \[A,K\]"):
        gathered_matvec(x[:, :16], w, idx)
    assert resolve_implementation("auto", 32, 16) in ("xla", "gpu")
    assert resolve_implementation("auto", 30, 16) == "xla"  # unsupported shape: never the kernel
    with pytest.raises(ValueError, match="matvec_impl"):
        RunOptions(matvec_impl="triton")


@pytest.mark.parametrize(
    "spec,xs,ws",
    [("btd,dnch->btnch", (1, 1, 32), (32, 2, 3, 16)), ("btnh,nhd->btd", (1, 1, 2, 16), (2, 16, 48)),
     ("btd,dkh->btkh", (1, 1, 48), (48, 1, 16)), ("btd,dnh->btnh", (2, 1, 32), (32, 2, 16))],
)  # fmt: skip
def test_proj_kernel_path_equals_einsum(spec, xs, ws):
    kx, kw = jax.random.split(jax.random.key(len(spec)))
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    want = jnp.einsum(spec, x, w, precision=jax.lax.Precision.HIGHEST)
    stacked = jnp.stack([jnp.zeros_like(w), w, 2 * w])  # layer 1 of 3, left unsliced
    for matvec in ("xla", "gpu_interpret"):
        for weight in (w, LayerSlice(stacked, jnp.int32(1))):
            got = proj(spec, x, weight, matvec=matvec)
            assert got.shape == want.shape and _rel(got, want) < 1e-5, (matvec, type(weight))


def test_moe_gather_kernel_path_equals_dense():
    e, d, f, k = 4, 32, 48, 2
    ks = jax.random.split(jax.random.key(3), 4)
    params = {
        "router": jax.random.normal(ks[0], (d, e)),
        "wi": jax.random.normal(ks[1], (e, d, 2, f)) / np.sqrt(d),
        "wo": jax.random.normal(ks[2], (e, f, d)) / np.sqrt(f),
    }
    x = jax.random.normal(ks[3], (2, d))
    want, lg0 = moe_dense(params, x, k)
    got, lg = moe_gather(params, x, k, matvec="gpu_interpret")
    assert _rel(got, want) < 1e-5 and _rel(lg, lg0) == 0
    # Expert weights stacked over 3 layers, this one the last: indexed in place by the kernel.
    views = {n: LayerSlice(jnp.stack([params[n] * 3, -params[n], params[n]]), 2)
             for n in ("wi", "wo")}  # fmt: skip
    for matvec in ("xla", "gpu_interpret"):
        got, _ = moe_gather({**params, **views}, x, k, matvec=matvec)
        assert _rel(got, want) < 1e-5, matvec


def test_batch1_decode_with_the_kernel_equals_xla(monkeypatch):
    """Greedy batch-1 generation with every one-row projection, the gathered MoE and the
    lm_head on the kernel (interpret mode) gives the XLA path's tokens."""
    from pallas_kernels.matvec import api

    calls = []
    kernel = api._gpu.gathered_matvec_gpu
    monkeypatch.setattr(api._gpu, "gathered_matvec_gpu",
                        lambda *a, **kw: calls.append(a[1].shape) or kernel(*a, **kw))  # fmt: skip
    model = tm.random_model(tm.tiny(rotary_dim=16), seed=4)
    cfg, params = model.config, model.pure_params()
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 21))
    outs = []
    for impl in ("xla", "gpu_interpret"):
        engine = sampling.Engine(cfg, params, prefill_chunk=16, sync_every=4,
                                 options=RunOptions(matvec_impl=impl))  # fmt: skip
        outs.append(sampling.generate(model, ids, max_new_tokens=9, engine=engine))
    np.testing.assert_array_equal(outs[1], outs[0])
    # Traced once per decode-step kind: 7 lightning x 3 + 1 softmax x 4 + MoE 8 x 2 + lm_head.
    assert len(calls) >= 7 * 3 + 4 + 16 + 1 and (1, 64, 512) in calls
