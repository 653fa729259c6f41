"""experiments/collect.py: device results appended to experiments/results with a run tag."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import collect  # noqa: E402


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_appends_tagged_rows(tmp_path):
    src, res = tmp_path / "out", tmp_path / "results"
    _write(res / "bench_moe.jsonl", [{"ms": 1.0, "run": "r1"}])
    _write(src / "bench_moe.jsonl", [{"ms": 2.0}, {"ms": 3.0, "run": "stale"}])
    _write(src / "sub" / "probe_bmm.jsonl", [{"C": 256}])
    assert collect.main([str(src), "--run", "r17-h200", "--results", str(res)]) == 0
    assert _read(res / "bench_moe.jsonl") == [
        {"ms": 1.0, "run": "r1"},
        {"ms": 2.0, "run": "r17-h200"},
        {"ms": 3.0, "run": "r17-h200"},
    ]
    assert _read(res / "probe_bmm.jsonl") == [{"C": 256, "run": "r17-h200"}]
    assert not [p for p in res.iterdir() if p.name.endswith(".tmp")]


def test_refuses_a_run_twice_and_bad_rows_without_writing(tmp_path, capsys):
    src, res = tmp_path / "out", tmp_path / "results"
    _write(src / "bench_moe.jsonl", [{"ms": 2.0}])
    assert collect.main([str(src), "--run", "r17", "--results", str(res)]) == 0
    before = (res / "bench_moe.jsonl").read_text()
    assert collect.main([str(src), "--run", "r17", "--results", str(res)]) == 2
    assert "already has rows of run 'r17'" in capsys.readouterr().err
    (src / "other.jsonl").write_text('{"ok": 1}\nnot json\n')
    assert collect.main([str(src), "--run", "r18", "--results", str(res)]) == 2
    assert "other.jsonl:2: not JSON" in capsys.readouterr().err
    assert (res / "bench_moe.jsonl").read_text() == before
    assert not (res / "other.jsonl").exists()


def test_empty_source_is_an_error(tmp_path):
    with pytest.raises(collect.CollectError, match="no \\*.jsonl"):
        collect.collect(tmp_path, tmp_path / "results", "r1")
    with pytest.raises(collect.CollectError, match="--run"):
        collect.collect(tmp_path, tmp_path / "results", " ")
