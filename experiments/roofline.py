"""What a device can do and what a step must move: datasheet peaks, measured copy and matmul
rates, and the bytes of one decode step.

    peak = roofline.peak_for(jax.devices()[0].device_kind)   # Peak or None (unknown device)
    bw = roofline.copy_bandwidth()                            # {"copy_GBps": best, ...}
    floor = roofline.decode_step_bytes(cfg, batch=1, context=192)["total"]

MFU is quoted against the datasheet's dense bf16 rate (`Peak.bf16_tflops`), never a measured
matmul; the measured rate (`matmul_tflops`) is an extra column. Memory floors divide the bytes a
step must move (read + write) by the best device-to-device copy measured in the same run (read +
write bytes over the copy's device time), never by an elementwise op such as `x + 1`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from experiments import harness


@dataclasses.dataclass(frozen=True)
class Peak:
    """Datasheet figures of one device (per chip / per GPU)."""

    name: str
    bf16_tflops: float  # dense bf16 matmul (without 2:4 sparsity)
    hbm_tbps: float  # memory bandwidth
    source: str


# Keys are substrings of `jax.Device.device_kind`, matched in order (most specific first).
# NVIDIA's datasheets list bf16 "with sparsity"; the dense rate is half of it.
_NV_H100 = "https://www.nvidia.com/en-us/data-center/h100/ (H100 datasheet)"
_NV_H200 = "https://www.nvidia.com/en-us/data-center/h200/ (H200 datasheet)"
_NV_A100 = "https://www.nvidia.com/en-us/data-center/a100/ (A100 datasheet)"
PEAKS: tuple[tuple[str, Peak], ...] = (
    # H200 NVL: 1,671 TFLOPS bf16 with sparsity, 4.8 TB/s HBM3e
    ("H200 NVL", Peak("H200 NVL", 835.5, 4.8, _NV_H200)),
    # H200 SXM ("NVIDIA H200"): 1,979 TFLOPS bf16 with sparsity, 4.8 TB/s HBM3e
    ("H200", Peak("H200 SXM", 989.5, 4.8, _NV_H200)),
    # H100 NVL: 1,671 with sparsity, 3.9 TB/s
    ("H100 NVL", Peak("H100 NVL", 835.5, 3.9, _NV_H100)),
    # H100 PCIe: 1,513 with sparsity, 2.0 TB/s
    ("H100 PCIe", Peak("H100 PCIe", 756.5, 2.0, _NV_H100)),
    # H100 SXM ("NVIDIA H100 80GB HBM3"): 1,979 with sparsity, 3.35 TB/s
    ("H100", Peak("H100 SXM", 989.5, 3.35, _NV_H100)),
    # A100 80GB SXM: 312 dense bf16, 2.039 TB/s; 80GB PCIe 1.935 TB/s; 40GB 1.555 TB/s
    ("A100-SXM4-80GB", Peak("A100 SXM 80GB", 312.0, 2.039, _NV_A100)),
    ("A100 80GB PCIe", Peak("A100 PCIe 80GB", 312.0, 1.935, _NV_A100)),
    ("A100", Peak("A100 40GB", 312.0, 1.555, _NV_A100)),
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOPS bf16, 1,200 GB/s HBM per chip
    ("TPU v4", Peak("TPU v4", 275.0, 1.2, "https://cloud.google.com/tpu/docs/v4")),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOPS bf16, 819 GB/s (device_kind "TPU v5 lite")
    ("TPU v5 lite", Peak("TPU v5e", 197.0, 0.819, "https://cloud.google.com/tpu/docs/v5e")),
    ("TPU v5e", Peak("TPU v5e", 197.0, 0.819, "https://cloud.google.com/tpu/docs/v5e")),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOPS bf16, 2,765 GB/s (device_kind "TPU v5")
    ("TPU v5", Peak("TPU v5p", 459.0, 2.765, "https://cloud.google.com/tpu/docs/v5p")),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOPS bf16, 1,640 GB/s ("TPU v6 lite")
    ("TPU v6", Peak("TPU v6e", 918.0, 1.64, "https://cloud.google.com/tpu/docs/v6e")),
)


def peak_for(device_kind: str) -> Peak | None:
    """The datasheet peak of a `device_kind` (e.g. "NVIDIA H200", "TPU v5 lite"), or None."""
    for key, peak in PEAKS:
        if key.lower() in device_kind.lower():
            return peak
    return None


def peak_fields(device_kind: str) -> dict:
    """Row fields naming the datasheet peak used for MFU (null fields for an unknown device)."""
    p = peak_for(device_kind)
    if p is None:
        return {"peak_name": None, "peak_bf16_tflops": None, "peak_hbm_tbps": None,
                "peak_source": None}  # fmt: skip
    return {"peak_name": p.name, "peak_bf16_tflops": p.bf16_tflops, "peak_hbm_tbps": p.hbm_tbps,
            "peak_source": p.source}  # fmt: skip


def _device_copy(x):
    return jnp.copy(x)  # an HLO copy into a new buffer: XLA cannot forward the input


device_copy = jax.jit(_device_copy)


def copy_bandwidth(sizes: tuple[int, ...] | None = None, reps: int = harness.DEFAULT_REPS) -> dict:
    """The best device-to-device copy rate over a few buffer sizes (bytes): read + write bytes
    over the copy's device time (`harness.measure`). Sizes that do not fit are skipped.

    Returns {"copy_GBps": best, "copy_bytes": its size, "copy_sizes": {size: GB/s},
    "copy_timing_method": ...}."""
    if sizes is None:
        big = jax.default_backend() != "cpu"
        sizes = (256 << 20, 1 << 30, 2 << 30) if big else (4 << 20, 16 << 20)
    rates, method = {}, None
    for n in sizes:
        try:
            x = jnp.zeros((n // 2,), jnp.bfloat16) + 1  # touched, not a lazy constant
            t = harness.time_device(device_copy, x, reps=reps)
        except Exception:  # noqa: BLE001 - out of memory at this size: the others count
            continue
        rates[n] = 2 * x.nbytes / t.median / 1e9
        method = t.method
        del x
    if not rates:
        raise RuntimeError("no copy size could be measured")
    best = max(rates, key=rates.get)
    return {"copy_GBps": rates[best], "copy_bytes": best, "copy_sizes": rates,
            "copy_timing_method": method}  # fmt: skip


def matmul_tflops(n: int | None = None, dtype=jnp.bfloat16, reps: int = harness.DEFAULT_REPS):
    """Measured rate of one n x n x n matmul (TFLOP/s, device time): an extra column beside the
    datasheet peak, never the denominator of MFU."""
    n = n or (8192 if jax.default_backend() != "cpu" else 256)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    t = harness.time_device(jax.jit(jnp.matmul), a, b, reps=reps)
    return 2.0 * n**3 / t.median / 1e12


def expected_distinct(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts `tokens` tokens route to, each picking top_k distinct
    experts uniformly at random: E (1 - ((E - k) / E) ** tokens)."""
    return num_experts * (1.0 - ((num_experts - top_k) / num_experts) ** tokens)


def _leaf_bytes(x) -> int:
    return sum(int(leaf.size) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(x))


@functools.cache
def _abstract_params(config, param_dtype):
    from flax import nnx

    from minimax_jax import MiniMaxForCausalLM
    from minimax_jax.model.causal_lm import to_pure

    model = nnx.eval_shape(lambda: MiniMaxForCausalLM(config, rngs=nnx.Rngs(0),
                                                      param_dtype=param_dtype))  # fmt: skip
    return to_pure(nnx.state(model, nnx.Param))


def decode_step_bytes(
    config,
    batch: int,
    context: float,
    params=None,
    param_dtype=jnp.bfloat16,
    kv_bytes: int = 2,
    state_bytes: int = 4,
) -> dict:
    """Bytes one decode step of `batch` tokens must move (read + write), by part.

    - weights: every non-expert weight of the layers and the final norm, read once;
    - experts: per MoE layer, the expected distinct routed experts of batch x top_k uniform
      assignments (`expected_distinct`) times one expert's bytes;
    - embed_rows: the batch's embedding rows (tied embeddings: none, the head reads the table);
    - lm_head: the whole output projection (the table itself when tied);
    - lightning_state: each lightning layer's [B,N,H,H] state, read and written (fp32);
    - kv_cache: each softmax layer's K and V over `context` positions, read, plus the new
      token's K and V written;
    - logits: [B,V] fp32 written.
    `params` (optional, e.g. int8-quantised) gives the weight bytes; else the config's layout
    in param_dtype. `context` is the mean number of positions a step attends to.
    """
    c = config
    p = params if params is not None else _abstract_params(c, jnp.dtype(param_dtype))
    experts = dense = 0
    for block in p["blocks"]:
        moe = dict(block.get("moe", {}))
        ex = {k: moe.pop(k) for k in ("wi", "wo") if k in moe}
        experts += _leaf_bytes(ex)
        dense += _leaf_bytes({**block, "moe": moe})
    dense += _leaf_bytes(p["final_norm"])
    table = _leaf_bytes(p["embed"])
    row = table // c.vocab_size
    tied = "lm_head" not in p
    lm_head = table if tied else _leaf_bytes(p["lm_head"])
    n_lin = sum(t == "linear_attention" for t in c.layer_types)
    n_soft = c.num_layers - n_lin
    per_token_kv = 2 * c.num_kv_heads * c.head_dim * kv_bytes
    parts = {
        "weights": dense,
        "experts": experts
        * expected_distinct(c.num_experts, c.num_experts_per_tok, batch)
        / c.num_experts,
        "embed_rows": 0 if tied else batch * row,
        "lm_head": lm_head,
        "lightning_state": 2 * n_lin * batch * c.num_heads * c.head_dim**2 * state_bytes,
        "kv_cache": n_soft * batch * per_token_kv * (context + 1),
        "logits": batch * c.vocab_size * 4,
    }
    return {**{k: int(v) for k, v in parts.items()}, "total": int(sum(parts.values()))}
