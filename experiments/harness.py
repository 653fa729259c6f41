"""The one harness the benchmarks share: timing, device and version info, result rows, and a
correctness check of the benchmarked output.

    from experiments import harness

    t = harness.time_device(fn, *args)          # Timing: median / min / max / IQR, in seconds
    rows = harness.Rows(out_path, bench="moe")   # every row: commit, device, versions, argv
    rows.emit({"impl": "gpu", **t.row_ms(), **harness.check(out, ref, atol=2e-2, rtol=2e-2)})

Timing (`measure`, `time_device`; `time_torch` for torch): `warmup` untimed calls (the first
compiles), then `reps` (>= 10 unless a caller says otherwise) timed calls, each after an L2 flush
and, with `setup`, on fresh untimed inputs. `method`:
- "profiler" (the default on GPU / TPU): the device time of each call from the profiler's device
  events (`experiments.device_time`: span from the call's first kernel to its last, so gaps
  between kernels count; dispatch before the first kernel does not); the row says
  `timing_method: profiler_device_span` and also carries the busy time (`<key>_busy`, the union
  of the kernels) and the wall time of the same calls (`<key>_wall`, slowed by the tracer);
- "wall" (the default on CPU, and the fallback when the profiler gives no device events, with a
  `timing_note`): the wall clock from the call to its result being ready
  (`jax.block_until_ready`; `torch.cuda.synchronize`), `timing_method: wall_block_until_ready`
  / `wall_cuda_synchronize`.
`HARNESS_TIMING=wall|profiler` overrides the "auto" choice. Whole loops that synchronise with
the host (the decode loops) are timed with "wall" on both sides of a comparison: the profiler's
per-launch overhead would slow the launch-bound side more than the other.
L2: `l2_flush_bytes` (256 MiB on GPU, 0 elsewhere) is rewritten before every call on both sides.
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

from experiments import device_time

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REPS = 10
MIN_REPS = 10  # rows with fewer timed calls say so (`few_reps`)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call over `reps` samples (after warm-up), and how they were taken."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    reps: int
    method: str = "wall"
    l2_flush_bytes: int = 0
    busy: float | None = None  # median busy time (profiler): the union of the call's kernels
    wall: float | None = None  # median wall time of the same calls (profiler runs)
    note: str | None = None

    @classmethod
    def of(cls, samples: list[float], **kw) -> Timing:
        if not samples:
            raise ValueError("Timing.of needs at least one sample")
        s = sorted(samples)
        q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
        return cls(statistics.median(s), s[0], s[-1], q[0], q[2], len(s), **kw)

    def row_ms(self, key: str = "ms") -> dict:
        """{key: median ms, key_min, key_max, key_iqr: [q1, q3], reps, timing_method,
        l2_flush_bytes} (+ key_busy, key_wall, timing_note, few_reps when they apply)."""
        ms = 1e3
        row = {
            key: self.median * ms,
            f"{key}_min": self.min * ms,
            f"{key}_max": self.max * ms,
            f"{key}_iqr": [self.q1 * ms, self.q3 * ms],
            "reps": self.reps,
            "timing_method": self.method,
            "l2_flush_bytes": self.l2_flush_bytes,
        }
        if self.busy is not None:
            row[f"{key}_busy"] = self.busy * ms
        if self.wall is not None:
            row[f"{key}_wall"] = self.wall * ms
        if self.note:
            row["timing_note"] = self.note
        if self.reps < MIN_REPS:
            row["few_reps"] = True
        return row


def device_seconds(fn: Callable, *args) -> tuple[Any, float]:
    """(fn(*args), wall seconds until its result is ready on the device)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def timing_method(method: str, on_device: bool) -> str:
    """ "auto" -> $HARNESS_TIMING if set, else "profiler" on a device (GPU / TPU), "wall" else."""
    if method == "auto":
        method = os.environ.get("HARNESS_TIMING") or ("profiler" if on_device else "wall")
    if method not in ("profiler", "wall"):
        raise ValueError(f"timing method must be auto, profiler or wall, got {method!r}")
    return method


def measure(
    run: Callable[[Any], Any],
    *,
    reps: int = DEFAULT_REPS,
    warmup: int = 2,
    setup: Callable[[], Any] | None = None,
    method: str = "auto",
    flush_l2: bool | None = None,
    slow_s: float | None = None,
    slow_reps: int = 3,
    per_call: int = 1,
) -> Timing:
    """Seconds per call of run(setup()) (run returns JAX arrays to wait for; setup's result
    is made before the call and not timed). A last warm-up call slower than slow_s takes
    slow_reps samples. per_call: calls of the timed function inside one run (divides)."""
    backend = jax.default_backend()
    method = timing_method(method, backend in ("gpu", "tpu"))
    flush = device_time.jax_flush_bytes(backend) if flush_l2 is None else (
        device_time.FLUSH_BYTES if flush_l2 else 0)  # fmt: skip
    warm = 0.0
    for _ in range(warmup):
        state = jax.block_until_ready(setup()) if setup is not None else None
        device_time.jax_flush_l2(flush)
        _, warm = device_seconds(run, state)
        del state
    n = slow_reps if slow_s is not None and warm > slow_s else reps
    common = {"l2_flush_bytes": flush}
    if method == "profiler":
        try:
            spans, how = device_time.jax_device_times(run, n, setup, flush,
                                                      cpu_ops=backend == "cpu")  # fmt: skip
        except Exception as e:  # noqa: BLE001 - no device events: the wall clock below
            common["note"] = f"profiler gave no device time ({type(e).__name__}: {e})"[:300]
        else:
            name = "profiler_device_span" + ("_cpu_ops" if backend == "cpu" else "")
            return Timing.of(
                [s / per_call for s, _, _ in spans],
                method=name if how == "windows" else f"{name}_{how}",
                busy=statistics.median(b for _, b, _ in spans) / per_call,
                wall=statistics.median(w for _, _, w in spans) / per_call,
                **common,
            )
    samples = []
    for _ in range(n):
        state = jax.block_until_ready(setup()) if setup is not None else None
        device_time.jax_flush_l2(flush)
        samples.append(device_seconds(run, state)[1] / per_call)
        del state
    return Timing.of(samples, method="wall_block_until_ready", **common)


def time_device(
    fn: Callable,
    *args,
    reps: int = DEFAULT_REPS,
    warmup: int = 2,
    inner: int = 1,
    slow_s: float | None = None,
    slow_reps: int = 3,
    method: str = "auto",
    flush_l2: bool | None = None,
) -> Timing:
    """Device time per call of fn(*args) (see the module docstring); inner > 1 times that
    many back-to-back calls per sample and divides."""

    def run(_):
        out = None
        for _ in range(inner):
            out = fn(*args)
        return out

    return measure(run, reps=reps, warmup=warmup, method=method, flush_l2=flush_l2,
                   slow_s=slow_s, slow_reps=slow_reps, per_call=inner)  # fmt: skip


def time_torch(
    run: Callable[[Any], Any],
    *,
    reps: int = DEFAULT_REPS,
    warmup: int = 2,
    setup: Callable[[], Any] | None = None,
    method: str = "auto",
    flush_l2: bool = True,
) -> Timing:
    """`measure` for a torch callable: the profiler's CUDA kernel time per call on a GPU
    (torch.profiler), else the wall clock after torch.cuda.synchronize()."""
    import torch

    cuda = torch.cuda.is_available()
    method = timing_method(method, cuda)
    flush = device_time.FLUSH_BYTES if flush_l2 and cuda else 0
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        state = setup() if setup is not None else None
        run(state)
        sync()
        del state
    common = {"l2_flush_bytes": flush}
    if method == "profiler" and cuda:
        try:
            spans, how = device_time.torch_device_times(run, reps, setup, flush)
        except Exception as e:  # noqa: BLE001 - the wall clock below
            common["note"] = f"profiler gave no device time ({type(e).__name__}: {e})"[:300]
        else:
            name = "torch_profiler_device_span"
            return Timing.of(
                [s for s, _, _ in spans],
                method=name if how == "windows" else f"{name}_{how}",
                busy=statistics.median(b for _, b, _ in spans),
                wall=statistics.median(w for _, _, w in spans),
                **common,
            )
    samples = []
    for _ in range(reps):
        state = setup() if setup is not None else None
        device_time.torch_flush_l2(flush)
        t0 = time.perf_counter()
        run(state)
        sync()
        samples.append(time.perf_counter() - t0)
        del state
    method = "wall_cuda_synchronize" if cuda else "wall"
    return Timing.of(samples, method=method, **common)


def timed(fn: Callable, reps: int = DEFAULT_REPS, warmup: int = 2) -> float:
    """Median seconds of fn() (which must block until the device is done) after warm-up calls
    (the first of which compiles)."""
    return timed_stats(fn, reps, warmup).median


def timed_stats(fn: Callable, reps: int = DEFAULT_REPS, warmup: int = 2) -> Timing:
    """Wall-clock seconds of fn(), which must block until the device is done (a whole loop
    that synchronises itself), with the spread; `timing_method: wall`, no L2 flush."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing.of(samples, method="wall")


def fwd_bwd(fn: Callable, cotangent, argnums: tuple[int, ...] = (0, 1)) -> Callable:
    """jit(args -> (fn(*args), grads of <fn(*args), cotangent> w.r.t. argnums)).

    The forward output is returned, so XLA cannot drop the forward: a loss linear in the output
    (sum(fn(x) * dy)) lets it compute only the backward's matmuls while the FLOP count of a
    "forward + backward" row counts the forward too."""

    def f(*args):
        def part(*diff):
            full = list(args)
            for i, a in zip(argnums, diff, strict=True):
                full[i] = a
            return fn(*full)

        out, pullback = jax.vjp(part, *(args[i] for i in argnums))
        return out, pullback(cotangent.astype(out.dtype))

    return jax.jit(f)


def no_check(reason: str) -> dict:
    """Row fields of a timed output that is not checked, and why."""
    return {"check_skipped": reason}


def check(out, ref, atol: float, rtol: float, prefix: str = "", scaled: bool = False) -> dict:
    """Max error of a benchmarked output against a reference, as row fields.

    `max_abs_err`, `max_rel_err` (|out - ref| / max|ref|), `mismatch_frac` (elements outside
    atol + rtol * |ref|) and `check_ok` (same shape, all finite, no mismatch). Pytrees are
    compared leaf by leaf and reported as the worst leaf. scaled: atol is relative to each
    leaf's max |ref| (bf16 results whose elements cancel to near zero: gradients). prefix: for
    a second check in the same row.
    """
    if prefix:
        return {prefix + k: v for k, v in check(out, ref, atol, rtol, scaled=scaled).items()}
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
        bad = ~(err <= atol * (scale if scaled else 1.0) + rtol * np.abs(r))
        worst["max_abs_err"] = max(worst["max_abs_err"], float(err.max()) if r.size else 0.0)
        if scale > 0:
            worst["max_rel_err"] = max(worst["max_rel_err"], float(err.max()) / scale)
        worst["mismatch_frac"] = max(worst["mismatch_frac"], float(bad.mean()) if r.size else 0.0)
        worst["check_ok"] = worst["check_ok"] and finite and not bad.any()
    fields = {**worst, "check_atol": atol, "check_rtol": rtol}
    return fields | ({"check_atol_scaled": True} if scaled else {})


def git_commit() -> str | None:
    """The checkout's short commit, with "-dirty" when tracked files differ from it."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--"],
            capture_output=True,
            timeout=10,
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return (commit + ("-dirty" if dirty == 1 else "")) if commit else None


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


def loaded_versions() -> dict:
    """Versions of the anchor libraries this process has imported (torch, transformers, triton,
    FLA), so a row timed against them names them."""
    mods = {"torch": "torch", "transformers": "transformers", "triton": "triton", "fla": "fla"}
    return {k: _version(m) for k, m in mods.items() if m in sys.modules}


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
        row = {**self.meta, **loaded_versions(), **row}
        line = json.dumps(row, default=_jsonable)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        self.rows.append(row)
        print(line if echo is None else echo(row), flush=True)
        return row

    def append(self, row: dict) -> dict:
        """Write a row made elsewhere (e.g. by an isolated child process) as it is."""
        line = json.dumps(row, default=_jsonable)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        self.rows.append(row)
        print(line, flush=True)
        return row


def memory_peak() -> dict:
    """This process's device memory: `peak_bytes` (max over local devices of
    peak_bytes_in_use) and `bytes_in_use`; {} where the backend keeps no statistics (CPU)."""
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    if not all("peak_bytes_in_use" in s for s in stats):
        return {}
    return {"peak_bytes": max(s["peak_bytes_in_use"] for s in stats),
            "bytes_in_use": max(s.get("bytes_in_use", 0) for s in stats)}  # fmt: skip


def run_isolated(argv: list[str], timeout: float | None = None) -> tuple[list[dict], str | None]:
    """Run `python argv... --out TMP` in a fresh process (its own device memory, so the peak
    a row reports is that row's alone) and return (its rows, each marked `isolated: true`, and
    an error line or None). The child's stdout goes to ours."""
    import tempfile

    fd, tmp = tempfile.mkstemp(suffix=".jsonl", prefix="isolated_")
    os.close(fd)
    err = None
    try:
        proc = subprocess.run([sys.executable, *argv, "--out", tmp], timeout=timeout,
                              cwd=REPO, check=False)  # fmt: skip
        if proc.returncode:
            err = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        err = f"timed out after {timeout:.0f} s"
    rows = []
    with open(tmp) as f:
        for line in f:
            if line.strip():
                rows.append({**json.loads(line), "isolated": True})
    os.unlink(tmp)
    return rows, err


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
