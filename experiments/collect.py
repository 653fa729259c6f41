"""Append a device run's JSON-lines results to experiments/results/, tagged with the run name.

    python experiments/collect.py FILES_AT --run r17-h200 [--results experiments/results]

Every `*.jsonl` under FILES_AT (the device tool's copy of $OUT) is appended to the results file
of the same name, each row with "run" set. Run this right after a device command returns: the
copies under FILES_AT do not outlive the session (rounds 13-16 were lost that way).

Refuses (exit 2, nothing written) when a row is not a JSON object, when a results file already
has rows of this run, or when FILES_AT holds no results. Each results file is rewritten through
a temporary file and a rename, so an interrupted collect leaves it whole.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


class CollectError(ValueError):
    pass


def _rows(path: Path, run: str) -> list[str]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CollectError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise CollectError(f"{path}:{n}: a row must be a JSON object")
        out.append(json.dumps({**row, "run": run}))
    return out


def _has_run(path: Path, run: str) -> bool:
    if not path.exists():
        return False
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("run") == run:
                return True
        except (json.JSONDecodeError, AttributeError):
            continue
    return False


def collect(src: Path, results: Path, run: str) -> dict[str, int]:
    """Append src's *.jsonl rows to results/<name>; returns rows appended per file name."""
    if not run or not run.strip():
        raise CollectError("--run must name the run, e.g. r17-h200")
    files = sorted(p for p in src.rglob("*.jsonl") if p.is_file())
    if not files:
        raise CollectError(f"no *.jsonl under {src}")
    new: dict[str, list[str]] = {}
    for p in files:  # parse and check everything before writing anything
        new.setdefault(p.name, []).extend(_rows(p, run))
    for name in new:
        if _has_run(results / name, run):
            raise CollectError(f"{results / name} already has rows of run {run!r}")
    results.mkdir(parents=True, exist_ok=True)
    for name, rows in new.items():
        target = results / name
        old = target.read_text() if target.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        fd, tmp = tempfile.mkstemp(dir=results, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(old + "".join(r + "\n" for r in rows))
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    return {name: len(rows) for name, rows in new.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path, help="folder with the run's *.jsonl (the device files_at)")
    ap.add_argument("--run", required=True, help="run tag, e.g. r17-h200")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    try:
        done = collect(args.src, args.results, args.run)
    except CollectError as e:
        print(f"collect: {e}", file=sys.stderr)
        return 2
    for name, n in done.items():
        print(f"{args.results / name}: +{n} rows (run {args.run})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
