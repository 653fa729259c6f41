"""Logits parity with transformers' MiniMaxForCausalLM (random tiny weights, fp32, CPU).

Each tiny model is saved by transformers and loaded with `minimax_jax.from_pretrained`, so this
tests the public loading path as well as the math. transformers rotates all head dims (full RoPE);
partial RoPE is checked against a test-local patch of its rotary code.
"""

import numpy as np
import pytest
from helpers import SCALE_FACTORS

from minimax_jax import from_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
modeling_minimax = pytest.importorskip("transformers.models.minimax.modeling_minimax")

pytestmark = pytest.mark.torch

TOL = 1e-5
LIN, FULL = "linear_attention", "full_attention"
PATTERNS = {
    "one_7plus1_block": [LIN] * 7 + [FULL],
    "two_7plus1_blocks": ([LIN] * 7 + [FULL]) * 2,
    "transformers_default_alternating": None,  # full, linear, full, linear
    "irregular_layer0_lightning": [LIN, FULL, LIN, LIN, FULL],
}
LENGTHS = [1, 15, 16, 17, 50, 100]
# The tiny test width (also used by test_pretrained and test_convert_cli): query heads, head dim,
# kv heads, hidden, experts, expert FFN width.
N, H, K, D, E, F = 4, 32, 2, 64, 4, 96


def hf_config(layer_types, **changes):
    """A tiny transformers MiniMaxConfig with non-default DeepNorm factors (None: 4 layers of
    transformers' default pattern)."""
    n_layers = 4 if layer_types is None else len(layer_types)
    kwargs = dict(
        vocab_size=384,
        hidden_size=D,
        num_hidden_layers=n_layers,
        layer_types=layer_types,
        num_attention_heads=N,
        head_dim=H,
        num_key_value_heads=K,
        num_local_experts=E,
        num_experts_per_tok=2,
        intermediate_size=F,
        block_size=16,
        **SCALE_FACTORS,
        max_position_embeddings=4096,
    )
    return transformers.MiniMaxConfig(**(kwargs | changes))


def build(tmp_path, cfg, seed=0):
    """A transformers model with every weight random (norms around 1), and ours loaded from it."""
    torch.manual_seed(seed)
    ref = transformers.MiniMaxForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.ndim == 1 else 0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    return ref, from_pretrained(tmp_path)


def ref_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a))
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=sorted(PATTERNS))
def models(request, tmp_path_factory):
    layer_types = PATTERNS[request.param]
    return build(tmp_path_factory.mktemp(request.param), hf_config(layer_types))


def test_loaded_layer_pattern(models):
    ref, ours = models
    assert ours.config.layer_types == tuple(ref.config.layer_types)
    assert ours.config.rotary_dim == ours.config.head_dim  # transformers' full RoPE


@pytest.mark.parametrize("length", LENGTHS)
def test_logits_match(models, length):
    ref, ours = models
    ids = np.random.RandomState(length).randint(0, 384, (2, length))
    assert rel_err(ours(ids), ref_logits(ref, ids)) <= TOL


def test_left_padded_batch_rows_equal_unpadded_reference(models):
    ref, ours = models
    rng = np.random.RandomState(7)
    lengths, t = [50, 17, 1], 50
    ids = rng.randint(0, 384, (3, t))
    mask = np.zeros((3, t), np.int32)
    for i, n in enumerate(lengths):
        mask[i, t - n :] = 1
    got = ours(ids, mask)
    for i, n in enumerate(lengths):
        want = ref_logits(ref, ids[i : i + 1, t - n :])[0]
        assert rel_err(got[i, t - n :], want) <= TOL


def _partial_rope(rotary_dim):
    """transformers' rotate_half applied to the first rotary_dim dims only (the MiniMax rule)."""
    full = modeling_minimax.apply_rotary_pos_emb

    def apply(q, k, cos, sin, unsqueeze_dim=1):
        q_rot, k_rot = full(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin, unsqueeze_dim)
        return (
            torch.cat([q_rot, q[..., rotary_dim:]], -1),
            torch.cat([k_rot, k[..., rotary_dim:]], -1),
        )

    return apply


def test_partial_rope_against_patched_transformers(tmp_path, monkeypatch):
    theta, head_dim = 1e7, 32
    cfg = hf_config(
        PATTERNS["one_7plus1_block"],
        rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5},
    )
    ref, ours = build(tmp_path, cfg, seed=1)
    rd = ours.config.rotary_dim
    assert rd == head_dim // 2
    ids = np.random.RandomState(3).randint(0, 384, (2, 40))
    unpatched = ref_logits(ref, ids)  # transformers as shipped: RoPE on all 32 dims
    inv_freq = 1.0 / (theta ** (torch.arange(0, rd, 2, dtype=torch.float) / rd))
    ref.model.rotary_emb.inv_freq = inv_freq
    monkeypatch.setattr(modeling_minimax, "apply_rotary_pos_emb", _partial_rope(rd))
    got = ours(ids)
    assert rel_err(got, ref_logits(ref, ids)) <= TOL
    assert rel_err(got, unpatched) > 1e-3  # the patch mattered: full RoPE is a different model
