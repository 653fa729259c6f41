"""MiniMaxVLProcessor: SPEC token counts, pixels vs an independent computation, odd inputs."""

import numpy as np
import pytest
from PIL import Image

from minimax_jax.vl import processor as proc
from minimax_jax.vl.processor import MiniMaxVLProcessor
from minimax_jax.vl.vision import PINPOINTS

SPEC_TABLE = {
    (336, 336): 1176,
    (480, 640): 2340,
    (640, 480): 2352,
    (768, 1024): 7560,
    (1080, 1920): 9864,
    (2000, 500): 5904,
    (300, 1000): 2182,
}


@pytest.fixture(scope="module")
def p():
    return MiniMaxVLProcessor()


def random_image(h, w, seed=0, mode="RGB"):
    rng = np.random.RandomState(seed)
    if mode == "L":
        return Image.fromarray(rng.randint(0, 256, (h, w), dtype=np.uint8), "L")
    channels = 4 if mode == "RGBA" else 3
    return Image.fromarray(rng.randint(0, 256, (h, w, channels), dtype=np.uint8), mode)


def test_pinpoints_are_the_28_of_spec():
    assert len(PINPOINTS) == 28
    assert (2016, 1008) in PINPOINTS and (1344, 1344) in PINPOINTS
    assert (1344, 1680) not in PINPOINTS and (2016, 1344) not in PINPOINTS


@pytest.mark.parametrize("size", sorted(SPEC_TABLE))
def test_token_counts_equal_spec_table(p, size):
    assert p.num_image_tokens(*size) == SPEC_TABLE[size]


def _independent_tokens(h, w):
    """LLaVA-Next counting written out with floats: best canvas, unpad, newline, + 576."""
    best = max(
        PINPOINTS,
        key=lambda c: (
            min(int(w * min(c[1] / w, c[0] / h)) * int(h * min(c[1] / w, c[0] / h)), h * w),
            -(c[0] * c[1]),
            -PINPOINTS.index(c),
        ),
    )
    cur_h, cur_w = best[0] // 14, best[1] // 14
    if w / h > cur_w / cur_h:
        new = int(round(h * (cur_w / w), 7))
        cur_h -= 2 * ((cur_h - new) // 2)
    else:
        new = int(round(w * (cur_h / h), 7))
        cur_w -= 2 * ((cur_w - new) // 2)
    return 576 + cur_h * (cur_w + 1)


def test_token_counts_match_float_formula_on_random_sizes(p):
    rng = np.random.RandomState(0)
    for h, w in rng.randint(30, 4000, (400, 2)):
        h, w = int(h), int(w)
        if min(p.unpadded_grid(h, w)) >= 1:
            assert p.num_image_tokens(h, w) == _independent_tokens(h, w), (h, w)


def _independent_pixels(img):
    """Canvas by transformers' own selection, resize with floats, np.pad, explicit tile loop."""
    select_best_resolution = pytest.importorskip(
        "transformers.image_processing_utils"
    ).select_best_resolution

    w, h = img.size
    ch, cw = select_best_resolution((h, w), [list(c) for c in PINPOINTS])
    sw, sh = cw / w, ch / h
    nh, nw = (min(int(h * sw), ch), cw) if sw < sh else (ch, min(int(w * sh), cw))
    arr = np.asarray(img.resize((nw, nh), Image.Resampling.BICUBIC), np.float64)
    top, left = (ch - nh) // 2, (cw - nw) // 2
    canvas = np.pad(arr, ((top, ch - nh - top), (left, cw - nw - left), (0, 0)))
    tiles = [img.resize((336, 336), Image.Resampling.BICUBIC)]
    tiles = [np.asarray(tiles[0], np.float64)]
    for r in range(ch // 336):
        for c in range(cw // 336):
            tiles.append(canvas[r * 336 : (r + 1) * 336, c * 336 : (c + 1) * 336])
    x = np.stack(tiles) / 255.0
    x = (x - np.array(proc.CLIP_MEAN)) / np.array(proc.CLIP_STD)
    return x.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("size", [(480, 640), (1080, 1920), (2000, 500), (300, 1000), (50, 60)])
def test_pixels_match_independent_computation(p, size):
    img = random_image(*size, seed=size[0])
    got = p.preprocess(img)
    want = _independent_pixels(img)
    assert got.pixel_values.dtype == np.float32
    assert got.pixel_values.shape == want.shape == (1 + got.grid[0] * got.grid[1], 3, 336, 336)
    np.testing.assert_allclose(got.pixel_values, want, atol=1e-5, rtol=0)
    assert got.size == size and got.num_tokens == p.num_image_tokens(*size)


def test_padding_is_black_before_normalisation(p):
    got = p.preprocess(random_image(480, 640)).pixel_values  # canvas 672x672, pad rows at top
    black = (-np.array(proc.CLIP_MEAN) / np.array(proc.CLIP_STD)).astype(np.float32)
    np.testing.assert_allclose(got[1, :, 0, 0], black, atol=1e-6)


def test_grayscale_rgba_palette_and_arrays_are_converted(p, tmp_path):
    gray = random_image(200, 300, mode="L")
    as_rgb = gray.convert("RGB")
    np.testing.assert_array_equal(
        p.preprocess(gray).pixel_values, p.preprocess(as_rgb).pixel_values
    )
    rgba = random_image(200, 300, mode="RGBA")
    no_alpha = Image.fromarray(np.asarray(rgba)[..., :3], "RGB")
    np.testing.assert_array_equal(
        p.preprocess(rgba).pixel_values, p.preprocess(no_alpha).pixel_values
    )
    pal = as_rgb.convert("P")
    assert p.preprocess(pal).pixel_values.shape == p.preprocess(as_rgb).pixel_values.shape
    arr = np.asarray(as_rgb)
    np.testing.assert_array_equal(p.preprocess(arr).pixel_values, p.preprocess(as_rgb).pixel_values)
    path = tmp_path / "x.png"
    as_rgb.save(path)
    np.testing.assert_array_equal(
        p.preprocess(path).pixel_values, p.preprocess(as_rgb).pixel_values
    )


def test_tiny_huge_and_extreme_images(p, tmp_path):
    tiny = p.preprocess(random_image(1, 1))
    assert (
        tiny.grid == (1, 1) and tiny.num_tokens == 1176 and np.all(np.isfinite(tiny.pixel_values))
    )
    assert p.preprocess(random_image(2, 3)).pixel_values.shape == (2, 3, 336, 336)
    assert p.preprocess(random_image(40, 2016)).grid == (1, 6)  # 1:50 still has features
    with pytest.raises(ValueError, match="too elongated"):
        p.preprocess(random_image(3, 2000))
    with pytest.raises(ValueError, match="too large"):
        p.check_size(40000, 100)
    with pytest.raises(ValueError, match="too large"):
        p.check_size(10000, 10000)
    with pytest.raises(ValueError, match="empty"):
        p.check_size(0, 10)
    with pytest.raises(FileNotFoundError):
        p.preprocess(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        p.preprocess(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="uint8"):
        p.preprocess(np.zeros((4, 4, 3), np.float32))


class FakeTokenizer:
    """Bytes as ids (+1000), no special tokens: the processor must split on <image> itself."""

    def encode(self, text):
        return [1000 + b for b in text.encode()]


def test_prompt_expansion(p):
    sizes = [(336, 336), (480, 640)]
    ids = p.encode(FakeTokenizer(), "a<image>b<image>", sizes)
    img = p.image_token_id
    assert ids == [1097] + [img] * 1176 + [1098] + [img] * 2340
    assert p.expand_ids([5, img, 6], [(336, 336)]) == [5] + [img] * 1176 + [6]
    text = p.expand_text("x<image>y", [(480, 640)])
    assert text == "x" + "<image>" * 2340 + "y"
    with pytest.raises(ValueError, match="placeholder"):
        p.encode(FakeTokenizer(), "no image here", sizes)
    assert proc.ensure_placeholders("hi", 1) == "<image>\nhi"
    assert proc.ensure_placeholders("<image> hi", 1) == "<image> hi"
    msg = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}
    assert proc.image_parts_to_text(msg)["content"] == [{"type": "text", "text": "<image>What?"}]


def test_call_batches_several_images(p):
    images = [random_image(336, 336), random_image(300, 1000, seed=1)]
    out = proc.prepare_vl_inputs(p, FakeTokenizer(), "<image><image>Describe.", images)
    assert out["pixel_values"].shape == (2 + 4, 3, 336, 336)
    np.testing.assert_array_equal(out["image_sizes"], [[336, 336], [300, 1000]])
    assert int((out["input_ids"] == p.image_token_id).sum()) == 1176 + 2182
    assert out["input_ids"].dtype == np.int32


def test_chat_template_and_real_tokenizer_path(p):
    """Image parts render as <image> through MiniMax's chat template; the byte-level tokenizer
    never has to know <image>; text around the image survives."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from minimax_jax.inference.tokenizer import ChatTokenizer
    from minimax_jax.training.tokenizer_train import CHAT_TEMPLATE_SOURCE

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = ChatTokenizer(bpe, json.loads(Path(CHAT_TEMPLATE_SOURCE).read_text()))  # released M1
    msg = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    text = tok.render_chat([proc.image_parts_to_text(msg)])
    assert "user name=user\n<image>What is it?" in text
    out = proc.prepare_vl_inputs(p, tok, text, [random_image(480, 640)])
    ids = out["input_ids"]
    where = np.flatnonzero(ids == p.image_token_id)
    assert len(where) == 2340 and np.all(np.diff(where) == 1)
    before, after = ids[: where[0]], ids[where[-1] + 1 :]
    assert tok.decode(before).endswith("user name=user\n")
    assert tok.decode(after).startswith("What is it?")
    plain = proc.ensure_placeholders("What is it?", 1)
    assert "user name=user\n<image>\nWhat is it?" in tok.render_chat(
        [{"role": "user", "content": plain}]
    )
