"""`pallas_kernels.attention` (unmasked softmax attention, the ViT's) and
`pallas_kernels.platform`: each implementation against the fp32 reference (the Pallas kernel in
interpret mode on CPU), and what "auto" picks on each platform."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from pallas_kernels import platform
from pallas_kernels.attention import api
from pallas_kernels.attention.gpu import flash_attention_gpu
from pallas_kernels.attention.reference import attention_reference


def rel(a, b) -> float:
    """max|a - b| / max|b| in float64; NaN never passes."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _qkv(s: int, dtype, h: int = 16):
    keys = jax.random.split(jax.random.key(s), 3)
    return [(3 * jax.random.normal(key, (2, s, 2, h))).astype(dtype) for key in keys]


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("s", [1, 15, 16, 17, 50])
def test_flash_kernel_interpret_matches_reference(dtype, tol, s):
    """Lengths that are not multiples of the blocks: the padded keys take no softmax mass."""
    q, k, v = _qkv(s, dtype)
    want = attention_reference(q, k, v, scale=0.3)
    got = flash_attention_gpu(q, k, v, scale=0.3, block_q=32, block_k=16, interpret=True)
    assert got.dtype == dtype and got.shape == q.shape
    assert rel(got, want) <= tol


@pytest.mark.parametrize("impl", ["xla", "pallas", "auto"])
def test_dispatcher_matches_reference(impl):
    """Default scale H**-0.5; off a GPU "pallas" runs in interpret mode and "auto" is xla."""
    q, k, v = _qkv(50, jnp.float32)
    got = api.attention(q, k, v, impl)
    assert rel(got, attention_reference(q, k, v)) <= 1e-5
    if impl == "auto" and not platform.on_gpu():
        np.testing.assert_array_equal(got, api.attention(q, k, v, "xla"))
    with pytest.raises(ValueError, match="must be one of"):
        api.attention(q, k, v, "flash")


def test_auto_candidates_by_platform(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert api.auto_candidates(jnp.bfloat16, 64) == ("xla",)
    assert "CUDA GPU" in api.cudnn_unsupported(jnp.zeros((1, 4, 2, 64), jnp.bfloat16))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert api.auto_candidates(jnp.bfloat16, 64) == ("cudnn", "pallas", "xla")
    assert api.auto_candidates(jnp.float16, 256) == ("pallas", "xla")  # cuDNN: H <= 128
    assert api.auto_candidates(jnp.bfloat16, 24) == ("cudnn", "xla")  # Triton: H % 16 == 0
    assert api.auto_candidates(jnp.float32, 64) == ("xla",)  # fp32 keeps the exact path


@pytest.mark.parametrize(
    "name, want", [("cpu", "cpu"), ("gpu", "gpu"), ("cuda", "gpu"), ("rocm", "gpu"), ("tpu", "tpu")]
)
def test_backend_names(monkeypatch, name, want):
    monkeypatch.setattr(jax, "default_backend", lambda: name)
    assert platform.backend() == want
    assert platform.on_gpu() == (want == "gpu") and platform.on_tpu() == (want == "tpu")


def test_match_vma_inside_shard_map():
    """A fresh zero array takes the varying axes of the sharded operand (None is skipped), so a
    scan carry started from it type-checks; outside shard_map it is returned as is."""
    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    x = jax.random.normal(jax.random.key(0), (len(jax.devices()) * 3,))
    x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("d")))

    def body(x):
        z = platform.match_vma(jnp.zeros((), x.dtype), None, x)
        total, _ = jax.lax.scan(lambda c, t: (c + t, None), z, x)
        return total[None]

    fn = jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec("d"), out_specs=PartitionSpec("d"))
    np.testing.assert_allclose(fn(x), x.reshape(-1, 3).sum(1), rtol=1e-6)
    z = jnp.zeros(3)
    assert platform.match_vma(z, x) is z
