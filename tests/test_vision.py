"""CLIP vision tower and projector vs transformers' CLIPVisionModel (tiny random, fp32, CPU).

Our tower is loaded from the CLIP state dict through ``minimax_jax.hf.vl_mapping`` (the names VL-01
stores under ``vision_tower.``), so the conversion table is tested along with the math.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minimax_jax.config import ModelConfig
from minimax_jax.hf import mapping, vl_mapping
from minimax_jax.vl import vision

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.torch
TOL = 1e-5


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a))
    return float(np.abs(a - b).max() / np.abs(b).max())


def tiny_clip(seed=0):
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return cfg, model


def vl_config(clip_cfg, text_dim=64):
    text = ModelConfig.preset("tiny-remote").replace(hidden_size=text_dim, vocab_size=512)
    return vision.VLConfig(
        text=text, vision=vision.VisionConfig.from_hf(clip_cfg.to_dict()), image_token_index=500
    )


def our_vision_params(cfg, state_dict):
    sd = {vl_mapping.VISION_PREFIX + k: v.detach().numpy() for k, v in state_dict.items()}
    assignments = [a for a in vl_mapping.vision_assignments(cfg) if a.leaf[0] == "vision_tower"]
    specs = mapping.flatten(vl_mapping.expected_leaf_shapes(cfg))
    flat = vl_mapping.fill_leaves(sd.__getitem__, assignments, specs)
    return mapping.unflatten({k[1:]: jnp.asarray(v) for k, v in flat.items()})


@pytest.fixture(scope="module")
def clip():
    clip_cfg, model = tiny_clip()
    cfg = vl_config(clip_cfg)
    return cfg, model, our_vision_params(cfg, model.state_dict())


def test_config_reads_clip_config(clip):
    cfg, model, _ = clip
    v = cfg.vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.grid, v.num_patches) == (32, 3, 4, 24, 576)
    assert vision.VisionConfig.from_hf(v.to_hf()) == v
    with pytest.raises(ValueError, match="gelu"):
        vision.VisionConfig(hidden_act="quick_gelu")


def test_vision_tower_matches_clip_last_hidden_state(clip):
    cfg, model, params = clip
    pixels = np.random.RandomState(0).randn(3, 3, 336, 336).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(pixels)).last_hidden_state[:, 1:].numpy()
    got = jax.jit(vision.vision_tower, static_argnums=0)(cfg.vision, params, pixels)
    assert got.shape == (3, 576, 32)
    assert rel_err(got, want) <= TOL


def test_no_post_layernorm_and_cls_dropped(clip):
    """Guard against silently using pooled / post-LN outputs: they differ from ours."""
    cfg, model, params = clip
    pixels = np.random.RandomState(1).randn(1, 3, 336, 336).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(pixels))
        post_ln = getattr(model, "vision_model", model).post_layernorm
        post = post_ln(out.last_hidden_state)[:, 1:].numpy()
    got = vision.vision_tower(cfg.vision, params, pixels)
    assert rel_err(got, post) > 1e-2


def test_module_and_projector_match_torch(clip):
    cfg, model, params = clip
    tower = vision.VisionTower(cfg.vision, rngs=nnx.Rngs(0))
    nnx.replace_by_pure_dict(nnx.state(tower, nnx.Param), params)
    proj = vision.Projector(32, 64, rngs=nnx.Rngs(1), dtype=jnp.float32)
    pixels = np.random.RandomState(2).randn(2, 3, 336, 336).astype(np.float32)
    feats = tower(pixels)
    p = {k: np.asarray(v, np.float64) for k, v in nnx.to_pure_dict(nnx.state(proj)).items()}
    lin1, lin2 = torch.nn.Linear(32, 64).double(), torch.nn.Linear(64, 64).double()
    with torch.no_grad():
        lin1.weight.copy_(torch.from_numpy(p["w1"].T))
        lin1.bias.copy_(torch.from_numpy(p["b1"]))
        lin2.weight.copy_(torch.from_numpy(p["w2"].T))
        lin2.bias.copy_(torch.from_numpy(p["b2"]))
        x = torch.from_numpy(np.asarray(feats, np.float64))
        want = lin2(torch.nn.functional.gelu(lin1(x))).numpy()
    assert rel_err(proj(feats), want) <= TOL


def test_bf16_params_close(clip):
    cfg, model, params = clip
    pixels = np.random.RandomState(3).randn(1, 3, 336, 336).astype(np.float32)
    ref = vision.vision_tower(cfg.vision, params, pixels)
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    got = vision.vision_tower(cfg.vision, low, pixels)
    assert got.dtype == jnp.bfloat16
    assert rel_err(got.astype(jnp.float32), ref) <= 5e-2


def test_attention_implementations_agree(clip):
    """xla (the reference), auto (= xla on CPU / fp32) and the Pallas flash kernel (interpret
    mode here) on one tile of the tiny tower, against CLIP at fp32 tolerance."""
    cfg, model, params = clip
    pixels = np.random.RandomState(4).randn(1, 3, 336, 336).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(pixels)).last_hidden_state[:, 1:].numpy()
    tower = jax.jit(vision.vision_tower, static_argnums=0, static_argnames="attention_impl")
    xla = tower(cfg.vision, params, pixels, attention_impl="xla")
    np.testing.assert_array_equal(tower(cfg.vision, params, pixels, attention_impl="auto"), xla)
    pallas = tower(cfg.vision, params, pixels, attention_impl="pallas")
    assert rel_err(xla, want) <= TOL and rel_err(pallas, want) <= TOL
    with pytest.raises(ValueError, match="attention_impl"):
        vision.vision_tower(cfg.vision, params, pixels, attention_impl="flash")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_flash_attention_masks_padded_keys(dtype):
    """S = 577 (not a multiple of the blocks): zero-padded keys must not take softmax mass."""
    rng = np.random.RandomState(0)
    q, k, v = (jnp.asarray(3 * rng.randn(2, 577, 2, 16), dtype) for _ in range(3))
    want = vision.attention(q, k, v, "xla").astype(jnp.float32)
    for bq, bk in ((128, 64), (64, 64)):
        got = vision.flash_attention_pallas(q, k, v, scale=0.25, block_q=bq, block_k=bk)
        assert got.dtype == dtype and got.shape == q.shape
        assert rel_err(got.astype(jnp.float32), want) <= (1e-5 if dtype == jnp.float32 else 2e-2)


def test_auto_attention_candidates():
    assert vision.auto_attention_candidates(jnp.float32, 64) == ("xla",)
    if jax.default_backend() != "gpu":
        assert vision.auto_attention_candidates(jnp.bfloat16, 64) == ("xla",)
        with pytest.raises(RuntimeError, match="cuDNN"):  # explicit cudnn does not fall back
            q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
            vision.attention(q, q, q, "cudnn")


def test_unrolled_layers_equal_scan(clip):
    cfg, _, params = clip
    pixels = np.random.RandomState(5).randn(1, 3, 336, 336).astype(np.float32)
    tower = jax.jit(vision.vision_tower, static_argnums=0, static_argnames="unroll")
    a = tower(cfg.vision, params, pixels)
    b = tower(cfg.vision, params, pixels, unroll=True)
    assert rel_err(b, a) <= 1e-6


def test_gelu_erf_matches_exact_gelu():
    """The erf form used on the device equals the exact GELU (fp32) over a wide range."""
    from minimax_jax.vl.vision import gelu_erf

    x = jnp.linspace(-12.0, 12.0, 20001, dtype=jnp.float32)
    want = np.asarray(jax.nn.gelu(x, approximate=False))
    got = np.asarray(gelu_erf(x))
    # Absolute: for x << 0 the erf form cancels to 0 where the value is < 1e-6 (as torch).
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    gb = np.asarray(gelu_erf(x.astype(jnp.bfloat16)).astype(jnp.float32))
    np.testing.assert_allclose(gb, want, rtol=1e-2, atol=1e-2)
