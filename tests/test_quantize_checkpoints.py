"""Int8 checkpoints against a tiny transformers-made HF checkpoint (CPU): quantise-on-load equals
hf_to_orbax --quantize, next-token quality against fp32 (with a broken quantiser that must fail
the same bounds), and the CLIs' one-line errors."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_transformers_parity as tp
from test_convert_cli import LAYER_TYPES, ROOT, V, _write_tokenizer

from convert import hf_to_orbax
from minimax_jax.hf import mapping
from minimax_jax.hf.pretrained import from_pretrained
from minimax_jax.model import quant
from minimax_jax.model.decoder import RunOptions, forward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.torch

_forward = jax.jit(forward, static_argnums=(0, 4))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A transformers checkpoint whose matrices have output channels of very different sizes
    (x exp(U(-4, 4)) per output row), and its Orbax conversions."""
    root = tmp_path_factory.mktemp("q")
    torch.manual_seed(0)
    cfg = tp.hf_config(LAYER_TYPES, vocab_size=V, tie_word_embeddings=False)
    model = transformers.MiniMaxForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                rows = torch.exp(8 * torch.rand(*p.shape[:-1], 1) - 4)  # per output channel
                p.copy_(0.03 * torch.randn_like(p) * rows / rows.mean())
    model.save_pretrained(root / "hf")
    _write_tokenizer(root / "hf")
    for name, scheme in (("int8", "int8"), ("experts", "experts_int8"), ("float", None)):
        hf_to_orbax.convert(hf_dir=root / "hf", out_dir=root / name, dtype="float32",
                            quantize=scheme, stream=None)  # fmt: skip
    return root


def _ids():
    return jnp.asarray(np.random.RandomState(3).randint(0, V, (2, 40)), jnp.int32)


def _logits(model_or_params, config):
    params = model_or_params
    if not isinstance(params, dict):
        params = model_or_params.pure_params()
    return np.asarray(_forward(config, params, _ids(), None, RunOptions())[0])


@pytest.mark.parametrize("scheme,name", [("int8", "int8"), ("experts_int8", "experts")])
def test_converted_checkpoint_equals_quantise_on_load(ckpts, scheme, name):
    on_load = from_pretrained(ckpts / "hf", quantize=scheme)
    stored = from_pretrained(ckpts / name)  # no requantising: the stored scheme
    assert stored.quantize == scheme
    a, b = mapping.flatten(on_load.pure_params()), mapping.flatten(stored.pure_params())
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(_logits(stored, stored.config), _logits(on_load, stored.config))
    # A float Orbax checkpoint quantised while it is restored: the same int8 weights again.
    from_float = mapping.flatten(from_pretrained(ckpts / "float", quantize=scheme).pure_params())
    assert all(np.array_equal(a[k], from_float[k]) for k in a)
    with pytest.raises(ValueError, match="cannot be requantised"):
        other = "experts_int8" if scheme == "int8" else "int8"
        from_pretrained(ckpts / name, quantize=other)


def _quality(logits, ref):
    """(mean next-token KL(ref || int8) in nats, top-1 agreement)."""
    lp, lq = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(logits, -1)
    kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))
    return kl, float(np.mean(np.argmax(logits, -1) == np.argmax(ref, -1)))


def _broken(params, config, scheme, how):
    """The scheme's weights through a broken quantiser, dequantised into a float params tree:
    "axis" puts the scales on the input channels instead of the output ones, "expert" pairs
    each expert's q with the next expert's scales."""
    flat = mapping.flatten(params)
    for leaf, contract in mapping.int8_leaves(config, scheme).items():
        w = np.asarray(flat[leaf])
        keep = (0, 1) if "moe" in leaf else (0,)  # layers (and experts): never reduced
        axes = contract
        if how == "axis":
            axes = tuple(a for a in range(w.ndim) if a not in contract and a not in keep)
        q, scale = quant.quantize(w, axes)
        if how == "expert" and "moe" in leaf:
            scale = np.roll(scale, 1, axis=1)
        flat[leaf] = quant.QArray(q, scale).dequantize()
    return mapping.unflatten(flat)


def test_next_token_quality_against_fp32(ckpts):
    fp32 = from_pretrained(ckpts / "hf")
    config = fp32.config
    ref = _logits(fp32, config)
    # (max KL, min top-1); measured: experts_int8 3.5e-7 / 1.0, int8 1.2e-4 / 1.0
    bounds = {"experts_int8": (1e-5, 0.99), "int8": (5e-4, 0.97)}
    broken_ways = {"experts_int8": ("expert",), "int8": ("expert", "axis")}
    for scheme, (max_kl, min_top1) in bounds.items():
        kl, top1 = _quality(_logits(from_pretrained(ckpts / "hf", quantize=scheme), config), ref)
        print(f"{scheme}: KL {kl:.2e} top-1 {top1:.3f}")
        assert kl <= max_kl and top1 >= min_top1, scheme
        for how in broken_ways[scheme]:
            bkl, btop1 = _quality(_logits(_broken(fp32.pure_params(), config, scheme, how),
                                          config), ref)  # fmt: skip
            print(f"{scheme} broken ({how}): KL {bkl:.2e} top-1 {btop1:.3f}")
            assert bkl > max_kl and bkl > 4 * kl, (scheme, how)


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    return proc.returncode, lines


def test_cli_errors_are_one_line(ckpts, tmp_path):
    rc, lines = _cli("minimax_jax.generate", "--checkpoint", str(ckpts / "int8"),
                     "--quantize", "experts_int8", "--prompt", "hello")  # fmt: skip
    assert rc == 2 and lines[-1].startswith("error: ") and "cannot be requantised" in lines[-1]
    rc, lines = _cli("minimax_jax.generate", "--quantize", "int4", "--prompt", "x")
    assert rc == 2 and len(lines) == 1 and "experts_int8|int8" in lines[0]
    rc, lines = _cli("convert.orbax_to_hf", "--orbax_dir", str(ckpts / "experts"), "--out_dir",
                     str(tmp_path / "back"))  # fmt: skip
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "int8 weights (quantize=experts_int8)" in lines[0]
    assert not (tmp_path / "back").exists()
    rc, lines = _cli("convert.hf_to_orbax", "--hf_dir", str(ckpts / "hf"), "--out_dir",
                     str(tmp_path / "o"), "--quantize", "fp8")  # fmt: skip
    assert rc == 2 and len(lines) == 1 and "experts_int8|int8" in lines[0]
