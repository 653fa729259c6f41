"""NNX modules of the decoder: they only create parameters (with logical axis names).

The shapes, logical axes and initialisers come from the one parameter layout,
``ModelConfig.layer_param_layout`` / ``outer_param_layout``; all math is in the functional
modules of this wing (the model gathers the parameters into a pure dict and calls them). Every
layer parameter carries a leading ``layers`` axis of size ``stack`` (the number of repeats of the
block position it belongs to), so the stack is scanned, not unrolled.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax.config import ModelConfig, ParamSpec
from minimax_jax.model import quant


def param(rngs: nnx.Rngs | None, shape, axes, dtype, *, std: float | None) -> nnx.Param:
    """A parameter drawn from N(0, std) (std None: ones, for norm weights) tagged with axes."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {shape} and logical axes {axes} differ in rank")
    if std is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


def spec_param(
    cfg: ModelConfig, spec: ParamSpec, rngs: nnx.Rngs, dtype, stack: int | None = None
) -> nnx.Param:
    """The parameter ``spec`` describes, with a leading ``layers`` axis of size ``stack``."""
    if stack is not None:
        spec = spec.stacked(stack)
    std = None if spec.init == "ones" else cfg.initializer_range
    return param(rngs, spec.shape, spec.axes, jnp.float32 if spec.float32 else dtype, std=std)


def int8_params(
    cfg: ModelConfig, spec: ParamSpec, rngs: nnx.Rngs, dtype, stack: int
) -> dict[str, nnx.Param]:
    """The weight ``spec`` drawn as `spec_param` does (same random stream), then quantised:
    its ``ParamSpec.int8_pair`` leaves ``q`` (int8) and ``scale`` (fp32) with their axes."""
    spec = spec.stacked(stack)
    value = spec_param(cfg, spec, rngs, dtype).get_value()
    pair = spec.int8_pair()
    values = dict(zip(pair, quant.quantize(value, spec.contract), strict=True))
    return {k: nnx.Param(values[k], logical_axes=tuple(s.axes)) for k, s in pair.items()}


class _Group(nnx.Module):
    """A named group of parameters (``attn`` or ``moe`` of a layer, or an int8 weight's pair)."""

    def __init__(self, params: dict[str, nnx.Param | dict]):
        for name, value in params.items():
            setattr(self, name, _Group(value) if isinstance(value, dict) else value)


class DecoderLayer(nnx.Module):
    """One position of the repeating block, stacked over the block repeats.

    Lightning: attn.qkv [L,D,N,3,H] (head-major q/k/v), gate [L,D,N,H], norm [L,N,H],
    out [L,N,H,D]. Softmax: attn.q [L,D,N,H], k/v [L,D,K,H], o [L,N,H,D]. Both: input_norm and
    post_attn_norm [L,D], moe.router [L,D,E] (always fp32), wi [L,E,D,2,F] (gate, up),
    wo [L,E,F,D]. With ``quantize`` (``minimax_jax.config.QUANTIZE_SCHEMES``) each weight the
    scheme quantises is a group of ``q`` (int8) and ``scale`` (fp32; `minimax_jax.model.quant`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        kind: str,
        stack: int,
        *,
        rngs: nnx.Rngs,
        dtype,
        quantize: str | None = None,
    ):
        groups: dict[str, dict[str, nnx.Param | dict]] = {}
        for name, spec in cfg.layer_param_layout(kind).items():
            if spec.quantized_by(quantize):  # the layout's name.q / name.scale, as a group
                value = int8_params(cfg, spec, rngs, dtype, stack)
            else:
                value = spec_param(cfg, spec, rngs, dtype, stack)
            group, _, leaf = name.rpartition(".")
            if group:
                groups.setdefault(group, {})[leaf] = value
            else:
                setattr(self, leaf, value)
        for group, params in groups.items():
            setattr(self, group, _Group(params))
