"""Run logging: ``metrics.jsonl``, TensorBoard events, Weights & Biases, and a progress bar or
plain lines.

Only the main process writes. On resume, lines of ``metrics.jsonl`` past the restored step are
dropped first, so the file always describes one consistent run. ``log.backends`` of the run
config picks the other backends: TensorBoard events under ``WORKDIR/tb`` (the optional
``tensorboardX`` package, extra ``train``) and Weights & Biases (the optional ``wandb`` package,
extra ``wandb``; the run's id is kept in ``WORKDIR/wandb_run_id`` so a resumed run logs into the
same W&B run). With ``backends`` null, TensorBoard events are written when tensorboardX is
installed and skipped with one note on stderr otherwise.

A URL WORKDIR (``gs://``, ``s3://``, ``az://``; ``minimax_jax.paths``): object stores cannot
append, so the lines are kept in memory and ``metrics.jsonl`` is rewritten whole (one object)
at most every ``flush_seconds`` and at ``close``; no TensorBoard events are written there (one
note on stderr).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
import uuid
from typing import Any

from minimax_jax import files, paths

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"
_SHOWN = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")
# backend -> (module imported, the pip requirement that brings it)
_PACKAGES = {"tensorboard": ("tensorboardX", "minimax_jax[train]"),
             "wandb": ("wandb", "minimax_jax[wandb]")}  # fmt: skip


class BackendError(ValueError):
    """A logging backend listed in ``log.backends`` cannot be used (its package is missing)."""


def import_backend(name: str) -> Any:
    """The module of backend ``name`` ("tensorboard" or "wandb"), or a `BackendError` naming the
    package to install."""
    module, extra = _PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendError(
            f"log.backends lists {name} but the {module} package is not installed: "
            f"pip install '{extra}' (or {module}), or remove {name} from log.backends"
        ) from None


def check_backends(backends: tuple | None) -> None:
    """Imports every optional backend ``backends`` lists (before anything is compiled)."""
    for name in backends or ():
        if name != "jsonl":
            import_backend(name)


class _TensorBoard:
    def __init__(self, module: Any, workdir: str, start: int):
        self.writer = module.SummaryWriter(os.path.join(workdir, "tb"), purge_step=start + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """One W&B run per workdir: its id is kept in ``WORKDIR/wandb_run_id`` for resumes."""

    def __init__(self, module: Any, workdir: str, project: str | None, name: str | None,
                 config: dict | None):  # fmt: skip
        id_file = paths.join(workdir, WANDB_ID_FILE)
        remote = paths.is_url(workdir)
        if paths.exists(id_file):
            run_id = paths.read_text(id_file).strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            if remote:
                paths.write_text(id_file, run_id + "\n")
            else:
                files.write_atomic(id_file, run_id + "\n")
        self.run = module.init(project=project or "minimax_jax", name=name, id=run_id,
                               resume="allow", dir=None if remote else workdir,
                               config=config)  # fmt: skip

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def _open_backends(workdir: str, start: int, log_section: Any, config: dict | None) -> list:
    backends = getattr(log_section, "backends", None)
    out = []
    if paths.is_url(workdir):
        if backends is None or "tensorboard" in backends:
            print("train: a URL --workdir gets no TensorBoard events", file=sys.stderr)
        backends = tuple(b for b in backends or () if b != "tensorboard")
    elif backends is None:  # default: TensorBoard when installed
        try:
            out.append(_TensorBoard(import_backend("tensorboard"), workdir, start))
        except BackendError:
            print("train: tensorboardX not installed, no TensorBoard events", file=sys.stderr)
        return out
    if "tensorboard" in backends:
        out.append(_TensorBoard(import_backend("tensorboard"), workdir, start))
    if "wandb" in backends:
        out.append(_Wandb(import_backend("wandb"), workdir, log_section.wandb_project,
                          log_section.wandb_name, config))  # fmt: skip
    return out


def _kept(path: str, last_step: int) -> list[str]:
    """The lines of ``path`` up to ``last_step`` ([] without the file)."""
    if not paths.exists(path):
        return []
    lines = paths.read_text(path).splitlines(keepends=True)
    return [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]


def _truncate(path: str, last_step: int) -> None:
    if os.path.exists(path):
        kept = _kept(path, last_step)
        with open(path, "w") as f:
            f.writelines(kept)


def read_metrics(workdir: str) -> list[dict]:
    """All lines of ``WORKDIR/metrics.jsonl`` (local or a URL) as dicts."""
    text = paths.read_text(paths.join(workdir, METRICS_FILE))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class MetricsLog:
    """Writes step and eval metrics; shows progress on a TTY, plain lines otherwise."""

    def __init__(
        self,
        workdir: str,
        start: int,
        total: int,
        *,
        is_main: bool,
        every: int = 1,
        log_section: Any = None,
        config: dict | None = None,
        flush_seconds: float = 30.0,
    ):
        """``log_section``: the run config's `LogSection` (None: the defaults); ``config``: the run
        config as a dict, for the backends that record it (W&B)."""
        self.is_main = is_main
        self.start = start
        self.every = every
        self.path = paths.join(workdir, METRICS_FILE)
        self.remote = paths.is_url(workdir)
        self.flush_seconds = flush_seconds
        self.backends: list = []
        self.bar = None
        if not is_main:
            return
        if self.remote:  # lines in memory, the object rewritten whole (see the module docstring)
            self.file = None
            self._lines = _kept(self.path, start)
            self._flushed = time.monotonic()
            self._flush()
        else:
            _truncate(self.path, start)
            self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        self.backends = _open_backends(workdir, start, log_section, config)
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # plain lines instead of a bar
                return
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def _flush(self, force: bool = True) -> None:
        """A URL workdir: rewrites ``metrics.jsonl`` if forced or ``flush_seconds`` passed."""
        if force or time.monotonic() - self._flushed >= self.flush_seconds:
            paths.write_text(self.path, "".join(self._lines))
            self._flushed = time.monotonic()

    def _write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}  # fmt: skip
        if self.remote:
            self._lines.append(json.dumps(clean) + "\n")
            self._flush(force=False)
        else:
            self.file.write(json.dumps(clean) + "\n")
            self.file.flush()
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, int | float) and math.isfinite(v)}  # fmt: skip
        for backend in self.backends:
            backend.scalars(record["step"], scalars)

    def step(self, metrics: dict[str, Any], *, force: bool = False) -> None:
        """One training step's metrics (written every ``every`` steps, or when forced)."""
        if not self.is_main:
            return
        step = metrics["step"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
            )
        if step % self.every and not force and step != self.start + 1:
            return
        self._write(metrics)
        if metrics.get("skipped"):
            self.note(f"step {step}: non-finite loss or gradient, update skipped")
        if self.bar is None:
            shown = " ".join(f"{k}={metrics[k]:.4g}" for k in _SHOWN)
            print(f"step {step} {shown}", file=sys.stderr, flush=True)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        self._write({"step": step, **metrics})
        loss, ppl = metrics["eval_loss"], metrics["eval_ppl"]
        self.note(f"eval step {step}: loss={loss:.4f} ppl={ppl:.2f}")

    def note(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.is_main:
            return
        if self.remote:
            self._flush()
        else:
            self.file.close()
        for backend in self.backends:
            backend.close()
        if self.bar is not None:
            self.bar.close()
