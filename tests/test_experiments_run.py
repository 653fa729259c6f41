"""experiments/run.py: every suite resolves to scripts that exist; bad suites are one error line."""

import importlib.util
import json
import os
import shlex
import sys

import pytest

REPO = os.path.join(os.path.dirname(__file__), "..")
_spec = importlib.util.spec_from_file_location(
    "experiments_run", os.path.join(REPO, "experiments", "run.py")
)
run = importlib.util.module_from_spec(_spec)
sys.modules["experiments_run"] = run  # dataclasses look their module up there
_spec.loader.exec_module(run)


@pytest.mark.parametrize("suite", sorted(run.SUITES))
def test_dry_run_prints_existing_scripts(suite, tmp_path, capsys):
    assert run.main(["--dry-run", suite, "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines, suite
    for line in lines:
        cmd = shlex.split(line.split(": ", 1)[1])
        scripts = [a for a in cmd[1:] if a.endswith(".py")]
        tests = [a for a in cmd[1:] if a.startswith("tests/")]
        assert scripts or tests, line
        for path in scripts + tests:
            assert os.path.exists(os.path.join(REPO, path)), (suite, path)
        assert "{" not in line, line  # every placeholder filled in


def test_every_part_writes_under_out(tmp_path, capsys):
    for suite in run.SUITES:
        run.main(["--dry-run", suite, "--out", str(tmp_path)])
    for line in capsys.readouterr().out.splitlines():
        for arg in shlex.split(line.split(": ", 1)[1]):
            if arg.endswith(".jsonl"):
                assert arg.startswith(str(tmp_path)), line


def test_unknown_suite_is_one_error_line(capsys):
    assert run.main(["no-such-suite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err


def test_missing_suite_is_an_error(capsys):
    assert run.main([]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_list_names_every_suite(capsys):
    assert run.main(["--list"]) == 0
    out = capsys.readouterr().out
    for suite in run.SUITES:
        assert suite in out


# Every benchmark's --help, and a tiny CPU run whose rows carry the harness's fields: every
# timed row says how it was timed and either checks its output (and passes) or says why not.
BENCHES = ["bench_attention", "bench_generate", "bench_lightning", "bench_long_context",
           "bench_matvec", "bench_moe", "bench_roofline", "bench_train", "bench_vision",
           "probe_bmm"]  # fmt: skip
TINY_RUNS = [
    pytest.param("bench_roofline", ["--small"], id="roofline"),
    pytest.param("bench_attention", ["--small", "--impls", "blockwise", "--reps", "3"],
                 id="attention"),
    pytest.param("bench_lightning", ["--small", "--no-fla"], id="lightning"),
    pytest.param("bench_lightning", ["--small", "--no-fla", "--packed", "32", "--skip-bwd"],
                 id="lightning-packed"),
    pytest.param("bench_moe", ["--small", "--impls", "padded"], id="moe",
                 marks=pytest.mark.slow),
    pytest.param("bench_matvec", ["--small", "--batches", "1"], id="matvec",
                 marks=pytest.mark.heavy),
    pytest.param("bench_generate", ["--tiny", "--batches", "1", "--reps", "2", "--prefill", "",
                                    "--hf_variants", "eager,compiled",
                                    "--hf_compile_backend", "eager"],
                 id="generate", marks=[pytest.mark.torch, pytest.mark.heavy]),
    pytest.param("bench_long_context", ["--tiny", "--lengths", "256", "--reps", "2",
                                        "--no_lightning_only", "--isolate"],
                 id="long-context-isolated", marks=pytest.mark.heavy),
    pytest.param("bench_train", ["--tiny", "--reps", "2", "--breakdown", "64"], id="train",
                 marks=pytest.mark.heavy),
    pytest.param("bench_vision", ["--small", "--reps", "2"], id="vision",
                 marks=[pytest.mark.torch, pytest.mark.heavy]),
]  # fmt: skip
TIMING_METHODS = {"wall", "wall_block_until_ready", "wall_cuda_synchronize",
                  "profiler_device_span", "profiler_device_span_gap_split",
                  "torch_profiler_device_span", "torch_profiler_device_span_gap_split"}  # fmt: skip


def _bench(script: str, args: list[str], tmp_path):
    import subprocess

    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", f"{script}.py"),
                           *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=900, cwd=REPO, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("script", BENCHES)
def test_bench_help(script):
    import subprocess

    proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", f"{script}.py"),
                           "--help"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})  # fmt: skip
    assert proc.returncode == 0 and "--out" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("script, args", TINY_RUNS)
def test_bench_tiny_run_rows(script, args, tmp_path):
    rows = _bench(script, args, tmp_path)
    timed = [r for r in rows if "timing_method" in r and not r.get("error")]
    assert timed, f"{script}: no timed rows"
    for r in rows:
        for key in ("commit", "device", "jax", "argv", "time"):
            assert key in r, (script, key)
    for r in timed:
        assert r["timing_method"] in TIMING_METHODS, r["timing_method"]
        assert r["reps"] >= 2 and r.get("l2_flush_bytes") == 0  # no L2 flush on CPU
        assert "check_ok" in r or r.get("check_skipped"), (script, r.get("impl"), r)
        assert r.get("check_ok", True) is True, (script, r.get("impl"), r)
    assert any("check_ok" in r for r in rows), f"{script}: nothing was checked"
    if "--isolate" in args:  # a process per row: each prefill row's peak is its own
        prefills = [r for r in rows if r.get("kind") == "prefill"]
        assert prefills and all(r["isolated"] and r["peak_is_own"] for r in prefills)
