"""MiniMax-VL-01 image preprocessing (any resolution) and prompt expansion, with Pillow + numpy.

For an image of H x W pixels (SPEC, section VL-01):

1. canvas = the pinpoint (h, w) with the most effective pixels
   ``min(int(W*s) * int(H*s), H*W)``, ``s = min(w/W, h/H)``, then the least wasted ``h*w - eff``
   (first in list order on a tie; float arithmetic as LLaVA-Next);
2. resize to fit the canvas keeping the aspect (bicubic; the limiting side fills the canvas, the
   other is ``int(side * scale)``), paste centred on a zero (black) canvas;
3. cut the canvas into 336 x 336 tiles, row-major (``rows = h/336``, ``cols = w/336``);
4. thumbnail = the whole image resized to 336 x 336 (aspect not kept);
5. pixel_values = [thumbnail] + tiles, scaled by 1/255, normalised with the CLIP mean / std,
   float32 [1 + rows*cols, 3, 336, 336].

Tokens per image: the tile grid is 24*rows x 24*cols features; the padding is removed again
("unpadded", exact floor arithmetic) to h' x w', every row gets a newline feature and the 576
thumbnail features come first: ``576 + h' * (w' + 1)``. Each ``<image>`` of a prompt becomes that
many ``<image>`` tokens (id 200025 in the real vocabulary), which the model replaces in order.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from minimax_jax.vl.vision import IMAGE_TOKEN_ID, PINPOINTS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"
MAX_PIXELS = 64 * 2**20  # refuse larger images (decoding them alone needs ~200 MB)
MAX_SIDE = 32768


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("VL preprocessing needs Pillow: pip install 'pillow>=13,<14'") from e
    return Image


@dataclasses.dataclass(frozen=True)
class ImageInputs:
    """One preprocessed image: pixel_values float32 [1 + rows*cols, 3, T, T], size (H, W)."""

    pixel_values: np.ndarray
    size: tuple[int, int]
    grid: tuple[int, int]  # (rows, cols) of tiles
    num_tokens: int


class MiniMaxVLProcessor:
    """Any-resolution preprocessing and ``<image>`` expansion of MiniMax-VL-01.

    Args:
      image_token: the placeholder in prompts.
      image_token_id: its id (``VLConfig.image_token_index``).
      pinpoints: candidate canvases (height, width), multiples of ``tile_size``.
      tile_size: tile side in pixels (the vision tower's image size, 336).
      patch_size: ViT patch side (14): tiles give (tile_size / patch_size)**2 features.
      max_pixels, max_side: larger images are refused with a clear error.
    """

    def __init__(
        self,
        *,
        image_token: str = IMAGE_TOKEN,
        image_token_id: int = IMAGE_TOKEN_ID,
        pinpoints: Sequence[tuple[int, int]] = PINPOINTS,
        tile_size: int = 336,
        patch_size: int = 14,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        max_pixels: int = MAX_PIXELS,
        max_side: int = MAX_SIDE,
    ):
        self.pinpoints = tuple((int(h), int(w)) for h, w in pinpoints)
        if not self.pinpoints or any(h % tile_size or w % tile_size for h, w in self.pinpoints):
            raise ValueError(f"pinpoints must be non-empty multiples of tile_size {tile_size}")
        if tile_size % patch_size:
            raise ValueError(f"tile_size {tile_size} must be a multiple of patch_size {patch_size}")
        self.image_token, self.image_token_id = image_token, int(image_token_id)
        self.tile_size, self.patch_size = tile_size, patch_size
        self.grid_side = tile_size // patch_size  # 24
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.max_pixels, self.max_side = max_pixels, max_side

    @classmethod
    def from_config(cls, config, **kwargs: Any) -> MiniMaxVLProcessor:
        """From a ``minimax_jax.vl.vision.VLConfig``."""
        return cls(
            image_token_id=config.image_token_index,
            pinpoints=config.image_grid_pinpoints,
            tile_size=config.vision.image_size,
            patch_size=config.vision.patch_size,
            **kwargs,
        )

    # ------------------------------------------------------------------ geometry (exact ints)

    def check_size(self, height: int, width: int) -> None:
        """Raises ValueError for empty, oversized or too elongated images."""
        if height < 1 or width < 1:
            raise ValueError(f"image of {height}x{width} pixels (HxW) is empty")
        if max(height, width) > self.max_side or height * width > self.max_pixels:
            raise ValueError(
                f"image of {height}x{width} pixels (HxW) is too large (limits: side "
                f"{self.max_side}, {self.max_pixels:,} pixels): downscale it first"
            )
        h, w = self.unpadded_grid(height, width)
        if h < 1 or w < 1:
            raise ValueError(
                f"image of {height}x{width} pixels (HxW) is too elongated: its unpadded feature "
                f"grid is {h}x{w}; crop or pad it to a less extreme aspect ratio"
            )

    def canvas(self, height: int, width: int) -> tuple[int, int]:
        """The best pinpoint (canvas height, width) for an image of height x width."""
        best, best_eff, best_waste = None, -1, None
        for ch, cw in self.pinpoints:
            # Float arithmetic on purpose: the LLaVA-Next rule VL-01 was trained with.
            scale = min(cw / width, ch / height)
            dw, dh = int(width * scale), int(height * scale)
            eff = min(dw * dh, width * height)
            waste = ch * cw - eff
            if eff > best_eff or (eff == best_eff and waste < best_waste):
                best, best_eff, best_waste = (ch, cw), eff, waste
        return best

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of 336 px tiles of the chosen canvas."""
        ch, cw = self.canvas(height, width)
        return ch // self.tile_size, cw // self.tile_size

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the aspect-preserving resize that fits the canvas (int truncation, >= 1)."""
        ch, cw = self.canvas(height, width)
        scale_w, scale_h = cw / width, ch / height
        if scale_w < scale_h:  # the width fills the canvas
            return max(1, min(int(height * scale_w), ch)), cw
        return ch, max(1, min(int(width * scale_h), cw))

    def unpadded_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h', w') of the tile feature grid once the padding is removed (floor formula)."""
        rows, cols = self.grid(height, width)
        cur_h, cur_w = rows * self.grid_side, cols * self.grid_side
        if width * cur_h > cur_w * height:  # wider than the grid: rows were padded
            new_h = (height * cur_w) // width
            return cur_h - 2 * ((cur_h - new_h) // 2), cur_w
        new_w = (width * cur_h) // height
        return cur_h, cur_w - 2 * ((cur_w - new_w) // 2)

    def unpad_slices(self, height: int, width: int) -> tuple[slice, slice]:
        """Row and column slices of the [24*rows, 24*cols] grid that the unpadding keeps."""
        rows, cols = self.grid(height, width)
        cur_h, cur_w = rows * self.grid_side, cols * self.grid_side
        h, w = self.unpadded_grid(height, width)
        top, left = (cur_h - h) // 2, (cur_w - w) // 2
        return slice(top, top + h), slice(left, left + w)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Tokens one image of height x width takes: 576 + h' * (w' + 1)."""
        h, w = self.unpadded_grid(height, width)
        return self.grid_side**2 + h * (w + 1)

    # ------------------------------------------------------------------ pixels

    def load(self, image: Any):
        """A PIL RGB image from a path, a PIL image (any mode) or an HxW[xC] uint8 array."""
        Image = _pil()
        if isinstance(image, str | os.PathLike):
            if not os.path.isfile(image):
                raise FileNotFoundError(f"image file {os.fspath(image)!r} does not exist")
            try:
                with Image.open(image) as im:
                    im.load()
                    image = im.copy()
            except (OSError, Image.DecompressionBombError) as e:
                raise ValueError(f"cannot read image {os.fspath(image)!r}: {e}") from e
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(
                    f"image arrays must be uint8 [H, W] or [H, W, C], got {image.dtype} "
                    f"{image.shape}"
                )
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a path, PIL image or uint8 array, got {type(image)}")
        if image.mode == "RGB":
            return image
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            image = image.convert("RGBA")  # alpha dropped below: transparent pixels keep color
        return image.convert("RGB")

    def _normalize(self, x: np.ndarray) -> np.ndarray:
        """uint8 [n, T, T, 3] -> float32 [n, 3, T, T]."""
        y = (x.astype(np.float32) / np.float32(255.0) - self.mean) / self.std
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2), dtype=np.float32)

    def preprocess(self, image: Any) -> ImageInputs:
        """One image -> ImageInputs (thumbnail first, then the tiles row-major)."""
        Image = _pil()
        img = self.load(image)
        width, height = img.size
        self.check_size(height, width)
        (ch, cw), (rh, rw) = self.canvas(height, width), self.resized_size(height, width)
        resized = np.asarray(img.resize((rw, rh), Image.BICUBIC), np.uint8)
        canvas = np.zeros((ch, cw, 3), np.uint8)
        top, left = (ch - rh) // 2, (cw - rw) // 2
        canvas[top : top + rh, left : left + rw] = resized
        t = self.tile_size
        rows, cols = ch // t, cw // t
        tiles = canvas.reshape(rows, t, cols, t, 3).transpose(0, 2, 1, 3, 4).reshape(-1, t, t, 3)
        thumb = np.asarray(img.resize((t, t), Image.BICUBIC), np.uint8)[None]
        pixels = self._normalize(np.concatenate([thumb, tiles]))
        return ImageInputs(
            pixels, (height, width), (rows, cols), self.num_image_tokens(height, width)
        )

    # ------------------------------------------------------------------ prompts

    def expand_ids(self, ids: Sequence[int], sizes: Sequence[tuple[int, int]]) -> list[int]:
        """Each image token of ``ids`` -> num_image_tokens of the matching image, in order."""
        count = sum(int(i) == self.image_token_id for i in ids)
        if count != len(sizes):
            raise ValueError(
                f"the prompt has {count} {self.image_token} placeholder(s) but {len(sizes)} "
                "image(s) were given: use one placeholder per image"
            )
        out, k = [], 0
        for i in ids:
            if int(i) == self.image_token_id:
                out.extend([self.image_token_id] * self.num_image_tokens(*sizes[k]))
                k += 1
            else:
                out.append(int(i))
        return out

    def expand_text(self, text: str, sizes: Sequence[tuple[int, int]]) -> str:
        """Each ``<image>`` of ``text`` -> that many ``<image>`` strings (for tokenizers that know
        ``<image>`` as one special token)."""
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(sizes):
            raise ValueError(
                f"the prompt has {len(parts) - 1} {self.image_token} placeholder(s) but "
                f"{len(sizes)} image(s) were given: use one placeholder per image"
            )
        out = [parts[0]]
        for size, part in zip(sizes, parts[1:], strict=True):
            out.append(self.image_token * self.num_image_tokens(*size) + part)
        return "".join(out)

    def encode(self, tokenizer, text: str, sizes: Sequence[tuple[int, int]]) -> list[int]:
        """Token ids of ``text`` with every ``<image>`` expanded. The text between placeholders is
        encoded piece by piece, so the tokenizer need not know ``<image>``."""
        pieces = text.split(self.image_token)
        ids = list(tokenizer.encode(pieces[0])) if pieces[0] else []
        for piece in pieces[1:]:
            ids.append(self.image_token_id)
            ids.extend(tokenizer.encode(piece) if piece else [])
        return self.expand_ids(ids, sizes)

    def __call__(self, text: str, images: Sequence[Any], tokenizer) -> dict[str, np.ndarray]:
        """Prompt + images -> input_ids int32 [T], pixel_values float32 [n_tiles_total, 3, T, T]
        (images concatenated, each thumbnail first), image_sizes int32 [n_images, 2] (H, W)."""
        inputs = [self.preprocess(im) for im in images]
        sizes = [x.size for x in inputs]
        ids = self.encode(tokenizer, text, sizes)
        t = self.tile_size
        pixels = (
            np.concatenate([x.pixel_values for x in inputs])
            if inputs
            else np.zeros((0, 3, t, t), np.float32)
        )
        return {
            "input_ids": np.asarray(ids, np.int32),
            "pixel_values": pixels,
            "image_sizes": np.asarray(sizes, np.int32).reshape(-1, 2),
        }


def ensure_placeholders(prompt: str, num_images: int, image_token: str = IMAGE_TOKEN) -> str:
    """The user prompt with one ``<image>`` per image prepended when it has none.

    Call it on the user's text *before* the chat template renders it.
    """
    if num_images and image_token not in prompt:
        return image_token * num_images + "\n" + prompt
    return prompt


def image_parts_to_text(message: dict, image_token: str = IMAGE_TOKEN) -> dict:
    """A chat message whose content parts include {"type": "image"} -> one text part where each
    image part is ``<image>`` (MiniMax's template reads ``content[0]["text"]``)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    text = "".join(
        image_token if p.get("type") == "image" else p.get("text", "")
        for p in content
        if p.get("type") in ("image", "text")
    )
    return {**message, "content": [{"type": "text", "text": text}]}


def prepare_vl_inputs(
    processor: MiniMaxVLProcessor, tokenizer, prompt: str, images: Sequence[Any]
) -> dict[str, np.ndarray]:
    """For ``python -m minimax_jax.generate --image PATH``: rendered prompt + image paths ->
    {"input_ids" [T], "pixel_values" [n, 3, 336, 336], "image_sizes" [n_images, 2]}.

    ``prompt`` is the final text (chat template applied) with one ``<image>`` per image; use
    ``ensure_placeholders`` on the user's text first.
    """
    return processor(prompt, list(images), tokenizer)
