"""experiments/run.py: every suite resolves to scripts that exist; bad suites are one error line."""

import importlib.util
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
