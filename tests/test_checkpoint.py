"""Checkpoints: exact resume after SIGKILL, clean exit on SIGTERM, params-only export."""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx
from flax import nnx

from minimax_jax import MiniMaxForCausalLM, ModelConfig, from_pretrained
from minimax_jax.inference.tokenizer import ChatTokenizer
from minimax_jax.training import checkpoint as ckpt
from minimax_jax.training import loop as train_lib
from minimax_jax.training.log import read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return fx.make_corpus(str(tmp_path_factory.mktemp("corpus")))


def _wait_for(proc, workdir: str, step: int, checkpoint: int | None, timeout=300.0) -> None:
    """Polls until metrics.jsonl has ``step`` and checkpoint ``checkpoint`` is finalised."""
    path = os.path.join(workdir, "metrics.jsonl")
    done = os.path.join(workdir, "checkpoints", str(checkpoint))
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()[1][-2000:]}")
        if os.path.exists(path) and (checkpoint is None or os.path.isdir(done)):
            rows = [json.loads(x) for x in open(path) if x.strip()]
            if rows and rows[-1]["step"] >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for step {step}")


def _losses(workdir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_and_sigterm_saves(corpus, tmp_path):
    """A: 12 uninterrupted steps. B: same run, SIGKILLed after checkpoint 4 (and step >= 6).
    C: restarted in B's workdir; every step matches A bit for bit; SIGTERM then saves and exits 0.
    """
    sections = {"optim": {"decay_steps": 12, "warmup_steps": 3}, "checkpoint": {"every": 4},
                "model": fx.TWO_LAYERS}  # fmt: skip
    raw_a = fx.raw_config(*corpus, train={"steps": 12, "log_every": 1}, **sections)
    raw_b = fx.raw_config(*corpus, train={"steps": 1000, "log_every": 1}, **sections)
    cfg_a = fx.write_yaml(str(tmp_path / "a.yaml"), raw_a)
    cfg_b = fx.write_yaml(str(tmp_path / "b.yaml"), raw_b)
    work_a, work_b = str(tmp_path / "a"), str(tmp_path / "b")
    proc_a = fx.cli(["--config", cfg_a, "--workdir", work_a])
    proc_b = fx.cli(["--config", cfg_b, "--workdir", work_b])
    _wait_for(proc_b, work_b, 6, checkpoint=4)
    proc_b.send_signal(signal.SIGKILL)
    proc_b.wait()
    before = _losses(work_b)
    assert proc_a.wait(timeout=300) == 0, proc_a.communicate()[1][-2000:]
    want = _losses(work_a)
    assert sorted(want) == list(range(1, 13))

    proc_c = fx.cli(["--config", cfg_b, "--workdir", work_b])
    _wait_for(proc_c, work_b, 13, checkpoint=None)
    proc_c.send_signal(signal.SIGTERM)
    out, err = proc_c.communicate(timeout=300)
    assert proc_c.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["preempted"] and summary["step"] >= 13
    assert os.path.isdir(os.path.join(work_b, "checkpoints", str(summary["step"])))

    got = _losses(work_b)
    diff = {s: (got.get(s), want[s]) for s in range(1, 13) if got.get(s) != want[s]}
    assert not diff, diff  # bitwise: the same floats
    assert all(before[s] == want[s] for s in before if s <= 12)


def test_export_loads_with_from_pretrained(corpus, tmp_path):
    config = ModelConfig.preset("tiny-native")
    params = MiniMaxForCausalLM(config, rngs=nnx.Rngs(3)).pure_params()
    out = str(tmp_path / "export")
    files = ckpt.export_pretrained(params, config, out, dtype=jnp.bfloat16, tokenizer_dir=corpus[1])
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    model = from_pretrained(out, dtype=jnp.bfloat16)
    loaded = model.pure_params()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        want = np.asarray(a) if b.dtype == jnp.float32 else np.asarray(a.astype(jnp.bfloat16))
        np.testing.assert_array_equal(np.asarray(b), want)
    assert ChatTokenizer.from_dir(out).eos_token_ids == (0,)


def test_export_from_workdir(corpus, tmp_path):
    cfg = fx.config(*corpus, train={"steps": 2}, checkpoint={"every": 1})
    summary = train_lib.train(config=cfg, workdir=str(tmp_path / "run"))
    files = train_lib.export(workdir=str(tmp_path / "run"), out_dir=str(tmp_path / "hf"))
    assert "tokenizer_config.json" in files
    loaded = from_pretrained(str(tmp_path / "hf")).pure_params()
    trained = summary["state"]["params"]
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_due_steps_are_the_multiples_of_every(tmp_path):
    """Not also step 1 (Orbax's default policy saves the first step of every run)."""
    c = ckpt.Checkpointer(str(tmp_path / "c"), every=3, keep=2, async_save=False)
    try:
        assert [s for s in range(1, 8) if c.manager.should_save(s)] == [3, 6]
    finally:
        c.close()
