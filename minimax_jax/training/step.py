"""The jitted pieces of training: optimizer, train step (grad accumulation, skip on non-finite),
eval step, and the FLOP count used for MFU.

Einsum letters: A microbatches, B rows, T length. The train state is a pytree
{"params": fp32 nested dict, "opt_state": optax state, "step": int32 scalar}; the step donates it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from minimax_jax.config import LINEAR, ModelConfig
from minimax_jax.model.decoder import RunOptions, forward
from minimax_jax.training import losses


def decay_mask(params: dict) -> dict:
    """True where weight decay applies: not on norms (any ``*norm*`` leaf) nor the embedding."""

    def keep(path, _):
        names = [str(getattr(k, "key", "")) for k in path]
        return not any("norm" in n for n in names) and names[0] != "embed"

    return jax.tree_util.tree_map_with_path(keep, params)


def build_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with linear warmup then cosine decay to ``end_lr_ratio * lr``; global-norm clip."""
    decay_steps = max(optim.decay_steps or total_steps, optim.warmup_steps + 1)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.lr,
        warmup_steps=optim.warmup_steps,
        decay_steps=decay_steps,
        end_value=optim.lr * optim.end_lr_ratio,
    )
    adamw = optax.adamw(
        schedule,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=decay_mask,
    )
    if optim.clip_norm is None:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw), schedule


def batch_loss(
    config, opts, compute_dtype, optim, params, tokens, segment_ids, total_tokens, a, packed=True
):
    """Objective of one microbatch, scaled so the sum over ``a`` microbatches is the batch loss.

    tokens, segment_ids [B,T] int32. Returns (objective, (nll sum, lb loss, z loss)).
    packed=False: rows are single documents (attention ignores segment ids; on GPU "auto" then
    runs the Pallas lightning kernel, which it keeps off packed rows until measured there).
    """
    logits, router = forward(
        config, params, tokens, None, opts, compute_dtype,
        segment_ids=segment_ids if packed else None,
    )  # fmt: skip
    targets, weights, mask = losses.shifted_targets(tokens, segment_ids)
    nll, _ = losses.cross_entropy(logits, targets, weights)
    lb = losses.load_balancing_loss(router, config.num_experts_per_tok, mask)
    z = losses.router_z_loss(router, mask)
    objective = nll / total_tokens + (optim.load_balance_coef * lb + optim.z_loss_coef * z) / a
    return objective, (nll, lb, z)


def make_train_step(
    config: ModelConfig, opts: RunOptions, compute_dtype: Any, optim, tx, packed: bool = True
) -> Callable:
    """state, batch {"tokens","segment_ids": int32 [A,B,T]} -> (state, metrics of fp32 scalars).

    Gradients of the A microbatches are summed in a scan (the loss is the token-weighted mean
    over the whole batch, so accumulation equals one big batch). A non-finite loss or gradient
    leaves params and optimizer state unchanged (``metrics["skipped"] = 1``); ``step`` advances.
    """
    grad_fn = jax.value_and_grad(
        lambda p, *a: batch_loss(config, opts, compute_dtype, optim, p, *a, packed=packed),
        has_aux=True,
    )

    def step(state, batch):
        tokens, seg = batch["tokens"], batch["segment_ids"]
        a = tokens.shape[0]
        _, weights, _ = losses.shifted_targets(
            tokens.reshape(-1, tokens.shape[-1]), seg.reshape(-1, seg.shape[-1])
        )
        total = jnp.maximum(jnp.sum(weights), 1.0)
        params = state["params"]

        def micro(carry, xs):
            (obj, aux), g = grad_fn(params, xs[0], xs[1], total, a)
            acc_g, acc = carry
            acc_g = jax.tree.map(jnp.add, acc_g, g)
            return (acc_g, jax.tree.map(jnp.add, acc, (obj, *aux))), None

        zeros = (jax.tree.map(jnp.zeros_like, params), (0.0, 0.0, 0.0, 0.0))
        (grads, (obj, nll, lb, z)), _ = jax.lax.scan(micro, zeros, (tokens, seg))
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(obj) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)

        def pick(new, old):
            return jnp.where(ok, new, old)

        new_state = {
            "params": jax.tree.map(pick, new_params, params),
            "opt_state": jax.tree.map(pick, opt_state, state["opt_state"]),
            "step": state["step"] + 1,
        }
        metrics = {
            "loss": nll / total,
            "objective": obj,
            "lb_loss": lb / a,
            "z_loss": z / a,
            "grad_norm": grad_norm,
            "skipped": 1.0 - ok.astype(jnp.float32),
            "tokens": total,
        }
        return new_state, metrics

    return step


def make_eval_step(config: ModelConfig, opts: RunOptions, compute_dtype: Any) -> Callable:
    """params, batch {"tokens","segment_ids": [B,T]} -> (nll sum, predicted-token count)."""

    def step(params, batch):
        tokens, seg = batch["tokens"], batch["segment_ids"]
        logits, _ = forward(config, params, tokens, None, opts, compute_dtype, segment_ids=seg)
        targets, weights, _ = losses.shifted_targets(tokens, seg)
        return losses.cross_entropy(logits, targets, weights)

    return step


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul params + attention (fwd + bwd = 3 x fwd).

    Softmax layers: causal QK^T and PV, 2 * T * N * H multiply-adds per token on average.
    Lightning layers: the intra-block causal part as softmax with the block C, plus the
    inter-block state read and update, 2 * N * H * H multiply-adds each.
    """
    d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    moe = d * config.num_experts + config.num_experts_per_tok * 3 * d * config.intermediate_size
    light = 5 * d * n * h  # qkv (3) + gate + out
    soft = 2 * d * n * h + 2 * d * k * h
    attn_fwd = 0.0
    params = d * config.vocab_size  # lm head
    c = min(config.block_size, seq_len)
    for kind in config.layer_types:
        params += moe + (light if kind == LINEAR else soft)
        if kind == LINEAR:
            attn_fwd += 2 * (2 * c * n * h / 2) + 2 * (2 * n * h * h)
        else:
            attn_fwd += 2 * (2 * seq_len * n * h / 2)
    return 6.0 * params + 3.0 * attn_fwd


def measure_peak_flops(dtype: Any, device: jax.Device | None = None) -> float:
    """Measured matmul FLOP/s of one device in ``dtype`` (best of a few square matmuls)."""
    import time

    device = device or jax.devices()[0]
    size = 1024 if device.platform == "cpu" else 8192
    x = jax.device_put(jnp.ones((size, size), dtype), device)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(3 if device.platform == "cpu" else 10):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best
