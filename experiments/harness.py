"""The one harness the benchmarks share: timing, device and version info, result rows, and a
correctness check of the benchmarked output.

    from experiments import harness

    t = harness.time_device(fn, *args)          # Timing: median / min / max / IQR, in seconds
    rows = harness.Rows(out_path, bench="moe")   # every row: commit, device, versions, argv
    rows.emit({"impl": "gpu", **t.row_ms(), **harness.check(out, ref, atol=2e-2, rtol=2e-2)})

Timing: `time_device` runs `fn(*args)` `warmup` times (the first compiles), then `reps` samples
of `inner` back-to-back calls each, and blocks on the last result of a sample with
`jax.block_until_ready` before reading the wall clock: device time plus the launch of `inner`
calls, divided by `inner`. Samples below `min_reps` are never taken unless one warm call is
slower than `slow_s` (e.g. a ~1 s `ragged_dot` baseline), then `slow_reps`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REPS = 10


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call over `reps` samples (after warm-up)."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    reps: int

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        if not samples:
            raise ValueError("Timing.of needs at least one sample")
        s = sorted(samples)
        q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
        return cls(statistics.median(s), s[0], s[-1], q[0], q[2], len(s))

    def row_ms(self, key: str = "ms") -> dict:
        """{key: median ms, key_min, key_max, key_iqr: [q1, q3], reps} for a result row."""
        ms = 1e3
        return {
            key: self.median * ms,
            f"{key}_min": self.min * ms,
            f"{key}_max": self.max * ms,
            f"{key}_iqr": [self.q1 * ms, self.q3 * ms],
            "reps": self.reps,
        }


def device_seconds(fn: Callable, *args) -> tuple[Any, float]:
    """(fn(*args), wall seconds until its result is ready on the device)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def time_device(
    fn: Callable,
    *args,
    reps: int = DEFAULT_REPS,
    warmup: int = 2,
    inner: int = 1,
    slow_s: float | None = None,
    slow_reps: int = 3,
) -> Timing:
    """Device time per call of fn(*args) (see the module docstring)."""
    warm = 0.0
    for _ in range(warmup):
        _, warm = device_seconds(fn, *args)
    n = slow_reps if slow_s is not None and warm > slow_s else reps
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner)
    return Timing.of(samples)


def timed(fn: Callable, reps: int = DEFAULT_REPS, warmup: int = 2) -> float:
    """Median seconds of fn() (which must block until the device is done) after warm-up calls
    (the first of which compiles). For callables that are not JAX (torch, a whole decode loop
    that synchronises itself)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing.of(samples).median


def timed_stats(fn: Callable, reps: int = DEFAULT_REPS, warmup: int = 2) -> Timing:
    """`timed` with the spread: fn() must block until the device is done."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing.of(samples)


def check(out, ref, atol: float, rtol: float) -> dict:
    """Max error of a benchmarked output against a reference, as row fields.

    `max_abs_err`, `max_rel_err` (|out - ref| / max|ref|), `mismatch_frac` (elements outside
    atol + rtol * |ref|) and `check_ok` (same shape, all finite, no mismatch). Pytrees are
    compared leaf by leaf and reported as the worst leaf.
    """
    outs, refs = jax.tree.leaves(out), jax.tree.leaves(ref)
    if len(outs) != len(refs):
        return {"check_ok": False, "check_error": f"{len(outs)} leaves vs {len(refs)}"}
    worst = {"max_abs_err": 0.0, "max_rel_err": 0.0, "mismatch_frac": 0.0, "check_ok": True}
    for o, r in zip(outs, refs, strict=True):
        o = np.asarray(jax.device_get(o), np.float64)
        r = np.asarray(jax.device_get(r), np.float64)
        if o.shape != r.shape:
            return {"check_ok": False, "check_error": f"shape {o.shape} vs {r.shape}"}
        finite = bool(np.isfinite(o).all())
        err = np.abs(o - r)
        scale = float(np.abs(r).max()) if r.size else 0.0
        bad = ~(err <= atol + rtol * np.abs(r))
        worst["max_abs_err"] = max(worst["max_abs_err"], float(err.max()) if r.size else 0.0)
        if scale > 0:
            worst["max_rel_err"] = max(worst["max_rel_err"], float(err.max()) / scale)
        worst["mismatch_frac"] = max(worst["mismatch_frac"], float(bad.mean()) if r.size else 0.0)
        worst["check_ok"] = worst["check_ok"] and finite and not bad.any()
    return {**worst, "check_atol": atol, "check_rtol": rtol}


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken optional package
        return None


def env_info() -> dict:
    """Device kind and count, platform, versions (python, jax, jaxlib, flax) and git commit."""
    dev = jax.devices()[0]
    return {
        "device": dev.device_kind,
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "commit": git_commit(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


class Rows:
    """JSON-lines result rows: each row gets `env_info()`, the command line and a UTC time, is
    printed and appended to `path` (if given) as soon as it is measured, so a run cut short by
    its time cap keeps what it has."""

    def __init__(self, path: str | os.PathLike | None, **fixed):
        self.path = Path(path) if path else None
        self.meta = {
            **env_info(),
            "argv": shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **fixed,
        }
        self.rows: list[dict] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, row: dict, echo: Callable[[dict], Any] | None = None) -> dict:
        row = {**self.meta, **row}
        line = json.dumps(row, default=_jsonable)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        self.rows.append(row)
        print(line if echo is None else echo(row), flush=True)
        return row


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
