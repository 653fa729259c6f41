"""The memory planner against what XLA allocates and what the sharded placement holds."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import bytes_on_first_device

from minimax_jax.config import ModelConfig
from minimax_jax.inference import memory
from minimax_jax.inference.memory import param_leaves
from minimax_jax.model.cache import cache_shapes
from minimax_jax.model.causal_lm import MiniMaxForCausalLM
from minimax_jax.model.decoder import forward_cached
from minimax_jax.sharding import load_rules, make_mesh, pure_param_shardings

CFG = ModelConfig.preset("tiny-remote").replace(
    hidden_size=256, intermediate_size=512, num_heads=8, head_dim=64, num_kv_heads=2,
    block_size=64, vocab_size=4096,
)  # fmt: skip


def compiled_prefill(cfg, batch, t, max_len, dtype=jnp.float32):
    """XLA's memory analysis of the default prefill step. float32: CPU XLA runs bfloat16 dots
    on float32 copies of the weights (a copy a GPU does not make), which bfloat16 would add."""
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=dtype))
    ids = jax.ShapeDtypeStruct((batch, t), jnp.int32)
    cache = cache_shapes(cfg, batch, max_len, dtype)
    fn = jax.jit(functools.partial(forward_cached, cfg, last_only=True))
    return fn.lower(abstract.pure_params(), ids, ids, cache).compile().memory_analysis()


def test_inference_plan_matches_compiled_prefill():
    batch, t, max_len = 4, 2048, 2176
    stats = compiled_prefill(CFG, batch, t, max_len)
    plan = memory.plan_inference(
        CFG, batch=batch, prompt_len=t, max_len=max_len, param_dtype=jnp.float32,
        kv_dtype=jnp.float32,
    )  # fmt: skip
    ids_bytes = 2 * batch * t * 4
    assert plan.weights + plan.cache == stats.argument_size_in_bytes - ids_bytes  # exact
    # CPU XLA also copies the scanned block's weights out of the stack each step (GPUs do not:
    # the full-scale plans match measured H200 peaks within 7%, experiments/RESULTS.md)
    sliced = (
        sum(
            math.prod(shape) * np.dtype(dtype).itemsize
            for shape, dtype, axes in param_leaves(CFG, jnp.float32)
            if axes[:1] == ("layers",)
        )
        // CFG.num_blocks
    )
    want = stats.temp_size_in_bytes - sliced
    assert abs(plan.activations - want) <= 0.1 * want


def test_sharded_weight_bytes_equal_placed_shards():
    cfg = ModelConfig.preset("tiny-remote")
    model = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0))
    for preset, mesh_shape in [
        ("fsdp_ep", {"fsdp": 2, "expert": 4}),
        ("tp_ep", {"expert": 2, "tensor": 4}),
    ]:
        rules, _ = load_rules(preset)
        mesh = make_mesh(
            mesh_shape | {k: 1 for k in ("data", "fsdp", "expert", "tensor") if k not in mesh_shape}
        )
        shardings = pure_param_shardings(nnx.state(model, nnx.Param), mesh, rules)
        placed = jax.device_put(model.pure_params(), shardings)
        held = bytes_on_first_device(placed)
        planned = memory.weight_bytes(cfg, mesh_shape, rules, param_dtype=jnp.float32)
        assert planned == held, preset
        assert planned < memory.weight_bytes(cfg, param_dtype=jnp.float32)


def test_full_model_plans():
    cfg = ModelConfig.preset("minimax-text-01")
    rules, _ = load_rules("tp_ep")
    one_gpu = memory.plan_inference(cfg, batch=1, prompt_len=8192, max_len=8448)
    eight = memory.plan_inference(
        cfg,
        batch=16,
        prompt_len=8192,
        max_len=8448,
        mesh_shape={"tensor": 8},
        rules=rules,
        prefill_chunk=2048,
    )
    assert one_gpu.weights == 912_210_767_872  # bf16, router fp32: the M1 index size
    assert 0.12 < eight.weights / one_gpu.weights <= 0.13  # tensor 8 splits all but norms/router
    assert np.isfinite(eight.total) and "GiB per device" in eight.report()


def test_flash_attention_plans_without_the_scores(monkeypatch):
    """A long prefill's peak on the "xla" path is the fp32 scores and probabilities
    [B,N,T,S] (hand-computed below); with cuDNN flash attention or the blockwise path (the
    default) the plan drops them, and the generation engine plans for what its softmax layers
    will run."""
    from minimax_jax.inference import engine as sampling
    from minimax_jax.model.decoder import RunOptions

    cfg = ModelConfig.preset("minimax-text-01")
    kw = dict(batch=1, prompt_len=8192, max_len=8448)
    xla = memory.plan_inference(cfg, attention_impl="xla", **kw)
    flash = memory.plan_inference(cfg, attention_impl="cudnn", **kw)
    default = memory.plan_inference(cfg, **kw)
    scores = 2 * 1 * 64 * 8192 * 8448 * 4  # 35.4 GB
    assert xla.activations >= scores > 10 * flash.activations
    # blockwise keeps the fp32 accumulator, its gradient and row statistics [B,T,N,2H+2] and
    # three 512 x 512 fp32 tiles per head instead of the scores: 0.74 GB, a 48th of them
    blockwise = 64 * (8192 * (2 * 128 + 2) * 4 + 3 * 512 * 512 * 4)
    assert xla.activations - default.activations == scores - blockwise
    assert scores > 40 * blockwise
    assert (xla.weights, xla.cache) == (flash.weights, flash.cache)

    params = MiniMaxForCausalLM(CFG, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16).pure_params()
    engines = {
        # one chunk for every impl (the automatic chunk would differ by impl and host memory)
        impl: sampling.Engine(
            CFG, params, options=RunOptions(attention_impl=impl), prefill_chunk=256
        )
        for impl in ("xla", "cudnn", "auto")
    }
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match=r'attention_impl="cudnn" needs a CUDA GPU'):
            engines["cudnn"].plan(1, 2048, 16)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what a GPU host would plan
    plans = {impl: e.plan(1, 2048, 16) for impl, e in engines.items()}
    t, s = plans["xla"]["chunk"], plans["xla"]["max_len"]
    act = {impl: p["activations"] for impl, p in plans.items()}
    # a cached prefill chunk on cuDNN ("cudnn", and what "auto" runs there) splits into the
    # chunk (causal) and the cached prefix (no mask): fp32 merged output, the part being merged
    # and their log-sum-exps, the rotated bf16 q [B,T,N,H] and one piece of rotated K and V
    # [B,min(32768,S),K,H]; never below the blockwise fallback (accumulators and three tiles)
    assert act["cudnn"] == act["auto"]
    kv = CFG.num_kv_heads
    split = 8 * t * (2 * 64 * 4 + 2 * 4 + 64 * 2) + 2 * min(32768, s) * kv * 64 * 2
    tiles = 3 * min(512, t) * min(512, s) * 4
    blockwise = 8 * (t * (2 * 64 + 2) * 4 + tiles)
    assert act["xla"] - act["auto"] == 2 * 8 * t * s * 4 - max(split, blockwise)
    # the bias path is still planned for callers that name it (masked training rows)
    bias = memory.softmax_score_bytes(CFG, 1, t, s, None, None, "cudnn", 2)
    assert bias == t * s * 2 + 2 * 8 * t * 4


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_default_paths_memory_grows_linearly():
    """XLA's temp bytes of the default prefill step (a chunk of T against a cache of T + 128
    slots) and training step (loss and all gradients over T tokens) at T, 2T, 4T grow at most
    linearly; the materialised-scores path ("xla") is the control that grows faster."""
    from minimax_jax.model.decoder import RunOptions, forward

    cfg = CFG.replace(hidden_size=128, intermediate_size=128, num_heads=4, head_dim=32)
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)))
    params = abstract.pure_params()

    def prefill(t, impl):
        ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
        cache = cache_shapes(cfg, 1, t + 128, jnp.float32)
        opts = RunOptions(attention_impl=impl)
        fn = functools.partial(forward_cached, cfg, last_only=True, opts=opts)
        return _temp_bytes(fn, params, ids, ids, cache)

    def train(t, impl):
        ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
        opts = RunOptions(attention_impl=impl, remat_policy="full")

        def loss(p, ids):
            logits, _ = forward(cfg, p, ids, opts=opts, compute_dtype=jnp.bfloat16)
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return _temp_bytes(jax.grad(loss), params, ids)

    t = 512  # up to 2048: 4096 would equal the vocabulary, and [T,V] logits look quadratic
    for step in (prefill, train):
        small, mid, big = (step(n, "auto") for n in (t, 2 * t, 4 * t))
        assert mid <= 2.05 * small and big <= 4.1 * small, (step.__name__, small, mid, big)
        dense = [step(n, "xla") for n in (t, 4 * t)]
        assert dense[1] > 5 * dense[0], (step.__name__, dense)


def test_engine_accepts_prompts_up_to_max_positions():
    """A prompt of exactly max_position_embeddings tokens with one new token is planned (the
    sampled token is never fed back, so it needs no position); one more token is refused."""
    from minimax_jax.inference import engine as sampling

    cfg = CFG.replace(max_position_embeddings=4096)
    params = MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16).pure_params()
    eng = sampling.Engine(cfg, params, prefill_chunk=1024)
    plan = eng.plan(1, 4096, 1)
    assert plan["padded_prompt"] == 4096 and plan["max_len"] >= 4096
    assert eng.plan(1, 4000, 97)["padded_prompt"] == 4096
    for prompt, new in ((4096, 2), (4097, 1), (4000, 98)):
        with pytest.raises(ValueError, match="max_position_embeddings"):
            eng.plan(1, prompt, new)


def test_long_context_plans_in_the_readme():
    """The README's long-context figures (hand-checked terms; H200: 141 GB per device):
    MiniMax-Text-01 in bf16 on 8 GPUs (tp_ep, tensor 8) prefilling a 4M-token prompt in chunks
    of 8192, and 1M-token training rows on 512 GPUs (fsdp_ep, expert 8 x sequence 64)."""
    from minimax_jax.sharding import load_rules

    cfg = ModelConfig.preset("minimax-text-01")
    tp_ep, _ = load_rules("tp_ep")
    four_m = 4 * 2**20
    infer = memory.plan_inference(
        cfg, batch=1, prompt_len=four_m, max_len=four_m + 256, prefill_chunk=8192,
        mesh_shape=dict(tensor=8), rules=tp_ep,
    )  # fmt: skip
    # softmax K/V cache: 10 softmax layers x (4M + 256) slots x 1 kv head per device x 128 x K,V
    kv = 10 * (four_m + 256) * 1 * 128 * 2 * 2
    # lightning states: 70 layers x 8 heads per device x 128 x 128 fp32
    states = 70 * 8 * 128 * 128 * 4
    book = (four_m + 256) + 4 + 4  # slot validity [B,S] bool, the index, positions [B]
    assert infer.cache == kv + states + book
    assert infer.total < 141e9 and infer.total / 2**30 > 120  # 127.4 GiB
    fsdp_ep, _ = load_rules("fsdp_ep")
    train = memory.plan_training(
        cfg, batch=8, seq_len=2**20, mesh_shape=dict(fsdp=1, expert=8, sequence=64),
        rules=fsdp_ep,
    )  # fmt: skip
    assert train.total < 141e9
    # fp32 weights, gradients and two moments; experts split over all 512 devices, the other
    # weights over fsdp x sequence = 64 (their model dim), so at least 4 bytes / 512 per param
    assert train.gradients == train.weights and train.optimizer == 2 * train.weights
    assert 4 * cfg.param_count() / 512 <= train.weights < 4 * cfg.param_count() / 64


def test_int8_plans_in_the_readme():
    """The README's int8 figures: MiniMax-Text-01 with experts_int8 on 8 x 80 GB (tp_ep, tensor
    8) holds a 1M-token prompt, and about 3.7M tokens is the longest that fits under 80 GB; with
    int8 on 8 x H200 the model's whole 10,240,000 positions fit under 141 GB."""
    from minimax_jax.sharding import load_rules

    cfg = ModelConfig.preset("minimax-text-01")
    tp_ep, _ = load_rules("tp_ep")

    def plan(prompt, quantize, new=256):
        return memory.plan_inference(
            cfg, batch=1, prompt_len=prompt, max_len=prompt + new, prefill_chunk=8192,
            mesh_shape=dict(tensor=8), rules=tp_ep, quantize=quantize,
            attention_impl="cudnn_chunk",
        )  # fmt: skip

    bf16, one_m = plan(2**20, None), plan(2**20, "experts_int8")
    assert one_m.cache == bf16.cache and one_m.activations == bf16.activations
    assert bf16.total > 80e9 > one_m.total and round(one_m.total / 2**30, 1) == 61.8
    assert plan(3_694_592, "experts_int8").total <= 80e9 < plan(3_710_976, "experts_int8").total
    full = plan(cfg.max_position_embeddings - 256, "int8")
    assert full.total < 141e9 and round(full.total / 2**30, 1) == 103.5
    assert round(full.cache / 2**30, 1) == 48.9 and round(full.weights / 2**30, 1) == 53.5
