"""The CLI contract of every tool (README "Errors, exit codes and safety"): bad input is one
``error:`` line naming the bad thing and exit 2, never a traceback; ``--help`` lists the flags and
exits 0; and the training fault cases: a failing save exits 1 at once, a diverging run keeps its
last finite checkpoint, resume skips an unreadable newest checkpoint, export never clobbers."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import train_fixtures as fx
from test_orbax import config_of, write_checkpoint

from convert import hf_to_orbax
from minimax_jax import from_pretrained
from minimax_jax.hf.safetensors import SafetensorsError
from minimax_jax.outputs import OutputError
from minimax_jax.training import loop as train_lib
from minimax_jax.training.log import read_metrics

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints (HF, Orbax, a corrupt Orbax), a corpus, and bad files of every kind."""
    root = tmp_path_factory.mktemp("contract")
    write_checkpoint(root / "hf", config_of(num_blocks=1))
    hf_to_orbax.convert(hf_dir=root / "hf", out_dir=root / "orbax", stream=None)
    shutil.copytree(root / "orbax", root / "corrupt")
    for p in (root / "corrupt" / "params").rglob("*"):
        if p.is_file() and p.name != "_METADATA":
            p.write_bytes(b"\0garbage")
    shutil.copytree(root / "hf", root / "badtok")
    (root / "badtok" / "tokenizer.json").write_text('{"model": ')
    glob, tok = fx.make_corpus(str(root))
    (root / "bad.yaml").write_text("model: [unclosed\n")
    (root / "latin1.json").write_bytes(b'{"prompt": "caf\xe9"}\n')
    (root / "a_dir").mkdir()
    (root / "a_file").write_text("x")
    (root / "run").mkdir()  # a train workdir with one logged step, for --plot
    (root / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (root / "obj_tools.json").write_text('{"name": "f"}')
    (root / "tools.json").write_text('[{"name": "f"}]')
    (root / "badtools.jsonl").write_text('{"prompt": "x", "tools": "f"}\n')
    good = fx.write_yaml(str(root / "good.yaml"), fx.raw_config(glob, tok, model=fx.TWO_LAYERS))
    return {"root": root, "good": Path(good), "tok": Path(tok), "glob": Path(glob)}


# Hub ids resolve from an empty cache, offline: no case ever reaches the network.
_OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": os.path.join(tempfile.gettempdir(), "no-hf-hub")}


def _run(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **_OFFLINE)
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout, check=False,
    )  # fmt: skip


# A fork server for the tables of cases: one fresh interpreter does the imports every CLI shares
# once (jax, flax, orbax, the minimax_jax package: 2-3 s of CPU per process on CI), then every case
# is a fork of it that runs `python -m MODULE ARGS` through runpy, as the interpreter's -m does:
# the CLI module itself runs fresh as __main__ in its own process, with its own exit code (an
# uncaught exception prints its traceback and exits 1, as in Python), stdout and stderr. The
# preloaded modules define no absl flag but minimax_jax.cli's --debug, which every CLI imports
# (convert.common's flags are not preloaded: train has an --overwrite of its own); no JAX backend
# has started before the fork. gc.freeze(): the children do not walk the preloaded objects.
_FORK_SERVER = r"""
import gc, json, os, runpy, sys
import absl.app, absl.flags, absl.logging, flax.nnx, jax, jax.numpy, numpy, optax, orbax.checkpoint
import tokenizers, yaml
import minimax_jax, minimax_jax.cli
from jax._src import xla_bridge
assert not xla_bridge._backends, "a JAX backend started before fork"
gc.freeze()
cases, outdir, width = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
codes, running, todo = {}, {}, list(enumerate(cases))
while todo or running:
    while todo and len(running) < width:
        i, (module, args) = todo.pop(0)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            for fd, name in ((1, f"{i}.out"), (2, f"{i}.err")):
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                os.dup2(os.open(os.path.join(outdir, name), flags), fd)
            sys.argv = [module, *args]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            sys.exit(0)  # the module returned, as `python -m` would: exit 0 after atexit
        running[pid] = i
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps([codes[i] for i in range(len(cases))]))
"""


def _run_forked(
    cases: list[tuple[str, list[str]]], tmp: Path, width: int = 2, timeout: int = 600
) -> list[subprocess.CompletedProcess]:
    """``_run(module, *args)`` for every case, each in a fork of one server process (above)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "cases.json").write_text(json.dumps([[m, list(a)] for m, a in cases]))
    env = dict(os.environ, JAX_PLATFORMS="cpu", **_OFFLINE)
    env.pop("XLA_FLAGS", None)
    server = subprocess.run(
        [sys.executable, "-c", _FORK_SERVER, str(tmp / "cases.json"), str(tmp), str(width)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout, check=False,
    )  # fmt: skip
    assert server.returncode == 0, server.stderr[-3000:]
    codes = json.loads(server.stdout.strip().splitlines()[-1])
    assert len(codes) == len(cases)
    return [
        subprocess.CompletedProcess(
            [sys.executable, "-m", m, *a],
            code,
            (tmp / f"{i}.out").read_text(),
            (tmp / f"{i}.err").read_text(),
        )  # fmt: skip
        for i, ((m, a), code) in enumerate(zip(cases, codes, strict=True))
    ]


def _one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and len(errors[0]) > len("error: "), proc.stderr[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def _cases(f: dict[str, Path]) -> list[tuple[str, list[str], int, tuple[str, ...]]]:
    """(module, args, exit code, words the error line must contain)."""
    r, hf, orbax = f["root"], str(f["root"] / "hf"), str(f["root"] / "orbax")
    gen, train = "minimax_jax.generate", "minimax_jax.train"
    good, work = str(f["good"]), str(r / "work")
    return [
        # generate: flags, files, checkpoints
        (gen, ["--prompt", "x", "--temperature", "nan"], 2, ("--temperature", "finite")),
        (gen, ["--prompt", "x", "--top_p", "inf"], 2, ("--top_p",)),
        (gen, ["--prompt", "x", "--seed", str(2**40)], 2, ("--seed",)),
        (gen, ["--prompt", "x", "--seed", "-1"], 2, ("--seed",)),
        (gen, ["--prompt", "x", "--nosuchflag"], 2, ("nosuchflag",)),
        (gen, ["--checkpoint", str(r / "missing"), "--prompt", "x"], 2, ("missing",)),
        (gen, ["--checkpoint", str(r / "a_file"), "--prompt", "x"], 2, ("a_file", "directory")),
        (gen, ["--checkpoint", str(r / "badtok"), "--prompt", "x"], 2, ("tokenizer.json",)),
        (gen, ["--prompts_file", str(r / "a_dir")], 2, ("a_dir", "directory")),
        (gen, ["--prompts_file", str(r / "latin1.json")], 2, ("latin1.json", "UTF-8")),
        (gen, ["--chat_template", str(r / "a_dir"), "--prompt", "x"], 2, ("a_dir",)),
        (
            gen,
            ["--prompt", "x", "--mesh", "tensor=1", "--rules", str(r / "bad.yaml")],
            2,
            ("bad.yaml", "YAML"),
        ),
        (gen, ["--checkpoint", str(r / "corrupt"), "--prompt", "x"], 2, ()),
        # (one device here; the prefill chunk vs sequence refusal: tests/test_generate_cli.py)
        (gen, ["--prompt", "x", "--mesh", "sequence=2"], 2, ("sequence=2", "2 devices")),
        (gen, ["--prompt", "x", "--mesh", "tensor=64"], 2, ("64 devices",)),
        (
            gen,
            ["--prompt", "x", "--tools", str(r / "missing.json")],
            2,
            ("missing.json", "--tools"),
        ),
        (gen, ["--prompt", "x", "--tools", str(r / "obj_tools.json")], 2, ("--tools", "list")),
        (gen, ["--prompt", "x", "--tools", str(r / "tools.json")], 2, ("--tools", "chat template")),
        (gen, ["--prompts_file", str(r / "badtools.jsonl")], 2, ("badtools.jsonl:1", "tools")),
        (gen, ["--prompt", "x", "--template_var", "a b=1"], 2, ("--template_var", "KEY=VALUE")),
        (gen, ["--prompt", "x", "--output", str(r / "a_file")], 2, ("--output", "exists")),
        (gen, ["--prompt", "x", "--output", str(r / "no" / "o.jsonl")], 2, ("--output", "no")),
        (gen, ["--prompt", "x", "--dtype", "float64"], 2, ("--dtype",)),
        # train: config, --set, export
        (train, ["--config", str(r / "bad.yaml"), "--workdir", work], 2, ("bad.yaml", "YAML")),
        (train, ["--config", str(r / "a_dir"), "--workdir", work], 2, ("a_dir", "directory")),
        (train, ["--config", str(r / "missing.yaml"), "--workdir", work], 2, ("missing.yaml",)),
        (train, ["--config", good, "--workdir", work, "--set", "optim.lr=[1"], 2, ("--set",)),
        (train, ["--config", good, "--workdir", work, "--set", "optim.lr=nan"], 2, ("optim.lr",)),
        (train, ["--config", good, "--workdir", work, "--set", "optim.lr=-1"], 2, ("optim.lr",)),
        (train, ["--config", good, "--workdir", work, "--set", "train.seed=x"], 2, ("seed",)),
        (train, ["--config", good], 2, ("--workdir",)),
        (train, ["--workdir", str(r / "nowork"), "--export", str(r / "e")], 2, ("checkpoint",)),
        # tokenizer_train
        (
            "minimax_jax.tokenizer_train",
            ["--input", str(r / "missing"), "--output", str(r / "t")],
            2,
            ("--input",),
        ),  # fmt: skip
        (
            "minimax_jax.tokenizer_train",
            ["--input", str(f["tok"]), "--output", str(r / "a_file")],
            2,
            ("--output",),
        ),  # fmt: skip
        (
            "minimax_jax.tokenizer_train",
            [
                "--input",
                str(f["tok"]),
                "--output",
                str(r / "t"),
                "--chat_template_from",
                str(r / "bad.yaml"),
            ],
            2,
            ("bad.yaml",),
        ),  # fmt: skip
        # info
        ("minimax_jax.info", ["--preset", "nope"], 2, ("nope",)),
        ("minimax_jax.info", ["--hf_config", str(r / "latin1.json")], 2, ("latin1.json",)),
        (
            "minimax_jax.info",
            ["--hf_config", str(r / "badtok" / "tokenizer.json")],
            2,
            ("tokenizer.json", "JSON"),
        ),  # fmt: skip
        # converters
        (
            "convert.hf_to_orbax",
            ["--hf_dir", str(r / "a_file"), "--out_dir", str(r / "o")],
            2,
            ("--hf_dir",),
        ),  # fmt: skip
        (
            "convert.orbax_to_hf",
            ["--orbax_dir", orbax, "--out_dir", str(r / "o"), "--max_shard_gb", "nan"],
            2,
            ("--max_shard_gb",),
        ),  # fmt: skip
        ("convert.check_logits", ["--reference", hf], 2, ("--candidate",)),
        (
            "convert.check_logits",
            ["--reference", hf, "--candidate", orbax, "--rtol", "nan"],
            2,
            ("--rtol",),
        ),  # fmt: skip
        (
            "convert.check_logits",
            ["--reference", str(r / "missing"), "--candidate", orbax],
            2,
            ("--reference",),
        ),  # fmt: skip
        # multi-host joining, training operations, plots (#23)
        (gen, ["--prompt", "x", "--distributed", "maybe"], 2, ("--distributed",)),
        (gen, ["--prompt", "x", "--distributed", "on"], 2, ("no cluster", "JAX_COORDINATOR")),
        (
            train,
            ["--config", good, "--workdir", work, "--distributed", "yes"],
            2,
            ("--distributed",),
        ),
        (
            train,
            ["--config", good, "--workdir", work, "--distributed", "on"],
            2,
            ("no cluster", "JAX_COORDINATOR_ADDRESS"),
        ),
        (
            train,
            ["--config", good, "--workdir", work, "--set", "train.distributed=1"],
            2,
            ("train.distributed",),
        ),
        (
            train,
            ["--config", good, "--workdir", work, "--set", "train.profile={steps: 2}"],
            2,
            ("train.profile",),
        ),
        (
            train,
            ["--config", good, "--workdir", work, "--set", "log.backends=[mlflow]"],
            2,
            ("log.backends", "mlflow"),
        ),
        (train, ["--plot", str(r / "missing")], 2, ("--plot", "metrics.jsonl")),
        (
            train,
            ["--plot", str(r / "run"), "--plot_out", str(r / "a_file")],
            2,
            ("--plot_out", "not written by train --plot"),
        ),
        (train, ["--plot_out", str(r / "p.png")], 2, ("--plot",)),
        # path arguments (minimax_jax.paths): unsupported schemes, malformed or uncached hub ids,
        # URLs where only local files are read, s3:// where Orbax writes
        (gen, ["--checkpoint", "ftp://x", "--prompt", "x"], 2, ("--checkpoint ftp://x", "scheme")),
        (gen, ["--checkpoint", "own/na me", "--prompt", "x"], 2, ("--checkpoint", "hub id")),
        (gen, ["--checkpoint", "a/b/c", "--prompt", "x"], 2, ("--checkpoint a/b/c", "hub id")),
        (gen, ["--checkpoint", "nobody/nothing", "--prompt", "x"], 2, ("HF_HUB_OFFLINE",)),
        (gen, ["--prompts_file", "gs://b/p.jsonl"], 2, ("gs://b/p.jsonl", "URL")),
        (gen, ["--prompt", "x", "--image", "gs://b/i.png"], 2, ("--image", "URL")),
        (train, ["--config", good, "--workdir", "foo://y"], 2, ("--workdir foo://y", "scheme")),
        (train, ["--config", good, "--workdir", "s3://b/run"], 2, ("--workdir s3://b/run",)),
        (train, ["--workdir", work, "--export", "ftp://x"], 2, ("--export ftp://x",)),
        (
            train,
            ["--config", good, "--workdir", work, "--set", "data.tokenizer=own/na me"],
            2,
            ("data.tokenizer own/na me", "hub id"),
        ),  # fmt: skip
        (
            "convert.hf_to_orbax",
            ["--hf_dir", "ftp://x", "--out_dir", str(r / "o")],
            2,
            ("--hf_dir ftp://x", "scheme"),
        ),  # fmt: skip
        (
            "convert.hf_to_orbax",
            ["--hf_dir", hf, "--out_dir", "foo://y"],
            2,
            ("--out_dir foo://y", "scheme"),
        ),  # fmt: skip
        (
            "convert.orbax_to_hf",
            ["--orbax_dir", "foo://y", "--out_dir", str(r / "o")],
            2,
            ("--orbax_dir foo://y",),
        ),  # fmt: skip
        (
            "convert.check_logits",
            ["--reference", "ftp://x", "--candidate", orbax],
            2,
            ("--reference ftp://x", "scheme"),
        ),  # fmt: skip
        ("minimax_jax.info", ["--hf_config", "a/b/c"], 2, ("--hf_config a/b/c", "hub id")),
        (
            "minimax_jax.tokenizer_train",
            ["--input", str(f["tok"]), "--output", "gs://b/tok"],
            2,
            ("--output gs://b/tok", "URL"),
        ),  # fmt: skip
    ]


# Rows of the table that also run as fresh `python -m` processes (a generate flag, a train config,
# a converter): they must give the fork server's exit code and error line.
_FRESH = (0, 23, 38)


def test_bad_input_is_one_line_exit_2_no_traceback(files, tmp_path):
    cases = _cases(files)
    with ThreadPoolExecutor(max_workers=2) as pool:
        fresh = pool.map(lambda i: _run(cases[i][0], *cases[i][1]), _FRESH)
        procs = _run_forked([(m, a) for m, a, _, _ in cases], tmp_path / "forked")
        fresh = dict(zip(_FRESH, fresh, strict=True))
    assert [cases[i][0] for i in _FRESH] == [
        "minimax_jax.generate", "minimax_jax.train", "convert.hf_to_orbax"
    ]  # fmt: skip
    failures = []
    for i, ((module, args, code, words), proc) in enumerate(zip(cases, procs, strict=True)):
        try:
            for p in (proc, fresh[i]) if i in _FRESH else (proc,):
                assert p.returncode == code, (p.returncode, p.stderr[-2000:])
                line = _one_error_line(p, *words)
            if i in _FRESH:
                assert _one_error_line(proc) == line, (proc.stderr, fresh[i].stderr)
        except AssertionError as e:
            failures.append(f"{module} {args}: {e}")
    assert not failures, "\n".join(failures)


# Flags the README documents per CLI (its "Errors, exit codes and safety" section and usage);
# every CLI also lists --version (added below).
HELP = {
    "minimax_jax.generate": ["--checkpoint", "--prompt", "--prompts_file", "--temperature",
                             "--top_p", "--top_k", "--seed", "--max_new_tokens", "--mesh",
                             "--rules", "--attention_impl", "--image", "--quantize",
                             "--distributed", "--[no]debug", "--chat_template", "--tools",
                             "--template_var", "--output", "--[no]stream", "--dtype", "--system",
                             "--[no]chat"],
    "minimax_jax.train": ["--config", "--workdir", "--steps", "--set", "--export",
                          "--export_dtype", "--[no]overwrite", "--distributed", "--plot",
                          "--plot_out", "--[no]debug"],
    "minimax_jax.tokenizer_train": ["--input", "--glob", "--vocab_size", "--output",
                                    "--[no]overwrite"],
    "minimax_jax.info": ["--preset", "--hf_config"],
    "convert.hf_to_orbax": ["--hf_dir", "--out_dir", "--dtype", "--quantize", "--mesh",
                            "--[no]overwrite"],
    "convert.orbax_to_hf": ["--orbax_dir", "--out_dir", "--schema", "--max_shard_gb"],
    "convert.check_logits": ["--reference", "--candidate", "--prompt", "--rtol", "--max_kl",
                             "--min_top1"],
}  # fmt: skip
HELP = {module: [*names, "--version"] for module, names in HELP.items()}


def test_help_lists_the_flags_and_exits_0(tmp_path):
    procs = dict(zip(HELP, _run_forked([(m, ["--help"]) for m in HELP], tmp_path), strict=True))
    fresh = _run("minimax_jax.train", "--help")  # a fresh process prints the same help
    assert (fresh.returncode, fresh.stdout) == (0, procs["minimax_jax.train"].stdout)
    for module, proc in procs.items():
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (module, proc.stderr)
        for flag in HELP[module]:
            assert f"  {flag}:" in proc.stdout, (module, flag)
        assert "(default: " in proc.stdout, module


def _setup_cfg_version() -> str:
    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(ROOT / "setup.cfg")
    return setup_cfg["metadata"]["version"]


def test_version_prints_prog_and_version_and_exits_0(tmp_path):
    """``--version`` on every CLI (the package version, from setup.cfg through the installed
    metadata): ``<module> <version>`` under ``python -m``, even with other flags or bad ones
    beside it; a console script (argv[0] a script path, no module spec) prints its own name."""
    version = _setup_cfg_version()
    assert version.count(".") >= 1
    cases = [(m, ["--version"]) for m in HELP]
    cases += [("minimax_jax.generate", ["--max_new_tokens", "0", "--version"])]
    cases += [("convert.hf_to_orbax", ["--version", "--no_such_flag"])]
    procs = _run_forked(cases, tmp_path)
    for (module, args), proc in zip(cases, procs, strict=True):
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{module} {version}\n", ""), (
            module, args, proc.stderr[-2000:],
        )  # fmt: skip
    script = "import sys, minimax_jax.info; sys.argv[0] = '/venv/bin/minimax-jax-info'; "
    script += "minimax_jax.info.run()"  # what the console script does
    proc = subprocess.run(
        [sys.executable, "-c", script, "--version"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, f"minimax-jax-info {version}\n"), proc.stderr


def test_unwritable_checkpoint_dir_exits_1_within_30s(files, tmp_path):
    (tmp_path / "checkpoints").write_text("not a directory")  # root may write anywhere else
    start = time.monotonic()
    proc = _run("minimax_jax.train", "--config", str(files["good"]), "--workdir", str(tmp_path),
                "--set", "checkpoint.every=1", "--steps", "3", timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    _one_error_line(proc, "cannot write a checkpoint", str(tmp_path / "checkpoints"))
    assert time.monotonic() - start < 60  # 30 s of the run itself + interpreter start


def test_diverging_run_keeps_its_last_finite_checkpoint(files, tmp_path):
    cfg = fx.config(
        str(files["glob"]), str(files["tok"]), model=fx.TWO_LAYERS,
        optim={"lr": 1e30, "warmup_steps": 3, "clip_norm": None},
        train={"steps": 20, "max_nonfinite": 3}, checkpoint={"every": 1, "keep": 2},
    )  # fmt: skip
    with pytest.raises(train_lib.TrainError, match="checkpoint \\d+ \\(the newest") as info:
        train_lib.train(config=cfg, workdir=str(tmp_path))
    rows = read_metrics(str(tmp_path))
    first_bad = min(r["step"] for r in rows if r.get("skipped"))
    kept = int(str(info.value).split("checkpoint ")[1].split()[0])
    assert kept == first_bad - 1
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept in steps and len(steps) == 3, steps  # keep 2 newest + the pinned one
    assert json.loads((tmp_path / "pinned_checkpoints.json").read_text())["steps"] == [kept]


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if "loss" in r}


def test_resume_skips_unreadable_newest_and_export_never_clobbers(files, tmp_path, capsys):
    sections = dict(model=fx.TWO_LAYERS, optim={"decay_steps": 12, "warmup_steps": 2},
                    checkpoint={"every": 4, "keep": 3, "async_save": False})  # fmt: skip
    cfg = fx.config(str(files["glob"]), str(files["tok"]), train={"steps": 8}, **sections)
    train_lib.train(config=cfg, workdir=str(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "8")  # b: resumes from 4, as a reference
    for p in (tmp_path / "a" / "checkpoints" / "8" / "state").rglob("*"):
        if p.is_file() and p.stat().st_size > 64:
            p.write_bytes(p.read_bytes()[:16])  # truncated
    longer = fx.config(str(files["glob"]), str(files["tok"]), train={"steps": 12}, **sections)
    train_lib.train(config=longer, workdir=str(tmp_path / "a"))
    warning = capsys.readouterr().err
    assert "warning: checkpoint 8 is unreadable" in warning and "previous one" in warning
    assert (tmp_path / "a" / "unreadable_checkpoints" / "8").is_dir()
    train_lib.train(config=longer, workdir=str(tmp_path / "b"))
    got, want = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [got[s] for s in range(5, 13)] == [want[s] for s in range(5, 13)]

    out = tmp_path / "hf"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(OutputError, match="exists; remove it or pass --overwrite"):
        train_lib.export(workdir=str(tmp_path / "a"), out_dir=str(out))
    with pytest.raises(OutputError, match="not written by a converter or train --export"):
        train_lib.export(workdir=str(tmp_path / "a"), out_dir=str(out), overwrite=True)
    assert (out / "thesis.tex").read_text() == "mine"
    (out / "thesis.tex").unlink()
    files_written = train_lib.export(workdir=str(tmp_path / "a"), out_dir=str(out), overwrite=True)
    assert "model.safetensors" in files_written
    train_lib.export(workdir=str(tmp_path / "a"), out_dir=str(out), overwrite=True)  # its own
    assert not list(tmp_path.glob(".hf.*"))


def test_orbax_params_linking_outside_the_checkpoint_are_refused(files, tmp_path):
    """A ``params/`` (or a file under it) that is a symbolic link leading out of the checkpoint
    directory is refused before anything is read."""
    outside = tmp_path / "outside"
    shutil.copytree(files["root"] / "orbax" / "params", outside)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(files["root"] / "orbax", ckpt)
    shutil.rmtree(ckpt / "params")
    (ckpt / "params").symlink_to(outside)
    with pytest.raises(SafetensorsError, match="outside"):
        from_pretrained(ckpt)
    (ckpt / "params").unlink()
    shutil.copytree(outside, ckpt / "params")
    meta = ckpt / "params" / "_METADATA"
    meta.unlink()
    meta.symlink_to(outside / "_METADATA")
    with pytest.raises(SafetensorsError, match="outside"):
        from_pretrained(ckpt)


def test_tokenizer_train_replaces_files_only_when_asked(files, tmp_path):
    """An output directory that already holds a tokenizer is refused (exit 2, files untouched)
    unless --overwrite; with it the files are replaced whole and no temporary is left behind;
    other files in the directory are never touched."""
    out = tmp_path / "tok"
    out.mkdir()
    (out / "tokenizer.json").write_text("old")
    (out / "notes.txt").write_text("mine")
    args = ["--input", str(files["tok"]), "--vocab_size", "300", "--output", str(out)]
    refused = _run("minimax_jax.tokenizer_train", *args)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--overwrite" in lines[0]
    assert (out / "tokenizer.json").read_text() == "old"
    assert not (out / "tokenizer_config.json").exists()
    done = _run("minimax_jax.tokenizer_train", *args, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"]
    assert sorted(p.name for p in out.iterdir()) == [
        "notes.txt", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine"
