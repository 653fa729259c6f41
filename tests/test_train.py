"""Training loop: losses, memorisation, packing, accumulation + 8-device sharding, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx
from flax import nnx

from minimax_jax import MiniMaxForCausalLM, ModelConfig
from minimax_jax.model.decoder import forward
from minimax_jax.training import loop as train_lib
from minimax_jax.training import losses
from minimax_jax.training import run_config as tc
from minimax_jax.training.data import DataError
from minimax_jax.training.log import read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return fx.make_corpus(str(tmp_path_factory.mktemp("corpus")))


# ------------------------------------------------------------------------------- losses


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    weights = (rng.random((2, 5)) > 0.3).astype(np.float32)
    nll, n = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -(np.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights).sum()
    np.testing.assert_allclose(float(nll), want, rtol=1e-5)
    assert float(n) == weights.sum()


def test_router_losses():
    uniform = jnp.zeros((3, 2, 4, 4))  # equal logits: uniform routing -> the minimum, 1.0
    np.testing.assert_allclose(float(losses.load_balancing_loss(uniform, 2, None)), 1.0, rtol=1e-6)
    skewed = jnp.zeros((1, 1, 8, 4)).at[..., 0].set(5.0).at[..., 1].set(4.0)
    assert float(losses.load_balancing_loss(skewed, 2, None)) > 1.5
    mask = jnp.asarray([[1, 1, 0, 0]], jnp.float32)
    logits = jax.random.normal(jax.random.key(0), (2, 1, 4, 4))
    z = losses.router_z_loss(logits, mask)
    want = np.mean(np.asarray(jax.nn.logsumexp(logits, -1) ** 2)[:, :, :2])
    np.testing.assert_allclose(float(z), want, rtol=1e-5)


def test_packed_loss_equals_unpacked_documents():
    config = ModelConfig.preset("tiny-native")
    params = MiniMaxForCausalLM(config, rngs=nnx.Rngs(0)).pure_params()
    rng = np.random.default_rng(1)
    lengths = (17, 5, 26)  # across lightning blocks of 16; the row has 48 tokens
    docs = [rng.integers(0, config.vocab_size, size=n).astype(np.int32) for n in lengths]
    tokens = np.concatenate(docs)[None]
    seg = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])[None]
    logits, _ = forward(config, params, jnp.asarray(tokens), segment_ids=jnp.asarray(seg))
    targets, weights, _ = losses.shifted_targets(jnp.asarray(tokens), jnp.asarray(seg))
    packed, n_packed = losses.cross_entropy(logits, targets, weights)
    total, n_total = 0.0, 0.0
    for d in docs:
        lg, _ = forward(config, params, jnp.asarray(d[None]))
        ones = jnp.ones((1, len(d)), jnp.int32)
        t, w, _ = losses.shifted_targets(jnp.asarray(d[None]), ones)
        nll, n = losses.cross_entropy(lg, t, w)
        total, n_total = total + float(nll), n_total + float(n)
    assert float(n_packed) == n_total == sum(lengths) - len(lengths)
    np.testing.assert_allclose(float(packed), total, rtol=1e-5)


def test_weight_decay_mask_skips_norms_and_embedding():
    from minimax_jax.training.step import decay_mask

    params = MiniMaxForCausalLM(ModelConfig.preset("tiny-native"), rngs=nnx.Rngs(0)).pure_params()
    flat = {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): v
        for path, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))
    }
    off = sorted(k for k, v in flat.items() if not v)
    assert "embed" in off and "final_norm" in off and "blocks/0/attn/norm" in off
    assert all("norm" in k or k == "embed" for k in off)
    assert flat["lm_head"] and flat["blocks/7/moe/wi"] and flat["blocks/0/attn/qkv"]


# ------------------------------------------------------------------------------- config


def test_config_strict_keys_and_overrides(corpus):
    raw = fx.raw_config(*corpus)
    raw["optim"]["learning_rate"] = 1.0
    with pytest.raises(tc.ConfigError, match="unknown key optim.learning_rate"):
        tc.from_dict(raw)
    with pytest.raises(tc.ConfigError, match="unknown section"):
        tc.from_dict({**fx.raw_config(*corpus), "trainer": {}})
    raw = tc.apply_overrides(fx.raw_config(*corpus), ["optim.lr=1e-3", "model.remat=full"])
    cfg = tc.from_dict(raw)
    assert cfg.optim.lr == 1e-3 and cfg.model.remat == "full"
    with pytest.raises(tc.ConfigError, match="data.seq_len must be int"):
        tc.from_dict(fx.raw_config(*corpus, data={"seq_len": "long"}))


def test_bad_input_fails_before_compiling(corpus, tmp_path, monkeypatch):
    def no_jit(*a, **k):
        raise AssertionError("compiled before validating the input")

    monkeypatch.setattr(jax, "jit", no_jit)
    cases = [
        ({"data": {"sources": [{"type": "text", "path": str(tmp_path / "nope/*.txt")}]}},
         DataError, "matches no files"),
        ({"model": {"overrides": {"vocab_size": 100}}}, DataError, "vocab_size is 100"),
        ({"data": {"eos_token": "<eos>"}}, DataError, "no eos token"),
        ({"mesh": {"rules": "fsdp_ep", "num_devices": None, "fsdp": 1, "expert": 1,
                   "sequence": 8}, "data": {"seq_len": 36}},
         tc.ConfigError, r"seq_len = 36 does not split over mesh.sequence = 8"),
    ]  # fmt: skip
    for sections, err, match in cases:
        with pytest.raises(err, match=match):
            train_lib.train(config=fx.config(*corpus, **sections), workdir=str(tmp_path / "w"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    cfg = fx.config(corpus[0], corpus[1], data={"sources": [
        {"type": "text", "path": str(tmp_path / "empty" / "*.txt")}]})  # fmt: skip
    with pytest.raises(DataError, match="empty"):
        train_lib.train(config=cfg, workdir=str(tmp_path / "w"))


def test_cli_bad_key_one_line_on_stderr(corpus, tmp_path):
    path = fx.write_yaml(str(tmp_path / "bad.yaml"), fx.raw_config(*corpus, train={"stpes": 3}))
    proc = fx.cli(["--config", path, "--workdir", str(tmp_path / "w")])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2  # bad input (README: exit codes)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown key train.stpes" in lines[0], err


# ------------------------------------------------------------------------------- training


def test_memorises_tiny_dataset(corpus, tmp_path):
    cfg = fx.config(
        *corpus,
        data={"seq_len": 32, "batch_size": 4, "eval_fraction": 0.0},
        optim={"lr": 1e-2, "warmup_steps": 10},
        train={"steps": 100, "log_every": 10},
        checkpoint={"every": 1000},
    )
    summary = train_lib.train(config=cfg, workdir=str(tmp_path))
    rows = read_metrics(str(tmp_path))
    first, last = rows[0]["loss"], summary["loss"]
    assert rows[0]["step"] == 1 and first > 4.0 and last < 0.1, (first, last)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(rows[-1])


def test_sharded_accumulated_matches_single_device(corpus, tmp_path):
    """8 devices with FSDP rules and 2 microbatches, 8 devices with FSDP + expert parallelism
    (fsdp_ep rules, 4 experts over `expert`, all-to-all dispatch), and 8 devices with each row's
    32 tokens split over sequence=4 (expert=2) == 1 device, fp32, 6 steps."""
    common = {"optim": {"lr": 3e-3, "warmup_steps": 2}, "train": {"steps": 6}}
    ep = {"rules": "fsdp_ep", "expert": 4, "fsdp": 2}
    seq = {"rules": "fsdp_ep", "expert": 2, "fsdp": 1, "sequence": 4}
    runs = (
        ("one", {"num_devices": 1}, 1, "sorted"),
        ("eight", {"num_devices": None}, 2, "sorted"),
        ("ep", {"num_devices": None, **ep}, 1, "ep"),
        ("seq", {"num_devices": None, **seq}, 1, "ep"),
    )
    curves = []
    for name, mesh, accum, moe in runs:
        model = {**fx.TWO_LAYERS, "moe_impl": moe}
        cfg = fx.config(*corpus, data={"batch_size": 16, "grad_accum": accum}, mesh=mesh,
                        model=model, **common)  # fmt: skip
        setup = train_lib.prepare(cfg)
        assert setup.mesh.devices.size == (mesh["num_devices"] or 8)
        if name == "ep":
            assert setup.mesh.shape["expert"] == 4 and setup.rules.name == "fsdp_ep"
        if name == "seq":
            assert setup.mesh.shape["sequence"] == 4
        train_lib.train(config=cfg, workdir=str(tmp_path / name), setup=setup)
        curves.append([r["loss"] for r in read_metrics(str(tmp_path / name)) if "loss" in r])
    assert len(curves[0]) == 6
    np.testing.assert_allclose(curves[1], curves[0], rtol=2e-5)
    np.testing.assert_allclose(curves[2], curves[0], rtol=2e-5)
    np.testing.assert_allclose(curves[3], curves[0], rtol=2e-5)


def test_nonfinite_steps_skipped_then_stop(corpus, tmp_path):
    cfg = fx.config(
        *corpus,
        model=fx.TWO_LAYERS,
        optim={"lr": 1e30, "warmup_steps": 0, "clip_norm": None},
        train={"steps": 50, "max_nonfinite": 3},
    )
    with pytest.raises(train_lib.TrainError, match="3 non-finite steps in a row"):
        train_lib.train(config=cfg, workdir=str(tmp_path))
    rows = read_metrics(str(tmp_path))
    assert [r["skipped"] for r in rows[-3:]] == [1.0, 1.0, 1.0]
    assert rows[0]["skipped"] == 0.0
