"""Model configuration for the MiniMax-01 family: a frozen dataclass, presets, HF (de)serialisation.

``ModelConfig`` is the single static description of a text model (MiniMax-Text-01, MiniMax-M1,
the language model of MiniMax-VL-01). Einsum letters: N q-heads (= lightning heads), K kv-heads,
H head dim, D model dim, F expert FFN dim, E experts, V vocab.

Two Hugging Face config schemas are read and written (``from_hf`` / ``to_hf``):

* ``"remote"``: the MiniMax remote code (``MiniMaxText01ForCausalLM`` / ``MiniMaxM1ForCausalLM``,
  model_type ``minimax_text_01`` / ``minimax_m1``), which the released checkpoints ship with.
* ``"native"``: transformers' own ``minimax`` model (``MiniMaxForCausalLM``, the ``-hf``
  checkpoints).

Keys that change the computed function are never defaulted silently: a missing or contradictory
one raises ``ValueError`` naming the key. Keys that do not (``initializer_range``, ``use_cache``,
``router_*``, token ids, ``block_size``, which only chunks the lightning scan) may be absent.

Things neither schema can express are written as extra ``minimax_jax_*`` keys, which both
transformers and the remote code keep as plain attributes and ignore:

* ``minimax_jax_slope_formula``: written when ``slope_formula`` is not the schema's own formula
  (remote -> ``"remote"``, native -> ``"native"``), so ``from_hf(to_hf(s))`` restores it exactly.
  A remote-formula config written as native therefore keeps its exact decays in minimax_jax, but
  transformers will compute native decays from it: for power-of-two head counts they differ only
  in the layer factor (relative change <= 1e-5, below bf16 resolution), so this is silent; for
  other head counts the ALiBi bases differ materially and ``to_hf`` warns (``UserWarning``).
* ``minimax_jax_lightning_norm_eps``: written when ``lightning_norm_eps`` != 1e-6 (hard-coded by
  both implementations).
* ``block_size`` is written to a remote config only when it is not the hard-coded 256 (the
  transformers legacy-config conversion reads it too).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from minimax_jax.model import slopes as slopes_lib

LINEAR = "linear_attention"
FULL = "full_attention"
LAYER_TYPES = (LINEAR, FULL)
SCHEMAS = ("remote", "native")

# HF architecture name -> model_type.
REMOTE_ARCHITECTURES = {
    "MiniMaxText01ForCausalLM": "minimax_text_01",
    "MiniMaxM1ForCausalLM": "minimax_m1",
}
NATIVE_ARCHITECTURES = {"MiniMaxForCausalLM": "minimax"}
VL_ARCHITECTURES = {"MiniMaxVL01ForConditionalGeneration": "minimax_vl_01"}
_REMOTE_AUTO_MAP = {
    "MiniMaxText01ForCausalLM": (
        "configuration_minimax_text_01",
        "MiniMaxText01Config",
        "modeling_minimax_text_01",
    ),
    "MiniMaxM1ForCausalLM": ("configuration_minimax_m1", "MiniMaxM1Config", "modeling_minimax_m1"),
}
_DEFAULT_BLOCK_SIZE = 256
_DEFAULT_LIGHTNING_NORM_EPS = 1e-6
_EXTRA_SLOPE_KEY = "minimax_jax_slope_formula"
_EXTRA_LNORM_KEY = "minimax_jax_lightning_norm_eps"
# The three residual mixes: (ModelConfig prefix, remote key infix, native key prefix).
_MIXES = (
    ("linear_attn", "linear_attention", "linear_attn"),
    ("full_attn", "full_attention", "full_attn"),
    ("mlp", "mlp", "mlp"),
)


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
        from minimax_jax import hf_config  # the parsing rules of both schemas live there

        return hf_config.from_hf_dict(hf_config.load_hf_dict(source))

    def to_hf(self, schema: str | None = None) -> dict[str, Any]:
        """HF ``config.json`` contents in ``schema`` (default ``self.schema``).

        ``from_hf(cfg.to_hf(cfg.schema)) == cfg``. Written in the other schema, the result reads
        back equal up to ``schema`` and ``architecture`` (see the module docstring for the
        ``minimax_jax_*`` keys that keep the rest exact). ``transformers.MiniMaxConfig(**d)``
        accepts the native dict.

        Raises:
          ValueError: ``postnorm=False`` written as native (transformers has no such mode).
        """
        schema = self.schema if schema is None else schema
        if schema == "remote":
            return self._to_remote()
        if schema == "native":
            return self._to_native()
        raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")

    def save_hf(self, path: str | os.PathLike, schema: str | None = None) -> None:
        """Writes ``to_hf(schema)`` as JSON (sorted keys, indent 2) to ``path``.

        ``path`` may be a directory, in which case ``config.json`` is written inside it.
        """
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w") as f:
            f.write(_dumps(self.to_hf(schema)))

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """Loads a named preset from the ``configs`` package (e.g. ``"minimax-m1-80k"``)."""
        import configs  # top-level data package; imported lazily to keep config.py light

        return cls.from_hf(configs.preset_path(name))

    def _common_hf(self) -> dict[str, Any]:
        return {
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (
                list(self.eos_token_id)
                if isinstance(self.eos_token_id, tuple)
                else self.eos_token_id
            ),
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "hidden_size": self.hidden_size,
            "initializer_range": self.initializer_range,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_heads,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "rms_norm_eps": self.rms_norm_eps,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "router_jitter_noise": self.router_jitter_noise,
            "sliding_window": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def _extras_hf(self, schema: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.slope_formula != schema:
            out[_EXTRA_SLOPE_KEY] = self.slope_formula
            if schema == "native" and self.num_heads & (self.num_heads - 1):
                warnings.warn(
                    f"writing a remote-slope config with {self.num_heads} heads (not a power of "
                    "two) as native: transformers will use different lightning decays "
                    f"(minimax_jax keeps them via {_EXTRA_SLOPE_KEY!r})",
                    UserWarning,
                    stacklevel=3,
                )
        if self.lightning_norm_eps != _DEFAULT_LIGHTNING_NORM_EPS:
            out[_EXTRA_LNORM_KEY] = self.lightning_norm_eps
        return out

    def _to_remote(self) -> dict[str, Any]:
        arch = (
            self.architecture
            if self.architecture in REMOTE_ARCHITECTURES
            else ("MiniMaxText01ForCausalLM")
        )
        conf_mod, conf_cls, model_mod = _REMOTE_AUTO_MAP[arch]
        d = self._common_hf()
        d.update(
            architectures=[arch],
            model_type=REMOTE_ARCHITECTURES[arch],
            auto_map={
                "AutoConfig": f"{conf_mod}.{conf_cls}",
                "AutoModelForCausalLM": f"{model_mod}.{arch}",
            },
            attn_type_list=[int(t == FULL) for t in self.layer_types],
            postnorm=self.postnorm,
            rope_theta=_num(self.rope_theta),
            rotary_dim=self.rotary_dim,
            shared_intermediate_size=0,
            shared_moe_mode="sigmoid",
            transformers_version="4.45.2",  # the version the remote code was written against
        )
        for ours, remote, _ in _MIXES:
            d[f"layernorm_{remote}_alpha"] = getattr(self, f"{ours}_alpha")
            d[f"layernorm_{remote}_beta"] = getattr(self, f"{ours}_beta")
        if self.pad_token_id is not None:
            d["pad_token_id"] = self.pad_token_id
        if self.block_size != _DEFAULT_BLOCK_SIZE:
            d["block_size"] = self.block_size
        d.update(self._extras_hf("remote"))
        return dict(sorted(d.items()))

    def _to_native(self) -> dict[str, Any]:
        if not self.postnorm:
            raise ValueError(
                "postnorm=False cannot be written in the native schema (transformers' minimax "
                "has no pre-norm residual mode): write schema='remote'"
            )
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": _num(self.rope_theta)}
        if self.rotary_dim != self.head_dim:
            rope["partial_rotary_factor"] = self.rotary_dim / self.head_dim
        d = self._common_hf()
        d.update(
            architectures=["MiniMaxForCausalLM"],
            model_type="minimax",
            block_size=self.block_size,
            layer_types=list(self.layer_types),
            pad_token_id=self.pad_token_id,
            rope_parameters=rope,
        )
        for ours, _, native in _MIXES:
            d[f"{native}_alpha_factor"] = getattr(self, f"{ours}_alpha")
            d[f"{native}_beta_factor"] = getattr(self, f"{ours}_beta")
        d.update(self._extras_hf("native"))
        return dict(sorted(d.items()))

    # ---------------------------------------------------------------- parameter counting

    def layer_param_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Parameter shapes of decoder layer ``layer``, in the layout the model creates."""
        D, N, H, K = self.hidden_size, self.num_heads, self.head_dim, self.num_kv_heads
        E, F = self.num_experts, self.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"input_norm": (D,), "post_attn_norm": (D,)}
        if self.layer_is_lightning(layer):
            shapes.update(
                {
                    "attn.qkv": (D, N, 3, H),
                    "attn.gate": (D, N, H),
                    "attn.norm": (N, H),
                    "attn.out": (N, H, D),
                }
            )
        else:
            shapes.update(
                {"attn.q": (D, N, H), "attn.k": (D, K, H), "attn.v": (D, K, H), "attn.o": (N, H, D)}
            )
        shapes.update({"moe.router": (D, E), "moe.wi": (E, D, 2, F), "moe.wo": (E, F, D)})
        return shapes

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """All parameter shapes keyed ``embed``, ``lm_head``, ``final_norm``, ``layers.{l}.*``."""
        shapes: dict[str, tuple[int, ...]] = {"embed": (self.vocab_size, self.hidden_size)}
        if not self.tie_word_embeddings:
            shapes["lm_head"] = (self.hidden_size, self.vocab_size)
        shapes["final_norm"] = (self.hidden_size,)
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


def _num(x: float) -> int | float:
    """Writes integral floats as ints (``rope_theta: 10000000`` as in the real configs)."""
    return int(x) if float(x).is_integer() else float(x)


def _dumps(d: Mapping[str, Any]) -> str:
    return json.dumps(d, indent=2, sort_keys=True) + "\n"
