"""MiniMaxVLForConditionalGeneration: MiniMax-VL-01 (CLIP ViT + projector + the Text-01 LM).

Forward for a prompt whose ``<image>`` tokens were expanded by ``MiniMaxVLProcessor``:

1. all tiles of all images (``pixel_values`` [n, 3, 336, 336], each image's thumbnail first) go
   through the vision tower + projector in tile batches, one jitted call per batch;
2. per image (SPEC, section VL-01): thumbnail features [576, E] first, then the tile grid
   re-assembled spatially to [24*rows, 24*cols, E], unpadded to the image's aspect, with
   ``image_newline`` appended to every row -> [576 + h'*(w'+1), E];
3. the features replace the ``<image>`` token embeddings in order (batch row-major), and the
   decoder runs on the embeddings (``forward_embeds`` / ``forward_cached_embeds``).

Loading and saving live in ``hf.vl_pretrained``, generation in ``inference.vl_generate``.

Parameters (pure dict): ``language_model`` (the text model's tree), ``vision_tower``,
``projector``, ``image_newline`` [E] (see ``vl.vision`` and ``hf.vl_mapping``).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimax_jax.config import ModelConfig
from minimax_jax.model import decoder
from minimax_jax.model.causal_lm import MiniMaxForCausalLM
from minimax_jax.model.decoder import RunOptions
from minimax_jax.model.layers import param
from minimax_jax.vl.processor import MiniMaxVLProcessor
from minimax_jax.vl.vision import (
    ATTENTION_IMPLS,
    Projector,
    VisionConfig,
    VisionTower,
    VLConfig,
    auto_attention_candidates,
    project,
    vision_tower,
)

# Tile batches are padded to a multiple of TILE_BUCKET (capped at max_tile_batch). 1 = exact
# counts, no wasted tiles: the tower's cost is linear in tiles (a 1920x1080 image is 19 tiles,
# which a bucket of 8 ran as 24: +26%), and every distinct count compiles once per process, so at
# most max_tile_batch (32) shapes ever compile (one image is 2..37 tiles; bigger sets run as full
# batches of 32 plus one remainder). Raise it to trade padded work for fewer compiles.
TILE_BUCKET = 1


class MiniMaxVLForConditionalGeneration(nnx.Module):
    """language_model (MiniMaxForCausalLM), vision_tower, projector, image_newline [E].

    Args:
      config: the VL config.
      rngs: random streams for initialisation.
      param_dtype: dtype of every weight (the MoE router stays fp32).
      options: text-model run options (kernels, MoE path).
      max_tile_batch: most tiles per jitted vision call.
      vision_attention: the vision tower's attention (``minimax_jax.vl.vision.ATTENTION_IMPLS``;
        "auto": a fused kernel on GPU in bf16/fp16 when it works, else XLA).
    """

    def __init__(
        self,
        config: VLConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
        options: RunOptions | None = None,
        max_tile_batch: int = 32,
        vision_attention: str = "auto",
    ):
        if vision_attention not in ATTENTION_IMPLS:
            raise ValueError(f"vision_attention must be one of {ATTENTION_IMPLS}")
        self.config = config
        self.max_tile_batch = max_tile_batch
        self.vision_attention = vision_attention
        self.language_model = MiniMaxForCausalLM(
            config.text, rngs=rngs, param_dtype=param_dtype, options=options
        )
        self.vision_tower = VisionTower(config.vision, rngs=rngs, dtype=param_dtype)
        e = config.text.hidden_size
        self.projector = Projector(config.vision.hidden_size, e, rngs=rngs, dtype=param_dtype)
        self.image_newline = param(rngs, (e,), ("embed",), param_dtype, std=e**-0.5)

    @property
    def options(self) -> RunOptions:
        return self.language_model.options

    def pure_params(self) -> dict:
        """Parameters as a nested dict of arrays (text blocks as a list)."""
        return {
            "language_model": self.language_model.pure_params(),
            "vision_tower": nnx.to_pure_dict(nnx.state(self.vision_tower, nnx.Param)),
            "projector": nnx.to_pure_dict(nnx.state(self.projector, nnx.Param)),
            "image_newline": self.image_newline[...],
        }

    def __call__(
        self,
        input_ids,
        pixel_values=None,
        image_sizes=None,
        attention_mask=None,
        *,
        compute_dtype: Any = None,
    ) -> jax.Array:
        """input_ids [B,T] (image tokens expanded), pixel_values [n,3,336,336], image_sizes
        [n_images, 2] (H, W), attention_mask [B,T] (1 token, 0 left pad) -> logits [B,T,V]."""
        x = embed_inputs(
            self.config,
            self.pure_params(),
            input_ids,
            pixel_values,
            image_sizes,
            max_tile_batch=self.max_tile_batch,
            compute_dtype=compute_dtype,
            attention_impl=self.vision_attention,
        )
        mask = None if attention_mask is None else jnp.asarray(attention_mask)
        return _forward_embeds_jit(
            self.config.text,
            self.pure_params()["language_model"],
            x,
            mask,
            self.options,
            compute_dtype,
        )


# ----------------------------------------------------------------------------- image features


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _encode_tiles(
    cfg: VisionConfig,
    tower: dict,
    proj: dict,
    pixels: jax.Array,
    dtype,
    attention_impl: str = "xla",
    unroll: int | bool = 1,
) -> jax.Array:
    if dtype is not None:
        tower, proj = jax.tree.map(lambda a: a.astype(dtype), (tower, proj))
        pixels = pixels.astype(dtype)
    feats = vision_tower(cfg, tower, pixels, attention_impl=attention_impl, unroll=unroll)
    return project(proj, feats)


# "auto" attention: (backend, dtype, head dim, impl) -> the error that ruled impl out, and the
# (config, backend, dtype, head dim, impl, tiles, unroll) calls already run to completion once.
_ATTENTION_FAILED: dict[tuple, str] = {}
_ATTENTION_VERIFIED: set[tuple] = set()


def _tower_dtype(params: dict, compute_dtype: Any) -> np.dtype:
    """The dtype the tower computes in (and the one its pixels are cast to)."""
    if compute_dtype is not None:
        return jnp.dtype(compute_dtype)
    return jnp.dtype(params["vision_tower"]["embed"]["patch"].dtype)


def resolved_attention_impl(
    cfg: VisionConfig, params: dict, compute_dtype: Any = None, attention_impl: str = "auto"
) -> str:
    """The attention ``encode_tiles`` runs now for ``attention_impl`` (resolves "auto": the first
    candidate that has not failed in this process)."""
    if attention_impl != "auto":
        return attention_impl
    return _live_candidates(cfg, params, compute_dtype)[1][0]


def _live_candidates(cfg, params, compute_dtype) -> tuple[tuple, list[str]]:
    """(backend, dtype, head dim) and the "auto" candidates that have not failed there."""
    dtype = _tower_dtype(params, compute_dtype)
    key = (jax.default_backend(), dtype.name, cfg.head_dim)
    cands = auto_attention_candidates(dtype, cfg.head_dim)
    return key, [c for c in cands if (*key, c) not in _ATTENTION_FAILED or c == "xla"]


def _encode_chunk(cfg, params, chunk, compute_dtype, attention_impl, unroll) -> jax.Array:
    """One jitted call. "auto" tries its candidates in order: a candidate that fails to trace,
    compile or run (its first call per shape is waited for) is recorded and skipped from then
    on, with a warning; the last one ("xla") raises."""
    tower, proj = params["vision_tower"], params["projector"]
    if attention_impl != "auto":
        return _encode_tiles(cfg, tower, proj, chunk, compute_dtype, attention_impl, unroll)
    key, cands = _live_candidates(cfg, params, compute_dtype)
    for i, impl in enumerate(cands):
        if impl == "xla":
            return _encode_tiles(cfg, tower, proj, chunk, compute_dtype, impl, unroll)
        call = (cfg, *key, impl, chunk.shape[0], unroll)
        try:
            out = _encode_tiles(cfg, tower, proj, chunk, compute_dtype, impl, unroll)
            if call not in _ATTENTION_VERIFIED:
                out.block_until_ready()  # a failure at run time shows here, once
                _ATTENTION_VERIFIED.add(call)
            return out
        except Exception as err:  # noqa: BLE001 - any failure of a fused kernel: next one
            _ATTENTION_FAILED[(*key, impl)] = f"{type(err).__name__}: {err}"[:2000]
            warnings.warn(
                f"vision attention {impl!r} failed ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); using {cands[i + 1]!r}",
                RuntimeWarning,
                stacklevel=3,
            )
    raise AssertionError("unreachable: 'xla' is always the last candidate")


def encode_tiles(
    cfg: VisionConfig,
    params: dict,
    pixel_values,
    *,
    max_tile_batch: int = 32,
    compute_dtype: Any = None,
    attention_impl: str = "auto",
    tile_bucket: int | None = None,
    cast_on_host: bool = False,
    unroll: int | bool = True,
) -> jax.Array:
    """pixel_values [n, 3, 336, 336] (tiles of any number of images) -> [n, 576, E].

    Tiles run in batches of at most ``max_tile_batch``; the last batch is zero-padded to a
    multiple of ``tile_bucket`` (default ``TILE_BUCKET``: exact counts). Host pixels (numpy) are
    cast to the tower's compute dtype before the transfer when ``cast_on_host`` (bf16: half the
    bytes of float32, the same rounding the device would apply, so the result is identical; off
    by default: the host-side cast measured slower than sending float32, 28.4 vs 23.0 ms on an
    H200 for 19 tiles); a ``jax.Array`` stays where it is. ``attention_impl``:
    ``minimax_jax.vl.vision.ATTENTION_IMPLS``; "auto" falls back (once per process) from a fused
    kernel that fails. ``unroll``: the layer scan's unroll factor (default all layers: 18.3 vs
    18.8 ms for the scan, measured by experiments/bench_vision.py).
    """
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    on_device = isinstance(pixel_values, jax.Array)
    pixels = pixel_values if on_device else np.asarray(pixel_values)
    if pixels.ndim != 4 or pixels.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
        raise ValueError(
            f"pixel_values must be [n, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}], "
            f"got {pixels.shape}: use MiniMaxVLProcessor"
        )
    if not on_device:
        send = _tower_dtype(params, compute_dtype) if cast_on_host else np.dtype(np.float32)
        pixels = pixels.astype(send, copy=False)
    bucket = TILE_BUCKET if tile_bucket is None else int(tile_bucket)
    if bucket < 1:
        raise ValueError(f"tile_bucket must be >= 1, got {bucket}")
    xp = jnp if on_device else np
    outs = []
    for start in range(0, pixels.shape[0], max_tile_batch):
        chunk = pixels[start : start + max_tile_batch]
        m = chunk.shape[0]
        padded = min(max_tile_batch, -(-m // bucket) * bucket)
        if padded > m:
            chunk = xp.pad(chunk, ((0, padded - m), (0, 0), (0, 0), (0, 0)))
        feats = _encode_chunk(cfg, params, chunk, compute_dtype, attention_impl, unroll)
        outs.append(feats[:m] if padded > m else feats)
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs)


def pack_image(
    feats: jax.Array,
    newline: jax.Array,
    grid: tuple[int, int],
    keep: tuple[slice, slice],
    side: int,
) -> jax.Array:
    """One image's features [1 + rows*cols, side*side, E] -> [side**2 + h'*(w'+1), E].

    Thumbnail first; tiles re-assembled to [side*rows, side*cols, E] (row-major tiles, row-major
    patches), cropped to ``keep`` (the unpadded rows and columns), newline after every row.
    """
    rows, cols = grid
    e = feats.shape[-1]
    x = feats[1:].reshape(rows, cols, side, side, e).transpose(0, 2, 1, 3, 4)
    x = x.reshape(rows * side, cols * side, e)[keep[0], keep[1]]
    nl = jnp.broadcast_to(newline.astype(x.dtype), (x.shape[0], 1, e))
    x = jnp.concatenate([x, nl], axis=1).reshape(-1, e)
    return jnp.concatenate([feats[0], x])


def image_features(
    config: VLConfig, params: dict, pixel_values, image_sizes, **kwargs: Any
) -> jax.Array:
    """All images' packed features, concatenated in image order: [sum of tokens, E]."""
    geo = MiniMaxVLProcessor.from_config(config)
    sizes = [tuple(int(v) for v in s) for s in np.asarray(image_sizes).reshape(-1, 2)]
    counts = [1 + r * c for r, c in (geo.grid(*s) for s in sizes)]
    if sum(counts) != np.shape(pixel_values)[0]:
        raise ValueError(
            f"image_sizes {sizes} need {sum(counts)} tiles (thumbnails included) but "
            f"pixel_values has {np.shape(pixel_values)[0]}: pass the processor's outputs together"
        )
    tiles = encode_tiles(config.vision, params, pixel_values, **kwargs)
    out, start = [], 0
    for size, n in zip(sizes, counts, strict=True):
        out.append(
            pack_image(
                tiles[start : start + n],
                params["image_newline"],
                geo.grid(*size),
                geo.unpad_slices(*size),
                config.vision.grid,
            )
        )
        start += n
    return jnp.concatenate(out)


def merge_image_features(
    x: jax.Array, input_ids: jax.Array, feats: jax.Array, image_token_id: int
) -> jax.Array:
    """x [B,T,E] token embeddings; the image tokens of input_ids [B,T] (row-major order) take
    the rows of feats [M,E] in order. Jit-friendly (no data-dependent shapes)."""
    is_image = input_ids == image_token_id
    idx = jnp.cumsum(is_image.reshape(-1)) - 1
    gathered = feats[jnp.clip(idx, 0, max(feats.shape[0] - 1, 0))].reshape(x.shape)
    return jnp.where(is_image[..., None], gathered.astype(x.dtype), x)


def embed_inputs(
    config: VLConfig,
    params: dict,
    input_ids,
    pixel_values=None,
    image_sizes=None,
    *,
    max_tile_batch: int = 32,
    compute_dtype: Any = None,
    attention_impl: str = "auto",
) -> jax.Array:
    """Token embeddings [B,T,E] with image features in place of the ``<image>`` tokens."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    embed = params["language_model"]["embed"]
    if compute_dtype is not None:
        embed = embed.astype(compute_dtype)
    x = jnp.take(embed, jnp.asarray(ids, jnp.int32), axis=0)
    n_tokens = int((ids == config.image_token_index).sum())
    n_images = 0 if image_sizes is None else int(np.asarray(image_sizes).reshape(-1, 2).shape[0])
    if n_images == 0:
        if n_tokens:
            raise ValueError(f"input_ids hold {n_tokens} image tokens but no image was given")
        return x
    feats = image_features(
        config,
        params,
        pixel_values,
        image_sizes,
        max_tile_batch=max_tile_batch,
        compute_dtype=compute_dtype,
        attention_impl=attention_impl,
    )
    if n_tokens != feats.shape[0]:
        raise ValueError(
            f"input_ids hold {n_tokens} image tokens but the images give {feats.shape[0]} "
            "features: expand each <image> with MiniMaxVLProcessor (same sizes, same order)"
        )
    return merge_image_features(x, jnp.asarray(ids), feats, config.image_token_index)


# ----------------------------------------------------------------------------- decoder on embeds


def forward_embeds(
    config: ModelConfig,
    params: dict,
    x: jax.Array,
    attention_mask: jax.Array | None = None,
    opts: RunOptions | None = None,
    compute_dtype: Any = None,
) -> jax.Array:
    """The text model from input embeddings: x [B,T,D] -> logits [B,T,V] fp32."""
    return decoder.forward_embedded(config, params, x, attention_mask, opts, compute_dtype)[0]


_forward_embeds_jit = jax.jit(forward_embeds, static_argnums=(0, 4, 5))


def forward_cached_embeds(
    config: ModelConfig,
    params: dict,
    x: jax.Array,
    token_mask: jax.Array,
    cache: dict,
    opts: RunOptions | None = None,
    compute_dtype: Any = None,
) -> tuple[jax.Array, dict]:
    """Cached text model from embeddings x [B,T,D] -> (last logits [B,V], cache)."""
    logits, cache = decoder.forward_cached_embedded(
        config, params, x, token_mask, cache, opts, compute_dtype, last_only=True
    )
    return logits[:, -1], cache
