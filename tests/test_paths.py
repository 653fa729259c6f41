"""Path arguments (``minimax_jax.paths``): local paths, Hugging Face hub ids resolved offline from
a real HF cache layout, and gs:// URLs reaching ``etils.epath`` (an in-memory fsspec filesystem
registered for ``gs``: gcsfs is not installed here), never a local ``gs:`` directory."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import train_fixtures as fx
from flax import nnx
from test_generate_cli import train_tokenizer
from test_orbax import config_of, write_checkpoint

from convert import hf_to_orbax, orbax_to_hf
from convert.common import ArgumentError
from minimax_jax import MiniMaxForCausalLM, ModelConfig, from_pretrained, paths, save_pretrained
from minimax_jax.hf import mapping
from minimax_jax.inference.runner import run_generate
from minimax_jax.outputs import MARKER
from minimax_jax.training import checkpoint as ckpt_lib
from minimax_jax.training import data as data_lib
from minimax_jax.training import loop as train_lib
from minimax_jax.training.log import MetricsLog, read_metrics

ROOT = Path(__file__).parent.parent
REPO, SHA = "tiny-owner/tiny-model", "0123456789abcdef0123456789abcdef01234567"


def params_of(model) -> dict:
    return {k: np.asarray(v) for k, v in mapping.flatten(model.pure_params()).items()}


def assert_same_model(a, b) -> None:
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


# ------------------------------------------------------------------------------------------
# Classification


def test_classify_precedence_and_refusals(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.classify("owner/name", "--checkpoint") == paths.HUB
    assert paths.classify("owner/name@v1.0", "--checkpoint") == paths.HUB
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert paths.classify("owner/name", "--checkpoint") == paths.LOCAL  # an existing dir wins
    assert paths.classify("./other/name", "--checkpoint") == paths.LOCAL  # ./ is always local
    assert paths.classify("/no/such/dir", "--checkpoint") == paths.LOCAL
    assert paths.classify("other/name", "--out_dir", hub=False) == paths.LOCAL
    assert paths.classify("gs://bucket/m1", "--hf_dir") == paths.URL
    assert paths.classify("s3://bucket/m1/", "--hf_dir") == paths.URL
    assert paths.parse_hub_id("o/n@refs/pr/1") == ("o/n", "refs/pr/1")
    assert paths.parse_hub_id("o/n") == ("o/n", None)
    for bad in ("ftp://x", "foo://y", "file:///tmp/x", "memory://x", "http://h/m"):
        with pytest.raises(paths.PathError, match=rf"^--checkpoint {bad}: unsupported scheme"):
            paths.classify(bad, "--checkpoint")
        with pytest.raises(paths.PathError, match="^--out_dir"):
            paths.location(bad, "--out_dir")
    for bad in ("own/na me", "own/-name", "a--b/c", "a/b/c", "own/name@", "own/", "x", "a/b.git"):
        with pytest.raises(paths.PathError, match="not a Hugging Face hub id") as e:
            paths.classify(bad, "--checkpoint")
        assert str(e.value).startswith(f"--checkpoint {bad}: no such local path")
    with pytest.raises(paths.PathError, match="s3:// is not supported here"):
        paths.location("s3://b/run", "--workdir", ("gs",))
    assert not any(p.name.endswith(":") for p in tmp_path.iterdir())


def test_hub_id_syntax_agrees_with_huggingface_hub():
    """``parse_hub_id`` accepts exactly the owner/name ids huggingface_hub's own validator does."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    names = ["MiniMaxAI/MiniMax-M1-80k", "a/b", "a_b/c.d", "org/x-y_z.1", "a/-b", "a/b-",
             "a/.b", "a/b.", "a--b/c", "a/b..c", "a/b c", "a/b/c", "a/" + "x" * 96,
             "a/" + "x" * 95, "a/b!", "a/b.git", "a/_b", "a_/b_", "1/2"]  # fmt: skip
    for name in names:
        try:
            validate_repo_id(name)
            hf_ok = name.count("/") == 1
        except HFValidationError:
            hf_ok = False
        assert (paths.parse_hub_id(name) is not None) == hf_ok, name


def test_hub_download_takes_only_checkpoint_files(monkeypatch, tmp_path):
    """The files a hub id downloads, filtered by huggingface_hub's own matcher from the real
    MiniMax-M1 file list plus the extras such repos carry."""
    from huggingface_hub.utils import filter_repo_objects

    index = json.loads((ROOT / "tests/data/minimax-m1/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    wanted = ["config.json", "generation_config.json", "merges.txt", "vocab.json", "tokenizer.json",
              "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
              "model.safetensors.index.json", *shards]  # fmt: skip
    other = ["README.md", ".gitattributes", "LICENSE", "figures/a.png", "modeling_minimax_m1.py",
             "original/model.safetensors", "onnx/tokenizer.json", "main.py"]  # fmt: skip
    seen = {}

    def fake_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert paths.hub_snapshot("MiniMaxAI/MiniMax-M1-80k@main", "--checkpoint") == tmp_path
    assert (seen["repo_id"], seen["revision"]) == ("MiniMaxAI/MiniMax-M1-80k", "main")
    chosen = filter_repo_objects(
        wanted + other,
        allow_patterns=seen["allow_patterns"],
        ignore_patterns=seen["ignore_patterns"],
    )
    assert sorted(chosen) == sorted(wanted)


# ------------------------------------------------------------------------------------------
# Hub ids from a warmed cache, offline


def _make_checkpoint(path: Path) -> None:
    cfg = ModelConfig.preset("tiny-remote")
    save_pretrained(MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)), path)
    train_tokenizer(cfg.vocab_size).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<end_of_sentence>"}))
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))


def _warm_cache(cache: Path, src: Path) -> None:
    """``src``'s files in huggingface_hub's cache layout: blobs named by content hash, the
    snapshot of commit SHA linking to them, refs/main naming SHA."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=REPO, repo_type="model")
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    _make_checkpoint(root / "ckpt")
    _warm_cache(root / "cache", root / "ckpt")
    return {"ckpt": root / "ckpt", "cache": root / "cache"}


@pytest.fixture
def offline(hub, monkeypatch):
    """HF_HUB_CACHE = the warmed cache and HF_HUB_OFFLINE=1, in the environment and in
    huggingface_hub's constants (read once at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def test_cache_fixture_is_a_real_hf_cache(offline):
    from huggingface_hub import scan_cache_dir

    repos = {r.repo_id: r for r in scan_cache_dir(offline["cache"]).repos}
    assert {rev.commit_hash for rev in repos[REPO].revisions} == {SHA}
    assert {f.file_name for f in next(iter(repos[REPO].revisions)).files} == {
        p.name for p in offline["ckpt"].iterdir()
    }


def test_hub_id_loads_offline_like_the_directory(offline):
    want = from_pretrained(offline["ckpt"])
    snapshot = offline["cache"] / f"models--{REPO.replace('/', '--')}" / "snapshots" / SHA
    assert paths.hub_snapshot(REPO, "path") == snapshot
    assert_same_model(from_pretrained(REPO), want)
    assert_same_model(from_pretrained(f"{REPO}@{SHA}"), want)
    with pytest.raises(paths.PathError, match=f"^path {REPO}@v2: .*HF_HUB_OFFLINE"):
        from_pretrained(f"{REPO}@v2")
    with pytest.raises(paths.PathError, match="^path tiny-owner/absent: .*HF_HUB_OFFLINE"):
        from_pretrained("tiny-owner/absent")


GENERATE = dict(prompts=["print"], chat=False, max_new_tokens=4, prefill_chunk=16)


@pytest.fixture(scope="module")
def greedy_text(hub) -> list[str]:
    """What the checkpoint directory generates (greedy: its generation_config.json has
    do_sample false, which the CLI reads)."""
    return run_generate(checkpoint=str(hub["ckpt"]), greedy=True, **GENERATE)


def test_generate_with_a_hub_id_in_process(offline, greedy_text, capsys):
    assert run_generate(checkpoint=REPO, greedy=True, **GENERATE) == greedy_text
    assert f"[{REPO}]" in capsys.readouterr().err


def test_generate_cli_with_a_hub_id_offline(hub, greedy_text, tmp_path):
    """A fresh process: the environment variables alone point huggingface_hub at the cache;
    the sampling defaults (greedy) come from the hub snapshot's generation_config.json."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_CACHE=str(hub["cache"]), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))  # fmt: skip
    env.pop("XLA_FLAGS", None)
    args = ["--prompt", "print", "--max_new_tokens", "4", "--prefill_chunk", "16", "--nochat"]
    proc = subprocess.run(
        [sys.executable, "-m", "minimax_jax.generate", "--checkpoint", REPO, *args],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "".join(text + "\n" for text in greedy_text)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# URLs through etils.epath (an in-memory filesystem registered for gs:// and s3://)


@pytest.fixture
def fake_gs(monkeypatch, tmp_path):
    """An empty in-memory fsspec filesystem behind gs:// and s3:// (paths as gcsfs gives them,
    without the scheme), for this test only; the working directory is ``tmp_path/cwd``, so a
    URL turned into a local path would show up there."""
    from etils.epath import backend
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeBucket(MemoryFileSystem):
        protocol = ("gs", "gcs", "s3")
        store: dict = {}
        pseudo_dirs = [""]
        root_marker = ""

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            for prefix in ("gs://", "gcs://", "s3://"):
                path = path.removeprefix(prefix)
            return path.strip("/")

    registry = importlib.import_module("fsspec.registry")._registry  # fsspec.registry is a view
    for name in ("gs", "gcs", "s3"):
        monkeypatch.setitem(registry, name, FakeBucket)
    backend.fsspec_backend._get_filesystem.cache_clear()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield FakeBucket
    backend.fsspec_backend._get_filesystem.cache_clear()
    assert list(cwd.iterdir()) == [], "a URL became a local path"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("small") / "hf"
    write_checkpoint(path, config_of(num_blocks=1))
    return path


def test_converters_read_and_write_urls(fake_gs, small, tmp_path):
    want = from_pretrained(small)
    if not (small.parent / "expected").exists():  # the same conversion to a local directory
        hf_to_orbax.convert(hf_dir=small, out_dir=small.parent / "expected", stream=None)
    summary = hf_to_orbax.convert(hf_dir=small, out_dir="gs://bucket/m1-orbax/", stream=None)
    assert summary["output"] == "gs://bucket/m1-orbax"
    marker = json.loads(fake_gs.store[f"bucket/m1-orbax/{MARKER}"].getvalue())
    assert marker["complete"] is True
    local_marker = json.loads((small.parent / "expected" / MARKER).read_text())
    assert marker["files"] == local_marker["files"]
    top = {key.split("/")[2] for key in fake_gs.store if key.startswith("bucket/m1-orbax/")}
    assert top == set(os.listdir(small.parent / "expected"))
    assert "bucket/m1-orbax/params/_METADATA" in fake_gs.store
    assert_same_model(from_pretrained("gs://bucket/m1-orbax"), want)

    orbax_to_hf.export(orbax_dir="gs://bucket/m1-orbax", out_dir="s3://other/m1-hf", stream=None)
    assert_same_model(from_pretrained("s3://other/m1-hf"), want)
    hf_to_orbax.convert(hf_dir="s3://other/m1-hf", out_dir=tmp_path / "local", stream=None)
    assert_same_model(from_pretrained(tmp_path / "local"), want)
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("minimax_jax-url-*/hf"))

    with pytest.raises(ArgumentError, match="is the --hf_dir directory itself"):
        hf_to_orbax.convert(hf_dir="s3://other/m1-hf/", out_dir="s3://other/m1-hf", stream=None)
    with pytest.raises(paths.PathError, match="^--hf_dir gs://bucket/none: no such file"):
        hf_to_orbax.convert(hf_dir="gs://bucket/none", out_dir=tmp_path / "x", stream=None)


def test_url_output_is_replaced_only_when_it_is_ours(fake_gs, small):
    out = "gs://bucket/o"
    hf_to_orbax.convert(hf_dir=small, out_dir=out, stream=None)
    with pytest.raises(ArgumentError, match="exists; remove it or pass --overwrite"):
        hf_to_orbax.convert(hf_dir=small, out_dir=out, stream=None)
    paths.write_text("gs://bucket/o/thesis.tex", "mine")
    with pytest.raises(ArgumentError, match=r"did not write \(thesis.tex\)"):
        hf_to_orbax.convert(hf_dir=small, out_dir=out, overwrite=True, stream=None)
    assert paths.read_text("gs://bucket/o/thesis.tex") == "mine"
    paths.remove("gs://bucket/o/thesis.tex")
    # an interrupted upload (marker written first, "complete": false) is ours to replace
    for name in paths.listdir(out):
        paths.remove(f"{out}/{name}")
    record = {"written_by": "convert", "files": ["params"], "complete": False}
    paths.write_text(f"{out}/{MARKER}", json.dumps(record))
    paths.write_text(f"{out}/params/stale", "x")
    hf_to_orbax.convert(hf_dir=small, out_dir=out, overwrite=True, stream=None)
    assert not paths.exists(f"{out}/params/stale")
    assert json.loads(paths.read_text(f"{out}/{MARKER}"))["complete"] is True


def test_data_sources_and_tokenizer_from_urls(fake_gs, tmp_path):
    glob, tok = fx.make_corpus(str(tmp_path))
    corpus = Path(glob).parent
    for f in sorted(corpus.iterdir()):
        paths.write_text(f"gs://bucket/corpus/sub/{f.name}", f.read_text())
    lines = "".join(json.dumps({"text": f.read_text()}) + "\n" for f in sorted(corpus.iterdir()))
    (tmp_path / "docs.jsonl").write_text(lines)
    paths.write_text("gs://bucket/jsonl/docs.jsonl", lines)
    paths.write_text("gs://bucket/jsonl/.hidden.jsonl", '{"text": "no"}\n')

    def docs(*specs):
        d = data_lib.open_documents([data_lib.SourceSpec(t, p) for t, p in specs])
        return [d[i] for i in range(len(d))]

    want = docs(("text", glob))
    assert docs(("text", "gs://bucket/corpus/sub/*.txt")) == want
    assert docs(("text", "gs://bucket/corpus/**/*.txt")) == want
    assert docs(("text", "gs://bucket/corpus")) == want
    assert docs(("jsonl", "gs://bucket/jsonl")) == docs(("jsonl", str(tmp_path / "docs.jsonl")))
    with pytest.raises(data_lib.DataError, match="matches no files"):
        docs(("text", "gs://bucket/corpus/*.md"))
    with pytest.raises(data_lib.DataError, match=r"data.sources\[1\].path .*local files only"):
        docs(("text", glob), ("arrayrecord", "gs://bucket/x.array_record"))
    with pytest.raises(paths.PathError, match=r"^data.sources\[0\].path ftp://x: unsupported"):
        docs(("text", "ftp://x"))

    for name in ("tokenizer.json", "tokenizer_config.json"):
        paths.write_text(f"gs://bucket/tok/{name}", (Path(tok) / name).read_text())
    want_tok = data_lib.load_tokenizer(tok)
    for source in ("gs://bucket/tok", "gs://bucket/tok/tokenizer.json"):
        assert data_lib.load_tokenizer(source).to_str() == want_tok.to_str()


def test_metrics_and_pinned_steps_on_a_url_workdir(fake_gs, monkeypatch):
    run = "gs://bucket/run"
    log = MetricsLog(run, 0, 4, is_main=True, flush_seconds=3600.0)
    for step in range(1, 5):
        log.step({"step": step, "loss": 1.0 / step, "lr": 0.1, "grad_norm": 1.0,
                  "tokens_per_s": 10.0, "mfu": 0.0}, force=True)  # fmt: skip
    assert [r["step"] for r in read_metrics(run)] == []  # not flushed yet: every hour
    log.close()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    MetricsLog(run, 2, 4, is_main=True).close()  # a resume from step 2 drops the lines after it
    assert [r["loss"] for r in read_metrics(run)] == [1.0, 0.5]

    made = []

    class Recorder:  # Orbax's manager, recording the directory it was given
        def __init__(self, directory, **kwargs):
            made.append(directory)

    monkeypatch.setattr(ckpt_lib.ocp, "CheckpointManager", Recorder)
    checkpointer = ckpt_lib.Checkpointer(f"{run}/checkpoints", every=1, keep=1)
    assert made == ["gs://bucket/run/checkpoints"]
    checkpointer.pin(3)
    assert json.loads(paths.read_text(f"{run}/pinned_checkpoints.json")) == {"steps": [3]}
    assert ckpt_lib.Checkpointer(f"{run}/checkpoints", every=1, keep=1).pinned == {3}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


@pytest.mark.skipif(
    _installed("google.cloud.storage"),
    reason="with google-cloud-storage installed Orbax would try the real bucket",
)
def test_train_workdir_url_reaches_orbax(fake_gs, tmp_path):
    glob, tok = fx.make_corpus(str(tmp_path))
    cfg = fx.config(glob, tok, model=fx.TWO_LAYERS, train={"steps": 1})
    # Orbax's GCS code (only taken for a gs:// directory) needs google-cloud-storage
    with pytest.raises(paths.PathError, match=r"^--workdir gs://bucket/run: .*google"):
        train_lib.train(config=cfg, workdir="gs://bucket/run")
    assert "bucket/run/checkpoints" in fake_gs.pseudo_dirs  # created through etils.epath
    with pytest.raises(paths.PathError, match="^--workdir s3://bucket/run: s3:// is not"):
        train_lib.train(config=cfg, workdir="s3://bucket/run")


@pytest.mark.skipif(_installed("gcsfs"), reason="gcsfs is installed: it would try the bucket")
def test_missing_filesystem_package_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(paths.PathError, match=r"^--hf_dir gs://bucket/m1: .*pip install gcsfs"):
        hf_to_orbax.convert(hf_dir="gs://bucket/m1", out_dir=tmp_path / "o", stream=None)
    assert list(tmp_path.iterdir()) == []


def test_api_refuses_bad_paths_by_name(tmp_path, monkeypatch, small):
    monkeypatch.chdir(tmp_path)
    for bad in ("ftp://x", "foo://y"):
        with pytest.raises(ValueError, match=f"^path {bad}: unsupported scheme"):
            from_pretrained(bad)
        with pytest.raises(ValueError, match=f"^--hf_dir {bad}: unsupported scheme"):
            hf_to_orbax.convert(hf_dir=bad, out_dir=tmp_path / "o", stream=None)
        with pytest.raises(ValueError, match=f"^--out_dir {bad}: unsupported scheme"):
            hf_to_orbax.convert(hf_dir=small, out_dir=bad, stream=None)
    with pytest.raises(ValueError, match="^path owner/na me: no such local path, and not a"):
        from_pretrained("owner/na me")
    cfg = ModelConfig.preset("tiny-remote")
    model = nnx.eval_shape(lambda: MiniMaxForCausalLM(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="^path gs://bucket/x: a URL; this argument takes a"):
        save_pretrained(model, "gs://bucket/x")
    assert list(tmp_path.iterdir()) == []
