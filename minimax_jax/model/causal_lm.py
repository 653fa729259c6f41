"""MiniMaxForCausalLM: the MiniMax-Text-01 / MiniMax-M1 language model in Flax NNX.

The module holds parameters only; `__call__` gathers them into a pure dict and runs
`minimax_jax.model.decoder.forward`. For jit, split once and call the pure function:

    graphdef, params = nnx.split(model, nnx.Param)
    logits = jax.jit(model_forward, static_argnums=0)(config, pure_params, ids, mask)
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.config import ModelConfig, check_quantize
from minimax_jax.model.decoder import RunOptions, forward
from minimax_jax.model.layers import DecoderLayer, spec_param
from minimax_jax.sharding import ShardingRules, param_shardings


class MiniMaxForCausalLM(nnx.Module):
    """embed [V,D], blocks[p] (DecoderLayer stacked over num_blocks), final_norm [D], lm_head [D,V].

    Args:
      config: the model configuration.
      rngs: random streams for initialisation (`nnx.Rngs(seed)`).
      param_dtype: dtype of every weight except the MoE router (always fp32).
      quantize: None, or an int8 weight-only scheme (``minimax_jax.config.QUANTIZE_SCHEMES``):
        the weights it covers are drawn in param_dtype, then stored as int8 ``q`` + fp32
        ``scale`` pairs (`minimax_jax.model.quant`).
      options: kernels / MoE path / remat (no effect on the math).
      mesh, rules: create the parameters sharded by `rules` (`minimax_jax.sharding`) on mesh
        and run with activation constraints and the MoE under shard_map (set in `options`).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
        options: RunOptions | None = None,
        mesh: jax.sharding.Mesh | None = None,
        rules: ShardingRules | None = None,
        quantize: str | None = None,
    ):
        options = options or RunOptions()
        check_quantize(quantize)
        if (mesh is None) != (rules is None):
            raise ValueError("MiniMaxForCausalLM: give both mesh and rules, or neither")
        if mesh is not None:
            options = dataclasses.replace(options, mesh=mesh, rules=rules)
            self._init_sharded(config, rngs, param_dtype, options, quantize)
            return
        self.config = config
        self.options = options
        self.quantize = quantize
        outer = config.outer_param_layout()
        self.embed = spec_param(config, outer["embed"], rngs, param_dtype)
        self.blocks = nnx.List(
            [
                DecoderLayer(
                    config,
                    kind,
                    config.num_blocks,
                    rngs=rngs,
                    dtype=param_dtype,
                    quantize=quantize,
                )  # fmt: skip
                for kind in config.block_pattern
            ]
        )
        self.final_norm = spec_param(config, outer["final_norm"], rngs, param_dtype)
        if "lm_head" in outer:
            self.lm_head = spec_param(config, outer["lm_head"], rngs, param_dtype)

    def _init_sharded(self, config, rngs, param_dtype, options, quantize) -> None:
        """Create every parameter directly in its shards (a jitted init with out_shardings).

        Same values as the unsharded init with the same rngs; no full copy on any one device.
        """

        def make(r):
            return MiniMaxForCausalLM(config, rngs=r, param_dtype=param_dtype, quantize=quantize)

        abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
        shardings = nnx.to_pure_dict(
            param_shardings(nnx.state(abstract, nnx.Param), options.mesh, options.rules)
        )
        rng_graph, rng_state = nnx.split(rngs)

        def init(rng_state):
            r = nnx.merge(rng_graph, rng_state)
            values = nnx.to_pure_dict(nnx.state(make(r), nnx.Param))
            return values, nnx.state(r)

        values, rng_state = jax.jit(init, out_shardings=(shardings, None))(rng_state)
        nnx.update(rngs, rng_state)
        self.config, self.options, self.quantize = config, options, quantize
        for name in ("embed", "blocks", "final_norm", "lm_head"):
            if hasattr(abstract, name):
                setattr(self, name, getattr(abstract, name))
        state = nnx.state(self, nnx.Param)
        nnx.replace_by_pure_dict(state, values)
        nnx.update(self, state)

    def pure_params(self) -> dict:
        """The parameters as a nested dict of arrays (block positions as a list)."""
        return to_pure(nnx.state(self, nnx.Param))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        compute_dtype: Any = None,
    ) -> jax.Array:
        """input_ids [B,T] int, attention_mask [B,T] (1 token, 0 left pad) -> logits [B,T,V]."""
        check_inputs(self.config, input_ids, attention_mask)
        logits, _ = forward(
            self.config,
            self.pure_params(),
            jnp.asarray(input_ids, jnp.int32),
            None if attention_mask is None else jnp.asarray(attention_mask),
            self.options,
            compute_dtype,
        )
        return logits


def to_pure(state: nnx.State) -> dict:
    """nnx.State of Params -> nested dict of arrays; the `blocks` list becomes a Python list."""
    pure = nnx.to_pure_dict(state)
    blocks = pure["blocks"]
    pure["blocks"] = [blocks[i] for i in sorted(blocks, key=int)]
    return pure


def check_inputs(config: ModelConfig, input_ids, attention_mask) -> None:
    """Clear errors for bad shapes, dtypes or token ids (value checks only on concrete arrays)."""
    shape = np.shape(input_ids)
    if len(shape) != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {shape}")
    if not jnp.issubdtype(jnp.result_type(input_ids), jnp.integer):
        raise TypeError(f"input_ids must be integers, got {jnp.result_type(input_ids)}")
    if attention_mask is not None and np.shape(attention_mask) != shape:
        raise ValueError(
            f"attention_mask shape {np.shape(attention_mask)} != input_ids shape {shape}"
        )
    if not isinstance(input_ids, jax.core.Tracer) and shape[1] > 0:
        ids = np.asarray(input_ids)
        if ids.min() < 0 or ids.max() >= config.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {config.vocab_size}); "
                f"got range [{ids.min()}, {ids.max()}]"
            )
