"""Builds the project's wheel from a copy of the files git knows (tracked, and untracked ones that
are not ignored: what a fresh clone holds), so that a stale ``build/`` folder of the checkout can
never leak removed files into it. Used by tests/test_packaging.py and by ``.ci/wheel_smoke``:

    python tests/wheel_build.py OUT_DIR     # prints the wheel's path

``pip wheel`` builds in an isolated environment with ``setuptools`` from the package index (pip's
cache serves it after the first time): about 5 s on 2 cores.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def source_files(repo: Path = REPO) -> list[str]:
    """Paths (relative to ``repo``) of the files git knows that exist in the work tree."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    return sorted(name for name in set(out.split("\0")) if name and (repo / name).is_file())


def build_wheel(out_dir: Path, repo: Path = REPO) -> Path:
    """Builds the wheel into ``out_dir`` (created; it must hold no other minimax_jax wheel) and
    returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="minimax_jax_src.") as src:
        for name in source_files(repo):
            (Path(src) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, Path(src) / name)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out_dir), src],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode:
            raise RuntimeError(f"pip wheel failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    wheels = sorted(out_dir.glob("minimax_jax-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one minimax_jax wheel in {out_dir}, found {wheels}")
    return wheels[0]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/wheel_build.py OUT_DIR")
    print(build_wheel(Path(sys.argv[1])))
