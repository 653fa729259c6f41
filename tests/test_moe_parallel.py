"""Expert-parallel MoE (shard_map + all-to-all) equals the dense reference on every mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import MESHES

from minimax_jax import sharding
from minimax_jax.model import moe_parallel
from minimax_jax.model.moe import expert_ffn, moe_dense, moe_gather, moe_sorted, route, router_aux
from minimax_jax.model.moe import row_bucket_sizes as expert_ffn_sizes
from minimax_jax.model.moe_parallel import moe_ep

D, E, F, K = 64, 4, 96, 2


def _mesh(name):
    shape = MESHES[name]
    return sharding.single_device_mesh() if shape is None else sharding.make_mesh(shape)


@pytest.fixture(scope="module")
def problem():
    k = jax.random.split(jax.random.key(0), 4)
    params = {
        "router": jax.random.normal(k[0], (D, E)) * 0.5,
        "wi": jax.random.normal(k[1], (E, D, 2, F)) / 8,
        "wo": jax.random.normal(k[2], (E, F, D)) / 10,
    }
    x = jax.random.normal(k[3], (8, 6, D))
    return params, x


def _dense(params, x):
    y, logits = moe_dense(params, x.reshape(-1, D), K)
    return y.reshape(x.shape), logits.reshape(*x.shape[:2], E)


def _loss(fn):
    def loss(params, x):
        y, logits = fn(params, x)
        return jnp.sum(y * jnp.sin(y)) + 0.1 * jnp.sum(logits**2)

    return jax.grad(loss, argnums=(0, 1))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a))
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _place(params, mesh, rules):
    axes = {"router": ("embed", "experts"), "wi": ("experts", "embed", "gate_up", "mlp"),
            "wo": ("experts", "mlp", "embed")}  # fmt: skip
    return {k: jax.device_put(v, rules.sharding(mesh, axes[k], v.shape)) for k, v in params.items()}


def _assert_matches_dense(fn, params, x, placed=None, placed_x=None):
    """fn's outputs and gradients (on the placed inputs, if given) equal the dense layer's."""
    p, xs = (params if placed is None else placed), (x if placed_x is None else placed_x)
    y, logits = jax.jit(fn)(p, xs)
    y0, logits0 = _dense(params, x)
    assert _rel(y, y0) < 1e-5 and _rel(logits, logits0) < 1e-5
    for got, want in zip(jax.tree.leaves(jax.jit(_loss(fn))(p, xs)),
                         jax.tree.leaves(_loss(_dense)(params, x)), strict=True):  # fmt: skip
        assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_ep_matches_dense(problem, mesh_name, monkeypatch):
    params, x = problem
    # Row buckets of 8 rows, so the receive side's lax.switch runs at these tiny sizes too.
    monkeypatch.setattr(moe_parallel, "EP_ROW_MULTIPLE", 8)
    mesh = _mesh(mesh_name)
    rules, _ = sharding.load_rules("fsdp_ep")
    ps = _place(params, mesh, rules)
    xs = jax.device_put(x, rules.sharding(mesh, ("batch", "length", "act_embed"), x.shape))

    def fn(p, x):
        return moe_ep(p, x, K, mesh=mesh, rules=rules, dispatch="dense")

    _assert_matches_dense(fn, params, x, ps, xs)


@pytest.mark.parametrize("mb", [2, 4])  # 6 tokens per device: 2 micro-batches of 3; 4 -> 1
def test_ep_microbatches_match_dense(problem, mb):
    params, x = problem
    mesh = _mesh("data2_expert4")
    rules, _ = sharding.load_rules("fsdp_ep")

    def fn(p, x):
        return moe_ep(p, x, K, mesh=mesh, rules=rules, dispatch="dense", microbatches=mb)

    _assert_matches_dense(fn, params, x)
    with pytest.raises(ValueError, match="microbatches"):
        moe_ep(params, x, K, mesh=mesh, rules=rules, microbatches=0)


@pytest.mark.parametrize("mesh_name", ["data2_expert4", "fsdp2_expert2_tensor2", "data8"])
def test_ep_padded_implementation_matches_dense(problem, mesh_name):
    """The "padded" grouped matmul (batched GEMMs over capacity-padded groups, a lax.switch per
    device) inside shard_map: same outputs and gradients as the dense layer (all-to-all and,
    on data8, no expert axis)."""
    params, x = problem
    mesh = _mesh(mesh_name)
    rules, _ = sharding.load_rules("fsdp_ep")

    def fn(p, x):
        return moe_ep(p, x, K, mesh=mesh, rules=rules, dispatch="dense", implementation="padded")

    _assert_matches_dense(fn, params, x)


@pytest.mark.parametrize("impl", ["auto", "padded"])
def test_ep_tokens_replicated_over_expert_axis(problem, impl):
    """Decode-style: tokens not split over `expert`; each device adds its experts' rows
    (with "padded", what GPU "auto" runs for bf16)."""
    params, x = problem
    mesh = sharding.make_mesh(dict(data=2, fsdp=1, expert=2, tensor=2))
    rules = sharding.ShardingRules.from_mapping({"batch": "data", "experts": "expert",
                                                 "mlp": "tensor"})  # fmt: skip

    def fn(p, x):
        return moe_ep(p, x, K, mesh=mesh, rules=rules, implementation=impl)

    _assert_matches_dense(fn, params, x)


def test_capacity_factor(problem):
    """c = P keeps every row (exact); a small c drops rows but stays finite and differentiable."""
    params, x = problem
    mesh = _mesh("data2_expert4")
    rules, _ = sharding.load_rules("fsdp_ep")
    y0 = _dense(params, x)[0]

    def run(cf):
        def fn(p, x):
            return moe_ep(p, x, K, mesh=mesh, rules=rules, capacity_factor=cf)

        return jax.jit(fn)(params, x)[0], jax.jit(_loss(fn))(params, x)

    y, _ = run(4.0)
    assert _rel(y, y0) < 1e-5
    y, grads = run(0.3)
    assert np.all(np.isfinite(np.asarray(y))) and _rel(y, y0) > 1e-3
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_ragged_dispatch_lowers(problem):
    """lax.ragged_all_to_all has no CPU lowering; check that the GPU/TPU path traces and lowers."""
    params, x = problem
    mesh = _mesh("data2_expert4")
    rules, _ = sharding.load_rules("fsdp_ep")

    def fn(p, x):
        return moe_ep(p, x, K, mesh=mesh, rules=rules, dispatch="ragged")

    assert "ragged_all_to_all" in jax.jit(_loss(fn)).lower(params, x).as_text()


def test_sorted_matches_dense(problem):
    params, x = problem
    y, lg = moe_sorted(params, x.reshape(-1, D), K)
    y0, lg0 = moe_dense(params, x.reshape(-1, D), K)
    assert _rel(y, y0) < 1e-5 and _rel(lg, lg0) == 0
    # Gradients through the gather-only dispatch/combine (custom VJP of permute_rows).
    g = _loss(lambda p, x: moe_sorted(p, x.reshape(-1, D), K))(params, x)
    g0 = _loss(lambda p, x: moe_dense(p, x.reshape(-1, D), K))(params, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0), strict=True):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("rows", [1, 3, 48])
def test_gather_matches_sorted_and_dense(problem, rows):
    params, x = problem
    xm = x.reshape(-1, D)[:rows]
    y, lg = moe_gather(params, xm, K)
    y0, lg0 = moe_dense(params, xm, K)
    y1, _ = moe_sorted(params, xm, K)
    assert _rel(y, y0) < 1e-5 and _rel(lg, lg0) == 0 and _rel(y, y1) < 1e-5
    # bf16 weights and tokens: the same rounding steps as the sorted path.
    pb = {k: v.astype(jnp.bfloat16) if k != "router" else v for k, v in params.items()}
    yb, _ = moe_gather(pb, xm.astype(jnp.bfloat16), K)
    yb1, _ = moe_sorted(pb, xm.astype(jnp.bfloat16), K, implementation="xla")
    assert yb.dtype == jnp.bfloat16 and _rel(yb, yb1) < 1e-2


def test_router_aux_and_jitter(problem):
    params, x = problem
    xf = x.reshape(-1, D)
    _, experts, logits = route(xf, params["router"], K)
    aux = router_aux(logits, K)
    load = np.bincount(np.asarray(experts).reshape(-1), minlength=E) / experts.size
    np.testing.assert_allclose(aux["expert_load"], load, rtol=1e-6)
    probs = jax.nn.softmax(logits, -1)
    want_lb = E * np.sum(load * K * np.asarray(probs.mean(0)))
    np.testing.assert_allclose(aux["load_balancing_loss"], want_lb, rtol=1e-5)
    z = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(aux["z_loss"], np.mean(np.asarray(z) ** 2), rtol=1e-5)
    mask = jnp.arange(xf.shape[0]) < 20  # padding tokens do not count
    masked = router_aux(logits, K, mask)
    np.testing.assert_allclose(masked["z_loss"], router_aux(logits[:20], K)["z_loss"], rtol=1e-6)
    w1, _, _ = route(xf, params["router"], K, jitter_key=jax.random.key(1), jitter_noise=0.1)
    w2, _, _ = route(xf, params["router"], K, jitter_key=jax.random.key(1), jitter_noise=0.1)
    w0, _, _ = route(xf, params["router"], K)
    assert np.array_equal(w1, w2) and not np.array_equal(w1, w0)


@pytest.mark.parametrize("used", [0, 1, 300, 777, 1024])
def test_expert_ffn_row_buckets(used):
    """The bucketed FFN (EP receive buffers) equals the plain one, values and gradients, for
    every used-row count; rows past the used ones give zero either way."""
    assert expert_ffn_sizes(1024, 256) == (128, 256, 384, 512, 768, 1024)
    assert expert_ffn_sizes(1000, 800, 32) == (224, 416, 608, 800, 832, 864, 928, 1000)
    k = jax.random.split(jax.random.key(3), 4)
    xs = jax.random.normal(k[0], (1024, D))  # the unused tail holds garbage, not zeros
    wi = jax.random.normal(k[1], (E, D, 2, F)) / 8
    wo = jax.random.normal(k[2], (E, F, D)) / 10
    cuts = np.sort(np.random.RandomState(used).randint(0, used + 1, E - 1))
    gs = jnp.asarray(np.diff(np.concatenate([[0], cuts, [used]])), jnp.int32)
    assert int(gs.sum()) == used

    def loss(buckets):
        def f(xs, wi, wo):
            y = expert_ffn(xs, wi, wo, gs, "xla", expected_rows=buckets)
            return jnp.sum(y * jnp.cos(y)), y

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(xs, wi, wo)

    (l1, y1), g1 = loss(None)
    (l8, y8), g8 = loss(256)
    assert np.all(np.asarray(y8[used:]) == 0) and np.all(np.asarray(y1[used:]) == 0)
    if used:
        assert _rel(y8, y1) < 1e-6
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
        assert _rel(a, b) < 1e-5 if np.any(np.asarray(b)) else not np.any(np.asarray(a))
