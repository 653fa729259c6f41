"""Int8 weight-only quantisation in the model: the quantiser, int8 matmul sites against the
dequantised weights (fp32, 1e-5) on one device and on an EP x TP mesh, and the memory planner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import bytes_on_first_device

from minimax_jax import sharding
from minimax_jax.config import QUANTIZE_SCHEMES, ModelConfig
from minimax_jax.inference import memory
from minimax_jax.model import quant
from minimax_jax.model.cache import init_cache
from minimax_jax.model.causal_lm import MiniMaxForCausalLM
from minimax_jax.model.decoder import RunOptions, forward, forward_cached
from minimax_jax.model.moe import moe_dense, moe_gather, moe_sorted
from minimax_jax.model.proj import LayerSlice, proj

CFG = ModelConfig.preset("tiny-remote")  # 7 lightning + 1 softmax, 4 experts top-2, alpha != 1


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "NaN/inf"
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_quantizer_per_output_channel():
    w = np.random.RandomState(0).randn(3, 16, 2, 8).astype(np.float32)
    w[1, :, 0, 5] = 0.0  # an all-zero channel: scale 0, q 0, no NaN
    q, scale = quant.quantize(w, (1,))
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (3, 1, 2, 8)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1, keepdims=True) / 127, rtol=1e-6)
    assert np.abs(q).max() == 127 and np.all(np.abs(q).max(axis=1) == (scale[:, 0] > 0) * 127)
    assert np.all(np.abs(q * scale - w) <= scale / 2 * (1 + 1e-6))  # round to nearest
    qj, sj = quant.quantize(jnp.asarray(w), (1,))  # device and host give the same bits
    assert np.array_equal(qj, q) and np.array_equal(sj, scale)
    qa = quant.QArray(jnp.asarray(q), jnp.asarray(scale))
    r = quant.reshape(qa, (3, 16, 16))  # wi [E,D,2,F] -> [E,D,2F]: the scale follows
    assert r.scale.shape == (3, 1, 16)
    np.testing.assert_array_equal(r.dequantize(), qa.dequantize().reshape(3, 16, 16))
    with pytest.raises(ValueError, match="mixes contracted axes"):
        quant.reshape(qa, (3, 32, 8))


@pytest.mark.parametrize(
    "spec,xs,ws,contract",
    [
        ("btd,dnch->btnch", (2, 3, 16), (16, 4, 3, 8), (0,)),
        ("btnh,nhd->btd", (1, 1, 4, 8), (4, 8, 16), (0, 1)),  # one row: the paired path
    ],
)
def test_int8_proj_equals_dequantised_einsum(spec, xs, ws, contract, monkeypatch):
    from minimax_jax.model import proj as proj_mod

    kernel_calls = []
    real = proj_mod.gathered_matvec

    def spy(*a, scale=None, **kw):
        kernel_calls.append(scale is not None)
        return real(*a, scale=scale, **kw)

    monkeypatch.setattr(proj_mod, "gathered_matvec", spy)
    kx, kw = jax.random.split(jax.random.key(len(spec)))
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    qa = quant.QArray(*quant.quantize(w, contract))
    want = jnp.einsum(spec, x, qa.dequantize())
    stacked = jax.tree.map(lambda a: jnp.stack([a, a // 2, a]), qa)
    for weight in (qa, LayerSlice(stacked, jnp.int32(2))):
        for matvec in ("xla", "gpu_interpret"):  # one row: the int8 matvec kernel (interpret)
            assert _rel(proj(spec, x, weight, matvec=matvec), want) < 1e-6
    # the one-row spec reaches the kernel with its scales, for the weight and the layer view
    assert kernel_calls == ([True, True] if xs[0] * xs[1] == 1 else [])


def test_int8_moe_paths_equal_dense_on_dequantised_weights():
    e, d, f, k = 4, 32, 48, 2
    ks = jax.random.split(jax.random.key(3), 4)
    params = {
        "router": jax.random.normal(ks[0], (d, e)),
        "wi": quant.QArray(*quant.quantize(jax.random.normal(ks[1], (e, d, 2, f)), (1,))),
        "wo": quant.QArray(*quant.quantize(jax.random.normal(ks[2], (e, f, d)), (1,))),
    }
    deq = {n: w.dequantize() if isinstance(w, quant.QArray) else w for n, w in params.items()}
    x = jax.random.normal(ks[3], (24, d))
    want, _ = moe_dense(deq, x, k)
    assert _rel(jax.jit(moe_dense, static_argnums=2)(params, x, k)[0], want) < 1e-5
    for impl in ("xla", "padded"):
        run = jax.jit(lambda p, x, impl=impl: moe_sorted(p, x, k, implementation=impl)[0])
        assert _rel(run(params, x), want) < 1e-5, impl
    got = jax.jit(moe_gather, static_argnums=2)(params, x[:2], k)[0]
    assert _rel(got, moe_dense(deq, x[:2], k)[0]) < 1e-5


_forward = jax.jit(forward, static_argnums=(0, 4))
_cached = jax.jit(forward_cached, static_argnums=(0, 5))


def _inputs():
    rng = np.random.RandomState(5)
    ids = jnp.asarray(rng.randint(0, CFG.vocab_size, (2, 37)), jnp.int32)
    mask = jnp.ones((2, 37), jnp.int32).at[1, :20].set(0)  # left padding, multi-block
    return ids, mask


def _quantized(scheme):
    """(scheme, int8 model's pure params, the same weights dequantised to fp32, the fp32
    model's logits on `_inputs`)."""
    model = MiniMaxForCausalLM(CFG, rngs=nnx.Rngs(0), quantize=scheme)
    params = model.pure_params()
    deq = quant.dequantize_tree(params)
    want, _ = _forward(CFG, deq, *_inputs(), RunOptions())
    return scheme, params, deq, want


@pytest.fixture(scope="module", params=QUANTIZE_SCHEMES)
def quantized(request):
    """`_quantized` for each scheme."""
    return _quantized(request.param)


@pytest.fixture(scope="module")
def quantized_int8():
    """`_quantized("int8")`: it has every int8 site of "experts_int8" and the attention's."""
    return _quantized("int8")


def test_layout_and_leaves(quantized):
    scheme, params = quantized[:2]
    moe = params["blocks"][0]["moe"]
    assert moe["wi"]["q"].dtype == jnp.int8 and moe["wi"]["scale"].shape == (1, 4, 1, 2, 96)
    assert moe["wo"]["scale"].shape == (1, 4, 1, 64) and moe["router"].dtype == jnp.float32
    attn = params["blocks"][0]["attn"]
    assert isinstance(attn["qkv"], dict) == (scheme == "int8")
    assert params["embed"].dtype == params["lm_head"].dtype == jnp.float32
    assert attn["norm"].dtype == jnp.float32
    with pytest.raises(ValueError, match="experts_int8, int8"):
        MiniMaxForCausalLM(CFG, rngs=nnx.Rngs(0), quantize="int4")


def test_int8_model_equals_dequantised_model(quantized):
    """Prefill (sorted MoE, left padding), then a cached prefill + decode step on the one-row
    paths (moe_gather, LayerSlice views of int8 weights), against the fp32 model holding
    q * scale."""
    _, params, deq, want = quantized
    ids, mask = _inputs()
    got, _ = _forward(CFG, params, ids, mask, RunOptions())
    assert _rel(got, want) < 1e-5
    opts = RunOptions(matvec_impl="gpu_interpret")
    outs = []
    for p in (params, deq):
        cache = init_cache(CFG, 1, 24)
        first, cache = _cached(CFG, p, ids[:1, :17], mask[:1, :17], cache, opts)
        step, cache = _cached(CFG, p, ids[:1, 17:18], mask[:1, 17:18], cache, opts)
        outs.append(jnp.concatenate([first, step], axis=1))
    assert _rel(outs[0], outs[1]) < 1e-5


def test_int8_model_on_ep_tp_mesh_equals_one_device(quantized_int8):
    """8 devices, expert=2 x tensor=4 (tp_ep rules, all-to-all MoE): the int8 weights placed
    by the rules (scales split like the weights' outputs) give the dequantised one-device
    logits. "int8" only: it has every int8 site of "experts_int8" and the attention's."""
    scheme, params, _, want = quantized_int8
    rules, _ = sharding.load_rules("tp_ep")
    mesh = sharding.make_mesh(dict(fsdp=1, expert=2, tensor=4))
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(CFG, rngs=nnx.Rngs(0), quantize=scheme))
    shardings = sharding.pure_param_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    placed = jax.device_put(params, shardings)
    wi = placed["blocks"][0]["moe"]["wi"]
    assert wi["q"].sharding.spec == wi["scale"].sharding.spec  # experts x F, like the weight
    assert wi["scale"].sharding.spec[1] == "expert" and wi["scale"].sharding.spec[4] == "tensor"
    assert placed["blocks"][0]["attn"]["out"]["scale"].sharding.spec[1:3] == (None, None)
    opts = RunOptions(moe_impl="ep", mesh=mesh, rules=rules)
    with sharding.use_mesh(mesh):
        got, _ = _forward(CFG, placed, *_inputs(), opts)
    assert _rel(got, want) < 1e-5


def test_bfloat16_compute_keeps_scales_fp32(quantized_int8):
    _, params, _, want = quantized_int8
    run = jax.jit(forward, static_argnums=(0, 4, 5))
    got, _ = run(CFG, params, *_inputs(), RunOptions(), jnp.bfloat16)
    assert _rel(got, want) < 5e-2


# ------------------------------------------------------------------------------------- planner


def test_planner_counts_int8_and_scale_bytes():
    """tiny-remote by hand: D=64, N=4, H=32, K=2, F=96, E=4, V=512 (untied), 7 lightning + 1
    softmax layers; fp32 parameters."""
    D, N, H, K, F, E, V = 64, 4, 32, 2, 96, 4, CFG.vocab_size
    assert (CFG.hidden_size, CFG.num_heads, CFG.head_dim, CFG.num_kv_heads) == (D, N, H, K)
    outer = (2 * V * D + D) * 4  # embed, lm_head, final_norm
    norms = 2 * D * 4 * 8 + N * H * 4 * 7 + D * E * 4 * 8  # layer norms, lightning norm, router
    experts = 8 * (E * D * 2 * F + E * F * D)  # elements of wi + wo
    expert_scales = 8 * (E * 2 * F + E * D)
    lightning = 7 * (D * N * 3 * H + D * N * H + N * H * D)  # qkv, gate, out
    light_scales = 7 * (N * 3 * H + N * H + D)
    softmax = D * N * H + 2 * D * K * H + N * H * D  # q, k, v, o
    soft_scales = N * H + 2 * K * H + D
    fp32 = jnp.float32
    full = memory.weight_bytes(CFG, param_dtype=fp32)
    assert full == outer + norms + 4 * (experts + lightning + softmax) == CFG.param_count() * 4
    assert memory.weight_bytes(CFG, param_dtype=fp32, quantize="experts_int8") == (
        outer + norms + 4 * (lightning + softmax) + experts + 4 * expert_scales
    )
    int8 = outer + norms + experts + lightning + softmax
    int8 += 4 * (expert_scales + light_scales + soft_scales)
    assert memory.weight_bytes(CFG, param_dtype=fp32, quantize="int8") == int8
    plan = memory.plan_inference(CFG, batch=1, prompt_len=8, max_len=16, param_dtype=fp32,
                                 quantize="int8")  # fmt: skip
    assert plan.weights == int8
    train = memory.plan_training(CFG, batch=1, seq_len=16, quantize="int8")
    assert train.weights == int8 and train.gradients == outer + norms
    assert train.optimizer == 2 * (outer + norms)
    with pytest.raises(ValueError, match="experts_int8, int8"):
        memory.weight_bytes(CFG, quantize="int4")


@pytest.mark.parametrize("scheme", QUANTIZE_SCHEMES)
def test_sharded_planner_equals_placed_int8_shards(scheme):
    model = MiniMaxForCausalLM(CFG, rngs=nnx.Rngs(0), quantize=scheme)
    rules, _ = sharding.load_rules("fsdp_ep")
    mesh_shape = {"fsdp": 2, "expert": 2, "tensor": 2}
    mesh = sharding.make_mesh(mesh_shape)
    shardings = sharding.pure_param_shardings(nnx.state(model, nnx.Param), mesh, rules)
    placed = jax.device_put(model.pure_params(), shardings)
    held = bytes_on_first_device(placed)
    planned = memory.weight_bytes(CFG, mesh_shape, rules, jnp.float32, quantize=scheme)
    assert planned == held


@pytest.mark.parametrize("scheme", ["experts_int8", "int8"])
def test_quantize_params_in_memory(scheme):
    """`quant.quantize_params` turns a float params tree into the layout a quantised model is
    built with (same leaves, shapes, dtypes), each pair within half a step of the weight."""
    model = MiniMaxForCausalLM(CFG, rngs=nnx.Rngs(0))
    params = model.pure_params()
    qp = quant.quantize_params(CFG, params, scheme)
    layout = MiniMaxForCausalLM(CFG, rngs=nnx.Rngs(0), quantize=scheme).pure_params()
    assert jax.tree.map(lambda x: (x.shape, x.dtype), qp) == jax.tree.map(
        lambda x: (x.shape, x.dtype), layout
    )
    wi, pair = params["blocks"][0]["moe"]["wi"], qp["blocks"][0]["moe"]["wi"]
    err = np.abs(np.asarray(quant.QArray(pair["q"], pair["scale"]).dequantize()) - wi)
    assert (err <= np.asarray(pair["scale"]) / 2 + 1e-7).all() and err.max() > 0
    assert qp["embed"] is params["embed"]  # unquantised leaves are shared
    assert quant.quantize_params(CFG, params, None) is params
