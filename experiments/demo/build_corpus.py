"""Builds the demo model's training corpus: permissively licensed Python source, one file per doc.

    python experiments/demo/build_corpus.py --out /tmp/demo_corpus

Sources (both read-only, nothing is downloaded):

* the CPython standard library (``--stdlib``, default the pyenv 3.11.7 install), without
  ``site-packages/`` and the regression-test package ``test/`` (``test/support/`` included: it is
  ordinary library code, and one of its files is held out);
* the ``.py`` files of the distributions installed in ``--site_packages`` whose licence metadata
  is permissive (MIT, BSD, Apache, PSF, ISC, ...; ``PERMISSIVE`` below), attributed to their
  distribution through its RECORD. Distributions with any copyleft or unknown licence are
  skipped, as are vendored subtrees (``_vendor``, ``third_party``, ...; their licences are not
  the distribution's), test directories, and minimax_jax itself.

The held-out files (``experiments/demo/heldout_files.txt``, paths relative to the standard
library) are written to ``OUT/heldout/`` and kept out of ``OUT/train/``, and so is every file
that is a near-copy of one of them: at least half of the distinct long lines (>= 25 characters
stripped) of the smaller of the two files also appear in the other, e.g. the code-page tables
cp437/cp860/cp865/... (75-95% identical to the held-out cp861), the codec modules that repeat
utf_32_be's or iso2022_jp_2's template, and setuptools' copies of the held-out distutils files.
Exact duplicates are kept once. Files that are not UTF-8, larger than ``--max_file_kb`` or with
a line over 1000 characters (generated tables) are skipped. A distribution contributes at most
``--max_package_mb`` (files taken in a fixed hash order).

Outputs: ``OUT/train/{stdlib,packages/<dist>}/...py``, ``OUT/heldout/...py``,
``OUT/manifest.tsv`` (split, path, bytes, sha256) and ``OUT/licences.tsv`` (distribution,
version, licence, bytes taken, files). The result depends only on the input trees and flags.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_STDLIB = "/root/.pyenv/versions/3.11.7/lib/python3.11"
DEFAULT_SITE = "/work/venv/lib/python3.11/site-packages"
# SPDX ids / classifier words accepted as permissive. Anything else in a licence field
# (GPL, LGPL, MPL, EPL, CDDL, "unknown", an empty field) rejects the distribution.
PERMISSIVE = re.compile(
    r"^(MIT|MIT-CMU|MIT License|BSD|BSD License|BSD-2-Clause|BSD-3-Clause|0BSD|BSD 2-Clause "
    r"License|3-Clause BSD License|Apache-2\.0|Apache 2\.0|Apache License|Apache 2\.0 License|"
    r"Apache Software License|Apache-2\.0 WITH LLVM-exception|PSF-2\.0|Python Software "
    r"Foundation License|ISC|ISC License|ISC License \(ISCL\)|Zlib|CC0-1\.0|BSL-1\.0|"
    r"CNRI-Python|AFL-2\.1)$"
)
SKIP_DIRS = {"_vendor", "vendor", "_vendored", "vendored", "third_party", "_third_party",
             "thirdparty", "extern", "_extern", "test", "tests", "__pycache__"}  # fmt: skip
SKIP_DISTS = {"minimax_jax"}
NEAR_COPY = 0.5
LONG_LINE = 25  # characters; shorter lines (imports, "return x") are too common to compare


def licence_of(dist: md.Distribution) -> str:
    """The licence as written in the metadata: License-Expression, else License (first line),
    else the License :: classifiers joined by ' OR '."""
    m = dist.metadata
    if m.get("License-Expression"):
        return m["License-Expression"].strip()
    lic = (m.get("License") or "").strip().splitlines()
    if lic and len(lic[0]) < 60:  # some packages paste the whole licence text here
        return lic[0].strip()
    classifiers = [c.split("::")[-1].strip() for c in m.get_all("Classifier") or []
                   if c.startswith("License ::")]  # fmt: skip
    return " OR ".join(classifiers)


def is_permissive(licence: str) -> bool:
    """SPDX-like: every AND term must be permissive; an OR needs one permissive option."""
    if not licence:
        return False
    for term in re.split(r"\s+AND\s+", licence):
        options = [o.strip(" ()") for o in re.split(r"\s+OR\s+", term)]
        if not any(PERMISSIVE.match(o) for o in options):
            return False
    return True


def _read(path: Path, max_bytes: int) -> str | None:
    raw = path.read_bytes()
    if len(raw) > max_bytes or not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\0" in text or max(map(len, text.splitlines()), default=0) > 1000:
        return None
    return text


def _long_lines(text: str) -> set[str]:
    return {s for s in (line.strip() for line in text.splitlines()) if len(s) >= LONG_LINE}


def _near_copy(lines: set[str], heldout: list[set[str]]) -> bool:
    for h in heldout:
        common = len(lines & h)
        if common >= 5 and common >= NEAR_COPY * min(len(lines), len(h)):
            return True
    return False


def stdlib_files(root: Path) -> list[tuple[str, Path]]:
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if rel.parts[0] in ("site-packages", "test") and rel.parts[:2] != ("test", "support"):
            continue
        if "__pycache__" in rel.parts or not p.is_file():
            continue
        out.append((rel.as_posix(), p))
    return out


def package_files(site: Path) -> list[tuple[md.Distribution, list[tuple[str, Path]]]]:
    out = []
    dists = sorted(md.distributions(path=[str(site)]), key=lambda d: d.metadata["Name"].lower())
    for dist in dists:
        files = []
        for f in dist.files or []:
            rel = Path(str(f))
            if rel.suffix != ".py" or rel.parts[0].startswith("..") or SKIP_DIRS & set(rel.parts):
                continue
            if rel.parts[0].endswith((".dist-info", ".egg-info")):
                continue
            p = site / rel
            if p.is_file():
                files.append((rel.as_posix(), p))
        out.append((dist, sorted(files)))
    return out


def build(args: argparse.Namespace) -> None:
    stdlib, site, out = Path(args.stdlib), Path(args.site_packages), Path(args.out)
    heldout_rel = [line.split("#")[0].strip() for line in Path(args.heldout_list).read_text()
                   .splitlines()]  # fmt: skip
    heldout_rel = [h for h in heldout_rel if h]
    if out.exists():
        shutil.rmtree(out)
    max_bytes = args.max_file_kb * 1024
    manifest, seen = [], set()
    heldout_lines = []
    for rel in heldout_rel:
        src = stdlib / rel
        if not src.is_file():
            sys.exit(f"held-out file {src} does not exist")
        text = src.read_text(encoding="utf-8")
        _write(out / "heldout" / rel, text)
        heldout_lines.append(_long_lines(text))
        seen.add(hashlib.sha256(text.encode()).hexdigest())
        manifest.append(("heldout", rel, text))
    stats = {"near_copy": [], "duplicate": 0, "skipped": 0}

    def take(rel_out: str, path: Path) -> int:
        text = _read(path, max_bytes)
        if text is None:
            stats["skipped"] += 1
            return 0
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in seen:
            stats["duplicate"] += 1
            return 0
        if _near_copy(_long_lines(text), heldout_lines):
            stats["near_copy"].append(rel_out)
            return 0
        seen.add(digest)
        _write(out / "train" / rel_out, text)
        manifest.append(("train", rel_out, text))
        return len(text.encode())

    held = set(heldout_rel)
    std_bytes = sum(take(f"stdlib/{rel}", p) for rel, p in stdlib_files(stdlib) if rel not in held)
    licences = [("cpython-stdlib", args.stdlib_version, "PSF-2.0", std_bytes, "")]
    cap = int(args.max_package_mb * 1e6)
    for dist, files in package_files(site):
        name, version = dist.metadata["Name"], dist.version
        lic = licence_of(dist)
        if name in SKIP_DISTS or not files:
            continue
        if not is_permissive(lic):
            licences.append((name, version, lic, 0, "excluded: licence"))
            continue
        total = 0
        # a fixed pseudo-random order, so a capped package contributes a spread of its modules
        for rel, p in sorted(files, key=lambda f: hashlib.sha1(f[0].encode()).hexdigest()):
            if total >= cap:
                break
            total += take(f"packages/{name}/{rel}", p)
        licences.append((name, version, lic, total, ""))
    _write_tables(out, manifest, licences)
    train = [m for m in manifest if m[0] == "train"]
    print(f"train: {len(train)} files, {sum(len(m[2].encode()) for m in train) / 1e6:.1f} MB; "
          f"held out: {len(heldout_rel)} files; near-copies of held-out files dropped: "
          f"{len(stats['near_copy'])}; duplicates: {stats['duplicate']}; "
          f"skipped (size/encoding/long lines): {stats['skipped']}")  # fmt: skip
    for rel in stats["near_copy"]:
        print(f"  near-copy dropped: {rel}")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _write_tables(out: Path, manifest: list, licences: list) -> None:
    with open(out / "manifest.tsv", "w") as f:
        f.write("split\tpath\tbytes\tsha256\n")
        for split, rel, text in manifest:
            raw = text.encode()
            f.write(f"{split}\t{rel}\t{len(raw)}\t{hashlib.sha256(raw).hexdigest()}\n")
    with open(out / "licences.tsv", "w") as f:
        f.write("distribution\tversion\tlicence\tbytes_taken\tnote\n")
        for row in licences:
            f.write("\t".join(map(str, row)) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stdlib", default=DEFAULT_STDLIB)
    p.add_argument("--stdlib_version", default="3.11.7", help="Written to licences.tsv.")
    p.add_argument("--site_packages", default=DEFAULT_SITE)
    p.add_argument("--heldout_list", default=str(HERE / "heldout_files.txt"))
    p.add_argument("--out", default="/tmp/demo_corpus")
    p.add_argument("--max_package_mb", type=float, default=15.0)
    p.add_argument("--max_file_kb", type=int, default=300)
    build(p.parse_args())


if __name__ == "__main__":
    main()
