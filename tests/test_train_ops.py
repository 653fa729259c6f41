"""Training operations: the shipped run configs, the resolved run_config.yaml, train.profile,
log.backends (TensorBoard, W&B) and `train --plot`."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
import types

import jax
import pytest
import train_fixtures as fx
from flax import nnx

from minimax_jax import MiniMaxForCausalLM
from minimax_jax import sharding as shard_lib
from minimax_jax.cli import UsageError
from minimax_jax.training import log as log_lib
from minimax_jax.training import loop as train_lib
from minimax_jax.training import run_config as tc
from minimax_jax.training.log import MetricsLog, read_metrics

SHIPPED = sorted(glob.glob(os.path.join(fx.REPO, "configs", "train", "*.yaml")))


def _data_present(cfg: tc.TrainConfig) -> bool:
    """Every source and the tokenizer exist (paths relative to the repository root)."""
    paths = [s.path for s in cfg.data.sources] + [cfg.data.tokenizer]
    return all(glob.glob(os.path.join(fx.REPO, p), recursive=True) for p in paths)


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_config_resolves(path, monkeypatch):
    """Every configs/train/*.yaml loads with strict keys, resolves its model and mesh rules, and
    builds its model abstractly; the parameter count is the one its sizes give."""
    monkeypatch.chdir(fx.REPO)
    cfg = tc.load(path)
    model = train_lib.resolve_model_config(cfg.model)
    shard_lib.load_rules(cfg.mesh.rules)
    abstract = nnx.eval_shape(lambda: MiniMaxForCausalLM(model, rngs=nnx.Rngs(0)))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert count == model.param_count()
    if os.path.basename(path) == "demo_gpu.yaml":  # "a 6.4M-parameter hybrid MiniMax"
        assert round(count / 1e6, 1) == 6.4, count
    if os.path.basename(path) == "tiny.yaml":
        assert _data_present(cfg), "tiny.yaml must run on data the repository holds"


def test_tiny_yaml_runs_as_shipped_with_profile_and_resolved_config(tmp_path, monkeypatch):
    """configs/train/tiny.yaml as shipped (its data and tokenizer are in the repository) trains 2
    steps; WORKDIR/run_config.yaml reads back as the same config (steps resolved); a
    train.profile of step 2 leaves a jax.profiler trace under WORKDIR/profile."""
    monkeypatch.chdir(fx.REPO)
    shipped = tc.load(fx.TINY_YAML)
    cfg = dataclasses.replace(
        shipped, train=dataclasses.replace(shipped.train, profile={"start_step": 2, "steps": 1})
    )
    work = tmp_path / "work"
    summary = train_lib.train(config=cfg, workdir=str(work), steps=2)
    assert summary["step"] == 2 and math.isfinite(summary["loss"])
    assert [r["step"] for r in read_metrics(str(work)) if "loss" in r] == [1, 2]
    written = tc.load(str(work / train_lib.RUN_CONFIG_FILE))
    assert written == dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2))
    assert written.data.sources == shipped.data.sources and written.train.steps == 2
    assert not [p for p in os.listdir(work) if p.startswith(".")]  # no temporaries left
    traces = glob.glob(str(work / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000, traces


def test_run_config_keys_are_checked():
    raw = fx.raw_config("x/*.txt", "tok")
    cases = [
        ({"train": {"distributed": "sometimes"}}, "train.distributed must be one of auto, on"),
        ({"train": {"profile": {"start_step": 0, "steps": 2}}}, "train.profile must be null"),
        ({"train": {"profile": {"start": 1, "steps": 2}}}, "train.profile must be null"),
        ({"log": {"backends": ["jsonl", "mlflow"]}}, "unknown backend 'mlflow'"),
        ({"log": {"wandb_team": "x"}}, "unknown key log.wandb_team"),
    ]
    for sections, match in cases:
        bad = {**raw, **{k: {**raw.get(k, {}), **v} for k, v in sections.items()}}
        with pytest.raises(tc.ConfigError, match=match):
            tc.from_dict(bad)
    for value, mode in ((True, "on"), (False, "off"), ("auto", "auto")):  # YAML: on -> True
        assert tc.from_dict({**raw, "train": {"distributed": value}}).train.distributed == mode
    ok = tc.from_dict({**raw, "log": {"backends": ["jsonl", "wandb"], "wandb_project": "p"}})
    assert ok.log.backends == ("jsonl", "wandb") and ok.to_dict()["log"]["backends"] == [
        "jsonl",
        "wandb",
    ]
    assert tc.from_dict(ok.to_dict()) == ok


class _FakeWriter:
    def __init__(self, logdir, purge_step=None):
        self.logdir, self.purge_step, self.scalars, self.closed = logdir, purge_step, [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


class _FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def test_log_backends_tensorboard_and_wandb(tmp_path, monkeypatch):
    """Listed backends get every finite scalar of each logged row at its step (jsonl keeps NaN
    as null); W&B is initialised once per workdir and a second log resumes the same run id."""
    writers, runs = [], []
    tbx = types.SimpleNamespace(SummaryWriter=lambda *a, **k: writers.append(_FakeWriter(*a, **k))
                                or writers[-1])  # fmt: skip
    wandb = types.SimpleNamespace(init=lambda **k: runs.append(_FakeRun(**k)) or runs[-1])
    monkeypatch.setitem(sys.modules, "tensorboardX", tbx)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    section = tc.LogSection(backends=("jsonl", "tensorboard", "wandb"), wandb_project="proj")
    row = {"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": float("nan"), "tokens_per_s": 10.0,
           "mfu": 0.1, "skipped": 0.0}  # fmt: skip
    log = MetricsLog(str(tmp_path), 0, 3, is_main=True, log_section=section, config={"a": 1})
    log.step(row)
    log.eval(2, {"eval_loss": 2.0, "eval_ppl": math.exp(2.0), "eval_tokens": 64.0})
    log.close()
    want = {"loss": 2.5, "lr": 1e-3, "tokens_per_s": 10.0, "mfu": 0.1, "skipped": 0.0}
    (tb,) = writers
    assert tb.logdir == str(tmp_path / "tb") and tb.purge_step == 1 and tb.closed
    assert [(t, v) for t, v, s in tb.scalars if s == 1] == list(want.items())
    assert ("eval_loss", 2.0, 2) in tb.scalars
    (run,) = runs
    run_id = (tmp_path / log_lib.WANDB_ID_FILE).read_text().strip()
    assert run.kwargs == {"project": "proj", "name": None, "id": run_id, "resume": "allow",
                          "dir": str(tmp_path), "config": {"a": 1}}  # fmt: skip
    assert run.logged[0] == (1, want) and run.logged[1][0] == 2 and run.finished
    assert read_metrics(str(tmp_path))[0]["grad_norm"] is None
    MetricsLog(str(tmp_path), 1, 3, is_main=True, log_section=section).close()  # a resume
    assert runs[1].kwargs["id"] == run_id and writers[1].purge_step == 2
    # not the main process: no backend opened
    MetricsLog(str(tmp_path), 1, 3, is_main=False, log_section=section).close()
    assert len(runs) == 2 and len(writers) == 2


def test_missing_backend_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(log_lib.BackendError, match=r"pip install 'minimax_jax\[wandb\]'"):
        log_lib.check_backends(("jsonl", "wandb"))
    with pytest.raises(log_lib.BackendError, match="tensorboardX package is not installed"):
        log_lib.check_backends(("tensorboard",))
    log_lib.check_backends(("jsonl",))
    log_lib.check_backends(None)
    MetricsLog(str(tmp_path), 0, 1, is_main=True).close()  # default: a note, no error
    assert "tensorboardX not installed" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- plot


def _metrics(workdir) -> list[dict]:
    rows = [{"step": s, "loss": 5.0 / s, "lr": 1e-3 * s, "tokens_per_s": 100.0 * s,
             "mfu": 0.01 * s} for s in range(1, 7)]  # fmt: skip
    rows[2]["loss"] = None  # a non-finite step: jsonl writes null
    rows.append({"step": 6, "eval_loss": 1.5, "eval_ppl": math.exp(1.5)})
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def test_plot_run_draws_the_metrics(tmp_path):
    """`--plot WORKDIR`: the loss / eval / lr / tokens-per-s curves hold the rows' values (null
    skipped), the MFU axis is tokens/s scaled by the run's constant, the PNG is tagged as ours
    and replaced only if ours."""
    pytest.importorskip("matplotlib", reason="matplotlib (extra plot) is not installed")
    from PIL import Image

    from minimax_jax.training import plot

    rows = _metrics(tmp_path)
    fig = plot.figure(rows)
    loss_ax, lr_ax, tok_ax = fig.axes[:3]
    want = [(r["step"], r["loss"]) for r in rows[:6] if r["loss"] is not None]
    assert loss_ax.lines[0].get_xydata().tolist() == [list(p) for p in want]
    assert loss_ax.lines[1].get_xydata().tolist() == [[6, 1.5]]
    assert lr_ax.lines[0].get_ydata().tolist() == [1e-3 * s for s in range(1, 7)]
    assert tok_ax.lines[0].get_ydata().tolist() == [100.0 * s for s in range(1, 7)]
    secondary = [c for c in tok_ax.child_axes if c.get_ylabel() == "MFU (%)"]
    assert len(secondary) == 1
    plot.pyplot().close(fig)

    out = plot.plot_run(str(tmp_path))
    assert out == str(tmp_path / "metrics.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (800, 900)
        assert image.info["Software"] == plot.SOFTWARE
    assert plot.plot_run(str(tmp_path)) == out  # its own file: replaced
    foreign = tmp_path / "mine.png"
    foreign.write_bytes(b"not a png")
    with pytest.raises(UsageError, match="not written by train --plot"):
        plot.plot_run(str(tmp_path), str(foreign))
    assert foreign.read_bytes() == b"not a png"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 1, "eval_loss": 2.0}\n')
    with pytest.raises(UsageError, match="no training steps"):
        plot.plot_run(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot.plot_run(str(tmp_path / "nowhere"))


def test_plot_without_matplotlib_is_one_clear_error(monkeypatch):
    from minimax_jax.training import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError, match=r"matplotlib, which is not installed: pip install"):
        plot.pyplot()
