"""GPU lightning-attention kernels (pallas_kernels.lightning.gpu) against an fp32 recurrence.

The `gpu`-marked tests run the compiled kernels on the lent GPU machine; the interpret-mode test
runs the same Pallas kernels through the interpreter on CPU (small shapes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gpu_mod = pytest.importorskip("pallas_kernels.lightning.gpu")


def recurrence(q, k, v, slopes, init):
    """fp32 token-by-token recurrence. q, k, v [B, T, N, H]; init [B, N, H, H] -> (o, S)."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    lam = jnp.exp(-slopes.astype(jnp.float32))[None, :, None, None]

    def step(state, x):
        qt, kt, vt = x
        state = lam * state + kt[..., :, None] * vt[..., None, :]
        return state, jnp.einsum("bnd,bnde->bne", qt, state, precision="highest")

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v))
    state, o = jax.lax.scan(step, init.astype(jnp.float32), xs)
    return jnp.swapaxes(o, 0, 1), state


def rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert np.all(np.isfinite(a))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def minimax_slopes(n: int) -> jax.Array:
    return jnp.asarray(2.0 ** (-8.0 * (np.arange(n) + 1) / n) * (1 - 3 / 79 + 1e-5), jnp.float32)


def _inputs(seed, b, t, n, h, dtype):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q, k, v = (jax.random.normal(ks[i], (b, t, n, h), jnp.float32) * 0.3 for i in range(3))
    init = jax.random.normal(ks[3], (b, n, h, h), jnp.float32) * 0.1
    do = jax.random.normal(ks[4], (b, t, n, h), jnp.float32)
    dfin = jax.random.normal(ks[5], (b, n, h, h), jnp.float32) * 0.1
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), init, do.astype(dtype), dfin


def _check(b, t, n, h, dtype, tol, *, interpret, block=None, config=None, seed=0):
    q, k, v, init, do, dfin = _inputs(seed, b, t, n, h, dtype)
    s = minimax_slopes(n)

    def f(q, k, v, init):
        return gpu_mod.lightning_attention_gpu(
            q,
            k,
            v,
            s,
            init,
            block_size=block,
            config=config,
            bwd_config=config,
            interpret=interpret,
        )

    (o, fin), vjp = jax.vjp(f, q, k, v, init)
    grads = vjp((do, dfin))
    (o_r, fin_r), vjp_r = jax.vjp(lambda *a: recurrence(*a[:3], s, a[3]), q, k, v, init)
    grads_r = vjp_r((do.astype(jnp.float32), dfin))
    assert o.dtype == q.dtype and o.shape == q.shape
    assert fin.dtype == jnp.float32 and fin.shape == (b, n, h, h)
    assert rel(o, o_r) < tol
    assert rel(fin, fin_r) < tol
    for g, gr in zip(grads, grads_r, strict=True):
        assert rel(g, gr) < tol


def test_interpret_cpu_fp32():
    _check(1, 100, 2, 16, jnp.float32, 1e-4, interpret=True, block=16)
    _check(
        1,
        160,
        1,
        32,
        jnp.float32,
        1e-4,
        interpret=True,
        block=16,
        config={"segments": 2, "block_v": 16},
    )


def test_decode_interpret_cpu():
    b, n, h = 2, 2, 32
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (b, n, h)) for i in range(3))
    state = jax.random.normal(jax.random.PRNGKey(7), (b, n, h, h))
    s = minimax_slopes(n)
    want_s = jnp.exp(-s)[None, :, None, None] * state + k[..., :, None] * v[..., None, :]
    want_o = jnp.einsum("bnd,bnde->bne", q, want_s, precision="highest")
    o, new = gpu_mod.lightning_decode_gpu(q, k, v, s, state + 0.0, block_v=16, interpret=True)
    assert rel(o, want_o) < 1e-5 and rel(new, want_s) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize(
    "b,t,n,h,block,config",
    [
        (2, 1024, 4, 128, None, None),
        (1, 1000, 2, 128, 64, None),  # ragged T
        (1, 4096, 2, 128, 64, {"segments": 4}),  # segment-parallel path
        (1, 777, 2, 64, 128, {"segments": 2, "block_v": 32}),
    ],
)
def test_gpu_bf16(b, t, n, h, block, config):
    _check(b, t, n, h, jnp.bfloat16, 2e-2, interpret=False, block=block, config=config)


@pytest.mark.gpu
def test_gpu_fp32_inputs():
    _check(1, 512, 2, 64, jnp.float32, 1e-2, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 5])
def test_gpu_decode_matches_scan(b):
    n, h, t = 4, 128, 3
    q, k, v, init, _, _ = _inputs(3, b, t, n, h, jnp.bfloat16)
    s = minimax_slopes(n)
    o_r, fin_r = recurrence(q, k, v, s, init)
    state = init
    outs = []
    for i in range(t):
        o, state = gpu_mod.lightning_decode_gpu(q[:, i], k[:, i], v[:, i], s, state)
        outs.append(o)
    assert rel(jnp.stack(outs, 1), o_r) < 1e-2
    assert rel(state, fin_r) < 1e-4


def test_interpret_cpu_states_tiling_and_fold():
    cfg = {"segments": 2, "states_block": 32, "states_block_v": 16, "fold": False}
    _check(1, 250, 1, 32, jnp.float32, 1e-4, interpret=True, block=16, config=cfg)


def _packed_ids(t: int) -> np.ndarray:
    """Three rows of segment ids over T tokens: runs that start mid-block, exactly on a block
    boundary (16 and 32) and on the last token, one-token documents, a padded tail (id 0); a row
    without a change; a row whose id changes at every token."""
    first = np.concatenate([np.full(5, 1), np.full(11, 2), np.full(16, 3), np.full(1, 4),
                            np.full(40, 5), np.zeros(t - 73 - 1), [6]])  # fmt: skip
    return np.stack([first, np.ones(t), np.arange(t) % 2]).astype(np.int32)


def _check_packed(b, t, n, h, dtype, tol, *, interpret, block, config):
    """segment_ids: outputs, final state and every gradient (incl. the initial state's) equal
    the fp32 token recurrence that restarts at each id change, forward and reverse scans."""
    from pallas_kernels.lightning.reference import lightning_attention_reference

    q, k, v, init, do, dfin = _inputs(3, b, t, n, h, dtype)
    s = minimax_slopes(n)
    seg = jnp.asarray(_packed_ids(t)[:b])

    def f(q, k, v, init):
        return gpu_mod.lightning_attention_gpu(
            q, k, v, s, init, segment_ids=seg, block_size=block, config=config,
            bwd_config=config, interpret=interpret,
        )  # fmt: skip

    def ref(q, k, v, init):
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        return lightning_attention_reference(
            f32(q), f32(k), f32(v), s, initial_state=init, segment_ids=seg
        )

    (o, fin), vjp = jax.vjp(f, q, k, v, init)
    (o_r, fin_r), vjp_r = jax.vjp(ref, q, k, v, init)
    assert rel(o, o_r) < tol and rel(fin, fin_r) < tol
    # the reference's outputs are fp32: its cotangent is the same upstream gradient in fp32
    grads_r = vjp_r((do.astype(o_r.dtype), dfin))
    for name, g, gr in zip("q k v init".split(), vjp((do, dfin)), grads_r, strict=True):
        assert rel(g, gr) < tol, name
    # the packed rows really differ from one unbroken sequence (the masks did something)
    o_plain, _ = gpu_mod.lightning_attention_gpu(
        q, k, v, s, init, block_size=block, config=config, interpret=interpret
    )
    assert rel(o_plain[0], o_r[0]) > 5 * tol and rel(o_plain[1], o_r[1]) < tol


@pytest.mark.parametrize(
    "config",
    [None, {"segments": 2, "block_v": 16}, {"segments": 2, "states_block": 32, "fold": False}],
    ids=["one_segment", "two_segments", "two_segments_unfolded"],
)
def test_interpret_cpu_packed_segments(config):
    _check_packed(3, 100, 2, 16, jnp.float32, 1e-4, interpret=True, block=16, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, {"segments": 4}], ids=["auto", "four_segments"])
def test_gpu_packed_segments_bf16(config):
    _check_packed(2, 1000, 4, 128, jnp.bfloat16, 2e-2, interpret=False, block=64, config=config)


def test_segment_ids_shape_is_checked():
    q = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\] = \(1, 8\)"):
        gpu_mod.lightning_attention_gpu(q, q, q, jnp.ones(1), segment_ids=jnp.zeros((1, 9)))


def test_kernels_lower_for_gpu():
    """Cross-lowering to CUDA (jax.export, no GPU needed) runs the Pallas -> Triton lowering of
    the forward and backward scans, with and without segment ids, and catches its errors early
    (the Triton compiler itself runs only on the GPU machine)."""
    b, t, n, h = 1, 1000, 2, 128
    x = jnp.ones((b, t, n, h), jnp.bfloat16)
    slopes, s0 = minimax_slopes(n), jnp.zeros((b, n, h, h), jnp.float32)

    def loss(q, k, v, s0, seg):
        o, s = gpu_mod.lightning_attention_gpu(
            q, k, v, slopes, s0, segment_ids=seg, config={"segments": 2}
        )
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    triton = "__gpu$xla.gpu.triton"
    checks = [jax.export.DisabledSafetyCheck.custom_call(triton)]
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    for seg in (None, jnp.zeros((b, t), jnp.int32)):
        exported = jax.export.export(grad, platforms=["cuda"], disabled_checks=checks)
        assert f"custom_call @{triton}" in exported(x, x, x, s0, seg).mlir_module()


def test_auto_dispatch_on_gpu_takes_kernel_for_packed_rows(monkeypatch):
    """On a GPU backend "auto" runs the Pallas kernel for packed rows (segment_ids), and falls
    back to XLA only for head dims the kernel does not handle; both equal the recurrence."""
    from pallas_kernels.lightning import api

    calls = []
    real_gpu, real_xla = gpu_mod.lightning_attention_gpu, api._xla.lightning_attention_xla

    def spy(name, fn):
        return lambda *a, **kw: (calls.append(name), fn(*a, **kw))[1]

    monkeypatch.setattr(api.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(gpu_mod, "lightning_attention_gpu", spy("gpu", real_gpu))
    monkeypatch.setattr(api._xla, "lightning_attention_xla", spy("xla", real_xla))
    seg = jnp.asarray(_packed_ids(80)[:1])
    s = minimax_slopes(2)
    for h, want in ((16, "gpu"), (24, "xla")):
        q, k, v = jax.random.normal(jax.random.key(h), (3, 1, 80, 2, h), jnp.float32)
        calls.clear()
        with api.interpret_mode():
            o, fin = api.lightning_attention(q, k, v, s, segment_ids=seg)
        assert calls == [want]
        o_r, fin_r = api.lightning_attention(
            q, k, v, s, segment_ids=seg, implementation="reference"
        )
        assert rel(o, o_r) < 1e-4 and rel(fin, fin_r) < 1e-4
