"""MiniMax-VL-01 end to end on tiny random weights (fp32, CPU).

The reference is composed here from transformers' CLIPVisionModel, a torch projector, the packing
written out as SPEC describes it, and transformers' MiniMaxForCausalLM (full-RoPE config) run on
input embeddings. Ours is loaded from an HF VL-01 checkpoint assembled from those same modules.
"""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import SCALE_FACTORS
from safetensors.numpy import load_file, save_file

from minimax_jax.hf import mapping, vl_mapping, vl_pretrained
from minimax_jax.hf.mapping import CheckpointMismatchError
from minimax_jax.inference import vl_generate
from minimax_jax.vl import model as vl_model
from minimax_jax.vl.processor import MiniMaxVLProcessor
from minimax_jax.vl.vision import PINPOINTS, VLConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.torch
TOL = 1e-5
M1_INDEX = Path(__file__).parent / "data" / "minimax-m1" / "model.safetensors.index.json"
IMG = 500  # image token id of the tiny vocabulary
LIN, FULL = "linear_attention", "full_attention"


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a))
    return float(np.abs(a - b).max() / np.abs(b).max())


def _randomize(module, scale=0.1):
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_weight = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(
                1 + 0.2 * torch.randn_like(p) if is_norm_weight else scale * torch.randn_like(p)
            )


def build_reference(seed=0):
    torch.manual_seed(seed)
    text_cfg = transformers.MiniMaxConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=8,
        layer_types=[LIN] * 7 + [FULL],
        num_attention_heads=4,
        head_dim=32,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=96,
        block_size=64,
        max_position_embeddings=8192,
        **SCALE_FACTORS,
    )
    text = transformers.MiniMaxForCausalLM(text_cfg).eval()
    _randomize(text)
    clip_cfg = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    clip = transformers.CLIPVisionModel(clip_cfg).eval()
    _randomize(clip, 0.2)
    lin1, lin2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 64)
    _randomize(lin1, 0.05)  # features at the scale of token embeddings, as in a trained model
    _randomize(lin2, 0.05)
    newline = 0.1 * torch.randn(64)
    return text, clip, lin1, lin2, newline


def write_checkpoint(path, ref):
    text, clip, lin1, lin2, newline = ref
    text.save_pretrained(path / "text")
    tensors = {
        "language_model." + k: v for k, v in load_file(path / "text/model.safetensors").items()
    }
    for k, v in clip.state_dict().items():
        if "post_layernorm" not in k and "position_ids" not in k:
            tensors[vl_mapping.VISION_PREFIX + k] = v.numpy()
    for i, lin in ((1, lin1), (2, lin2)):
        tensors[f"multi_modal_projector.linear_{i}.weight"] = lin.weight.detach().numpy()
        tensors[f"multi_modal_projector.linear_{i}.bias"] = lin.bias.detach().numpy()
    tensors["image_newline"] = newline.numpy()
    out = path / "vl"
    out.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out / "model.safetensors")
    config = {
        "architectures": ["MiniMaxVL01ForConditionalGeneration"],
        "model_type": "minimax_vl_01",
        "image_token_index": IMG,
        "image_grid_pinpoints": [list(p) for p in PINPOINTS],
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "text_config": text.config.to_dict(),
        "vision_config": clip.config.to_dict(),
    }
    (out / "config.json").write_text(json.dumps(config))
    return out, tensors


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = build_reference()
    path, tensors = write_checkpoint(tmp_path_factory.mktemp("vl"), ref)
    return ref, path, tensors, vl_pretrained.from_pretrained_vl(path)


def reference_features(ref, pixel_values, sizes):
    """Torch: CLIP last layer without CLS -> projector -> LLaVA-style packing per SPEC."""
    _, clip, lin1, lin2, newline = ref
    with torch.no_grad():
        feats = clip(torch.from_numpy(pixel_values)).last_hidden_state[:, 1:]
        feats = lin2(torch.nn.functional.gelu(lin1(feats)))
    proc, out, start = MiniMaxVLProcessor(), [], 0
    for h, w in sizes:
        rows, cols = (s // 336 for s in proc.canvas(h, w))
        f = feats[start : start + 1 + rows * cols]
        start += 1 + rows * cols
        grid = f[1:].view(rows, cols, 24, 24, -1).permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2)
        cur_h, cur_w = grid.shape[1:]
        if w / h > cur_w / cur_h:
            pad = (cur_h - int(round(h * (cur_w / w), 7))) // 2
            grid = grid[:, pad : cur_h - pad]
        else:
            pad = (cur_w - int(round(w * (cur_h / h), 7))) // 2
            grid = grid[:, :, pad : cur_w - pad]
        nl = newline[:, None, None].expand(-1, grid.shape[1], 1)
        packed = torch.cat([grid, nl], dim=-1).flatten(1, 2).T
        out.append(torch.cat([f[0], packed]))
    return torch.cat(out)


def reference_logits(ref, ids, pixel_values, sizes):
    text = ref[0]
    with torch.no_grad():
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        embeds = text.get_input_embeddings()(ids_t)
        embeds[ids_t == IMG] = reference_features(ref, pixel_values, sizes)
        return text(inputs_embeds=embeds).logits.numpy()


def make_inputs(sizes, text="Describe <image> and <image> please."):
    rng = np.random.RandomState(0)
    images = [rng.randint(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]

    class Tok:
        def encode(self, s):
            return [int(b) + 100 for b in s.encode()]

    out = MiniMaxVLProcessor(image_token_id=IMG)(text, images, Tok())
    return out["input_ids"][None], out["pixel_values"], out["image_sizes"]


def test_config_and_layout(setup):
    _, path, _, ours = setup
    cfg = ours.config
    assert cfg.image_token_index == IMG and cfg.vision.num_layers == 2
    assert cfg.text.rotary_dim == cfg.text.head_dim  # transformers' full RoPE
    assert VLConfig.from_hf(cfg.to_hf()) == cfg
    assert vl_pretrained.is_vl_checkpoint(path) and not vl_pretrained.is_vl_checkpoint(path.parent)


def test_packed_features_match_reference(setup):
    """Thumbnail first, grid re-assembled, rows (100x700) / columns (700x150) unpadded, newlines."""
    ref, _, _, ours = setup
    sizes = [(700, 150), (100, 700), (336, 336)]
    ids, pixels, image_sizes = make_inputs(sizes, "<image><image><image>")
    got = vl_model.image_features(ours.config, ours.pure_params(), pixels, image_sizes)
    want = reference_features(ref, pixels, sizes).numpy()
    assert got.shape == want.shape == (1800 + 1306 + 1176, 64)
    assert rel_err(got, want) <= TOL


def _float64(ref):
    text, clip, lin1, lin2, newline = (copy.deepcopy(m) for m in ref)
    text.set_experts_implementation("eager")  # torch's grouped_mm has no float64
    return text.double(), clip.double(), lin1.double(), lin2.double(), newline.double()


def test_vl_forward_matches_composed_reference(setup):
    """Ours in fp32 vs the composed reference run in float64 (its exact value): over ~2.2k tokens
    of lightning layers fp32 noise alone is ~1e-5 (transformers' own fp32 run is 1.5e-5 away
    from its float64 run here), so the fp32 reference would not resolve 1e-5."""
    ref, _, _, ours = setup
    sizes = [(60, 700), (336, 336)]  # rows unpadded / none; 1014 + 1176 tokens, 4 + 2 tiles
    ids, pixels, image_sizes = make_inputs(sizes)
    assert (ids == IMG).sum() == 1014 + 1176
    got = ours(ids, pixels, image_sizes)
    want = reference_logits(_float64(ref), ids, pixels.astype(np.float64), sizes)
    assert rel_err(got, want) <= TOL


def test_tile_batches_do_not_change_features(setup):
    _, _, _, ours = setup
    ids, pixels, sizes = make_inputs([(480, 640)], "<image>")
    params = ours.pure_params()
    a = vl_model.image_features(ours.config, params, pixels, sizes, max_tile_batch=32)
    b = vl_model.image_features(ours.config, params, pixels, sizes, max_tile_batch=2)
    assert a.shape == (2340, 64)
    assert rel_err(a, b) <= 1e-6  # batch shape only changes float summation order


def test_tile_bucket_host_cast_and_device_pixels_do_not_change_features(setup):
    """Padding to a bucket, bf16 pixels cast on the host (the transfer) or on the device, and
    pixels already on the device: the same features (bit-exact for the cast)."""
    import jax
    import jax.numpy as jnp

    _, _, _, ours = setup
    _, pixels, _ = make_inputs([(480, 640)], "<image>")  # 5 tiles
    v, params = ours.config.vision, ours.pure_params()
    exact = vl_model.encode_tiles(v, params, pixels)
    assert vl_model.TILE_BUCKET == 1 and exact.shape == (5, 576, 64)
    padded = vl_model.encode_tiles(v, params, pixels, tile_bucket=8)
    assert rel_err(padded, exact) <= 1e-6
    np.testing.assert_array_equal(vl_model.encode_tiles(v, params, jnp.asarray(pixels)), exact)
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    host = vl_model.encode_tiles(v, low, pixels, cast_on_host=True)
    device = vl_model.encode_tiles(v, low, pixels)  # default: float32 transfer, cast on device
    assert host.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(host, np.float32), np.asarray(device, np.float32))
    with pytest.raises(ValueError, match="attention_impl"):
        vl_model.encode_tiles(v, params, pixels, attention_impl="flash")


def test_auto_attention_falls_back_when_a_kernel_fails(setup, monkeypatch):
    """Attention "auto" moves past a fused kernel that fails to trace (cuDNN on CPU) or whose
    first run fails (simulated), once per process, with a warning; explicit choices do not fall
    back."""
    from flax import nnx

    _, _, _, ours = setup
    _, pixels, _ = make_inputs([(336, 336)], "<image>")
    v, params = ours.config.vision, ours.pure_params()
    want = vl_model.encode_tiles(v, params, pixels, attention_impl="xla")
    monkeypatch.setattr(vl_model, "_ATTENTION_FAILED", {})
    monkeypatch.setattr(vl_model, "_ATTENTION_VERIFIED", set())
    monkeypatch.setattr(
        vl_model, "auto_attention_candidates", lambda *_: ("cudnn", "pallas", "xla")
    )
    real = vl_model._encode_tiles

    class RunFails:
        def block_until_ready(self):
            raise RuntimeError("simulated launch failure")

    def fake(cfg, tower, proj, pixels, dtype, impl="xla", unroll=1):
        return (
            RunFails() if impl == "pallas" else real(cfg, tower, proj, pixels, dtype, impl, unroll)
        )

    monkeypatch.setattr(vl_model, "_encode_tiles", fake)
    assert vl_model.resolved_attention_impl(v, params) == "cudnn"
    with pytest.warns(RuntimeWarning) as caught:
        got = vl_model.encode_tiles(v, params, pixels)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "'cudnn' failed" in messages[0] and "'pallas'" in messages[1]
    np.testing.assert_array_equal(got, want)
    assert {k[-1] for k in vl_model._ATTENTION_FAILED} == {"cudnn", "pallas"}
    assert vl_model.resolved_attention_impl(v, params) == "xla"
    np.testing.assert_array_equal(vl_model.encode_tiles(v, params, pixels), want)
    with pytest.raises(RuntimeError, match="cuDNN"):
        vl_model.encode_tiles(v, params, pixels, attention_impl="cudnn")
    with pytest.raises(ValueError, match="vision_attention"):
        vl_model.MiniMaxVLForConditionalGeneration(
            ours.config, rngs=nnx.Rngs(0), vision_attention="flash"
        )


def test_mismatched_inputs_are_refused(setup):
    _, _, _, ours = setup
    ids, pixels, sizes = make_inputs([(336, 336)], "<image>")
    with pytest.raises(ValueError, match="image tokens"):
        ours(ids[:, :-1], pixels, sizes)
    with pytest.raises(ValueError, match="tiles"):
        ours(ids, pixels[:1], sizes)
    with pytest.raises(ValueError, match="no image"):
        ours(ids)


def test_greedy_generation_equals_repeated_forward(setup):
    _, _, _, ours = setup
    ids, pixels, sizes = make_inputs([(336, 336)], "Look: <image>!")
    got = vl_generate.generate_vl(ours, ids, pixels, sizes, max_new_tokens=3, prefill_chunk=512)
    # Greedy = repeated full forwards; causality lets one forward over prompt + tokens check all.
    full = np.asarray(ours(np.concatenate([ids, got[:, :2]], axis=1), pixels, sizes))
    t = ids.shape[1]
    np.testing.assert_array_equal(got[0], full[0, t - 1 :].argmax(-1))


def test_round_trip_hf_ours_hf_is_bit_exact(setup, tmp_path):
    _, path, tensors, ours = setup
    vl_pretrained.save_pretrained_vl(ours, tmp_path, schema="native")
    back = load_file(tmp_path / "model.safetensors")
    learned = set(vl_mapping.expected_names(ours.config))
    assert learned <= set(tensors) and learned <= set(back)
    assert set(back) - learned == set(tensors) - learned  # only derived lightning buffers
    for name in learned:
        assert back[name].dtype == tensors[name].dtype, name
        np.testing.assert_array_equal(back[name], tensors[name], err_msg=name)
    again = vl_pretrained.from_pretrained_vl(tmp_path)
    ids, pixels, sizes = make_inputs([(336, 336)], "<image>")
    np.testing.assert_array_equal(
        np.asarray(again(ids, pixels, sizes)), np.asarray(ours(ids, pixels, sizes))
    )


def _meta(config, dtype="BF16"):
    return {a.name: (a.hf_shape, dtype) for a in vl_mapping.export_assignments(config)}


def test_real_vl01_key_audit_from_metadata_only():
    config = VLConfig.preset("minimax-vl-01")
    names = vl_mapping.expected_names(config)
    assert len(names) == len(set(names)) == 8637
    text = [n for n in names if n.startswith("language_model.")]
    if M1_INDEX.exists():  # same names as the released Text-01 / M1 index
        weight_map = json.loads(M1_INDEX.read_text())["weight_map"]
        assert {n[len("language_model.") :] for n in text} == set(weight_map)
    assert len(text) == 8243  # the Text-01 / M1 layout
    assert sum(n.startswith("vision_tower.vision_model.") for n in names) == 389
    plan = vl_mapping.plan_load(config, names, meta=_meta(config))
    # every leaf of the model is covered exactly once (the text planner checks its own grid)
    vision_leaves = {a.leaf for a in plan.vision}
    assert vision_leaves == set(vl_mapping.vision_leaf_shapes(config))
    counts = {}
    for a in plan.vision:
        counts[(a.leaf, a.slot)] = counts.get((a.leaf, a.slot), 0) + 1
    assert set(counts.values()) == {1}
    assert set(plan.text.by_leaf) == set(mapping.flatten(mapping.expected_leaf_shapes(config.text)))
    n_params = sum(int(np.prod(s)) for s in vl_mapping.vision_leaf_shapes(config).values())
    # CLIP ViT-L/14-336 without post-LayerNorm (303,507,456 - 2,048) + projector + newline
    assert n_params == 303_505_408 + 1024 * 6144 + 6144 + 6144 * 6144 + 6144 + 6144


def test_audit_reports_every_problem():
    config = VLConfig.preset("minimax-vl-01")
    names = vl_mapping.expected_names(config)
    meta = _meta(config)
    bad = [n for n in names if "encoder.layers.3.mlp.fc1.weight" not in n] + ["vision_tower.x"]
    meta["multi_modal_projector.linear_1.weight"] = ((6144, 1000), "BF16")
    with pytest.raises(CheckpointMismatchError) as e:
        vl_mapping.plan_load(config, bad, meta=meta)
    problems = e.value.problems
    assert problems["missing tensors"] == [
        vl_mapping.VISION_PREFIX + "encoder.layers.3.mlp.fc1.weight"
    ]
    assert problems["unknown tensors"] == ["vision_tower.x"]
    assert "multi_modal_projector.linear_1.weight" in problems["wrong shapes"][0]
    ok = names + [vl_mapping.VISION_PREFIX + "post_layernorm.weight"]
    assert vl_mapping.plan_load(config, ok).ignored == [
        vl_mapping.VISION_PREFIX + "post_layernorm.weight"
    ]


def test_full_size_model_layout_equals_mapping_layout():
    """jax.eval_shape of the real VL-01: every leaf is what minimax_jax.hf.vl_mapping fills."""
    from flax import nnx

    config = VLConfig.preset("minimax-vl-01")
    abstract = nnx.eval_shape(
        lambda: vl_model.MiniMaxVLForConditionalGeneration(config, rngs=nnx.Rngs(0))
    )
    got = {
        p: (tuple(v.shape), str(v.dtype))
        for p, v in mapping.flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))).items()
    }
    want = {
        p: (tuple(v.shape), str(v.dtype))
        for p, v in mapping.flatten(vl_mapping.expected_leaf_shapes(config)).items()
    }
    assert got == want
    vision_params = sum(int(np.prod(s)) for p, (s, _) in got.items() if p[0] != "language_model")
    assert vision_params == 347_564_032  # SPEC: "+ 0.34B" over the Text-01 LM


def test_left_padded_batch_rows_equal_single_rows(setup):
    """Two prompts with their own images, left-padded into one batch: features go to the right
    rows (row-major order) and each row computes what it computes alone."""
    _, _, _, ours = setup
    a = make_inputs([(336, 336)], "A <image>")
    b = make_inputs([(60, 700)], "Longer text, <image> here")
    ta, tb = a[0].shape[1], b[0].shape[1]
    t = max(ta, tb)
    ids = np.zeros((2, t), np.int32)
    mask = np.zeros((2, t), np.int32)
    for row, (x, n) in enumerate(((a, ta), (b, tb))):
        ids[row, t - n :], mask[row, t - n :] = x[0][0], 1
    pixels = np.concatenate([a[1], b[1]])
    sizes = np.concatenate([a[2], b[2]])
    got = np.asarray(ours(ids, pixels, sizes, mask))
    # fp32 noise only: the batch runs both images' tiles through the tower and 2 rows through the LM
    # where each row alone runs fewer, so XLA:CPU sums in another order (1.1e-5 on the unpadded
    # row with JAX 0.10.2); a feature in the wrong row or a leaking pad is O(1).
    assert rel_err(got[0, t - ta :], ours(*a)[0]) <= 2 * TOL
    assert rel_err(got[1, t - tb :], ours(*b)[0]) <= 2 * TOL


def test_generate_for_cli_with_image_file(setup, tmp_path):
    import io

    from PIL import Image
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from minimax_jax.inference.tokenizer import ChatTokenizer
    from minimax_jax.vl.processor import MiniMaxVLProcessor, prepare_vl_inputs

    _, path, _, ours = setup
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = ChatTokenizer(bpe, {})
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.RandomState(5).randint(0, 256, (200, 260, 3), np.uint8)).save(image)
    buf = io.StringIO()
    gen = dict(max_new_tokens=3, temperature=0.0, prefill_chunk=512)
    texts = vl_generate.generate_for_cli(path, tok, ["Look: <image>"], [image], out=buf, **gen)
    x = prepare_vl_inputs(MiniMaxVLProcessor(image_token_id=IMG), tok, "Look: <image>", [image])
    want = vl_generate.generate_vl(
        ours, x["input_ids"][None], x["pixel_values"], x["image_sizes"], **gen
    )
    assert texts == [tok.decode(want[0])] and buf.getvalue() == texts[0] + "\n"
    with pytest.raises(ValueError, match="VL-01 checkpoint"):
        vl_generate.generate_for_cli(path / "..", tok, ["<image>"], [image])


def test_round_trip_hf_orbax_hf_is_bit_exact(setup, tmp_path):
    _, path, tensors, ours = setup
    vl_mapping.hf_to_orbax(path, tmp_path / "orbax")
    restored = vl_pretrained.from_pretrained_vl(tmp_path / "orbax")
    vl_pretrained.save_pretrained_vl(restored, tmp_path / "hf", schema="native")
    back = load_file(tmp_path / "hf" / "model.safetensors")
    for name in vl_mapping.expected_names(ours.config):
        assert back[name].dtype == tensors[name].dtype, name
        np.testing.assert_array_equal(back[name], tensors[name], err_msg=name)
    flat = mapping.flatten(restored.pure_params())
    assert flat[("language_model", "blocks", 0, "moe", "router")].dtype == np.float32


def test_generate_cli_with_image_flag(setup, tmp_path):
    """`python -m minimax_jax.generate --image` (its run_generate) equals generate_vl."""
    import shutil

    from PIL import Image
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from minimax_jax.inference.runner import run_generate
    from minimax_jax.inference.tokenizer import ChatTokenizer
    from minimax_jax.vl.processor import MiniMaxVLProcessor, prepare_vl_inputs

    _, path, _, ours = setup
    ckpt = tmp_path / "ckpt"
    shutil.copytree(path, ckpt)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.save(str(ckpt / "tokenizer.json"))
    image = tmp_path / "dog.png"
    Image.fromarray(np.random.RandomState(9).randint(0, 256, (90, 300, 3), np.uint8)).save(image)
    got = run_generate(
        checkpoint=str(ckpt),
        prompts=["Look"],
        chat=False,
        greedy=True,
        max_new_tokens=3,
        images=[str(image)],
        prefill_chunk=512,
    )
    tok = ChatTokenizer.from_dir(ckpt)
    x = prepare_vl_inputs(MiniMaxVLProcessor(image_token_id=IMG), tok, "<image>\nLook", [image])
    want = vl_generate.generate_vl(
        ours,
        x["input_ids"][None],
        x["pixel_values"],
        x["image_sizes"],
        max_new_tokens=3,
        temperature=0.0,
        prefill_chunk=512,
    )
    assert got == [tok.decode(want[0])]
