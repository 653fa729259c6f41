"""The converters never destroy their input or files they did not write, leave no partial output
after signals or a killed run, and keep the CLI contract: a wrong command line is one ``error:``
line and exit 2, a failure while converting one line and exit 1, never a traceback."""

import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from absl import flags
from test_orbax import config_of, write_checkpoint

from convert import common, hf_to_orbax, orbax_to_hf
from convert.common import MARKER, ArgumentError
from minimax_jax.hf import orbax as orbax_io
from minimax_jax.hf.safetensors import INDEX_FILE, SafetensorsError, SafetensorsReader

ROOT = Path(__file__).parent.parent
SECRET = b"TOPSECRET-shadow-line:$6$salt$hash:19000::::::\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """root/hf: a tiny remote-schema checkpoint (one 7+1 block); root/orbax: its conversion."""
    root = tmp_path_factory.mktemp("safety")
    write_checkpoint(root / "hf", config_of(num_blocks=1))
    hf_to_orbax.convert(hf_dir=root / "hf", out_dir=root / "orbax", stream=None)
    return root


def _hashes(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _one_line(stderr: str, *words: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _main(module, capsys, *args: str) -> tuple[int, str]:
    """Runs the CLI's ``main`` in-process (absl parses flags once per process); returns (exit
    code, stderr)."""
    try:
        rest = flags.FLAGS([module.__name__, *args])
        with pytest.raises(SystemExit) as info:
            module.main(rest)
    finally:
        flags.FLAGS.unparse_flags()
    return info.value.code, capsys.readouterr().err


def _cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"convert.{tool}", *args],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=600,
    )  # fmt: skip


def _io_args(tool: str, ckpt: Path) -> tuple[str, Path]:
    return ("--hf_dir", ckpt / "hf") if tool == "hf_to_orbax" else ("--orbax_dir", ckpt / "orbax")


TOOLS = {"hf_to_orbax": hf_to_orbax, "orbax_to_hf": orbax_to_hf}


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
@pytest.mark.parametrize("tool", list(TOOLS))
def test_out_overlapping_the_input_is_refused_and_input_intact(ckpt, capsys, tool, where):
    flag, src = _io_args(tool, ckpt)
    out = {"same": src, "parent": src.parent, "inside": src / "out"}[where]
    before = _hashes(ckpt)
    code, err = _main(TOOLS[tool], capsys, flag, str(src), "--out_dir", str(out), "--overwrite")
    assert code == 2
    _one_line(err, "--out_dir", flag, "outside the input")
    assert _hashes(ckpt) == before


def test_cli_refuses_out_equal_to_input_with_exit_2(ckpt):
    """The same through the real command line, as a user would hit it."""
    before = _hashes(ckpt)
    proc = _cli("hf_to_orbax", "--hf_dir", str(ckpt / "hf"), "--out_dir", str(ckpt), "--overwrite")
    assert proc.returncode == 2
    _one_line(proc.stderr, "contains the --hf_dir directory")
    assert _hashes(ckpt) == before


def test_overwrite_replaces_only_a_converters_own_output(ckpt, tmp_path):
    out = tmp_path / "o"
    hf_to_orbax.convert(hf_dir=ckpt / "hf", out_dir=out, stream=None)
    written = json.loads((out / MARKER).read_text())["files"]
    assert written == sorted(p.name for p in out.iterdir() if p.name != MARKER)
    hf_to_orbax.convert(hf_dir=ckpt / "hf", out_dir=out, overwrite=True, stream=None)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ArgumentError, match="did not write \\(notes.txt\\)"):
        hf_to_orbax.convert(hf_dir=ckpt / "hf", out_dir=out, overwrite=True, stream=None)
    assert (out / "notes.txt").read_text() == "mine" and (out / "params").is_dir()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(ArgumentError, match="not written by a converter"):
        orbax_to_hf.export(orbax_dir=ckpt / "orbax", out_dir=foreign, overwrite=True, stream=None)
    assert (foreign / "thesis.tex").read_text() == "years of work"
    (tmp_path / "link").symlink_to(foreign)
    with pytest.raises(ArgumentError, match="symbolic link"):
        orbax_to_hf.export(orbax_dir=ckpt / "orbax", out_dir=tmp_path / "link", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArgumentError, match="not a directory"):
        hf_to_orbax.convert(hf_dir=ckpt / "hf", out_dir=tmp_path / "file", overwrite=True)

    # orbax_to_hf replaces its own output whole (no stale shards of a run with other sharding)
    orbax_to_hf.export(orbax_dir=ckpt / "orbax", out_dir=tmp_path / "h", max_shard_bytes=30_000)
    assert (tmp_path / "h" / INDEX_FILE).is_file()
    orbax_to_hf.export(orbax_dir=ckpt / "orbax", out_dir=tmp_path / "h", overwrite=True)
    assert not (tmp_path / "h" / INDEX_FILE).exists()
    assert len(SafetensorsReader(tmp_path / "h").names()) == len(
        SafetensorsReader(ckpt / "hf").names()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "foreign", "h", "link", "o"]


def test_remove_stale_keeps_partials_of_live_runs(tmp_path):
    for name in (
        ".o.partial-1-abc",
        ".o.partial-999999999-abc",
        ".o.partial-xyz",
        ".o.old-9999999",
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").write_text("x")
    (tmp_path / ".o.partial-link").symlink_to(tmp_path / ".o.partial-1-abc")
    (tmp_path / ".other.partial-5").mkdir()
    log = io.StringIO()
    removed = common.remove_stale(tmp_path / "o", log)
    assert sorted(p.name for p in removed) == [
        ".o.old-9999999",
        ".o.partial-999999999-abc",
        ".o.partial-xyz",
    ]
    assert len(log.getvalue().splitlines()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".o.partial-1-abc",  # pid 1 is alive: another run in progress
        ".o.partial-link",
        ".other.partial-5",
    ]


# Runs a converter CLI with every leaf write / read slowed down, so a test can signal it mid-way.
_SLOW = r"""
import importlib, sys, time
from minimax_jax.hf import orbax as orbax_io
for cls, name in ((orbax_io.LeafWriter, "write"), (orbax_io.LeafReader, "read")):
    def slow(self, *args, _original=getattr(cls, name), **kwargs):
        time.sleep(0.1)
        return _original(self, *args, **kwargs)
    setattr(cls, name, slow)
sys.argv = sys.argv[1:]
importlib.import_module("convert." + sys.argv[0]).run()
"""


def _start_slow(tool: str, ckpt: Path, out: Path) -> subprocess.Popen:
    flag, src = _io_args(tool, ckpt)
    cmd = [
        sys.executable,
        "-c",
        textwrap.dedent(_SLOW),
        tool,
        flag,
        str(src),
        "--out_dir",
        str(out),
    ]
    # A shell's background job starts with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the tool the default disposition a terminal would.
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def _wait_for_partial(proc: subprocess.Popen, out: Path) -> list[Path]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        partial = list(out.parent.glob(f".{out.name}.partial-*"))
        if partial:
            time.sleep(1.0)  # well into the build
            assert proc.poll() is None, proc.communicate()
            return partial
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("no partial output appeared")


@pytest.mark.parametrize("tool", list(TOOLS))
def test_sigkill_leaves_a_partial_that_the_next_run_removes(ckpt, tmp_path, tool):
    out = tmp_path / "out"
    proc = _start_slow(tool, ckpt, out)
    partial = _wait_for_partial(proc, out)
    proc.kill()
    proc.communicate()
    assert all(p.is_dir() for p in partial) and not out.exists()  # what SIGKILL leaves
    flag, src = _io_args(tool, ckpt)
    again = _cli(tool, flag, str(src), "--out_dir", str(out))
    assert again.returncode == 0, again.stderr
    removed = [line for line in again.stderr.splitlines() if line.startswith("removed ")]
    assert len(removed) == 1 and str(partial[0]) in removed[0], again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    if tool == "hf_to_orbax":
        assert (out / "params").is_dir() and (out / "conversion.json").is_file()
    else:
        assert len(SafetensorsReader(out).names()) == len(SafetensorsReader(ckpt / "hf").names())


@pytest.mark.parametrize(
    "tool, sig",
    [
        ("hf_to_orbax", signal.SIGTERM),
        ("hf_to_orbax", signal.SIGINT),
        ("orbax_to_hf", signal.SIGTERM),
    ],
)
def test_signals_remove_the_partial_output(ckpt, tmp_path, tool, sig):
    out = tmp_path / "out"
    proc = _start_slow(tool, ckpt, out)
    _wait_for_partial(proc, out)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert list(tmp_path.iterdir()) == []


def test_io_error_is_one_line_exit_1_and_cleans_up(ckpt, tmp_path, capsys, monkeypatch):
    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(orbax_io.LeafWriter, "finish", disk_full)
    code, err = _main(
        hf_to_orbax, capsys, "--hf_dir", str(ckpt / "hf"), "--out_dir", str(tmp_path / "o")
    )
    assert code == 1
    _one_line(err, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def _bad_command_lines(ckpt: Path, tmp: Path) -> list[tuple[object, list[str], str]]:
    (tmp / "exists").mkdir()
    (tmp / "config_only").mkdir()
    (tmp / "config_only" / "config.json").write_text((ckpt / "hf" / "config.json").read_text())
    hf, orbax = ["--hf_dir", str(ckpt / "hf")], ["--orbax_dir", str(ckpt / "orbax")]
    out = ["--out_dir", str(tmp / "new")]
    return [
        (hf_to_orbax, hf, "--out_dir is required"),
        (hf_to_orbax, out, "--hf_dir is required"),
        (hf_to_orbax, [*hf, *out, "stray"], "unexpected arguments"),
        (hf_to_orbax, ["--hf_dir", str(tmp / "missing"), *out], "no such directory"),
        (hf_to_orbax, ["--hf_dir", str(tmp / "config_only"), *out], "model.safetensors"),
        (hf_to_orbax, [*hf, "--out_dir", str(tmp / "exists")], "pass --overwrite"),
        (hf_to_orbax, [*hf, *out, "--mesh", "bogus=2"], "--mesh"),
        (hf_to_orbax, [*hf, *out, "--chunk_mb", "0"], "--chunk_mb"),
        (orbax_to_hf, out, "--orbax_dir is required"),
        (orbax_to_hf, ["--orbax_dir", str(ckpt / "hf"), *out], "convert.hf_to_orbax"),
        (orbax_to_hf, [*orbax, "--out_dir", str(tmp / "exists")], "pass --overwrite"),
        (orbax_to_hf, [*orbax, *out, "--max_shard_gb", "0"], "--max_shard_gb"),
    ]


def test_bad_command_lines_exit_2_with_one_line(ckpt, tmp_path, capsys):
    for module, args, words in _bad_command_lines(ckpt, tmp_path):
        code, err = _main(module, capsys, *args)
        assert code == 2, (args, err)
        _one_line(err, words)
    assert not (tmp_path / "new").exists()
    assert not list(tmp_path.glob(".new.*"))


@pytest.mark.parametrize("tool", list(TOOLS))
def test_help_lists_every_flag_and_unknown_flags_exit_2(tool):
    helped = _cli(tool, "--help")
    assert helped.returncode == 0 and "Traceback" not in helped.stderr
    holders = [_io_args(tool, Path())[0], "--out_dir", "--[no]overwrite"]
    holders += ["--dtype", "--mesh", "--chunk_mb"] if tool == "hf_to_orbax" else ["--schema"]
    for flag in holders + (["--max_shard_gb"] if tool == "orbax_to_hf" else []):
        assert f"  {flag}:" in helped.stdout, (flag, helped.stdout)
    unknown = _cli(tool, "--out_dirr", "x")
    assert unknown.returncode == 2
    _one_line(unknown.stderr, "out_dirr", "--help")


def test_escaping_checkpoint_fails_with_one_line_and_no_secret(ckpt, tmp_path):
    """A weight_map entry pointing outside IN (a valid shard there, or a secret file): exit 2, one
    line naming the index entry, nothing of the target's bytes, no output."""
    hf = tmp_path / "hf"
    hf.mkdir()
    for p in (ckpt / "hf").iterdir():
        (hf / p.name).write_bytes(p.read_bytes())
    (tmp_path / "shadow").write_bytes(SECRET)
    index = json.loads((hf / INDEX_FILE).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../shadow"
    (hf / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(SafetensorsError, match="outside"):
        hf_to_orbax.convert(hf_dir=hf, out_dir=tmp_path / "o", stream=None)
    index["weight_map"][name] = str(tmp_path / "shadow")
    (hf / INDEX_FILE).write_text(json.dumps(index))
    proc = _cli("hf_to_orbax", "--hf_dir", str(hf), "--out_dir", str(tmp_path / "o"))
    assert proc.returncode == 2  # a bad file is bad input (README: exit codes)
    line = _one_line(proc.stderr, INDEX_FILE, name, "outside")
    assert "TOPSECRET" not in line and not (tmp_path / "o").exists()


def test_unsafe_side_files_are_skipped_with_a_warning(ckpt, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for p in (ckpt / "hf").iterdir():
        (hf / p.name).write_bytes(p.read_bytes())
    (tmp_path / "shadow").write_bytes(SECRET)
    (hf / "tokenizer.json").unlink()
    (hf / "tokenizer.json").symlink_to(tmp_path / "shadow")  # as a link to /etc/shadow would
    os.mkfifo(hf / "chat_template.jinja")
    log = io.StringIO()
    summary = hf_to_orbax.convert(hf_dir=hf, out_dir=tmp_path / "o", stream=log)
    assert summary["copied_files"] == ["tokenizer_config.json"]
    assert summary["skipped_files"] == ["chat_template.jinja", "tokenizer.json"]
    assert not (tmp_path / "o" / "tokenizer.json").exists()
    warnings = [line for line in log.getvalue().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "TOPSECRET" not in log.getvalue()
    back = orbax_to_hf.export(orbax_dir=tmp_path / "o", out_dir=tmp_path / "back", stream=None)
    assert "tokenizer.json" not in back["files"]
