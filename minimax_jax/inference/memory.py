"""Memory planner: bytes per device for weights, caches, activations and optimizer state.

Used by `generate` (printed before compiling, and a refusal when it will not fit) and by training
plans. Weights, gradients, optimizer state and caches are exact: every parameter's shard shape
comes from its logical axes and the same `ShardingRules.spec` the model is placed with.
Activations are a model of the peak of one jitted call (documented per term below), not a
measurement; `experiments/fullscale/` compares the plan with measured peaks.

Einsum letters: B batch, T tokens per call, S cache slots, D model, N heads, K kv heads, H head
dim, E experts, F expert FFN, V vocab, C lightning block.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from minimax_jax.config import LINEAR, ModelConfig
from minimax_jax.model.attention import BLOCK, PIECE
from minimax_jax.sharding import MESH_AXES, ShardingRules

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device."""

    weights: int
    cache: int = 0
    activations: int = 0
    gradients: int = 0
    optimizer: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.activations + self.gradients + self.optimizer

    def report(self) -> str:
        parts = [
            f"{k} {getattr(self, k) / GiB:.2f}"
            for k in ("weights", "cache", "activations", "gradients", "optimizer")
            if getattr(self, k)
        ]
        return f"{self.total / GiB:.2f} GiB per device (" + ", ".join(parts) + ")"


def _mesh_like(mesh_shape: Mapping[str, int] | None):
    shape = {a: 1 for a in MESH_AXES} | dict(mesh_shape or {})
    return types.SimpleNamespace(shape=shape)


def _shard_elems(shape, axes, mesh, rules: ShardingRules | None) -> int:
    if rules is None:
        return math.prod(shape)
    spec = rules.spec(axes, mesh, shape)
    div = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            div *= mesh.shape[axis]
    return math.prod(shape) // div


def param_leaves(
    config: ModelConfig, param_dtype: Any = jnp.bfloat16, quantize: str | None = None
) -> list[tuple]:
    """[(shape, dtype, logical_axes)] of every parameter, from the config's parameter layout;
    with ``quantize`` (``QUANTIZE_SCHEMES``) the weights it covers are int8 ``q`` leaves plus
    fp32 ``scale`` leaves (one per output channel)."""

    def dtype(s):
        return np.dtype(np.int8 if s.int8 else jnp.float32 if s.float32 else param_dtype)

    specs = list(config.outer_param_layout().values())
    for kind in config.block_pattern:
        layout = config.layer_param_layout(kind, quantize)
        specs += [s.stacked(config.num_blocks) for s in layout.values()]
    return [(s.shape, dtype(s), s.axes) for s in specs]


def weight_bytes(
    config, mesh_shape=None, rules=None, param_dtype=jnp.bfloat16, quantize=None
) -> int:
    """Parameter bytes on one device (``quantize``: int8 weights and their scales)."""
    mesh = _mesh_like(mesh_shape)
    return sum(
        _shard_elems(s, a, mesh, rules) * np.dtype(d).itemsize
        for s, d, a in param_leaves(config, param_dtype, quantize)
    )


def cache_bytes(config, batch, max_len, mesh_shape=None, rules=None, kv_dtype=jnp.bfloat16) -> int:
    """Lightning states [NB,B,N,H,H] fp32, softmax K/V [NB,B,S,K,H] and bookkeeping, per device."""
    mesh = _mesh_like(mesh_shape)
    nb, n, h, k = config.num_blocks, config.num_heads, config.head_dim, config.num_kv_heads
    local_batch = _split(batch, ("batch",), mesh, rules)
    total = local_batch * max_len + 4 + 4 * local_batch  # valid [B,S] bool, index, positions [B]
    for kind in config.block_pattern:
        if kind == LINEAR:
            shape, axes, size = (nb, batch, n, h, h), ("layers", "batch", "heads", None, None), 4
            total += _shard_elems(shape, axes, mesh, rules) * size
        else:
            shape, axes = (nb, batch, max_len, k, h), ("layers", "batch", None, "kv_heads", None)
            total += 2 * _shard_elems(shape, axes, mesh, rules) * np.dtype(kv_dtype).itemsize
    return total


def _split(n: int, axes: tuple[str, ...], mesh, rules) -> int:
    """n divided by the mesh axes a logical dimension maps to (when they divide it)."""
    return _shard_elems((n,), axes, mesh, rules) if rules else n


def softmax_score_bytes(config, batch, t, s, mesh, rules, attention_impl="blockwise", cb=2) -> int:
    """The softmax layer's attention temporaries for T queries over S keys.

    "xla": fp32 scores and probabilities [B,N,T,S] (quadratic; the prefill chunk bounds T).
    "cudnn" (flash): fp32 row statistics [B,N,T] and the mask as a bias [B,T,S] in the compute
    dtype (cb bytes); the planner does not know whether a call is plain causal (no bias).
    "cudnn_chunk" (a prefill chunk against the cache through cuDNN without a mask, the model's
    `attention._cudnn_chunk`): the fp32 merged output and the part being merged [B,T,N,H], their
    fp32 log-sum-exps [B,T,N], the rotated q [B,T,N,H] and one piece of rotated K and V
    [B,min(PIECE,S),K,H] in the compute dtype; at least the "blockwise" figure (its fallback
    branch is compiled beside it).
    "blockwise": the fp32 output accumulator and its gradient [B,T,N,H] with the row statistics,
    plus one query block's tile of fp32 logits, probabilities and their gradient
    [B,N,C_q,C_k] (linear in T and independent of S).
    """
    if all(kind == LINEAR for kind in config.block_pattern):
        return 0
    n = _split(config.num_heads, ("heads",), mesh, rules)
    if attention_impl == "cudnn":
        return batch * t * s * cb + 2 * batch * n * t * 4
    if attention_impl == "cudnn_chunk":
        kv = _split(config.num_kv_heads, ("kv_heads",), mesh, rules)
        h = config.head_dim
        piece = 2 * batch * min(PIECE, s) * kv * h * cb
        split = batch * n * t * (2 * h * 4 + 2 * 4 + h * cb) + piece
        return max(split, softmax_score_bytes(config, batch, t, s, mesh, rules, "blockwise", cb))
    if attention_impl == "blockwise":
        cq, ck = min(BLOCK, t), min(BLOCK, s)
        return batch * n * (t * (2 * config.head_dim + 2) * 4 + 3 * cq * ck * 4)
    return 2 * batch * n * t * s * 4


def layer_activation_bytes(config, tokens, mesh, rules, compute_bytes) -> int:
    """Peak live bytes inside one layer for `tokens` tokens on this device.

    Lightning: q, k, v [T,N,H], output and gate [T,N*H] in the compute dtype, the recurrence's
    fp32 copies of q, k, v and its fp32 output, the fp32 intra-block score tiles [T/C, N, C, C]
    and per-block states [T/C, N, H, H]. MoE: the sorted copies [T*k, D], the fused gate/up
    product [T*k, 2F] and the fp32 expert output [T*k, D].
    """
    n = _split(config.num_heads, ("heads",), mesh, rules)
    h, d, c = config.head_dim, config.hidden_size, config.block_size
    f = _split(config.intermediate_size, ("mlp",), mesh, rules)
    k = config.num_experts_per_tok
    blocks = -(-tokens // c)
    lightning = tokens * n * h * (5 * compute_bytes + 4 * 4) + blocks * n * (c * c + h * h) * 4
    moe = tokens * k * (d * compute_bytes + 2 * f * compute_bytes + d * 4)
    return max(lightning, moe) + 4 * tokens * d * compute_bytes  # + residual stream copies


def plan_inference(
    config,
    *,
    batch,
    prompt_len,
    max_len,
    mesh_shape=None,
    rules=None,
    param_dtype=jnp.bfloat16,
    kv_dtype=jnp.bfloat16,
    prefill_chunk=None,
    weights: int | None = None,
    attention_impl: str = "blockwise",
    quantize: str | None = None,
):
    """Weights + caches + the peak of one prefill chunk (last-position logits only): the layer's
    activations and the softmax temporaries beside them.

    With a `sequence` mesh axis (rules map `length` to it) each device computes chunk / P of the
    chunk's tokens against every cache slot (the KV cache is not split over sequence) and holds
    the gathered K, V of the whole chunk.

    quantize: an int8 weight-only scheme (``minimax_jax.config.QUANTIZE_SCHEMES``): its weights
    count 1 byte per element plus 4 per output-channel scale (activations and caches are
    unchanged: the matmuls run in param_dtype);
    weights: bytes already known (e.g. of loaded params) instead of computing them;
    attention_impl: the softmax layers' implementation as resolved ("blockwise", "xla" or
    "cudnn"; see `softmax_score_bytes`).
    """
    mesh = _mesh_like(mesh_shape)
    local_batch = _split(batch, ("batch",), mesh, rules)
    chunk = min(prompt_len, prefill_chunk or prompt_len)
    local = _split(chunk, ("length",), mesh, rules)  # the chunk's tokens on this device
    cb = np.dtype(param_dtype).itemsize
    act = layer_activation_bytes(config, local_batch * local, mesh, rules, cb)
    scores = softmax_score_bytes(
        config, local_batch, local, max_len, mesh, rules, attention_impl, cb
    )
    if local < chunk:  # the whole chunk's K, V [B,T,K,H], gathered to write the cache
        kv = _split(config.num_kv_heads, ("kv_heads",), mesh, rules)
        scores += 2 * local_batch * chunk * kv * config.head_dim * cb
    # the softmax layer's temporaries live beside its q, k, v and the residual stream
    act += scores
    act += local_batch * _split(config.vocab_size, ("vocab",), mesh, rules) * 4
    return MemoryPlan(
        weights=weight_bytes(config, mesh_shape, rules, param_dtype, quantize)
        if weights is None
        else weights,
        cache=cache_bytes(config, batch, max_len, mesh_shape, rules, kv_dtype),
        activations=int(act),
    )


def plan_training(
    config,
    *,
    batch,
    seq_len,
    mesh_shape=None,
    rules=None,
    param_dtype=jnp.float32,
    compute_dtype=jnp.bfloat16,
    optimizer_moments=2,
    remat="full",
    attention_impl="blockwise",
    quantize=None,
):
    """fp32 params, grads and AdamW moments (sharded like the params), and activations.

    quantize: the weights of that int8 scheme count as frozen int8 + fp32 scales, with no
    gradient or moments (only the floating-point parameters have those). A planning figure:
    the training loop itself does not train quantised models.

    With a `sequence` mesh axis (rules map `length` to it) each device holds T / P tokens of a
    row; its softmax layers also hold the all-gathered K, V of the whole row.
    With remat="full" (per block) the saved activations are one [T,D] residual per block plus
    one block recomputed in the backward (its 8 layers' intermediates, and the softmax layer's
    attention temporaries beside them); without remat every layer's intermediates are kept.
    Logits and their gradient are [T,V] fp32.
    """
    mesh = _mesh_like(mesh_shape)
    local_batch = _split(batch, ("batch",), mesh, rules)
    local_len = _split(seq_len, ("length",), mesh, rules)  # the sequence axis splits tokens
    tokens = local_batch * local_len
    cb = np.dtype(compute_dtype).itemsize
    w = weight_bytes(config, mesh_shape, rules, param_dtype, quantize)
    trainable = w - _int8_bytes(config, mesh, rules, quantize)
    layer = layer_activation_bytes(config, tokens, mesh, rules, cb)
    residual = tokens * config.hidden_size * cb
    scores = softmax_score_bytes(
        config, local_batch, local_len, seq_len, mesh, rules, attention_impl, cb
    )
    if local_len < seq_len:  # all-gathered K, V [B,S,K,H] and their fp32 gradients
        kv = _split(config.num_kv_heads, ("heads",), mesh, rules)
        scores += 2 * local_batch * seq_len * kv * config.head_dim * (cb + 4)
    soft = sum(kind != LINEAR for kind in config.block_pattern)  # softmax layers per block
    if remat == "full":  # one block recomputed in the backward: its layers' intermediates
        act = config.num_blocks * residual + config.period * layer + soft * scores
    else:
        act = config.num_layers * (layer + residual) + config.num_blocks * soft * scores
    act += 2 * tokens * _split(config.vocab_size, ("vocab",), mesh, rules) * 4
    return MemoryPlan(
        weights=w,
        activations=int(act),
        gradients=trainable,
        optimizer=optimizer_moments * trainable,
    )


def _int8_bytes(config, mesh, rules, quantize) -> int:
    """Bytes on one device of the int8 weights and their scales (frozen: no grads, moments)."""
    total = 0
    for kind in config.block_pattern:
        for spec in config.layer_param_layout(kind).values():
            if spec.quantized_by(quantize):
                for leaf in spec.stacked(config.num_blocks).int8_pair().values():
                    size = 1 if leaf.int8 else 4
                    total += _shard_elems(leaf.shape, leaf.axes, mesh, rules) * size
    return total
