"""The VL-01 image encoder: a CLIP ViT (pure functions + NNX parameter modules) and the projector.

Einsum letters: B images (336 px tiles), P patches (576 = 24x24 at 336/14), S tokens (P + 1 with
the class token), D vision width (1024), N heads, H head dim, F MLP width, E text width (6144),
L layers. CLIP as VL-01 uses it (SPEC, section VL-01):

    x = [cls; patches @ W_patch] + pos          # conv 14x14 stride 14 without bias, as a matmul
    x = LayerNorm_pre(x)                          # "pre_layrnorm"
    24 x: x += Attn(LN1(x)); x += fc2(gelu(fc1(LN2(x))))   # erf GELU, biases everywhere
    features = x[:, 1:]                           # last layer, CLS dropped, no post-LayerNorm
    projector: linear_2(gelu(linear_1(features)))

Parameters (pure dict, layers stacked on axis 0 and scanned):

    embed: patch [C, p, p, D], cls [D], pos [S, D]     pre_norm: scale [D], bias [D]
    layers: ln1_scale/ln1_bias/ln2_scale/ln2_bias [L, D], q/k/v [L, D, N, H], q_bias/k_bias/
            v_bias [L, N, H], o [L, N, H, D], o_bias [L, D], fc1 [L, D, F], fc1_bias [L, F],
            fc2 [L, F, D], fc2_bias [L, D]
    projector: w1 [D, E], b1 [E], w2 [E, E], b2 [E]

Attention (``attention_impl``, a static choice): ``pallas_kernels.attention`` ("xla", "cudnn",
"pallas", "auto"; see its ``api.py``), re-exported here as ``attention``, ``ATTENTION_IMPLS``,
``auto_attention_candidates`` and ``flash_attention_pallas``. "auto" falls back at trace time; a
failure that shows only at compile or run time is caught one level up, by
``minimax_jax.vl.model.encode_tiles``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from minimax_jax import presets
from minimax_jax.config import ModelConfig
from minimax_jax.model.layers import param
from pallas_kernels.attention import IMPLEMENTATIONS as ATTENTION_IMPLS
from pallas_kernels.attention import attention
from pallas_kernels.attention import auto_candidates as auto_attention_candidates  # noqa: F401
from pallas_kernels.attention.gpu import (
    flash_attention_gpu as flash_attention_pallas,  # noqa: F401 - re-exported (tests, benchmarks)
)

_GELU_NAMES = ("gelu",)  # erf GELU; CLIP's quick_gelu is not what VL-01 uses


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Static shape of the CLIP ViT (defaults: ViT-L/14 at 336, the VL-01 tower)."""

    hidden_size: int = 1024  # D
    intermediate_size: int = 4096  # F
    num_layers: int = 24  # L
    num_heads: int = 16  # N
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"VisionConfig.{name} must be a positive int")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"VisionConfig.hidden_size {self.hidden_size} must be a multiple of num_heads "
                f"{self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig.image_size {self.image_size} must be a multiple of patch_size "
                f"{self.patch_size}"
            )
        if self.hidden_act not in _GELU_NAMES:
            raise ValueError(
                f"VisionConfig.hidden_act must be 'gelu' (erf GELU, as VL-01), got "
                f"{self.hidden_act!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side of a tile (24)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Features per tile (576)."""
        return self.grid**2

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> VisionConfig:
        """From an HF ``vision_config`` (CLIPVisionConfig keys); missing keys take CLIP-L/336."""
        return cls(
            hidden_size=int(d.get("hidden_size", 1024)),
            intermediate_size=int(d.get("intermediate_size", 4096)),
            num_layers=int(d.get("num_hidden_layers", 24)),
            num_heads=int(d.get("num_attention_heads", 16)),
            image_size=int(d.get("image_size", 336)),
            patch_size=int(d.get("patch_size", 14)),
            num_channels=int(d.get("num_channels", 3)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            hidden_act=d.get("hidden_act", "gelu"),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )

    def to_hf(self) -> dict[str, Any]:
        """HF ``vision_config`` (``clip_vision_model``)."""
        return {
            "model_type": "clip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": self.num_channels,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "initializer_range": self.initializer_range,
        }


# ----------------------------------------------------------------------------- pure functions


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in fp32; result in x.dtype."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
    """pixels [B, C, h, w] (NCHW, as HF pixel_values) -> [B, P, C, p, p], patches row-major."""
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // patch, patch, w // patch, patch)
    x = x.transpose(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, p, p]
    return x.reshape(b, (h // patch) * (w // patch), c, patch, patch)


def embed_patches(cfg: VisionConfig, params: Mapping, pixels: jax.Array) -> jax.Array:
    """pixels [B, C, 336, 336] -> tokens [B, S, D]: class token, patch matmul, + positions."""
    dtype = params["patch"].dtype
    patches = patchify(pixels.astype(dtype), cfg.patch_size)
    x = jnp.einsum("bpcij,cijd->bpd", patches, params["patch"])
    cls = jnp.broadcast_to(params["cls"].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + params["pos"].astype(x.dtype)[None]


def encoder_layer(
    cfg: VisionConfig, p: Mapping, x: jax.Array, attention_impl: str = "xla"
) -> jax.Array:
    """One pre-LN CLIP block. x [B, S, D] -> [B, S, D]; softmax in fp32, scale H**-0.5."""
    eps = cfg.layer_norm_eps
    u = layer_norm(x, p["ln1_scale"], p["ln1_bias"], eps)
    q = jnp.einsum("bsd,dnh->bsnh", u, p["q"]) + p["q_bias"]
    k = jnp.einsum("bsd,dnh->bsnh", u, p["k"]) + p["k_bias"]
    v = jnp.einsum("bsd,dnh->bsnh", u, p["v"]) + p["v_bias"]
    o = attention(q, k, v, attention_impl)
    x = x + jnp.einsum("btnh,nhd->btd", o, p["o"]) + p["o_bias"]
    u = layer_norm(x, p["ln2_scale"], p["ln2_bias"], eps)
    h = gelu_erf(jnp.einsum("btd,df->btf", u, p["fc1"]) + p["fc1_bias"])
    return x + jnp.einsum("btf,fd->btd", h, p["fc2"]) + p["fc2_bias"]


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, 0.5 x (1 + erf(x / sqrt(2))) computed in fp32, as torch's kernel does.

    `jax.nn.gelu(approximate=False)` goes through erfc, which XLA:GPU evaluated at ~136 us per
    [19*577, 4096] bf16 layer against torch's ~60 us (a profile in experiments/RESULTS.md).
    """
    xf = x.astype(jnp.float32)
    return (0.5 * xf * (1.0 + jax.lax.erf(xf * 0.7071067811865476))).astype(x.dtype)


def vision_tower(
    cfg: VisionConfig,
    params: Mapping,
    pixels: jax.Array,
    *,
    attention_impl: str = "auto",
    unroll: int | bool = 1,
) -> jax.Array:
    """pixels [B, C, 336, 336] float -> features [B, P, D] (last layer output, CLS dropped).

    ``params`` holds ``embed``, ``pre_norm`` and the stacked ``layers`` (see module docstring);
    the layers run under ``jax.lax.scan`` (``unroll``: its unroll factor, True = all layers).
    ``attention_impl``: see the module docstring.
    """
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    x = embed_patches(cfg, params["embed"], pixels)
    x = layer_norm(x, params["pre_norm"]["scale"], params["pre_norm"]["bias"], cfg.layer_norm_eps)

    def body(x, layer_params):
        return encoder_layer(cfg, layer_params, x, attention_impl), None

    x, _ = jax.lax.scan(body, x, params["layers"], unroll=unroll)
    return x[:, 1:]


def project(params: Mapping, features: jax.Array) -> jax.Array:
    """Projector: features [..., D] -> [..., E] = linear_2(gelu(linear_1(x))) with biases."""
    h = jnp.einsum("...d,de->...e", features, params["w1"]) + params["b1"]
    h = gelu_erf(h)
    return jnp.einsum("...e,ef->...f", h, params["w2"]) + params["b2"]


# ----------------------------------------------------------------------------- NNX modules


class VisionEmbeddings(nnx.Module):
    """patch [C, p, p, D] (conv kernel, no bias), cls [D], pos [S, D]."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: Any):
        c, p, d, std = cfg.num_channels, cfg.patch_size, cfg.hidden_size, cfg.initializer_range
        self.patch = param(
            rngs, (c, p, p, d), ("channels", "patch", "patch", "vision_embed"), dtype, std=std
        )
        self.cls = param(rngs, (d,), ("vision_embed",), dtype, std=std)
        self.pos = param(
            rngs, (cfg.num_patches + 1, d), ("vision_pos", "vision_embed"), dtype, std=std
        )


class LayerNormParams(nnx.Module):
    """scale [D] (ones), bias [D]."""

    def __init__(self, d: int, *, rngs: nnx.Rngs, dtype: Any):
        self.scale = param(rngs, (d,), ("vision_embed",), dtype, std=None)
        self.bias = param(rngs, (d,), ("vision_embed",), dtype, std=0.02)


class VisionLayers(nnx.Module):
    """All encoder layers, each parameter stacked on a leading ``layers`` axis of size L."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: Any):
        L, d, n, h, f = (
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        )
        std = cfg.initializer_range
        vec = ("layers", "vision_embed")
        for name in ("ln1", "ln2"):
            setattr(self, f"{name}_scale", param(rngs, (L, d), vec, dtype, std=None))
            setattr(self, f"{name}_bias", param(rngs, (L, d), vec, dtype, std=std))
        for name in ("q", "k", "v"):
            setattr(
                self,
                name,
                param(
                    rngs,
                    (L, d, n, h),
                    ("layers", "vision_embed", "vision_heads", "head_dim"),
                    dtype,
                    std=std,
                ),
            )
            setattr(
                self,
                f"{name}_bias",
                param(rngs, (L, n, h), ("layers", "vision_heads", "head_dim"), dtype, std=std),
            )
        self.o = param(
            rngs,
            (L, n, h, d),
            ("layers", "vision_heads", "head_dim", "vision_embed"),
            dtype,
            std=std,
        )
        self.o_bias = param(rngs, (L, d), vec, dtype, std=std)
        self.fc1 = param(rngs, (L, d, f), ("layers", "vision_embed", "vision_mlp"), dtype, std=std)
        self.fc1_bias = param(rngs, (L, f), ("layers", "vision_mlp"), dtype, std=std)
        self.fc2 = param(rngs, (L, f, d), ("layers", "vision_mlp", "vision_embed"), dtype, std=std)
        self.fc2_bias = param(rngs, (L, d), vec, dtype, std=std)


class VisionTower(nnx.Module):
    """The CLIP ViT parameters: embed, pre_norm, layers (no post-LayerNorm: VL-01 has none)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = cfg
        self.embed = VisionEmbeddings(cfg, rngs=rngs, dtype=dtype)
        self.pre_norm = LayerNormParams(cfg.hidden_size, rngs=rngs, dtype=dtype)
        self.layers = VisionLayers(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, C, 336, 336] -> features [B, P, D]."""
        return vision_tower(self.config, nnx.to_pure_dict(nnx.state(self, nnx.Param)), pixels)


class Projector(nnx.Module):
    """w1 [D, E], b1 [E], w2 [E, E], b2 [E] (HF multi_modal_projector.linear_{1,2})."""

    def __init__(
        self, vision_dim: int, text_dim: int, *, rngs: nnx.Rngs, dtype: Any, std: float = 0.02
    ):
        self.w1 = param(rngs, (vision_dim, text_dim), ("vision_embed", "embed"), dtype, std=std)
        self.b1 = param(rngs, (text_dim,), ("embed",), dtype, std=std)
        self.w2 = param(rngs, (text_dim, text_dim), ("projector_hidden", "embed"), dtype, std=std)
        self.b2 = param(rngs, (text_dim,), ("embed",), dtype, std=std)

    def __call__(self, features: jax.Array) -> jax.Array:
        """features [..., D] -> [..., E]."""
        return project(nnx.to_pure_dict(nnx.state(self, nnx.Param)), features)


# ----------------------------------------------------------------------------- VL-01 config

# The 28 any-resolution canvases (height, width) of VL-01 (SPEC, section VL-01).
PINPOINTS: tuple[tuple[int, int], ...] = (
    *((336, w) for w in range(336, 2017, 336)),
    *((672, w) for w in range(336, 2017, 336)),
    *((1008, w) for w in range(336, 2017, 336)),
    *((1344, w) for w in range(336, 1345, 336)),
    *((1680, w) for w in range(336, 1009, 336)),
    *((2016, w) for w in range(336, 1009, 336)),
)
VL_ARCHITECTURE = "MiniMaxVL01ForConditionalGeneration"
VL_MODEL_TYPE = "minimax_vl_01"
IMAGE_TOKEN_ID = 200025


@dataclasses.dataclass(frozen=True)
class VLConfig:
    """MiniMax-VL-01: the text LM (``ModelConfig``), the CLIP tower and the image settings.

    Only the released setting is implemented: features of the last layer without CLS
    (``vision_feature_layer`` -1, strategy ``default``), erf-GELU projector, ``anyres`` packing.
    """

    text: ModelConfig
    vision: VisionConfig = VisionConfig()
    image_token_index: int = IMAGE_TOKEN_ID
    image_grid_pinpoints: tuple[tuple[int, int], ...] = PINPOINTS

    def __post_init__(self) -> None:
        pins = tuple(tuple(int(v) for v in p) for p in self.image_grid_pinpoints)
        object.__setattr__(self, "image_grid_pinpoints", pins)
        tile = self.vision.image_size
        bad = [p for p in pins if len(p) != 2 or p[0] % tile or p[1] % tile or min(p) <= 0]
        if not pins or bad:
            raise ValueError(
                f"image_grid_pinpoints must be (height, width) multiples of the tile size {tile}; "
                f"bad: {bad or 'empty list'}"
            )
        if not 0 <= self.image_token_index < self.text.vocab_size:
            raise ValueError(
                f"image_token_index {self.image_token_index} is outside the vocabulary "
                f"[0, {self.text.vocab_size})"
            )

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> VLConfig:
        """From a VL-01 ``config.json`` dict (``MiniMaxVL01ForConditionalGeneration``).

        Raises:
          ValueError: naming the key, for settings other than the released ones.
        """
        expected = {
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
            "projector_hidden_act": "gelu",
        }
        for key, value in expected.items():
            if d.get(key, value) != value:
                raise ValueError(f"VL config {key!r} is {d[key]!r}: only {value!r} is supported")
        if d.get("process_image_mode", "anyres") != "anyres":
            raise ValueError(f"process_image_mode {d['process_image_mode']!r}: only 'anyres'")
        if not isinstance(d.get("vision_config", {}), Mapping):
            raise ValueError("VL config 'vision_config' must be an object")
        return cls(
            text=ModelConfig.from_hf(d),
            vision=VisionConfig.from_hf(d.get("vision_config") or {}),
            image_token_index=int(d.get("image_token_index", IMAGE_TOKEN_ID)),
            image_grid_pinpoints=tuple(map(tuple, d.get("image_grid_pinpoints", PINPOINTS))),
        )

    def to_hf(self, schema: str | None = None) -> dict[str, Any]:
        """The VL-01 ``config.json`` dict; ``text_config`` in ``schema`` (default: the text's)."""
        return {
            "architectures": [VL_ARCHITECTURE],
            "model_type": VL_MODEL_TYPE,
            "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints],
            "image_token_index": self.image_token_index,
            "process_image_mode": "anyres",
            "projector_hidden_act": "gelu",
            "text_config": self.text.to_hf(schema),
            "vision_config": self.vision.to_hf(),
            "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default",
        }

    @classmethod
    def preset(cls, name: str = "minimax-vl-01") -> VLConfig:
        """A VL preset: ``configs/vl/{name}.json`` (kept apart from the text presets, whose
        tests round-trip every ``configs/*.json`` as a text config)."""
        path = presets.preset_path(name, presets.VL_DIR)
        return cls.from_hf(json.loads(path.read_text()))
