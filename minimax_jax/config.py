"""Model configuration for the MiniMax-01 family: a frozen dataclass, presets, HF (de)serialisation.

``ModelConfig`` is the single static description of a text model (MiniMax-Text-01, MiniMax-M1,
the language model of MiniMax-VL-01). Einsum letters: N q-heads (= lightning heads), K kv-heads,
H head dim, D model dim, F expert FFN dim, E experts, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from minimax_jax.ops import slopes as slopes_lib

LINEAR = "linear_attention"
FULL = "full_attention"
LAYER_TYPES = (LINEAR, FULL)
SCHEMAS = ("remote", "native")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static architecture of a MiniMax-01 text model (all fields hashable; usable as jit static).

    ``layer_types[l]`` is ``"linear_attention"`` (lightning) or ``"full_attention"`` (softmax with
    GQA and partial RoPE on the first ``rotary_dim`` dims). ``slope_formula`` selects the lightning
    decay formula (see ``minimax_jax.ops.slopes``). ``schema`` records which HF config schema the
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
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
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
            "vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "num_kv_heads",
            "intermediate_size", "num_experts", "num_experts_per_tok", "max_position_embeddings",
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
        if self.router_jitter_noise < 0 or self.router_aux_loss_coef < 0:
            raise ValueError(
                "ModelConfig.router_jitter_noise and router_aux_loss_coef must be >= 0"
            )

    # ---------------------------------------------------------------- layer pattern helpers

    @functools.cached_property
    def period(self) -> int:
        """Smallest p dividing num_layers with layer_types[l] == layer_types[l % p] for all l."""
        n = self.num_layers
        for p in range(1, n + 1):
            if n % p == 0 and all(
                self.layer_types[l] == self.layer_types[l % p] for l in range(n)
            ):
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
        return sum(t == LINEAR for t in self.layer_types)

    @property
    def num_full_layers(self) -> int:
        return sum(t == FULL for t in self.layer_types)

    def replace(self, **changes) -> ModelConfig:
        """Copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)
