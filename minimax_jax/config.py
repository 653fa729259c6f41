"""The architecture of a MiniMax-01 text model: ``ModelConfig``, a frozen dataclass, and presets.

``ModelConfig`` is the single static description of a text model (MiniMax-Text-01, MiniMax-M1,
the language model of MiniMax-VL-01): sizes, the layer pattern, residual mixes, and THE parameter
layout (``layer_param_layout`` / ``outer_param_layout``: shapes, logical axes, initialisers), from
which the model's modules, the HF name mapping, the parameter counts and the memory planner are
derived. Einsum letters: N q-heads (= lightning heads), K kv-heads, H head dim, D model dim,
F expert FFN dim, E experts, V vocab.

``from_hf`` / ``to_hf`` / ``save_hf`` read and write Hugging Face ``config.json`` files of both
schemas through ``minimax_jax.hf.hf_config`` (a jax-free module that imports nothing of ours).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from minimax_jax import presets
from minimax_jax.hf import hf_config
from minimax_jax.hf.hf_config import FULL, LAYER_TYPES, LINEAR, SCHEMAS
from minimax_jax.model import slopes as slopes_lib

# Int8 weight-only quantisation schemes (symmetric, one fp32 scale per output channel):
# "experts_int8" stores the expert FFN weights (moe.wi, moe.wo) as int8, "int8" every matmul
# weight of the decoder layers (attention / lightning projections too). Norms, the router,
# embeddings and lm_head stay in floating point under both.
QUANTIZE_SCHEMES = ("experts_int8", "int8")
INT8_LEAVES = ("q", "scale")  # the two leaves a quantised weight is stored as


def check_quantize(scheme: str | None) -> str | None:
    """``scheme`` itself if None or one of ``QUANTIZE_SCHEMES``; else a ValueError naming them."""
    if scheme is not None and scheme not in QUANTIZE_SCHEMES:
        raise ValueError(
            f"quantize must be one of {', '.join(QUANTIZE_SCHEMES)} (or none), got {scheme!r}"
        )
    return scheme


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter of the layout: shape, logical axis names (mapped to mesh axes by the rules
    in ``minimax_jax.sharding``; None: never split), initialiser ("normal": N(0,
    initializer_range); "ones": norm weights), whether it stays float32 whatever the parameter
    dtype (the MoE router and quantisation scales), whether it is stored as int8, and
    ``contract``: the axes a matmul sums this weight over (its input axes; empty for weights
    that are not quantisable matmul weights)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"
    float32: bool = False
    contract: tuple[int, ...] = ()
    int8: bool = False

    def stacked(self, n: int) -> ParamSpec:
        """The same parameter with a leading ``layers`` axis of size n (a scanned block stack)."""
        return dataclasses.replace(
            self,
            shape=(n, *self.shape),
            axes=("layers", *self.axes),
            contract=tuple(a + 1 for a in self.contract),
        )

    def quantized_by(self, scheme: str | None) -> bool:
        """Whether ``scheme`` (``QUANTIZE_SCHEMES`` or None) stores this weight as int8."""
        if scheme is None or not self.contract:
            return False
        return scheme == "int8" or "experts" in self.axes

    def int8_pair(self) -> dict[str, ParamSpec]:
        """The two leaves of this weight quantised (``INT8_LEAVES``): ``q`` int8 in the weight's
        shape and axes, and ``scale`` float32 with the contracted axes kept as size 1 (logical
        axis None), so the scale is sharded like the weight's output channels and
        ``q * scale`` is the dequantised weight."""
        keep = [a not in self.contract for a in range(len(self.shape))]
        scale = ParamSpec(
            tuple(n if k else 1 for n, k in zip(self.shape, keep, strict=True)),
            tuple(x if k else None for x, k in zip(self.axes, keep, strict=True)),
            init="ones",
            float32=True,
        )
        return dict(zip(INT8_LEAVES, (dataclasses.replace(self, int8=True), scale), strict=True))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static architecture of a MiniMax-01 text model (all fields hashable; usable as jit static).

    ``layer_types[l]`` is ``"linear_attention"`` (lightning) or ``"full_attention"`` (softmax with
    GQA and partial RoPE on the first ``rotary_dim`` dims). ``slope_formula`` selects the lightning
    decay formula (see ``minimax_jax.model.slopes``). ``schema`` records which HF config schema the
    config came from and is the default for ``to_hf``.
    """

    vocab_size: int
    hidden_size: int  # D
    num_layers: int
    num_heads: int  # N (query heads; lightning heads too)
    head_dim: int  # H
    num_kv_heads: int  # K (softmax layers)
    intermediate_size: int  # F, expert FFN width
    num_experts: int  # E
    num_experts_per_tok: int
    layer_types: tuple[str, ...]  # "linear_attention" | "full_attention", len == num_layers
    rope_theta: float
    rotary_dim: int  # even, <= head_dim; == head_dim means full RoPE
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    lightning_norm_eps: float = 1e-6
    postnorm: bool = True
    linear_attn_alpha: float = 1.0
    linear_attn_beta: float = 1.0
    full_attn_alpha: float = 1.0
    full_attn_beta: float = 1.0
    mlp_alpha: float = 1.0
    mlp_beta: float = 1.0
    block_size: int = 256  # lightning block (hard-coded 256 in remote code)
    slope_formula: str = "remote"  # "remote" | "native"
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    schema: str = "remote"  # HF schema it came from / writes by default: "remote" | "native"
    architecture: str = "MiniMaxM1ForCausalLM"  # HF architectures[0]

    def __post_init__(self) -> None:
        # Normalise list-valued fields so the dataclass stays hashable.
        if not isinstance(self.layer_types, tuple):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self._validate()

    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "head_dim",
            "num_kv_heads",
            "intermediate_size",
            "num_experts",
            "num_experts_per_tok",
            "max_position_embeddings",
            "block_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"ModelConfig.layer_types has {len(self.layer_types)} entries but num_layers is "
                f"{self.num_layers}: give exactly one type per layer"
            )
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(
                f"ModelConfig.layer_types contains {bad}: each entry must be one of {LAYER_TYPES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.rotary_dim <= 0 or self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(
                f"ModelConfig.rotary_dim must be even and in (0, head_dim={self.head_dim}], "
                f"got {self.rotary_dim}"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"ModelConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                f"num_experts ({self.num_experts})"
            )
        if self.hidden_act != "silu":
            raise ValueError(
                f"ModelConfig.hidden_act must be 'silu' (the only activation MiniMax uses), "
                f"got {self.hidden_act!r}"
            )
        if self.slope_formula not in slopes_lib.SLOPE_FORMULAS:
            raise ValueError(
                f"ModelConfig.slope_formula must be one of {slopes_lib.SLOPE_FORMULAS}, "
                f"got {self.slope_formula!r}"
            )
        if self.schema not in SCHEMAS:
            raise ValueError(f"ModelConfig.schema must be one of {SCHEMAS}, got {self.schema!r}")
        for name in ("rope_theta", "rms_norm_eps", "lightning_norm_eps"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}")

    # ---------------------------------------------------------------- layer pattern helpers

    @functools.cached_property
    def period(self) -> int:
        """Smallest p dividing num_layers with layer_types[l] == layer_types[l % p] for all l."""
        n = self.num_layers
        for p in range(1, n + 1):
            if n % p == 0 and all(self.layer_types[l] == self.layer_types[l % p] for l in range(n)):
                return p
        return n  # unreachable: p == n always matches

    @property
    def num_blocks(self) -> int:
        """Number of repeats of ``block_pattern`` (scan length)."""
        return self.num_layers // self.period

    @property
    def block_pattern(self) -> tuple[str, ...]:
        """Layer types of one repeating block: ``layer_types[:period]``."""
        return self.layer_types[: self.period]

    def layer_is_lightning(self, layer: int) -> bool:
        """True if global layer ``layer`` is a lightning (linear attention) layer."""
        return self.layer_types[layer] == LINEAR

    def lightning_slopes(self, layer: int) -> np.ndarray:
        """Decay rates of lightning layer ``layer`` (global index): float32 [N]."""
        if not self.layer_is_lightning(layer):
            raise ValueError(f"layer {layer} is {self.layer_types[layer]!r}, not linear_attention")
        return slopes_lib.lightning_slopes(
            self.num_heads, layer, self.num_layers, self.slope_formula
        )

    def slopes_per_block_position(self) -> dict[int, np.ndarray]:
        """For each lightning position p in the block, float32 [num_blocks, N] slopes.

        Row b holds the slopes of global layer ``b * period + p`` (the scanned input of block b).
        """
        out = {}
        for p, kind in enumerate(self.block_pattern):
            if kind == LINEAR:
                out[p] = np.stack(
                    [self.lightning_slopes(b * self.period + p) for b in range(self.num_blocks)]
                )
        return out

    @property
    def num_lightning_layers(self) -> int:
        """Number of lightning (linear attention) layers."""
        return sum(t == LINEAR for t in self.layer_types)

    @property
    def num_full_layers(self) -> int:
        """Number of softmax (full attention) layers."""
        return sum(t == FULL for t in self.layer_types)

    def replace(self, **changes) -> ModelConfig:
        """Copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- Hugging Face configs

    @classmethod
    def from_hf(cls, source: Mapping[str, Any] | str | os.PathLike) -> ModelConfig:
        """Reads an HF config: a dict, a ``config.json`` path, or a directory holding one.

        Accepts the remote-code schema, the transformers-native schema, and the MiniMax-VL-01
        config (``MiniMaxVL01ForConditionalGeneration`` / ``minimax_vl_01``), of which only the
        language model (its ``text_config``) is described here; the vision tower and projector
        keys are the VL model's business.

        Raises:
          ValueError: naming the key, when a key that changes the model is missing, contradicts
            another, or has a value minimax_jax does not implement.
        """
        return cls(**hf_config.fields_from_hf(hf_config.load_hf_dict(source)))

    def to_hf(self, schema: str | None = None) -> dict[str, Any]:
        """HF ``config.json`` contents in ``schema`` (default ``self.schema``).

        ``from_hf(cfg.to_hf(cfg.schema)) == cfg``. Written in the other schema, the result reads
        back equal up to ``schema`` and ``architecture`` (see the module docstring for the
        ``minimax_jax_*`` keys that keep the rest exact). ``transformers.MiniMaxConfig(**d)``
        accepts the native dict.

        Raises:
          ValueError: ``postnorm=False`` written as native (transformers has no such mode).
        """
        return hf_config.to_hf_dict(self, self.schema if schema is None else schema)

    def save_hf(self, path: str | os.PathLike, schema: str | None = None) -> None:
        """Writes ``to_hf(schema)`` as JSON (sorted keys, indent 2) to ``path``.

        ``path`` may be a directory, in which case ``config.json`` is written inside it.
        """
        hf_config.write_hf_dict(self.to_hf(schema), path)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """Loads a named preset of ``configs/`` (e.g. ``"minimax-m1-80k"``; see ``presets``)."""
        return cls.from_hf(presets.preset_path(name))

    # ---------------------------------------------------------------- parameter counting

    def layer_param_layout(self, kind: str, quantize: str | None = None) -> dict[str, ParamSpec]:
        """THE parameter layout of one decoder layer of type ``kind`` (unstacked shapes).

        Keys are dotted module paths (``attn.qkv``); the model creates them in this order with a
        leading ``layers`` axis of size ``num_blocks``; the HF mapping, the parameter counts and
        the memory planner read the same table. With ``quantize`` (``QUANTIZE_SCHEMES``) every
        weight the scheme quantises becomes its ``ParamSpec.int8_pair`` (``moe.wi.q`` int8 and
        ``moe.wi.scale`` float32) in its place.
        """
        check_quantize(quantize)
        out = self._float_layer_layout(kind)
        if quantize is None:
            return out
        quantized = {}
        for name, spec in out.items():
            if spec.quantized_by(quantize):
                quantized.update({f"{name}.{k}": s for k, s in spec.int8_pair().items()})
            else:
                quantized[name] = spec
        return quantized

    def _float_layer_layout(self, kind: str) -> dict[str, ParamSpec]:
        D, N, H, K = self.hidden_size, self.num_heads, self.head_dim, self.num_kv_heads
        E, F = self.num_experts, self.intermediate_size
        out = {
            "input_norm": ParamSpec((D,), ("embed",), "ones"),
            "post_attn_norm": ParamSpec((D,), ("embed",), "ones"),
        }
        if kind == LINEAR:
            out.update(
                {
                    "attn.qkv": ParamSpec(
                        (D, N, 3, H), ("embed", "heads", "qkv", "head_dim"), contract=(0,)
                    ),
                    "attn.gate": ParamSpec(
                        (D, N, H), ("embed", "heads", "head_dim"), contract=(0,)
                    ),
                    "attn.norm": ParamSpec((N, H), ("heads", "head_dim"), "ones"),
                    "attn.out": ParamSpec(
                        (N, H, D), ("heads", "head_dim", "embed"), contract=(0, 1)
                    ),
                }
            )
        elif kind == FULL:
            out.update(
                {
                    "attn.q": ParamSpec((D, N, H), ("embed", "heads", "head_dim"), contract=(0,)),
                    "attn.k": ParamSpec(
                        (D, K, H), ("embed", "kv_heads", "head_dim"), contract=(0,)
                    ),
                    "attn.v": ParamSpec(
                        (D, K, H), ("embed", "kv_heads", "head_dim"), contract=(0,)
                    ),
                    "attn.o": ParamSpec((N, H, D), ("heads", "head_dim", "embed"), contract=(0, 1)),
                }
            )
        else:
            raise ValueError(f"layer type must be one of {LAYER_TYPES}, got {kind!r}")
        out.update(
            {
                "moe.router": ParamSpec((D, E), ("embed", "experts"), float32=True),
                "moe.wi": ParamSpec(
                    (E, D, 2, F), ("experts", "embed", "gate_up", "mlp"), contract=(1,)
                ),
                "moe.wo": ParamSpec((E, F, D), ("experts", "mlp", "embed"), contract=(1,)),
            }
        )
        return out

    def outer_param_layout(self) -> dict[str, ParamSpec]:
        """The parameters outside the decoder layers: embed, final_norm, lm_head (if untied)."""
        D, V = self.hidden_size, self.vocab_size
        out = {
            "embed": ParamSpec((V, D), ("vocab", "embed")),
            "final_norm": ParamSpec((D,), ("embed",), "ones"),
        }
        if not self.tie_word_embeddings:
            out["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
        return out

    def layer_param_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Parameter shapes of decoder layer ``layer``, in the layout the model creates."""
        return {k: s.shape for k, s in self.layer_param_layout(self.layer_types[layer]).items()}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """All parameter shapes keyed ``embed``, ``lm_head``, ``final_norm``, ``layers.{l}.*``."""
        outer = self.outer_param_layout()
        shapes = {k: outer[k].shape for k in ("embed", "lm_head", "final_norm") if k in outer}
        for l in range(self.num_layers):
            for name, shape in self.layer_param_shapes(l).items():
                shapes[f"layers.{l}.{name}"] = shape
        return shapes

    def param_count(self) -> int:
        """Total number of parameters (MiniMax-M1 / Text-01: 456,089,655,296)."""
        return sum(math.prod(s) for s in self.param_shapes().values())

    def active_param_count(self, include_embeddings: bool = False) -> int:
        """Parameters used per token: non-expert params + top_k/E of the expert params.

        MiniMax's "45.9B activated" counts neither the input embedding nor the lm_head
        (M1: 45,944,920,064); ``include_embeddings=True`` adds both (48.4B for M1). Router,
        norms and all attention weights count fully; of ``moe.wi`` / ``moe.wo`` only
        ``num_experts_per_tok`` experts' slices count.
        """
        total = 0
        for name, shape in self.param_shapes().items():
            n = math.prod(shape)
            if name in ("embed", "lm_head") and not include_embeddings:
                continue
            if name.endswith(("moe.wi", "moe.wo")):
                n = n // self.num_experts * self.num_experts_per_tok
            total += n
        return total
